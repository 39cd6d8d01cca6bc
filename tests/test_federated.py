"""Federated recovery in Flower's simulation engine (issue 14), on a small random BERT.

Three simulated devices, each with token data of its own "domain" (disjoint ranges of the
vocabulary), recover a 2-bit weight-shared, int8 checkpoint. The minilm figures (three text
domains, against central distillation) are ``benchmarks/federated.py``'s.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_edgec

DOMAINS = ((1, 80), (60, 140), (120, 200))  # token-id ranges of the three devices' data


@pytest.fixture(scope="module")
def shared_bert(tmp_path_factory: pytest.TempPathFactory, wide_bert: Path) -> Path:
    """``wide_bert`` with every Linear and the embeddings shared at 2 bits, then int8."""
    from edgec.compressor import QuantizeStep, Recipe, ShareStep, compress

    root = tmp_path_factory.mktemp("federated")
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 200, size=(64, 16))
    np.savez(
        root / "calib.npz",
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        token_type_ids=np.zeros_like(ids),
    )
    recipe = Recipe(
        name="shared2",
        steps=(ShareStep(bits=2, embedding_bits=2, iterations=4, gptq=False), QuantizeStep()),
    )
    compress(wide_bert, recipe, root / "ckpt", calib=root / "calib.npz", predict_memory=False)
    return root / "ckpt"


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    for i, (low, high) in enumerate(DOMAINS):
        ids = rng.integers(low, high, size=(60, 16))
        mask = np.ones_like(ids)
        mask[::3, 11:] = 0
        np.savez(
            root / f"domain{i}.npz",
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=np.zeros_like(ids),
        )
    return root


def _plan(**kw: Any) -> Any:
    from edgec.federated import FederatedPlan, LocalTraining

    local = kw.pop("local", LocalTraining(steps=10, lr=1e-3, batch_size=8))
    return FederatedPlan(min_clients=3, local=local, **kw)


class Recorder:
    """A client mod that writes down every reply a device sends (it runs in the engine's worker
    processes, so to files), and can corrupt some devices' updates first."""

    def __init__(self, folder: Path, corrupt: dict[int, Any] | None = None):
        self.folder = folder
        self.corrupt = corrupt or {}

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        import json
        import time

        from flwr.app import Array, ArrayRecord

        reply = call_next(msg, context)
        partition = int(context.node_config["partition-id"])
        records = msg.content.config_records  # a secure round's is the legacy FitIns'
        config = records.get("config") or records.get("fitins.config")
        round_ = int(config["server-round"]) if config else 0
        if partition in self.corrupt and reply.content.array_records:
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            self.corrupt[partition](arrays, round_)
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        stem = f"{partition}-{msg.metadata.message_type}-{round_}-{time.time_ns()}"
        records: dict[str, Any] = {}
        for key, record in reply.content.items():
            if key in reply.content.array_records:
                values = {k: v.numpy() for k, v in record.items()}
                np.savez(self.folder / f"{stem}.npz", **values)
                records[key] = {k: [str(v.dtype), list(v.shape)] for k, v in values.items()}
            else:
                records[key] = {k: type(v).__name__ for k, v in record.items()}
        (self.folder / f"{stem}.json").write_text(json.dumps(records))
        return reply

    def sent(self, partition: int | None = None, kind: str | None = None) -> list[Any]:
        """(partition, kind, round, records, arrays or None) of every reply, in round order."""
        import json

        found = []
        for path in self.folder.glob("*.json"):
            p, k, r, _ = path.stem.split("-")
            if (partition is None or int(p) == partition) and (kind is None or k == kind):
                npz = path.with_suffix(".npz")
                arrays = dict(np.load(npz)) if npz.exists() else None
                found.append((int(p), k, int(r), json.loads(path.read_text()), arrays))
        return sorted(found, key=lambda x: (x[2], x[0]))


@pytest.fixture(scope="module")
def recovered(shared_bert: Path, domains: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One simulation of 4 rounds through the CLI's API, with every reply recorded."""
    from edgec.federated import simulate

    recorder = Recorder(tmp_path_factory.mktemp("sent"))
    out = tmp_path_factory.mktemp("out") / "recovered.ckpt"
    result = simulate(shared_bert, domains, out, _plan(rounds=4), mods=[recorder])
    return result, recorder


def test_federated_recovery_raises_every_devices_fidelity(recovered, shared_bert: Path) -> None:  # type: ignore[no-untyped-def]
    from edgec.models.checkpoint import load_checkpoint, read_checkpoint

    result, _ = recovered
    rounds = result.report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    start, end = rounds[0], rounds[-1]
    assert sorted(start["fidelity"]) == ["domain0", "domain1", "domain2"]
    # each device's held-out min cosine rises, and their mean by a clear margin
    for name, fid in end["fidelity"].items():
        assert fid["cos_min"] > start["fidelity"][name]["cos_min"], name
    assert end["mean_of_min_cos"] >= start["mean_of_min_cos"] + 0.002
    for r in rounds[1:]:
        assert len(r["clients"]) == 3 and r["rejected"] == [] and r["dropped"] == []
        assert r["applied"] and r["examples"] == 3 * 48  # 48 of 60 examples train, 12 held out
    # the output is a checkpoint with the report, the compression kept
    meta = read_checkpoint(result.output)
    assert meta["federated"]["rounds"] == rounds
    assert meta["storage"] == read_checkpoint(shared_bert)["storage"]
    model, _ = load_checkpoint(result.output)
    start_model, _ = load_checkpoint(shared_bert)
    weights = dict(model.named_parameters())
    for name, bits in meta["storage"]["shared_bits"].items():
        before = dict(start_model.named_parameters())[name].detach()
        after = weights[name].detach()
        for row_before, row_after in zip(before, after, strict=True):
            assert row_after.unique().numel() <= 2**bits
            # same assignment: weights equal before are equal after
            _, inverse = row_before.unique(return_inverse=True)
            for cluster in inverse.unique():
                assert row_after[inverse == cluster].unique().numel() == 1
    assert not np.allclose(
        weights["encoder.layer.0.attention.self.query.weight"].detach().numpy(),
        dict(start_model.named_parameters())["encoder.layer.0.attention.self.query.weight"]
        .detach()
        .numpy(),
    )


def test_everything_a_client_sends_is_a_named_float_tensor_of_the_trainable_set(
    recovered, shared_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    from edgec.federated.trainable import Storage, TrainableSet
    from edgec.models.checkpoint import load_checkpoint

    result, recorder = recovered
    model, _ = load_checkpoint(shared_bert)
    trainable = TrainableSet(model, Storage.of(shared_bert))
    train = recorder.sent(kind="train")
    evaluate = recorder.sent(kind="evaluate")
    assert len(train) == 3 * 4 and len(evaluate) == 3 * 5
    for _, _, _, records, arrays in train:
        assert set(records) == {"arrays", "metrics"}
        assert sorted(arrays) == trainable.names
        assert all(k.endswith(":codebook") for k in arrays)  # centroids only, for shared weights
        for name, value in arrays.items():
            assert value.dtype == np.float32 and value.shape == trainable.shapes[name]
        assert records["metrics"] == {"num-examples": "int", "train-loss": "float"}
    for _, _, _, records, arrays in evaluate:  # fidelity figures and the device's name only
        assert arrays is None
        assert records == {
            "metrics": {"cos-min": "float", "cos-mean": "float", "num-examples": "int"},
            "client": {"name": "str"},
        }
    # the bytes the report counts are these updates
    ups = {r["bytes_up_per_client"] for r in result.report["rounds"][1:]}
    assert len(ups) == 1
    up = ups.pop()
    assert trainable.nbytes() <= up <= trainable.nbytes() + 200 * len(trainable.names)


def test_corrupted_updates_are_rejected_and_logged_never_averaged(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    from edgec.federated import simulate
    from edgec.federated.trainable import Storage, TrainableSet
    from edgec.models.checkpoint import load_checkpoint

    first = "encoder.layer.0.attention.self.query.weight:codebook"

    # device 0 is honest; 1 sends NaN in round 1, a wrong shape in round 2; 2 a wrong name
    def nan_then_shape(arrays: dict[str, np.ndarray], round_: int) -> None:
        if round_ == 1:
            arrays[first][0, 0] = np.nan
        else:
            arrays[first] = arrays[first][:, :2].copy()

    def rename(arrays: dict[str, np.ndarray], round_: int) -> None:
        arrays["pooler.dense.weight"] = arrays.pop(first)

    recorder = Recorder(tmp_path / "sent", {1: nan_then_shape, 2: rename})
    recorder.folder.mkdir()
    result = simulate(shared_bert, domains, tmp_path / "out.ckpt", _plan(rounds=2), mods=[recorder])
    rounds = result.report["rounds"]
    for r in rounds[1:]:
        assert len(r["clients"]) == 1 and len(r["rejected"]) == 2
    reasons = [x["reason"] for r in rounds[1:] for x in r["rejected"]]
    assert any("NaN" in x for x in reasons)
    assert any("shape [64, 2], not [64, 4]" in x for x in reasons)
    assert any("unknown pooler.dense.weight" in x and f"missing {first}" in x for x in reasons)
    # never averaged: the model is exactly the honest device's last update, on its grid
    honest = recorder.sent(partition=0, kind="train")[-1][4]
    model, _ = load_checkpoint(shared_bert)
    trainable = TrainableSet(model, Storage.of(shared_bert))
    trainable.apply(model, honest)
    expected = trainable.extract(model)
    recovered_model, _ = load_checkpoint(result.output)
    got = trainable.extract(recovered_model)
    for name in trainable.names:
        np.testing.assert_array_equal(got[name], expected[name])


def test_simulate_cli_writes_the_checkpoint_and_prints_the_table(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli.ckpt"
    result = run_edgec(
        "federate", "simulate", str(shared_bert), "--clients", str(domains), "--rounds", "1",
        "--local-steps", "2", "--batch-size", "8", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "held-out min cosine per device" in result.stdout
    assert "domain0" in result.stdout and (out / "checkpoint.json").is_file()


def test_bad_options_are_clear_errors_and_leave_nothing(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never.ckpt"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--clients", str(empty), "--rounds", "1"], "holds no client data files"),
        (["--clients", str(domains), "--rounds", "0"], "rounds must be >= 1"),
        (["--clients", str(domains), "--rounds", "1", "--min-clients", "4"], "only 3 client"),
        (
            ["--clients", str(domains), "--rounds", "1", "--aggregation", "fedprox"],
            "fedprox needs a proximal mu",
        ),
    ]
    for args, message in cases:
        result = run_edgec("federate", "simulate", str(shared_bert), *args, "-o", str(out))
        assert result.returncode == 11, result.stderr
        assert message in result.stderr
    assert not out.exists()
    result = run_edgec(
        "federate", "simulate", str(tmp_path / "nope"), "--clients", str(domains),
        "--rounds", "1", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr


def test_centroid_updates_of_minilm_lowbit_are_a_twentieth_of_the_weights(
    minilm_lowbit: tuple[Path, Path],
) -> None:
    """The encodings ``balanced`` uses (4-bit Linears on the int8 grid, 3-bit embeddings):
    an update is the codebooks, at most 1/20 of the fp32 weights."""
    from edgec.federated.trainable import Storage, TrainableSet
    from edgec.models.checkpoint import load_checkpoint

    ckpt, _ = minilm_lowbit
    model, _ = load_checkpoint(ckpt)
    trainable = TrainableSet(model, Storage.of(ckpt))
    full = sum(p.numel() * 4 for p in model.parameters())
    assert trainable.mode == "centroids"
    assert trainable.nbytes() * 20 <= full
    # round trip: the codebooks rebuild the weights exactly
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable.apply(model, trainable.extract(model))
    for name, param in model.named_parameters():
        assert np.array_equal(param.detach().numpy(), before[name].numpy()), name


# --- deployment: a real SuperLink and SuperNodes, TLS and node authentication (issue 17) -----


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deployment_with_tls_and_node_auth_finishes_when_a_node_dies_mid_round(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    """A SuperLink (TLS, SuperNode authentication) and two listed SuperNodes as processes; a
    third device of the same secrets, with a valid certificate but not listed, is refused; one
    listed node is killed while round 2 trains: that round completes with the other, and so
    does the run."""
    import threading

    from edgec.federated import FederatedPlan, LocalTraining
    from edgec.federated.deploy import serve, supernode
    from edgec.runtimes.cluster_secrets import create_cluster_secrets

    secrets = create_cluster_secrets(tmp_path / "secrets", ["coordinator", "a", "b", "c"])
    port = _free_port()
    address = f"127.0.0.1:{port}"
    plan = FederatedPlan(
        rounds=2,
        min_clients=2,
        round_timeout_s=120,  # longer than Flower's 60 s to declare a silent node lost
        start_timeout_s=180,
        local=LocalTraining(steps=10, lr=1e-3, batch_size=8),
    )
    lines: list[str] = []
    registered, training_2 = threading.Event(), threading.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith("devices allowed to join"):
            registered.set()
        if line.startswith("round 2/2: training on"):
            training_2.set()

    outcome: dict[str, Any] = {}

    def coordinate() -> None:
        try:
            outcome["result"] = serve(
                shared_bert,
                tmp_path / "out.ckpt",
                plan,
                port=port,
                secrets=secrets.root,
                device="coordinator",
                allow=["a", "b"],
                say=on_line,
            )
        except BaseException as exc:  # the test thread reports it
            outcome["error"] = exc

    thread = threading.Thread(target=coordinate)
    thread.start()
    assert registered.wait(120), "\n".join(lines)
    files = sorted(domains.glob("*.npz"))
    node = {"secrets": secrets.root}
    with (
        supernode(address, shared_bert, files[0], device="a", **{**node, "port": _free_port()}),
        supernode(
            address, shared_bert, files[1], device="b", **{**node, "port": _free_port()}
        ) as b,
        supernode(
            address,
            shared_bert,
            files[2],
            device="c",
            log=tmp_path / "c.log",
            **{**node, "port": _free_port()},
        ) as c,
    ):
        assert training_2.wait(300), "\n".join(lines)
        os.killpg(b.pid, signal.SIGKILL)
        thread.join(600)
        assert c.poll() is not None and c.returncode != 0  # refused: it gave up
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert "Failed to activate SuperNode" in (tmp_path / "c.log").read_text()
    report = outcome["result"].report
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    names = {n: f["node"] for n, f in rounds[0]["fidelity"].items()}
    # c never took part (once, in a fresh CI run, round 0 held only b: the server's lines
    # say which nodes it saw)
    assert sorted(names) == ["a", "b"], "\n".join(lines)
    assert sorted(rounds[1]["clients"]) == sorted(names.values())
    assert rounds[2]["clients"] == [names["a"]] and rounds[2]["applied"]
    assert [d["node"] for d in rounds[2]["dropped"]] == [names["b"]]
    assert list(rounds[2]["fidelity"]) == ["a"]
    assert (tmp_path / "out.ckpt" / "checkpoint.json").is_file()


def test_deployment_refuses_to_run_without_secrets_unless_insecure(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    files = sorted(domains.glob("*.npz"))
    result = run_edgec(
        "federate", "serve", str(shared_bert), "--rounds", "1", "--min-clients", "1",
        "-o", str(tmp_path / "out.ckpt"),
    )  # fmt: skip
    assert result.returncode == 11 and "--insecure" in result.stderr
    result = run_edgec(
        "federate", "join", "127.0.0.1:1", "--data", str(files[0]), "--ckpt", str(shared_bert)
    )
    assert result.returncode == 11 and "--insecure" in result.stderr
    result = run_edgec(
        "federate", "join", "127.0.0.1:1", "--data", str(files[0]), "--ckpt", str(shared_bert),
        "--secrets", str(tmp_path / "none"), "--device", "a",
    )  # fmt: skip
    assert result.returncode == 11 and str(tmp_path / "none") in result.stderr


def test_fedprox_keeps_a_devices_update_near_the_global_model(
    shared_bert: Path, domains: Path
) -> None:
    """The proximal term FedProx sends (``proximal-mu``) pulls the local training towards the
    weights the round started from: the same steps move the codebooks less."""
    from edgec.federated import LocalTraining
    from edgec.federated.local import Device

    device = Device(shared_bert, sorted(domains.glob("*.npz"))[0])
    start = device.trainable.extract(device.model)

    def distance(mu: float) -> float:
        plan = LocalTraining(steps=8, lr=1e-2, batch_size=8, proximal_mu=mu)
        trained, _ = device.train(start, plan, 1, 1, seed=0)
        return float(sum(((trained[n] - start[n]) ** 2).sum() for n in start))

    free, held = distance(0.0), distance(1e4)
    assert 0 < held < free / 2


def test_secure_aggregation_averages_what_the_devices_computed_and_only_that(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    """Under SecAgg+ the server unmasks only the sum: the model it writes is the average of
    the updates the devices computed (seen here inside each device, before masking), up to
    the protocol's quantization, and the report names who took part."""
    from edgec.federated import simulate
    from edgec.federated.trainable import Storage, TrainableSet
    from edgec.models.checkpoint import load_checkpoint, read_checkpoint

    (tmp_path / "sent").mkdir()
    recorder = Recorder(tmp_path / "sent")
    plan = _plan(rounds=1, secure_aggregation=True)
    result = simulate(shared_bert, domains, tmp_path / "out.ckpt", plan, mods=[recorder])
    done = result.report["rounds"][1]
    assert done["secure"] and done["applied"] and done["rejected"] == []
    assert len(done["clients"]) == 3 and done["examples"] == 3 * 48
    assert done["bytes_up_per_client"] > 0 and done["bytes_down_per_client"] > 0
    assert read_checkpoint(result.output)["federated"]["plan"]["secure_aggregation"]

    model, _ = load_checkpoint(shared_bert)
    trainable = TrainableSet(model, Storage.of(shared_bert))
    sent = [s for s in recorder.sent(kind="train") if s[2] == 1]
    assert len(sent) == 3  # one legacy FitRes a device, tensors in the trainable set's order
    updates = [{n: arrays[str(i)] for i, n in enumerate(trainable.names)} for *_, arrays in sent]
    average = {n: np.mean([u[n] for u in updates], axis=0) for n in trainable.names}
    trainable.apply(model, average)  # on the storage grid, as the run writes its output
    expected = trainable.extract(model)
    got = trainable.extract(load_checkpoint(result.output)[0])
    for name in trainable.names:
        gap = np.abs(got[name] - expected[name])
        # one grid step where the protocol's 1e-5 quantization crossed a rounding boundary
        assert gap.max() < 2e-3 and np.mean(gap < 1e-4) > 0.9, name  # measured: 0.96 at worst

    def distance(to: dict[str, np.ndarray]) -> float:
        return float(sum(np.abs(got[n] - to[n]).sum() for n in trainable.names))

    # the average of the three, not one device's update passed through
    assert 3 * distance(expected) < min(distance(u) for u in updates)


def test_secure_aggregation_needs_three_devices_and_an_update_in_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device checks its own update before SecAgg+ masks it (the server cannot), and a plan
    with fewer than three devices is refused."""
    import flwr.compat.common.recorddict_compat as compat
    from edgec.federated import FederatedPlan
    from edgec.federated.secure import MAX_WEIGHT, secure_train
    from flwr.app import Message, MessageType
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.supercore.task_identity import TaskIdentity

    from edgec.errors import FederatedError

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ClientApp's process has set
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    with pytest.raises(FederatedError, match="secure aggregation needs min clients >= 3"):
        FederatedPlan(rounds=1, min_clients=2, secure_aggregation=True)

    names = ["a:codebook", "b"]
    start = [np.zeros((2, 4), np.float32), np.ones(3, np.float32)]
    ins = FitIns(ndarrays_to_parameters(start), {"server-round": 1})
    msg = Message(
        content=compat.fitins_to_recorddict(ins, keep_input=True),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )

    def trains_to(value: float) -> Any:
        return lambda arrays, config: ({n: a + value for n, a in arrays.items()}, 0.5)

    reply = secure_train(msg, names, 5 * MAX_WEIGHT, trains_to(0.25))
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == MAX_WEIGHT  # a device counts for MAX_WEIGHT examples at most
    with pytest.raises(FederatedError, match="update of a:codebook is not finite"):
        secure_train(msg, names, 10, trains_to(float("nan")))
    with pytest.raises(FederatedError, match="clipping range"):
        secure_train(msg, names, MAX_WEIGHT, trains_to(100.0))
    with pytest.raises(FederatedError, match="sent 2 tensors"):
        secure_train(msg, [*names, "c"], 10, trains_to(0.0))


class FailsOnce:
    """A client mod (inside SecAgg+'s) under which one device fails while it trains."""

    def __init__(self, partition: int):
        self.partition = partition

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        if int(context.node_config["partition-id"]) == self.partition and (
            "fitins.config" in msg.content.config_records
        ):
            raise RuntimeError("this device fails while it trains")
        return call_next(msg, context)


def test_secure_round_completes_without_a_device_that_fails_mid_round(
    shared_bert: Path, domains: Path, tmp_path: Path
) -> None:
    """One of three devices fails after the keys are shared: the other two are unmasked and
    averaged, and the round says who took part."""
    from edgec.federated import simulate

    plan = _plan(rounds=1, secure_aggregation=True)
    result = simulate(shared_bert, domains, tmp_path / "out.ckpt", plan, mods=[FailsOnce(0)])
    done = result.report["rounds"][1]
    assert done["applied"] and len(done["clients"]) == 2 and done["examples"] == 2 * 48
    assert sorted(done["fidelity"]) == ["domain0", "domain1", "domain2"]  # all still measure
