"""Structured pruning equals masking in the original; sliced models export and reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.pruning import (
    importance,
    layer_shapes,
    prune,
    slice_layer,
    unstructured_sparsity,
)
from edgec.compressor.recipe import PruneStep
from edgec.exporters.torch_to_onnx import check_parity, export_onnx, torch_outputs
from edgec.models import load_model
from edgec.models.adapters import adapter_for

TOLERANCE = 1e-5  # pruning a head vs masking it in the original, max abs error


def _outputs(model, spec, feeds):
    return torch_outputs(model, spec, feeds)[0]


def _mask_head(model, layer, head):
    parts = adapter_for(model).layers(model)[layer]
    d = parts.head_dim
    with torch.no_grad():
        parts.attn_out.weight[:, head * d : (head + 1) * d] = 0


def _mask_neurons(model, layer, neurons):
    parts = adapter_for(model).layers(model)[layer]
    with torch.no_grad():
        parts.ffn_out.weight[:, neurons] = 0


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit"])
def test_pruning_heads_and_neurons_equals_masking(family, tiny_models):
    model, spec = load_model(tiny_models[family])
    feeds = spec.example_inputs(batch=3, sequence=12, seed=1)
    masked = copy.deepcopy(model)
    _mask_head(masked, 0, 1)
    _mask_head(masked, 0, 3)
    _mask_head(masked, 1, 0)
    _mask_neurons(masked, 1, [0, 5, 7])
    layers = adapter_for(model).layers(model)
    slice_layer(model, layers[0], [0, 2], None)
    keep = [n for n in range(64) if n not in (0, 5, 7)]
    slice_layer(model, layers[1], [1, 2, 3], keep)
    assert layer_shapes(model) == ([2, 3], [64, 61])
    error = np.abs(_outputs(model, spec, feeds) - _outputs(masked, spec, feeds)).max()
    assert error <= TOLERANCE


def _dataset(spec, batches=2):
    return Dataset(
        [spec.example_inputs(batch=4, sequence=10, seed=s) for s in range(batches)], None, "random"
    )


@pytest.mark.parametrize("method", ["taylor", "magnitude"])
def test_importance_scores_every_head_and_neuron(method, tiny_models):
    model, spec = load_model(tiny_models["bert"])
    scores = importance(model, spec, _dataset(spec), method)
    assert [s.shape for s in scores.heads] == [(4,), (4,)]
    assert [s.shape for s in scores.neurons] == [(64,), (64,)]
    assert all(np.all(s >= 0) and s.sum() > 0 for s in scores.heads + scores.neurons)


def test_prune_keeps_the_most_important_and_layers_may_differ(tiny_models, monkeypatch):
    model, spec = load_model(tiny_models["bert"])
    from edgec.compressor import pruning

    fixed = pruning.Importance(
        heads=[np.array([4.0, 3.0, 2.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0])],
        neurons=[np.arange(64.0), np.arange(64.0)[::-1].copy()],
    )
    monkeypatch.setattr(pruning, "importance", lambda *a, **k: fixed)
    _, details = prune(model, spec, PruneStep(heads=0.375, ffn=0.25), _dataset(spec))
    # Per-layer-normalised global ranking: layer 0's two weakest (0.18, 0.37) go before any of
    # layer 1's equal heads (0.5 each); then the first of those.
    assert details["heads_kept"] == [2, 3]
    assert details["heads_removed"] == [[2, 3], [0]]
    assert details["ffn_kept"] == [48, 48]


def test_heads_kept_per_layer_list(tiny_models):
    model, spec = load_model(tiny_models["roberta"])
    prune(model, spec, PruneStep(heads=(1, 3), importance="magnitude"), _dataset(spec))
    assert layer_shapes(model)[0] == [1, 3]


def test_unstructured_sparsity_reaches_the_fraction(tiny_models):
    model, _ = load_model(tiny_models["bert"])
    reached = unstructured_sparsity(model, 0.5)
    assert 0.5 <= reached < 0.52


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit"])
def test_pruned_models_with_uneven_heads_export_at_parity(family, tiny_models, tmp_path):
    model, spec = load_model(tiny_models[family])
    layers = adapter_for(model).layers(model)
    slice_layer(model, layers[0], [3], list(range(10)))
    slice_layer(model, layers[1], [0, 1, 2], None)
    export_onnx(model, spec, tmp_path / "m.onnx")
    assert max(c.max_abs_error for c in check_parity(model, spec, tmp_path / "m.onnx")) <= 1e-4
