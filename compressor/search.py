"""``--recipe auto``: the best compression of a model for a fidelity floor and an objective,
found by measurement.

1. **Sensitivity, once** (``search_space.measure_sensitivity``, on calibration batches, never
   the held-out sets): each change alone, as a per-example error vector.
2. **The joint space** (``search_space.Candidate``): Linear widths (a sensitivity-guided knapsack per average
   width, ``bit_allocation.choose``), int8 compute per Linear (the most int8-sensitive ones stay
   float), the embeddings' encoding, heads and FFN neurons removed per layer.
3. **Cheap predictions** for every candidate: stored weight bytes from the encoding, resident
   bytes from what the runtime keeps per weight, latency from FLOPs at the device's fp32 and
   int8 speeds, fidelity from the summed sensitivities. Each measurement recalibrates them (an
   offset for bytes, a scale for fidelity, a line for latency).
4. **Measurement of the frontier only**: best first by predicted objective among the candidates
   predicted to meet the floor, each really compressed (``compress``), exported (``export``) and
   measured: held-out fidelity on both sets, package bytes, predicted memory (the memory model),
   latency (onnxruntime b1 x 128 here, and the cost model on a device profile). A measured
   failure rules out every candidate predicted to lose more. It stops when nothing left is
   predicted to beat the best measured one, or the budget (minutes, candidates) is spent.
5. **The choice**: the best measured candidate for the objective that meets the floor on both
   held-out sets (and fits the device's memory); none → ``FidelityError`` naming the closest.

The whole search (every measured and predicted candidate, the sensitivities, the reasons per
layer) is saved as ``search.json`` in the chosen checkpoint; ``edgec report`` draws it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from edgec.compressor.calibration import load_data
from edgec.compressor.fidelity import Fidelity
from edgec.compressor.pipeline import _floor_failures, compress
from edgec.compressor.recipe import Floor
from edgec.compressor.search_space import (
    AVERAGE_WIDTHS,
    EMBEDDINGS,
    PRUNE_LEVELS,
    SHARED_WIDTHS,
    TOKENS,
    Candidate,
    Prediction,
    Sensitivity,
    enumerate_space,
    measure_sensitivity,
    predict,
    why_layers,
)
from edgec.models import load_model
from edgec.runtimes.devices import DeviceProfile, DeviceSet, load_devices

from edgec.errors import EdgecError, FidelityError, RecipeError

Objective = Literal["size", "latency", "memory"]
OBJECTIVES: tuple[str, ...] = ("size", "latency", "memory")
FLOOR_KEYS: tuple[str, ...] = ("min_cosine", "mean_cosine", "accuracy_drop")
SEARCH_FILE = "search.json"

# A prediction within this factor of the best measured objective is still worth measuring: the
# predictions are calibrated estimates, not measurements.
PREDICTION_SLACK = 1.03
BISECT_RATIO = 1.5  # below this ratio of failing to passing predicted error, no halving
LATENCY_REPEATS = 20  # timed requests per measured candidate (after 3 warm-up ones)
# Before any measurement, predicted errors are doubled: a minimum over few calibration examples
# is optimistic (minilm int8: 0.993 over 8 calibration batches, 0.987 over 200 held-out
# sentences, i.e. 1.9x the error; pipeline.CALIBRATION_BATCHES_FOR_CHOICES).
PRIOR_FIDELITY_SCALE = 2.0
# Once every candidate predicted to meet the floor is measured, time left goes to those
# predicted to lose up to this factor of the floor's error: a prediction from a few calibration
# examples is an estimate, and a measured failure rules out every candidate predicted to lose
# more, so the band narrows as it is measured (minilm at min cosine 0.99: all 36 Linears in
# int8 with 4-bit embeddings, which the predictions alone skipped, measured 0.9896: settled).
EXPLORE_ERROR = 1.5


# --- calibration of the predictions against measurements ---------------------------------


@dataclass
class Calibration:
    """What the measurements so far say about the predictions.

    ``fidelity_scale``: measured held-out error (worst set, ``1 - min cos``) over the predicted
    maximum, as a geometric mean over the measured candidates (``PRIOR_FIDELITY_SCALE`` before
    any); ``*_offset``:
    measured bytes minus predicted (the graph, the assets, the arena); latency: ``ms = slope *
    model_ms + intercept``, least squares once two candidates are measured.
    """

    fidelity_scale: float = PRIOR_FIDELITY_SCALE
    size_offset: float = 0.0
    memory_offset: float = 0.0
    latency_slope: float = 1.0
    latency_intercept: float = 0.0

    def objective(self, objective: str, p: Prediction) -> float:
        if objective == "size":
            return p.weight_bytes + self.size_offset
        if objective == "memory":
            return p.resident_bytes + self.memory_offset
        return self.latency_slope * p.model_ms + self.latency_intercept

    def cos_min(self, p: Prediction) -> float:
        return 1.0 - self.fidelity_scale * p.error_max

    def cos_mean(self, p: Prediction) -> float:
        return 1.0 - self.fidelity_scale * p.error_mean


def recalibrate(measured: list[Measured], objective: str) -> Calibration:
    if not measured:
        return Calibration()
    ratios = [
        max(1e-6, 1.0 - m.worst_cos_min) / max(1e-6, m.prediction.error_max) for m in measured
    ]
    calibration = Calibration(
        fidelity_scale=float(np.exp(np.mean(np.log(ratios)))),
        size_offset=float(np.mean([m.package_bytes - m.prediction.weight_bytes for m in measured])),
        memory_offset=float(
            np.mean([m.memory_bytes - m.prediction.resident_bytes for m in measured])
        ),
    )
    xs = np.array([m.prediction.model_ms for m in measured])
    ys = np.array([m.latency_ms(objective) for m in measured])
    if len(measured) >= 2 and np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        if slope > 0:
            calibration.latency_slope, calibration.latency_intercept = (
                float(slope),
                float(intercept),
            )
            return calibration
    calibration.latency_intercept = float(np.mean(ys - xs))
    return calibration


# --- measurement ---------------------------------------------------------------------------


@dataclass
class Measured:
    """A candidate built and measured in full: its checkpoint, package and figures."""

    candidate: Candidate
    prediction: Prediction
    checkpoint: Path
    fidelity: Fidelity  # held-out set of the calibration domain
    fidelity_off_domain: Fidelity | None
    package_bytes: int  # every file of the package, its manifest included
    memory_bytes: int  # the memory model's resident bytes above the interpreter (b1 x 128)
    ms_here: float  # onnxruntime on this machine, b1 x TOKENS, median
    ms_device: float | None  # the cost model on the device profile, when one is given
    seconds: float  # building and measuring it
    failures: list[str] = field(default_factory=list)  # what misses the floor; empty: meets it

    @property
    def meets(self) -> bool:
        return not self.failures

    @property
    def worst_cos_min(self) -> float:
        off = self.fidelity_off_domain
        return min(self.fidelity.cos_min, off.cos_min if off else 1.0)

    def latency_ms(self, objective: str = "latency") -> float:
        return self.ms_device if self.ms_device is not None else self.ms_here

    def value(self, objective: str) -> float:
        if objective == "size":
            return float(self.package_bytes)
        if objective == "memory":
            return float(self.memory_bytes)
        return self.latency_ms()

    def shortfall(self, floor: Floor) -> float:
        """How far below the floor it is, summed over figures in each figure's own units."""
        total = 0.0
        for fid in filter(None, (self.fidelity, self.fidelity_off_domain)):
            if floor.min_cosine is not None:
                total += max(0.0, floor.min_cosine - fid.cos_min)
            if floor.mean_cosine is not None:
                total += max(0.0, floor.mean_cosine - fid.cos_mean)
            if floor.accuracy_drop is not None and fid.accuracy is not None:
                drop = (fid.reference_accuracy or 0.0) - fid.accuracy
                total += max(0.0, drop - floor.accuracy_drop) / 100
        return total

    def to_json(self) -> dict[str, Any]:
        off = self.fidelity_off_domain
        return {
            "label": self.candidate.label,
            "candidate": _candidate_json(self.candidate),
            "checkpoint": str(self.checkpoint),
            "fidelity": self.fidelity.to_json(),
            "fidelity_off_domain": None if off is None else off.to_json(),
            "package_bytes": self.package_bytes,
            "memory_bytes": self.memory_bytes,
            "ms_b1x128_here": round(self.ms_here, 3),
            "ms_b1x128_device": None if self.ms_device is None else round(self.ms_device, 3),
            "seconds": round(self.seconds, 1),
            "meets_floor": self.meets,
            "failures": self.failures,
            "predicted": {
                "weight_bytes": self.prediction.weight_bytes,
                "resident_bytes": self.prediction.resident_bytes,
                "model_ms": round(self.prediction.model_ms, 3),
                "error_max": round(self.prediction.error_max, 6),
                "error_mean": round(self.prediction.error_mean, 6),
            },
        }


def _candidate_json(c: Candidate) -> dict[str, Any]:
    data = asdict(c)
    data["widths"] = dict(c.widths)
    return data


def _device_ms(package: Path, device: DeviceProfile) -> float:
    """The cost model's milliseconds of the package's graph on ``device`` (b1 x 128)."""
    from edgec.exporters.partition import load_stage, planning_feeds
    from edgec.exporters.partition.cost import node_ms, stage_overhead_ms
    from edgec.exporters.partition.graph import analyse
    from edgec.runtimes.package import read_package

    pkg = read_package(package)
    total = 0.0
    for stage in pkg.manifest.stages:
        proto = load_stage(pkg, stage)
        feeds = planning_feeds(pkg.manifest.inputs)
        graph = analyse(proto, feeds, frozenset(c.name for c in stage.coded))
        total += sum(node_ms(n, device) for n in graph.nodes) + stage_overhead_ms(device)
    return total


def _here_ms(package: Path) -> float:
    """Median milliseconds of one b1 x ``TOKENS`` request, onnxruntime on this machine."""
    from edgec.exporters.partition import planning_feeds
    from edgec.runtimes.profiler import median_ms
    from edgec.runtimes.runtime import load_package

    runtime = load_package(package)
    feeds = planning_feeds(runtime.manifest.inputs, 1, TOKENS)
    return median_ms(lambda: runtime.run(feeds), LATENCY_REPEATS, warmup=3)


def build_and_measure(
    candidate: Candidate,
    prediction: Prediction,
    job: SearchJob,
    workdir: Path,
    say: Callable[[str], None],
) -> Measured:
    """Compress ``candidate`` for real, export it, and measure it in full."""
    from edgec.exporters.build import export

    started = time.perf_counter()
    ckpt = workdir / "ckpt"
    # no floor in the candidate's own recipe: the search checks it here, on both sets, and a
    # candidate that misses it is a measurement, not an error
    recipe = candidate.recipe(Floor(), job.linears, job.heads)
    result = compress(
        job.source,
        recipe,
        ckpt,
        calib=job.calib,
        eval=job.eval,
        off_domain=job.off_domain,
        predict_memory=False,
    )
    exported = export(ckpt, workdir / "pkg")
    memory = sum(s.memory_bytes or 0 for s in exported.manifest.stages)
    ms_here = _here_ms(workdir / "pkg")
    ms_device = None if job.device_given is False else _device_ms(workdir / "pkg", job.device)
    final = result.final
    failures = [f"held-out: {m}" for m in _floor_failures(job.floor, final.fidelity)]
    if final.fidelity_off_domain is not None:
        failures += [
            f"off-domain: {m}" for m in _floor_failures(job.floor, final.fidelity_off_domain)
        ]
    if job.device.memory_bytes is not None and memory > job.device.memory_bytes:
        failures.append(
            f"memory {memory / 1e6:.1f} MB > device {job.device.name!r} {job.device.memory_mb} MB"
        )
    measured = Measured(
        candidate=candidate,
        prediction=prediction,
        checkpoint=ckpt,
        fidelity=final.fidelity,
        fidelity_off_domain=final.fidelity_off_domain,
        package_bytes=sum(f.stat().st_size for f in (workdir / "pkg").rglob("*") if f.is_file()),
        memory_bytes=memory,
        ms_here=ms_here,
        ms_device=ms_device,
        seconds=time.perf_counter() - started,
        failures=failures,
    )
    off = measured.fidelity_off_domain
    say(
        f"measured [{candidate.label}]: {measured.package_bytes / 1e6:.2f} MB, "
        f"{measured.memory_bytes / 1e6:.1f} MB resident, {measured.latency_ms():.1f} ms, cos min "
        f"{measured.fidelity.cos_min:.4f}"
        + ("" if off is None else f" / off-domain {off.cos_min:.4f}")
        + (
            ""
            if measured.fidelity.accuracy is None
            else f", accuracy {measured.fidelity.accuracy:.2f}%"
        )
        + (" meets the floor" if measured.meets else f" misses: {'; '.join(failures)}")
        + f" ({measured.seconds:.0f} s)"
    )
    return measured


# --- the search -----------------------------------------------------------------------------


@dataclass
class SearchJob:
    """What the search was asked: the source, data, floor, objective, device and budget."""

    source: str | os.PathLike[str]
    floor: Floor
    objective: str
    device: DeviceProfile
    device_given: bool
    budget_minutes: float
    max_candidates: int | None
    calib: str | os.PathLike[str] | None
    eval: str | os.PathLike[str] | None
    off_domain: str | os.PathLike[str] | None
    linears: list[str] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SearchResult:
    """The chosen checkpoint, every measured candidate, and why the search stopped."""

    path: Path
    objective: str
    floor: Floor
    chosen: Measured
    measured: list[Measured]
    predicted: int  # candidates in the space, all predicted
    feasible: int  # predicted to meet the floor
    stopped: str
    seconds: float
    record: dict[str, Any]
    sensitivity: Sensitivity


def parse_floor(text: str) -> Floor:
    """``min_cosine=0.99,mean_cosine=0.995,accuracy_drop=1.0`` -> ``Floor`` (RecipeError when
    malformed, naming the part and the valid keys)."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in FLOOR_KEYS:
            raise RecipeError(
                f"floor part {part!r} is not KEY=NUMBER with KEY in {list(FLOOR_KEYS)}"
            )
        try:
            values[key] = float(raw)
        except ValueError:
            raise RecipeError(f"floor {key} must be a number, got {raw!r}") from None
    if not values:
        raise RecipeError(f"the floor is empty; give one or more of {list(FLOOR_KEYS)}")
    return Floor(**values)


def _device(devices: DeviceSet | str | os.PathLike[str] | None) -> tuple[DeviceProfile, bool]:
    if devices is None:
        return DeviceProfile(name="local"), False
    profiles = devices if isinstance(devices, DeviceSet) else load_devices(devices)
    return profiles.devices[0], True


def _predicted_ok(floor: Floor, cal: Calibration, p: Prediction) -> bool:
    if floor.min_cosine is not None and cal.cos_min(p) < floor.min_cosine:
        return False
    return floor.mean_cosine is None or cal.cos_mean(p) >= floor.mean_cosine


def search(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    floor: Floor | str,
    objective: str = "size",
    *,
    devices: DeviceSet | str | os.PathLike[str] | None = None,
    budget_minutes: float = 30.0,
    max_candidates: int | None = None,
    calib: str | os.PathLike[str] | None = None,
    eval: str | os.PathLike[str] | None = None,
    off_domain: str | os.PathLike[str] | None = None,
    on_step: Callable[[str], None] | None = None,
    sensitivity: Sensitivity | None = None,
) -> SearchResult:
    """Search the joint space for the best checkpoint for ``objective`` meeting ``floor``.

    ``budget_minutes``: no measurement starts that the mean one so far would take past it;
    ``max_candidates``: at most this many are built and measured. The chosen checkpoint is
    written to ``output`` (with ``search.json``) only when one meets the floor; otherwise
    ``FidelityError`` names the closest and ``output`` is left as it was.

    ``sensitivity``: a previous search's (``SearchResult.sensitivity``) of the same source and
    calibration data, reused instead of measured again (its minutes are then not in this
    budget; ``search.json`` says so).
    """
    say = on_step or (lambda _: None)
    started = time.perf_counter()
    floor = parse_floor(floor) if isinstance(floor, str) else floor
    if objective not in OBJECTIVES:
        raise RecipeError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if budget_minutes <= 0:
        raise RecipeError(f"the budget must be a positive number of minutes, got {budget_minutes}")
    if max_candidates is not None and max_candidates < 1:
        raise RecipeError(f"max_candidates must be at least 1, got {max_candidates}")
    device, device_given = _device(devices)
    job = SearchJob(
        source,
        floor,
        objective,
        device,
        device_given,
        budget_minutes,
        max_candidates,
        calib,
        eval,
        off_domain,
    )
    say(f"loading {source}")
    model, spec = load_model(source)
    data = load_data(spec, calib, eval, off_domain=off_domain)
    if floor.accuracy_drop is not None and data.evaluation.labels is None:
        raise RecipeError("an accuracy_drop floor needs labelled evaluation data; this has none")
    reused = sensitivity is not None
    sens = sensitivity or measure_sensitivity(
        copy.deepcopy(model).eval(), spec, data.calibration, say
    )
    job.linears = [n.removesuffix(".weight") for n in sens.shapes]
    job.heads = list(sens.num_heads)
    space = [(c, predict(c, sens, device)) for c in enumerate_space(sens)]
    say(f"{len(space)} candidates predicted from the sensitivities ({sens.seconds:.0f} s)")
    measured: list[Measured] = []
    budget_s = budget_minutes * 60
    stopped = (
        "every candidate predicted to beat the best measured one (and to lose at most "
        f"{EXPLORE_ERROR:g}x the floor's error) was measured"
    )
    exploring = False
    with tempfile.TemporaryDirectory(prefix="edgec-auto-") as tmp:
        while True:
            cal = recalibrate(measured, objective)
            best = _best(measured, objective)
            failed = [m.prediction.error_mean for m in measured if not m.meets]
            seen = {m.candidate for m in measured}
            open_ = _open(space, seen, failed, best, cal, job)
            if not open_ and measured:
                wide = replace(cal, fidelity_scale=cal.fidelity_scale / EXPLORE_ERROR)
                open_ = _open(space, seen, failed, best, wide, job)
                if open_ and not exploring:
                    exploring = True
                    say(
                        f"every candidate predicted to meet the floor is measured; exploring "
                        f"{len(open_)} predicted within {EXPLORE_ERROR:g}x its error"
                    )
            open_ = _bisect(open_, measured)
            if not open_ and not measured and space:
                # nothing is predicted to meet the floor: measure the closest, so the error
                # names real figures rather than predictions
                open_ = [min(space, key=lambda cp: cp[1].error_max)]
                say("no candidate is predicted to meet the floor; measuring the closest")
            if not open_:
                break
            if max_candidates is not None and len(measured) >= max_candidates:
                stopped = f"the candidate budget ({max_candidates}) was spent"
                break
            elapsed = time.perf_counter() - started
            per = np.mean([m.seconds for m in measured]) if measured else 0.0
            if elapsed + per > budget_s:
                stopped = f"the time budget ({budget_minutes:g} min) was spent"
                break
            # best predicted objective first; among near-ties, the least predicted error
            candidate, prediction = min(
                open_, key=lambda cp: (cal.objective(objective, cp[1]), cp[1].error_mean)
            )
            say(
                f"candidate {len(measured) + 1} ({len(open_)} open, {elapsed / 60:.1f} of "
                f"{budget_minutes:g} min): {candidate.label}"
            )
            workdir = Path(tmp) / f"c{len(measured)}"
            try:
                measured.append(build_and_measure(candidate, prediction, job, workdir, say))
            except EdgecError as exc:  # a candidate that cannot be built is reported, not fatal
                say(f"candidate failed to build: {exc}")
                space = [(c, p) for c, p in space if c != candidate]
        feasible = sum(_predicted_ok(floor, Calibration(), p) for _, p in space)
        record = _record(job, sens, space, measured, stopped, time.perf_counter() - started)
        record["sensitivity"]["reused"] = reused
        best = _best(measured, objective)
        if best is None:
            closest = min(measured, key=lambda m: m.shortfall(floor), default=None)
            if closest is None:
                raise FidelityError(
                    f"no candidate met the floor {_floor_text(floor)}: none was measured "
                    f"({len(space)} predicted; {stopped})"
                )
            raise FidelityError(
                f"no candidate met the floor {_floor_text(floor)} ({len(measured)} measured; "
                f"{stopped}); the closest, [{closest.candidate.label}]: "
                f"{'; '.join(closest.failures)}"
            )
        record["chosen"] = best.candidate.label
        _install(best.checkpoint, Path(output), record)
    chosen = replace(best, checkpoint=Path(output))
    say(f"chosen: {best.candidate.label} ({stopped})")
    return SearchResult(
        path=Path(output),
        objective=objective,
        floor=floor,
        chosen=chosen,
        measured=measured,
        predicted=len(space),
        feasible=feasible,
        stopped=stopped,
        seconds=time.perf_counter() - started,
        record=record,
        sensitivity=sens,
    )


def _open(
    space: list[tuple[Candidate, Prediction]],
    seen: set[Candidate],
    failed: list[float],
    best: Measured | None,
    cal: Calibration,
    job: SearchJob,
) -> list[tuple[Candidate, Prediction]]:
    """Candidates still worth measuring: not measured, predicted (through ``cal``) to meet the
    floor and fit the device, no more error than a measured failure, and predicted to beat the
    best measured one."""
    memory = job.device.memory_bytes
    open_ = [
        (c, p)
        for c, p in space
        if c not in seen
        and _predicted_ok(job.floor, cal, p)
        and not any(p.error_mean >= e for e in failed)
        and (memory is None or cal.objective("memory", p) <= memory)
    ]
    if best is not None:
        limit = best.value(job.objective) * PREDICTION_SLACK
        open_ = [(c, p) for c, p in open_ if cal.objective(job.objective, p) < limit]
    return open_


def _bisect(
    open_: list[tuple[Candidate, Prediction]], measured: list[Measured]
) -> list[tuple[Candidate, Prediction]]:
    """After a failure, look halfway (geometrically, in predicted mean error) between the
    least-error failure and the most-error success below it, not just under the failure: best
    objective first would otherwise creep down one Linear at a time (tiny-vit-digits at an
    accuracy floor, which the predictions cannot filter)."""
    failed = [m.prediction.error_mean for m in measured if not m.meets]
    if not failed or not open_:
        return open_
    high = min(failed)
    passed = [
        m.prediction.error_mean for m in measured if m.meets and m.prediction.error_mean < high
    ]
    low = max(passed) if passed else min(p.error_mean for _, p in open_)
    if low <= 0 or high / max(low, 1e-12) < BISECT_RATIO:
        return open_
    middle = (low * high) ** 0.5
    nearer = [(c, p) for c, p in open_ if p.error_mean <= middle]
    return nearer or open_


def _best(measured: list[Measured], objective: str) -> Measured | None:
    passing = [m for m in measured if m.meets]
    return min(passing, key=lambda m: (m.value(objective), -m.worst_cos_min), default=None)


def _floor_text(floor: Floor) -> str:
    return ",".join(f"{k}={v}" for k, v in asdict(floor).items() if v is not None)


def _install(source: Path, output: Path, record: dict[str, Any]) -> None:
    """Copy the chosen checkpoint to ``output`` through a sibling staging folder, then swap."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        (staging / SEARCH_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, old / "ckpt")
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _record(
    job: SearchJob,
    sens: Sensitivity,
    space: list[tuple[Candidate, Prediction]],
    measured: list[Measured],
    stopped: str,
    seconds: float,
) -> dict[str, Any]:
    """``search.json``: the question, the sensitivities, every candidate measured, the frontier
    of predictions, and why each layer of each measured candidate got what it got."""
    cal = recalibrate(measured, job.objective)
    predicted: list[dict[str, Any]] = sorted(
        (
            {
                "label": c.label,
                "objective": round(cal.objective(job.objective, p), 3),
                "cos_min": round(cal.cos_min(p), 5),
                "cos_mean": round(cal.cos_mean(p), 5),
            }
            for c, p in space
        ),
        key=lambda r: (r["objective"], -r["cos_min"]),
    )
    frontier: list[dict[str, Any]] = []
    best_cos = -np.inf
    for row in predicted:  # the predicted Pareto frontier: objective up, fidelity up
        if row["cos_min"] > best_cos:
            frontier.append(row)
            best_cos = row["cos_min"]
    return {
        "format_version": 1,
        "objective": job.objective,
        "floor": asdict(job.floor),
        "device": job.device.to_json() if job.device_given else None,
        "budget_minutes": job.budget_minutes,
        "max_candidates": job.max_candidates,
        "seconds": round(seconds, 1),
        "stopped": stopped,
        "space": {
            "candidates": len(space),
            "shared_widths": list(SHARED_WIDTHS),
            "average_widths": [a for a in AVERAGE_WIDTHS],
            "embeddings": list(EMBEDDINGS),
            "prune_levels": list(PRUNE_LEVELS),
        },
        "sensitivity": {
            "examples": sens.examples,
            "seconds": round(sens.seconds, 1),
            "shared": {
                n: {str(b): round(float(e.mean()), 6) for b, e in by.items()}
                for n, by in sens.shared.items()
            },
            "int8": {n: round(float(e.mean()), 6) for n, e in sens.int8.items()},
            "embeddings": {k: round(float(e.mean()), 6) for k, e in sens.embeddings.items()},
            "heads": [
                {str(k): round(float(e.mean()), 6) for k, e in d.items()} for d in sens.heads
            ],
            "ffn": [{str(k): round(float(e.mean()), 6) for k, e in d.items()} for d in sens.ffn],
        },
        "calibration": asdict(cal),
        "measured": [m.to_json() for m in measured],
        "predicted_frontier": frontier[:200],
        "layers": {m.candidate.label: why_layers(m.candidate, sens) for m in measured},
    }
