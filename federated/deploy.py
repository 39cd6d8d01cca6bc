"""Federated recovery on real devices: a Flower SuperLink on the coordinator, a SuperNode each.

``serve`` starts ``flower-superlink``, lists the devices allowed to take part, submits the run
(``flwr run``: a small Flower App whose ServerApp and ClientApp are ``edgec.federated.apps``)
and waits for it to finish; ``join`` runs ``flower-supernode`` with the device's checkpoint and
data file in its node config. Nothing but the trainable tensors and fidelity figures travel.

With cluster secrets (``edgec cluster-secrets``), the SuperLink serves TLS with the
coordinator's certificate, SuperNodes verify it against the cluster's CA, and SuperNode
authentication is on: each device signs with its own P-384 key, and the SuperLink accepts only
the public keys registered for the run (every device of the secrets but the coordinator, or
those given), so a node with any other key is refused. Without secrets, both sides need
``insecure=True``: plain text, and anyone who reaches the port can take part.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgec.federated.apps import FederatedPlan, RunResult, client_app, node_settings, run_rounds
from edgec.federated.local import LocalTraining
from edgec.models.checkpoint import read_checkpoint
from edgec.runtimes.cluster_secrets import ClusterSecrets, load_cluster_secrets
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgec.errors import EdgecError, FederatedError

APP_MODULE = "edgec_federated_app"
CONNECTION = "edgec"  # the flwr CLI's name for this run's SuperLink
DEFAULT_PORT = 9092
DEFAULT_NODE_PORT = 9094
READY_TIMEOUT_S = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- the Flower App that `flwr run` ships ----------------------------------------------------


def plan_from_json(data: dict[str, Any]) -> FederatedPlan:
    fields = dict(data)
    fields["local"] = LocalTraining(**fields.get("local", {}))
    return FederatedPlan(**fields)


def fab_server_app() -> ServerApp:
    """The deployed ServerApp: checkpoint, output and plan come in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        plan = plan_from_json(json.loads(str(config["plan"])))
        ckpt, out = Path(str(config["checkpoint"])), Path(str(config["output"]))
        run_rounds(grid, ckpt, out, plan, lambda line: print(line, flush=True), context)

    return app


def fab_client_app() -> ClientApp:
    """The deployed ClientApp: each SuperNode's node config names its checkpoint and data."""
    return client_app(node_settings)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(directory: Path, checkpoint: Path, output: Path, plan: FederatedPlan) -> Path:
    """The Flower App project ``flwr run`` bundles: a pyproject and a two-line module."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{APP_MODULE}.py").write_text(
        '"""edgec federated recovery, as a Flower App (written by `edgec federate serve`)."""\n\n'
        "from edgec.federated.deploy import fab_client_app, fab_server_app\n\n"
        "server = fab_server_app()\nclient = fab_client_app()\n",
        encoding="utf-8",
    )
    (directory / "pyproject.toml").write_text(
        "\n".join(
            [
                "[project]",
                'name = "edgec-federated"',
                'version = "1.0.0"',
                'description = "edgec federated recovery"',
                'license = "Apache-2.0"',
                "dependencies = []",
                "",
                "[tool.flwr.app]",
                'publisher = "edgec"',
                "",
                "[tool.flwr.app.components]",
                f'serverapp = "{APP_MODULE}:server"',
                f'clientapp = "{APP_MODULE}:client"',
                "",
                "[tool.flwr.app.config]",
                f"checkpoint = {_toml_string(str(checkpoint))}",
                f"output = {_toml_string(str(output))}",
                f"plan = {_toml_string(json.dumps(asdict(plan)))}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return directory


# --- processes -------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A Flower executable next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise FederatedError(f"{name} is not installed; pip install 'edgec[federated]'")
    return found


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process in its own session (so stopping it stops its children), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM to the process's session, SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = _ANSI.sub("", log.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(process: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederatedError(f"the SuperLink exited ({process.returncode}):\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.3)
    raise FederatedError(f"the SuperLink did not listen on {host}:{port} in time:\n{_tail(log)}")


def _flwr(args: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(
        [_tool("flwr"), *args], env=env, capture_output=True, text=True, check=False
    )
    output = _ANSI.sub("", done.stdout + done.stderr)
    if done.returncode != 0:
        raise FederatedError(f"{what} failed ({done.returncode}): {output.strip()[-800:]}")
    return output


# --- security --------------------------------------------------------------------------------


def _secrets(directory: Path | None, device: str | None, insecure: bool) -> ClusterSecrets | None:
    if directory is None:
        if not insecure:
            raise FederatedError(
                "no --secrets: without them Flower's traffic is plain text and any node that "
                "reaches the port can take part; give --secrets DIR (edgec cluster-secrets) or "
                "say --insecure"
            )
        return None
    if insecure:
        raise FederatedError("--secrets and --insecure contradict each other; give one")
    if device is None:
        raise FederatedError("--secrets needs --device: the name of this device in the secrets")
    try:
        return load_cluster_secrets(directory, device)
    except EdgecError as exc:
        raise FederatedError(str(exc)) from exc


@contextlib.contextmanager
def openssh_key(secrets: ClusterSecrets, device: str) -> Iterator[Path]:
    """The device's private key in the OpenSSH form Flower's SuperNode reads (the secrets
    hold PKCS8 PEM), in a private temporary file removed afterwards."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(secrets.key(device).read_bytes(), None)
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise FederatedError(f"cannot read device {device!r}'s key: {exc}") from exc
    folder = Path(tempfile.mkdtemp(prefix="edgec-node-key-"))
    path = folder / "node.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- coordinator -----------------------------------------------------------------------------


def superlink_command(
    host: str, port: int, secrets: ClusterSecrets | None, device: str | None
) -> list[str]:
    command = [
        _tool("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",  # the app's code is edgec, installed
    ]
    if secrets is None or device is None:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-ca-certfile",
        str(secrets.ca_cert),
        "--ssl-certfile",
        str(secrets.cert(device)),
        "--ssl-keyfile",
        str(secrets.key(device)),
        "--enable-supernode-auth",
    ]


def serve(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    plan: FederatedPlan,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    secrets: str | os.PathLike[str] | None = None,
    device: str | None = None,
    allow: Sequence[str] = (),
    insecure: bool = False,
    say: Callable[[str], None] = print,
) -> RunResult:
    """Coordinate a federated run of ``plan`` from ``checkpoint`` to ``output``; returns when
    the run has finished (the SuperLink is stopped then)."""
    ckpt = Path(checkpoint).resolve()
    read_checkpoint(ckpt)
    out = Path(output).resolve()
    opened = _secrets(None if secrets is None else Path(secrets), device, insecure)
    allowed: list[str] = []
    if opened is not None:
        allowed = list(allow) or [d for d in opened.devices if d != device]
        unknown = sorted(set(allowed) - set(opened.devices))
        if unknown:
            raise FederatedError(
                f"--allow {', '.join(unknown)}: not devices of the secrets "
                f"({', '.join(opened.devices)})"
            )
        if not allowed:
            raise FederatedError("no device is allowed to join: the secrets list only this one")
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    work = Path(tempfile.mkdtemp(prefix="edgec-federate-"))
    env = {**os.environ, "FLWR_HOME": str(work / "home")}
    (work / "home").mkdir()
    security = (
        "insecure = true"
        if opened is None
        else f"root-certificates = {_toml_string(str(opened.ca_cert.resolve()))}"
    )
    (work / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{connect}:{port}"\n{security}\n',
        encoding="utf-8",
    )
    app = write_app(work / "app", ckpt, out, plan)
    log = work / "superlink.log"
    superlink = _start(superlink_command(host, port, opened, device), log, env)
    try:
        _wait_ready(superlink, connect, port, log)
        say(f"SuperLink on {host}:{port} ({'insecure' if opened is None else 'TLS'})")
        keys = [opened.public_key(name) for name in allowed] if opened is not None else []
        for name, key in zip(allowed, keys, strict=True):
            _flwr(
                ["supernode", "register", str(key), CONNECTION],
                env,
                f"registering device {name!r}",
            )
        if allowed:
            say(f"devices allowed to join: {', '.join(allowed)}")
        _run(app, env, say)
    finally:
        stop(superlink)
        shutil.rmtree(work, ignore_errors=True)
    try:
        report = read_checkpoint(out)["federated"]
    except (EdgecError, KeyError) as exc:
        raise FederatedError(f"the run ended without writing {out}; see the log above") from exc
    return RunResult(out, report)


def _run(app: Path, env: dict[str, str], say: Callable[[str], None]) -> None:
    """``flwr run APP edgec --stream``: submit the run and stream its log until it ends."""
    process = subprocess.Popen(
        [_tool("flwr"), "run", str(app), CONNECTION, "--stream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:
            text = _ANSI.sub("", line).rstrip()
            if text.strip():
                say(text)
    finally:
        process.stdout.close()
        if process.wait() != 0:
            raise FederatedError(f"flwr run exited with {process.returncode}; see the log above")


# --- device ----------------------------------------------------------------------------------


def _node_value(key: str, value: str) -> str:
    if any(c in value for c in '"\\\n'):
        raise FederatedError(f"{key} {value!r} holds a quote, backslash or newline")
    return f'{key}="{value}"'


def supernode_command(
    address: str,
    checkpoint: Path,
    data: Path,
    name: str,
    *,
    teacher: str | None = None,
    port: int = DEFAULT_NODE_PORT,
    ca_cert: Path | None = None,
    key: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` line of one device (``ca_cert``/``key``: TLS and node auth)."""
    config = [
        _node_value("checkpoint", str(checkpoint)),
        _node_value("data", str(data)),
        _node_value("name", name),
    ]
    if teacher:
        config.append(_node_value("teacher", teacher))
    command = [
        _tool("flower-supernode"),
        "--superlink",
        address,
        "--port",
        str(port),
        "--node-config",
        " ".join(config),
    ]
    if ca_cert is None or key is None:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(key)]


@contextlib.contextmanager
def supernode(
    address: str,
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    name: str | None = None,
    teacher: str | None = None,
    port: int = DEFAULT_NODE_PORT,
    secrets: str | os.PathLike[str] | None = None,
    device: str | None = None,
    insecure: bool = False,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A running SuperNode for this device (stopped on exit from the block)."""
    ckpt = Path(checkpoint).resolve()
    read_checkpoint(ckpt)
    source = Path(data).resolve()
    if not source.is_file():
        raise FederatedError(f"--data {str(data)!r} does not exist")
    opened = _secrets(None if secrets is None else Path(secrets), device, insecure)
    label = name or device or source.stem
    with contextlib.ExitStack() as stack:
        ca_cert = key = None
        if opened is not None and device is not None:
            ca_cert = opened.ca_cert
            key = stack.enter_context(openssh_key(opened, device))
        command = supernode_command(
            address, ckpt, source, label, teacher=teacher, port=port, ca_cert=ca_cert, key=key
        )
        folder = None if log else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process = _start(command, log or Path(str(folder)) / "supernode.log", dict(os.environ))
        try:
            yield process
        finally:
            stop(process)


def join(
    address: str,
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    say: Callable[[str], None] = print,
    **options: Any,
) -> int:
    """Run this device's SuperNode until it exits or is interrupted; its exit status."""
    log = Path(tempfile.mkdtemp(prefix="edgec-supernode-")) / "supernode.log"
    try:
        with supernode(address, checkpoint, data, log=log, **options) as process:
            say(f"SuperNode joined {address}; its log: {log}")
            with contextlib.suppress(KeyboardInterrupt):
                process.wait()
            if process.returncode not in (0, None, -signal.SIGTERM):
                say(_tail(log))
            return int(process.returncode or 0)
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)
