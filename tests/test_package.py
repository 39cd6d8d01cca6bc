"""Package verification: hashes, format version, paths that leave the package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edgec.runtimes import load_package, read_package

from edgec.errors import PackageError


@pytest.fixture
def package_copy(bert_package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bert_package, tmp_path / "pkg"))


def _edit_manifest(package: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = package / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_one_flipped_byte_is_refused_naming_the_file(package_copy):
    onnx_file = package_copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"'model\.onnx' is corrupted"):
        load_package(package_copy)


def test_a_path_leaving_the_package_is_refused(package_copy):
    def escape(data):
        data["stages"][0]["file"] = "../x"
        data["files"] = {"../x": data["stages"][0]["sha256"]}

    _edit_manifest(package_copy, escape)
    with pytest.raises(PackageError, match=r"'\.\./x' leaves the package"):
        read_package(package_copy)


def test_an_absolute_path_is_refused(package_copy):
    def absolute(data):
        data["files"]["/etc/passwd"] = "0" * 64

    _edit_manifest(package_copy, absolute)
    with pytest.raises(PackageError, match="absolute"):
        read_package(package_copy)


def test_an_unknown_format_version_is_refused(package_copy):
    _edit_manifest(package_copy, lambda d: d.update(format_version=99))
    with pytest.raises(PackageError, match="format_version 99 is not supported"):
        read_package(package_copy)


def test_a_missing_file_is_named(package_copy):
    (package_copy / "model.onnx").unlink()
    with pytest.raises(PackageError, match=r"'model\.onnx' is missing"):
        read_package(package_copy)


def test_invalid_manifest_json(package_copy):
    (package_copy / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        read_package(package_copy)


def test_an_intact_package_round_trips(bert_package):
    package = read_package(bert_package)
    assert package.manifest.to_json() == json.loads((bert_package / "manifest.json").read_text())
