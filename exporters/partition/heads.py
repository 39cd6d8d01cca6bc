"""Head-parallel (tensor-parallel) partitioning: every device gets a slice of each layer's
attention heads and FFN neurons; the partial outputs are summed, the bias added once.

Found on the ONNX graph by structure, not by names:

- attention: a Softmax; the MatMul before it (Q·Kᵀ) and after it (·V) lead back through
  Reshape/Transpose/bias Add to three projection MatMuls with weight initializers on one input
  ``x``, and forward to the output projection MatMul. A slice keeps columns of Wq/Wk/Wv (and
  their biases) and rows of Wo for its heads; the Reshape to heads must infer the head count
  (-1), which the lossless check verifies.
- FFN: a MatMul with a weight initializer whose output reaches a second such MatMul only through
  elementwise operators (bias Add, GELU's Div/Erf/Add/Mul, ReLU, …). A slice keeps columns of
  W1 and b1 and rows of W2.

The output-projection and FFN-out biases stay in the shared part, after the sum: added once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from edgec.exporters.partition.cost import node_ms
from edgec.exporters.partition.graph import GraphProfile
from edgec.exporters.partition.plan import Plan, StagePlan
from edgec.runtimes.manifest import StageInfo
from edgec.runtimes.package import sha256_file
from onnx import numpy_helper

from edgec.errors import DeviceError, ExportError

if TYPE_CHECKING:
    from edgec.exporters.partition.planners import Context

_PASS = {
    "Reshape",
    "Transpose",
    "Mul",
    "Div",
    "Add",
    "Where",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
}
_ELEMENTWISE = {"Add", "Mul", "Div", "Sub", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Pow", "Sqrt"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}  # per-tensor activation Q/DQ commutes with slicing


@dataclass(frozen=True)
class Slice:
    """Initializer ``name`` is cut along ``axis`` to the slice's heads (or neurons)."""

    name: str
    axis: int


@dataclass(frozen=True)
class Block:
    """One parallel block: ``nodes`` (indices) compute ``output`` from tensors made outside.

    ``units`` heads (or neurons) of ``width`` columns each; ``slices`` say which weights to cut.
    """

    kind: str  # "attention" | "ffn"
    nodes: frozenset[int]
    output: str
    units: int
    width: int
    slices: tuple[Slice, ...]
    weights: frozenset[int] = frozenset()  # DequantizeLinear of weights: placed anywhere

    @property
    def first(self) -> int:
        return min(self.nodes - self.weights)

    @property
    def last(self) -> int:
        return max(self.nodes - self.weights)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.inits = {i.name for i in model.graph.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.vectors = {i.name for i in model.graph.initializer if len(i.dims) == 1}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for name in n.input:
                self.consumers.setdefault(name, []).append(i)

    def made_by(self, value: str) -> int | None:
        return self.producer.get(value)

    def weight(self, index: int) -> str | None:
        """The weight initializer of a MatMul (its second input, or the int8 tensor that a
        DequantizeLinear expands into it), if it has one."""
        node = self.nodes[index]
        if node.op_type != "MatMul":
            return None
        if node.input[1] in self.inits:
            return node.input[1]
        dq = self.made_by(node.input[1])
        if dq is not None and self.nodes[dq].op_type == "DequantizeLinear":
            return self.nodes[dq].input[0] if self.nodes[dq].input[0] in self.inits else None
        return None

    def weight_slices(self, index: int, axis: int) -> list[Slice]:
        """Cuts for a MatMul's weight along ``axis``: the tensor and, where quantized per
        channel along that axis, its scales and zero points."""
        name = self.weight(index)
        node = self.nodes[index]
        if name == node.input[1]:
            return [Slice(name, axis)] if name else []
        dq = self.nodes[self.made_by(node.input[1])]  # type: ignore[index]
        channel_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        cuts = [Slice(dq.input[0], axis)]
        if channel_axis == axis:
            cuts += [
                Slice(n, 0) for n in dq.input[1:] if n and n in self.inits and n in self.vectors
            ]
        return cuts

    def weight_nodes(self, index: int) -> set[int]:
        """The DequantizeLinear that makes a MatMul's weight, which belongs with the MatMul."""
        dq = self.made_by(self.nodes[index].input[1])
        return {dq} if dq is not None and self.nodes[dq].op_type == "DequantizeLinear" else set()

    def back_to_projection(self, value: str) -> tuple[int, int | None] | None:
        """Walk back through reshapes/transposes/scales to a weight MatMul; also its bias Add."""
        bias = None
        for _ in range(12):
            index = self.made_by(value)
            if index is None:
                return None
            node = self.nodes[index]
            if self.weight(index):
                return index, bias
            if node.op_type not in _PASS:
                return None
            if node.op_type == "Add" and any(i in self.inits for i in node.input):
                bias = index
            value = next((i for i in node.input if i not in self.inits), "")
        return None

    def forward_to_projection(self, value: str) -> int | None:
        for _ in range(10):
            users = self.consumers.get(value, [])
            if len(users) != 1:
                return None
            index = users[0]
            if self.weight(index) and self.nodes[index].input[0] == value:
                return index
            if self.nodes[index].op_type not in {
                "Reshape",
                "Transpose",
                "QuantizeLinear",
                "DequantizeLinear",
            }:
                return None
            value = self.nodes[index].output[0]
        return None

    def ancestors(self, value: str, stop: set[str]) -> set[int]:
        seen: set[int] = set()
        todo = [value]
        while todo:
            name = todo.pop()
            if name in stop:
                continue
            index = self.made_by(name)
            if index is None or index in seen:
                continue
            seen.add(index)
            todo.extend(i for i in self.nodes[index].input if i)
        return seen

    def descendants(self, value: str) -> set[int]:
        seen: set[int] = set()
        todo = [value]
        while todo:
            for index in self.consumers.get(todo.pop(), []):
                if index not in seen:
                    seen.add(index)
                    todo.extend(self.nodes[index].output)
        return seen


def _attention(g: _Graph, softmax: int, shapes: dict[str, tuple[int, ...]]) -> Block | None:
    node = g.nodes[softmax]
    scores = g.made_by(node.input[0])
    for _ in range(8):  # Softmax <- Add(mask) <- Mul(scale) <- (Q/DQ) <- MatMul(Q, Kᵀ)
        if scores is None or g.nodes[scores].op_type == "MatMul":
            break
        scores = g.made_by(g.nodes[scores].input[0])
    if scores is None or g.nodes[scores].op_type != "MatMul" or g.weight(scores):
        return None
    users = g.consumers.get(node.output[0], [])
    while len(users) == 1 and g.nodes[users[0]].op_type in _QDQ:
        users = g.consumers.get(g.nodes[users[0]].output[0], [])
    if len(users) != 1 or g.nodes[users[0]].op_type != "MatMul":
        return None
    pv = users[0]
    found = [
        g.back_to_projection(g.nodes[scores].input[0]),
        g.back_to_projection(g.nodes[scores].input[1]),
        g.back_to_projection(g.nodes[pv].input[1]),
    ]
    out = g.forward_to_projection(g.nodes[pv].output[0])
    if out is None or any(f is None or f[1] is None for f in found):
        return None
    projections = [f[0] for f in found if f]
    x = {g.nodes[p].input[0] for p in projections}
    if len(x) != 1:
        return None
    (source,) = x
    heads_shape = shapes.get(g.nodes[pv].output[0])  # (B, heads, T, head_dim)
    if heads_shape is None or len(heads_shape) != 4:
        return None
    heads, width = heads_shape[1], heads_shape[3]
    nodes = g.ancestors(g.nodes[out].output[0], {source}) & (g.descendants(source) | {out})
    weights = {w for matmul in (*projections, out) for w in g.weight_nodes(matmul)}
    slices = [cut for p in projections for cut in g.weight_slices(p, 1)]
    for f in found:
        bias_node = g.nodes[f[1]]  # type: ignore[index]
        slices.append(Slice(next(i for i in bias_node.input if i in g.inits), 0))
    slices.extend(g.weight_slices(out, 0))
    return Block(
        "attention",
        frozenset(nodes | weights),
        g.nodes[out].output[0],
        heads,
        width,
        tuple(slices),
        frozenset(weights),
    )


def _ffn(g: _Graph, first: int, used: set[int], shapes: dict[str, tuple[int, ...]]) -> Block | None:
    start = g.nodes[first]
    chain: set[int] = set()
    frontier = [start.output[0]]
    second = None
    bias: str | None = None
    while frontier:
        value = frontier.pop()
        for index in g.consumers.get(value, []):
            node = g.nodes[index]
            if g.weight(index) and node.input[0] == value:
                if second not in (None, index):
                    return None
                second = index
            elif node.op_type in _ELEMENTWISE | _QDQ and index not in used:
                if index not in chain:
                    chain.add(index)
                    frontier.extend(node.output)
                    if node.op_type == "Add" and bias is None:
                        bias = next((i for i in node.input if i in g.inits), None)
            else:
                return None
    if second is None or bias is None or not chain:
        return None
    for index in chain:  # every other input of the chain is a scalar constant
        for name in g.nodes[index].input:
            if name in g.inits and name != bias and int(np.prod(shapes.get(name, (1,)))) > 1:
                return None
    neurons = shapes.get(start.output[0], (0,))[-1]
    slices = (*g.weight_slices(first, 1), Slice(bias, 0), *g.weight_slices(second, 0))
    weights = g.weight_nodes(first) | g.weight_nodes(second)
    nodes = {first, second, *chain, *weights}
    return Block(
        "ffn", frozenset(nodes), g.nodes[second].output[0], neurons, 1, slices, frozenset(weights)
    )


def find_blocks(graph: GraphProfile, shapes: dict[str, tuple[int, ...]]) -> list[Block]:
    """Every attention and FFN block of the graph, in topological order."""
    g = _Graph(graph.model)
    blocks: list[Block] = []
    used: set[int] = set()
    for index, node in enumerate(g.nodes):
        if node.op_type == "Softmax":
            block = _attention(g, index, shapes)
            if block:
                blocks.append(block)
                used |= block.nodes
    for index in range(len(g.nodes)):
        if index not in used and g.weight(index):
            block = _ffn(g, index, used, shapes)
            if block:
                blocks.append(block)
                used |= block.nodes
    blocks.sort(key=lambda b: b.first)
    for a, b in itertools.pairwise(blocks):
        if b.first <= a.last:
            raise ExportError(f"{a.kind} and {b.kind} blocks overlap at node {b.first}")
    if not blocks:
        raise DeviceError("strategy heads found no attention or FFN block in this graph")
    return blocks


def unit_ranges(shares: list[float], units: int) -> list[tuple[int, int]]:
    """Split ``units`` heads or neurons by ``shares``; every device gets at least one."""
    from edgec.runtimes.executor import batch_slices

    if units < len(shares):
        raise DeviceError(f"cannot split {units} heads/neurons over {len(shares)} devices")
    ranges = batch_slices(shares, units - len(shares))
    return [(lo + i, hi + i + 1) for i, (lo, hi) in enumerate(ranges)]


def _resize_reshapes(sub: onnx.ModelProto, block: Block, kept: int) -> None:
    """Reshape targets stored as constants name the head count (…, heads, head_dim) or the
    width (…, heads * head_dim): give them the slice's."""
    inits = {i.name: i for i in sub.graph.initializer}
    for node in sub.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]]).copy()
        if target.ndim != 1:
            continue
        if len(target) == 4 and target[2] == block.units and target[3] == block.width:
            target[2] = kept
        elif target[-1] == block.units * block.width:
            target[-1] = kept * block.width
        else:
            continue
        name = f"{node.input[1]}__{kept}_heads"
        if name not in inits:
            inits[name] = numpy_helper.from_array(target, name)
            sub.graph.initializer.append(inits[name])
        node.input[1] = name


def sliced_model(
    model: onnx.ModelProto, block: Block, span: tuple[int, int], inputs: list[str]
) -> onnx.ModelProto:
    """The block's nodes as a model over ``inputs``, keeping units ``span`` of each weight."""
    sub = onnx.utils.Extractor(model).extract_model(inputs, [block.output])
    lo, hi = span[0] * block.width, span[1] * block.width
    wanted = {s.name: s.axis for s in block.slices}
    kept = []
    for init in sub.graph.initializer:
        if init.name in wanted:
            array = numpy_helper.to_array(init)
            index: list[Any] = [slice(None)] * array.ndim
            index[wanted[init.name]] = slice(lo, hi)
            kept.append(
                numpy_helper.from_array(np.ascontiguousarray(array[tuple(index)]), init.name)
            )
        else:
            kept.append(init)
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(kept)
    if block.kind == "attention":
        _resize_reshapes(sub, block, span[1] - span[0])
        used = {name for node in sub.graph.node for name in node.input}
        unused = [i for i in sub.graph.initializer if i.name not in used]
        for init in unused:
            sub.graph.initializer.remove(init)
    del sub.graph.value_info[:]  # shapes inside changed with the slice
    onnx.checker.check_model(sub, full_check=True)
    return sub


def _segments(graph: GraphProfile, blocks: list[Block]) -> list[set[int]]:
    """Node sets of the shared parts: before, between and after the blocks.

    A node inside a block's range but outside the block joins the part before it when it does
    not depend on the block (e.g. a reshape target computed from input shapes), else the next.
    """
    g = _Graph(graph.model)
    parts: list[set[int]] = [set() for _ in range(len(blocks) + 1)]
    block_of = {i: k for k, b in enumerate(blocks) for i in b.nodes}
    for index in range(len(g.nodes)):
        if index in block_of:
            continue
        part = sum(1 for b in blocks if b.last < index)
        inside = next((k for k, b in enumerate(blocks) if b.first < index < b.last), None)
        if inside is not None:
            depends = g.ancestors(g.nodes[index].output[0], set()) & blocks[inside].nodes
            part = inside + 1 if depends else inside
        parts[part].add(index)
    return parts


def _io(graph: GraphProfile, nodes: set[int]) -> tuple[list[str], list[str]]:
    """Values a node set reads from outside (inputs) and makes for others (outputs)."""
    model_nodes = graph.model.graph.node
    made = {o for i in nodes for o in model_nodes[i].output}
    inputs = sorted(
        {
            n
            for i in nodes
            for n in model_nodes[i].input
            if n and n not in made and n not in graph.param_bytes
        }
    )
    outside = [i for i in range(len(model_nodes)) if i not in nodes]
    needed = {n for i in outside for n in model_nodes[i].input} | set(graph.outputs)
    return inputs, sorted(made & needed)


def plan_heads(ctx: Context) -> Plan:
    """Shared parts on the fastest device; each block split over every device by its speed."""
    graph: GraphProfile = ctx.graph
    devices = list(ctx.devices.devices)
    if len(devices) < 2:
        raise DeviceError("strategy heads needs at least two devices; the profile lists one")
    blocks = find_blocks(graph, graph.tensor_shapes)
    speed = {d.name: 1.0 / max(ctx.costs.segment_ms(d.name, 0, ctx.size), 1e-9) for d in devices}
    devices.sort(key=lambda d: -speed[d.name])
    coordinator = devices[0]
    shares = [speed[d.name] / sum(speed.values()) for d in devices]
    parts = _segments(graph, blocks)
    sizes = graph.tensor_bytes
    stages: list[StagePlan] = []
    memory = {d.name: 0 for d in devices}

    def params(nodes: set[int] | frozenset[int]) -> int:
        names = {n for i in nodes for n in graph.nodes[i].params}
        return sum(graph.param_bytes[n] for n in names)

    def shared(index: int, nodes: set[int]) -> None:
        inputs, outputs = _io(graph, nodes)
        ms = sum(node_ms(graph.nodes[i], coordinator) for i in nodes)
        stages.append(
            StagePlan(
                name=f"shared{index}",
                device=coordinator.name,
                start=min(nodes),
                stop=max(nodes) + 1,
                flops=sum(graph.nodes[i].flops for i in nodes),
                param_bytes=params(nodes),
                memory_bytes=params(nodes),
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                bytes_in=0,
                predicted_ms=ms,
                group=len(stages),
            )
        )
        memory[coordinator.name] += params(nodes)

    for k, block in enumerate(blocks):
        if parts[k]:
            shared(k, parts[k])
        group = len(stages)
        inputs, _ = _io(graph, set(block.nodes))
        bytes_in = sum(sizes.get(t, 0) for t in inputs)
        full_ms = {d.name: sum(node_ms(graph.nodes[i], d) for i in block.nodes) for d in devices}
        for device, share, span in zip(
            devices, shares, unit_ranges(shares, block.units), strict=True
        ):
            part = (span[1] - span[0]) / block.units
            weight = int(params(block.nodes) * part)
            memory[device.name] += weight
            hop = ctx.devices.transfer_ms(
                coordinator.name, device.name, bytes_in + sizes.get(block.output, 0)
            )
            stages.append(
                StagePlan(
                    name=f"{block.kind}{k}_{device.name}",
                    device=device.name,
                    start=block.first,
                    stop=block.last + 1,
                    flops=sum(graph.nodes[i].flops for i in block.nodes) * part,
                    param_bytes=weight,
                    memory_bytes=weight,
                    inputs=tuple(inputs),
                    outputs=(block.output,),
                    bytes_in=bytes_in,
                    predicted_ms=full_ms[device.name] * part,
                    transfer_in_ms=hop,
                    batch_share=share,
                    group=group,
                    units=span,
                )
            )
    if parts[-1]:
        shared(len(blocks), parts[-1])
    for device in devices:
        budget = device.memory_bytes
        if budget is not None and memory[device.name] + max(ctx.live_bytes) > budget:
            raise DeviceError(
                f"no heads plan fits: device {device.name!r} needs {memory[device.name] + max(ctx.live_bytes)} "
                f"bytes, its budget is {int(budget)}"
            )
    groups: dict[int, list[StagePlan]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    latency = sum(max(s.predicted_ms + s.transfer_in_ms for s in g) for g in groups.values())
    plan = Plan(
        strategy="heads",
        objective=ctx.objective,
        stages=tuple(stages),
        latency_ms=latency,
        period_ms=latency,
        planning_shape=ctx.shape(),
        reason=(
            f"{len(blocks)} attention/FFN blocks split over {[d.name for d in devices]} in "
            f"proportion to speed; shared parts on {coordinator.name}"
        ),
        assumptions=ctx.assumptions([d.name for d in devices]),
        aggregation={"kind": "sum"},
    )
    return plan


def write_heads(
    model: onnx.ModelProto, graph: GraphProfile, plan: Any, root: Any
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Write each shared part and each device's slice of each block as an ONNX file."""
    from edgec.exporters.partition.apply import extract_stage, typed

    model = typed(model, graph)
    blocks = {b.output: b for b in find_blocks(graph, graph.tensor_shapes)}
    (root / "stages").mkdir(exist_ok=True)
    stages, edges = [], []
    for stage in plan.stages:
        file = f"stages/{stage.name}.onnx"
        if stage.units is None:
            proto = extract_stage(model, stage)
        else:
            try:
                proto = sliced_model(
                    model, blocks[stage.outputs[0]], stage.units, list(stage.inputs)
                )
            except (KeyError, ValueError, onnx.checker.ValidationError) as exc:
                raise ExportError(f"stage {stage.name!r} cannot be sliced: {exc}") from exc
        onnx.save_model(proto, str(root / file))
        extra: dict[str, Any] = {"group": stage.group, "predicted_ms": round(stage.predicted_ms, 6)}
        if stage.units is not None:
            extra["units"] = list(stage.units)
        stages.append(
            StageInfo(
                name=stage.name,
                device=stage.device,
                file=file,
                sha256=sha256_file(root / file),
                inputs=tuple(stage.inputs),
                outputs=tuple(stage.outputs),
                extra=extra,
            )
        )
        edges.append(
            {
                "from": "coordinator",
                "to": stage.name,
                "tensors": list(stage.inputs),
                "bytes": stage.bytes_in,
            }
        )
    return stages, edges
