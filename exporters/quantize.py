"""int8 in the ONNX graph with onnxruntime's own quantization tools.

The torch side already put each chosen weight on the per-channel symmetric int8 grid, so
``quantize_dynamic(per_channel=True)`` reproduces those integers exactly. Layers the torch side
left in float are found by value (the ONNX weight equals the torch weight transposed) and
excluded. Dynamic mode gives ``DynamicQuantizeLinear`` + ``MatMulInteger`` (fused by onnxruntime
into integer kernels); static mode writes QDQ with calibrated activation ranges.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

QUANTIZED_OPS = ["MatMul", "Attention", "Gemm"]


def _digest(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def nodes_using(model: onnx.ModelProto, weights: Iterable[np.ndarray]) -> list[str]:
    """Names of the nodes whose constant input is one of ``weights`` (torch (out, in) layout),
    or holds one as a column block (a fused Attention's packed q/k/v weight)."""
    wanted = {_digest(w.T) for w in weights}
    if not wanted:
        return []
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        for name in node.input:
            if name not in inits or len(inits[name].dims) != 2:
                continue
            array = numpy_helper.to_array(inits[name])
            blocks = np.split(array, 3, axis=1) if node.op_type == "Attention" else [array]
            if any(_digest(b) in wanted for b in blocks):
                found.append(node.name)
                break
    return found


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    model: onnx.ModelProto,
    *,
    mode: str,
    per_channel: bool,
    exclude: list[str],
    calibration: list[dict[str, np.ndarray]] | None = None,
    method: str = "minmax",
) -> onnx.ModelProto:
    """The model with int8 weights (symmetric) and uint8 activations; ``exclude`` stays float."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        common: dict[str, Any] = {
            "per_channel": per_channel,
            "weight_type": QuantType.QInt8,
            "nodes_to_exclude": exclude,
            "op_types_to_quantize": QUANTIZED_OPS,
        }
        if mode == "dynamic":
            quantize_dynamic(src, dst, **common)
        else:
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }
            quantize_static(
                src,
                dst,
                _Reader(calibration or []),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                calibrate_method=methods[method],
                **common,
            )
        return onnx.load(str(dst))


def quantize_tables(model: onnx.ModelProto, tables: Iterable[np.ndarray]) -> list[str]:
    """Store, in place, each embedding table equal to one of ``tables`` (on the per-row int8
    grid, as the torch side left it) as int8 rows plus a float scale per row, dequantized after
    the Gather: the device holds one byte a value, and each run converts only its tokens' rows.
    Returns the tables' initializer names."""
    from onnx import TensorProto, helper

    wanted = {_digest(t) for t in tables}
    graph = model.graph
    done: list[str] = []
    for init in list(graph.initializer):
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        table = numpy_helper.to_array(init)
        if _digest(table) not in wanted:
            continue
        readers = [n for n in graph.node if init.name in n.input]
        if not readers or any(n.op_type != "Gather" or n.input[0] != init.name for n in readers):
            continue  # only tables read row by row
        # the torch side's formula (quantize_weight), so the integers and scales are its own
        scale = np.maximum(np.abs(table).max(axis=1), np.float32(1e-12)) / np.float32(127)
        codes = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
        name = init.name
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{name}.int8"),
                numpy_helper.from_array(scale, f"{name}.scale"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last_axis"),
            ]
        )
        for tag, node in enumerate(readers):
            p, ids = f"{name}.dequantize{tag}", node.input[1]
            position = list(graph.node).index(node)
            graph.node.remove(node)
            nodes = [
                helper.make_node("Gather", [f"{name}.int8", ids], [f"{p}.rows"], axis=0),
                helper.make_node("Gather", [f"{name}.scale", ids], [f"{p}.scale"], axis=0),
                helper.make_node("Unsqueeze", [f"{p}.scale", f"{name}.last_axis"], [f"{p}.s"]),
                helper.make_node("Cast", [f"{p}.rows"], [f"{p}.float"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}.float", f"{p}.s"], [node.output[0]]),
            ]
            for offset, new in enumerate(nodes):
                graph.node.insert(position + offset, new)
        done.append(name)
    return done
