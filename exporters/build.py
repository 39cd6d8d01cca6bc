"""``export``: a model source in, a verified package directory out."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from edgec.exporters.compressed import compress_graph
from edgec.exporters.package_writer import hash_files, staging, write_manifest
from edgec.exporters.partition import load_stage_file, partition_staged, predict_memory
from edgec.exporters.partition.plan import Objective
from edgec.exporters.torch_to_onnx import DEFAULT_OPSET, ParityCase, check_parity, export_onnx
from edgec.models import load_model
from edgec.models.spec import ModelSpec, write_asset
from edgec.runtimes.devices import DeviceSet, load_devices
from edgec.runtimes.manifest import DeviceInfo, Manifest, StageInfo
from edgec.runtimes.package import read_package

from edgec import __version__

MODEL_FILE = "model.onnx"
LOCAL_DEVICE = DeviceInfo(name="local")


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the package path, its manifest and the parity figures."""

    path: Path
    manifest: Manifest
    parity: list[ParityCase]

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.parity)

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.manifest.files)


def _copy_assets(spec: ModelSpec, root: Path) -> list[str]:
    for relative, source in spec.assets.items():
        write_asset(source, root / relative)
    return list(spec.assets)


def export(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    on_step: Callable[[str], None] | None = None,
    devices: DeviceSet | str | os.PathLike[str] | None = None,
    strategy: str = "auto",
    objective: Objective | None = None,
) -> ExportResult:
    """Export ``source`` (a built-in name or model directory) to a package at ``output``.

    With ``devices`` (a ``DeviceSet`` or a profile YAML path) the package is partitioned by
    ``strategy`` (pipeline | data | auto | single) for ``objective`` (latency | throughput); the
    partitioned package must equal the whole graph within 1e-5 (max abs).

    Checks parity of onnxruntime against torch (max abs error <= 1e-4) before the package is
    swapped in; on any failure ``output`` is left as it was. ``on_step`` hears each step's name.
    """
    step = on_step or (lambda _: None)
    step(f"loading {source}")
    model, spec = load_model(source)
    with staging(Path(output)) as root:
        step(f"exporting to ONNX (opset {opset})")
        export_onnx(model, spec, root / MODEL_FILE, opset=opset)
        step("checking parity: onnxruntime against torch")
        parity = check_parity(model, spec, root / MODEL_FILE)
        compressed = compress_graph(source, model, spec, root / MODEL_FILE)  # checkpoints only
        # the graph as the runtime will run it: coded weights decoded into place (their buffer
        # is made in memory at load, so neither the checker nor onnxruntime finds it on disk)
        runnable = load_stage_file(root / MODEL_FILE, compressed.weights, compressed.coded, root)
        onnx.checker.check_model(runnable)
        step("predicting the memory a device pays")
        pinned = frozenset(c.name for c in compressed.coded)
        memory = predict_memory(runnable, spec.inputs, pinned)
        del runnable
        step("writing the package")
        stage_files = (
            [MODEL_FILE] if compressed.weights is None else [MODEL_FILE, compressed.weights]
        )
        files = hash_files(root, [*stage_files, *_copy_assets(spec, root)])
        stage = StageInfo(
            name="model",
            device=LOCAL_DEVICE.name,
            file=MODEL_FILE,
            sha256=files[MODEL_FILE],
            inputs=tuple(spec.input_names),
            outputs=tuple(spec.output_names),
            contrib_ops=compressed.contrib_ops,
            weights=compressed.weights,
            coded=compressed.coded,
            memory_bytes=memory,
        )
        manifest = Manifest(
            name=spec.name,
            created_by=f"edgec {__version__}",
            inputs=spec.inputs,
            outputs=spec.outputs,
            preprocessing=spec.preprocessing,
            postprocessing=spec.postprocessing,
            devices=(LOCAL_DEVICE,),
            stages=(stage,),
            files=files,
            report=compressed.report,
            parity={
                "reference": "torch fp32",
                "max_abs_error": max(c.max_abs_error for c in parity),
                "cases": [c.to_json() for c in parity],
            },
        )
        write_manifest(root, manifest)
        read_package(root)  # what we wrote must load
        if devices is not None:
            profiles = devices if isinstance(devices, DeviceSet) else load_devices(devices)
            manifest = partition_staged(root, profiles, strategy, objective, on_step=step).manifest
    return ExportResult(path=Path(output), manifest=manifest, parity=parity)


def predicted_memory(source: str | os.PathLike[str]) -> int:
    """Resident bytes a device's process is predicted to hold for ``source``'s package above
    the bare interpreter, running one request of 1 x 128: a trial export, thrown away."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgec-memory-") as tmp:
        stages = export(source, Path(tmp) / "package").manifest.stages
        return sum(s.memory_bytes or 0 for s in stages)
