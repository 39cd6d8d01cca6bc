"""Read and verify a package directory: manifest, format version, paths, hashes and sizes.

``check_package`` is the one verification: ``read_package`` (hence ``load_package`` and
``edgec inspect``) and ``edgec sign`` (``sign_manifest``) all run it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgec.runtimes.lowbit import row_bytes
from edgec.runtimes.manifest import (
    DEFAULT_INFLATED_LIMIT,
    MANIFEST_NAME,
    Manifest,
    TextPreprocessing,
)

from edgec.errors import PackageError

_CHUNK = (
    1 << 16
)  # below glibc's mmap threshold: 1 MB reads raised it and fragmented the heap (+4 MB resident)
MAX_MANIFEST_BYTES = 16 << 20  # a manifest of a many-stage package is tens of KB
COMPRESSED_SUFFIXES = (".gz",)  # files the runtime inflates; their inflated size is bounded


def new_sha256() -> Any:
    """A sha256 hasher from CPython's own implementation where it has one: hashlib's default,
    OpenSSL, adds about 3.5 MB resident to a device process (measured), and at package sizes
    the builtin's ~290 MB/s costs tens of milliseconds at load."""
    try:
        from _sha2 import sha256  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # CPython 3.10, 3.11
        except ImportError:  # other interpreters
            from hashlib import sha256
    return sha256()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = new_sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _q(name: object) -> str:
    """A name from the manifest, quoted for a message and cut short when long."""
    text = repr(name)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def is_compressed(relative: str) -> bool:
    """Whether the runtime inflates this package file (a gzipped tokenizer, say)."""
    return relative.endswith(COMPRESSED_SUFFIXES)


def inflated_chunks(path: Path, limit: int, name: str, why: str = "") -> Iterator[bytes]:
    """The inflated bytes of the gzip file ``path``, ``_CHUNK`` at a time; ``PackageError``
    naming the file (``name``) and ``limit`` (and ``why`` it is the limit) as soon as they pass
    ``limit`` bytes, so a bomb never inflates further, or when the file is not gzip. Members
    after the first count too, as ``gzip.decompress`` would inflate them."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise PackageError(
                        f"package file {_q(name)} inflates past its limit of {limit} bytes{why}"
                    )
                yield chunk
    except (OSError, EOFError, zlib.error) as exc:
        raise PackageError(f"package file {_q(name)} is not a valid gzip file: {exc}") from exc


def inflated_size(path: Path, limit: int, name: str, why: str = "") -> int:
    """Bytes the gzip file ``path`` inflates to, counted in chunks, at most ``limit``."""
    return sum(len(chunk) for chunk in inflated_chunks(path, limit, name, why))


def read_inflated(path: Path, limit: int, name: str, why: str = "") -> bytes:
    """The inflated content of the gzip file ``path``, refused past ``limit`` bytes."""
    return b"".join(inflated_chunks(path, limit, name, why))


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and paths that leave ``root``."""
    try:
        named = bool(relative) and "\x00" not in relative and bool(os.fsencode(relative))
    except (TypeError, UnicodeEncodeError):  # not a string; a lone surrogate such as \ud800
        named = False
    if not named:
        raise PackageError(f"manifest path {_q(relative)} is not a file name")
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")):
        raise PackageError(
            f"manifest path {_q(relative)} is absolute; packages hold relative paths"
        )
    try:
        resolved = (root / candidate).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise PackageError(f"manifest path {_q(relative)} cannot be resolved: {exc}") from exc
    if not resolved.is_relative_to(root.resolve()):
        raise PackageError(f"manifest path {_q(relative)} leaves the package directory")
    return resolved


@dataclass(frozen=True)
class Package:
    """A package on disk: its root and its manifest, ``verified`` when every file's sha256 and
    inflated size were checked."""

    root: Path
    manifest: Manifest
    verified: bool = True

    def path(self, relative: str) -> Path:
        return resolve_inside(self.root, relative)

    def inflated_limit(self, relative: str) -> tuple[int, str]:
        """The most bytes the compressed file ``relative`` may inflate to, and why."""
        if relative in self.manifest.inflated:
            return self.manifest.inflated[relative], " (the inflated size its manifest records)"
        return DEFAULT_INFLATED_LIMIT, " (the default for manifests that record no size)"

    def recheck(self, relative: str) -> Path:
        """``relative``'s path, its sha256 and inflated size checked again when the package was
        verified: for files read long after loading (the tokenizer, on first use)."""
        if self.verified:
            _check_file(self.root, relative, self.manifest.files[relative], self)
        return self.path(relative)


def referenced_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest names outside ``files``, with what names it."""
    named: dict[str, str] = {}
    for stage in manifest.stages:
        named.setdefault(stage.file, f"stage {_q(stage.name)} file")
        if stage.weights is not None:
            named.setdefault(stage.weights, f"stage {_q(stage.name)} weights file")
    if isinstance(manifest.preprocessing, TextPreprocessing):
        named.setdefault(manifest.preprocessing.tokenizer, "preprocessing tokenizer")
    for relative in manifest.inflated:
        named.setdefault(relative, "inflated size entry")
    return named


def check_package(root: Path, manifest: Manifest, *, verify: bool = True) -> Package:
    """Check ``manifest`` against the package at ``root``; the one check every reader runs.

    Every path stays inside the package; every file the manifest names (stage files, weights
    files, the tokenizer) is listed in ``files`` with its sha256, and a stage's own sha256
    agrees; every listed file exists; with ``verify``, its sha256 matches, a compressed file
    inflates to no more than its recorded size (``Manifest.inflated``, or the default cap), a
    weights archive holds uncompressed arrays no larger than its bytes, and coded weights fit
    their weights file.
    """
    for relative, digest in manifest.files.items():
        _check_sha256(digest, f"manifest files[{_q(relative)}]")
    for stage in manifest.stages:
        _check_sha256(stage.sha256, f"stage {_q(stage.name)} sha256")
    referenced = referenced_files(manifest)
    for relative, what in referenced.items():
        try:
            resolve_inside(root, relative)
        except PackageError as exc:
            raise PackageError(f"{what}: {exc}") from exc
    listed = manifest.files
    unlisted = {r: what for r, what in referenced.items() if r not in listed}
    if unlisted:
        named = ", ".join(f"{what} {_q(r)}" for r, what in unlisted.items())
        raise PackageError(
            f"{named} not listed in the manifest's files with a sha256: its content would go "
            "unchecked"
        )
    for stage in manifest.stages:
        if listed[stage.file] != stage.sha256:
            raise PackageError(
                f"stage {_q(stage.name)}: sha256 differs between stage and files list"
            )
        manifest.device(stage.device)  # every stage names a known device
    package = Package(root=root, manifest=manifest, verified=verify)
    for relative, expected in listed.items():
        if verify:
            _check_file(root, relative, expected, package)
        elif not _is_file(resolve_inside(root, relative), relative):
            raise PackageError(f"package file {_q(relative)} is missing")
    if verify:
        _check_coded_weights(package)
    return package


def _check_sha256(digest: str, what: str) -> None:
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise PackageError(f"{what} is not a sha256 (64 lowercase hex digits): {_q(digest)}")


def _is_file(path: Path, relative: str) -> bool:
    try:
        return path.is_file()
    except OSError as exc:
        raise PackageError(f"package file {_q(relative)} cannot be read: {exc.strerror}") from exc


def _check_file(root: Path, relative: str, expected: str, package: Package) -> None:
    """One listed file: inside the package, present, its sha256, its inflated size."""
    file = resolve_inside(root, relative)
    if not _is_file(file, relative):
        raise PackageError(f"package file {_q(relative)} is missing")
    try:
        digest = sha256_file(file)
    except OSError as exc:
        raise PackageError(f"package file {_q(relative)} cannot be read: {exc.strerror}") from exc
    if digest != expected:
        raise PackageError(
            f"package file {_q(relative)} is corrupted: its sha256 does not match the manifest"
        )
    if is_compressed(relative):
        limit, why = package.inflated_limit(relative)
        inflated_size(file, limit, relative, why)
    elif relative.endswith(".npz"):
        _check_archive(file, relative)


def _check_archive(path: Path, relative: str) -> None:
    """A weights file (``.npz``) as edgec writes it: stored members, each an array whose header
    claims no more bytes than the member holds, so that loading it allocates no more than the
    file's size and inflates nothing."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise PackageError(
                        f"weights file {_q(relative)}: member {info.filename!r} is compressed; "
                        "edgec writes weights files uncompressed (np.savez)"
                    )
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in readers:
                        raise PackageError(
                            f"weights file {_q(relative)}: array {info.filename!r} has .npy "
                            f"format {version}; edgec reads {sorted(readers)}"
                        )
                    shape, _, dtype = readers[version](member)
                    claimed = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or claimed > info.file_size:
                        raise PackageError(
                            f"weights file {_q(relative)}: array {info.filename!r} claims "
                            f"{claimed} bytes of {dtype} but its member holds {info.file_size}"
                        )
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise PackageError(f"weights file {_q(relative)} is not a valid .npz: {exc}") from exc


def _check_coded_weights(package: Package) -> None:
    """The packed codes of a stage's coded weights must fit in its weights file: the runtime
    allocates their decoded size before it reads them."""
    for stage in package.manifest.stages:
        if not stage.coded or stage.weights is None:
            continue
        needed = sum(w.rows * row_bytes(w.cols, w.bits) for w in stage.coded)
        size = package.path(stage.weights).stat().st_size
        if needed > size:
            raise PackageError(
                f"stage {_q(stage.name)}: its coded weights need {needed} bytes of packed codes "
                f"but weights file {stage.weights!r} holds {size}"
            )


def read_manifest(root: Path, raw: bytes | None = None) -> Manifest:
    """Parse ``root/manifest.json`` (or its already-read bytes ``raw``) without checking files."""
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise PackageError(f"package {str(root)!r} is not a directory")
    if raw is None:
        raw = read_manifest_bytes(root)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{manifest_path}: {len(raw)} bytes, above {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer longer than Python converts (4,300 digits)
        raise PackageError(f"{manifest_path}: not valid JSON ({exc})") from exc
    return Manifest.from_json(data)


def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of ``root/manifest.json``, refused above ``MAX_MANIFEST_BYTES``."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(f"package {str(root)!r} has no {MANIFEST_NAME}")
    with open(manifest_path, "rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes")
    return raw


def read_package(
    path: str | Path, *, verify: bool = True, public_key: str | Path | None = None
) -> Package:
    """Load a package's manifest and check it (``check_package``).

    Checks the format version and the manifest's fields, that every path stays inside the
    package, that every file the manifest names is listed in ``files``, and (``verify``) every
    file's sha256 and inflated size. With ``public_key``, the manifest must first carry a valid
    Ed25519 signature by that key (``SignatureError``).
    """
    root = Path(path)
    raw = None
    if public_key is not None:
        if not root.is_dir():
            raise PackageError(f"package {str(root)!r} is not a directory")
        from edgec.runtimes.signing import verify_manifest

        raw = verify_manifest(root, Path(public_key))  # parse the very bytes that verified
    return check_package(root, read_manifest(root, raw), verify=verify)
