"""Bits per shared Linear by sensitivity, under the byte budget of a uniform bit width.

Each Linear is shared alone at each candidate width, and the model's output error on calibration
data is measured: the mean of ``1 - cos`` between the reduced outputs before and after, which is
half the squared distance of the normalised outputs, so the errors of independent layers add up.
A multiple-choice knapsack (dynamic programming over the byte budget) then picks one width per
Linear minimising the summed error, within the bytes the uniform width would have taken.

Only Linears take part: every calibration token exercises every weight of a Linear, whereas an
embedding table's rows are exercised only by the tokens and positions the calibration sample
holds, so a sample under-states the embeddings' error (on minilm, 2-bit word embeddings cost
0.018 of the mean cosine on calibration data but 0.11 of the held-out minimum). Embeddings keep
the recipe's ``embedding_bits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import compare, model_vectors
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm

SENSITIVITY_BATCHES = 8  # calibration batches over which each candidate's error is measured
MAX_UNITS = 1 << 21  # the knapsack's budget is counted in at most this many units


@dataclass(frozen=True)
class Allocation:
    """Bits per weight name, the bytes they take and the uniform budget, the predicted error."""

    bits: dict[str, int]
    bytes: int
    budget: int
    predicted_error: float
    uniform_error: float
    one_more_bit_error: float | None  # every Linear at bits + 1: what a bit more would buy

    def to_json(self) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "budget_bytes": self.budget,
            "predicted_error": round(self.predicted_error, 6),
            "uniform_predicted_error": round(self.uniform_error, 6),
            "one_more_bit_predicted_error": (
                None if self.one_more_bit_error is None else round(self.one_more_bit_error, 6)
            ),
        }


def shared_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Stored bytes of a shared weight: packed indices plus an fp16 codebook per row."""
    rows = shape[0]
    return int(np.prod(shape)) * bits // 8 + rows * 2**bits * 2


def candidate_bits(bits: int) -> list[int]:
    """The widths tried around a uniform ``bits``: two below to two above, within 2..8."""
    return list(range(max(2, bits - 2), min(8, bits + 2) + 1))


def choose(
    errors: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int
) -> dict[str, int]:
    """One width per name minimising the summed error with the summed size within ``budget``.

    Dynamic programming over the budget in units of the sizes' greatest common divisor, so the
    optimum is exact (transformer shapes share large divisors). Were there more than
    ``MAX_UNITS`` of them, sizes round up to coarser units: still within the budget, no longer
    exactly optimal. Raises ``ValueError`` if even the smallest widths do not fit.
    """
    names = list(errors)
    unit = math.gcd(*(size for by_bits in sizes.values() for size in by_bits.values()))
    unit = max(unit, -(-budget // MAX_UNITS))
    units = budget // unit
    best = np.zeros(units + 1)  # least error using at most u units, over the names so far
    picks = []
    for name in names:
        options = sorted(errors[name])
        new = np.full(units + 1, np.inf)
        pick = np.full(units + 1, -1)
        for bits in options:
            cost = -(-sizes[name][bits] // unit)
            if cost > units:
                continue
            total = np.full(units + 1, np.inf)
            total[cost:] = best[: units + 1 - cost] + errors[name][bits]
            better = total < new
            new[better], pick[better] = total[better], bits
        best = new
        picks.append(pick)
    if not np.isfinite(best[units]):
        raise ValueError(f"the smallest widths do not fit in {budget} bytes")
    chosen: dict[str, int] = {}
    u = units
    for name, pick in zip(reversed(names), reversed(picks), strict=True):
        bits = int(pick[u])
        chosen[name] = bits
        u -= -(-sizes[name][bits] // unit)
    return {name: chosen[name] for name in names}


def allocate(
    model: nn.Module,
    spec: ModelSpec,
    data: Dataset,
    linears: dict[str, nn.Linear],
    bits: int,
    quantizer: Callable[[str, torch.Tensor, int], torch.Tensor],
) -> Allocation:
    """Widths for ``linears`` (weight name -> module) within the bytes of ``bits`` each.

    ``quantizer(name, weight, bits)`` returns the shared weight, as the share step makes it.
    """
    head = Dataset(data.batches[:SENSITIVITY_BATCHES], None, data.origin)
    reference = model_vectors(model, spec, head)
    options = candidate_bits(bits)
    errors: dict[str, dict[int, float]] = {}
    sizes: dict[str, dict[int, int]] = {}
    bar = tqdm(total=len(linears) * len(options), desc="bit sensitivity", leave=False)
    for name, module in linears.items():
        original = module.weight.data.clone()
        errors[name], sizes[name] = {}, {}
        for width in options:
            with torch.no_grad():
                module.weight.data.copy_(quantizer(name, original, width))
            fid = compare(reference, model_vectors(model, spec, head), spec)
            errors[name][width] = max(0.0, 1.0 - fid.cos_mean)
            sizes[name][width] = shared_bytes(tuple(original.shape), width)
            bar.update()
        with torch.no_grad():
            module.weight.data.copy_(original)
    bar.close()
    budget = sum(sizes[name][bits] for name in linears)
    chosen = choose(errors, sizes, budget)
    return Allocation(
        bits=chosen,
        bytes=sum(sizes[n][b] for n, b in chosen.items()),
        budget=budget,
        predicted_error=sum(errors[n][b] for n, b in chosen.items()),
        uniform_error=sum(errors[n][bits] for n in linears),
        one_more_bit_error=(
            sum(errors[n][bits + 1] for n in linears) if bits + 1 in options else None
        ),
    )
