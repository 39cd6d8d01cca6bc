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
