"""Bits per Linear by sensitivity: the knapsack is exact, and the allocation follows the error."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from edgec.compressor.bit_allocation import choose


def test_the_knapsack_finds_the_least_error_within_the_budget():
    rng = np.random.default_rng(0)
    for trial in range(20):
        names = [f"w{i}" for i in range(4)]
        widths = [2, 3, 4]
        sizes = {n: {b: int(rng.integers(1, 40)) * 64 * b for b in widths} for n in names}
        errors = {n: {b: float(rng.random()) / b**2 for b in widths} for n in names}
        budget = sum(sizes[n][3] for n in names) + int(rng.integers(-200, 200))
        best = min(
            (sum(errors[n][b] for n, b in zip(names, combo, strict=True)), combo)
            for combo in itertools.product(widths, repeat=len(names))
            if sum(sizes[n][b] for n, b in zip(names, combo, strict=True)) <= budget
        )
        chosen = choose(errors, sizes, budget)
        assert sum(sizes[n][b] for n, b in chosen.items()) <= budget, trial
        assert sum(errors[n][b] for n, b in chosen.items()) == pytest.approx(best[0]), trial


def test_the_knapsack_refuses_a_budget_nothing_fits_in():
    with pytest.raises(ValueError, match="do not fit in 100 bytes"):
        choose({"w": {2: 1.0, 3: 0.5}}, {"w": {2: 200, 3: 300}}, 100)


def test_an_insensitive_linear_gets_the_fewest_bits_and_pays_for_the_others(
    wide_bert, text_calibration, tmp_path
):
    import transformers as tf
    from edgec.compressor import Recipe, ShareStep, compress
    from edgec.compressor.bit_allocation import shared_bytes
    from edgec.models import load_model

    model = tf.BertModel.from_pretrained(wide_bert)
    damped = "encoder.layer.1.output.dense.weight"  # its output barely reaches the residual
    with torch.no_grad():
        model.get_parameter(damped).mul_(1e-3)
    model.save_pretrained(tmp_path / "damped")
    step = ShareStep(bits=4, layers=("linears",), allocate=True)
    result = compress(
        tmp_path / "damped", Recipe(name="t", steps=(step,)), tmp_path / "c", calib=text_calibration
    )
    details = result.steps[1].details
    bits, allocation = details["bits"], details["allocation"]
    assert bits[damped] == 2
    assert max(bits.values()) > 4  # the bytes it freed went to other Linears
    shared = dict(load_model(tmp_path / "c")[0].named_parameters())
    spent = 0
    for name, width in bits.items():
        weight = shared[name].detach()
        assert max(len(row.unique()) for row in weight) <= 2**width, name
        spent += shared_bytes(tuple(weight.shape), width)
    assert spent == allocation["bytes"] <= allocation["budget_bytes"]
    assert allocation["budget_bytes"] == sum(shared_bytes(tuple(shared[n].shape), 4) for n in bits)
    assert allocation["predicted_error"] <= allocation["uniform_predicted_error"]
    assert allocation["one_more_bit_predicted_error"] < allocation["uniform_predicted_error"]
