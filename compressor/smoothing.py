"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8.

For a Linear ``y = W x`` and a positive scale per input channel ``s``,
``y = (W diag(s)) (x / s)`` exactly in float. Dynamic int8 quantizes ``x`` per tensor, so a few
outlier channels (BERT's LayerNorm outputs have some) set the step for all the others; with
``s_j = max|x_j|**alpha / max|W[:, j]|**(1 - alpha)`` the outliers shrink and the weights, which
are quantized per output channel, take the difference.

``alpha="auto"`` chooses from a grid the alpha (or no smoothing) whose int8 simulation of the
whole model keeps the highest minimum cosine against the original on calibration data: a
per-Linear choice by local output error was tried first and did worse end to end (held-out
minimum cosine 0.9873 against 0.9918 for one alpha for all on minilm).

The division stays in the model as a buffer ``input_multiplier`` (``1 / s``) applied by a
forward pre-hook, so the exported graph has a ``Mul`` before the ``MatMul``. Checkpoints record
the smoothed Linears; ``attach`` restores the buffers and hooks before the weights are loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import Fidelity, compare, model_vectors, observe_inputs
from edgec.compressor.quantization import apply_int8, quantizable, restore_float
from edgec.compressor.recipe import SmoothStep
from edgec.models.adapters import adapter_for
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm

BUFFER = "input_multiplier"
HOOK_ATTR = "_edgec_smoothing_hook"
ALPHAS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def _multiply_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    return (args[0] * getattr(module, BUFFER),)


def attach(model: nn.Module, names: Iterable[str]) -> None:
    """Give the named Linears an ``input_multiplier`` buffer (ones) and the hook applying it."""
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        if not hasattr(linear, BUFFER):
            linear.register_buffer(BUFFER, torch.ones(linear.in_features))
            setattr(linear, HOOK_ATTR, linear.register_forward_pre_hook(_multiply_input))


def smoothed(model: nn.Module) -> list[str]:
    """Names of the Linears that carry an input multiplier."""
    return [n for n, m in model.named_modules() if hasattr(m, HOOK_ATTR)]


def unsmooth(model: nn.Module, names: Iterable[str]) -> None:
    """Fold the multiplier back into the weight and drop it (exact up to float rounding)."""
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        if not hasattr(linear, HOOK_ATTR):
            continue
        multiplier = getattr(linear, BUFFER)
        linear.weight.data.mul_(multiplier[None, :])
        getattr(linear, HOOK_ATTR).remove()
        delattr(linear, HOOK_ATTR)
        del linear._buffers[BUFFER]


def _input_groups(model: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """Linears reading the same input (query, key, value) share one scale, so the exported graph
    needs one Mul for them (identical initializers are merged on export)."""
    wanted = set(names)
    ids = {id(m): n for n, m in model.named_modules()}
    groups: list[list[str]] = []
    for p in adapter_for(model).layers(model):
        for members in ((p.query, p.key, p.value), (p.attn_out,), (p.ffn_in,), (p.ffn_out,)):
            group = [ids[id(m)] for m in members if ids[id(m)] in wanted]
            if group:
                groups.append(group)
    return groups


def _scales(input_peak: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_peak = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    return (input_peak.clamp_min(1e-5) ** alpha / weight_peak ** (1 - alpha)).clamp(1e-2, 1e2)


def _input_peaks(
    model: nn.Module, spec: ModelSpec, linears: dict[str, nn.Linear], data: Dataset
) -> dict[str, torch.Tensor]:
    peaks: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        peak = x.abs().amax(dim=0)
        peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

    observe_inputs(model, spec, data, dict(linears), record)
    return peaks


def _set_alpha(
    linears: dict[str, nn.Linear],
    groups: list[list[str]],
    weights: dict[str, torch.Tensor],
    peaks: dict[str, torch.Tensor],
    alpha: float | None,
) -> None:
    """Scale every Linear from its original weight for ``alpha`` (None: multiplier of ones)."""
    with torch.no_grad():
        for group in groups:
            if alpha is None:
                s = torch.ones_like(peaks[group[0]])
            else:
                s = _scales(peaks[group[0]], [weights[n] for n in group], alpha)
            for name in group:
                linears[name].weight.copy_(weights[name] * s[None, :])
                getattr(linears[name], BUFFER).copy_(1 / s)


def smooth(
    model: nn.Module,
    spec: ModelSpec,
    step: SmoothStep,
    data: Dataset,
    reference: np.ndarray,
) -> tuple[nn.Module, dict[str, object]]:
    """Smooth the block Linears in place; returns the model and what was chosen.

    With ``alpha="auto"`` every candidate (and no smoothing) is tried with all block Linears
    on the int8 grid (per-channel weights, dynamic activations) and the one keeping the highest
    minimum cosine against ``reference`` (the original's vectors on ``data``) is kept.
    """
    linears = {n: m for n, m in quantizable(model).items() if not hasattr(m, HOOK_ATTR)}
    peaks = _input_peaks(model, spec, linears, data)
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    groups = _input_groups(model, linears)
    attach(model, linears)
    trials: dict[float | None, Fidelity] = {}
    if step.alpha == "auto":
        for alpha in tqdm(
            [None, *ALPHAS], desc="smoothing: alpha search", unit="alpha", leave=False
        ):
            _set_alpha(linears, groups, weights, peaks, alpha)
            saved = apply_int8(model, linears, list(linears))
            trials[alpha] = compare(reference, model_vectors(model, spec, data), spec)
            restore_float(model, linears, saved)
        alpha = max(trials, key=lambda a: (trials[a].cos_min, trials[a].cos_mean))
    else:
        alpha = float(step.alpha)
    _set_alpha(linears, groups, weights, peaks, alpha)
    if alpha is None:
        unsmooth(model, linears)
    details: dict[str, object] = {"alpha": alpha, "smoothed": smoothed(model)}
    if trials:
        details["int8_trials"] = [
            {"alpha": a, "cos_min": round(f.cos_min, 5), "cos_mean": round(f.cos_mean, 5)}
            for a, f in trials.items()
        ]
    return model, details
