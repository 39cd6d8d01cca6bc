"""Partition strategies, one module each, registered once here.

A ``Strategy`` is a planner (``Context`` -> ``Plan``), a writer (``StageWriter``, ``Plan`` ->
the stages' manifest entries) and the runtime executor its stages run with
(``edgec.runtimes.executor.EXECUTORS``). ``auto`` plans with the others and writes with the
one it chose, so a plan always names a strategy that can write it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgec.errors import DeviceError

if TYPE_CHECKING:
    from edgec.exporters.partition.context import Context
    from edgec.exporters.partition.plan import Plan
    from edgec.exporters.partition.write import StageWriter
    from edgec.runtimes.manifest import StageInfo


@dataclass(frozen=True)
class Strategy:
    """One way to split a model: ``plan`` it, ``write`` its stages, run them by ``execution``.

    ``write`` is None for a strategy that only chooses among others (``auto``).
    """

    name: str
    summary: str
    plan: Callable[[Context], Plan]
    write: Callable[[StageWriter, Plan], list[StageInfo]] | None
    execution: str


def _registry() -> dict[str, Strategy]:
    from edgec.exporters.partition.strategies import auto, data, heads, pipeline, single

    return {
        s.name: s
        for s in (single.STRATEGY, pipeline.STRATEGY, data.STRATEGY, heads.STRATEGY, auto.STRATEGY)
    }


STRATEGIES: dict[str, Strategy] = _registry()


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ``DeviceError`` listing the known ones otherwise."""
    if name not in STRATEGIES:
        raise DeviceError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Strategy", "get_strategy"]
