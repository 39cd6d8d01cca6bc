"""``data``: the whole model on every device that holds it, each batch split over them by
speed, within what each device's memory holds of the batch's activations."""

from __future__ import annotations

from dataclasses import replace

from edgec.exporters.partition.context import Context, capped_shares
from edgec.exporters.partition.cost import stage_overhead_ms
from edgec.exporters.partition.plan import Plan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter
from edgec.runtimes.manifest import StageInfo

from edgec.errors import DeviceError
from edgec.table import human_bytes


def plan(ctx: Context) -> Plan:
    """Rows are whole: at the planning batch a device may get none (at batch 1, one device runs
    it all), and the prediction says so."""
    from edgec.runtimes.executor import batch_slices

    n = ctx.size
    if ctx.keep_input:
        raise DeviceError(
            "a data-parallel split sends raw input rows to every device; with the input kept "
            f"on {ctx.entry!r}, split by pipeline or heads instead"
        )
    whole = {d.name: ctx.costs.segment_ms(d.name, 0, n) for d in ctx.devices.devices}
    batch = max((v[0] for v in ctx.graph.feeds_shape.values() if v), default=1)
    usable = [d for d in ctx.devices.devices if ctx.fits(d, 0, n, 1.0 / batch)]
    if not usable:
        raise ctx.too_big(list(ctx.devices.devices), "data-parallel")
    usable.sort(key=lambda d: whole[d.name])
    fixed = ctx.memory_bytes(0, n, 0.0)  # parameters: every device holds them all
    live = max(ctx.memory_bytes(0, n) - fixed, 1)  # activations of the whole batch
    caps = [
        1.0 if d.memory_bytes is None else min(1.0, (d.memory_bytes - fixed) / live) for d in usable
    ]
    try:
        shares, capped = capped_shares([1.0 / whole[d.name] for d in usable], caps)
    except ValueError:
        raise ctx.too_big(usable, "data-parallel") from None
    rows = [hi - lo for lo, hi in batch_slices(shares, batch)]
    stages = []
    back = 0.0
    for index, (device, share, count) in enumerate(zip(usable, shares, rows, strict=True)):
        part = count / batch
        if not ctx.fits(device, 0, n, part):
            raise ctx.too_big([device], "data-parallel")
        stage = ctx.segment(index, device.name, 0, n, None)
        stages.append(
            replace(
                stage,
                memory_bytes=ctx.memory_bytes(0, n, part),
                process_bytes=ctx.process_bytes(0, n, part),
                predicted_ms=(whole[device.name] - stage_overhead_ms(device)) * part
                + stage_overhead_ms(device),
                transfer_in_ms=ctx.entry_ms(device.name, 0, n, part),
                batch_share=share,
            )
        )
        back = max(back, ctx.return_ms(device.name, part))
    slowest = max(
        s.predicted_ms + s.transfer_in_ms + ctx.return_ms(s.device, s.batch_share) for s in stages
    )
    left_out = [d.name for d in ctx.devices.devices if d not in usable]
    reason = f"batch split in proportion to each device's predicted speed ({batch} row(s) planned)"
    if left_out:
        reason += f"; {left_out} cannot hold the whole model"
    bound = "speed"
    if capped:
        bound = "memory: " + ", ".join(
            f"{usable[i].name} holds {shares[i]:.0%} of the batch's activations "
            f"({human_bytes(usable[i].memory_bytes)} budget)"
            for i in capped
        )
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
        bound=bound,
        return_ms=back,
    )


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    return [writer.whole(stage, batch_share=stage.batch_share) for stage in plan.stages]


STRATEGY = Strategy(
    name="data",
    summary="the whole model on each device; every batch split over them",
    plan=plan,
    write=write,
    execution="batch",
)
