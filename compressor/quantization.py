"""int8 on the torch side: choose what is quantized, put weights on the int8 grid, simulate.

Weights get per-output-channel symmetric int8 (scale = max|row| / 127), the grid onnxruntime's
``quantize_dynamic(per_channel=True)`` uses, so the exporter's quantization reproduces these
exact integers and shared weights keep their small codebooks. Activations are simulated as
onnxruntime's ``DynamicQuantizeLinear`` does (per tensor, uint8, range including 0), with a
straight-through gradient so a later distillation sees the quantization.

With a ``fidelity_floor``, Linears fall back to float, most sensitive first (sensitivity measured
on calibration batches), until the floor on the minimum cosine is met on those batches.
"""

from __future__ import annotations

import numpy as np
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import compare, model_vectors, run_hooked
from edgec.compressor.recipe import QuantizeStep
from edgec.models.adapters import adapter_for, embedding_tables
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm

from edgec.errors import RecipeError

SIM_ATTR = "_edgec_activation_quant"


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 fake quantization: round(w / s) * s, s = max|row| / 127 (or max|w|)."""
    peak = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    scale = peak.clamp_min(1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear's round trip: uint8, per tensor, range always including 0."""
    lo = x.detach().min().clamp(max=0)
    hi = x.detach().max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = (-lo / scale).round().clamp(0, 255)
    q = ((x / scale).round() + zero).clamp(0, 255)
    return x + ((q - zero) * scale - x).detach()  # straight-through gradient


def _simulate(linear: nn.Linear) -> torch.utils.hooks.RemovableHandle:
    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (dynamic_uint8(args[0]),)

    return linear.register_forward_pre_hook(hook)


def remove_simulation(model: nn.Module) -> None:
    for handle in getattr(model, SIM_ATTR, []):
        handle.remove()
    if hasattr(model, SIM_ATTR):
        delattr(model, SIM_ATTR)


def quantize_tables(model: nn.Module) -> list[str]:
    """Put each embedding table on the per-row symmetric int8 grid, in place; their names."""
    tables = embedding_tables(model)
    for table in tables.values():
        table.weight.data.copy_(quantize_weight(table.weight.data, per_channel=True))
    return list(tables)


def quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears of the transformer blocks, by module name (what the exporter quantizes)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, nn.Linear] = {}
    for p in adapter_for(model).layers(model):
        for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
            found[names[id(lin)]] = lin
    return found


def apply_int8(
    model: nn.Module, linears: dict[str, nn.Linear], chosen: list[str], per_channel: bool = True
) -> dict[str, torch.Tensor]:
    """Quantize ``chosen`` in place with simulation hooks; return the float weights replaced."""
    saved = {}
    handles = list(getattr(model, SIM_ATTR, []))
    for name in chosen:
        lin = linears[name]
        saved[name] = lin.weight.data.clone()
        lin.weight.data.copy_(quantize_weight(lin.weight.data, per_channel))
        handles.append(_simulate(lin))
    setattr(model, SIM_ATTR, handles)
    return saved


def restore_float(
    model: nn.Module, linears: dict[str, nn.Linear], saved: dict[str, torch.Tensor]
) -> None:
    remove_simulation(model)
    for name, weight in saved.items():
        linears[name].weight.data.copy_(weight)


def local_sensitivity(
    model: nn.Module,
    spec: ModelSpec,
    linears: dict[str, nn.Linear],
    data: Dataset,
    per_channel: bool = True,
) -> dict[str, float]:
    """Per Linear, in one pass: the relative error (noise / signal energy) that int8 weights and
    dynamic uint8 activations add to that Linear's own output on the calibration batches."""
    noise = dict.fromkeys(linears, 0.0)
    signal = dict.fromkeys(linears, 0.0)

    def hook(name: str):
        def measure(module: nn.Linear, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            w = quantize_weight(module.weight, per_channel)
            approx = nn.functional.linear(dynamic_uint8(args[0]), w, module.bias)
            noise[name] += float((approx - out).pow(2).sum())
            signal[name] += float(out.pow(2).sum())

        return measure

    run_hooked(
        model, spec, data, [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    )
    return {n: noise[n] / max(signal[n], 1e-30) for n in linears}


def quantize(
    model: nn.Module,
    spec: ModelSpec,
    step: QuantizeStep,
    data: Dataset,
    reference: np.ndarray | None = None,
) -> tuple[nn.Module, dict[str, object]]:
    """Put the block Linears on the int8 grid (except fallbacks) and simulate activations.

    ``reference``: the original model's vectors on ``data`` (needed with a fidelity floor).
    With a floor, Linears are ranked by their local int8 error and the fewest most sensitive
    ones are left in float (bisection on the count) so the minimum cosine on ``data`` meets it.
    """
    linears = quantizable(model)
    unknown = sorted(set(step.exclude) - set(linears))
    if unknown:
        raise RecipeError(
            f"quantize.exclude names no block Linear: {unknown}; Linears: {sorted(linears)}"
        )
    names = [n for n in linears if n not in step.exclude]
    excluded: list[str] = []
    sensitivity: dict[str, float] = {}

    def worst_with(count: int) -> float:
        chosen = [n for n in order[count:]]
        saved = apply_int8(model, linears, chosen, step.per_channel)
        cos_min = compare(reference, model_vectors(model, spec, data), spec).cos_min
        restore_float(model, linears, saved)
        return cos_min

    if step.fidelity_floor is not None and reference is not None:
        sensitivity = local_sensitivity(model, spec, linears, data, step.per_channel)
        order = sorted(names, key=lambda n: -sensitivity[n])
        if worst_with(0) < step.fidelity_floor:
            low, high = 0, len(order)  # invariant: fails at low, meets at high (all float)
            with tqdm(desc="int8 fallback search", unit="eval", leave=False) as bar:
                while high - low > 1:
                    mid = (low + high) // 2
                    if worst_with(mid) >= step.fidelity_floor:
                        high = mid
                    else:
                        low = mid
                    bar.update()
            excluded = order[:high]
    excluded = [n for n in linears if n in step.exclude] + excluded
    chosen = [n for n in names if n not in excluded]
    apply_int8(model, linears, chosen, step.per_channel)
    tables = quantize_tables(model) if step.embeddings else []
    details: dict[str, object] = {
        "mode": step.mode,
        "per_channel": step.per_channel,
        "weights": "int8 symmetric per output channel"
        if step.per_channel
        else "int8 symmetric per tensor",
        "activations": "uint8 dynamic per tensor"
        if step.mode == "dynamic"
        else f"uint8 static ({step.calibration})",
        "quantized": chosen,
        "float_fallback": excluded,
        "int8_tables": tables,
    }
    if sensitivity:
        details["sensitivity"] = {n: round(v, 6) for n, v in sensitivity.items()}
    if step.mode == "static":
        details["calibration"] = step.calibration
    return model, details
