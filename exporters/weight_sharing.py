"""Weight-sharing encoding: a weight with few distinct values per row stored as packed indices.

A 2-D initializer whose every row (or column) holds at most ``2**b`` distinct values is replaced
by a ``b``-bit index stream (uint8 bytes) plus a per-row codebook (fp16 or int8), and decoded by
standard operators (Range, Div, Mod, Cast, Gather, BitShift, BitwiseOr, BitwiseAnd, Reshape) whose
inputs are all constant, so onnxruntime folds the decode away when the session loads: storage
shrinks, run time does not change. The decode is exact: it reproduces the original tensor bit
for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_ELEMENTS = 4096  # smaller tensors are not worth a decode subgraph


@dataclass(frozen=True)
class Encoded:
    """One encoded initializer: name, shape, bits per index, bytes before and after."""

    name: str
    shape: tuple[int, ...]
    bits: int
    bytes_before: int
    bytes_after: int


def distinct_per_row(array: np.ndarray) -> int:
    """The largest number of distinct values in any row of a 2-D array."""
    ordered = np.sort(array, axis=1)
    return int(1 + (np.diff(ordered, axis=1) != 0).sum(axis=1).max())


def codebook_rows(array: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook (R, 2**bits), indices (R, C)): row r's values are ``codebook[r, indices[r]]``."""
    k = 2**bits
    rows, cols = array.shape
    codebook = np.empty((rows, k), dtype=array.dtype)
    indices = np.empty((rows, cols), dtype=np.int64)
    for r in range(rows):
        values, inverse = np.unique(array[r], return_inverse=True)
        codebook[r, : len(values)] = values
        codebook[r, len(values) :] = values[-1]
        indices[r] = inverse
    return codebook, indices


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """A little-endian bit stream of ``bits``-bit values, as uint8 bytes plus one padding byte."""
    flat = indices.reshape(-1).astype(np.uint64)
    positions = np.arange(flat.size, dtype=np.uint64) * np.uint64(bits)
    stream = np.zeros(int(positions[-1] // 8) + 3 if flat.size else 2, dtype=np.uint32)
    byte = (positions // 8).astype(np.int64)
    shifted = (flat << (positions % 8)).astype(np.uint32)  # spans at most two bytes
    np.add.at(stream, byte, shifted & 0xFF)
    np.add.at(stream, byte + 1, shifted >> 8)
    return stream.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """numpy reference of the ONNX decode: the first ``count`` values of the stream."""
    positions = np.arange(count, dtype=np.int64) * bits
    lo = packed[positions // 8].astype(np.uint32)
    hi = packed[positions // 8 + 1].astype(np.uint32)
    return (((hi << 8) | lo) >> (positions % 8).astype(np.uint32)) & ((1 << bits) - 1)


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _decode_nodes(
    name: str, shape: tuple[int, int], bits: int, transpose: bool
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``name`` from ``{name}.packed`` and ``{name}.codebook``."""
    rows, cols = (shape[1], shape[0]) if transpose else shape
    p = f"{name}.decode"
    count, k = rows * cols, 2**bits
    consts = [
        _const(f"{p}.zero", np.array(0, np.int64)),
        _const(f"{p}.count", np.array(count, np.int64)),
        _const(f"{p}.one", np.array(1, np.int64)),
        _const(f"{p}.bits", np.array(bits, np.int64)),
        _const(f"{p}.eight", np.array(8, np.int64)),
        _const(f"{p}.cols", np.array(cols, np.int64)),
        _const(f"{p}.k", np.array(k, np.int64)),
        _const(f"{p}.shift8", np.array(8, np.uint32)),
        _const(f"{p}.mask", np.array(k - 1, np.uint32)),
        _const(f"{p}.shape", np.array([rows, cols], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Range", [f"{p}.zero", f"{p}.count", f"{p}.one"], [f"{p}.pos"]),
        n("Mul", [f"{p}.pos", f"{p}.bits"], [f"{p}.bitpos"]),
        n("Div", [f"{p}.bitpos", f"{p}.eight"], [f"{p}.byte"]),
        n("Add", [f"{p}.byte", f"{p}.one"], [f"{p}.byte1"]),
        n("Mod", [f"{p}.bitpos", f"{p}.eight"], [f"{p}.offset"]),
        n("Cast", [f"{p}.offset"], [f"{p}.offset32"], to=TensorProto.UINT32),
        n("Cast", [f"{name}.packed"], [f"{p}.packed32"], to=TensorProto.UINT32),
        n("Gather", [f"{p}.packed32", f"{p}.byte"], [f"{p}.lo"]),
        n("Gather", [f"{p}.packed32", f"{p}.byte1"], [f"{p}.hi"]),
        n("BitShift", [f"{p}.hi", f"{p}.shift8"], [f"{p}.hi8"], direction="LEFT"),
        n("BitwiseOr", [f"{p}.hi8", f"{p}.lo"], [f"{p}.word"]),
        n("BitShift", [f"{p}.word", f"{p}.offset32"], [f"{p}.aligned"], direction="RIGHT"),
        n("BitwiseAnd", [f"{p}.aligned", f"{p}.mask"], [f"{p}.index32"]),
        n("Cast", [f"{p}.index32"], [f"{p}.index"], to=TensorProto.INT64),
        n("Div", [f"{p}.pos", f"{p}.cols"], [f"{p}.row"]),
        n("Mul", [f"{p}.row", f"{p}.k"], [f"{p}.rowbase"]),
        n("Add", [f"{p}.rowbase", f"{p}.index"], [f"{p}.flat"]),
        n("Gather", [f"{name}.codebook", f"{p}.flat"], [f"{p}.values"]),
    ]
    if transpose:
        nodes.append(n("Reshape", [f"{p}.values", f"{p}.shape"], [f"{p}.rows"]))
        nodes.append(n("Transpose", [f"{p}.rows"], [f"{p}.cast_in"], perm=[1, 0]))
    else:
        nodes.append(n("Reshape", [f"{p}.values", f"{p}.shape"], [f"{p}.cast_in"]))
    return nodes, consts


def _plan(array: np.ndarray) -> tuple[int, bool] | None:
    """(bits, transpose) if encoding ``array`` saves bytes, else None."""
    best: tuple[int, bool, int] | None = None
    for transpose in (False, True):
        rows = array.T if transpose else array
        distinct = distinct_per_row(rows)
        bits = max(1, int(np.ceil(np.log2(distinct))))
        if bits >= 8 * array.itemsize or bits > 8:
            continue
        codebook_item = 1 if array.dtype == np.int8 else 2
        size = rows.size * bits // 8 + rows.shape[0] * 2**bits * codebook_item
        if best is None or size < best[2]:
            best = (bits, transpose, size)
    if best is None or best[2] >= array.nbytes * 0.9:
        return None
    return best[0], best[1]


def encode_shared_weights(
    model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS
) -> list[Encoded]:
    """Replace, in place, each 2-D float32/int8 initializer with few distinct values per row by
    its packed encoding and decode subgraph. Returns what was encoded."""
    graph = model.graph
    encoded: list[Encoded] = []
    keep: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim != 2 or array.size < min_elements or array.dtype not in (np.float32, np.int8):
            keep.append(init)
            continue
        if array.dtype == np.float32 and not np.array_equal(
            array.astype(np.float16).astype(np.float32), array
        ):
            keep.append(init)  # not on the fp16 grid: not a shared weight
            continue
        plan = _plan(array)
        if plan is None:
            keep.append(init)
            continue
        bits, transpose = plan
        rows = array.T if transpose else array
        codebook, indices = codebook_rows(np.ascontiguousarray(rows), bits)
        if array.dtype == np.float32:
            codebook = codebook.astype(np.float16)
        packed = pack_bits(indices, bits)
        nodes, consts = _decode_nodes(init.name, array.shape, bits, transpose)
        last = nodes[-1].output[0]
        if array.dtype == np.float32:
            nodes.append(helper.make_node("Cast", [last], [init.name], to=TensorProto.FLOAT))
        else:
            nodes.append(helper.make_node("Identity", [last], [init.name]))
        keep += [
            _const(f"{init.name}.packed", packed),
            _const(f"{init.name}.codebook", codebook.reshape(-1)),
            *consts,
        ]
        new_nodes += nodes
        encoded.append(
            Encoded(
                init.name, tuple(array.shape), bits, array.nbytes, packed.nbytes + codebook.nbytes
            )
        )
    if encoded:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        ordered = new_nodes + list(
            graph.node
        )  # decodes first: the graph stays topologically sorted
        del graph.node[:]
        graph.node.extend(ordered)
    return encoded
