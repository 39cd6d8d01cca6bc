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
class Cut:
    """An initializer cut to a slice's units along ``axis``. The axis may hold ``groups`` equal
    parts side by side (a fused attention's Q|K|V columns), each cut alike."""

    name: str
    axis: int
    groups: int = 1


@dataclass(frozen=True)
class BlockSlice:
    """What a head-parallel stage keeps of one attention or FFN block: units ``span`` of the
    block's ``units`` heads (or neurons) of ``width`` columns each.

    ``cuts`` name every initializer to cut, ``heads_attributes`` the nodes whose ``num_heads``
    attribute becomes the kept count (fused attention): the writer needs nothing else.
    """

    kind: str  # attention | ffn
    output: str
    units: int
    width: int
    span: tuple[int, int]
    cuts: tuple[Cut, ...]
    heads_attributes: tuple[str, ...] = ()

    @property
    def kept(self) -> int:
        return self.span[1] - self.span[0]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockSlice:
        return cls(
            **{
                **data,
                "span": (int(data["span"][0]), int(data["span"][1])),
                "cuts": tuple(Cut(**c) for c in data["cuts"]),
                "heads_attributes": tuple(data.get("heads_attributes", ())),
            }
        )


@dataclass(frozen=True)
class StagePlan:
    """One stage: nodes ``[start, stop)`` of the topological order on ``device``.

    Sizes in bytes, times in ms. ``inputs``/``outputs`` are the values crossing in and out;
    ``transfer_in_ms`` is the predicted time to bring ``bytes_in`` from the previous device.
    ``batch_share`` is the fraction of the batch it runs (data-parallel; 1 otherwise).
    ``memory_bytes`` is what the device's budget bounds (the model's parameters and live
    activations), ``process_bytes`` the predicted resident bytes of its process above the bare
    interpreter. Head-parallel stages of one ``group`` run at once; ``slice`` says what a stage
    keeps of its block.
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
    process_bytes: int = 0
    group: int = 0
    slice: BlockSlice | None = None

    @property
    def nodes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """A partition plan and its predicted cost.

    ``latency_ms`` is one request end to end; ``period_ms`` the time between results when
    requests stream (the slowest stage, hop included). ``reason`` says why this plan won;
    Requests enter at ``entry`` (their inputs' transfer to the stages that read them is in the
    stages' ``transfer_in_ms``) and results go to ``exit`` (``return_ms``, in ``latency_ms``);
    with ``keep_input`` no raw input leaves the entry. ``int8_links`` names the tensors that
    cross as int8 with per-token scales (``exporters.partition.links``).
    ``alternatives`` lists the candidates it beat with their predicted cost; ``bound`` says
    which constraint shaped the split (speed, or a device's memory). ``source`` is the sha256 of
    the ONNX model planned (empty for a model planned from its source), so that a saved plan is
    applied to no other model.
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
    bound: str = "speed"
    source: str = ""
    entry: str = ""
    exit: str = ""
    return_ms: float = 0.0
    keep_input: bool = False
    int8_links: tuple[str, ...] = ()

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
    def from_json(cls, data: dict[str, Any], where: str = "plan") -> Plan:
        """A plan from its JSON; ``DeviceError`` naming the field (``where.stages[0].start``)
        for a value of the wrong type, an unknown key or a missing one: the dataclasses'
        annotations are the schema (``edgec.schema.check_json``)."""
        from edgec.schema import check_json

        check_json(data, cls, where, error=DeviceError)
        stages = tuple(
            StagePlan(
                **{
                    **s,
                    "inputs": tuple(s["inputs"]),
                    "outputs": tuple(s["outputs"]),
                    "slice": BlockSlice.from_json(s["slice"]) if s.get("slice") else None,
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
                "int8_links": tuple(data.get("int8_links", ())),
            }
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DeviceError(f"cannot read plan {str(path)!r}: {exc}") from exc
        return cls.from_json(data, str(path))

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
                f"{s.slice.kept}/{s.slice.units}" if s.slice else "",
                round(s.predicted_ms, 3),
            ]
            for s in self.stages
        ]
        headers = [
            "stage",
            "device",
            "nodes",
            "#",
            "GFLOP",
            "params",
            "memory",
            "batch",
            "units",
            "ms",
        ]
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
        where = f"entry {self.entry}, exit {self.exit}" if self.entry else ""
        if where and self.keep_input:
            where += ", raw input kept on the entry"
        notes = [
            f"requests: {where}; results back in {self.return_ms:.3f} ms" if where else "",
            f"predicted: {self.latency_ms:.3f} ms per request end to end, "
            f"{self.period_ms:.3f} ms between results when streaming (objective: {self.objective})",
        ]
        if self.int8_links:
            notes.append(f"int8 across links: {', '.join(self.int8_links)}")
        if self.reason:
            notes.append(f"why: {self.reason}")
        notes.append(f"bound by: {self.bound}")
        if self.assumptions:
            notes.append("assumed: " + "; ".join(self.assumptions))
        return "\n\n".join(out) + "\n\n" + "\n".join(n for n in notes if n)

    def diff(self, other: Plan) -> list[str]:
        """Lines saying how ``other`` differs from this plan (empty when they agree)."""
        lines = []
        if self.strategy != other.strategy:
            lines.append(f"strategy: {self.strategy} -> {other.strategy}")
        mine = [_placement(s) for s in self.stages]
        theirs = [_placement(s) for s in other.stages]
        if mine != theirs:
            lines.append(f"stages: {mine} -> {theirs}")
        for key in ("latency_ms", "period_ms"):
            a, b = getattr(self, key), getattr(other, key)
            if abs(a - b) > 1e-9:
                lines.append(f"{key}: {a:.3f} -> {b:.3f}")
        return lines


def _placement(stage: StagePlan) -> tuple[Any, ...]:
    span = stage.slice.span if stage.slice else None
    return (stage.device, stage.start, stage.stop, round(stage.batch_share, 4), span)
