"""Partition an ONNX model over devices: analyse, plan, write stages, check losslessness.

``plan_model`` returns a ``Plan`` (data, nothing written); ``partition_into`` applies one inside
a package folder being built; ``partition_package`` re-partitions an existing package.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from edgec.exporters.package_writer import staging, write_manifest
from edgec.exporters.partition.context import Context
from edgec.exporters.partition.graph import GraphProfile, analyse
from edgec.exporters.partition.plan import Objective, Plan
from edgec.exporters.partition.strategies import STRATEGIES, get_strategy
from edgec.exporters.partition.write import StageWriter, edges
from edgec.runtimes.devices import DeviceSet
from edgec.runtimes.lowbit import CodedWeight, load_coded_weights
from edgec.runtimes.manifest import Manifest, StageInfo, TensorInfo
from edgec.runtimes.package import Package, read_package, resolve_inside
from onnx import numpy_helper

from edgec.errors import DeviceError, ExportError

PLANNING_BATCH = 1
PLANNING_SEQUENCE = 128
LOSSLESS_TOLERANCE = 1e-5  # max abs error, partitioned against whole graph, fp32
# Where dynamic int8 cannot be bit-exact: a split may differ from the whole graph by up to this
# many times what the whole graph already differs from itself with other rows batched beside.
INT8_SPLIT_NOISE = 2.0
INT8_LINK_COSINE = 0.999  # min cosine per output row with int8 activations across links


def planning_feeds(
    inputs: Sequence[TensorInfo], batch: int = PLANNING_BATCH, sequence: int = PLANNING_SEQUENCE
) -> dict[str, np.ndarray]:
    """Inputs at the size the plan is made for: ``batch`` for the first symbolic axis, else
    ``sequence``. Integer inputs are ones (a valid token id and mask); floats are random."""
    rng = np.random.default_rng(0)
    feeds = {}
    for info in inputs:
        shape = tuple(
            d if isinstance(d, int) else (batch if axis == 0 else sequence)
            for axis, d in enumerate(info.shape)
        )
        if np.dtype(info.dtype).kind in "iub":
            feeds[info.name] = np.ones(shape, dtype=info.dtype)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
    return feeds


def plan_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    inputs: Sequence[TensorInfo],
    devices: DeviceSet,
    strategy: str = "auto",
    objective: Objective | None = None,
    *,
    batch: int = PLANNING_BATCH,
    sequence: int = PLANNING_SEQUENCE,
    pinned: frozenset[str] = frozenset(),
    source: str = "",
    keep_input: bool = False,
    int8_links: str = "off",
) -> tuple[Plan, GraphProfile]:
    """Analyse ``model`` at (``batch``, ``sequence``) and plan it over ``devices``; ``pinned``
    names the weights the runtime decodes and supplies itself (a stage's coded weights),
    ``source`` the sha256 of the stage file planned (recorded in the plan).

    Requests enter at the devices' entry and results go to their exit; with ``keep_input`` no
    stage off the entry reads a raw input, and the plan's reason says what that costs against
    the best plan without the constraint. ``int8_links`` (off | auto | on) carries token states
    across links as int8 (``exporters.partition.links``), ``auto`` where a link is the
    bottleneck. ``objective`` defaults to throughput for
    ``pipeline`` (a pipeline exists to overlap requests) and to latency otherwise.
    """
    chosen = get_strategy(strategy)
    objective = objective or ("throughput" if strategy == "pipeline" else "latency")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    graph = analyse(proto, planning_feeds(inputs, batch, sequence), pinned)
    context = Context(graph, devices, objective, keep_input, int8_links)
    if keep_input and not context.fits(devices.device(context.entry), 0, 1):
        raise DeviceError(
            f"the entry device {context.entry!r} cannot hold even the first operator of the "
            "model, so the raw input cannot stay on it"
        )
    plan = chosen.plan(context)
    ends = {"entry": context.entry, "exit": context.exit, "keep_input": keep_input}
    if keep_input:
        try:
            free = chosen.plan(Context(graph, devices, objective, int8_links=int8_links))
            cost = plan.score - free.score
            plan = replace(
                plan,
                reason=f"{plan.reason}; keeping the raw input on {context.entry} costs "
                f"{cost:+.3f} ms ({plan.score:.3f} against {free.score:.3f} ms, "
                f"{free.strategy} over {free.devices} without the constraint)",
            )
        except DeviceError:
            pass
    return replace(plan, source=source, **ends), graph


def predict_memory(
    model: onnx.ModelProto, inputs: Sequence[TensorInfo], pinned: frozenset[str] = frozenset()
) -> int:
    """Predicted resident bytes of a process that loads ``model`` and runs one request at the
    planning size (batch 1 x 128 tokens), above the bare interpreter with onnxruntime."""
    from edgec.runtimes.devices import DeviceProfile

    graph = analyse(model, planning_feeds(inputs, PLANNING_BATCH, PLANNING_SEQUENCE), pinned)
    context = Context(graph, DeviceSet((DeviceProfile(name="local"),), ()))
    return context.process_bytes(0, context.size)


def load_stage_file(
    onnx_path: Path, weights: str | None, coded: Sequence[CodedWeight], root: Path
) -> onnx.ModelProto:
    """A stage's ONNX model as onnxruntime will run it: coded weights decoded into place from
    ``root / weights`` (what the device holds after load), packed embedding tables left packed."""
    proto = onnx.load(os.fspath(onnx_path), load_external_data=not coded)
    if coded and weights is not None:
        decoded = load_coded_weights(resolve_inside(root, weights), coded)
        for init in proto.graph.initializer:
            if init.name in decoded:
                init.CopyFrom(numpy_helper.from_array(decoded.pop(init.name), init.name))
    return proto


def load_stage(package: Package, stage: StageInfo) -> onnx.ModelProto:
    """``load_stage_file`` for a stage of a verified package."""
    return load_stage_file(package.path(stage.file), stage.weights, stage.coded, package.root)


def _lossless_feeds(inputs: Sequence[TensorInfo]) -> list[dict[str, np.ndarray]]:
    """Two input sets (batch 1 and 3) with varied token ids, for the lossless check."""
    shapes = [(1, 8), (3, 16)] if any(len(t.shape) == 2 for t in inputs) else [(1, 1), (3, 1)]
    cases = []
    for batch, sequence in shapes:
        feeds = planning_feeds(inputs, batch, sequence)
        if "input_ids" in feeds:  # vary the tokens so that no row is constant by accident
            ids = feeds["input_ids"]
            feeds["input_ids"] = (np.arange(ids.size).reshape(ids.shape) % 97 + 1).astype(ids.dtype)
        cases.append(feeds)
    return cases


def _whole_outputs(
    package: Package, stage: StageInfo, cases: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort
    from edgec.runtimes.backends import create_session

    weights = None if stage.weights is None else package.path(stage.weights)
    session = create_session(
        package.path(stage.file),
        ort.SessionOptions(),
        ["CPUExecutionProvider"],
        weights,
        stage.coded,
    )
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feeds), strict=True)) for feeds in cases]


@dataclass(frozen=True)
class Tolerance:
    """How close a split must come to the whole graph: ``max_abs`` (float graphs), or
    ``min_cosine`` per output row where int8 cannot be bit-exact; ``why`` says which and why."""

    max_abs: float | None
    min_cosine: float | None
    why: str

    def holds(self, max_abs: float, min_cosine: float) -> bool:
        if self.max_abs is not None:
            return max_abs <= self.max_abs
        return self.min_cosine is None or min_cosine >= self.min_cosine

    def describe(self) -> str:
        if self.max_abs is not None:
            return f"max abs <= {self.max_abs:g}"
        return f"min cosine >= {self.min_cosine}"


def _batching_noise(
    package: Package, stage: StageInfo, cases: list[dict[str, np.ndarray]]
) -> float:
    """Min cosine, over output rows, of the whole graph run on each row alone against the same
    rows run as one batch: how much a request's result already depends on its neighbours."""
    batched = [c for c in cases if any(v.ndim and len(v) > 1 for v in c.values())]
    if not batched:
        return 1.0
    cosine = 1.0
    for feeds in batched:
        together = _whole_outputs(package, stage, [feeds])[0]
        rows = len(next(iter(feeds.values())))
        alone = _whole_outputs(
            package, stage, [{k: v[r : r + 1] for k, v in feeds.items()} for r in range(rows)]
        )
        joined = {n: np.concatenate([a[n] for a in alone]) for n in together}
        cosine = min(cosine, _differences(joined, together)[1])
    return cosine


def tolerance_for(
    strategy: str, graph: GraphProfile, noise: float = 1.0, int8_links: bool = False
) -> Tolerance:
    """The tolerance a split by ``strategy`` is checked against.

    Float and static int8 graphs split to within float rounding (``LOSSLESS_TOLERANCE``).
    Dynamic int8 (``DynamicQuantizeLinear``) scales each activation tensor by the range of the
    whole tensor: a head slice quantizes only its heads' part of what the output projection
    reads, a data-parallel stage only its rows, so the rounding differs from the whole graph's.
    The whole graph itself already rounds a request differently with other rows batched beside
    it (``noise``: min cosine of rows run alone against run together); a split is held to
    ``INT8_SPLIT_NOISE`` times that distance, in cosine per output row. A split that carries
    activations across its links as int8 is held to ``INT8_LINK_COSINE``.
    """
    dynamic = any(n.op_type == "DynamicQuantizeLinear" for n in graph.model.graph.node)
    if int8_links:
        return Tolerance(
            None,
            INT8_LINK_COSINE,
            "activations cross the links as int8 with per-token scales (--int8-links)",
        )
    if dynamic and strategy in ("heads", "data"):
        floor = 1.0 - INT8_SPLIT_NOISE * (1.0 - noise)
        return Tolerance(
            None,
            round(min(floor, 0.9999), 6),
            "dynamic int8 quantizes each slice of heads (or rows of the batch) by its own "
            f"range; the whole graph varies to cosine {noise:.6f} with its batch, and a split "
            f"may vary {INT8_SPLIT_NOISE:g}x as much",
        )
    return Tolerance(LOSSLESS_TOLERANCE, None, "float rounding of the split only")


def _differences(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> tuple[float, float]:
    """(max abs difference, min cosine over output rows) of ``actual`` against ``expected``."""
    error, cosine = 0.0, 1.0
    for name, value in expected.items():
        got = actual[name].astype(np.float64)
        want = value.astype(np.float64)
        error = max(error, float(np.max(np.abs(got - want))) if want.size else 0.0)
        rows_got = got.reshape(len(got), -1) if got.ndim else got.reshape(1, -1)
        rows_want = want.reshape(len(want), -1) if want.ndim else want.reshape(1, -1)
        for a, b in zip(rows_got, rows_want, strict=True):
            norm = float(np.linalg.norm(a) * np.linalg.norm(b))
            cosine = min(cosine, float(a @ b) / norm if norm else float(np.array_equal(a, b)))
    return error, cosine


@dataclass(frozen=True)
class PartitionResult:
    """The written package's path, its manifest and plan, and the check against the whole
    graph: max abs difference, min cosine per output row, and the tolerance held to."""

    path: Path
    manifest: Manifest
    plan: Plan
    max_abs_error: float
    min_cosine: float = 1.0
    tolerance: Tolerance | None = None


def partition_into(
    root: Path,
    manifest: Manifest,
    plan: Plan,
    graph: GraphProfile,
    devices: DeviceSet,
    examples: list[dict[str, np.ndarray]] | None = None,
) -> Manifest:
    """Write ``plan``'s stages into the single-stage package folder ``root`` and return its
    new manifest. The whole model's files stay only where a stage uses them; ``examples``
    (inputs) calibrate what a writer calibrates (int8 links)."""
    strategy = get_strategy(plan.strategy)
    if strategy.write is None:
        raise DeviceError(f"a {plan.strategy!r} plan names no strategy that writes stages")
    source = manifest.stages[0]
    writer = StageWriter(root, source.file, source, graph, examples)
    stages = strategy.write(writer, plan)
    replaced = {source.file, *([source.weights] if source.weights else [])}
    files = {k: v for k, v in manifest.files.items() if k not in replaced}
    files.update(writer.written)
    for file in replaced - writer.written.keys():
        (root / file).unlink()
    used = {s.device for s in stages}
    report: dict[str, Any] = dict(manifest.report)
    report["plan"] = plan.to_json()
    return replace(
        manifest,
        strategy=plan.strategy,
        execution=strategy.execution,
        stages=tuple(stages),
        devices=tuple(d.to_device_info() for d in devices.devices if d.name in used),
        edges=tuple(edges(stages, graph)),
        aggregation=dict(plan.aggregation),
        files=files,
        report=report,
        network=devices.network(used).to_json(),
    )


def _saved_plan_fits(plan: Plan, stage: StageInfo, devices: DeviceSet) -> None:
    if plan.source and plan.source != stage.sha256:
        raise DeviceError(
            f"the saved plan was made for another model (sha256 {plan.source[:12]}…); this "
            f"package's model is {stage.sha256[:12]}…: plan it again with `edgec plan --save`"
        )
    known = {d.name for d in devices.devices}
    missing = sorted({s.device for s in plan.stages} - known)
    if missing:
        raise DeviceError(
            f"the saved plan places stages on {missing}, which the device profiles do not "
            f"list (they list {sorted(known)})"
        )


def partition_staged(
    root: Path,
    devices: DeviceSet,
    strategy: str = "auto",
    objective: Objective | None = None,
    *,
    batch: int = PLANNING_BATCH,
    sequence: int = PLANNING_SEQUENCE,
    plan: Plan | None = None,
    keep_input: bool = False,
    int8_links: str = "off",
    on_step: Callable[[str], None] | None = None,
) -> PartitionResult:
    """Partition the single-stage package being built in ``root`` (manifest written) in place,
    by a new plan for ``strategy``, or by the saved ``plan`` (which must have been made for
    this model and these devices).

    A package whose weights are row-packed codes is split as it runs (codes decoded) and each
    stage gets the codes of its own weights. Raises ``ExportError`` when the split's outputs
    differ from the whole graph's by more than the tolerance (``tolerance_for``).
    """
    from edgec.runtimes import Runtime

    step = on_step or (lambda _: None)
    package = read_package(root)
    manifest = package.manifest
    if len(manifest.stages) != 1:
        raise ExportError(
            f"package has {len(manifest.stages)} stages already; partition the single-stage "
            "package it came from"
        )
    stage = manifest.stages[0]
    model = load_stage(package, stage)
    pinned = frozenset(c.name for c in stage.coded)
    if plan is None:
        step(f"planning: {strategy} over {[d.name for d in devices.devices]}")
        plan, graph = plan_model(
            model,
            manifest.inputs,
            devices,
            strategy,
            objective,
            batch=batch,
            sequence=sequence,
            pinned=pinned,
            source=stage.sha256,
            keep_input=keep_input,
            int8_links=int8_links,
        )
    else:
        _saved_plan_fits(plan, stage, devices)
        shape = next(iter(plan.planning_shape.values()), [PLANNING_BATCH])
        planned = (shape[0], shape[1] if len(shape) > 1 else sequence)
        graph = analyse(model, planning_feeds(manifest.inputs, *planned), pinned)
    cases = _lossless_feeds(manifest.inputs)
    expected = _whole_outputs(package, stage, cases)
    noise = 1.0
    if plan.strategy in ("heads", "data"):
        noise = _batching_noise(package, stage, cases)
    tolerance = tolerance_for(plan.strategy, graph, noise, bool(plan.int8_links))
    step(f"writing {len(plan.stages)} stage(s)")
    new = partition_into(root, manifest, plan, graph, devices, cases)
    write_manifest(root, new)
    step(f"checking the partitioned package against the whole graph ({tolerance.describe()})")
    error, cosine = 0.0, 1.0
    with Runtime(read_package(root)) as split:
        for feeds, reference in zip(cases, expected, strict=True):
            case_error, case_cosine = _differences(split.run(feeds), reference)
            error, cosine = max(error, case_error), min(cosine, case_cosine)
    if not tolerance.holds(error, cosine):
        raise ExportError(
            f"partitioned package differs from the whole graph: max abs {error:.3g}, min "
            f"cosine {cosine:.6f}; tolerance {tolerance.describe()} ({tolerance.why})"
        )
    parity = {
        "partition_max_abs_error": error,
        "partition_min_cosine": cosine,
        "partition_tolerance": tolerance.describe(),
    }
    new = replace(new, parity={**new.parity, **parity})
    write_manifest(root, new)
    return PartitionResult(root, new, plan, error, cosine, tolerance)


def partition_package(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    devices: DeviceSet,
    strategy: str = "auto",
    objective: Objective | None = None,
    *,
    batch: int = PLANNING_BATCH,
    sequence: int = PLANNING_SEQUENCE,
    plan: Plan | None = None,
    keep_input: bool = False,
    int8_links: str = "off",
) -> PartitionResult:
    """Partition a single-stage package (e.g. an exported or compressed one) into ``output``,
    by a new plan or by a saved ``plan``.

    Checks the partitioned package against the source (``tolerance_for``) before it is swapped
    in; on failure ``output`` is left as it was.
    """
    package = read_package(source)
    with staging(Path(output)) as root:
        for relative in package.manifest.files:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.path(relative), target)
        write_manifest(root, package.manifest)
        result = partition_staged(
            root,
            devices,
            strategy,
            objective,
            batch=batch,
            sequence=sequence,
            plan=plan,
            keep_input=keep_input,
            int8_links=int8_links,
        )
    return replace(result, path=Path(output))


__all__ = [
    "STRATEGIES",
    "Context",
    "PartitionResult",
    "Plan",
    "Tolerance",
    "analyse",
    "get_strategy",
    "load_stage",
    "partition_into",
    "partition_package",
    "partition_staged",
    "plan_model",
    "planning_feeds",
    "tolerance_for",
]
