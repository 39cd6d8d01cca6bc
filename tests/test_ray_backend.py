"""The Ray backend on a real local 2-node cluster (loopback): same outputs as the local
backend, a missing device named, a killed node failing requests within the timeout, and service
resuming when the node rejoins, with the same coordinator."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from edgec.exporters.partition import partition_package, planning_feeds
from edgec.runtimes import load_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

from edgec.errors import DeviceError

ray = pytest.importorskip("ray")

TIMEOUT_S = 3.0
BOARDS = DeviceSet(
    (DeviceProfile("board-a", threads=1), DeviceProfile("board-b", threads=1)),
    (Link(("board-a", "board-b"), bandwidth_mbps=100_000, latency_ms=0.0),),
    entry="board-a",  # requests enter on board-a and results leave from board-b:
    exit="board-b",  # the pipeline runs a then b
)


@pytest.fixture(scope="module")
def pipeline_package(bert_package, tmp_path_factory):
    path = tmp_path_factory.mktemp("packages") / "bert-pipeline"
    result = partition_package(bert_package, path, BOARDS, "pipeline")
    assert [s.device for s in result.manifest.stages] == ["board-a", "board-b"]
    return path


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "resources": {"device:board-a": 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.board_b = cluster.add_node(num_cpus=1, resources={"device:board-b": 1})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _feeds(package, batch=2, sequence=8):  # type: ignore[no-untyped-def]
    feeds = planning_feeds(load_package(package).manifest.inputs, batch, sequence)
    feeds["input_ids"] = (
        np.arange(batch * sequence, dtype=np.int64).reshape(batch, sequence) % 90 + 1
    )
    return feeds


def test_missing_device_is_named(cluster, bert_package, tmp_path):
    devices = DeviceSet((DeviceProfile("board-a"), DeviceProfile("board-c")), BOARDS.links[:0])
    path = tmp_path / "needs-c"
    partition_package(bert_package, path, devices, "data")
    with pytest.raises(DeviceError, match=r"\['board-c'\] are not in the Ray cluster"):
        load_package(path, backend="ray", address=cluster.address, timeout_s=TIMEOUT_S)


def test_ray_matches_local_and_survives_a_lost_node(cluster, pipeline_package):
    feeds = _feeds(pipeline_package)
    expected = load_package(pipeline_package).run(feeds)
    runtime = load_package(
        pipeline_package, backend="ray", address=cluster.address, timeout_s=TIMEOUT_S
    )
    try:
        actual = runtime.run(feeds)
        assert np.array_equal(actual["last_hidden_state"], expected["last_hidden_state"])
        streamed = runtime.run_many([feeds] * 4)
        assert all(
            np.array_equal(s["last_hidden_state"], expected["last_hidden_state"]) for s in streamed
        )

        # Requests keep flowing while board-b's node is killed; the one in flight fails, naming it.
        failure: list[tuple[float, BaseException]] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                try:
                    runtime.run(feeds)
                except DeviceError as exc:
                    failure.append((time.monotonic(), exc))
                    return

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        time.sleep(0.5)
        killed = time.monotonic()
        cluster.remove_node(cluster.board_b, allow_graceful=False)
        worker.join(timeout=TIMEOUT_S + 10)
        stop.set()
        assert failure, "no request failed after the node was killed"
        failed_at, error = failure[0]
        assert failed_at - killed <= TIMEOUT_S + 2.0
        assert "board-b" in str(error) and "stage1" in str(error)

        # The device rejoins; the same runtime (coordinator) serves again.
        cluster.board_b = cluster.add_node(num_cpus=1, resources={"device:board-b": 1})
        deadline = time.monotonic() + 90
        while True:
            try:
                again = runtime.run(feeds)
                break
            except DeviceError:
                if time.monotonic() > deadline:
                    raise
        assert np.array_equal(again["last_hidden_state"], expected["last_hidden_state"])
    finally:
        runtime.close()


def test_importing_the_runtime_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, edgec.runtimes, edgec.runtimes.backends; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_coded_weights_ship_with_their_stage_and_decode_on_the_device(
    cluster, compressed_bert, tmp_path
):
    import json
    import shutil

    _, package = compressed_bert
    on_board = tmp_path / "on-board-a"
    shutil.copytree(package, on_board)
    manifest = json.loads((on_board / "manifest.json").read_text())
    assert manifest["stages"][0]["coded"], "the fixture's Linears are decoded at load"
    manifest["devices"] = [{"name": "board-a", "providers": ["CPUExecutionProvider"]}]
    manifest["stages"][0]["device"] = "board-a"
    (on_board / "manifest.json").write_text(json.dumps(manifest))
    feeds = _feeds(on_board)
    expected = load_package(on_board).run(feeds)
    runtime = load_package(on_board, backend="ray", address=cluster.address, timeout_s=TIMEOUT_S)
    try:
        actual = runtime.run(feeds)
        assert np.array_equal(actual["last_hidden_state"], expected["last_hidden_state"])
    finally:
        runtime.close()
