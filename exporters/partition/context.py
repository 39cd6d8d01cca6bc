"""What every strategy's planner reads: the analysed graph, the devices, the objective.

``Context`` answers the questions planners ask of a node range (its time on a device, its
parameters, its memory, what crosses a cut); ``capped_shares`` splits work by speed within
memory caps, the one rule the data and heads planners share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgec.exporters.partition.cost import CostTable
from edgec.exporters.partition.graph import GraphProfile, model_memory, session_memory
from edgec.exporters.partition.plan import OBJECTIVES, Objective, StagePlan
from edgec.runtimes.devices import DeviceProfile, DeviceSet

from edgec.errors import DeviceError
from edgec.table import human_bytes

INT8_LINKS = ("off", "auto", "on")


@dataclass
class Context:
    """Everything a planner reads. ``live_bytes[c]``: activation bytes alive at cut ``c``."""

    graph: GraphProfile
    devices: DeviceSet
    objective: Objective = "latency"
    keep_input: bool = False  # raw inputs never leave the entry device
    int8_links: str = "off"  # off | auto (where a link is the bottleneck) | on
    costs: CostTable = field(init=False)
    live_bytes: list[int] = field(init=False)
    crossing: list[list[str]] = field(init=False)
    hop_bytes: list[int] = field(init=False)
    _rows: dict[int, tuple[list[int], list[int], list[int]]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DeviceError(f"unknown objective {self.objective!r}; known: {list(OBJECTIVES)}")
        if self.int8_links not in INT8_LINKS:
            raise DeviceError(f"unknown int8_links {self.int8_links!r}; known: {list(INT8_LINKS)}")
        self.costs = CostTable(self.graph, self.devices.devices)
        n = len(self.graph.nodes)
        self.crossing = [self.graph.crossing(c) for c in range(n + 1)]
        sizes = self.graph.tensor_bytes
        self.live_bytes = [sum(sizes[t] for t in names) for names in self.crossing]
        inputs = set(self.graph.inputs)
        self.hop_bytes = [
            sum(sizes[t] for t in names if t not in inputs) for names in self.crossing
        ]
        self._input_uses = {
            name: sorted(self.graph.consumers.get(name, ())) for name in self.graph.inputs
        }
        self.output_bytes = sum(sizes.get(t, 0) for t in self.graph.outputs)

    @property
    def entry(self) -> str:
        return self.devices.entry_device

    @property
    def exit(self) -> str:
        return self.devices.exit_device

    def inputs_in(self, start: int, stop: int) -> list[str]:
        """The model inputs (raw request values) that nodes ``[start, stop)`` read."""
        return [
            name for name, uses in self._input_uses.items() if any(start <= u < stop for u in uses)
        ]

    def entry_ms(self, device: str, start: int, stop: int, share: float = 1.0) -> float:
        """Moving the raw inputs nodes ``[start, stop)`` read from the entry to ``device``."""
        needed = self.inputs_in(start, stop)
        if not needed:
            return 0.0
        nbytes = sum(self.graph.tensor_bytes[t] for t in needed) * share
        return self.devices.transfer_ms(self.entry, device, nbytes)

    def return_ms(self, device: str, share: float = 1.0) -> float:
        """Moving the results from ``device`` to where they go."""
        return self.devices.transfer_ms(device, self.exit, self.output_bytes * share)

    def return_from(self, device: str, start: int, stop: int) -> float:
        """Moving the model outputs that nodes ``[start, stop)`` make from ``device`` to where
        results go."""
        made = [t for t in self.graph.outputs if start <= self.graph.producers.get(t, -1) < stop]
        if not made:
            return 0.0
        nbytes = sum(self.graph.tensor_bytes.get(t, 0) for t in made)
        return self.devices.transfer_ms(device, self.exit, nbytes)

    def private(self, device: str, start: int, stop: int) -> bool:
        """Whether nodes ``[start, stop)`` may run on ``device`` under ``keep_input``: only
        the entry reads raw inputs."""
        return not self.keep_input or device == self.entry or not self.inputs_in(start, stop)

    @property
    def size(self) -> int:
        return len(self.graph.nodes)

    def _row(self, start: int) -> tuple[list[int], list[int], list[int]]:
        """For each stop after ``start``: parameter bytes, the pinned part of them, and the
        peak live bytes of the segment."""
        if start not in self._rows:
            names: set[str] = set()
            total, pinned, peak = 0, 0, self.live_bytes[start]
            params, pins, peaks = [0], [0], [peak]
            for node, live in zip(
                self.graph.nodes[start:], self.live_bytes[start + 1 :], strict=True
            ):
                for name in node.params - names:
                    names.add(name)
                    total += self.graph.param_bytes[name]
                    if name in self.graph.pinned:
                        pinned += self.graph.param_bytes[name]
                peak = max(peak, live)
                params.append(total)
                pins.append(pinned)
                peaks.append(peak)
            self._rows[start] = (params, pins, peaks)
        return self._rows[start]

    def param_bytes(self, start: int, stop: int) -> int:
        return self._row(start)[0][stop - start]

    def pinned_bytes(self, start: int, stop: int) -> int:
        return self._row(start)[1][stop - start]

    def peak_live_bytes(self, start: int, stop: int) -> int:
        return self._row(start)[2][stop - start]

    def memory_bytes(self, start: int, stop: int, share: float = 1.0) -> int:
        """What the segment's model holds at its peak: parameters as held (runtime-decoded ones
        twice, while loading) plus the largest set of live activations inside it (``share``
        of them, for a share of the batch)."""
        params, pins, peaks = self._row(start)
        at = stop - start
        return model_memory(params[at], pins[at], int(peaks[at] * share))

    def process_bytes(self, start: int, stop: int, share: float = 1.0) -> int:
        """Predicted resident bytes of the segment's process above the bare interpreter."""
        params, pins, peaks = self._row(start)
        at = stop - start
        return session_memory(params[at], pins[at], int(peaks[at] * share))

    def fits(self, device: DeviceProfile, start: int, stop: int, share: float = 1.0) -> bool:
        budget = device.memory_bytes
        return budget is None or self.memory_bytes(start, stop, share) <= budget

    def assumptions(self, devices: list[str]) -> tuple[str, ...]:
        notes = []
        for name in dict.fromkeys(devices):
            missing = self.devices.device(name).assumed()
            if missing:
                notes.append(f"{name} has no measured {', '.join(missing)} (run profile-device)")
        return tuple(notes)

    def shape(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.graph.feeds_shape.items()}

    def segment(
        self, index: int, device: str, start: int, stop: int, prev: str | None
    ) -> StagePlan:
        """Nodes ``[start, stop)`` on ``device`` as stage ``stage{index}``, its inputs brought
        from ``prev`` (None: from the caller)."""
        nodes = self.graph.model.graph.node
        needed = {i for node in nodes[start:stop] for i in node.input}
        inputs = (
            tuple(t for t in self.crossing[start] if t in needed)
            if start
            else tuple(t for t in self.graph.inputs if t in needed)
        )
        later = set(self.crossing[stop]) if stop < self.size else set(self.graph.outputs)
        made = {o for node in nodes[start:stop] for o in node.output}
        outputs = tuple(sorted(made & later))
        bytes_in = sum(self.graph.tensor_bytes[t] for t in inputs if t not in self.graph.inputs)
        hop = self.devices.transfer_ms(prev, device, bytes_in) if prev else 0.0
        return StagePlan(
            name=f"stage{index}",
            device=device,
            start=start,
            stop=stop,
            flops=self.costs.segment_flops(start, stop),
            param_bytes=self.param_bytes(start, stop),
            memory_bytes=self.memory_bytes(start, stop),
            process_bytes=self.process_bytes(start, stop),
            inputs=inputs,
            outputs=outputs,
            bytes_in=bytes_in,
            predicted_ms=self.costs.segment_ms(device, start, stop),
            transfer_in_ms=hop + self.entry_ms(device, start, stop),
        )

    def too_big(self, devices: Sequence[DeviceProfile], what: str) -> DeviceError:
        need = self.memory_bytes(0, self.size)
        budgets = ", ".join(
            f"{d.name} {human_bytes(d.memory_bytes)}" for d in devices if d.memory_bytes
        )
        return DeviceError(
            f"no {what} plan fits the memory budgets ({budgets}): the whole model needs "
            f"{need} bytes ({human_bytes(need)}) of parameters and activations"
        )


def capped_shares(speeds: Sequence[float], caps: Sequence[float]) -> tuple[list[float], list[int]]:
    """Shares of some work in proportion to ``speeds``, none above its ``cap`` (a fraction of
    the work its device's memory holds): what a capped device cannot take goes to the others in
    proportion to their speed. Returns the shares and the indices held at their cap.

    Raises ``ValueError`` when the caps together hold less than the whole work.
    """
    if sum(max(c, 0.0) for c in caps) < 1.0 - 1e-12:
        raise ValueError("the caps hold less than the whole work")
    shares = [0.0] * len(speeds)
    capped: list[int] = []
    free = list(range(len(speeds)))
    left = 1.0
    while free:
        total = sum(speeds[i] for i in free)
        over = [i for i in free if left * speeds[i] / total > caps[i]]
        if not over:
            for i in free:
                shares[i] = left * speeds[i] / total
            break
        for i in over:
            shares[i] = max(caps[i], 0.0)
            left -= shares[i]
            capped.append(i)
        free = [i for i in free if i not in over]
    return shares, sorted(capped)
