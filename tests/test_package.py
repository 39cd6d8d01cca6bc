"""Package verification: hashes, format version, paths that leave the package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


# --- issue 13: the package loader holds against hostile packages ---------------------------

TOKENIZER = "assets/tokenizer.json.gz"


def tiny_tokenizer_json(vocab_size: int = 200) -> str:
    """A WordPiece tokenizer.json over ``vocab_size`` ids (the tiny BERT's vocabulary size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + words + [f"w{i}" for i in range(vocab_size - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return str(tokenizer.to_str())


def make_text_package(source: Path, target: Path) -> Path:
    """``source`` (the tiny BERT package) with a gzipped tokenizer and text pre-processing,
    written by the package writer (so its manifest records the tokenizer's inflated size)."""
    import gzip
    from dataclasses import replace

    from edgec.exporters.package_writer import hash_files, write_manifest
    from edgec.runtimes.manifest import EmbeddingPostprocessing, TextPreprocessing

    root = Path(shutil.copytree(source, target))
    (root / "assets").mkdir()
    (root / TOKENIZER).write_bytes(gzip.compress(tiny_tokenizer_json().encode(), mtime=0))
    manifest = read_package(root).manifest
    pre = TextPreprocessing(tokenizer=TOKENIZER, max_length=16, token_type_ids="token_type_ids")
    post = EmbeddingPostprocessing(output="last_hidden_state")
    files = hash_files(root, [*manifest.files, TOKENIZER])
    write_manifest(root, replace(manifest, files=files, preprocessing=pre, postprocessing=post))
    return root


def rehash(package: Path, relative: str) -> None:
    """Record ``relative``'s present sha256 in the manifest, as an attacker who edits both
    would: in ``files`` and in any stage that runs it."""
    from edgec.runtimes.package import sha256_file

    digest = sha256_file(package / relative)

    def update(data):  # type: ignore[no-untyped-def]
        data["files"][relative] = digest
        for stage in data["stages"]:
            if stage["file"] == relative:
                stage["sha256"] = digest

    _edit_manifest(package, update)


def gzip_bomb(inflated: int, member: int = 1 << 20) -> bytes:
    """A gzip file of ``inflated`` zero bytes in members of ``member`` bytes (``gzip`` inflates
    every member): 1 GB takes 1 MB."""
    import gzip

    one = gzip.compress(bytes(member), compresslevel=9, mtime=0)
    return one * (inflated // member)


def peak_rss_delta(run) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """(``run()``'s result or the exception it raised, peak resident bytes above the resident
    size before it): the kernel's high-water mark is reset first (``/proc/self/clear_refs``)."""
    import re

    def status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    try:
        result: object = run()
    except Exception as exc:  # handed back to the caller to check
        result = exc
    return result, status("VmHWM") - before


@pytest.fixture(scope="module")
def text_package_source(bert_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_package(bert_package, tmp_path_factory.mktemp("text") / "pkg")


@pytest.fixture
def text_copy(text_package_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(text_package_source, tmp_path / "text"))


def _inspect(package: Path) -> Any:
    from click.testing import CliRunner

    from edgec.cli import cli

    return CliRunner().invoke(cli, ["inspect", str(package)])


def test_the_writer_records_what_the_tokenizer_inflates_to(text_copy):
    import gzip

    data = json.loads((text_copy / "manifest.json").read_text())
    inflated = len(gzip.decompress((text_copy / TOKENIZER).read_bytes()))
    assert data["inflated"] == {TOKENIZER: inflated}
    with load_package(text_copy) as runtime:  # and the package runs text
        assert runtime.embed(["a b c"]).shape == (1, 32)


# Row 1: a tokenizer that inflates to 1 GB, its hash updated to match.
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux memory counters")
def test_a_tokenizer_that_inflates_to_1_gb_stops_at_its_recorded_size(text_copy):
    import time

    recorded = json.loads((text_copy / "manifest.json").read_text())["inflated"][TOKENIZER]
    (text_copy / TOKENIZER).write_bytes(gzip_bomb(1 << 30))
    rehash(text_copy, TOKENIZER)
    start = time.perf_counter()
    error, peak = peak_rss_delta(lambda: load_package(text_copy))
    assert time.perf_counter() - start < 5
    assert isinstance(error, PackageError)
    assert f"'{TOKENIZER}' inflates past its limit of {recorded} bytes" in str(error)
    assert peak < 50 << 20  # it inflated 1 GB before (2.27 GB peak)
    result = _inspect(text_copy)
    assert result.exit_code == 5 and "inflates past" in result.output


def test_a_manifest_recording_no_size_gets_the_default_cap(text_copy):
    from edgec.runtimes.manifest import DEFAULT_INFLATED_LIMIT

    (text_copy / TOKENIZER).write_bytes(gzip_bomb(DEFAULT_INFLATED_LIMIT + (1 << 20)))
    rehash(text_copy, TOKENIZER)
    _edit_manifest(text_copy, lambda d: d.pop("inflated"))
    with pytest.raises(PackageError, match=rf"limit of {DEFAULT_INFLATED_LIMIT} bytes \(the def"):
        read_package(text_copy)


def test_a_recorded_size_beyond_the_ceiling_is_refused(text_copy):
    _edit_manifest(text_copy, lambda d: d["inflated"].update({TOKENIZER: 1 << 40}))
    with pytest.raises(PackageError, match=r"manifest.json.inflated\['assets/tokenizer"):
        read_package(text_copy)


def test_a_tokenizer_that_is_not_gzip_is_refused_at_load(text_copy):
    (text_copy / TOKENIZER).write_bytes(b"not gzip at all")
    rehash(text_copy, TOKENIZER)
    with pytest.raises(PackageError, match="is not a valid gzip file"):
        read_package(text_copy)


# Row 3: a tokenizer missing from ``files`` went unchecked, was signed, and loaded changed.
def _unlist_tokenizer(data):  # type: ignore[no-untyped-def]
    del data["files"][TOKENIZER]
    del data["inflated"][TOKENIZER]


def test_a_tokenizer_not_listed_in_files_is_refused_by_every_reader(text_copy, tmp_path):
    from click.testing import CliRunner
    from edgec.runtimes.signing import generate_keypair, sign_manifest

    from edgec.cli import cli

    _edit_manifest(text_copy, _unlist_tokenizer)
    message = rf"preprocessing tokenizer '{TOKENIZER}' not listed in the manifest's files"
    with pytest.raises(PackageError, match=message):
        read_package(text_copy)
    with pytest.raises(PackageError, match=message):
        load_package(text_copy)
    assert _inspect(text_copy).exit_code == 5
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    result = CliRunner().invoke(cli, ["sign", str(text_copy), "--key", str(tmp_path / "key.pem")])
    assert result.exit_code == 5 and "not listed" in result.output
    with pytest.raises(PackageError, match=message):  # the signing function checks on its own
        sign_manifest(text_copy, tmp_path / "key.pem")
    assert not (text_copy / "manifest.sig").exists()


def test_a_tokenizer_changed_after_signing_does_not_load_under_the_key(text_copy, tmp_path):
    import gzip

    from edgec.runtimes.signing import generate_keypair, sign_manifest

    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_manifest(text_copy, tmp_path / "key.pem")
    with load_package(text_copy, public_key=tmp_path / "key.pub") as runtime:
        assert runtime.text_encoder is not None
    changed = tiny_tokenizer_json().replace('"w1"', '"zz"').encode()
    (text_copy / TOKENIZER).write_bytes(gzip.compress(changed, mtime=0))
    with pytest.raises(PackageError, match=rf"'{TOKENIZER}' is corrupted"):
        load_package(text_copy, public_key=tmp_path / "key.pub")


def test_a_tokenizer_changed_after_loading_is_refused_when_first_used(text_copy):
    import gzip

    runtime = load_package(text_copy)  # the tokenizer loads on first use
    (text_copy / TOKENIZER).write_bytes(gzip.compress(b"{}", mtime=0))
    with pytest.raises(PackageError, match=rf"'{TOKENIZER}' is corrupted"):
        runtime.embed(["a b"])
    runtime.close()


# Row 6: a stage file onnxruntime cannot parse, its hash updated to match.
def test_a_garbage_stage_file_with_a_matching_hash_is_a_package_error(package_copy):
    from click.testing import CliRunner

    from edgec.cli import cli

    (package_copy / "model.onnx").write_bytes(b"\x00garbage" * 1000)
    rehash(package_copy, "model.onnx")
    with pytest.raises(PackageError, match=r"cannot load stage 'model' \('model\.onnx'\)"):
        load_package(package_copy)
    result = CliRunner().invoke(cli, ["run", str(package_copy), "--text", "hello"])
    assert result.exit_code == 5, result.output
    assert "stage 'model'" in result.output and "Traceback" not in result.output


# Row 7: a tokenizer path leaving the package.
@pytest.mark.parametrize("listed", [True, False])
def test_a_tokenizer_path_leaving_the_package_is_refused_by_inspect(text_copy, listed):
    import gzip

    outside = text_copy.parent / "outside.json.gz"
    outside.write_bytes(gzip.compress(tiny_tokenizer_json().encode()))

    def escape(data):  # type: ignore[no-untyped-def]
        data["preprocessing"]["tokenizer"] = "../outside.json.gz"
        if listed:
            from edgec.runtimes.package import sha256_file

            data["files"]["../outside.json.gz"] = sha256_file(outside)

    _edit_manifest(text_copy, escape)
    result = _inspect(text_copy)
    assert result.exit_code == 5
    assert "'../outside.json.gz' leaves the package directory" in result.output
    with pytest.raises(PackageError, match="leaves the package"):
        load_package(text_copy)


# Row 8: format_version of the wrong JSON type.
@pytest.mark.parametrize("version", [True, 1.0, "1", None, [1]])
def test_a_format_version_that_is_not_an_integer_is_refused(package_copy, version):
    _edit_manifest(package_copy, lambda d: d.update(format_version=version))
    message = r"format_version must be an integer, one of \[1\]"
    with pytest.raises(PackageError, match=message):
        read_package(package_copy)
    result = _inspect(package_copy)
    assert result.exit_code == 5 and "must be an integer" in result.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(name=7), r"manifest\.json\.name must be a string, got 7"),
        (lambda d: d.update(files=[]), r"manifest\.json\.files must be an object"),
        (lambda d: d["stages"][0].update(inputs="x"), r"stages\[0\]\.inputs must be a list"),
        (
            lambda d: d["stages"][0].update(memory_bytes=2**70),
            r"stages\[0\]\.memory_bytes must be an integer in int64 or null, got an integer",
        ),
        (lambda d: d["devices"][0].update(threads=1.5), r"devices\[0\]\.threads must be an int"),
        (lambda d: d["devices"][0].update(threads=10**6), r"threads must be 0\.\.1024"),
        (lambda d: d["inputs"][0].update(shape=[None]), r"inputs\[0\]\.shape\[0\] must be an"),
        (lambda d: d.update(preprocessing=[]), r"preprocessing must be an object or null"),
        (lambda d: d.update(stages=[]), r"stages is empty"),
        (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda d: d.pop("files"), r"manifest\.json lacks 'files'"),
        (lambda d: d["files"].update({"model.onnx": "abc"}), r"is not a sha256"),
        (lambda d: d["parity"].update(max_abs_error="big"), None),  # free-form: still loads
    ],
)
def test_fields_of_the_wrong_json_type_are_named(package_copy, edit, message):
    _edit_manifest(package_copy, edit)
    if message is None:
        read_package(package_copy)
        assert _inspect(package_copy).exit_code == 0
        return
    with pytest.raises(PackageError, match=message):
        read_package(package_copy)


def test_a_huge_integer_or_deep_nesting_in_the_manifest_is_a_package_error(package_copy):
    text = (package_copy / "manifest.json").read_text()
    path = package_copy / "manifest.json"
    path.write_text(text.replace('"threads": 0', '"threads": ' + "9" * 5000))
    with pytest.raises(PackageError, match="not valid JSON"):
        read_package(package_copy)
    path.write_text(text.replace('"edges": []', '"edges": ' + "[" * 100_000 + "]" * 100_000))
    with pytest.raises(PackageError, match="not valid JSON"):
        read_package(package_copy)


def test_a_weights_archive_that_inflates_or_overclaims_is_refused(package_copy):
    import io
    import zipfile

    import numpy as np

    def add_weights(content: bytes) -> None:
        (package_copy / "model.weights.npz").write_bytes(content)

        def list_it(data):  # type: ignore[no-untyped-def]
            data["stages"][0]["weights"] = "model.weights.npz"

        _edit_manifest(package_copy, list_it)
        rehash(package_copy, "model.weights.npz")

    buffer = io.BytesIO()
    np.savez_compressed(buffer, w=np.zeros(1 << 20, np.uint8))  # deflated: inflates 1 MB
    add_weights(buffer.getvalue())
    with pytest.raises(PackageError, match=r"member 'w\.npy' is compressed"):
        read_package(package_copy)
    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(16, np.uint8))
    with zipfile.ZipFile(buffer) as archive:
        member = archive.read("w.npy").replace(b"(16,)", b"(1000000000,)".ljust(5))
    claimed = io.BytesIO()
    with zipfile.ZipFile(claimed, "w") as archive:
        archive.writestr("w.npy", member)  # a header claiming 1 GB over 16 bytes
    add_weights(claimed.getvalue())
    with pytest.raises(PackageError, match="claims 1000000000 bytes of uint8"):
        read_package(package_copy)


def test_coded_weights_larger_than_their_weights_file_are_refused(package_copy):
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{"w.codes": np.zeros((2, 2), np.uint8)})
    (package_copy / "model.weights.npz").write_bytes(buffer.getvalue())

    def coded(data):  # type: ignore[no-untyped-def]
        data["stages"][0]["weights"] = "model.weights.npz"
        data["stages"][0]["coded"] = [
            {"name": "w", "shape": [100000, 100000], "dtype": "float32", "bits": 4}
        ]

    _edit_manifest(package_copy, coded)
    rehash(package_copy, "model.weights.npz")
    with pytest.raises(PackageError, match=r"coded weights need \d+ bytes of packed codes"):
        read_package(package_copy)


def test_every_manifest_field_has_a_json_form():
    """``Manifest.from_json`` checks each field by its annotation: a field added with a type the
    checker has no JSON form for must fail here, not at load time."""
    from dataclasses import fields
    from typing import get_type_hints

    from edgec.runtimes import manifest as m
    from edgec.runtimes.lowbit import CodedWeight

    from edgec.schema import describe

    classes = (
        m.Manifest,
        m.StageInfo,
        m.TensorInfo,
        m.DeviceInfo,
        m.TextPreprocessing,
        m.ImagePreprocessing,
        m.EmbeddingPostprocessing,
        m.ClassificationPostprocessing,
        CodedWeight,
    )
    for cls in classes:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name in ("preprocessing", "postprocessing", "extra") or hints[f.name] is Any:
                continue
            assert "any value" not in describe(hints[f.name]), (cls.__name__, f.name)
