"""Transformer fusion with onnxruntime's own optimizer (Attention, SkipLayerNormalization, Gelu).

The fused graph uses ``com.microsoft`` operators, which the CPU and CUDA providers run. Fusion is
kept only when the fused graph matches the unfused one within ``FUSION_TOLERANCE`` (max abs
error) on example inputs; where attention fusion does not match (e.g. a head count the optimizer
misreads), it is retried without attention fusion, then dropped.

Embedding fusion (``EmbedLayerNormalization``) stays off: it reads whole embedding tables, so a
table stored compressed (int8 per row, or packed weight-sharing codes decoded per gathered row)
would have to be decoded in full at load. It fused on DistilBERT graphs, where the 3-bit tables
of ``balanced`` and ``smallest`` were then held decoded in float32 by the device.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from edgec.models.spec import ModelSpec

FUSION_TOLERANCE = 1e-4
MODEL_TYPES = {"bert": "bert", "distilbert": "bert", "vit": "vit"}


@dataclass(frozen=True)
class FusionResult:
    """The fused model (or None when fusion did not help or did not match) and what fused."""

    model: onnx.ModelProto | None
    fused: dict[str, int]
    max_abs_error: float | None
    note: str


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _optimize(path: Path, family: str, attention: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[family]
    options = FusionOptions(model_type)
    options.enable_attention = attention
    options.enable_embed_layer_norm = False  # tables stay read by Gather (module docstring)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        optimized = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            optimization_options=options,
            opt_level=0,
        )
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def fuse(path: Path, spec: ModelSpec) -> FusionResult:
    """Fuse the float model at ``path``; checked against it on two shapes."""
    if spec.family not in MODEL_TYPES:
        return FusionResult(None, {}, None, f"no fusion for family {spec.family!r}")
    original = onnx.load(str(path))
    shapes = [(1, 8), (3, 24)]
    feeds = [spec.example_inputs(batch=b, sequence=s, seed=b + s) for b, s in shapes]
    expected = [_outputs(original, f) for f in feeds]
    for attention in (True, False):
        fused = _optimize(path, spec.family, attention)
        counts: dict[str, int] = {}
        for node in fused.graph.node:
            if node.domain == "com.microsoft":
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if not counts:
            continue
        try:
            error = max(
                float(np.abs(a - e).max())
                for f, exp in zip(feeds, expected, strict=True)
                for a, e in zip(_outputs(fused, f), exp, strict=True)
            )
        except Exception:
            continue
        if error <= FUSION_TOLERANCE:
            note = "fused" if attention else "fused without attention (attention did not match)"
            return FusionResult(fused, counts, error, note)
    return FusionResult(None, {}, None, "fusion did not match the float graph; left unfused")
