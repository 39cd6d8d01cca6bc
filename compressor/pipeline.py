"""``compress``: a model source and a recipe in, a checkpoint and its report out.

The pipeline is a loop over the recipe's steps; each handler takes the model and its step and
returns the model and what it did. After every step, fidelity against the original is measured
on the evaluation data (never the data the step calibrated on), and on the off-domain held-out
set when there is one; the recipe's floor must hold on both.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgec.compressor.calibration import CalibrationData, Dataset, load_data
from edgec.compressor.distillation import distill
from edgec.compressor.fidelity import Fidelity, compare, model_vectors
from edgec.compressor.pruning import layer_shapes, prune
from edgec.compressor.quantization import quantize, remove_simulation
from edgec.compressor.recipe import (
    DistillStep,
    Floor,
    PruneStep,
    QuantizeStep,
    Recipe,
    ShareStep,
    SmoothStep,
    Step,
    load_recipe,
)
from edgec.compressor.sharing import share_weights
from edgec.compressor.smoothing import smooth, smoothed, unsmooth
from edgec.models import load_model
from edgec.models.checkpoint import save_checkpoint
from edgec.models.spec import ModelSpec
from torch import nn

from edgec.errors import EdgecError, FidelityError, RecipeError

# Batches on which smoothing and int8 fallbacks are chosen: a minimum cosine over few sentences
# is optimistic (8 batches met 0.993 where the 200 held-out sentences gave 0.987).
CALIBRATION_BATCHES_FOR_CHOICES = 32


@dataclass
class Context:
    """What the steps share: the spec, the data, the original model and the storage plan."""

    spec: ModelSpec
    data: CalibrationData
    teacher: nn.Module
    reference_calibration: np.ndarray
    reference_evaluation: np.ndarray
    reference_off_domain: np.ndarray | None  # None: no off-domain set
    seed: int
    bits: dict[str, int] = field(default_factory=dict)  # shared weight -> bits per index
    int8: set[str] = field(default_factory=set)  # Linear module names on the int8 grid
    int8_tables: set[str] = field(default_factory=set)  # embedding modules on a per-row int8 grid
    int8_per_channel: bool = True


@dataclass(frozen=True)
class StepReport:
    """One row of the report: a step, the model's size after it, what it did, its fidelity.

    ``fidelity``: on the held-out set of the calibration domain; ``fidelity_off_domain``: on the
    held-out set from another domain, None when there is none.
    """

    step: str
    parameters: int
    bytes: int  # estimated stored size of the weights after this step
    seconds: float
    heads_kept: list[int]
    details: dict[str, Any]
    fidelity: Fidelity
    fidelity_off_domain: Fidelity | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 2),
            "heads_kept": self.heads_kept,
            "details": self.details,
            "fidelity": self.fidelity.to_json(),
            "fidelity_off_domain": (
                None if self.fidelity_off_domain is None else self.fidelity_off_domain.to_json()
            ),
        }


@dataclass(frozen=True)
class CompressResult:
    """The checkpoint path, the recipe, a report per step (the first is the original)."""

    path: Path
    recipe: Recipe
    steps: list[StepReport]
    notes: tuple[str, ...]
    # resident bytes a device's process is predicted to hold above the bare interpreter,
    # loading the exported package and running one request of 1 x 128 (a trial export)
    memory_bytes: int | None = None

    @property
    def final(self) -> StepReport:
        return self.steps[-1]

    def report(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "notes": list(self.notes),
            "predicted_memory_bytes": self.memory_bytes,
            "evaluation": (
                "fidelity against the original on held-out data; fidelity_off_domain on "
                "held-out data from another domain (null when there is none)"
            ),
            "steps": [s.to_json() for s in self.steps],
        }


def _prune(model: nn.Module, step: PruneStep, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    return prune(model, ctx.spec, step, ctx.data.calibration)


def _distill(model: nn.Module, step: DistillStep, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    return distill(
        model,
        ctx.teacher,
        ctx.spec,
        step,
        ctx.data.calibration,
        ctx.seed,
        shared=ctx.bits,
        int8=sorted(ctx.int8),
        per_channel=ctx.int8_per_channel,
    )


def _smooth(model: nn.Module, step: SmoothStep, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    return smooth(model, ctx.spec, step, _head(ctx.data.calibration), ctx.reference_calibration)


def _share(model: nn.Module, step: ShareStep, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    model, details = share_weights(model, ctx.spec, step, ctx.data.calibration)
    ctx.bits.update(details["bits"])
    return model, details


def _quantize(
    model: nn.Module, step: QuantizeStep, ctx: Context
) -> tuple[nn.Module, dict[str, Any]]:
    choice = _head(ctx.data.calibration)
    model, details = quantize(model, ctx.spec, step, choice, ctx.reference_calibration)
    ctx.int8.update(details["quantized"])
    ctx.int8_tables.update(details["int8_tables"])
    ctx.int8_per_channel = step.per_channel
    # float Linears need no Mul before them (unless shared: their codebooks hold the scaled rows)
    unsmooth(model, [n for n in details["float_fallback"] if f"{n}.weight" not in ctx.bits])
    return model, details


HANDLERS: dict[type, Callable[[nn.Module, Any, Context], tuple[nn.Module, dict[str, Any]]]] = {
    PruneStep: _prune,
    DistillStep: _distill,
    SmoothStep: _smooth,
    ShareStep: _share,
    QuantizeStep: _quantize,
}


def _head(data: Dataset) -> Dataset:
    return Dataset(data.batches[:CALIBRATION_BATCHES_FOR_CHOICES], None, data.origin)


def stored_bytes(model: nn.Module, bits: dict[str, int], int8: set[str]) -> int:
    """Estimated bytes of the weights as the exporter stores them.

    Shared: ``bits`` per index plus a codebook per row (int8 when on the int8 grid, else fp16);
    int8: one byte per weight plus a float scale per row; anything else: 4 bytes per value.
    """
    total = 0
    for name, tensor in model.state_dict().items():
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        module = name.rsplit(".", 1)[0]
        rows = tensor.shape[0] if tensor.ndim == 2 else 1
        if name in bits:
            codebook = 1 if module in int8 else 2
            total += tensor.numel() * bits[name] // 8 + rows * (2 ** bits[name]) * codebook
        elif module in int8 and name.endswith(".weight"):
            total += tensor.numel() + 4 * rows
        else:
            total += tensor.numel() * 4
    return total


def _report(
    name: str, model: nn.Module, ctx: Context, started: float, details: dict[str, Any]
) -> StepReport:
    vectors = model_vectors(model, ctx.spec, ctx.data.evaluation)
    fidelity = compare(ctx.reference_evaluation, vectors, ctx.spec, ctx.data.evaluation.labels)
    off_domain, other = None, ctx.data.off_domain
    if other is not None and ctx.reference_off_domain is not None:
        vectors = model_vectors(model, ctx.spec, other)
        off_domain = compare(ctx.reference_off_domain, vectors, ctx.spec, other.labels)
    return StepReport(
        step=name,
        parameters=sum(p.numel() for p in model.parameters()),
        bytes=stored_bytes(model, ctx.bits, ctx.int8 | ctx.int8_tables),
        seconds=time.perf_counter() - started,
        heads_kept=layer_shapes(model)[0],
        details=details,
        fidelity=fidelity,
        fidelity_off_domain=off_domain,
    )


def _check_floor(recipe: Recipe, final: StepReport, data: CalibrationData, path: Path) -> None:
    """Raise ``FidelityError`` naming each held-out set, and each figure, below the floor."""
    failures = [
        f"held-out set ({data.evaluation.origin}): {m}"
        for m in _floor_failures(recipe.floor, final.fidelity)
    ]
    if final.fidelity_off_domain is not None and data.off_domain is not None:
        failures += [
            f"off-domain set ({data.off_domain.origin}): {m}"
            for m in _floor_failures(recipe.floor, final.fidelity_off_domain)
        ]
    if failures:
        raise FidelityError(
            f"recipe {recipe.name!r} missed its fidelity floor: {'; '.join(failures)} "
            f"(checkpoint written to {path} for inspection)"
        )


def _floor_failures(floor: Floor, fid: Fidelity) -> list[str]:
    """Each figure of ``fid`` below ``floor``, with both numbers."""
    failures = []
    if floor.min_cosine is not None and fid.cos_min < floor.min_cosine:
        failures.append(f"min cosine {fid.cos_min:.4f} < floor {floor.min_cosine}")
    if floor.mean_cosine is not None and fid.cos_mean < floor.mean_cosine:
        failures.append(f"mean cosine {fid.cos_mean:.4f} < floor {floor.mean_cosine}")
    if (
        floor.accuracy_drop is not None
        and fid.accuracy is not None
        and fid.reference_accuracy is not None
        and fid.reference_accuracy - fid.accuracy > floor.accuracy_drop
    ):
        failures.append(
            f"accuracy {fid.accuracy:.2f}% is {fid.reference_accuracy - fid.accuracy:.2f} points "
            f"below the original's {fid.reference_accuracy:.2f}% (floor {floor.accuracy_drop})"
        )
    return failures


def compress(
    source: str | os.PathLike[str],
    recipe: str | os.PathLike[str] | Recipe,
    output: str | os.PathLike[str],
    calib: str | os.PathLike[str] | None = None,
    eval: str | os.PathLike[str] | None = None,
    on_step: Callable[[str], None] | None = None,
    off_domain: str | os.PathLike[str] | None = None,
    predict_memory: bool = True,
    **auto: Any,
) -> CompressResult:
    """Compress ``source`` with ``recipe`` into a checkpoint at ``output``.

    ``recipe="auto"``: search for it instead (``edgec.compressor.search.search``, which takes
    ``floor``, ``objective``, ``devices``, ``budget_minutes``, ``max_candidates`` from ``auto``)
    and return its ``SearchResult``.

    ``predict_memory``: export the checkpoint once to a temporary package to predict the
    memory a device pays for it (``CompressResult.memory_bytes``, in the report).

    ``calib``, ``eval``, ``off_domain``: data files as ``load_data`` takes them; without
    ``off_domain``, a built-in model's bundled sample brings its own off-domain set (minilm:
    Wikipedia sentences). Raises ``FidelityError`` (after writing the checkpoint) when the
    recipe's floor is not met on the held-out set or on the off-domain set.
    """
    if isinstance(recipe, str) and recipe == "auto":
        from edgec.compressor.search import search

        return search(
            source, output, calib=calib, eval=eval, off_domain=off_domain, on_step=on_step, **auto
        )
    if auto:
        raise RecipeError(f"{sorted(auto)} only apply to recipe='auto'")
    say = on_step or (lambda _: None)
    plan = load_recipe(recipe)
    torch.manual_seed(plan.seed)
    say(f"loading {source}")
    model, spec = load_model(source)
    teacher = copy.deepcopy(model).eval()
    data = load_data(spec, calib, eval, off_domain=off_domain)
    for note in data.notes:
        say(note)
    reference = model_vectors(teacher, spec, _head(data.calibration))
    ctx = Context(
        spec,
        data,
        teacher,
        reference_calibration=reference,
        reference_evaluation=model_vectors(teacher, spec, data.evaluation),
        reference_off_domain=(
            None if data.off_domain is None else model_vectors(teacher, spec, data.off_domain)
        ),
        seed=plan.seed,
    )
    reports = [_report("original", model, ctx, time.perf_counter(), {})]
    for step in plan.steps:
        say(f"{step.kind}: {_describe(step)}")
        started = time.perf_counter()
        model, details = HANDLERS[type(step)](model, step, ctx)
        reports.append(_report(step.kind, model, ctx, started, details))
        fid, off = reports[-1].fidelity, reports[-1].fidelity_off_domain
        line = f"{step.kind}: cosine min {fid.cos_min:.4f} mean {fid.cos_mean:.4f}"
        if off is not None:
            line += f"; off-domain min {off.cos_min:.4f} mean {off.cos_mean:.4f}"
        say(line)
    remove_simulation(model)
    result = CompressResult(Path(output), plan, reports, data.notes)
    record = {
        "recipe": plan.to_json(),
        "steps": [{"step": r.step, **r.details} for r in reports[1:]],
        "report": result.report(),
        "storage": {
            "shared_bits": ctx.bits,
            "int8": sorted(ctx.int8),
            "int8_tables": sorted(ctx.int8_tables),
            "smoothed": smoothed(model),
        },
    }
    say(f"writing the checkpoint to {output}")
    save_checkpoint(Path(output), model, spec, record)
    if any(isinstance(s, QuantizeStep) and s.mode == "static" for s in plan.steps):
        _save_calibration(Path(output), _head(data.calibration))
    if predict_memory:
        from edgec.exporters.build import predicted_memory

        say("predicting the memory a device pays (a trial export)")
        try:
            memory = predicted_memory(Path(output))
        except EdgecError as exc:  # the checkpoint stands; `edgec export` will say what failed
            say(f"memory not predicted: {exc}")
        else:
            result = dataclasses.replace(result, memory_bytes=memory)
            record["report"] = result.report()
            save_checkpoint(Path(output), model, spec, record)
    _check_floor(plan, result.final, data, Path(output))
    return result


def _save_calibration(path: Path, data: Dataset) -> None:
    """Batches for static int8 activation ranges, read back by the exporter (keys b{i}.{input})."""
    from edgec.exporters.compressed import CALIBRATION_FILE

    arrays = {f"b{i}.{name}": v for i, b in enumerate(data.batches) for name, v in b.items()}
    np.savez(path / CALIBRATION_FILE, **arrays)


def _describe(step: Step) -> str:
    fields = {k: v for k, v in vars(step).items() if not k.startswith("_")}
    return ", ".join(f"{k}={v}" for k, v in fields.items())
