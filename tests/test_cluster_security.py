"""A device cluster no one else can join or read: cluster secrets (token, CA, device
certificates), ``edgec join --secrets`` (Ray token authentication and mutual TLS) and the Ray
backend connecting with them, on a real local 2-node cluster started by ``edgec join``.

Every command's output is checked for the token: it must never appear."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_edgec
from edgec.runtimes.cluster_secrets import (
    ClusterSecrets,
    create_cluster_secrets,
    load_cluster_secrets,
    load_device_secrets,
)

from edgec.errors import DeviceError, SecretsError

DEVICES = ("board-a", "board-b")


def _token_free(secrets: ClusterSecrets, *outputs: str) -> None:
    token = secrets.token()
    for output in outputs:
        assert token not in output, "a command printed the cluster token"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the secrets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecrets:
    out = tmp_path_factory.mktemp("secrets") / "cluster"
    return create_cluster_secrets(out, DEVICES, ("127.0.0.1", "localhost", "10.0.0.7", "b.lan"))


def test_every_file_is_private_and_the_certificates_chain_to_the_ca(made):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    assert _mode(made.root) == 0o700 and _mode(made.root / "devices") == 0o700
    files = sorted(p for p in made.root.rglob("*") if p.is_file())
    assert files == sorted(made.files())
    assert all(_mode(p) == 0o600 for p in files), {str(p): oct(_mode(p)) for p in files}
    assert len(made.token()) == 64 and len(set(made.token())) > 4
    manifest = json.loads(made.manifest_path.read_text())
    assert manifest["devices"] == list(DEVICES) and made.token() not in json.dumps(manifest)

    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for device in DEVICES:
        cert = x509.load_pem_x509_certificate(made.cert(device).read_bytes())
        cert.verify_directly_issued_by(ca)  # raises when another key signed it
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == [
            "127.0.0.1",
            "10.0.0.7",
        ]
        assert names.get_values_for_type(x509.DNSName) == ["localhost", "b.lan"]
        key = serialization.load_pem_private_key(made.key(device).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert made.key(device).read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
        public = serialization.load_ssh_public_key(made.public_key(device).read_bytes())
        assert made.public_key(device).read_text().startswith("ecdsa-sha2-nistp384 ")
        der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        assert public.public_bytes(*der) == key.public_key().public_bytes(*der)
        assert cert.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)


def test_load_checks_the_layout_and_names_what_is_wrong(made, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(made.root, copy)
    assert load_cluster_secrets(copy) == ClusterSecrets(copy, DEVICES, made.hosts)
    with pytest.raises(SecretsError, match=r"device 'board-c' has no certificate"):
        made.cert("board-c")
    with pytest.raises(SecretsError, match="board-c"):
        load_cluster_secrets(copy, "board-c")

    (copy / "devices" / "board-b.key").unlink()
    with pytest.raises(SecretsError, match=r"board-b\.key' is missing"):
        load_cluster_secrets(copy)
    assert load_cluster_secrets(copy, "board-a").devices == DEVICES  # board-a's copy is whole
    (copy / "ca.key").unlink()  # a device's copy has no ca.key
    assert load_device_secrets(copy) == (load_cluster_secrets(copy, "board-a"), "board-a")

    (copy / "token").chmod(0o644)
    with pytest.raises(SecretsError, match=r"token' has mode 0644"):
        load_cluster_secrets(copy, "board-a")
    (copy / "token").chmod(0o600)
    copy.chmod(0o755)
    with pytest.raises(SecretsError, match=r"has mode 0755.*chmod 0700"):
        load_cluster_secrets(copy, "board-a")
    copy.chmod(0o700)
    (copy / "token").write_text("not a token\n")
    with pytest.raises(SecretsError, match="is not a cluster token") as error:
        load_cluster_secrets(copy, "board-a")
    assert "not a token" not in str(error.value)  # a message never quotes the token file
    (copy / "secrets.json").unlink()
    with pytest.raises(SecretsError, match=r"secrets\.json' is missing"):
        load_cluster_secrets(copy, "board-a")


def test_create_refuses_bad_input_and_never_leaves_half_a_directory(made, tmp_path, monkeypatch):
    from edgec.runtimes import cluster_secrets

    with pytest.raises(SecretsError, match="exists; refusing to overwrite"):
        create_cluster_secrets(made.root, DEVICES)
    for devices, hosts, message in [
        ((), ("127.0.0.1",), "at least one device"),
        (("a", "a"), ("127.0.0.1",), r"\['a'\] given more than once"),
        (("../a",), ("127.0.0.1",), "device name '../a' is not allowed"),
        (("a",), ("not a host!",), "neither an IP address nor a DNS name"),
    ]:
        with pytest.raises(SecretsError, match=message):
            create_cluster_secrets(tmp_path / "bad", devices, hosts)
    assert list(tmp_path.iterdir()) == []

    calls = []

    def fail_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = cluster_secrets._make_device
    monkeypatch.setattr(cluster_secrets, "_make_device", fail_on_the_second)
    with pytest.raises(SecretsError, match="No space left"):
        create_cluster_secrets(tmp_path / "half", DEVICES)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its staging copy

    # --force replaces a directory only once the new one is complete
    old = create_cluster_secrets(tmp_path / "s", ("a",))
    old_token = old.token()
    calls.clear()
    with pytest.raises(SecretsError):
        create_cluster_secrets(tmp_path / "s", ("a", "b"), force=True)
    assert load_cluster_secrets(tmp_path / "s").token() == old_token
    monkeypatch.setattr(cluster_secrets, "_make_device", real)
    new = create_cluster_secrets(tmp_path / "s", ("a", "b"), force=True)
    assert new.devices == ("a", "b") and new.token() != old_token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_cluster_secrets_command_prints_what_goes_where_never_the_token(tmp_path):
    out = tmp_path / "s"
    result = run_edgec(
        "cluster-secrets", "-o", str(out), "--device", "a", "--device", "b", "--host", "10.0.0.7"
    )
    assert result.returncode == 0, result.stderr
    secrets = load_cluster_secrets(out)
    assert secrets.hosts == ("10.0.0.7",)
    assert "secrets.json token ca.crt devices/a.crt devices/a.key devices/a.pub" in result.stdout
    assert "ca.key stays here" in result.stdout
    again = run_edgec("cluster-secrets", "-o", str(out), "--device", "a")
    assert again.returncode == SecretsError.exit_code and "refusing to overwrite" in again.stderr
    forced = run_edgec("cluster-secrets", "-o", str(out), "--device", "c", "--force", "--json")
    assert forced.returncode == 0
    listing = json.loads(forced.stdout)
    assert listing["devices"] == {
        "c": ["secrets.json", "token", "ca.crt", "devices/c.crt", "devices/c.key", "devices/c.pub"]
    }
    assert listing["keep_here"] == ["ca.key"]
    _token_free(secrets, result.stdout, result.stderr, again.stdout, again.stderr)
    _token_free(load_cluster_secrets(out), forced.stdout, forced.stderr)


# --- join -------------------------------------------------------------------------------------


def _node_ip() -> str:
    from edgec.cli_devices import _advertised_ip

    return _advertised_ip(True, None, None)


def test_join_refuses_an_exposed_cluster_without_secrets():
    exposed = run_edgec("join", "--head", "--device", "a", "--host", "0.0.0.0", "--dry-run")
    assert exposed.returncode == DeviceError.exit_code
    assert "refusing --host 0.0.0.0 without --secrets" in exposed.stderr
    assert "remote code execution" in exposed.stderr and exposed.stdout == ""
    worker = run_edgec("join", "--device", "b", "--address", "10.0.0.2:6379", "--dry-run")
    assert worker.returncode == DeviceError.exit_code
    assert "refusing --address 10.0.0.2:6379 without --secrets" in worker.stderr
    insecure = run_edgec(
        "join", "--head", "--device", "a", "--host", "0.0.0.0", "--dry-run", "--insecure"
    )
    assert insecure.returncode == 0
    assert insecure.stdout.strip() == (
        'ray start --resources={"device:a": 1} --head --port=6379 --include-dashboard=false'
    )
    loopback = run_edgec("join", "--head", "--device", "a", "--dry-run")
    assert loopback.returncode == 0 and "listens on every interface" in loopback.stderr


def test_join_with_secrets_turns_on_token_authentication_and_tls(tmp_path):
    secrets = create_cluster_secrets(tmp_path / "s", ("a", "b"), ("127.0.0.1", _node_ip()))
    result = run_edgec(
        "join", "--head", "--device", "a", "--host", "0.0.0.0", "--dry-run", "--secrets",
        str(secrets.root),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# token authentication: on") and "<redacted>" in lines[0]
    assert lines[1].startswith("# TLS: on")
    env = dict(line.split("=", 1) for line in lines[2:-1])
    assert env == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(secrets.token_path.resolve()),
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(secrets.cert("a").resolve()),
        "RAY_TLS_SERVER_KEY": str(secrets.key("a").resolve()),
        "RAY_TLS_CA_CERT": str(secrets.ca_cert.resolve()),
    }
    assert lines[-1].startswith('ray start --resources={"device:a": 1} --head')
    _token_free(secrets, result.stdout, result.stderr)

    unknown = run_edgec(
        "join", "--head", "--device", "c", "--dry-run", "--secrets", str(secrets.root)
    )
    assert (
        unknown.returncode == SecretsError.exit_code and "'c' has no certificate" in unknown.stderr
    )

    # a certificate that does not name the address Ray gives this node: the others would
    # refuse it, so join refuses first
    narrow = create_cluster_secrets(tmp_path / "narrow", ("a",), ("127.0.0.1",))
    refused = run_edgec(
        "join", "--head", "--device", "a", "--dry-run", "--secrets", str(narrow.root)
    )
    assert refused.returncode == SecretsError.exit_code
    assert f"will give this node the address {_node_ip()}" in refused.stderr
    assert f"--host {_node_ip()}" in refused.stderr
    _token_free(narrow, refused.stdout, refused.stderr)


# --- a real cluster ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _join(
    log: Path, *args: str, ray_tmp: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``edgec join ... --block`` in its own session (it becomes ``ray start --block``, which
    stops its node's processes on SIGTERM); output to ``log``."""
    environ = {**os.environ, "RAY_TMPDIR": str(ray_tmp), **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgec.cli", "join", *args, "--num-cpus", "1", "--block"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {log}:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _kill_leftovers(ray_tmp: Path) -> None:
    """Any process of this cluster still alive: SIGKILL it, by pid. Ours are those whose
    command line or environment (RAY_TMPDIR, inherited by Ray's workers, whose command lines
    Ray rewrites) names our temp dir."""
    mark = str(ray_tmp).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def secured_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """board-a heads, board-b joins, both with the secrets (``edgec join --secrets``)."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("secured")
    ip = _node_ip()
    secrets = create_cluster_secrets(root / "secrets", DEVICES, ("127.0.0.1", "localhost", ip))
    # a short temp dir: Ray's socket paths under it must fit in 107 characters
    ray_tmp = Path(tempfile.mkdtemp(prefix="ecs", dir="/tmp"))
    port = _free_port()
    address = f"{ip}:{port}"
    processes: list[subprocess.Popen[bytes]] = []
    logs = SimpleNamespace(head=root / "head.log", worker=root / "worker.log")
    try:
        head = _join(
            logs.head, "--head", "--device", "board-a", "--port", str(port), "--secrets",
            str(secrets.root), ray_tmp=ray_tmp,
        )  # fmt: skip
        processes.append(head)
        _wait_for(logs.head, "Ray runtime started", head, 180)
        worker = _join(
            logs.worker, "--device", "board-b", "--address", address, "--secrets",
            str(secrets.root), ray_tmp=ray_tmp,
        )  # fmt: skip
        processes.append(worker)
        _wait_for(logs.worker, "Ray runtime started", worker, 180)
        yield SimpleNamespace(
            secrets=secrets, address=address, ray_tmp=ray_tmp, root=root, logs=logs
        )
    finally:
        for process in reversed(processes):
            _stop(process)
        _kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for log in (logs.head, logs.worker):
            if log.exists():
                _token_free(secrets, log.read_text(errors="replace"))


BOARDS_LINK_MBPS = 100_000


@pytest.fixture(scope="module")
def pipeline_package(bert_package, tmp_path_factory):
    from edgec.exporters.partition import partition_package
    from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

    boards = DeviceSet(
        (DeviceProfile("board-a", threads=1), DeviceProfile("board-b", threads=1)),
        (Link(("board-a", "board-b"), bandwidth_mbps=BOARDS_LINK_MBPS, latency_ms=0.0),),
        entry="board-a",
        exit="board-b",
    )
    path = tmp_path_factory.mktemp("packages") / "bert-pipeline"
    result = partition_package(bert_package, path, boards, "pipeline")
    assert [s.device for s in result.manifest.stages] == list(DEVICES)
    return path


def _feeds(package: Path) -> dict[str, np.ndarray]:
    from edgec.exporters.partition import planning_feeds
    from edgec.runtimes import load_package

    feeds = planning_feeds(load_package(package).manifest.inputs, 2, 8)
    feeds["input_ids"] = np.arange(16, dtype=np.int64).reshape(2, 8) % 90 + 1
    return feeds


_CLIENT = """
import sys
from edgec.runtimes import load_package
from edgec.errors import DeviceError
try:
    load_package(sys.argv[1], backend="ray", address=sys.argv[2], timeout_s=5,
                 **({{"secrets": sys.argv[3]}} if len(sys.argv) > 3 else {{}}))
except DeviceError as exc:
    print("refused:", exc)
    sys.exit(3)
print("connected")
"""


def _client(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLIENT.format(), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **env},
    )


def test_a_client_without_the_token_is_refused(secured_cluster, pipeline_package, tmp_path):
    secrets = secured_cluster.secrets
    # TLS right (it holds a device's certificate), but the token is another one
    stolen = tmp_path / "stolen"
    shutil.copytree(secrets.root, stolen)
    (stolen / "token").write_text("0" * 64 + "\n")
    wrong = _client(pipeline_package, secured_cluster.address, str(stolen), env={})
    assert wrong.returncode == 3, wrong.stdout + wrong.stderr
    assert "refused this client's token" in wrong.stdout and "InvalidAuthToken" in wrong.stdout

    # TLS right, no token at all, and token authentication not asked for: Ray's client sends
    # none, and the cluster refuses it
    tls_only = {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(secrets.cert("board-a")),
        "RAY_TLS_SERVER_KEY": str(secrets.key("board-a")),
        "RAY_TLS_CA_CERT": str(secrets.ca_cert),
    }
    bare = _client(pipeline_package, secured_cluster.address, env=tls_only)
    assert bare.returncode == 3, bare.stdout + bare.stderr
    assert "refused this client's token" in bare.stdout
    assert "InvalidAuthToken" in bare.stdout  # what the cluster answered
    _token_free(secrets, wrong.stdout, wrong.stderr, bare.stdout, bare.stderr)


def test_a_client_with_the_secrets_runs_a_partitioned_package(
    secured_cluster, pipeline_package, tmp_path
):
    from edgec.runtimes import load_package
    from edgec.runtimes.ray_backend import SECURITY_ENV

    feeds = _feeds(pipeline_package)
    expected = load_package(pipeline_package).run(feeds)
    before = {k: os.environ.get(k) for k in SECURITY_ENV}
    runtime = load_package(
        pipeline_package,
        backend="ray",
        address=secured_cluster.address,
        secrets=secured_cluster.secrets.root,
        timeout_s=30,
    )
    try:
        assert os.environ["RAY_USE_TLS"] == "1" and os.environ["RAY_AUTH_MODE"] == "token"
        actual = runtime.run(feeds)
        assert np.array_equal(actual["last_hidden_state"], expected["last_hidden_state"])
    finally:
        runtime.close()
    assert {k: os.environ.get(k) for k in SECURITY_ENV} == before  # restored at close

    # the command line, the same way: edgec run --backend ray --secrets
    np.savez(tmp_path / "feeds.npz", **feeds)  # type: ignore[arg-type]
    result = run_edgec(
        "run", str(pipeline_package), "--backend", "ray", "--address", secured_cluster.address,
        "--secrets", str(secured_cluster.secrets.root), "--input", str(tmp_path / "feeds.npz"),
        "--save", str(tmp_path / "out.npz"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        assert np.array_equal(saved["last_hidden_state"], expected["last_hidden_state"])
    _token_free(secured_cluster.secrets, result.stdout, result.stderr)
    assert {k: os.environ.get(k) for k in SECURITY_ENV} == before  # run closed its runtime

    # and the server's loader (serve-on-device --cluster ADDRESS --secrets DIR)
    from edgec.runtimes.server import ServerConfig, load_app

    app = load_app(
        pipeline_package,
        ServerConfig(),
        cluster=secured_cluster.address,
        secrets=secured_cluster.secrets.root,
    )
    served = app.state.service.model.runtime
    try:
        outputs = served.run(feeds)
        assert np.array_equal(outputs["last_hidden_state"], expected["last_hidden_state"])
    finally:
        served.close()
    assert {k: os.environ.get(k) for k in SECURITY_ENV} == before


def test_a_worker_with_a_certificate_from_another_ca_cannot_join(secured_cluster, tmp_path):
    """It holds the token and trusts the cluster's CA; only its certificate is foreign."""
    secrets = secured_cluster.secrets
    rogue = create_cluster_secrets(tmp_path / "rogue", ("board-c",), secrets.hosts)
    shutil.copyfile(secrets.token_path, rogue.token_path)
    shutil.copyfile(secrets.ca_cert, rogue.ca_cert)
    log = tmp_path / "rogue.log"
    joining = _join(
        log, "--device", "board-c", "--address", secured_cluster.address, "--secrets",
        str(rogue.root), ray_tmp=secured_cluster.ray_tmp,
    )  # fmt: skip
    try:
        _wait_for(log, "Failed to connect to GCS", joining, 120)  # its TLS handshakes fail
        assert "Ray runtime started" not in log.read_text(errors="replace")
        # the cluster, asked with the secrets, has no board-c: the rogue node never joined
        check = subprocess.run(
            [
                sys.executable, "-c",
                "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', "
                "log_to_driver=False); print(sorted(k for k in ray.cluster_resources() "
                "if k.startswith('device:')))",
                secured_cluster.address,
            ],
            capture_output=True, text=True, timeout=240,
            env={**os.environ, **_ray_env(secrets, "board-a")},
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        assert check.stdout.strip() == "['device:board-a', 'device:board-b']"
    finally:
        _stop(joining)
    _token_free(secrets, log.read_text(errors="replace"), check.stdout, check.stderr)


def _ray_env(secrets: ClusterSecrets, device: str) -> dict[str, str]:
    from edgec.runtimes.ray_backend import ray_security_env

    return ray_security_env(secrets, device)
