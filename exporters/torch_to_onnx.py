"""torch -> ONNX with the spec's dynamic axes, and the parity check against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from edgec.models.spec import ModelSpec
from torch import nn

from edgec.errors import ExportError

DEFAULT_OPSET = 18
PARITY_TOLERANCE = 1e-4  # max abs error, onnxruntime against torch, fp32


class _Interface(nn.Module):
    """Positional tensors in spec order -> the spec's outputs as a tuple (what ONNX sees)."""

    def __init__(self, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(inputs)
        self.output_names = list(outputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.input_names, tensors, strict=True)))
        return tuple(result[name] for name in self.output_names)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress and warnings meant for its developers; keep them off ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def torch_outputs(
    model: nn.Module, spec: ModelSpec, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """The spec's outputs from the torch model, in order."""
    wrapper = _Interface(model, spec.input_names, spec.output_names).eval()
    with torch.inference_mode():
        result = wrapper(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return [t.float().numpy() for t in result]


def export_onnx(
    model: nn.Module, spec: ModelSpec, path: Path, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Export ``model`` to ``path`` with dynamic batch (and sequence) axes; checker-verified."""
    wrapper = _Interface(model, spec.input_names, spec.output_names).eval()
    example = spec.example_inputs(batch=2, sequence=16)
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = []
    for info in spec.inputs:
        axes = {
            axis: dims.setdefault(dim, torch.export.Dim(dim, min=1))
            for axis, dim in enumerate(info.shape)
            if isinstance(dim, str)
        }
        dynamic_shapes.append(axes)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=(tuple(dynamic_shapes),),  # one entry: forward(*tensors)
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        summary = str(root).strip().splitlines()[0] if str(root).strip() else ""
        raise ExportError(
            f"torch.onnx.export failed for {spec.name}: {type(root).__name__}: {summary}"
        ) from exc
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {spec.name}")
    proto = program.model_proto
    _name_dynamic_dims(proto, spec)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path))
    return proto


def _name_dynamic_dims(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Give the graph's interface the spec's symbolic dim names ("batch", "sequence")."""
    infos = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*proto.graph.input, *proto.graph.output):
        info = infos.get(value.name)
        if info is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, info.shape, strict=False):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


@dataclass(frozen=True)
class ParityCase:
    batch: int
    sequence: int
    max_abs_error: float

    def to_json(self) -> dict[str, float]:
        return {"batch": self.batch, "sequence": self.sequence, "max_abs_error": self.max_abs_error}


def parity_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(batch, sequence) pairs that exercise every dynamic axis; sequence ignored for images."""
    texty = any("sequence" in t.shape for t in spec.inputs)
    return [(1, 8), (4, 128)] if texty else [(1, 0), (4, 0)]


def check_parity(
    model: nn.Module,
    spec: ModelSpec,
    onnx_path: Path,
    shapes: Sequence[tuple[int, int]] | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> list[ParityCase]:
    """Run onnxruntime and torch on the same inputs; raise with the numbers above ``tolerance``."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cases = []
    for batch, sequence in shapes or parity_shapes(spec):
        feeds = spec.example_inputs(
            batch=batch, sequence=sequence or 1, seed=batch * 1000 + sequence
        )
        expected = torch_outputs(model, spec, feeds)
        actual = session.run(spec.output_names, feeds)
        error = max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected, strict=True))
        cases.append(ParityCase(batch, sequence, error))
    worst = max(cases, key=lambda c: c.max_abs_error)
    if worst.max_abs_error > tolerance:
        raise ExportError(
            f"parity check failed for {spec.name}: onnxruntime differs from torch by "
            f"{worst.max_abs_error:.3g} (max abs) at batch {worst.batch}, sequence {worst.sequence}; "
            f"tolerance {tolerance:g}"
        )
    return cases
