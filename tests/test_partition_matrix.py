"""Every package splits: {fp32, int8, balanced, smallest} x {pipeline, data, heads, auto} on
minilm and on random-initialised RoBERTa, DistilBERT and ViT directories.

Each split must match its unsplit package on inputs other than the ones partitioning checked
itself with: within 1e-5 (max abs) for float graphs and for every pipeline, and within the
tolerance the split states for dynamic int8 split by heads or data (``tolerance_for``: twice
the whole graph's own batching noise, in cosine per output row).
"""

from __future__ import annotations

import numpy as np
import pytest
from edgec.exporters.partition import partition_package, planning_feeds
from edgec.runtimes import load_package, read_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

ARCHS = ("minilm", "roberta", "distilbert", "vit")
RECIPES = ("fp32", "int8", "balanced", "smallest")
STRATEGIES = ("pipeline", "data", "heads", "auto")

# Two equal devices on a fast link, so that pipeline and heads plans really split the model.
EQUAL = DeviceSet(
    (
        DeviceProfile("board-a", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
        DeviceProfile("board-b", threads=1, gflops_fp32=20.0, memory_gbps=5.0, op_overhead_us=5.0),
    ),
    (Link(("board-a", "board-b"), bandwidth_mbps=100_000, latency_ms=0.0),),
)


def _requests(package) -> list[dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    inputs = read_package(package).manifest.inputs
    rng = np.random.default_rng(7)
    requests = []
    for batch, sequence in ((1, 9), (3, 21)):
        feeds = planning_feeds(inputs, batch, sequence)
        for name, value in feeds.items():
            if name == "input_ids":
                feeds[name] = rng.integers(1, 150, value.shape).astype(value.dtype)
            elif name == "attention_mask" and sequence > 2:
                value[1::2, sequence // 2 :] = 0
            elif value.dtype.kind == "f":
                feeds[name] = rng.standard_normal(value.shape).astype(value.dtype)
        requests.append(feeds)
    return requests


def _min_cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    a = actual.reshape(len(actual), -1).astype(np.float64)
    b = expected.reshape(len(expected), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_package_splits(package_matrix, arch, recipe, strategy, tmp_path):
    package = package_matrix.get(arch, recipe)
    whole_stage = read_package(package).manifest.stages[0]
    result = partition_package(package, tmp_path / "split", EQUAL, strategy)
    tolerance = result.tolerance
    assert tolerance is not None
    assert tolerance.holds(result.max_abs_error, result.min_cosine)
    manifest = result.manifest
    if strategy == "heads":
        assert any(s.units for s in manifest.stages), "no block was split"
    if strategy == "pipeline":
        assert len(manifest.stages) == 2
        assert tolerance.max_abs is not None  # same operators, same tensors: exact
    if whole_stage.coded:  # weight-shared: the split keeps codes, stage by stage
        assert any(s.coded for s in manifest.stages)
    whole, split = load_package(package), load_package(tmp_path / "split")
    for feeds in _requests(package):
        expected, actual = whole.run(feeds), split.run(feeds)
        for name, value in expected.items():
            assert actual[name].shape == value.shape
            if tolerance.max_abs is not None:
                assert float(np.abs(actual[name] - value).max()) <= tolerance.max_abs, name
            else:
                assert _min_cosine(actual[name], value) >= tolerance.min_cosine, name
