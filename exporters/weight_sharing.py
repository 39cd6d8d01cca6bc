"""Weight-sharing encoding: weights with few distinct values per row stored as packed codes.

A 2-D float32 or int8 initializer whose every row (or column) holds at most ``2**b`` distinct
values becomes ``b``-bit codes packed per row plus a per-row codebook (fp16, or int8 for weights
on the int8 grid): the layout of ``edgec.runtimes.lowbit``. Where it is decoded depends on who
reads it, so that the device never holds it wider than it computes with:

- **read only by Gather** (embedding tables): codes and codebook stay in the ONNX graph, and
  standard operators (Gather, Reshape, Mul, ReduceSum, BitShift, BitwiseAnd, GatherElements)
  decode the gathered rows at run time. Any onnxruntime runs it; the device holds the packed table.
- **anything else** (Linears, which int8 kernels prepack): the stage's weights file holds the
  codes, and the ONNX file declares the weight as external data in the buffer edgec's runtime
  decodes them into before it creates the session (``edgec.runtimes.lowbit``).

Both decodes are exact: they reproduce the original tensor bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from edgec.runtimes.lowbit import (
    DECODED_LOCATION,
    CodedWeight,
    decoded_layout,
    pack_rows,
    row_bytes,
    weights_keys,
)
from onnx import TensorProto, helper, numpy_helper

MIN_ELEMENTS = 4096  # smaller tensors are not worth a decode


@dataclass(frozen=True)
class Encoded:
    """One encoded initializer: name, shape, bits per code, bytes before and after, and where
    it is decoded (``gather``: in the graph per run; ``load``: by the runtime at load)."""

    name: str
    shape: tuple[int, ...]
    bits: int
    bytes_before: int
    bytes_after: int
    decoded_at: str


@dataclass
class SharedEncoding:
    """What ``encode_shared_weights`` did, and the arrays of the stage's weights file."""

    encoded: list[Encoded] = field(default_factory=list)
    coded: list[CodedWeight] = field(default_factory=list)  # decoded by the runtime at load
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the weights file's contents


def distinct_per_row(array: np.ndarray) -> int:
    """The largest number of distinct values in any row of a 2-D array."""
    ordered = np.sort(array, axis=1)
    return int(1 + (np.diff(ordered, axis=1) != 0).sum(axis=1).max())


def codebook_rows(array: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook (R, 2**bits), codes (R, C)): row r's values are ``codebook[r, codes[r]]``."""
    k = 2**bits
    rows, cols = array.shape
    codebook = np.empty((rows, k), dtype=array.dtype)
    codes = np.empty((rows, cols), dtype=np.uint8)
    for r in range(rows):
        values, inverse = np.unique(array[r], return_inverse=True)
        codebook[r, : len(values)] = values
        codebook[r, len(values) :] = values[-1]
        codes[r] = inverse
    return codebook, codes


def _bits(rows: np.ndarray) -> int | None:
    """Bits per code if coding ``rows`` saves at least a tenth of its bytes, else None."""
    bits = max(1, int(np.ceil(np.log2(distinct_per_row(rows)))))
    if bits >= 8 * rows.itemsize or bits > 8:
        return None
    codebook_item = 1 if rows.dtype == np.int8 else 2
    size = rows.shape[0] * (row_bytes(rows.shape[1], bits) + 2**bits * codebook_item)
    return bits if size < rows.nbytes * 0.9 else None


def _plan(array: np.ndarray, transposable: bool) -> tuple[int, bool] | None:
    """(bits, transpose) of the smaller coding of ``array``, or None if none pays."""
    best: tuple[int, bool, int] | None = None
    for transpose in (False, True) if transposable else (False,):
        rows = array.T if transpose else array
        bits = _bits(rows)
        if bits is None:
            continue
        size = rows.shape[0] * row_bytes(rows.shape[1], bits)
        if best is None or size < best[2]:
            best = (bits, transpose, size)
    return None if best is None else (best[0], best[1])


def _on_fp16_grid(array: np.ndarray) -> bool:
    return bool(np.array_equal(array.astype(np.float16).astype(np.float32), array))


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _gather_decode(
    name: str, cols: int, bits: int, dtype: np.dtype, ids: str, output: str, tag: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``Gather(name, ids)`` into ``output`` from the packed table's rows.

    Each group of 8 codes fills ``bits`` whole bytes, so a gathered row reshapes to (groups,
    bits) bytes; the bytes of a group sum into one integer, from which broadcast shifts take the
    8 codes. Every step is elementwise or a reduction: 2.3x faster than gathering each code's
    bytes along the last axis (0.41 against 0.95 ms for minilm's word table at 1 x 128).
    """
    p = f"{name}.decode{tag}"
    groups = -(-cols // 8)
    consts = [
        _const(f"{p}.start", np.array([0], np.int64)),
        _const(f"{p}.body", np.array([groups * bits], np.int64)),
        _const(f"{p}.cols", np.array([cols], np.int64)),
        _const(f"{p}.last", np.array([-1], np.int64)),
        _const(f"{p}.groups", np.array([groups, bits] if bits < 8 else [groups * 8], np.int64)),
        _const(f"{p}.flat", np.array([groups * 8], np.int64)),
    ]
    codes, codebook = weights_keys(name)
    n = helper.make_node
    nodes = [
        n("Gather", [codes, ids], [f"{p}.rows"], axis=0),  # (..., row bytes) uint8
        n("Slice", [f"{p}.rows", f"{p}.start", f"{p}.body", f"{p}.last"], [f"{p}.packed"]),
        n("Shape", [f"{p}.rows"], [f"{p}.lead"], end=-1),  # the gathered ids' shape
        n("Concat", [f"{p}.lead", f"{p}.groups"], [f"{p}.grouped_shape"], axis=0),
        n("Reshape", [f"{p}.packed", f"{p}.grouped_shape"], [f"{p}.grouped"]),
    ]
    if bits < 8:  # (..., groups, bits) bytes -> one integer per group -> (..., groups, 8) codes
        consts += [
            _const(f"{p}.place", (256 ** np.arange(bits)).astype(np.int64)),
            _const(f"{p}.shifts", (np.arange(8) * bits).astype(np.uint64)),
            _const(f"{p}.mask", np.array(2**bits - 1, np.uint64)),
        ]
        nodes += [
            n("Cast", [f"{p}.grouped"], [f"{p}.bytes"], to=TensorProto.INT64),
            n("Mul", [f"{p}.bytes", f"{p}.place"], [f"{p}.placed"]),
            n("ReduceSum", [f"{p}.placed", f"{p}.last"], [f"{p}.sum"], keepdims=1),
            n("Cast", [f"{p}.sum"], [f"{p}.word"], to=TensorProto.UINT64),
            n("BitShift", [f"{p}.word", f"{p}.shifts"], [f"{p}.shifted"], direction="RIGHT"),
            n("BitwiseAnd", [f"{p}.shifted", f"{p}.mask"], [f"{p}.masked"]),
            n("Concat", [f"{p}.lead", f"{p}.flat"], [f"{p}.flat_shape"], axis=0),
            n("Reshape", [f"{p}.masked", f"{p}.flat_shape"], [f"{p}.all_codes"]),
        ]
    else:  # 8-bit codes are the bytes themselves
        nodes.append(n("Identity", [f"{p}.grouped"], [f"{p}.all_codes"]))
    nodes += [
        n("Slice", [f"{p}.all_codes", f"{p}.start", f"{p}.cols", f"{p}.last"], [f"{p}.some"]),
        n("Cast", [f"{p}.some"], [f"{p}.code"], to=TensorProto.INT64),
        n("Gather", [codebook, ids], [f"{p}.book"], axis=0),  # (..., 2**bits)
        n("GatherElements", [f"{p}.book", f"{p}.code"], [f"{p}.values"], axis=-1),
    ]
    if dtype == np.float32:
        nodes.append(n("Cast", [f"{p}.values"], [output], to=TensorProto.FLOAT))
    else:
        nodes.append(n("Identity", [f"{p}.values"], [output]))
    return nodes, consts


def _gather_only(name: str, consumers: list[onnx.NodeProto]) -> bool:
    """Whether every reader of ``name`` gathers whole rows from it (an embedding table)."""
    return bool(consumers) and all(
        node.op_type == "Gather"
        and node.input[0] == name
        and name not in node.input[1:]
        and all(a.name != "axis" or helper.get_attribute_value(a) == 0 for a in node.attribute)
        for node in consumers
    )


def _external_placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer whose bytes live outside the graph: the runtime supplies them decoded
    (its external data entries are written once every coded weight is known)."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _point_at_decoded(tensors: dict[str, onnx.TensorProto], coded: list[CodedWeight]) -> None:
    """Each placeholder's external data: its place in the buffer the runtime decodes into."""
    offsets, _ = decoded_layout(coded)
    for weight, offset in zip(coded, offsets, strict=True):
        entries = tensors[weight.name].external_data
        for key, value in (
            ("location", DECODED_LOCATION),
            ("offset", str(offset)),
            ("length", str(weight.decoded_bytes)),
        ):
            entry = entries.add()
            entry.key, entry.value = key, value


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            found.setdefault(name, []).append(node)
    return found


def _candidates(
    graph: onnx.GraphProto, min_elements: int, only: Collection[str] | None
) -> Iterable[tuple[int, np.ndarray]]:
    for index, init in enumerate(graph.initializer):
        if only is not None and init.name not in only:
            continue
        if len(init.dims) != 2 or int(np.prod(init.dims)) < min_elements:
            continue
        if init.data_type not in (TensorProto.FLOAT, TensorProto.INT8):
            continue
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and not _on_fp16_grid(array):
            continue  # not a shared weight
        yield index, array


def encode_shared_weights(
    model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS, only: Collection[str] | None = None
) -> SharedEncoding:
    """Replace, in place, each 2-D float32/int8 initializer with few distinct values per row by
    its packed codes: decoded per run after Gather for tables, else by the runtime at load from
    the stage's weights file (``SharedEncoding.arrays``). ``only``: consider just these names
    (a partitioned stage re-encodes the weights its source held as codes, sliced or not)."""
    graph = model.graph
    consumers = _consumers(graph)
    result = SharedEncoding()
    replaced: dict[int, list[onnx.TensorProto]] = {}
    placeholders: dict[str, onnx.TensorProto] = {}
    for index, array in _candidates(graph, min_elements, only):
        name = graph.initializer[index].name
        table = _gather_only(name, consumers.get(name, []))
        plan = _plan(array, transposable=not table)
        if plan is None:
            continue
        bits, transpose = plan
        rows = np.ascontiguousarray(array.T if transpose else array)
        codebook, codes = codebook_rows(rows, bits)
        if array.dtype == np.float32:
            codebook = codebook.astype(np.float16)
        packed = pack_rows(codes, bits)
        codes_key, codebook_key = weights_keys(name)
        if table:
            new = [_const(codes_key, packed), _const(codebook_key, codebook)]
            for tag, node in enumerate(consumers[name]):
                nodes, consts = _gather_decode(
                    name, rows.shape[1], bits, array.dtype, node.input[1], node.output[0], str(tag)
                )
                new += consts
                position = list(graph.node).index(node)
                graph.node.remove(node)
                for offset, decode_node in enumerate(nodes):
                    graph.node.insert(position + offset, decode_node)
        else:
            new = [_external_placeholder(name, array)]
            placeholders[name] = new[0]
            result.arrays[codes_key] = packed
            result.arrays[codebook_key] = codebook
            result.coded.append(
                CodedWeight(
                    name=name,
                    shape=(array.shape[0], array.shape[1]),
                    dtype=str(array.dtype),
                    bits=bits,
                    transpose=transpose,
                )
            )
        replaced[index] = new
        result.encoded.append(
            Encoded(
                name,
                tuple(array.shape),
                bits,
                array.nbytes,
                packed.nbytes + codebook.nbytes,
                "gather" if table else "load",
            )
        )
    _point_at_decoded(placeholders, result.coded)
    if replaced:
        kept: list[onnx.TensorProto] = []
        for index, init in enumerate(graph.initializer):
            kept += replaced.get(index, [init])
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return result
