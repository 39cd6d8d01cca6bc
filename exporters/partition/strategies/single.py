"""``single``: the whole model on the one device that runs it fastest and holds it."""

from __future__ import annotations

from edgec.exporters.partition.context import Context
from edgec.exporters.partition.plan import Plan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter
from edgec.runtimes.manifest import StageInfo


def plan(ctx: Context) -> Plan:
    n = ctx.size
    allowed = [d for d in ctx.devices.devices if ctx.private(d.name, 0, n)]
    options = [d for d in allowed if ctx.fits(d, 0, n)]
    if not options:
        raise ctx.too_big(allowed, "single-device")

    def cost(device: str) -> float:
        return (
            ctx.entry_ms(device, 0, n) + ctx.costs.segment_ms(device, 0, n) + ctx.return_ms(device)
        )

    best = min(options, key=lambda d: cost(d.name))
    stage = ctx.segment(0, best.name, 0, n, None)
    back = ctx.return_ms(best.name)
    total = stage.predicted_ms + stage.transfer_in_ms + back
    return Plan(
        strategy="single",
        objective=ctx.objective,
        stages=(stage,),
        latency_ms=total,
        period_ms=total,
        planning_shape=ctx.shape(),
        reason=f"{best.name} is the device that runs the whole model soonest, inputs and "
        "results moved included",
        assumptions=ctx.assumptions([best.name]),
        return_ms=back,
    )


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    return [writer.whole(plan.stages[0])]


STRATEGY = Strategy(
    name="single",
    summary="the whole model on the fastest device that holds it",
    plan=plan,
    write=write,
    execution="chain",
)
