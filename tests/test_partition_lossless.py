"""Partitioned packages equal the whole graph within 1e-5 (max abs), for every strategy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from edgec.exporters.partition import partition_package, planning_feeds
from edgec.runtimes import load_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

TOLERANCE = 1e-5
STRATEGIES = ["pipeline", "data", "heads", "auto"]

# Two equal devices on a fast link, so that a pipeline plan really splits the model.
EQUAL = DeviceSet(
    (
        DeviceProfile("board-a", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
        DeviceProfile("board-b", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
    ),
    (Link(("board-a", "board-b"), bandwidth_mbps=100_000, latency_ms=0.0),),
)


def _feeds(package: Path, batch: int, sequence: int, seed: int) -> dict[str, np.ndarray]:
    inputs = load_package(package).manifest.inputs
    feeds = planning_feeds(inputs, batch, sequence)
    rng = np.random.default_rng(seed)
    if "input_ids" in feeds:
        feeds["input_ids"] = rng.integers(1, 100, feeds["input_ids"].shape).astype(np.int64)
    if "attention_mask" in feeds and sequence > 2:
        feeds["attention_mask"][1::2, sequence // 2 :] = 0
    return feeds


def assert_lossless(whole: Path, split: Path, shapes: list[tuple[int, int]]) -> None:
    reference, partitioned = load_package(whole), load_package(split)
    requests = [_feeds(whole, b, s, seed) for seed, (b, s) in enumerate(shapes)]
    for feeds, streamed in zip(requests, partitioned.run_many(requests), strict=True):
        expected = reference.run(feeds)
        actual = partitioned.run(feeds)
        for name, value in expected.items():
            assert actual[name].shape == value.shape
            assert float(np.abs(actual[name] - value).max()) <= TOLERANCE
            assert np.array_equal(streamed[name], actual[name])


def _stage_files_pass_the_checker(package: Path) -> None:
    manifest = load_package(package).manifest
    for stage in manifest.stages:
        onnx.checker.check_model(onnx.load(str(package / stage.file)), full_check=True)


TEXT_SHAPES = [(1, 8), (4, 32), (5, 17)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_bert_every_strategy_is_lossless(strategy, bert_package, tmp_path):
    result = partition_package(bert_package, tmp_path / "split", EQUAL, strategy)
    assert result.max_abs_error <= TOLERANCE
    if strategy in ("pipeline", "data"):
        assert result.manifest.strategy == strategy
        assert len(result.manifest.stages) == 2
    _stage_files_pass_the_checker(tmp_path / "split")
    assert_lossless(bert_package, tmp_path / "split", TEXT_SHAPES)


def test_pipeline_stages_split_the_work(bert_package, tmp_path):
    result = partition_package(bert_package, tmp_path / "split", EQUAL, "pipeline")
    first, second = result.plan.stages
    assert first.stop == second.start and first.start == 0
    assert first.flops > 0 and second.flops > 0  # both stages compute something real
    assert set(second.inputs) <= set(first.outputs) | {
        "input_ids",
        "attention_mask",
        "token_type_ids",
    }
    assert result.manifest.edges[-1]["to"] == "stage1"


def test_heads_split_every_block_over_both_devices(bert_package, tmp_path):
    result = partition_package(bert_package, tmp_path / "split", EQUAL, "heads")
    groups: dict[int, list] = {}
    for stage in result.manifest.stages:
        groups.setdefault(stage.group, []).append(stage)
    parallel = [g for g in groups.values() if len(g) > 1]
    assert len(parallel) == 4  # 2 layers x (attention, FFN)
    for group in parallel:
        assert sorted(s.device for s in group) == ["board-a", "board-b"]
        spans = sorted(s.units for s in group)
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0]  # disjoint, together all units
        outputs = {s.outputs for s in group}
        assert len(outputs) == 1  # partial results of one tensor, summed by the aggregation
    assert result.manifest.aggregation == {"kind": "sum"}
    # 4 heads of 8 and 64 FFN neurons: each device holds half of every sliced weight
    assert {s.units for g in parallel for s in g} == {
        (0, 2),
        (2, 4),
        (0, 32),
        (32, 64),
    }


@pytest.fixture(scope="module")
def vit_package(tiny_models, tmp_path_factory):
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "vit"
    export(tiny_models["vit"], path)
    return path


@pytest.mark.parametrize("strategy", ["pipeline", "data", "heads"])
def test_random_vit_is_lossless(strategy, vit_package, tmp_path):
    partition_package(vit_package, tmp_path / "split", EQUAL, strategy)
    assert_lossless(vit_package, tmp_path / "split", [(1, 1), (3, 1)])


@pytest.fixture(scope="module")
def quantized_bert_package(bert_package, tmp_path_factory):
    """The random BERT with its MatMul weights int8 (QDQ), as a single-stage package.

    A stand-in for a compressed package until the compressor's checkpoints exist.
    """
    import shutil

    from edgec.exporters.package_writer import hash_files, write_manifest
    from edgec.runtimes import read_package
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([_feeds(bert_package, 2, 16, seed) for seed in range(4)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self._items, None)

    root = tmp_path_factory.mktemp("packages") / "bert-int8"
    shutil.copytree(bert_package, root)
    quantize_static(
        str(bert_package / "model.onnx"),
        str(root / "model.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
    )
    manifest = read_package(bert_package).manifest
    files = hash_files(root, list(manifest.files))
    stage = manifest.stages[0]
    from dataclasses import replace

    write_manifest(
        root, replace(manifest, files=files, stages=(replace(stage, sha256=files[stage.file]),))
    )
    return root


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_quantized_package_is_lossless(strategy, quantized_bert_package, tmp_path):
    ops = {n.op_type for n in onnx.load(str(quantized_bert_package / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    result = partition_package(quantized_bert_package, tmp_path / "split", EQUAL, strategy)
    assert result.max_abs_error <= TOLERANCE
    assert_lossless(quantized_bert_package, tmp_path / "split", TEXT_SHAPES)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["pipeline", "data", "heads"])
def test_tiny_vit_digits_is_lossless(strategy, digits_package, tmp_path):
    partition_package(digits_package, tmp_path / "split", EQUAL, strategy)
    assert_lossless(digits_package, tmp_path / "split", [(1, 1), (8, 1)])


@pytest.mark.slow
def test_minilm_fp32_splits_over_two_60_mb_boards(minilm_package, tmp_path):
    from edgec.runtimes.devices import load_devices

    boards = load_devices(Path(__file__).parents[1] / "examples" / "two-boards.yaml")
    total = sum((minilm_package / f).stat().st_size for f in ["model.onnx"])
    assert total > 60e6 * 1.4  # the whole model fits neither board
    result = partition_package(minilm_package, tmp_path / "split", boards, "auto")
    assert result.plan.strategy == "pipeline"
    assert sorted(result.plan.devices) == ["board-a", "board-b"]
    for stage in result.plan.stages:
        assert stage.memory_bytes <= 60e6
        assert (tmp_path / "split" / f"stages/{stage.name}.onnx").stat().st_size <= 60e6
    assert_lossless(minilm_package, tmp_path / "split", [(2, 32)])
