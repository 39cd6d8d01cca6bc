"""Secure aggregation of a federated round with Flower's SecAgg+: the coordinator learns the
devices' weighted average, never one device's update.

A secure round takes the place of a plain round's exchange in ``apps.run_rounds``: Flower's
``SecAggPlusWorkflow`` runs its four stages with the devices (keys, key shares, masked updates,
unmasking), and each device's ``secure_mod`` answers them; a device trains, as in a plain round,
when the workflow collects the masked updates. The workflow speaks Flower's legacy ``FitIns`` /
``FitRes`` records, so the trainable tensors travel as a list in ``TrainableSet.names`` order.

What secure aggregation changes, and why:

- The coordinator cannot check one update: it never sees one. Each device checks its own (finite,
  inside the clipping range) before masking it, and leaves the round when it fails; the
  coordinator checks the average it unmasks (names, shapes, finite) and keeps the model when
  that fails.
- Updates are weighted by examples and quantized onto ``2**22`` steps of ``[-8, 8]`` before
  masking (Flower's defaults), and a device counts for at most ``MAX_WEIGHT`` examples. A
  codebook value then moves by at most about 1e-5, finer than its fp16 storage at 0.05.
- It needs three devices at least: with two, each could subtract its own update from the
  average and read the other's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from edgec.errors import FederatedError

MIN_DEVICES = 3
MAX_WEIGHT = 1000  # examples a device counts for, at most, in a secure average
CLIPPING_RANGE = 8.0  # Flower's default: weighted update values must lie in [-8, 8]


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a stage of a SecAgg+ round (it carries the protocol's configs)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secure_mod(msg: Message, context: Any, call_next: Callable[[Message, Any], Message]) -> Message:
    """Client mod: SecAgg+ for the stages of a secure round; every other message passes."""
    if is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_train(
    msg: Message,
    names: list[str],
    examples: int,
    train: Callable[
        [dict[str, np.ndarray], Mapping[str, Any]], tuple[dict[str, np.ndarray], float]
    ],
) -> Message:
    """A device's answer to the masked-update stage: ``train`` on the global tensors of
    ``msg`` (legacy ``FitIns``), its update checked and returned as a ``FitRes``, which
    ``secure_mod`` masks before it leaves the device."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    values = parameters_to_ndarrays(fitins.parameters)
    if len(values) != len(names):
        raise FederatedError(
            f"the server sent {len(values)} tensors for a secure round; this device trains "
            f"{len(names)}"
        )
    trained, loss = train(dict(zip(names, values, strict=True)), fitins.config)
    weight = min(examples, MAX_WEIGHT)
    for name in names:
        scaled = trained[name] * (weight / MAX_WEIGHT)
        if not np.isfinite(scaled).all() or np.abs(scaled).max(initial=0.0) > CLIPPING_RANGE:
            raise FederatedError(
                f"this device's update of {name} is not finite or lies outside the secure "
                f"aggregation's clipping range (+-{CLIPPING_RANGE} once weighted): not sent"
            )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([trained[n] for n in names]),
        num_examples=weight,
        metrics={"train-loss": loss},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@dataclass
class SecureRound:
    """What a secure round gave: the average (None when there is none), the devices in it (the
    server knows who sent a masked update, not what it held), their examples and training
    losses, and the bytes each way."""

    average: dict[str, np.ndarray] | None
    clients: list[int]
    examples: int
    train_loss: dict[str, float]
    bytes_down: int
    bytes_up: int
    reason: str = ""


class _Counted:
    """A grid that counts the bytes of every message it sends and receives."""

    def __init__(self, grid: Any):
        self._grid = grid
        self.down = 0
        self.up = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Any:
        sent = list(messages)
        self.down += sum(_nbytes(m) for m in sent)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        self.up += sum(_nbytes(r) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _nbytes(msg: Message) -> int:
    """Bytes of a message's records: arrays, metrics, and configs (whose lists of keys and
    ciphertexts ``ConfigRecord.count_bytes`` does not count)."""
    content = msg.content
    configs = [v for r in content.config_records.values() for v in r.values()]
    return (
        sum(r.count_bytes() for r in content.array_records.values())
        + sum(r.count_bytes() for r in content.metric_records.values())
        + sum(_value_bytes(v) for v in configs)
    )


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 8  # a number, as the protobuf carries it


def secure_round(
    grid: Any,
    context: Any,
    number: int,
    arrays: dict[str, np.ndarray],
    names: list[str],
    config: Mapping[str, Any],
    timeout_s: float,
) -> SecureRound:
    """One round of training on every connected device, aggregated with SecAgg+."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    nodes = sorted(grid.get_node_ids())
    if len(nodes) < MIN_DEVICES:
        reason = f"{len(nodes)} device(s) connected; a secure round needs {MIN_DEVICES}"
        return SecureRound(None, [], 0, {}, 0, 0, reason)
    reported: dict[int, tuple[int, float]] = {}  # node -> (examples, train loss)

    class Recording(FedAvg):  # the legacy strategy, noting who is in the average
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            for proxy, res in results:
                loss = res.metrics.get("train-loss", float("nan"))
                reported[int(proxy.node_id)] = (int(res.num_examples), float(loss))
            return super().aggregate_fit(server_round, results, failures)

    strategy = Recording(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=MIN_DEVICES,
        min_available_clients=MIN_DEVICES,
        on_fit_config_fn=lambda _: dict(config),
    )
    legacy = LegacyContext(context, strategy=strategy)  # the workflow reads no ServerConfig
    for node in nodes:
        legacy.client_manager.register(GridClientProxy(node, grid, context.run_id))
    start = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([arrays[n] for n in names]), keep_input=True
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = start
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: number})
    counted = _Counted(grid)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every device holds a share of every other's keys
        reconstruction_threshold=0.5,  # half of them unmask a device that dropped out
        max_weight=float(MAX_WEIGHT),
        clipping_range=CLIPPING_RANGE,
        timeout=timeout_s,
    )
    workflow(counted, legacy)  # type: ignore[arg-type]
    result = legacy.state.array_records[MAIN_PARAMS_RECORD]
    clients = sorted(reported)
    losses = {str(n): reported[n][1] for n in clients}
    examples = sum(e for e, _ in reported.values())
    if not reported or result is start:
        reason = "the secure aggregation did not complete"
        return SecureRound(None, clients, examples, losses, counted.down, counted.up, reason)
    values = parameters_to_ndarrays(compat.arrayrecord_to_parameters(result, keep_input=True))
    if len(values) != len(names):
        reason = f"the average has {len(values)} tensors, not {len(names)}"
        return SecureRound(None, clients, examples, losses, counted.down, counted.up, reason)
    average = {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values, strict=True)}
    return SecureRound(average, clients, examples, losses, counted.down, counted.up)
