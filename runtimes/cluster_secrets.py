"""A device cluster's secrets: a shared token and a small certificate authority.

``create_cluster_secrets(out, devices, hosts)`` writes, into a new directory ``out`` (0700):

- ``token``: 256 random bits as 64 hex characters, the cluster's shared secret (Ray's token
  authentication; never logged or printed);
- ``ca.crt`` / ``ca.key``: a self-signed CA (EC P-384) that signs the device certificates;
  ``ca.key`` never leaves the machine that made the secrets;
- ``devices/NAME.crt`` / ``NAME.key`` / ``NAME.pub``: per device, an X.509 certificate signed by
  the CA (usable as TLS server and client; its subject alternative names are ``hosts``: IP
  addresses as IP SANs, names as DNS SANs), its EC P-384 private key (PEM, PKCS8, unencrypted)
  and the same key's public half in OpenSSH format (``ecdsa-sha2-nistp384``, what Flower's
  SuperNode authentication lists);
- ``secrets.json``: the manifest (format version, device names, hosts, creation time; never the
  token), so ``load_cluster_secrets`` can check the layout.

Every file is 0600. The files are written into a temporary sibling directory that is renamed
into place only when complete, so a failed run leaves nothing half-written.

Which files a device needs: ``token``, ``ca.crt`` and its own ``devices/NAME.{crt,key,pub}``
(``device_files``). Torch-free; needs ``cryptography`` (the ``device`` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgec.errors import SecretsError

FORMAT_VERSION = 1
MANIFEST_NAME = "secrets.json"
TOKEN_NAME = "token"
CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
DEVICES_DIR = "devices"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALIDITY_DAYS = 3650
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # not-before is back-dated: device clocks drift
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$"
)
_TOKEN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ClusterSecrets:
    """A cluster-secrets directory: paths to its files (nothing secret is held in memory)."""

    root: Path
    devices: tuple[str, ...]
    hosts: tuple[str, ...] = DEFAULT_HOSTS

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT_NAME

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY_NAME

    @property
    def token_path(self) -> Path:
        return self.root / TOKEN_NAME

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def token(self) -> str:
        """The shared token. Keep it out of logs, command lines and error messages."""
        try:
            token = self.token_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretsError(f"cannot read the cluster token {str(self.token_path)!r}") from exc
        if not _TOKEN.match(token):  # the message must not quote the file's content
            raise SecretsError(
                f"{str(self.token_path)!r} is not a cluster token (64 hex characters)"
            )
        return token

    def _device(self, device: str) -> str:
        if device not in self.devices:
            raise SecretsError(
                f"device {device!r} has no certificate in {str(self.root)!r} "
                f"(its devices: {', '.join(self.devices)}); add it with "
                f"`edgec cluster-secrets -o DIR --device ...` listing every device"
            )
        return device

    def cert(self, device: str) -> Path:
        """The device's certificate (PEM, signed by ``ca_cert``; SANs = the hosts)."""
        return self.root / DEVICES_DIR / f"{self._device(device)}.crt"

    def key(self, device: str) -> Path:
        """The device's EC P-384 private key (PEM, PKCS8, unencrypted)."""
        return self.root / DEVICES_DIR / f"{self._device(device)}.key"

    def public_key(self, device: str) -> Path:
        """The device key's public half, OpenSSH format (``ecdsa-sha2-nistp384 ...``)."""
        return self.root / DEVICES_DIR / f"{self._device(device)}.pub"

    def device_files(self, device: str) -> tuple[Path, ...]:
        """The files device ``device`` needs: the token, the CA certificate, its own cert,
        key and public key (never ``ca.key``)."""
        return (
            self.token_path,
            self.ca_cert,
            self.cert(device),
            self.key(device),
            self.public_key(device),
        )

    def files(self) -> tuple[Path, ...]:
        """Every file of the directory."""
        per_device = [
            p for d in self.devices for p in (self.cert(d), self.key(d), self.public_key(d))
        ]
        return (self.manifest_path, self.token_path, self.ca_cert, self.ca_key, *per_device)


def _check_devices(devices: Sequence[str]) -> tuple[str, ...]:
    names = tuple(devices)
    if not names:
        raise SecretsError("give at least one device (--device NAME)")
    for name in names:
        if not _DEVICE_NAME.match(name):
            raise SecretsError(
                f"device name {name!r} is not allowed: letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 63 characters"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SecretsError(f"device(s) {duplicates} given more than once")
    return names


def _san(host: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise SecretsError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(hosts))  # unique, in order
    if not names:
        raise SecretsError("give at least one host (--host IP or name) for the certificates")
    for host in names:
        _san(host)
    return names


def _write(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgec cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _make_ca(now: datetime.datetime, label: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(f"edgec cluster CA {label}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_device(
    device: str, hosts: tuple[str, ...], ca_key: Any, ca_cert: Any, now: datetime.datetime
) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(device))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # the same certificate serves (head, SuperLink) and connects (workers, SuperNodes):
        # Ray's gRPC TLS is mutual
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def create_cluster_secrets(
    out: Path,
    devices: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    force: bool = False,
) -> ClusterSecrets:
    """Write a new token, CA and one certificate per device into ``out`` (see the module doc).

    Refuses an existing ``out`` unless ``force`` (then it is replaced, only once the new
    secrets are complete)."""
    from cryptography.hazmat.primitives import serialization

    names = _check_devices(devices)
    host_names = _check_hosts(hosts)
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise SecretsError(
                f"{str(out)!r} exists; refusing to overwrite cluster secrets (--force replaces "
                "them, and every device then needs the new files)"
            )
        if not out.is_dir() or out.is_symlink():
            raise SecretsError(f"{str(out)!r} exists and is not a directory; not replacing it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise SecretsError(f"cannot create {str(out)!r}: {exc.strerror}") from exc
    try:
        os.chmod(staging, 0o700)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key, ca_cert = _make_ca(now, secrets.token_hex(4))
        _write(staging / TOKEN_NAME, (secrets.token_hex(32) + "\n").encode("ascii"))
        _write(staging / CA_KEY_NAME, _pem_key(ca_key))
        _write(staging / CA_CERT_NAME, ca_cert.public_bytes(serialization.Encoding.PEM))
        (staging / DEVICES_DIR).mkdir(mode=0o700)
        os.chmod(staging / DEVICES_DIR, 0o700)
        for device in names:
            key, cert = _make_device(device, host_names, ca_key, ca_cert, now)
            base = staging / DEVICES_DIR / device
            _write(base.with_suffix(".crt"), cert.public_bytes(serialization.Encoding.PEM))
            _write(base.with_suffix(".key"), _pem_key(key))
            openssh = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            _write(base.with_suffix(".pub"), openssh + f" edgec-{device}\n".encode())
        manifest = {
            "format": FORMAT_VERSION,
            "devices": list(names),
            "hosts": list(host_names),
            "created": now.isoformat(timespec="seconds"),
        }
        _write(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        if out.exists():  # --force: swap the complete new directory in, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rename(out, old / "secrets")
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SecretsError(f"cannot write cluster secrets to {str(out)!r}: {exc}") from exc
        raise
    return ClusterSecrets(out, names, host_names)


def _check_private(path: Path, *, directory: bool = False) -> None:
    """``path`` exists, is of the right kind, belongs to this user and nobody else can read it."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise SecretsError(f"cluster secrets: {str(path)!r} is missing") from None
    except OSError as exc:
        raise SecretsError(f"cluster secrets: cannot read {str(path)!r}: {exc.strerror}") from exc
    kind = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind:
        what = "a directory" if directory else "a regular file"
        raise SecretsError(f"cluster secrets: {str(path)!r} is not {what}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SecretsError(f"cluster secrets: {str(path)!r} belongs to another user")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        wanted = "0700" if directory else "0600"
        raise SecretsError(
            f"cluster secrets: {str(path)!r} has mode {mode:04o}: others may read it; "
            f"`chmod {wanted}` it (and check nobody copied it)"
        )


def _read_manifest(root: Path) -> ClusterSecrets:
    """The directory and its manifest, checked; the other files are not looked at yet."""
    _check_private(root, directory=True)
    manifest_path = root / MANIFEST_NAME
    _check_private(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        version = manifest["format"]
        names = tuple(manifest["devices"])
        hosts = tuple(manifest["hosts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SecretsError(
            f"cluster secrets: {str(manifest_path)!r} is not readable: {exc}"
        ) from exc
    if version != FORMAT_VERSION:
        raise SecretsError(
            f"cluster secrets: {str(manifest_path)!r} has format {version!r}; this edgec reads "
            f"format {FORMAT_VERSION}"
        )
    if not all(isinstance(n, str) for n in names + hosts):
        raise SecretsError(f"cluster secrets: {str(manifest_path)!r} lists a non-string name")
    return ClusterSecrets(root, _check_devices(names), _check_hosts(hosts))


def load_cluster_secrets(root: Path, device: str | None = None) -> ClusterSecrets:
    """Open and check a cluster-secrets directory: the manifest, the token's form, and that
    every file it should hold is there, a regular file of this user's and private (0600;
    directories 0700).

    Without ``device``, the directory as ``create_cluster_secrets`` made it: every device's
    files and ``ca.key``. With ``device``, a device's copy: the manifest, token, ``ca.crt`` and
    that device's files (``device_files``). Raises ``SecretsError`` naming the missing or bad
    file, or the unknown device."""
    result = _read_manifest(Path(root))
    _check_private(result.root / DEVICES_DIR, directory=True)
    if device is None:
        needed = list(result.files())
    else:
        needed = [result.manifest_path, *result.device_files(device)]
    for path in needed:
        _check_private(path)
    result.token()  # its form (never its content in a message)
    return result


def load_device_secrets(root: Path) -> tuple[ClusterSecrets, str]:
    """Open a directory as copied to a device (or as made, holding every device's files):
    returns the secrets, checked as ``load_cluster_secrets(root, device)`` does, and the
    device whose certificate is there (the first listed, where several are)."""
    secrets = _read_manifest(Path(root))
    for device in secrets.devices:
        if secrets.cert(device).exists() or secrets.key(device).exists():
            return load_cluster_secrets(secrets.root, device), device
    raise SecretsError(
        f"cluster secrets {str(secrets.root)!r} hold no device's certificate "
        f"({DEVICES_DIR}/NAME.crt for one of: {', '.join(secrets.devices)})"
    )
