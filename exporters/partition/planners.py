"""The strategies: ``single``, ``pipeline``, ``data`` and ``auto``, one function each.

Each takes a ``Context`` (the analysed graph, the devices, the objective) and returns a ``Plan``
or raises ``DeviceError`` naming the device and the bytes it would need.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgec.exporters.partition.cost import CostTable
from edgec.exporters.partition.graph import GraphProfile, model_memory, session_memory
from edgec.exporters.partition.plan import OBJECTIVES, Objective, Plan, StagePlan
from edgec.runtimes.devices import DeviceProfile, DeviceSet

from edgec.errors import DeviceError
from edgec.table import human_bytes

MAX_PIPELINE_STAGES = 4


@dataclass
class Context:
    """Everything a planner reads. ``live_bytes[c]``: activation bytes alive at cut ``c``."""

    graph: GraphProfile
    devices: DeviceSet
    objective: Objective = "latency"
    costs: CostTable = field(init=False)
    live_bytes: list[int] = field(init=False)
    crossing: list[list[str]] = field(init=False)
    hop_bytes: list[int] = field(init=False)
    _rows: dict[int, tuple[list[int], list[int], list[int]]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DeviceError(f"unknown objective {self.objective!r}; known: {list(OBJECTIVES)}")
        self.costs = CostTable(self.graph, self.devices.devices)
        n = len(self.graph.nodes)
        self.crossing = [self.graph.crossing(c) for c in range(n + 1)]
        sizes = self.graph.tensor_bytes
        self.live_bytes = [sum(sizes[t] for t in names) for names in self.crossing]
        inputs = set(self.graph.inputs)
        self.hop_bytes = [
            sum(sizes[t] for t in names if t not in inputs) for names in self.crossing
        ]

    @property
    def size(self) -> int:
        return len(self.graph.nodes)

    def _row(self, start: int) -> tuple[list[int], list[int], list[int]]:
        """For each stop after ``start``: parameter bytes, the pinned part of them, and the
        peak live bytes of the segment."""
        if start not in self._rows:
            names: set[str] = set()
            total, pinned, peak = 0, 0, self.live_bytes[start]
            params, pins, peaks = [0], [0], [peak]
            for node, live in zip(
                self.graph.nodes[start:], self.live_bytes[start + 1 :], strict=True
            ):
                for name in node.params - names:
                    names.add(name)
                    total += self.graph.param_bytes[name]
                    if name in self.graph.pinned:
                        pinned += self.graph.param_bytes[name]
                peak = max(peak, live)
                params.append(total)
                pins.append(pinned)
                peaks.append(peak)
            self._rows[start] = (params, pins, peaks)
        return self._rows[start]

    def param_bytes(self, start: int, stop: int) -> int:
        return self._row(start)[0][stop - start]

    def memory_bytes(self, start: int, stop: int, share: float = 1.0) -> int:
        """What the segment's model holds at its peak: parameters as held (runtime-decoded ones
        twice, while loading) plus the largest set of live activations inside it."""
        params, pins, peaks = self._row(start)
        at = stop - start
        return model_memory(params[at], pins[at], int(peaks[at] * share))

    def process_bytes(self, start: int, stop: int) -> int:
        """Predicted resident bytes of the segment's process above the bare interpreter."""
        params, pins, peaks = self._row(start)
        at = stop - start
        return session_memory(params[at], pins[at], peaks[at])

    def fits(self, device: DeviceProfile, start: int, stop: int, share: float = 1.0) -> bool:
        budget = device.memory_bytes
        return budget is None or self.memory_bytes(start, stop, share) <= budget

    def assumptions(self, devices: list[str]) -> tuple[str, ...]:
        notes = []
        for name in dict.fromkeys(devices):
            missing = self.devices.device(name).assumed()
            if missing:
                notes.append(f"{name} has no measured {', '.join(missing)} (run profile-device)")
        return tuple(notes)

    def shape(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.graph.feeds_shape.items()}


def _stage(
    ctx: Context, index: int, device: str, start: int, stop: int, prev: str | None
) -> StagePlan:
    needed = {i for node in ctx.graph.model.graph.node[start:stop] for i in node.input}
    inputs = (
        tuple(t for t in ctx.crossing[start] if t in needed)
        if start
        else tuple(t for t in ctx.graph.inputs if t in needed)
    )
    later = set(ctx.crossing[stop]) if stop < ctx.size else set(ctx.graph.outputs)
    made = {o for node in ctx.graph.model.graph.node[start:stop] for o in node.output}
    outputs = tuple(sorted(made & later))
    bytes_in = sum(ctx.graph.tensor_bytes[t] for t in inputs if t not in ctx.graph.inputs)
    return StagePlan(
        name=f"stage{index}",
        device=device,
        start=start,
        stop=stop,
        flops=ctx.costs.segment_flops(start, stop),
        param_bytes=ctx.param_bytes(start, stop),
        memory_bytes=ctx.memory_bytes(start, stop),
        inputs=inputs,
        outputs=outputs,
        bytes_in=bytes_in,
        predicted_ms=ctx.costs.segment_ms(device, start, stop),
        transfer_in_ms=ctx.devices.transfer_ms(prev, device, bytes_in) if prev else 0.0,
    )


def _too_big(ctx: Context, devices: list[DeviceProfile], what: str) -> DeviceError:
    need = ctx.memory_bytes(0, ctx.size)
    budgets = ", ".join(
        f"{d.name} {human_bytes(d.memory_bytes)}" for d in devices if d.memory_bytes
    )
    return DeviceError(
        f"no {what} plan fits the memory budgets ({budgets}): the whole model needs "
        f"{need} bytes ({human_bytes(need)}) of parameters and activations"
    )


def plan_single(ctx: Context) -> Plan:
    """The whole model on the one device that runs it fastest and holds it."""
    options = [d for d in ctx.devices.devices if ctx.fits(d, 0, ctx.size)]
    if not options:
        raise _too_big(ctx, list(ctx.devices.devices), "single-device")
    best = min(options, key=lambda d: ctx.costs.segment_ms(d.name, 0, ctx.size))
    stage = _stage(ctx, 0, best.name, 0, ctx.size, None)
    return Plan(
        strategy="single",
        objective=ctx.objective,
        stages=(stage,),
        latency_ms=stage.predicted_ms,
        period_ms=stage.predicted_ms,
        planning_shape=ctx.shape(),
        reason=f"{best.name} is the fastest device that holds the whole model",
        assumptions=ctx.assumptions([best.name]),
    )


def _combine(objective: Objective, acc: float, stage_ms: float) -> float:
    return acc + stage_ms if objective == "latency" else max(acc, stage_ms)


def _pipeline_for(ctx: Context, order: tuple[DeviceProfile, ...]) -> tuple[float, list[int]] | None:
    """Best cuts for devices in ``order`` (every one used), by dynamic programming.

    ``best[j][p]``: the cost of running nodes ``[0, p)`` as the first ``j`` stages.
    """
    n, k, inf = ctx.size, len(order), float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j, device in enumerate(order, start=1):
        prev = order[j - 2].name if j > 1 else None
        for stop in range(1, n + 1):
            if j == k and stop != n:
                continue
            for start in range(j - 1, stop):
                if best[j - 1][start] == inf or not ctx.fits(device, start, stop):
                    continue
                hop = 0.0
                if prev is not None:
                    hop = ctx.devices.transfer_ms(prev, device.name, ctx.hop_bytes[start])
                cost = _combine(
                    ctx.objective,
                    best[j - 1][start],
                    ctx.costs.segment_ms(device.name, start, stop) + hop,
                )
                if cost < best[j][stop]:
                    best[j][stop], back[j][stop] = cost, start
    if best[k][n] == inf:
        return None
    cuts, stop = [n], n
    for j in range(k, 0, -1):
        stop = back[j][stop]
        cuts.append(stop)
    return best[k][n], cuts[::-1]


def _plan_from_cuts(ctx: Context, order: tuple[DeviceProfile, ...], cuts: list[int]) -> Plan:
    stages = []
    prev = None
    for index, device in enumerate(order):
        stages.append(_stage(ctx, index, device.name, cuts[index], cuts[index + 1], prev))
        prev = device.name
    latency = sum(s.predicted_ms + s.transfer_in_ms for s in stages)
    period = max(s.predicted_ms + s.transfer_in_ms for s in stages)
    return Plan(
        strategy="pipeline",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=latency,
        period_ms=period,
        planning_shape=ctx.shape(),
        assumptions=ctx.assumptions([d.name for d in order]),
        aggregation={"kind": "none"},
    )


def plan_pipeline(ctx: Context) -> Plan:
    """Contiguous segments of the topological order, one per device, cut by DP.

    Tries every ordering of 2..``MAX_PIPELINE_STAGES`` devices; a device is left out where
    adding it does not help the objective.
    """
    devices = ctx.devices.devices
    best: tuple[float, tuple[DeviceProfile, ...], list[int]] | None = None
    for k in range(2, min(len(devices), MAX_PIPELINE_STAGES) + 1):
        for order in itertools.permutations(devices, k):
            found = _pipeline_for(ctx, order)
            if found and (best is None or found[0] < best[0] - 1e-12):
                best = (found[0], order, found[1])
    if best is None:
        if len(devices) < 2:
            raise DeviceError("a pipeline needs at least two devices; the profile lists one")
        raise _too_big(ctx, list(devices), "pipeline")
    plan = _plan_from_cuts(ctx, best[1], best[2])
    hops = ", ".join(
        f"{s.name}: {len(s.inputs)} tensors, {human_bytes(s.bytes_in)}" for s in plan.stages[1:]
    )
    return replace(plan, reason=f"cuts minimise the {ctx.objective} over device orders ({hops})")


def plan_data(ctx: Context) -> Plan:
    """The whole model on every device that holds it, the batch split by device speed.

    Rows are whole: at the planning batch a device may get none (at batch 1, one device runs
    it all), and the prediction says so.
    """
    from edgec.runtimes.executor import batch_slices

    whole = {d.name: ctx.costs.segment_ms(d.name, 0, ctx.size) for d in ctx.devices.devices}
    batch = max((v[0] for v in ctx.graph.feeds_shape.values() if v), default=1)
    usable = [d for d in ctx.devices.devices if ctx.fits(d, 0, ctx.size, 1.0 / batch)]
    if not usable:
        raise _too_big(ctx, list(ctx.devices.devices), "data-parallel")
    usable.sort(key=lambda d: whole[d.name])
    total = sum(1.0 / whole[d.name] for d in usable)
    shares = [1.0 / whole[d.name] / total for d in usable]
    rows = [hi - lo for lo, hi in batch_slices(shares, batch)]
    io_bytes = sum(ctx.graph.tensor_bytes[t] for t in (*ctx.graph.inputs, *ctx.graph.outputs))
    coordinator = usable[0].name
    stages = []
    for index, (device, share, count) in enumerate(zip(usable, shares, rows, strict=True)):
        part = count / batch
        if not ctx.fits(device, 0, ctx.size, part):
            raise _too_big(ctx, [device], "data-parallel")
        stage = _stage(ctx, index, device.name, 0, ctx.size, None)
        stages.append(
            replace(
                stage,
                memory_bytes=ctx.memory_bytes(0, ctx.size, part),
                predicted_ms=whole[device.name] * part,
                transfer_in_ms=ctx.devices.transfer_ms(coordinator, device.name, io_bytes * part),
                batch_share=share,
            )
        )
    slowest = max(s.predicted_ms + s.transfer_in_ms for s in stages)
    left_out = [d.name for d in ctx.devices.devices if d not in usable]
    reason = f"batch split in proportion to each device's predicted speed ({batch} row(s) planned)"
    if left_out:
        reason += f"; {left_out} cannot hold the whole model"
    return Plan(
        strategy="data",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=slowest,
        period_ms=slowest,
        planning_shape=ctx.shape(),
        reason=reason,
        assumptions=ctx.assumptions([d.name for d in usable]),
        aggregation={"kind": "concat", "axis": 0},
    )


def plan_auto(ctx: Context) -> Plan:
    """The candidate with the lowest predicted objective; one device alone is always a candidate."""
    candidates: list[Plan] = []
    failures: list[str] = []
    for name in ("single", "pipeline", "data", "heads"):
        try:
            candidates.append(STRATEGIES[name](ctx))
        except DeviceError as exc:
            failures.append(f"{name}: {exc}")
    if not candidates:
        raise DeviceError("no strategy fits: " + " | ".join(failures))
    best = min(candidates, key=lambda p: p.score)
    others = tuple(
        {"strategy": p.strategy, "devices": p.devices, "score_ms": round(p.score, 4)}
        for p in candidates
        if p is not best
    )
    single = next((p for p in candidates if p.strategy == "single"), None)
    if single is None:
        why = f"no single device holds the model; {best.strategy} predicted {best.score:.3f} ms"
    elif best is single:
        why = (
            f"one device ({single.devices[0]}, {single.score:.3f} ms) is predicted no slower "
            "than any split: " + ", ".join(f"{o['strategy']} {o['score_ms']} ms" for o in others)
        )
    else:
        why = (
            f"{best.strategy} over {best.devices} predicted {best.score:.3f} ms "
            f"({ctx.objective}) against {single.score:.3f} ms on {single.devices[0]} alone"
        )
    return replace(best, reason=why, alternatives=others)


def plan_heads(ctx: Context) -> Plan:
    """Every device a slice of each layer's heads and FFN neurons (``partition.heads``)."""
    from edgec.exporters.partition.heads import plan_heads as heads

    plan: Plan = heads(ctx)
    return plan


STRATEGIES: dict[str, Callable[[Context], Plan]] = {
    "single": plan_single,
    "pipeline": plan_pipeline,
    "data": plan_data,
    "heads": plan_heads,
    "auto": plan_auto,
}


def make_plan(ctx: Context, strategy: str) -> Plan:
    if strategy not in STRATEGIES:
        raise DeviceError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](ctx)
