"""``pipeline``: contiguous segments of the topological order, one per device, cut by dynamic
programming; requests stream through the stages."""

from __future__ import annotations

import itertools
from dataclasses import replace

from edgec.exporters.partition.context import Context
from edgec.exporters.partition.links import (
    carried_bytes,
    channel_scales,
    dequantize_inputs,
    link_names,
    quantize_outputs,
)
from edgec.exporters.partition.plan import Objective, Plan, StagePlan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter, check_stage, extract
from edgec.runtimes.devices import DeviceProfile
from edgec.runtimes.manifest import StageInfo
from onnx import TensorProto

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
                hop += ctx.return_from(device.name, start, stop)
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
            # better by more than rounding: ties keep the earlier order (the profiles' own)
            if found and (best is None or found[0] < best[0] - 1e-6 * max(1.0, best[0])):
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
    back = max(ctx.return_from(s.device, s.start, s.stop) for s in stages)
    unbounded = [d for d in order if d.memory_bytes is None]
    bound = "speed"
    if len(unbounded) < len(order):
        free = _cuts_for(ctx, tuple(replace(d, memory_mb=None) for d in order))
        if free is not None and free[1] != cuts:
            bound = "memory: the cuts that speed alone picks do not fit the budgets"
    stages, int8 = _int8_links(ctx, stages)
    return Plan(
        strategy="pipeline",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=sum(s.predicted_ms + s.transfer_in_ms for s in stages) + back,
        period_ms=max(
            s.predicted_ms + s.transfer_in_ms + ctx.return_from(s.device, s.start, s.stop)
            for s in stages
        ),
        planning_shape=ctx.shape(),
        reason=f"cuts minimise the {ctx.objective} over device orders ({hops})",
        assumptions=ctx.assumptions([d.name for d in order]),
        bound=bound,
        return_ms=back,
        int8_links=int8,
    )


def _int8_links(ctx: Context, stages: list[StagePlan]) -> tuple[list[StagePlan], tuple[str, ...]]:
    """Carry the float token states crossing into a stage as int8 (``links``): always with
    ``int8_links="on"``, with ``"auto"`` where moving them takes longer than the stage computes
    (the link is the bottleneck). Returns the stages with their hops re-predicted."""
    if ctx.int8_links == "off":
        return stages, ()
    shapes, sizes = ctx.graph.tensor_shapes, ctx.graph.tensor_bytes
    carried: list[str] = []
    out = [stages[0]]
    for prev, stage in itertools.pairwise(stages):
        crossing = [
            t
            for t in stage.inputs
            if t not in ctx.graph.inputs
            and ctx.graph.tensor_types.get(t, (0, 0))[0] == TensorProto.FLOAT
            and len(shapes.get(t, ())) >= 2
        ]
        if not crossing or prev.device == stage.device:
            out.append(stage)
            continue
        hop = ctx.devices.transfer_ms(prev.device, stage.device, stage.bytes_in)
        if ctx.int8_links == "auto" and hop <= stage.predicted_ms:
            out.append(stage)
            continue
        saved = sum(sizes[t] - carried_bytes(sizes[t], shapes[t]) for t in crossing)
        smaller = ctx.devices.transfer_ms(prev.device, stage.device, stage.bytes_in - saved)
        carried += crossing
        out.append(
            replace(
                stage,
                bytes_in=stage.bytes_in - saved,
                transfer_in_ms=stage.transfer_in_ms - hop + smaller,
            )
        )
    return out, tuple(dict.fromkeys(carried))


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    carried = set(plan.int8_links)
    channels = {
        name: channel_scales(value) for name, value in writer.activations(sorted(carried)).items()
    }
    stages = []
    for stage in plan.stages:
        proto = extract(writer.model, list(stage.inputs), list(stage.outputs), stage.name)
        quantized = [t for t in stage.outputs if t in carried]
        dequantized = [t for t in stage.inputs if t in carried]
        if quantized or dequantized:
            quantize_outputs(proto, quantized, channels)
            dequantize_inputs(proto, dequantized, channels)
            check_stage(proto, stage.name)

        def renamed(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(n for t in names for n in (link_names(t) if t in carried else (t,)))

        stages.append(
            writer.save(
                stage,
                proto,
                nodes=(stage.start, stage.stop),
                inputs=renamed(stage.inputs),
                outputs=renamed(stage.outputs),
            )
        )
    return stages


STRATEGY = Strategy(
    name="pipeline",
    summary="consecutive layers on each device; requests stream through them",
    plan=plan,
    write=write,
    execution="chain",
)
