"""The CLI: thin over the API, one-line errors with distinct exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from conftest import run_edgec

REPO = Path(__file__).resolve().parents[1]


edgec = run_edgec  # in process: the CLI maps errors to exit codes itself


def test_export_run_inspect(tiny_models, tmp_path):
    package = tmp_path / "pkg"
    result = edgec("export", str(tiny_models["bert"]), "-o", str(package), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parity"]["max_abs_error"] <= 1e-4

    ids = np.ones((1, 4), dtype=np.int64)
    np.savez(tmp_path / "feeds.npz", input_ids=ids, attention_mask=ids, token_type_ids=0 * ids)
    result = edgec("run", str(package), "--input", str(tmp_path / "feeds.npz"), "--json")
    assert result.returncode == 0, result.stderr
    assert np.array(json.loads(result.stdout)["last_hidden_state"]).shape == (1, 4, 32)

    result = edgec("inspect", str(package))
    assert result.returncode == 0
    assert "last_hidden_state" in result.stdout and "model.onnx" in result.stdout
    # the stage's predicted memory: the session's own ~19 MB dominate a model this small
    predicted = json.loads(edgec("inspect", str(package), "--json").stdout)["stages"][0]
    assert 19e6 <= predicted["memory_bytes"] < 30e6
    assert re.search(r"memory \(predicted\)", result.stdout)
    assert re.search(r"model\.onnx\s+[\d.]+ [KM]B\s+[\d.]+ MB", result.stdout), result.stdout


def _one_line_error(result: Any, code: int, pattern: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert re.search(pattern, lines[-1]), lines
    assert "Traceback" not in result.stderr


def test_unknown_model_name(tmp_path):
    result = edgec("export", "no-such-model", "-o", str(tmp_path / "p"))
    _one_line_error(result, 2, "neither a built-in name")


def test_missing_package(tmp_path):
    _one_line_error(edgec("run", str(tmp_path / "nope"), "--text", "hi"), 5, "not a directory")


def test_corrupted_package(bert_package, tmp_path):
    import shutil

    copy = Path(shutil.copytree(bert_package, tmp_path / "pkg"))
    (copy / "model.onnx").write_bytes(b"garbage")
    _one_line_error(edgec("inspect", str(copy)), 5, "model.onnx.* corrupted")


def test_wrong_input_name(bert_package, tmp_path):
    np.savez(tmp_path / "feeds.npz", tokens=np.ones((1, 4), dtype=np.int64))
    result = edgec("run", str(bert_package), "--input", str(tmp_path / "feeds.npz"))
    _one_line_error(result, 6, r"unknown input\(s\) \['tokens'\]")


def test_wrong_dtype(bert_package, tmp_path):
    ids = np.ones((1, 4), dtype=np.float32)
    np.savez(tmp_path / "feeds.npz", input_ids=ids, attention_mask=ids, token_type_ids=ids)
    result = edgec("run", str(bert_package), "--input", str(tmp_path / "feeds.npz"))
    _one_line_error(result, 6, "must be int64, got float32")


def test_text_on_a_package_without_a_tokenizer(bert_package):
    result = edgec("run", str(bert_package), "--text", "hello")
    _one_line_error(result, 6, "carries no pre-processing|not an embedding")


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command.strip() in ci


def test_memory_measures_a_fresh_process_and_names_a_bad_shape(bert_package):
    result = edgec("memory", str(bert_package), "--shape", "2x8", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures["run_peak"]) == {"2x8"}
    assert figures["bare_baseline"] < figures["baseline"] <= figures["load_peak"]
    assert figures["peak"] == max(figures["load_peak"], figures["run_peak"]["2x8"])
    assert (
        figures["predicted"]
        == json.loads(edgec("inspect", str(bert_package), "--json").stdout)["stages"][0][
            "memory_bytes"
        ]
    )
    bad = edgec("memory", str(bert_package), "--shape", "2by8")
    assert bad.returncode == 2 and "BATCHxSEQUENCE" in bad.stderr
