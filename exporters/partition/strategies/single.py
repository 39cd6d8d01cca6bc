"""``single``: the whole model on the one device that runs it fastest and holds it."""

from __future__ import annotations

from edgec.exporters.partition.context import Context
from edgec.exporters.partition.plan import Plan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter
from edgec.runtimes.manifest import StageInfo


def plan(ctx: Context) -> Plan:
    options = [d for d in ctx.devices.devices if ctx.fits(d, 0, ctx.size)]
    if not options:
        raise ctx.too_big(list(ctx.devices.devices), "single-device")
    best = min(options, key=lambda d: ctx.costs.segment_ms(d.name, 0, ctx.size))
    stage = ctx.segment(0, best.name, 0, ctx.size, None)
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


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    return [writer.whole(plan.stages[0])]


STRATEGY = Strategy(
    name="single",
    summary="the whole model on the fastest device that holds it",
    plan=plan,
    write=write,
    execution="chain",
)
