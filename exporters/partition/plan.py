"""Plans are data: which nodes run where, what crosses between stages, what it should cost.

A ``Plan`` prints as a table, saves and loads as JSON, and diffs against another plan. The
planners make plans; ``exporters.partition.apply`` turns one into package stages.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgec.errors import DeviceError
from edgec.table import format_table, human_bytes

Objective = Literal["latency", "throughput"]
OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class StagePlan:
    """One stage: nodes ``[start, stop)`` of the topological order on ``device``.

    Sizes in bytes, times in ms. ``inputs``/``outputs`` are the values crossing in and out;
    ``transfer_in_ms`` is the predicted time to bring ``bytes_in`` from the previous device.
    ``batch_share`` is the fraction of the batch it runs (data-parallel; 1 otherwise).
    """

    name: str
    device: str
    start: int
    stop: int
    flops: float
    param_bytes: int
    memory_bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    bytes_in: int
    predicted_ms: float
    transfer_in_ms: float = 0.0
    batch_share: float = 1.0
    group: int = 0  # heads: stages of one group run in parallel and their outputs are summed
    units: tuple[int, int] | None = None  # heads: the heads or neurons this stage keeps

    @property
    def nodes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """A partition plan and its predicted cost.

    ``latency_ms`` is one request end to end; ``period_ms`` the time between results when
    requests stream (the slowest stage, hop included). ``reason`` says why this plan won;
    ``alternatives`` lists the candidates it beat with their predicted cost.
    """

    strategy: str
    objective: Objective
    stages: tuple[StagePlan, ...]
    latency_ms: float
    period_ms: float
    planning_shape: dict[str, list[int]]
    reason: str = ""
    assumptions: tuple[str, ...] = ()
    alternatives: tuple[dict[str, Any], ...] = ()
    aggregation: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})

    @property
    def score(self) -> float:
        """What the objective minimises, in ms."""
        return self.latency_ms if self.objective == "latency" else self.period_ms

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.stages]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        stages = tuple(
            StagePlan(
                **{
                    **s,
                    "inputs": tuple(s["inputs"]),
                    "outputs": tuple(s["outputs"]),
                    "units": tuple(s["units"]) if s.get("units") else None,
                }
            )
            for s in data["stages"]
        )
        return cls(
            **{
                **data,
                "stages": stages,
                "assumptions": tuple(data.get("assumptions", ())),
                "alternatives": tuple(data.get("alternatives", ())),
            }
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeviceError(f"cannot read plan {str(path)!r}: {exc}") from exc

    def format(self) -> str:
        """The plan as tables: stages, then the cuts and the end-to-end prediction."""
        rows = [
            [
                s.name,
                s.device,
                f"{s.start}..{s.stop}",
                s.nodes,
                f"{s.flops / 1e9:.3f}",
                human_bytes(s.param_bytes),
                human_bytes(s.memory_bytes),
                f"{s.batch_share:.2f}",
                round(s.predicted_ms, 3),
            ]
            for s in self.stages
        ]
        headers = ["stage", "device", "nodes", "#", "GFLOP", "params", "memory", "batch", "ms"]
        shape = ", ".join(f"{k} {v}" for k, v in self.planning_shape.items())
        out = [format_table(headers, rows, title=f"plan: {self.strategy} ({shape})")]
        cuts = [
            [
                f"{prev.name} → {s.name}",
                len(s.inputs),
                human_bytes(s.bytes_in),
                round(s.transfer_in_ms, 3),
                ", ".join(s.inputs[:4]) + (" …" if len(s.inputs) > 4 else ""),
            ]
            for prev, s in zip(self.stages, self.stages[1:], strict=False)
            if self.strategy == "pipeline"
        ]
        if cuts:
            out.append(format_table(["cut", "tensors", "bytes", "ms", "names"], cuts))
        notes = [
            f"predicted: {self.latency_ms:.3f} ms per request end to end, "
            f"{self.period_ms:.3f} ms between results when streaming (objective: {self.objective})"
        ]
        if self.reason:
            notes.append(f"why: {self.reason}")
        if self.assumptions:
            notes.append("assumed: " + "; ".join(self.assumptions))
        return "\n\n".join(out) + "\n\n" + "\n".join(notes)

    def diff(self, other: Plan) -> list[str]:
        """Lines saying how ``other`` differs from this plan (empty when they agree)."""
        lines = []
        if self.strategy != other.strategy:
            lines.append(f"strategy: {self.strategy} -> {other.strategy}")
        mine = [(s.device, s.start, s.stop, round(s.batch_share, 4)) for s in self.stages]
        theirs = [(s.device, s.start, s.stop, round(s.batch_share, 4)) for s in other.stages]
        if mine != theirs:
            lines.append(f"stages: {mine} -> {theirs}")
        for key in ("latency_ms", "period_ms"):
            a, b = getattr(self, key), getattr(other, key)
            if abs(a - b) > 1e-9:
                lines.append(f"{key}: {a:.3f} -> {b:.3f}")
        return lines
