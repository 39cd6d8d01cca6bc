"""SmoothQuant: exact in float, kept through checkpoint and export, and it pays under int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgec.compressor import QuantizeStep, Recipe, SmoothStep, compress
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import compare, model_vectors
from edgec.compressor.quantization import apply_int8, quantizable, restore_float
from edgec.compressor.smoothing import BUFFER, smooth, smoothed, unsmooth
from edgec.models import load_model
from edgec.runtimes import read_package

from edgec.errors import RecipeError


def _data(spec, seeds) -> Dataset:  # type: ignore[no-untyped-def]
    return Dataset([spec.example_inputs(batch=4, sequence=16, seed=s) for s in seeds], None, "r")


def _with_outliers(model) -> None:  # type: ignore[no-untyped-def]
    """BERT-like outlier channels: a few LayerNorm outputs 40x larger than the rest."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight[:3] *= 40
                norm.bias[:3] *= 40
        model.embeddings.LayerNorm.weight[:3] *= 40


def test_smoothing_is_exact_in_float(wide_bert):
    model, spec = load_model(wide_bert)
    data = _data(spec, range(3))
    before = model_vectors(model, spec, data)
    _, details = smooth(model, spec, SmoothStep(alpha=0.5), data, before)
    assert details["alpha"] == 0.5 and len(details["smoothed"]) == 12
    assert np.abs(model_vectors(model, spec, data) - before).max() < 1e-5
    unsmooth(model, smoothed(model))
    assert smoothed(model) == []
    assert np.abs(model_vectors(model, spec, data) - before).max() < 1e-5


def test_auto_alpha_recovers_int8_fidelity_lost_to_outlier_channels(wide_bert):
    model, spec = load_model(wide_bert)
    _with_outliers(model)
    calibration, held_out = _data(spec, range(8)), _data(spec, range(100, 108))
    reference = model_vectors(model, spec, held_out)
    linears = quantizable(model)

    def int8_sqnr() -> float:
        saved = apply_int8(model, linears, list(linears))
        sqnr = compare(reference, model_vectors(model, spec, held_out), spec).sqnr_db
        restore_float(model, linears, saved)
        return sqnr

    plain = int8_sqnr()
    step = SmoothStep(alpha="auto")
    _, details = smooth(model, spec, step, calibration, model_vectors(model, spec, calibration))
    assert details["alpha"] is not None
    assert details["int8_trials"][0]["alpha"] is None  # "no smoothing" was tried
    smoothed_sqnr = int8_sqnr()
    assert smoothed_sqnr > plain + 3, (plain, smoothed_sqnr)  # int8 noise at least halved


def test_smoothed_checkpoint_exports_a_mul_before_each_integer_matmul(
    wide_bert, text_calibration, tmp_path
):
    import onnx
    from edgec.exporters import export
    from edgec.models.checkpoint import load_checkpoint

    recipe = Recipe(name="s", steps=(SmoothStep(alpha=0.6), QuantizeStep(fidelity_floor=1.0)))
    result = compress(wide_bert, recipe, tmp_path / "ckpt", calib=text_calibration)
    fallback = result.final.details["float_fallback"]
    assert len(fallback) == 12  # floor 1.0: every Linear in float, so every one unsmoothed
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert smoothed(model) == []

    recipe = Recipe(name="s", steps=(SmoothStep(alpha=0.6), QuantizeStep()))
    compress(wide_bert, recipe, tmp_path / "ckpt2", calib=text_calibration)
    model, _ = load_checkpoint(tmp_path / "ckpt2")
    assert len(smoothed(model)) == 12
    multiplier = getattr(model.encoder.layer[0].intermediate.dense, BUFFER)
    assert not torch.allclose(multiplier, torch.ones_like(multiplier))  # loaded, not the default
    export(tmp_path / "ckpt2", tmp_path / "pkg")  # parity with torch (1e-4) is checked inside
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantizers = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert len(quantizers) >= 6
    assert all(producers[n.input[0]].op_type == "Mul" for n in quantizers)
    assert (
        read_package(tmp_path / "pkg").manifest.report["graph"]["vs_checkpoint"]["cos_min"] > 0.99
    )


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "high", True])
def test_bad_alpha_is_named(alpha):
    with pytest.raises(RecipeError, match=r"smooth\.alpha"):
        SmoothStep(alpha=alpha)
