"""Write a package atomically: build it in a staging folder beside the target, then swap it in.

A failed export leaves no partial package behind and never damages an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from edgec.runtimes.manifest import MANIFEST_NAME, MAX_INFLATED_BYTES, Manifest
from edgec.runtimes.package import inflated_size, is_compressed, sha256_file

from edgec.errors import ExportError, PackageError


def hash_files(root: Path, relatives: list[str]) -> dict[str, str]:
    """sha256 of each file under ``root``."""
    return {rel: sha256_file(root / rel) for rel in relatives}


def inflated_sizes(root: Path, relatives: list[str]) -> dict[str, int]:
    """What each compressed file among ``relatives`` inflates to: the limit the loader holds it
    to (``Manifest.inflated``)."""
    sizes = {}
    for relative in (r for r in relatives if is_compressed(r)):
        why = f" (no package file may inflate past {MAX_INFLATED_BYTES} bytes)"
        try:
            sizes[relative] = inflated_size(root / relative, MAX_INFLATED_BYTES, relative, why)
        except PackageError as exc:
            raise ExportError(str(exc)) from exc
    return sizes


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest`` into the package at ``root`` with the inflated size of each of its
    compressed files measured (the writer of every exporter, so every package records them);
    returns the manifest as written."""
    manifest = replace(manifest, inflated=inflated_sizes(root, list(manifest.files)))
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n"
    (root / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return manifest


@contextmanager
def staging(output: Path) -> Iterator[Path]:
    """Yield an empty folder to build the package in; on success it replaces ``output``.

    The folder sits beside ``output`` (same filesystem, so the final rename is atomic). On any
    exception it is removed and ``output`` is untouched.
    """
    output = output.resolve()
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {str(output)!r} exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; a package is an ordinary folder
    try:
        yield stage
        if not (stage / MANIFEST_NAME).is_file():
            raise ExportError("internal: package built without a manifest")
        _swap_in(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_in(stage: Path, output: Path) -> None:
    """Replace ``output`` with ``stage``; the old package is removed only after the swap."""
    if not output.exists():
        os.rename(stage, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.rename(output, old)
    try:
        os.rename(stage, output)
    except OSError:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)
