"""The Flower apps of federated recovery: a ServerApp that runs the rounds, a ClientApp per device.

The server holds the compressed checkpoint and no data. Each round it sends the trainable set
(``federated.trainable``) to every connected device, waits up to the round timeout, leaves out
devices that dropped, failed or timed out, rejects updates that are not a float32 tensor of
the right name and shape with finite values (logged, never averaged), and averages the rest
with a Flower strategy (FedAvg weighted by examples, or FedProx). Then every device measures
the new model on its held-out split. The result is a checkpoint whose record holds the
per-round report: clients, rejections, bytes down and up, fidelity per device. With
``secure_aggregation``, each round's updates are averaged under Flower's SecAgg+ instead
(``federated.secure``): the server sees only their average.

The same two apps run in Flower's simulation engine (``simulate``) and in a deployment
(``edgec.federated.deploy``): a SuperLink runs the ServerApp, a SuperNode per device the
ClientApp.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from edgec.federated import secure
from edgec.federated.local import Device, LocalTraining
from edgec.federated.trainable import Mode, Storage, TrainableSet
from edgec.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from tqdm import tqdm

from edgec.errors import FederatedError

log = logging.getLogger("edgec.federated")

Aggregation = Literal["fedavg", "fedprox"]
AGGREGATIONS: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx}
DATA_SUFFIXES = (".txt", ".jsonl", ".npz")
WEIGHT_KEY = "num-examples"


@dataclass(frozen=True, kw_only=True)
class FederatedPlan:
    """A federated run: ``rounds``; ``min_clients`` connected before round 1 starts (waiting up
    to ``start_timeout_s``); each round waits ``round_timeout_s`` for replies and needs
    ``min_updates`` valid updates to change the model; the aggregation (``secure_aggregation``:
    under SecAgg+, with three devices at least); what trains."""

    rounds: int
    min_clients: int = 2
    min_updates: int = 1
    round_timeout_s: float = 600.0
    start_timeout_s: float = 600.0
    aggregation: Aggregation = "fedavg"
    local: LocalTraining = field(default_factory=LocalTraining)
    mode: Mode = "auto"
    seed: int = 0
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise FederatedError(f"rounds must be >= 1, got {self.rounds}")
        if self.min_clients < 1:
            raise FederatedError(f"min clients must be >= 1, got {self.min_clients}")
        if not 1 <= self.min_updates <= self.min_clients:
            raise FederatedError(
                f"min updates must be 1..min clients ({self.min_clients}), got {self.min_updates}"
            )
        if self.round_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise FederatedError("timeouts must be > 0 seconds")
        if self.aggregation not in AGGREGATIONS:
            raise FederatedError(
                f"unknown aggregation {self.aggregation!r}; known: {', '.join(AGGREGATIONS)}"
            )
        if self.aggregation == "fedprox" and self.local.proximal_mu <= 0:
            raise FederatedError("fedprox needs a proximal mu > 0")
        if self.secure_aggregation and self.min_clients < secure.MIN_DEVICES:
            raise FederatedError(
                f"secure aggregation needs min clients >= {secure.MIN_DEVICES} (with two, each "
                f"device could read the other's update off the average), got {self.min_clients}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- server ---------------------------------------------------------------------------------


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FederatedError(
                f"only {len(nodes)} device(s) connected within {timeout_s:.0f} s; "
                f"the run needs {count} (--min-clients)"
            )
        time.sleep(0.5)
    return nodes


def _exchange(
    grid: Grid, messages: list[Message], timeout_s: float, label: str
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Send ``messages``, collect replies until all came or ``timeout_s`` passed, with a
    progress bar; (node, reply) pairs and the nodes that never answered. The node is the one
    the message went to: an error reply the SuperLink makes for a lost node is not from it."""
    sent = {
        mid: m.metadata.dst_node_id
        for mid, m in zip(grid.push_messages(messages), messages, strict=True)
    }
    pending = dict(sent)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(pending), desc=label, unit="device", leave=True) as bar:
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(pending)))
            for reply in got:
                pending.pop(reply.metadata.reply_to_message_id, None)
            replies += got
            if got:
                bar.update(len(got))
            if pending:
                time.sleep(0.2)
    return [(sent[r.metadata.reply_to_message_id], r) for r in replies], sorted(pending.values())


def _arrays(record: ArrayRecord) -> dict[str, Any]:
    return {name: array.numpy() for name, array in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _check_update(reply: Message, trainable: TrainableSet) -> str | None:
    """Why a train reply cannot be averaged (None when it can)."""
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(WEIGHT_KEY)
    if not isinstance(examples, int) or examples < 1:
        return f"{WEIGHT_KEY} must be a positive integer, got {examples!r}"
    try:
        arrays = _arrays(next(iter(content.array_records.values())))
    except (ValueError, TypeError) as exc:
        return f"arrays do not decode: {exc}"
    problems = trainable.problems(arrays)
    return "; ".join(problems) if problems else None


@dataclass
class RunResult:
    """What a run produced: the output checkpoint and its federated report."""

    output: Path
    report: dict[str, Any]


def run_rounds(
    grid: Grid,
    checkpoint: Path,
    output: Path,
    plan: FederatedPlan,
    say: Callable[[str], None] = print,
    context: Context | None = None,
) -> RunResult:
    """The ServerApp's work: ``plan.rounds`` rounds from ``checkpoint``; writes ``output``
    (``context``: the ServerApp's, which a secure round needs)."""
    model, spec = load_checkpoint(checkpoint)
    storage = Storage.of(checkpoint)
    trainable = TrainableSet(model, storage, plan.mode)
    arrays = trainable.extract(model)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    strategy = AGGREGATIONS[plan.aggregation](
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        **({"proximal_mu": plan.local.proximal_mu} if plan.aggregation == "fedprox" else {}),
    )
    say(
        f"trainable set {trainable.mode}: {len(trainable.names)} tensors, "
        f"{trainable.nbytes():,} bytes a client a round ({trainable.nbytes() / full_bytes:.4f} "
        f"of the {full_bytes:,} bytes of the full weights)"
    )
    say(f"waiting for {plan.min_clients} device(s)")
    nodes = _wait_for_nodes(grid, plan.min_clients, plan.start_timeout_s)
    say(f"{len(nodes)} device(s) connected: nodes {', '.join(map(str, sorted(nodes)))}")
    base = {
        "fingerprint": trainable.fingerprint(),
        "rounds": plan.rounds,
        "local-steps": plan.local.steps,
        "lr": plan.local.lr,
        "batch-size": plan.local.batch_size,
        "dropout": plan.local.dropout,
        "seed": plan.seed,
    }
    rounds: list[dict[str, Any]] = [_evaluate(grid, 0, arrays, base, plan, say)]
    for number in range(1, plan.rounds + 1):
        started = time.perf_counter()
        config = ConfigRecord({**base, "server-round": number})
        if plan.secure_aggregation:
            arrays, facts = _secure_round(
                grid, context, number, arrays, trainable, config, plan, say
            )
        else:
            arrays, facts = _plain_round(
                grid, strategy, number, arrays, trainable, config, plan, say
            )
        entry = _evaluate(grid, number, arrays, base, plan, say)
        entry.update({**facts, "seconds": round(time.perf_counter() - started, 2)})
        rounds.append(entry)
    trainable.apply(model, arrays)  # on the storage grid, as the devices measured it
    report = {
        "plan": plan.to_json(),
        "start": str(checkpoint),
        "trainable": {
            "mode": trainable.mode,
            "tensors": len(trainable.names),
            "bytes_per_update": trainable.nbytes(),
            "full_weights_bytes": full_bytes,
        },
        "rounds": rounds,
    }
    _write_checkpoint(checkpoint, output, model, spec, report)
    say(f"wrote {output}")
    return RunResult(output, report)


def _plain_round(
    grid: Grid,
    strategy: FedAvg,
    number: int,
    arrays: dict[str, np.ndarray],
    trainable: TrainableSet,
    config: ConfigRecord,
    plan: FederatedPlan,
    say: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A round in the clear: every update checked on its own, the valid ones averaged by the
    strategy. The new global tensors, and the round's facts for the report."""
    messages = list(strategy.configure_train(number, _record(arrays), config, grid))
    down = _record(arrays).count_bytes() * len(messages)
    say(f"round {number}/{plan.rounds}: training on {len(messages)} device(s)")
    replies, silent = _exchange(
        grid, messages, plan.round_timeout_s, f"round {number}/{plan.rounds} training"
    )
    valid, dropped, rejected, up = [], [], [], 0
    for node in silent:
        dropped.append({"node": node, "reason": f"no reply in {plan.round_timeout_s:.0f} s"})
    for node, reply in replies:
        if reply.has_error():
            dropped.append({"node": node, "reason": reply.error.reason})
            continue
        up += sum(r.count_bytes() for r in reply.content.array_records.values())
        reason = _check_update(reply, trainable)
        if reason is None:
            valid.append(reply)
        else:
            log.warning("round %d: update from node %d rejected: %s", number, node, reason)
            say(f"round {number}: update from node {node} rejected: {reason}")
            rejected.append({"node": node, "reason": reason})
    for item in dropped:
        say(f"round {number}: node {item['node']} left out: {item['reason']}")
    applied = len(valid) >= plan.min_updates
    if applied:
        aggregated, _ = strategy.aggregate_train(number, valid)
        if aggregated is None:
            raise FederatedError(f"round {number}: the strategy returned no model")
        arrays = {k: v.astype(np.float32) for k, v in _arrays(aggregated).items()}
    else:
        say(
            f"round {number}: {len(valid)} valid update(s), fewer than {plan.min_updates}: "
            "the model is unchanged"
        )
    return arrays, {
        "clients": sorted(r.metadata.src_node_id for r in valid),
        "examples": sum(int(_metric(r, WEIGHT_KEY)) for r in valid),
        "train_loss": {str(r.metadata.src_node_id): _metric(r, "train-loss") for r in valid},
        "dropped": dropped,
        "rejected": rejected,
        "applied": applied,
        "bytes_down": down,
        "bytes_up": up,
        "bytes_down_per_client": down // max(1, len(messages)),
        "bytes_up_per_client": up // max(1, len(valid) + len(rejected)),
    }


def _secure_round(
    grid: Grid,
    context: Context | None,
    number: int,
    arrays: dict[str, np.ndarray],
    trainable: TrainableSet,
    config: ConfigRecord,
    plan: FederatedPlan,
    say: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A round under SecAgg+ (``federated.secure``): only the average is seen, and checked."""
    if context is None:
        raise FederatedError("a secure round needs the ServerApp's context")
    say(f"round {number}/{plan.rounds}: training under secure aggregation (SecAgg+)")
    done = secure.secure_round(
        grid, context, number, arrays, trainable.names, config, plan.round_timeout_s
    )
    reason = done.reason
    if done.average is not None:
        problems = trainable.problems(done.average)
        reason = "the average does not fit: " + "; ".join(problems) if problems else ""
    applied = not reason and len(done.clients) >= plan.min_updates
    if applied and done.average is not None:
        arrays = done.average
    else:
        reason = reason or f"{len(done.clients)} update(s), fewer than {plan.min_updates}"
        log.warning("round %d: secure aggregation gave no model: %s", number, reason)
        say(f"round {number}: the model is unchanged: {reason}")
    contributors = max(1, len(done.clients))
    return arrays, {
        "clients": done.clients,
        "examples": done.examples,
        "train_loss": done.train_loss,
        "dropped": [],  # SecAgg+ leaves out who did not answer; the clients list who did
        "rejected": [{"average": reason}] if reason and done.average is not None else [],
        "applied": applied,
        "secure": True,
        "bytes_down": done.bytes_down,
        "bytes_up": done.bytes_up,
        "bytes_down_per_client": done.bytes_down // contributors,
        "bytes_up_per_client": done.bytes_up // contributors,
    }


def _metric(reply: Message, key: str) -> float:
    return float(next(iter(reply.content.metric_records.values())).get(key, math.nan))  # type: ignore[arg-type]


def _evaluate(
    grid: Grid,
    number: int,
    arrays: dict[str, np.ndarray],
    base: dict[str, Any],
    plan: FederatedPlan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every connected device's fidelity of the current model on its held-out split."""
    config = ConfigRecord({**base, "server-round": number})
    record = RecordDict({"arrays": _record(arrays), "config": config})
    messages = [
        Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    label = "start: evaluating" if number == 0 else f"round {number}/{plan.rounds} evaluating"
    replies, silent = _exchange(grid, messages, plan.round_timeout_s, label)
    fidelity: dict[str, dict[str, Any]] = {}
    for node in silent:
        say(f"{label}: node {node} gave no fidelity: no reply in {plan.round_timeout_s:.0f} s")
    for node, reply in replies:
        if reply.has_error() or not reply.content.metric_records:
            reason = reply.error.reason if reply.has_error() else "a reply without metrics"
            say(f"{label}: node {node} gave no fidelity: {reason}")
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        names = reply.content.config_records.get("client")
        name = str(names.get("name")) if names else str(node)
        fidelity[name] = {
            "node": node,
            "cos_min": float(metrics["cos-min"]),  # type: ignore[arg-type]
            "cos_mean": float(metrics["cos-mean"]),  # type: ignore[arg-type]
            "heldout": int(metrics[WEIGHT_KEY]),  # type: ignore[arg-type]
        }
    mins = [f["cos_min"] for f in fidelity.values()]
    entry = {
        "round": number,
        "fidelity": dict(sorted(fidelity.items())),
        "mean_of_min_cos": float(np.mean(mins)) if mins else None,
    }
    shown = ", ".join(f"{n} {f['cos_min']:.4f}" for n, f in sorted(fidelity.items()))
    say(f"{'start' if number == 0 else f'round {number}'}: held-out min cosine {shown}")
    return entry


def _write_checkpoint(
    start: Path, output: Path, model: Any, spec: Any, report: dict[str, Any]
) -> None:
    """The recovered checkpoint, written to a temporary sibling and renamed into place."""
    meta = read_checkpoint(start)
    record = {k: meta[k] for k in ("recipe", "steps", "report", "storage") if k in meta}
    record["federated"] = report
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_checkpoint(staging, model, spec, record)
        for extra in ("calibration.npz",):  # static int8 ranges travel with the checkpoint
            if (start / extra).is_file():
                shutil.copy2(start / extra, staging / extra)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def server_app(
    checkpoint: Path,
    output: Path,
    plan: FederatedPlan,
    results: list[RunResult] | None = None,
    say: Callable[[str], None] = print,
) -> ServerApp:
    """A ServerApp running ``run_rounds``; its result is appended to ``results`` when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_rounds(grid, checkpoint, output, plan, say, context)
        if results is not None:
            results.append(result)

    return app


# --- client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    """One device: its checkpoint, its data file, its name in the report, its teacher."""

    checkpoint: Path
    data: Path
    name: str
    teacher: str | None = None
    mode: Mode = "auto"


_DEVICES: dict[ClientSettings, Device] = {}  # loaded once per process


def _device(settings: ClientSettings) -> Device:
    if settings not in _DEVICES:
        _DEVICES[settings] = Device(
            settings.checkpoint, settings.data, settings.teacher, settings.mode
        )
    return _DEVICES[settings]


def _checked(device: Device, msg: Message) -> tuple[dict[str, np.ndarray], ConfigRecord]:
    config = msg.content.config_records["config"]
    arrays = _arrays(msg.content.array_records["arrays"])
    _check_model(device, arrays, config)
    return arrays, config


def _check_model(device: Device, arrays: dict[str, np.ndarray], config: Any) -> None:
    """The server's model must be this device's checkpoint's trainable set."""
    if config.get("fingerprint") != device.trainable.fingerprint():
        raise FederatedError(
            "the server's model is not this device's checkpoint (trainable-set fingerprints "
            "differ); join with the checkpoint the server federates"
        )
    problems = device.trainable.problems(arrays)
    if problems:
        raise FederatedError("the server sent a model that does not fit: " + "; ".join(problems))


def _train(
    device: Device, arrays: dict[str, np.ndarray], config: Any, context: Context
) -> tuple[dict[str, np.ndarray], float]:
    """One round of local training as the server's ``config`` asks."""
    plan = LocalTraining(
        steps=_number(config, "local-steps", int),
        lr=_number(config, "lr", float),
        batch_size=_number(config, "batch-size", int),
        proximal_mu=_number(config, "proximal-mu", float, 0.0),
        dropout=_flag(config, "dropout"),
    )
    number = _number(config, "server-round", int)
    seed = _number(config, "seed", int) * 100_003 + number * 1_009 + context.node_id % 1_000
    return device.train(arrays, plan, number, _number(config, "rounds", int), seed)


def _number(config: Any, key: str, kind: Callable[[Any], Any], default: Any = None) -> Any:
    """``config[key]`` as ``kind`` (int or float); a missing or non-number value is an error."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FederatedError(f"the server's config has {key} = {value!r}, not a number")
    return kind(value)


def _flag(config: Any, key: str) -> bool:
    """``config[key]`` as a bool (False when missing); any other value is an error."""
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise FederatedError(f"the server's config has {key} = {value!r}, not true or false")
    return value


def client_app(
    settings: Callable[[Context], ClientSettings], mods: Sequence[Any] = ()
) -> ClientApp:
    """A ClientApp: ``settings`` says from its context which device it is. It answers plain
    rounds and, through ``secure.secure_mod``, secure ones; ``mods`` run inside that one, so
    they see what the device computes (in a plain round, what it sends)."""
    app = ClientApp(mods=[secure.secure_mod, *mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _device(settings(context))
        if secure.is_secure(msg):  # the masked-update stage: the mod masks what this returns

            def checked_train(arrays: dict[str, np.ndarray], config: Any) -> Any:
                _check_model(device, arrays, config)
                return _train(device, arrays, config, context)

            return secure.secure_train(msg, device.trainable.names, device.examples, checked_train)
        arrays, config = _checked(device, msg)
        trained, loss = _train(device, arrays, config, context)
        metrics = MetricRecord({WEIGHT_KEY: device.examples, "train-loss": loss})
        return Message(RecordDict({"arrays": _record(trained), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        setting = settings(context)
        device = _device(setting)
        arrays, _ = _checked(device, msg)
        fid = device.evaluate(arrays)
        metrics = MetricRecord(
            {"cos-min": fid.cos_min, "cos-mean": fid.cos_mean, WEIGHT_KEY: device.heldout.size}
        )
        content = RecordDict({"metrics": metrics, "client": ConfigRecord({"name": setting.name})})
        return Message(content, reply_to=msg)

    return app


def node_settings(context: Context) -> ClientSettings:
    """A SuperNode's device from its ``--node-config`` (checkpoint, data, name, teacher)."""
    config = context.node_config
    missing = [k for k in ("checkpoint", "data", "name") if k not in config]
    if missing:
        raise FederatedError(f"the SuperNode's node config lacks {', '.join(missing)}")
    teacher = config.get("teacher")
    return ClientSettings(
        Path(str(config["checkpoint"])),
        Path(str(config["data"])),
        str(config["name"]),
        str(teacher) if teacher else None,
        str(config.get("mode", "auto")),  # checked by TrainableSet
    )


# --- simulation -----------------------------------------------------------------------------


def client_files(directory: Path) -> list[Path]:
    """The data files of a ``--clients`` directory, one device each, in name order."""
    if not directory.is_dir():
        raise FederatedError(f"--clients {str(directory)!r} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise FederatedError(f"{directory} holds no client data files ({', '.join(DATA_SUFFIXES)})")
    return files


def simulate(
    checkpoint: str | os.PathLike[str],
    clients: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    plan: FederatedPlan,
    teacher: str | None = None,
    say: Callable[[str], None] = print,
    mods: Sequence[Any] = (),
    cpus_per_client: float = 1.0,
) -> RunResult:
    """Run the apps in Flower's simulation engine (Ray), one device per data file."""
    from flwr.simulation import run_simulation

    ckpt = Path(checkpoint)
    read_checkpoint(ckpt)  # a clear error before the engine starts
    files = (
        client_files(Path(clients))
        if isinstance(clients, str | os.PathLike)
        else [Path(c) for c in clients]
    )
    if plan.min_clients > len(files):
        raise FederatedError(
            f"--min-clients {plan.min_clients} but only {len(files)} client file(s)"
        )
    settings = [
        ClientSettings(ckpt.resolve(), f.resolve(), f.stem, teacher, plan.mode) for f in files
    ]

    def by_partition(context: Context) -> ClientSettings:
        return settings[_number(context.node_config, "partition-id", int)]

    results: list[RunResult] = []
    run_simulation(
        server_app=server_app(ckpt, Path(output), plan, results, say),
        client_app=client_app(by_partition, mods),
        num_supernodes=len(files),
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    if not results:
        raise FederatedError("the federated run did not finish (see the log above)")
    return results[0]
