"""Ed25519 signatures over a package's manifest.

The manifest lists every file with its sha256, so a valid signature over its bytes, followed by
the loader's hash checks, vouches for the whole package. The signature lives beside the manifest
in ``manifest.sig`` (base64 text), outside the manifest it signs.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from edgec.runtimes.manifest import MANIFEST_NAME
from edgec.runtimes.package import check_package, read_manifest, read_manifest_bytes

from edgec.errors import SignatureError

SIGNATURE_NAME = "manifest.sig"
_MAX_SIGNATURE_CHARS = 1024  # an Ed25519 signature is 88 characters of base64


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM: the private key (mode 0600) and the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{str(path)!r} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.touch(mode=0o600)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)


def _load_key(path: Path, *, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read {what} key {str(path)!r}: {exc.strerror}") from exc
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{str(path)!r} is not a PEM {what} key: {exc}") from exc
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):
        raise SignatureError(f"{str(path)!r} is not an Ed25519 {what} key")
    return key


def sign_manifest(package: Path, private_key: Path) -> Path:
    """Sign ``package/manifest.json`` with ``private_key``; returns the signature file's path.

    Only an intact package is signed: the very bytes signed pass the checks every reader runs
    (``check_package``: fields, paths, every named file listed, sha256s, inflated sizes), so a
    signature never vouches for a file the manifest leaves unchecked.
    """
    key = _load_key(private_key, private=True)
    root = Path(package)
    manifest = read_manifest_bytes(root)
    check_package(root, read_manifest(root, manifest))
    signature = key.sign(manifest)
    target = Path(package) / SIGNATURE_NAME
    target.write_text(base64.b64encode(signature).decode("ascii") + "\n", encoding="ascii")
    return target


def verify_manifest(package: Path, public_key: Path) -> bytes:
    """The manifest's bytes, once its signature verifies against ``public_key``.

    Raises ``SignatureError`` naming what failed: no signature, a malformed one, or one that does
    not match (the manifest changed after signing, or another key signed it).
    """
    root = Path(package)
    key = _load_key(public_key, private=False)
    signature_path = root / SIGNATURE_NAME
    if not signature_path.is_file():
        raise SignatureError(f"package {str(root)!r} is unsigned: it has no {SIGNATURE_NAME}")
    with open(signature_path, "rb") as fh:
        text = fh.read(_MAX_SIGNATURE_CHARS + 1)
    if len(text) > _MAX_SIGNATURE_CHARS:
        raise SignatureError(f"{SIGNATURE_NAME} of {str(root)!r} is too long to be a signature")
    try:
        signature = base64.b64decode(text.decode("ascii"), validate=False)
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise SignatureError(f"{SIGNATURE_NAME} of {str(root)!r} is not base64: {exc}") from exc
    if not (root / MANIFEST_NAME).is_file():
        raise SignatureError(f"package {str(root)!r} has no {MANIFEST_NAME} to verify")
    manifest = read_manifest_bytes(root)  # bounded: a huge file is refused before it is read
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, manifest)
    except InvalidSignature as exc:
        raise SignatureError(
            f"package {str(root)!r}: {MANIFEST_NAME} does not match its signature under "
            f"{str(public_key)!r} (changed after signing, or signed by another key)"
        ) from exc
    return manifest
