"""Compressed packages split like any other: int8 and weight-shared graphs, memory-aware plans,
saved plans that reproduce a split, and cuts that carry activations only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgec.exporters.partition import partition_package, planning_feeds
from edgec.runtimes import load_package, read_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link, load_devices

from edgec.cli import cli as main

BOARDS = Path(__file__).parents[1] / "examples" / "two-boards.yaml"
EQUAL = DeviceSet(
    (
        DeviceProfile("board-a", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
        DeviceProfile("board-b", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
    ),
    (Link(("board-a", "board-b"), bandwidth_mbps=100_000, latency_ms=0.0),),
)


def _run(package: Path, batch: int, sequence: int) -> dict[str, np.ndarray]:
    runtime = load_package(package)
    feeds = planning_feeds(runtime.manifest.inputs, batch, sequence)
    feeds["input_ids"] = np.arange(batch * sequence).reshape(batch, sequence) % 150 + 1
    return runtime.run(feeds)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("strategy", ["pipeline", "data", "heads"])
def test_a_pruned_shared_int8_package_splits(strategy, compressed_bert, tmp_path):
    """Pruned heads, smoothing, 4-bit shared Linears decoded at load, dynamic int8."""
    _, package = compressed_bert
    source = read_package(package).manifest.stages[0]
    assert source.coded and source.contrib_ops
    result = partition_package(package, tmp_path / "split", EQUAL, strategy)
    assert result.tolerance is not None and result.tolerance.holds(
        result.max_abs_error, result.min_cosine
    )
    if strategy == "pipeline":  # the same operators on the same tensors: exact
        assert result.max_abs_error == 0.0
    else:  # dynamic int8 rounds each slice (or batch part) by its own range
        assert result.tolerance.min_cosine is not None
        assert "dynamic int8" in result.tolerance.why
    manifest = result.manifest
    for stage in manifest.stages:
        if stage.coded:  # each stage holds the codes of its own weights, never decoded ones
            assert stage.weights in manifest.files
            proto = onnx.load(str(tmp_path / "split" / stage.file), load_external_data=False)
            names = {i.name for i in proto.graph.initializer}
            assert {c.name for c in stage.coded} <= names
    assert any(s.coded for s in manifest.stages)
    whole, split = _run(package, 2, 12), _run(tmp_path / "split", 2, 12)
    for name, expected in whole.items():
        if result.tolerance.min_cosine is None:
            assert float(np.abs(split[name] - expected).max()) <= 1e-5
        else:
            assert _min_cosine(split[name], expected) >= result.tolerance.min_cosine


def test_int8_heads_slices_cut_scales_and_biases_with_the_weights(compressed_bert, tmp_path):
    _, package = compressed_bert
    result = partition_package(package, tmp_path / "split", EQUAL, "heads")
    sliced = [s for s in result.plan.stages if s.slice is not None]
    assert {s.slice.kind for s in sliced} == {"attention", "ffn"}
    for stage in sliced:
        names = {c.name for c in stage.slice.cuts}
        # the int8 weight with its per-channel zero point, the rescale and the bias: all cut
        assert any(n.endswith("quantized") for n in names)
        assert any(n.endswith("bias") for n in names)


def test_a_saved_plan_reproduces_the_split_exactly(bert_package, tmp_path):
    runner = CliRunner()
    devices = tmp_path / "devices.yaml"
    devices.write_text(BOARDS.read_text().replace("memory_mb: 60", "memory_mb: 1"))
    plan_file = tmp_path / "plan.json"
    planned = runner.invoke(
        main,
        [
            "plan",
            str(bert_package),
            "--devices",
            str(devices),
            "--strategy",
            "heads",
            "--save",
            str(plan_file),
        ],
    )
    assert planned.exit_code == 0, planned.output
    saved = json.loads(plan_file.read_text())
    assert saved["source"] == read_package(bert_package).manifest.stages[0].sha256
    spans = [s["slice"]["span"] for s in saved["stages"] if s["slice"]]
    assert spans and all(s["slice"]["cuts"] for s in saved["stages"] if s["slice"])
    again = runner.invoke(
        main,
        [
            "partition",
            str(bert_package),
            "-o",
            str(tmp_path / "from-plan"),
            "--devices",
            str(devices),
            "--plan",
            str(plan_file),
        ],
    )
    assert again.exit_code == 0, again.output
    fresh = partition_package(bert_package, tmp_path / "fresh", load_devices(devices), "heads")
    written = read_package(tmp_path / "from-plan").manifest
    assert [(s.name, s.device, s.units, s.sha256) for s in written.stages] == [
        (s.name, s.device, s.units, s.sha256) for s in fresh.manifest.stages
    ]
    assert [list(s.units) for s in written.stages if s.units] == spans


def test_a_saved_plan_is_refused_for_another_model(bert_package, compressed_bert, tmp_path):
    runner = CliRunner()
    plan_file = tmp_path / "plan.json"
    runner.invoke(
        main,
        [
            "plan",
            str(bert_package),
            "--devices",
            str(BOARDS),
            "--strategy",
            "pipeline",
            "--save",
            str(plan_file),
        ],
    )
    result = runner.invoke(
        main,
        [
            "partition",
            str(compressed_bert[1]),
            "-o",
            str(tmp_path / "out"),
            "--devices",
            str(BOARDS),
            "--plan",
            str(plan_file),
        ],
    )
    assert result.exit_code == 8
    assert "the saved plan was made for another model" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_minilm_fp32_heads_fits_two_60_mb_boards_losslessly(minilm_package, tmp_path):
    """The shared part (embeddings, 47 MB) leaves board-a room for a quarter of each block."""
    result = partition_package(minilm_package, tmp_path / "split", load_devices(BOARDS), "heads")
    assert result.max_abs_error <= 1e-5
    assert result.plan.bound.startswith("memory: board-a")
    held: dict[str, int] = {}
    for stage in result.plan.stages:
        held[stage.device] = held.get(stage.device, 0) + stage.param_bytes
    assert set(held) == {"board-a", "board-b"} and max(held.values()) <= 60e6
    share = {s.device: s.slice.kept / s.slice.units for s in result.plan.stages if s.slice}
    assert share["board-a"] < share["board-b"]  # memory, not speed, set the split


@pytest.mark.slow
def test_lowbit_minilm_fits_one_board_and_its_cut_carries_activations_only(minilm_lowbit, tmp_path):
    _, package = minilm_lowbit
    boards = load_devices(BOARDS)
    runner = CliRunner()
    planned = runner.invoke(
        main, ["plan", str(package), "--devices", str(BOARDS), "--strategy", "single", "--json"]
    )
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["stages"][0]["memory_bytes"] <= 60e6
    result = partition_package(package, tmp_path / "split", boards, "pipeline")
    assert result.max_abs_error == 0.0
    manifest = result.manifest
    crossing = [
        t
        for s in manifest.stages[1:]
        for t in s.inputs
        if t not in {i.name for i in manifest.inputs}
    ]
    assert crossing
    # what crosses depends on the request (activations, the mask, shapes read from the
    # input); a weight or a decoded table would be the same whatever was asked
    runtime = load_package(tmp_path / "split")
    first = manifest.stages[0]
    seen = []
    for sequence in (8, 16):
        feeds = planning_feeds(manifest.inputs, 1, sequence)
        seen.append(runtime._backend.run_stage(first.name, {n: feeds[n] for n in first.inputs}))
    for tensor in crossing:
        short, long = seen[0][tensor], seen[1][tensor]
        assert short.shape != long.shape or not np.array_equal(short, long), tensor
    assert max(seen[1][t].nbytes for t in crossing) > max(seen[0][t].nbytes for t in crossing)
    assert all(s.coded for s in manifest.stages)  # both halves keep their weights as codes
