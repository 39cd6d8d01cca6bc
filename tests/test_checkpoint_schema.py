"""``checkpoint.json`` against its schema: every bad field named, never a traceback.

A checkpoint is a folder a user hands to ``edgec export`` (or to another tool in CI): its JSON
is checked by the annotations of ``edgec.models.checkpoint.CheckpointRecord`` before anything
is built from it, and a file name in it may not leave the folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import run_edgec
from edgec.models.checkpoint import CHECKPOINT_FILE, read_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgec.errors import SourceError


@pytest.fixture(scope="module")
def good_meta(compressed_bert: tuple[Path, Path]) -> dict[str, Any]:
    ckpt, _ = compressed_bert
    return json.loads((ckpt / CHECKPOINT_FILE).read_text(encoding="utf-8"))


def _write(root: Path, meta: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / CHECKPOINT_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return root


def _set(meta: dict[str, Any], path: str | tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(meta)
    *parents, last = path.split(".") if isinstance(path, str) else path
    node = changed
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return changed


def test_the_checkpoints_compress_writes_pass(compressed_bert):
    meta = read_checkpoint(compressed_bert[0])
    assert meta["kind"] == "edgec-checkpoint"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format_version", True, r"has format_version True; this edgec reads \[1\]"),
        ("format_version", 1.0, r"has format_version 1.0"),
        ("kind", "edgec-package", r"\.kind must be one of \['edgec-checkpoint'\], got 'edgec-"),
        ("shapes.heads", [2, "four"], r"\.shapes\.heads\[1\] must be an integer in int64"),
        (
            "shapes.ffn.0",
            2**70,
            r"\.shapes\.ffn\[0\] must be an integer in int64, got an integer of 71 bits",
        ),
        ("weights", "../../outside.safetensors", r"\.weights must be a path inside"),
        ("weights", "/etc/passwd", r"\.weights must be a path inside"),
        ("spec.assets", ["../tokenizer.json"], r"\.spec\.assets\[0\] must be a path inside"),
        ("spec.inputs.0.dtype", 7, r"\.spec\.inputs\[0\]\.dtype must be a string"),
        ("spec.task", "\ud800", r"\.spec\.task holds '\\ud800' at character 0, a lone surrogate"),
        ("spec.postprocessing", {"kind": "poetry"}, r"postprocessing\.kind is 'poetry'; known"),
        ("storage.shared_bits", {"x": "four"}, r"\.storage\.shared_bits\['x'\] must be an int"),
        ("storage.int8", "all", r"\.storage\.int8 must be a list \(of a string\), got 'all'"),
        ("recipe", {"steps": [{"quantize": {"mode": "fast"}}]}, r"\.recipe: .*mode.*'fast'"),
        ("config", [], r"\.config must be an object, got \[\]"),
    ],
)
def test_a_bad_field_is_named(good_meta, tmp_path, path, value, message):
    root = _write(tmp_path / "ckpt", _set(good_meta, path, value))
    with pytest.raises(SourceError, match=message):
        read_checkpoint(root)


def test_a_missing_field_and_unknown_keys(good_meta, tmp_path):
    broken = copy.deepcopy(good_meta)
    del broken["shapes"]
    with pytest.raises(SourceError, match=r"checkpoint\.json lacks 'shapes'"):
        read_checkpoint(_write(tmp_path / "a", broken))
    # a newer edgec's record of its steps is kept and ignored; the fields here stay checked
    newer = {**good_meta, "federated": {"rounds": 3}}
    assert read_checkpoint(_write(tmp_path / "b", newer))["federated"] == {"rounds": 3}
    with pytest.raises(SourceError, match=r"\.spec has unknown keys \['colour'\]"):
        read_checkpoint(_write(tmp_path / "c", _set(good_meta, "spec.colour", "red")))


def test_export_of_a_bad_checkpoint_is_one_line_and_exit_2(compressed_bert, good_meta, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(compressed_bert[0], root)
    _write(root, _set(good_meta, "weights", "../escape.safetensors"))
    result = run_edgec("export", str(root), "-o", str(tmp_path / "pkg"))
    assert result.returncode == 2, result.stderr
    assert "weights must be a path inside the checkpoint" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "pkg").exists()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        path = (*prefix, key)
        found.append(path)
        found.extend(_paths(value, path))
    return found


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_checkpoints_only_raise_source_errors(good_meta, tmp_path, data):
    """Any field replaced by any JSON value, or removed: loads, or ``SourceError``."""
    paths = [p for p in _paths(good_meta) if p[0] != "config" or len(p) == 1]
    path = data.draw(st.sampled_from(paths))
    meta = copy.deepcopy(good_meta)
    if data.draw(st.booleans()):
        meta = _set(meta, path, data.draw(JSON))
    else:
        *parents, last = path
        node = meta
        for key in parents:
            node = node[key]
        del node[last]
    root = _write(tmp_path / "fuzz", meta)
    with contextlib.suppress(SourceError):
        read_checkpoint(root)
