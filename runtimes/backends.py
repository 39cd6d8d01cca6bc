"""Backends run stages: the local backend (one process, a session per stage) and a registry.

A backend turns a stage name and its feeds into the stage's outputs. The executor decides which
stage runs when; the backend decides where.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

import numpy as np
import onnxruntime as ort
from edgec.runtimes.lowbit import DECODED_LOCATION, CodedWeight, decode_to_buffer
from edgec.runtimes.manifest import DeviceInfo, StageInfo
from edgec.runtimes.package import Package

from edgec.errors import DeviceError, InputError, PackageError

Feeds = dict[str, np.ndarray]

# What onnxruntime raises on a model it cannot load or run (InvalidProtobuf, InvalidGraph,
# Fail, ...; each derives from Exception alone), and the UnicodeDecodeError its Python layer
# raises on some corrupted files.
ONNXRUNTIME_ERRORS: tuple[type[Exception], ...] = (
    *(
        v
        for v in vars(ort.capi.onnxruntime_pybind11_state).values()
        if isinstance(v, type) and issubclass(v, Exception)
    ),
    UnicodeDecodeError,
)


class Backend(Protocol):
    def run_stage(self, stage: str, feeds: Feeds) -> Feeds: ...

    def close(self) -> None: ...


def session_options(device: DeviceInfo) -> ort.SessionOptions:
    """Session options for a device: its thread count, full graph optimization."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device.threads:
        options.intra_op_num_threads = device.threads
        options.inter_op_num_threads = 1
    return options


def create_session(
    model: str | os.PathLike[str] | bytes,
    options: ort.SessionOptions,
    providers: list[str],
    weights_file: str | os.PathLike[str] | IO[bytes] | None = None,
    coded: tuple[CodedWeight, ...] = (),
) -> ort.InferenceSession:
    """A session on a stage's ONNX file (path or bytes) whose coded weights are decoded from
    ``weights_file`` first (``edgec.runtimes.lowbit``): the one place a stage becomes a session.

    The decoded weights reach onnxruntime as an in-memory external data file, which it copies
    in during session creation; the buffer is freed as soon as the session exists.
    """
    if coded:
        if weights_file is None:
            raise PackageError("the stage has coded weights but no weights file")
        source = Path(weights_file) if isinstance(weights_file, str | os.PathLike) else weights_file
        buffer, _ = decode_to_buffer(source, coded)
        options.add_external_initializers_from_files_in_memory(
            [DECODED_LOCATION], [buffer], [buffer.nbytes]
        )
    source_model = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source_model, sess_options=options, providers=providers)


def open_session(package: Package, stage: StageInfo) -> ort.InferenceSession:
    """An onnxruntime session for one stage, on the providers its device names."""
    device = package.manifest.device(stage.device)
    available = set(ort.get_available_providers())
    missing = [p for p in device.providers if p not in available]
    if missing:
        raise DeviceError(
            f"device {device.name!r} asks for providers {missing} that this onnxruntime lacks "
            f"(available: {sorted(available)})"
        )
    try:
        return create_session(
            package.path(stage.file),
            session_options(device),
            list(device.providers),
            None if stage.weights is None else package.path(stage.weights),
            stage.coded,
        )
    except ONNXRUNTIME_ERRORS as exc:
        raise PackageError(
            f"onnxruntime cannot load stage {stage.name!r} ({stage.file!r}) of package "
            f"{str(package.root)!r}: {str(exc).strip()}"
        ) from exc


class LocalBackend:
    """Every stage in this process, each its own InferenceSession with its device's threads."""

    def __init__(self, package: Package):
        self._sessions = {s.name: open_session(package, s) for s in package.manifest.stages}

    def run_stage(self, stage: str, feeds: Feeds) -> Feeds:
        session = self._sessions[stage]
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise InputError(f"stage {stage!r} rejected its inputs: {exc}") from exc
        except ONNXRUNTIME_ERRORS as exc:  # the model itself fails: a corrupted stage file
            raise PackageError(f"stage {stage!r} failed in onnxruntime: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self._sessions.clear()


BackendFactory = Callable[..., Backend]


def _ray_backend(package: Package, **options: object) -> Backend:
    from edgec.runtimes.ray_backend import RayBackend  # imports ray only when asked for

    return RayBackend(package, **options)


BACKENDS: dict[str, BackendFactory] = {"local": LocalBackend, "ray": _ray_backend}


def register_backend(name: str, factory: BackendFactory) -> None:
    BACKENDS[name] = factory


def create_backend(name: str, package: Package, **options: object) -> Backend:
    if name not in BACKENDS:
        raise DeviceError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name](package, **options)
