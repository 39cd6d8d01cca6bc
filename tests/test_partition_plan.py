"""Device profiles and plans: schema, budgets, auto's choice, plans as data."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from edgec.exporters.partition import plan_model
from edgec.exporters.partition.plan import Plan
from edgec.runtimes import read_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link, load_devices

from edgec.errors import DeviceError

EXAMPLES = Path(__file__).parents[1] / "examples"


def _plan(package: Path, devices: DeviceSet, strategy: str, objective=None) -> Plan:  # type: ignore[no-untyped-def]
    pkg = read_package(package)
    return plan_model(pkg.path("model.onnx"), pkg.manifest.inputs, devices, strategy, objective)[0]


def test_the_minimum_schema_loads(tmp_path):
    devices = load_devices(EXAMPLES / "two-boards.yaml")
    assert [d.name for d in devices.devices] == ["board-a", "board-b"]
    assert devices.device("board-a").memory_bytes == 60e6
    link = devices.link("board-b", "board-a")
    assert (link.bandwidth_mbps, link.latency_ms) == (100, 2)
    # 1 MB over 100 Mbit/s is 80 ms, plus 2 ms latency
    assert devices.transfer_ms("board-a", "board-b", 1e6) == pytest.approx(82.0)
    assert devices.transfer_ms("board-a", "board-a", 1e6) == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("devices: []", "at least one device"),
        ("devices: [{name: a, threads: -1}]", "threads must be an integer >= 0"),
        ("devices: [{name: a, memory_mb: 0}]", "memory_mb must be a positive number, got 0"),
        (
            "devices: [{name: a, speed: 3}]",
            r"devices.yaml.devices\[0\] has unknown keys \['speed'\]; known: \[.*'gflops_fp32'",
        ),
        (
            "devices: [{name: a}, {name: b, threads: two}]",
            r"devices.yaml.devices\[1\].threads must be an integer in int64, got 'two'",
        ),
        (
            "devices: [{name: a, matmul_int8_curve: [[1, 2, 3]]}]",
            r"devices.yaml.devices\[0\].matmul_int8_curve\[0\] must be a list of 2 items",
        ),
        ("devices: [{name: a}]\nentry: 3", r"devices.yaml.entry must be a string or null, got 3"),
        (
            "devices: [{name: a}]\nlinks: [{between: [a]}]",
            r"links\[0\].between must be a list of 2",
        ),
        ("devices: [{name: a}, {name: a}]", r"\['a'\] appear more than once"),
        ("devices: [{name: a}]\nlinks: [{between: [a, z]}]", "unknown device 'z'"),
        ("devices: [{name: a}]\nlinks: [{between: [a, a], bandwidth_mbps: -5}]", "bandwidth_mbps"),
        ("devices: [{name: a, matmul_fp32_curve: [[1, 0]]}]", "matmul_fp32_curve"),
        ("[1, 2]", r"devices.yaml must be an object, got \[1, 2\]"),
        ("links: []", r"devices.yaml lacks 'devices'"),
    ],
)
def test_bad_profiles_are_named(tmp_path, text, message):
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    with pytest.raises(DeviceError, match=message):
        load_devices(path)


def test_profiles_round_trip_through_yaml(tmp_path):
    from edgec.runtimes.devices import save_devices

    devices = DeviceSet(
        (
            DeviceProfile(
                "a", threads=2, gflops_fp32=50.0, matmul_fp32_curve=((1.0, 20.0), (100.0, 60.0))
            ),
        ),
        (),
    )
    save_devices(devices, tmp_path / "d.yaml")
    assert load_devices(tmp_path / "d.yaml") == devices
    # the curve interpolates in log size and clamps at its ends
    device = devices.devices[0]
    assert device.matmul_speed("gflops_fp32", 10e6) == pytest.approx(40.0)
    assert device.matmul_speed("gflops_fp32", 1e3) == 20.0
    assert device.matmul_speed("gflops_fp32", 1e12) == 60.0


def test_profile_device_measures_this_machine(tmp_path):
    from edgec.runtimes.profiler import profile_device

    profile = profile_device("me", threads=1, repeats=2)
    assert profile.assumed() == []
    # measured figures, not speeds asserted: each a finite positive number within what any CPU
    # onnxruntime runs on could give (10 MFLOP/s .. 100 TFLOP/s, 1 ns .. 1 s per operator)
    for key in ("gflops_fp32", "gops_int8", "memory_gbps"):
        assert 0.01 < getattr(profile, key) < 100_000, key
    assert 0.001 < profile.op_overhead_us < 1e6
    assert 0.001 < profile.stage_overhead_us < 1e6
    for curve in (profile.matmul_fp32_curve, profile.matmul_int8_curve):
        sizes = [mflop for mflop, _ in curve]
        assert sizes == sorted(sizes) and all(0.01 < g < 100_000 for _, g in curve)
    assert len(profile.matmul_fp32_curve) == 4
    assert profile.memory_mb and profile.memory_mb > 0


FAST_LINK = (Link(("a", "b"), bandwidth_mbps=100_000, latency_ms=0.0),)


def test_pipeline_balances_equal_devices_for_throughput(bert_package):
    devices = DeviceSet((DeviceProfile("a"), DeviceProfile("b")), FAST_LINK)
    plan = _plan(bert_package, devices, "pipeline", "throughput")
    first, second = plan.stages
    assert plan.period_ms == pytest.approx(
        max(first.predicted_ms, second.predicted_ms + second.transfer_in_ms)
    )
    # balanced: neither stage holds more than two thirds of the predicted work
    assert max(first.predicted_ms, second.predicted_ms) <= 2 / 3 * (
        first.predicted_ms + second.predicted_ms
    )


def test_a_faster_device_gets_more_of_the_pipeline(bert_package):
    devices = DeviceSet(
        (
            DeviceProfile("a", gflops_fp32=10.0, memory_gbps=1.0),
            DeviceProfile("b", gflops_fp32=40.0, memory_gbps=4.0),
        ),
        FAST_LINK,
    )
    plan = _plan(bert_package, devices, "pipeline", "throughput")
    by_device = {s.device: s for s in plan.stages}
    assert by_device["b"].flops > by_device["a"].flops


def test_data_parallel_shares_follow_speed(bert_package):
    devices = DeviceSet(
        (
            DeviceProfile(
                "a", gflops_fp32=10.0, memory_gbps=1.0, op_overhead_us=1.0, stage_overhead_us=3.0
            ),
            DeviceProfile(
                "b", gflops_fp32=30.0, memory_gbps=3.0, op_overhead_us=1 / 3, stage_overhead_us=1.0
            ),
        ),
        FAST_LINK,
    )
    plan = _plan(bert_package, devices, "data")
    shares = {s.device: s.batch_share for s in plan.stages}
    assert shares["b"] == pytest.approx(0.75, abs=1e-6)
    assert plan.aggregation == {"kind": "concat", "axis": 0}


def test_auto_keeps_one_device_when_a_split_is_slower(bert_package):
    slow_link = (Link(("a", "b"), bandwidth_mbps=10, latency_ms=50),)
    devices = DeviceSet((DeviceProfile("a"), DeviceProfile("b")), slow_link)
    plan = _plan(bert_package, devices, "auto")
    assert plan.strategy == "single"
    assert "no slower than any split" in plan.reason
    assert {a["strategy"] for a in plan.alternatives} == {"pipeline", "data", "heads"}
    assert all(a["score_ms"] > plan.score for a in plan.alternatives)


def test_auto_splits_when_no_single_device_holds_the_model(bert_package):
    whole = _plan(bert_package, DeviceSet((DeviceProfile("x"),)), "single").stages[0].memory_bytes
    budget_mb = whole * 0.9 / 1e6
    devices = DeviceSet(
        (DeviceProfile("a", memory_mb=budget_mb), DeviceProfile("b", memory_mb=budget_mb)),
        FAST_LINK,
    )
    plan = _plan(bert_package, devices, "auto")
    assert plan.strategy in ("pipeline", "heads")  # heads fits too, now that it minds memory
    assert "no single device holds the model" in plan.reason
    for device in ("a", "b"):
        held = sum(s.param_bytes for s in plan.stages if s.device == device)
        assert 0 < held <= budget_mb * 1e6


def test_a_budget_no_plan_fits_names_devices_and_bytes(bert_package):
    devices = DeviceSet(
        (DeviceProfile("a", memory_mb=0.01), DeviceProfile("b", memory_mb=0.01)), FAST_LINK
    )
    with pytest.raises(
        DeviceError, match=r"a 10.0 KB, b 10.0 KB\): the whole model needs \d+ bytes"
    ):
        _plan(bert_package, devices, "pipeline")
    with pytest.raises(DeviceError, match="no strategy fits"):
        _plan(bert_package, devices, "auto")


def test_unknown_strategy_and_objective_list_the_known_ones(bert_package, tmp_path):
    from edgec.exporters.partition import partition_package

    devices = DeviceSet((DeviceProfile("a"), DeviceProfile("b")))
    message = r"unknown strategy 'ring'; known: \['auto', 'data', 'heads', 'pipeline', 'single'\]"
    # one error, whichever way in: planning, partitioning
    with pytest.raises(DeviceError, match=message):
        _plan(bert_package, devices, "ring")
    with pytest.raises(DeviceError, match=message):
        partition_package(bert_package, tmp_path / "out", devices, "ring")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeviceError, match=r"unknown objective 'cost'"):
        _plan(bert_package, devices, "pipeline", "cost")


def test_plans_print_save_and_diff(bert_package, tmp_path):
    devices = DeviceSet((DeviceProfile("a"), DeviceProfile("b")), FAST_LINK)
    plan = _plan(bert_package, devices, "pipeline", "throughput")
    text = plan.format()
    for word in ("stage0", "stage1", "GFLOP", "params", "cut", "predicted:", "ms per request"):
        assert word in text
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and plan.diff(again) == []
    other = replace(plan, strategy="data")
    assert plan.diff(other) == ["strategy: pipeline -> data"]
    assert "assumed:" in text  # unmeasured devices are called out
    assert yaml.safe_load(yaml.safe_dump(plan.to_json()))["strategy"] == "pipeline"


def test_a_malformed_plan_file_is_refused_naming_the_field(bert_package, tmp_path):
    import json

    devices = DeviceSet((DeviceProfile("a"), DeviceProfile("b")), FAST_LINK)
    _plan(bert_package, devices, "heads").save(tmp_path / "plan.json")
    good = json.loads((tmp_path / "plan.json").read_text())
    cases = {
        "stages[0].start must be an integer": lambda d: d["stages"][0].update(start="0"),
        "objective must be one of": lambda d: d.update(objective="fastest"),
        "unknown keys ['devicez']": lambda d: d["stages"][0].update(devicez="a"),
        "lacks 'strategy'": lambda d: d.pop("strategy"),
        "slice.span must be": lambda d: next(s for s in d["stages"] if s["slice"])["slice"].update(
            span=[0]
        ),
    }
    for message, mutate in cases.items():
        data = json.loads(json.dumps(good))
        mutate(data)
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(DeviceError, match=re.escape(message)):
            Plan.load(tmp_path / "bad.json")
    assert Plan.load(tmp_path / "plan.json") == Plan.from_json(good)
