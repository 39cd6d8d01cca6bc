"""The Ray backend: each stage an actor on the node that offers its device's resource.

A device joins the cluster with ``edgec join --device NAME`` (``ray start`` with the custom
resource ``device:NAME``); the stage actor asks for a sliver of that resource, so Ray places it
there. Stage files travel through Ray's object store (sha256 checked on arrival), so devices
need no copy of the package. A stage that does not answer within ``timeout_s`` fails the
request with a ``DeviceError`` naming its device (starting the stages waits up to the longer
``connect_timeout_s``: a worker process must start); actors restart (without limit) when their
device rejoins, so service resumes without restarting the coordinator.

A cluster made with secrets (``edgec cluster-secrets``, ``edgec join --secrets``) asks every
process for its token and TLS: ``RayBackend(..., secrets=DIR)`` connects the same way
(``ray_security_env``). Ray's C++ core reads ``RAY_USE_TLS`` and the certificate paths into its
config when ``ray`` is first imported, so the backend sets the environment before importing
``ray``; where ``ray`` was imported earlier it refreshes that config from the environment, as
Ray itself does when it turns token authentication on (``Config.initialize``), and drops the
cached token. The environment stays set while connected (Ray's Python side reads it whenever it
opens a channel); ``close`` disconnects and restores it.

``ray`` is imported only when this backend is created.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgec.runtimes.backends import Feeds
from edgec.runtimes.cluster_secrets import ClusterSecrets, load_device_secrets
from edgec.runtimes.manifest import DeviceInfo
from edgec.runtimes.package import Package

from edgec.errors import DeviceError, InputError

RESOURCE_PREFIX = "device:"
STAGE_RESOURCE = 0.001  # a sliver, so that many stages may share one device
DEFAULT_TIMEOUT_S = 30.0
# Starting a stage (a worker process that imports onnxruntime and builds its session) is not a
# request: on a busy device it takes seconds, so it gets its own, longer wait.
DEFAULT_CONNECT_TIMEOUT_S = 120.0


def device_resource(name: str) -> str:
    """The Ray custom resource that marks the node of device ``name``."""
    return f"{RESOURCE_PREFIX}{name}"


# The variables ray_security_env sets, and RAY_AUTH_TOKEN, which would override the token file.
SECURITY_ENV = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_TOKEN",
    "RAY_USE_TLS",
    "RAY_TLS_SERVER_CERT",
    "RAY_TLS_SERVER_KEY",
    "RAY_TLS_CA_CERT",
)


def ray_security_env(secrets: ClusterSecrets, device: str) -> dict[str, str]:
    """The environment every Ray process of ``device`` runs with on a cluster with secrets:
    token authentication (the token read from its file, so it is in no environment or command
    line) and mutual TLS with the device's certificate, its key and the cluster's CA.

    Ray's gRPC servers (GCS, raylets, workers) require a client certificate signed by the CA
    and present the device's certificate, which other nodes check against the address they
    dial: the certificate's hosts must name that address (``edgec join`` checks)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(secrets.token_path.resolve()),
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(secrets.cert(device).resolve()),
        "RAY_TLS_SERVER_KEY": str(secrets.key(device).resolve()),
        "RAY_TLS_CA_CERT": str(secrets.ca_cert.resolve()),
    }


def _refresh_ray_config() -> None:
    """Make an already imported Ray read its config (TLS) and token from the environment."""
    import importlib

    raylet: Any = importlib.import_module("ray._raylet")  # compiled; no type stubs
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


class StageWorker:
    """Runs one stage's ONNX model (given as bytes) with its device's providers and threads."""

    def __init__(
        self,
        model: bytes,
        sha256: str,
        device: dict[str, Any],
        weights: bytes | None = None,
        weights_sha256: str = "",
        coded: tuple[dict[str, Any], ...] = (),
    ):
        import io

        from edgec.runtimes.backends import create_session, session_options
        from edgec.runtimes.lowbit import CodedWeight

        if hashlib.sha256(model).hexdigest() != sha256:
            raise DeviceError("stage file arrived corrupted: its sha256 does not match")
        info = DeviceInfo.from_json(device)
        weights_file = None
        if weights is not None:  # the stage's weights file: codes its runtime decodes at load
            if hashlib.sha256(weights).hexdigest() != weights_sha256:
                raise DeviceError("weights file arrived corrupted: its sha256 does not match")
            weights_file = io.BytesIO(weights)
        self._session = create_session(
            model,
            session_options(info),
            list(info.providers),
            weights_file,
            tuple(CodedWeight.from_json(c) for c in coded),
        )
        self._names = [o.name for o in self._session.get_outputs()]

    def ready(self) -> bool:
        return True

    def run(self, feeds: Feeds) -> Feeds:
        try:
            values = self._session.run(self._names, feeds)
        except Exception as exc:  # onnxruntime's error types do not pickle reliably
            raise InputError(f"stage rejected its inputs: {exc}") from None
        return dict(zip(self._names, values, strict=True))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DeviceError("the Ray backend needs ray: pip install 'edgec[cluster]'") from None
    return ray


class RayBackend:
    """Stages as Ray actors placed by device resource. Thread-safe for concurrent requests."""

    def __init__(
        self,
        package: Package,
        *,
        address: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        secrets: str | Path | ClusterSecrets | None = None,
    ):
        self._restore: dict[str, str | None] | None = None  # the environment before secrets
        env = None
        if secrets is not None:
            # the coordinator presents a device's certificate: the one its directory holds (all
            # name the same hosts)
            root = secrets.root if isinstance(secrets, ClusterSecrets) else Path(secrets)
            env = ray_security_env(*load_device_secrets(root))
        ray = _import_ray() if env is None or "ray" in sys.modules else None
        if ray is not None and ray.is_initialized():
            if env is not None and any(os.environ.get(k) != env.get(k) for k in SECURITY_ENV):
                raise DeviceError(
                    "this process is already connected to a Ray cluster without these secrets; "
                    "a process connects to one cluster, one way"
                )
        else:
            if address is None:
                raise DeviceError("the Ray backend needs the cluster's address (HOST:PORT)")
            if env is not None:
                self._restore = {k: os.environ.get(k) for k in SECURITY_ENV}
                _set_env({k: env.get(k) for k in SECURITY_ENV})
                if ray is None:  # first import: Ray reads the environment now
                    ray = _import_ray()
                else:
                    _refresh_ray_config()
            if ray is None:  # for mypy: imported above whenever env is None
                ray = _import_ray()
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except Exception as exc:  # ConnectionError, Ray's AuthenticationError, ...
                ray.shutdown()
                self._restore_env()
                raise DeviceError(_connect_error(address, exc)) from exc
        self._ray = ray
        self.timeout_s = float(timeout_s)
        manifest = package.manifest
        offered = ray.cluster_resources()
        wanted = sorted({s.device for s in manifest.stages})
        missing = [d for d in wanted if offered.get(device_resource(d), 0) <= 0]
        if missing:
            raise DeviceError(
                f"device(s) {missing} are not in the Ray cluster (no node offers "
                f"{[device_resource(d) for d in missing]}); on each run "
                f"`edgec join --device NAME --address {address or 'HOST:PORT'}`"
            )
        worker = ray.remote(StageWorker)
        files: dict[str, Any] = {}
        self._devices = {s.name: s.device for s in manifest.stages}
        self._actors: dict[str, Any] = {}
        for stage in manifest.stages:
            for name in (stage.file, stage.weights):
                if name is not None and name not in files:  # restarted actors read them again
                    files[name] = ray.put(package.path(name).read_bytes())
            # object refs as top-level arguments: Ray resolves those, not refs inside containers
            weights = (
                ()
                if stage.weights is None
                else (
                    files[stage.weights],
                    manifest.files[stage.weights],
                    tuple(c.to_json() for c in stage.coded),
                )
            )
            self._actors[stage.name] = worker.options(
                resources={device_resource(stage.device): STAGE_RESOURCE},
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=0,
            ).remote(
                files[stage.file], stage.sha256, manifest.device(stage.device).to_json(), *weights
            )
        self._files = files
        for name, actor in self._actors.items():
            self._get(name, actor.ready.remote(), max(connect_timeout_s, self.timeout_s))

    def _get(self, stage: str, ref: Any, timeout_s: float) -> Any:
        ray = self._ray
        device = self._devices[stage]
        started = time.perf_counter()
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise DeviceError(
                f"device {device!r} (stage {stage!r}) did not answer within {timeout_s:g} s"
            ) from None
        except ray.exceptions.RayActorError as exc:
            waited = time.perf_counter() - started
            raise DeviceError(
                f"device {device!r} (stage {stage!r}) is unreachable after {waited:.1f} s: "
                f"its node died or left the cluster ({type(exc).__name__})"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, InputError | DeviceError):
                raise type(cause)(f"device {device!r} (stage {stage!r}): {cause}") from None
            raise DeviceError(f"device {device!r} (stage {stage!r}) failed: {exc}") from None

    def run_stage(self, stage: str, feeds: Feeds) -> Feeds:
        ref = self._actors[stage].run.remote({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(self._get(stage, ref, self.timeout_s))

    def close(self) -> None:
        """Stop the stage actors; a backend that connected with secrets also disconnects and
        restores the environment it found."""
        for actor in self._actors.values():
            self._ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._files.clear()
        if self._restore is not None:
            self._ray.shutdown()
            self._restore_env()

    def _restore_env(self) -> None:
        if self._restore is not None:
            _set_env(self._restore)
            self._restore = None
            if "ray" in sys.modules:
                _refresh_ray_config()


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _connect_error(address: str, exc: BaseException) -> str:
    """Why ``ray.init`` failed, in one line. A refused token is named as such: Ray raises
    ``AuthenticationError``, or (connecting to a GCS) a ``ConnectionError`` whose cause's text
    carries that error's traceback, ``... InvalidAuthToken: ...``."""
    cause: BaseException | None = exc
    while cause is not None:
        text = str(cause)
        if type(cause).__name__ == "AuthenticationError" or "InvalidAuthToken" in text:
            said = next(
                (line for line in text.splitlines() if "InvalidAuthToken" in line),
                text.strip().splitlines()[0] if text.strip() else "",
            )
            said = said.split(". ")[0].split("AuthenticationError: ")[-1].strip()
            return (
                f"the Ray cluster at {address!r} refused this client's token ({said}): token "
                "authentication is on; connect with the cluster's secrets (--secrets DIR)"
            )
        cause = cause.__cause__ or cause.__context__
    lines = str(exc).strip().splitlines()
    return f"cannot reach the Ray cluster at {address!r}: {lines[0] if lines else exc!r}"
