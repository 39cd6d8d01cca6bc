"""``pipeline``: contiguous segments of the topological order, one per device, cut by dynamic
programming; requests stream through the stages."""

from __future__ import annotations

import itertools
from dataclasses import replace

from edgec.exporters.partition.context import Context
from edgec.exporters.partition.plan import Objective, Plan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter, extract
from edgec.runtimes.devices import DeviceProfile
from edgec.runtimes.manifest import StageInfo

from edgec.errors import DeviceError
from edgec.table import human_bytes

MAX_PIPELINE_STAGES = 4


def _combine(objective: Objective, acc: float, stage_ms: float) -> float:
    return acc + stage_ms if objective == "latency" else max(acc, stage_ms)


def _cuts_for(ctx: Context, order: tuple[DeviceProfile, ...]) -> tuple[float, list[int]] | None:
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
                if not ctx.private(device.name, start, stop):
                    continue
                hop = ctx.entry_ms(device.name, start, stop)
                if prev is not None:
                    hop += ctx.devices.transfer_ms(prev, device.name, ctx.hop_bytes[start])
                if j == k:
                    hop += ctx.return_ms(device.name)
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


def plan(ctx: Context) -> Plan:
    """Tries every ordering of 2..``MAX_PIPELINE_STAGES`` devices; a device is left out where
    adding it does not help the objective."""
    devices = ctx.devices.devices
    best: tuple[float, tuple[DeviceProfile, ...], list[int]] | None = None
    for k in range(2, min(len(devices), MAX_PIPELINE_STAGES) + 1):
        for order in itertools.permutations(devices, k):
            found = _cuts_for(ctx, order)
            if found and (best is None or found[0] < best[0] - 1e-12):
                best = (found[0], order, found[1])
    if best is None:
        if len(devices) < 2:
            raise DeviceError("a pipeline needs at least two devices; the profile lists one")
        raise ctx.too_big(list(devices), "pipeline")
    _, order, cuts = best
    stages = []
    prev = None
    for index, device in enumerate(order):
        stages.append(ctx.segment(index, device.name, cuts[index], cuts[index + 1], prev))
        prev = device.name
    hops = ", ".join(
        f"{s.name}: {len(s.inputs)} tensors, {human_bytes(s.bytes_in)}" for s in stages[1:]
    )
    back = ctx.return_ms(order[-1].name)
    unbounded = [d for d in order if d.memory_bytes is None]
    bound = "speed"
    if len(unbounded) < len(order):
        free = _cuts_for(ctx, tuple(replace(d, memory_mb=None) for d in order))
        if free is not None and free[1] != cuts:
            bound = "memory: the cuts that speed alone picks do not fit the budgets"
    return Plan(
        strategy="pipeline",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=sum(s.predicted_ms + s.transfer_in_ms for s in stages) + back,
        period_ms=max(
            s.predicted_ms + s.transfer_in_ms + (back if s is stages[-1] else 0.0) for s in stages
        ),
        planning_shape=ctx.shape(),
        reason=f"cuts minimise the {ctx.objective} over device orders ({hops})",
        assumptions=ctx.assumptions([d.name for d in order]),
        bound=bound,
        return_ms=back,
    )


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    return [
        writer.save(
            stage,
            extract(writer.model, list(stage.inputs), list(stage.outputs), stage.name),
            nodes=(stage.start, stage.stop),
        )
        for stage in plan.stages
    ]


STRATEGY = Strategy(
    name="pipeline",
    summary="consecutive layers on each device; requests stream through them",
    plan=plan,
    write=write,
    execution="chain",
)
