"""The device commands: plan, export --devices, partition, profile-device, join, run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import run_edgec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


edgec = run_edgec  # in process: the CLI maps errors to exit codes itself


def _fast_pair(tmp_path: Path, memory_mb: float | None = None) -> Path:
    devices = {
        "devices": [
            {"name": "a", "threads": 1, "memory_mb": memory_mb},
            {"name": "b", "threads": 1, "memory_mb": memory_mb},
        ],
        "links": [{"between": ["a", "b"], "bandwidth_mbps": 100000, "latency_ms": 0}],
    }
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(devices))
    return path


def test_plan_prints_stages_cuts_and_predictions(bert_package, tmp_path):
    result = edgec(
        "plan",
        str(bert_package),
        "--devices",
        str(_fast_pair(tmp_path)),
        "--strategy",
        "pipeline",
        "--save",
        str(tmp_path / "plan.json"),
    )
    assert result.returncode == 0, result.stderr
    for word in ("stage0", "stage1", "GFLOP", "params", "tensors", "bytes", "predicted:"):
        assert word in result.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["strategy"] == "pipeline" and len(saved["stages"]) == 2
    assert not (tmp_path / "stages").exists()  # plan writes no package
    result = edgec(
        "plan",
        str(bert_package),
        "--devices",
        str(_fast_pair(tmp_path)),
        "--strategy",
        "data",
        "--diff",
        str(tmp_path / "plan.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "strategy: pipeline -> data" in result.stdout


def test_export_with_devices_writes_a_partitioned_package(tiny_models, tmp_path):
    package = tmp_path / "pkg"
    result = edgec(
        "export",
        str(tiny_models["bert"]),
        "-o",
        str(package),
        "--devices",
        str(_fast_pair(tmp_path)),
        "--strategy",
        "pipeline",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["strategy"] == "pipeline"
    assert sorted(s["device"] for s in manifest["stages"]) == ["a", "b"]
    assert manifest["parity"]["partition_max_abs_error"] <= 1e-5
    assert not (package / "model.onnx").exists()
    ids = np.ones((2, 4), dtype=np.int64)
    np.savez(tmp_path / "feeds.npz", input_ids=ids, attention_mask=ids, token_type_ids=0 * ids)
    run = edgec("run", str(package), "--input", str(tmp_path / "feeds.npz"), "--json")
    assert run.returncode == 0, run.stderr
    assert np.array(json.loads(run.stdout)["last_hidden_state"]).shape == (2, 4, 32)


def test_partition_an_existing_package_and_a_budget_error(bert_package, tmp_path):
    result = edgec(
        "partition",
        str(bert_package),
        "-o",
        str(tmp_path / "data"),
        "--devices",
        str(_fast_pair(tmp_path)),
        "--strategy",
        "data",
    )
    assert result.returncode == 0, result.stderr
    assert "max abs error" in result.stdout
    tiny = _fast_pair(tmp_path, memory_mb=0.01)
    result = edgec(
        "partition",
        str(bert_package),
        "-o",
        str(tmp_path / "x"),
        "--devices",
        str(tiny),
        "--strategy",
        "pipeline",
    )
    assert result.returncode == 8
    assert result.stderr.startswith("error: no pipeline plan fits the memory budgets (a 10.0 KB")
    assert "bytes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_profile_device_writes_a_profile_plans_accept(tmp_path):
    result = edgec(
        "profile-device", "-o", str(tmp_path / "me.yaml"), "--name", "me", "--memory-mb", "512"
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load((tmp_path / "me.yaml").read_text())
    device = data["devices"][0]
    assert device["name"] == "me" and device["threads"] == 1 and device["memory_mb"] == 512
    assert (
        device["gflops_fp32"] > 0
        and device["gops_int8"] > 0
        and len(device["matmul_fp32_curve"]) == 4
    )


def test_join_wraps_ray_start():
    result = edgec(
        "join", "--device", "board-b", "--address", "10.0.0.2:6379", "--dry-run", "--insecure"
    )
    assert result.returncode == 0
    assert (
        result.stdout.strip()
        == 'ray start --resources={"device:board-b": 1} --address=10.0.0.2:6379'
    )
    result = edgec("join", "--device", "board-b")
    assert result.returncode != 0 and "--address" in result.stderr
