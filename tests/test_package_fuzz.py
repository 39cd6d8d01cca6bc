"""Fuzzing the package loader: hypothesis mutates a small text package's manifest and files.

Whatever the mutation, ``read_package``, ``load_package`` and ``edgec inspect`` either succeed
or refuse with ``PackageError`` (``SignatureError`` is one; exit 5 or 10), never another
exception, and the process's peak memory stays bounded over the whole run.

The examples are derandomized (the same every run, so CI never fails on a new draw);
``EDGEC_FUZZ_SCALE=20`` runs twenty times as many, drawn afresh, for a longer hunt.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from edgec.runtimes import load_package, read_package
from edgec.runtimes.package import sha256_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_package import TOKENIZER, make_text_package

from edgec.cli import cli
from edgec.errors import DeviceError, PackageError

SCALE = int(os.environ.get("EDGEC_FUZZ_SCALE", "1"))
FUZZ = settings(
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PEAK_LIMIT = 200 << 20  # bytes of peak resident memory above the start, over a whole test

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="Linux memory counters"
)


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


@pytest.fixture
def bounded_peak() -> Iterator[None]:
    """Fail the test when its peak resident memory passes ``PEAK_LIMIT`` above its start."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark (VmHWM)
    before = _status("VmRSS")
    yield
    peak = _status("VmHWM") - before
    assert peak < PEAK_LIMIT, f"peak resident memory rose {peak / 2**20:.0f} MB over the run"


@pytest.fixture(scope="module")
def source(bert_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT package with a gzipped tokenizer: every kind of file a package holds."""
    return make_text_package(bert_package, tmp_path_factory.mktemp("fuzz") / "pkg")


# --- what the loader is fed -----------------------------------------------------------------

# Strings a hostile manifest holds: traversal, absolute and odd paths, control characters,
# a lone surrogate, very long ones.
ODD_STRINGS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../outside.json.gz",
        "../../etc/passwd",
        "/etc/passwd",
        "\\\\server\\share",
        "assets/../../x",
        "assets/",
        "model.onnx\x00.txt",
        "\ud800",
        "\u202emodel.onnx",
        "manifest.json",
        "manifest.sig",
        "a" * 5000,
        "/" * 300,
        "NaN",
        "true",
    ]
) | st.text(max_size=30)
HUGE_NUMBERS = st.sampled_from([2**63, -(2**63) - 1, 10**30, -1, 0, 2**31, 1e308, -0.0, 1.5])
SCALARS = st.none() | st.booleans() | HUGE_NUMBERS | st.integers() | st.floats() | ODD_STRINGS
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_STRINGS, inner, max_size=3),
    max_leaves=6,
)
# Raw JSON text in place of a value: what json.dumps never writes.
RAW_VALUES = st.sampled_from(
    ["9" * 5000, "1e999", "-1e999", "NaN", "Infinity", "[" * 50_000 + "]" * 50_000, '"\\ud800"']
)
_RAW = "\x00edgec-raw\x00"


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a parsed JSON tree, the root's children first."""
    if not isinstance(node, dict | list):
        return []
    found: list[tuple[Any, ...]] = []
    for key, child in node.items() if isinstance(node, dict) else enumerate(node):
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


@st.composite
def manifest_texts(draw: st.DrawFn, base: dict[str, Any]) -> str:
    """``base`` as JSON text after one to three mutations: a key dropped, a value replaced (by
    odd JSON, or by raw text no encoder writes), an unknown key added, a path made to escape."""
    data = copy.deepcopy(base)
    raw = None
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["drop", "replace", "replace", "raw", "add", "path"]))
        if action == "drop":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "raw" and raw is None:
            raw = draw(RAW_VALUES)
            parent[key] = _RAW
        elif action == "add" and isinstance(parent, dict):
            parent[draw(ODD_STRINGS)] = draw(JSON_VALUES)
        elif action == "path":
            parent[key] = draw(ODD_STRINGS)
    text = json.dumps(data)
    return text if raw is None else text.replace(json.dumps(_RAW), raw, 1)


def _checked(call: Any) -> Any:
    """``call()``'s result, or None when it refused with a PackageError."""
    try:
        return call()
    except PackageError:
        return None


def _inspect(package: Path) -> int:
    """``edgec inspect`` in this process: its exit code, 0 or 5 (10 for a signature)."""
    result = CliRunner().invoke(cli, ["inspect", str(package)])
    assert result.exit_code in (0, 5, 10), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"inspect raised {result.exception!r}\n{result.output}"
    )
    return int(result.exit_code)


def _load(package: Path) -> None:
    """``load_package`` and the first use of the tokenizer: success or PackageError. A device
    whose providers this onnxruntime lacks is a DeviceError by design (the package may suit
    another device): only a fuzzed ``providers`` list may cause it."""
    try:
        with load_package(package) as runtime:
            runtime.text_encoder  # noqa: B018 - the tokenizer loads on first use
    except PackageError:
        pass
    except DeviceError as exc:
        assert "asks for providers" in str(exc), exc


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgec-fuzz-") as tmp:
        yield Path(tmp)


def _fresh(source: Path, scratch: Path) -> Path:
    target = scratch / "pkg"
    shutil.rmtree(target, ignore_errors=True)
    return Path(shutil.copytree(source, target))


# --- the fuzz tests ---------------------------------------------------------------------------


@needs_proc
def test_mutated_manifests_load_or_raise_a_package_error(source, scratch, bounded_peak):
    base = json.loads((source / "manifest.json").read_text())

    @settings(FUZZ, max_examples=400 * SCALE)
    @given(text=manifest_texts(base))
    def fuzz(text: str) -> None:
        package = _fresh(source, scratch)
        (package / "manifest.json").write_text(text, encoding="utf-8")
        verified = _checked(lambda: read_package(package))
        code = _inspect(package)
        assert (code == 0) == (verified is not None)  # inspect runs read_package's checks
        if verified is not None:
            _load(package)

    fuzz()


FILES = ("model.onnx", TOKENIZER, "manifest.json")


@st.composite
def file_mutations(draw: st.DrawFn) -> tuple[str, str, bytes | int | list[int], bool]:
    """(file, how, with what, whether the manifest's hash is updated to match)."""
    name = draw(st.sampled_from(FILES))
    how = draw(st.sampled_from(["truncate", "garbage", "flip", "append", "bomb", "retokenize"]))
    what: bytes | int | list[int]
    if how == "truncate":
        what = draw(st.integers(0, 4096))
    elif how == "flip":
        # the graph's nodes lie at the head of an ONNX file, its inputs and outputs at the tail,
        # the weights between (where most flips land and change numbers only)
        position = st.integers(0, 4095) | st.integers(-4096, -1) | st.integers(0, 2**31)
        what = draw(st.lists(position, min_size=1, max_size=8))
    elif how == "bomb":
        what = draw(st.sampled_from([1 << 20, 64 << 20, 1 << 30]))
    else:
        what = draw(st.binary(max_size=512))
    # a bomb comes with its hash (else the hash alone refuses it); the manifest has none
    rehashed = name != "manifest.json" and (how == "bomb" or draw(st.booleans()))
    return name, how, what, rehashed


def _mutate_file(package: Path, name: str, how: str, what: Any) -> None:
    path = package / name
    data = path.read_bytes()
    if how == "truncate":
        data = data[: what % max(1, len(data))]
    elif how == "garbage":
        data = what
    elif how == "flip":
        flipped = bytearray(data)
        for position in what:
            flipped[position % len(flipped)] ^= 1 << (position % 8)
        data = bytes(flipped)
    elif how == "append":
        data = data + what
    elif how == "bomb":
        member = gzip.compress(bytes(1 << 20), mtime=0)
        data = member * (what >> 20)
    elif how == "retokenize" and name == TOKENIZER:  # valid gzip, odd content
        data = gzip.compress(what, mtime=0)
    path.write_bytes(data)


def _rehash(package: Path, name: str) -> None:
    manifest = package / "manifest.json"
    data = json.loads(manifest.read_text())
    digest = sha256_file(package / name)
    data["files"][name] = digest
    for stage in data["stages"]:
        if stage["file"] == name:
            stage["sha256"] = digest
    manifest.write_text(json.dumps(data))


@needs_proc
def test_mutated_files_load_or_raise_a_package_error(source, scratch, bounded_peak):
    @settings(FUZZ, max_examples=150 * SCALE)
    @given(mutation=file_mutations())
    def fuzz(mutation: tuple[str, str, Any, bool]) -> None:
        name, how, what, rehashed = mutation
        package = _fresh(source, scratch)
        _mutate_file(package, name, how, what)
        if rehashed:
            _rehash(package, name)
        verified = _checked(lambda: read_package(package))
        assert (_inspect(package) == 0) == (verified is not None)
        _load(package)
        if not rehashed and name != "manifest.json" and how != "retokenize":
            assert verified is None or (package / name).read_bytes() == (source / name).read_bytes()

    fuzz()
