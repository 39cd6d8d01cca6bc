"""Aggregations: how the partial outputs of parallel stages combine. One registry, by name.

``concat`` joins data-parallel slices along an axis; ``sum`` adds partial results (head- or
tensor-parallel); ``mean`` averages them. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgec.errors import PackageError

Aggregate = Callable[[Sequence[np.ndarray], dict[str, Any]], np.ndarray]


def _concat(parts: Sequence[np.ndarray], options: dict[str, Any]) -> np.ndarray:
    return np.concatenate(list(parts), axis=int(options.get("axis", 0)))


def _sum(parts: Sequence[np.ndarray], options: dict[str, Any]) -> np.ndarray:
    del options
    total = np.array(parts[0], copy=True)
    for part in parts[1:]:
        total += part
    return total


def _mean(parts: Sequence[np.ndarray], options: dict[str, Any]) -> np.ndarray:
    return (_sum(parts, options) / len(parts)).astype(parts[0].dtype)


AGGREGATIONS: dict[str, Aggregate] = {"concat": _concat, "sum": _sum, "mean": _mean}


def register_aggregation(name: str, function: Aggregate) -> None:
    AGGREGATIONS[name] = function


def aggregate(
    kind: str, parts: Sequence[np.ndarray], options: dict[str, Any] | None = None
) -> np.ndarray:
    """Combine ``parts`` with the aggregation named ``kind``."""
    if kind not in AGGREGATIONS:
        raise PackageError(f"unknown aggregation {kind!r}; known: {sorted(AGGREGATIONS)}")
    if not parts:
        raise PackageError(f"aggregation {kind!r} got no parts")
    return AGGREGATIONS[kind](parts, options or {})
