"""Security: bearer token (401), TLS, signed packages refused when unsigned or tampered."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from conftest import RunningServer
from edgec.runtimes import load_package
from edgec.runtimes.server import ServedModel, ServerConfig, create_app
from edgec.runtimes.signing import generate_keypair, sign_manifest

from edgec.errors import PackageError, ServerError, SignatureError


@pytest.fixture(scope="module")
def bert_model(bert_package):
    return ServedModel(load_package(bert_package))


def test_a_request_without_the_token_gets_401(bert_model):
    app = create_app(bert_model, ServerConfig(token="s3cret-token"))
    with RunningServer(app) as server:
        for path in ("/v2/health/live", "/v2", "/metrics", "/v2/models/bert/infer"):
            assert httpx.get(server.url + path).status_code == 401, path
        wrong = {"Authorization": "Bearer s3cret-tokeN"}
        response = httpx.post(server.url + "/v2/models/bert/infer", headers=wrong, json={})
        assert response.status_code == 401
        assert "bearer token" in response.json()["error"]
        good = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(server.url + "/v2/health/ready", headers=good).status_code == 200
        client = triton.InferenceServerClient(server.address)
        assert client.is_server_live(headers=good)
        with pytest.raises(triton.InferenceServerException):
            client.get_server_metadata()
        client.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(bert_model, tmp_path):
    cert, key = _self_signed(tmp_path)
    app = create_app(bert_model, ServerConfig())
    with RunningServer(app, tls_cert=str(cert), tls_key=str(key)) as server:
        assert server.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(server.url + "/v2/health/live").json() == {"live": True}
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/v2/health/live")  # not trusted without the cert
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(server.url.replace("https", "http") + "/v2/health/live")


@pytest.fixture
def signed(bert_package, tmp_path):
    package = Path(shutil.copytree(bert_package, tmp_path / "pkg"))
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_manifest(package, tmp_path / "key.pem")
    return package, tmp_path / "key.pub"


def test_a_signed_package_loads(signed):
    package, public = signed
    assert load_package(package, public_key=public).name == "bert"


def test_unsigned_package_is_refused(signed):
    package, public = signed
    (package / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match=r"is unsigned: it has no manifest\.sig"):
        load_package(package, public_key=public)


def test_tampered_manifest_is_refused(signed):
    package, public = signed
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["name"] = "evil"
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SignatureError, match="does not match its signature"):
        load_package(package, public_key=public)


def test_tampered_model_file_is_refused(signed):
    package, public = signed
    with open(package / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match=r"model\.onnx.* corrupted"):
        load_package(package, public_key=public)


def test_another_key_is_refused(signed, tmp_path):
    package, _ = signed
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="does not match"):
        load_package(package, public_key=tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_package(package, public_key=tmp_path / "other.pem")


def _edgec(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgec.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_keygen_sign_and_serve_refuses_a_tampered_package(bert_package, tmp_path):
    package = Path(shutil.copytree(bert_package, tmp_path / "pkg"))
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    assert _edgec("keygen", "--private", str(private), "--public", str(public)).returncode == 0
    assert private.stat().st_mode & 0o077 == 0
    result = _edgec("sign", str(package), "--key", str(private))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["outputs"][0]["name"] = "swapped"
    (package / "manifest.json").write_text(json.dumps(manifest))
    result = _edgec("serve-on-device", str(package), "--port", "0", "--public-key", str(public))
    assert result.returncode == 10, result.stderr
    assert "does not match its signature" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_cluster_option_runs_the_stages_on_ray(bert_package, monkeypatch):
    """``--cluster ADDRESS`` asks the timed backend to wrap the Ray backend at ADDRESS."""
    import importlib

    serve = importlib.import_module("edgec.runtimes.server.serve")
    seen: dict[str, object] = {}

    def fake_load_package(package, **options):  # type: ignore[no-untyped-def]
        seen.update(options)
        raise ServerError("stop here")

    monkeypatch.setattr(serve, "load_package", fake_load_package)
    with pytest.raises(ServerError, match="stop here"):
        serve.load_app(bert_package, ServerConfig(), cluster="10.0.0.1:6379")
    assert seen["backend"] == "timed"
    assert seen["inner"] == "ray"
    assert seen["address"] == "10.0.0.1:6379"
