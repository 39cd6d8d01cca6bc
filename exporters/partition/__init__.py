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
from edgec.exporters.partition.apply import write_stages
from edgec.exporters.partition.graph import GraphProfile, analyse
from edgec.exporters.partition.plan import Objective, Plan
from edgec.exporters.partition.planners import STRATEGIES, Context, make_plan
from edgec.runtimes.devices import DeviceSet
from edgec.runtimes.lowbit import CodedWeight, load_coded_weights
from edgec.runtimes.manifest import Manifest, StageInfo, TensorInfo
from edgec.runtimes.package import Package, read_package, resolve_inside
from onnx import numpy_helper

from edgec.errors import ExportError

PLANNING_BATCH = 1
PLANNING_SEQUENCE = 128
LOSSLESS_TOLERANCE = 1e-5  # max abs error, partitioned against whole graph, fp32


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
) -> tuple[Plan, GraphProfile]:
    """Analyse ``model`` at (``batch``, ``sequence``) and plan it over ``devices``; ``pinned``
    names the weights the runtime decodes and supplies itself (a stage's coded weights).

    ``objective`` defaults to throughput for ``pipeline`` (a pipeline exists to overlap
    requests) and to latency otherwise.
    """
    objective = objective or ("throughput" if strategy == "pipeline" else "latency")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    if strategy not in STRATEGIES:
        raise ExportError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")
    graph = analyse(proto, planning_feeds(inputs, batch, sequence), pinned)
    return make_plan(Context(graph, devices, objective), strategy), graph


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


def _whole_outputs(path: Path, cases: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feeds), strict=True)) for feeds in cases]


@dataclass(frozen=True)
class PartitionResult:
    """The written package's path, its manifest and plan, and the lossless check (max abs)."""

    path: Path
    manifest: Manifest
    plan: Plan
    max_abs_error: float


def partition_into(
    root: Path,
    manifest: Manifest,
    whole_file: str,
    plan: Plan,
    graph: GraphProfile,
    devices: DeviceSet,
) -> Manifest:
    """Write ``plan``'s stages into the package folder ``root`` and return its new manifest.

    The whole model's file stays only where a stage uses it.
    """
    stages, edges = write_stages(graph.model, graph, plan, root, whole_file)
    files = {k: v for k, v in manifest.files.items() if k != whole_file}
    files.update({s.file: s.sha256 for s in stages})
    if all(s.file != whole_file for s in stages):
        (root / whole_file).unlink()
    used = {s.device for s in stages}
    report: dict[str, Any] = dict(manifest.report)
    report["plan"] = plan.to_json()
    return replace(
        manifest,
        strategy=plan.strategy,
        stages=tuple(stages),
        devices=tuple(d.to_device_info() for d in devices.devices if d.name in used),
        edges=tuple(edges),
        aggregation=dict(plan.aggregation),
        files=files,
        report=report,
    )


def partition_staged(
    root: Path,
    devices: DeviceSet,
    strategy: str = "auto",
    objective: Objective | None = None,
    *,
    batch: int = PLANNING_BATCH,
    sequence: int = PLANNING_SEQUENCE,
    tolerance: float = LOSSLESS_TOLERANCE,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Manifest, Plan, float]:
    """Partition the single-stage package being built in ``root`` (manifest written) in place.

    Raises ``ExportError`` when the partitioned package's outputs differ from the whole graph's
    by more than ``tolerance`` (max abs). Returns the new manifest, the plan and the error.
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
    whole = manifest.stages[0].file
    if manifest.stages[0].coded:
        raise ExportError(
            "this package keeps low-bit Linears as codes decoded at load "
            f"({len(manifest.stages[0].coded)} weights); partitioning such packages is not "
            "supported yet: `edgec plan` shows its plan, and an int8 package partitions"
        )
    step(f"planning: {strategy} over {[d.name for d in devices.devices]}")
    plan, graph = plan_model(
        package.path(whole),
        manifest.inputs,
        devices,
        strategy,
        objective,
        batch=batch,
        sequence=sequence,
    )
    cases = _lossless_feeds(manifest.inputs)
    expected = _whole_outputs(package.path(whole), cases)
    step(f"writing {len(plan.stages)} stage(s)")
    new = partition_into(root, manifest, whole, plan, graph, devices)
    write_manifest(root, new)
    step("checking the partitioned package against the whole graph")
    error = 0.0
    with Runtime(read_package(root)) as split:
        for feeds, reference in zip(cases, expected, strict=True):
            actual = split.run(feeds)
            for name, value in reference.items():
                error = max(error, float(np.max(np.abs(actual[name] - value))))
    if error > tolerance:
        raise ExportError(
            f"partitioned package differs from the whole graph by {error:.3g} (max abs); "
            f"tolerance {tolerance:g}"
        )
    new = replace(new, parity={**new.parity, "partition_max_abs_error": error})
    write_manifest(root, new)
    return new, plan, error


def partition_package(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    devices: DeviceSet,
    strategy: str = "auto",
    objective: Objective | None = None,
    *,
    batch: int = PLANNING_BATCH,
    sequence: int = PLANNING_SEQUENCE,
    tolerance: float = LOSSLESS_TOLERANCE,
) -> PartitionResult:
    """Partition a single-stage package (e.g. an exported or compressed one) into ``output``.

    Checks that the partitioned package equals the source within ``tolerance`` (max abs) before
    it is swapped in; on failure ``output`` is left as it was.
    """
    package = read_package(source)
    with staging(Path(output)) as root:
        for relative in package.manifest.files:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.path(relative), target)
        write_manifest(root, package.manifest)
        manifest, plan, error = partition_staged(
            root, devices, strategy, objective, batch=batch, sequence=sequence, tolerance=tolerance
        )
    return PartitionResult(Path(output), manifest, plan, error)


__all__ = [
    "Context",
    "PartitionResult",
    "Plan",
    "analyse",
    "partition_into",
    "partition_package",
    "partition_staged",
    "plan_model",
    "planning_feeds",
]
