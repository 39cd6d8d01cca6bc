"""``heads``: every device a slice of each layer's attention heads and FFN neurons (tensor
parallel); the slices' partial outputs are summed, and the shared parts (embeddings, norms,
residuals, pooling) run on one coordinating device.

The planner sizes the slices by speed *and* memory: the coordinator holds the shared parts (on
a text model, the embedding tables are most of them), so where its budget runs short it takes
fewer heads and neurons and the others take more. The plan records each slice's cuts
(``BlockSlice``), so a saved plan reproduces the split without looking at the graph again.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from edgec.exporters.partition.blocks import Block, _Graph, find_blocks, slice_block
from edgec.exporters.partition.context import Context, capped_shares
from edgec.exporters.partition.cost import node_ms, stage_overhead_ms
from edgec.exporters.partition.graph import GraphProfile, model_memory, session_memory
from edgec.exporters.partition.plan import BlockSlice, Plan, StagePlan
from edgec.exporters.partition.strategies import Strategy
from edgec.exporters.partition.write import StageWriter, check_stage, extract
from edgec.runtimes.devices import DeviceProfile
from edgec.runtimes.manifest import StageInfo

from edgec.errors import DeviceError, ExportError
from edgec.table import human_bytes


def _segments(graph: GraphProfile, blocks: list[Block]) -> list[set[int]]:
    """Node sets of the shared parts: before, between and after the blocks (constants, which
    go wherever they are read, left out).

    A node inside a block's range but outside the block joins the part before it when it does
    not depend on the block (e.g. a reshape target computed from input shapes), else the next.
    """
    g = _Graph(graph)
    parts: list[set[int]] = [set() for _ in range(len(blocks) + 1)]
    block_of = {i: k for k, b in enumerate(blocks) for i in b.nodes}
    for index in range(len(g.nodes)):
        if index in block_of or index in g.constant:
            continue
        part = sum(1 for b in blocks if b.last < index)
        inside = next((k for k, b in enumerate(blocks) if b.first < index < b.last), None)
        if inside is not None:
            depends = g.ancestors(g.nodes[index].output[0], "") & blocks[inside].nodes
            part = inside + 1 if depends else inside
        parts[part].add(index)
    return parts


def _io(graph: GraphProfile, nodes: set[int] | frozenset[int]) -> tuple[list[str], list[str]]:
    """Values a node set reads from outside (inputs) and makes for others (outputs)."""
    model_nodes = graph.model.graph.node
    made = {o for i in nodes for o in model_nodes[i].output}
    weights = graph.param_bytes.keys() | graph.constants
    inputs = sorted(
        {n for i in nodes for n in model_nodes[i].input if n and n not in made and n not in weights}
    )
    constant = {i for i, n in enumerate(graph.nodes) if n.constant}
    outside = [i for i in range(len(model_nodes)) if i not in nodes and i not in constant]
    needed = {n for i in outside for n in model_nodes[i].input} | set(graph.outputs)
    return inputs, sorted(made & needed)


@dataclass(frozen=True)
class _Weights:
    """Parameter bytes of a node set: all, the pinned part, and the part a slice cuts."""

    total: int
    pinned: int
    cut: int
    cut_pinned: int

    @classmethod
    def of(cls, graph: GraphProfile, nodes: set[int] | frozenset[int], cut: set[str]) -> _Weights:
        names = {n for i in nodes for n in graph.nodes[i].params}
        size = graph.param_bytes
        return cls(
            total=sum(size[n] for n in names),
            pinned=sum(size[n] for n in names if n in graph.pinned),
            cut=sum(size[n] for n in names if n in cut),
            cut_pinned=sum(size[n] for n in names if n in cut and n in graph.pinned),
        )

    def part(self, share: float) -> tuple[int, int]:
        """(bytes, pinned bytes) a slice holding ``share`` of the units keeps."""
        return (
            int(self.total - self.cut + self.cut * share),
            int(self.pinned - self.cut_pinned + self.cut_pinned * share),
        )


def _unit_counts(shares: list[float], capped: list[int], units: int) -> list[int]:
    """Whole units per device: capped devices rounded down (their memory allows no more),
    the rest by largest remainder."""
    counts = [int(s * units + 1e-9) if i in capped else 0 for i, s in enumerate(shares)]
    # every device at its cap: the units rounding left over go where shares say (the memory
    # check after the split then says whether they fit)
    free = [i for i in range(len(shares)) if i not in capped] or list(range(len(shares)))
    if len(free) == len(shares):
        counts = [0] * len(shares)
    left = units - sum(counts)
    total = sum(shares[i] for i in free) or 1.0
    exact = {i: left * shares[i] / total for i in free}
    for i in free:
        counts[i] = int(exact[i])
    for i in sorted(free, key=lambda i: exact[i] - counts[i], reverse=True)[
        : left - sum(counts[j] for j in free)
    ]:
        counts[i] += 1
    return counts


def _plan_with(ctx: Context, coordinator: DeviceProfile, blocks: list[Block]) -> Plan:
    graph = ctx.graph
    devices = sorted(ctx.devices.devices, key=lambda d: d is not coordinator)
    whole = {d.name: max(ctx.costs.segment_ms(d.name, 0, ctx.size), 1e-9) for d in devices}
    parts = _segments(graph, blocks)
    shared = [_Weights.of(graph, p, set()) for p in parts]
    sliced = [_Weights.of(graph, b.nodes, {c.name for c in b.cuts}) for b in blocks]
    live = max(ctx.live_bytes)
    fixed = [sum(s.total for s in shared) if d is coordinator else 0 for d in devices]
    fixed_pinned = [sum(s.pinned for s in shared) if d is coordinator else 0 for d in devices]
    uncut = sum(w.total - w.cut for w in sliced) + sum(w.pinned - w.cut_pinned for w in sliced)
    cut_all = sum(w.cut + w.cut_pinned for w in sliced)
    caps = []
    for device, shared_bytes, pinned in zip(devices, fixed, fixed_pinned, strict=True):
        budget = device.memory_bytes
        room = None if budget is None else budget - shared_bytes - pinned - uncut - live
        caps.append(1.0 if room is None else min(1.0, room / max(cut_all, 1)))
    try:
        shares, capped = capped_shares([1.0 / whole[d.name] for d in devices], caps)
    except ValueError:
        need = model_memory(sum(fixed) + uncut + cut_all, sum(fixed_pinned), live)
        raise DeviceError(
            f"no heads plan fits with the shared parts on {coordinator.name!r}: they hold "
            f"{human_bytes(sum(fixed))}, and the budgets leave too little for the "
            f"{human_bytes(need - sum(fixed))} of blocks and activations"
        ) from None
    stages: list[StagePlan] = []
    held = {d.name: [f, p] for d, f, p in zip(devices, fixed, fixed_pinned, strict=True)}

    def from_entry(device: str, inputs: list[str], share: float = 1.0) -> float:
        raw = [t for t in inputs if t in graph.inputs]
        if not raw:
            return 0.0
        nbytes = sum(graph.tensor_bytes[t] for t in raw) * share
        return ctx.devices.transfer_ms(ctx.entry, device, nbytes)

    def shared_stage(index: int, nodes: set[int]) -> None:
        inputs, outputs = _io(graph, nodes)
        weights = shared[index]
        stages.append(
            StagePlan(
                name=f"shared{index}",
                device=coordinator.name,
                start=min(nodes),
                stop=max(nodes) + 1,
                flops=sum(graph.nodes[i].flops for i in nodes),
                param_bytes=weights.total,
                memory_bytes=model_memory(weights.total, weights.pinned, live),
                process_bytes=session_memory(weights.total, weights.pinned, live),
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                bytes_in=0,
                predicted_ms=sum(node_ms(graph.nodes[i], coordinator) for i in nodes)
                + stage_overhead_ms(coordinator),
                transfer_in_ms=from_entry(coordinator.name, inputs),
                group=len(stages),
            )
        )

    for k, block in enumerate(blocks):
        if parts[k]:
            shared_stage(k, parts[k])
        group = len(stages)
        inputs, _ = _io(graph, block.nodes)
        raw = [t for t in inputs if t in graph.inputs]
        if ctx.keep_input and raw:
            raise DeviceError(
                f"{block.kind} block {k} reads the raw input {raw}: with the input kept on "
                f"{ctx.entry!r}, no slice of it may run elsewhere"
            )
        bytes_in = sum(graph.tensor_bytes.get(t, 0) for t in inputs)
        counts = _unit_counts(shares, capped, block.units)
        start = 0
        for device, share, count in zip(devices, shares, counts, strict=True):
            if count == 0:
                continue
            span = (start, start + count)
            start += count
            part = count / block.units
            weight, pinned = sliced[k].part(part)
            held[device.name][0] += weight
            held[device.name][1] += pinned
            block_ms = sum(node_ms(graph.nodes[i], device) for i in block.nodes)
            stages.append(
                StagePlan(
                    name=f"{block.kind}{k}_{device.name}",
                    device=device.name,
                    start=block.first,
                    stop=block.last + 1,
                    flops=sum(graph.nodes[i].flops for i in block.nodes) * part,
                    param_bytes=weight,
                    memory_bytes=model_memory(weight, pinned, int(live * part)),
                    process_bytes=session_memory(weight, pinned, int(live * part)),
                    inputs=tuple(inputs),
                    outputs=(block.output,),
                    bytes_in=bytes_in,
                    predicted_ms=block_ms * part + stage_overhead_ms(device),
                    transfer_in_ms=ctx.devices.transfer_ms(
                        coordinator.name,
                        device.name,
                        bytes_in + graph.tensor_bytes.get(block.output, 0),
                    )
                    + from_entry(device.name, inputs),
                    batch_share=share,
                    group=group,
                    slice=BlockSlice(
                        block.kind,
                        block.output,
                        block.units,
                        block.width,
                        span,
                        block.cuts,
                        block.heads_attributes,
                    ),
                )
            )
    if parts[-1]:
        shared_stage(len(blocks), parts[-1])
    for device in devices:
        params, pinned = held[device.name]
        need = model_memory(params, pinned, live)
        if device.memory_bytes is not None and need > device.memory_bytes:
            raise DeviceError(
                f"no heads plan fits: device {device.name!r} needs {need} bytes "
                f"({human_bytes(need)}), its budget is {int(device.memory_bytes)}"
            )
    groups: dict[int, list[StagePlan]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    back = ctx.return_ms(coordinator.name)
    latency = sum(max(s.predicted_ms + s.transfer_in_ms for s in g) for g in groups.values())
    latency += back
    used = [d.name for d, s in zip(devices, shares, strict=True) if s > 0 or d is coordinator]
    bound = "speed"
    if capped:
        bound = "memory: " + ", ".join(
            f"{devices[i].name} takes {shares[i]:.0%} of each block "
            f"({human_bytes(devices[i].memory_bytes)} budget"
            + (f", shared parts {human_bytes(fixed[i])})" if fixed[i] else ")")
            for i in capped
        )
    return Plan(
        strategy="heads",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=latency,
        period_ms=latency,
        planning_shape=ctx.shape(),
        reason=(
            f"{len(blocks)} attention/FFN blocks split over {used} in proportion to speed "
            f"within memory; shared parts on {coordinator.name}"
        ),
        assumptions=ctx.assumptions(used),
        aggregation={"kind": "sum"},
        bound=bound,
        return_ms=back,
    )


def plan(ctx: Context) -> Plan:
    """Shared parts on the device that gives the lowest latency; each block split over every
    device by its speed, within what its memory holds."""
    devices = list(ctx.devices.devices)
    if len(devices) < 2:
        raise DeviceError("strategy heads needs at least two devices; the profile lists one")
    blocks = find_blocks(ctx.graph)
    plans, failures = [], []
    coordinators = devices
    if ctx.keep_input:  # the shared part reads the raw input: it stays on the entry
        coordinators = [ctx.devices.device(ctx.entry)]
    for coordinator in coordinators:
        try:
            plans.append(_plan_with(ctx, coordinator, blocks))
        except DeviceError as exc:
            failures.append(str(exc))
    if not plans:
        raise DeviceError(" | ".join(failures))
    return min(plans, key=lambda p: p.latency_ms)


def write(writer: StageWriter, plan: Plan) -> list[StageInfo]:
    stages = []
    for stage in plan.stages:
        part = stage.slice
        if part is None:
            proto = extract(writer.model, list(stage.inputs), list(stage.outputs), stage.name)
            stages.append(writer.save(stage, proto, group=stage.group))
            continue
        try:
            proto = onnx.utils.Extractor(writer.model).extract_model(
                list(stage.inputs), [part.output]
            )
            proto.graph.name = stage.name
            slice_block(proto, part.cuts, part.units, part.width, part.span, part.heads_attributes)
        except (KeyError, ValueError) as exc:
            raise ExportError(f"stage {stage.name!r} cannot be sliced: {exc}") from exc
        check_stage(proto, stage.name)
        stages.append(writer.save(stage, proto, group=stage.group, units=part.span))
    return stages


STRATEGY = Strategy(
    name="heads",
    summary="every device a slice of each layer's heads and FFN neurons; partial sums added",
    plan=plan,
    write=write,
    execution="groups",
)
