"""Plans start where the request starts: inputs move from the entry device, results go back to
the exit, and with the input kept on the entry no other device reads a raw input."""

from __future__ import annotations

import numpy as np
import pytest
from edgec.exporters.partition import plan_model
from edgec.runtimes import read_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

from edgec.errors import DeviceError

PHONE = DeviceProfile(
    "phone",
    threads=1,
    gflops_fp32=2.0,
    gops_int8=4.0,
    memory_gbps=1.0,
    op_overhead_us=20.0,
    stage_overhead_us=100.0,
)
SERVER = DeviceProfile(
    "server",
    threads=8,
    gflops_fp32=400.0,
    gops_int8=800.0,
    memory_gbps=40.0,
    op_overhead_us=2.0,
    stage_overhead_us=20.0,
)
SLOW_LINK = (Link(("phone", "server"), bandwidth_mbps=5.0, latency_ms=40.0),)


def _plan(package, devices, strategy="auto", keep_input=False):  # type: ignore[no-untyped-def]
    pkg = read_package(package)
    return plan_model(
        pkg.path("model.onnx"), pkg.manifest.inputs, devices, strategy, keep_input=keep_input
    )[0]


def test_the_plan_counts_moving_the_request_in_and_the_result_back(bert_package):
    devices = DeviceSet((PHONE, SERVER), SLOW_LINK, entry="phone")
    plan = _plan(bert_package, devices)
    assert (plan.entry, plan.exit) == ("phone", "phone")
    if plan.stages[0].device == "server":  # the request had to travel there
        assert plan.stages[0].transfer_in_ms >= 40.0
    if plan.stages[-1].device == "server":  # and the result back
        assert plan.return_ms >= 40.0
    single_server = _plan(
        bert_package, DeviceSet((SERVER, PHONE), SLOW_LINK, entry="phone"), "single"
    )
    # the whole model on the fast server still pays two trips over the 40 ms link
    if single_server.devices == ["server"]:
        assert single_server.latency_ms >= 80.0


def test_keeping_the_input_on_the_entry_puts_the_first_stage_there(bert_package):
    devices = DeviceSet((SERVER, PHONE), SLOW_LINK, entry="phone")
    inputs = set(read_package(bert_package).manifest.stages[0].inputs)
    for strategy in ("auto", "pipeline", "single", "heads"):
        plan = _plan(bert_package, devices, strategy, keep_input=True)
        assert plan.keep_input and plan.stages[0].device == "phone", strategy
        for stage in plan.stages:
            if stage.device != "phone":
                assert not inputs & set(stage.inputs), (strategy, stage.name)
    auto = _plan(bert_package, devices, "auto", keep_input=True)
    assert "keeping the raw input on phone costs" in auto.reason


def test_data_parallel_would_send_raw_rows_and_is_refused(bert_package):
    devices = DeviceSet((PHONE, SERVER), SLOW_LINK, entry="phone")
    with pytest.raises(DeviceError, match="sends raw input rows to every device"):
        _plan(bert_package, devices, "data", keep_input=True)


def test_an_entry_that_holds_nothing_cannot_keep_the_input(bert_package):
    tiny = DeviceProfile("phone", memory_mb=0.0001)
    devices = DeviceSet((tiny, SERVER), SLOW_LINK, entry="phone")
    with pytest.raises(DeviceError, match="entry device 'phone' cannot hold"):
        _plan(bert_package, devices, "auto", keep_input=True)


def test_entry_and_exit_must_be_listed_devices():
    with pytest.raises(DeviceError, match="entry 'watch' is not a listed device"):
        DeviceSet((PHONE, SERVER), SLOW_LINK, entry="watch")
    data = DeviceSet((PHONE, SERVER), SLOW_LINK, entry="server", exit="phone").to_json()
    again = DeviceSet.from_json(data)
    assert (again.entry_device, again.exit_device) == ("server", "phone")
    assert DeviceSet((PHONE, SERVER)).entry_device == "phone"  # default: the first device
    with pytest.raises(
        DeviceError,
        match=r"unknown keys \['entrance'\]; known: \['devices', 'entry', 'exit', 'links'\]",
    ):
        DeviceSet.from_json({"devices": [{"name": "a"}], "entrance": "a"})


def test_int8_links_carry_a_quarter_of_the_bytes_and_stay_faithful(bert_package, tmp_path):
    from edgec.exporters.partition import partition_package
    from edgec.runtimes import load_package

    devices = DeviceSet((PHONE, SERVER), SLOW_LINK, entry="phone")
    results = {
        mode: partition_package(
            bert_package, tmp_path / mode, devices, "pipeline", keep_input=True, int8_links=mode
        )
        for mode in ("off", "on")
    }
    floats, ints = results["off"], results["on"]
    assert not floats.plan.int8_links and ints.plan.int8_links
    assert ints.tolerance is not None and ints.tolerance.min_cosine == 0.999
    crossing = [e["bytes"] for e in floats.manifest.edges if e["from"] != "input"]
    carried = [e["bytes"] for e in ints.manifest.edges if e["from"] != "input"]
    assert sum(carried) * 3.5 < sum(crossing)  # int8 values + one float scale per token
    assert ints.plan.latency_ms < floats.plan.latency_ms  # the 5 Mbit/s link is the bottleneck
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 150, (4, 24))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    a = load_package(tmp_path / "off").run(feeds)
    b = load_package(tmp_path / "on").run(feeds)
    for name, value in a.items():
        x, y = value.reshape(len(value), -1), b[name].reshape(len(value), -1)
        cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cosine.min() >= 0.999, name


def test_emulated_links_carry_what_the_plan_says(bert_package, tmp_path):
    from click.testing import CliRunner
    from edgec.exporters.partition import partition_package
    from edgec.runtimes import load_package

    from edgec.cli import cli

    devices = DeviceSet((PHONE, SERVER), SLOW_LINK, entry="phone")
    result = partition_package(
        bert_package, tmp_path / "split", devices, "pipeline", keep_input=True
    )
    assert result.manifest.network is not None and result.manifest.network["entry"] == "phone"
    runtime = load_package(tmp_path / "split", emulate_links=True)
    ids = np.ones((1, 128), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}
    emulated = runtime.run(feeds)
    plain = load_package(tmp_path / "split").run(feeds)
    for name, value in plain.items():
        assert np.array_equal(emulated[name], value)  # emulation moves time, not values
    _, second = result.plan.stages
    traffic = runtime.link_traffic
    # what crossed phone -> server is what the plan put across the cut, and the results came back
    assert traffic[("phone", "server")] == second.bytes_in
    assert traffic[("server", "phone")] == sum(v.nbytes for v in plain.values())
    np.savez(tmp_path / "feeds.npz", **feeds)
    ran = CliRunner().invoke(
        cli,
        ["run", str(tmp_path / "split"), "--input", str(tmp_path / "feeds.npz"), "--emulate-links"],
    )
    assert ran.exit_code == 0, ran.output
    assert "links emulated" in ran.stderr and "phone→server" in ran.stderr
    with pytest.raises(Exception, match="records no network to emulate"):
        load_package(bert_package, emulate_links=True)
