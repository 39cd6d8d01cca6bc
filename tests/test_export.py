"""Export: parity with torch across batch and sequence sizes, and atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgec.exporters import export
from edgec.exporters.torch_to_onnx import torch_outputs
from edgec.models import load_model
from edgec.runtimes import load_package, read_package

from edgec.errors import ExportError

SHAPES = [(1, 8), (1, 128), (4, 8), (4, 128)]


def _max_error(source: str | Path, package: Path, shapes: list[tuple[int, int]]) -> float:
    model, spec = load_model(source)
    runtime = load_package(package)
    worst = 0.0
    for batch, sequence in shapes:
        feeds = spec.example_inputs(batch=batch, sequence=sequence, seed=batch + sequence)
        expected = torch_outputs(model, spec, feeds)
        actual = runtime.run(feeds)
        for name, ref in zip(spec.output_names, expected, strict=True):
            assert actual[name].shape == ref.shape
            worst = max(worst, float(np.abs(actual[name] - ref).max()))
    return worst


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "vit"])
def test_random_models_match_torch_at_every_shape(family, tiny_models, tmp_path):
    package = tmp_path / family
    result = export(tiny_models[family], package)
    assert result.max_abs_error <= 1e-4
    shapes = [(1, 0), (4, 0)] if family == "vit" else SHAPES
    assert _max_error(tiny_models[family], package, shapes) <= 1e-4


@pytest.mark.slow
def test_minilm_matches_torch_at_every_shape(minilm_package):
    assert _max_error("minilm", minilm_package, SHAPES) <= 1e-4


@pytest.mark.slow
def test_tiny_vit_digits_matches_torch(digits_package):
    assert _max_error("tiny-vit-digits", digits_package, [(1, 0), (4, 0)]) <= 1e-4


def test_graph_axes_are_symbolic(bert_package):
    session = ort.InferenceSession(str(bert_package / "model.onnx"))
    for value in session.get_inputs():
        assert value.shape == ["batch", "sequence"]
    assert read_package(bert_package).manifest.parity["max_abs_error"] <= 1e-4


def test_failed_export_keeps_the_existing_package(tiny_models, bert_package, tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    export(tiny_models["bert"], target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    def broken_parity(*args, **kwargs):
        raise ExportError("parity check failed: injected")

    monkeypatch.setattr("edgec.exporters.build.check_parity", broken_parity)
    with pytest.raises(ExportError, match="injected"):
        export(tiny_models["bert"], target)
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no staging folder left


def test_failed_export_leaves_nothing_behind(tiny_models, tmp_path, monkeypatch):
    def broken_parity(*args, **kwargs):
        raise ExportError("parity check failed: injected")

    monkeypatch.setattr("edgec.exporters.build.check_parity", broken_parity)
    with pytest.raises(ExportError):
        export(tiny_models["bert"], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_reports_the_numbers(tiny_models, tmp_path, monkeypatch):
    from edgec.exporters import torch_to_onnx

    real = torch_to_onnx.torch_outputs

    def shifted(*args, **kwargs):
        return [out + 0.5 for out in real(*args, **kwargs)]

    monkeypatch.setattr(torch_to_onnx, "torch_outputs", shifted)
    with pytest.raises(ExportError, match=r"differs from torch by 0\.5.*tolerance 0\.0001"):
        export(tiny_models["bert"], tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()
