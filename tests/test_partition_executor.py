"""The executor: aggregations, batch splits, and streaming with errors."""

from __future__ import annotations

import numpy as np
import pytest
from edgec.runtimes.aggregation import aggregate
from edgec.runtimes.executor import Executor, batch_slices
from edgec.runtimes.manifest import DeviceInfo, Manifest, StageInfo, TensorInfo

from edgec.errors import InputError, PackageError


def test_aggregations():
    a, b = np.ones((2, 3), np.float32), np.full((1, 3), 2, np.float32)
    assert aggregate("concat", [a, b]).shape == (3, 3)
    assert aggregate("concat", [a.T, b.T], {"axis": 1}).shape == (3, 3)
    assert np.array_equal(aggregate("sum", [a, a, a]), np.full((2, 3), 3, np.float32))
    assert np.array_equal(aggregate("mean", [a, 3 * a]), 2 * a)
    assert aggregate("sum", [a, a]) is not a  # the parts are never modified
    with pytest.raises(
        PackageError, match=r"unknown aggregation 'max'; known: \['concat', 'mean', 'sum'\]"
    ):
        aggregate("max", [a])


@pytest.mark.parametrize(
    ("shares", "batch", "expected"),
    [
        ([0.5, 0.5], 4, [(0, 2), (2, 4)]),
        ([0.75, 0.25], 4, [(0, 3), (3, 4)]),
        ([0.5, 0.5], 1, [(0, 1), (1, 1)]),
        ([1, 1, 1], 5, [(0, 2), (2, 4), (4, 5)]),
    ],
)
def test_batch_slices_cover_the_batch(shares, batch, expected):
    assert batch_slices(shares, batch) == expected


class _Doubler:
    """A backend whose stages double ``x``; stage ``bad`` fails on request 3."""

    def run_stage(self, stage: str, feeds):  # type: ignore[no-untyped-def]
        value = next(iter(feeds.values()))
        if stage == "s1" and value.flat[0] == 3 * 2:
            raise InputError("request 3 is refused")
        return {f"{stage}_out": value * 2}

    def close(self) -> None:
        pass


def _chain() -> Manifest:
    x = TensorInfo("x", "float32", ("batch",))
    stages = (
        StageInfo("s0", "d", "s0.onnx", "0", ("x",), ("s0_out",)),
        StageInfo("s1", "d", "s1.onnx", "0", ("s0_out",), ("s1_out",)),
    )
    out = TensorInfo("s1_out", "float32", ("batch",))
    return Manifest("m", (x,), (out,), stages, (DeviceInfo("d"),), {}, strategy="pipeline")


def test_run_many_keeps_order_and_raises_the_failing_request():
    executor = Executor(_chain(), _Doubler())
    requests = [{"x": np.array([i], np.float32)} for i in range(6)]
    with pytest.raises(InputError, match="request 3 is refused"):
        executor.run_many(requests)
    good = [r for i, r in enumerate(requests) if i != 3]
    results = executor.run_many(good)
    assert [float(r["s1_out"][0]) for r in results] == [0, 4, 8, 16, 20]
    executor.close()


def test_unknown_execution_is_refused():
    manifest = _chain()
    from dataclasses import replace

    with pytest.raises(
        PackageError, match=r"execution 'ring' \(strategy 'pipeline'\) is unknown to this edgec"
    ):
        Executor(replace(manifest, execution="ring"), _Doubler())


def test_every_strategy_runs_with_a_known_executor():
    from edgec.exporters.partition.strategies import STRATEGIES
    from edgec.runtimes.executor import EXECUTORS

    assert {s.execution for s in STRATEGIES.values()} <= set(EXECUTORS)


def test_packages_written_before_execution_was_recorded_still_run():
    data = _chain().to_json()
    del data["execution"]
    for strategy, execution in (("data", "batch"), ("heads", "groups"), ("pipeline", "chain")):
        assert Manifest.from_json({**data, "strategy": strategy}).execution == execution


def test_device_side_modules_need_neither_torch_nor_onnx_nor_ray():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import edgec.runtimes.devices, edgec.runtimes.profiler, edgec.runtimes.ray_backend\n"
        "import edgec.runtimes.executor, edgec.runtimes.aggregation\n"
        "print(','.join(m for m in ('torch', 'transformers', 'onnx', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
