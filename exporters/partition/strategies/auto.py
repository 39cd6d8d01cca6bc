"""``auto``: plan with every other strategy and keep the lowest predicted objective; one
device alone is always a candidate."""

from __future__ import annotations

from dataclasses import replace

from edgec.exporters.partition.context import Context
from edgec.exporters.partition.plan import Plan
from edgec.exporters.partition.strategies import Strategy

from edgec.errors import DeviceError


def plan(ctx: Context) -> Plan:
    from edgec.exporters.partition.strategies import STRATEGIES

    candidates: list[Plan] = []
    failures: list[str] = []
    for strategy in STRATEGIES.values():
        if strategy.write is None:
            continue
        try:
            candidates.append(strategy.plan(ctx))
        except DeviceError as exc:
            failures.append(f"{strategy.name}: {exc}")
    if not candidates:
        raise DeviceError("no strategy fits: " + " | ".join(failures))
    best = min(candidates, key=lambda p: p.score)
    others = tuple(
        {"strategy": p.strategy, "devices": p.devices, "score_ms": round(p.score, 4)}
        for p in candidates
        if p is not best
    ) + tuple({"strategy": f.split(":")[0], "error": f.split(": ", 1)[1]} for f in failures)
    single = next((p for p in candidates if p.strategy == "single"), None)
    scored = ", ".join(f"{o['strategy']} {o['score_ms']} ms" for o in others if "score_ms" in o)
    if single is None:
        why = f"no single device holds the model; {best.strategy} predicted {best.score:.3f} ms"
    elif best is single:
        why = (
            f"one device ({single.devices[0]}, {single.score:.3f} ms) is predicted no slower "
            f"than any split: {scored}"
        )
    else:
        why = (
            f"{best.strategy} over {best.devices} predicted {best.score:.3f} ms "
            f"({ctx.objective}) against {single.score:.3f} ms on {single.devices[0]} alone"
        )
    if failures:
        why += "; left out: " + "; ".join(failures)
    return replace(best, reason=why, alternatives=others)


STRATEGY = Strategy(
    name="auto",
    summary="the candidate of every other strategy with the lowest predicted objective",
    plan=plan,
    write=None,
    execution="chain",
)
