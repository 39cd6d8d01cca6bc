"""Find the blocks a head-parallel split cuts: attention and FFN, on any graph edgec writes.

Found on the ONNX graph by structure, not by names, whatever form the projections take: a float
``MatMul`` on a weight, one on a ``DequantizeLinear`` of an int8 weight (static QDQ), or a
``MatMulInteger`` on an int8 weight behind a ``DynamicQuantizeLinear`` (dynamic int8, where the
result is cast back and scaled), and onnxruntime's fused ``Attention`` (Q|K|V in one weight).

- attention: a Softmax; the MatMul before it (Q·Kᵀ) and after it (·V) lead back to three
  projections of one input ``x`` and forward to the output projection. A slice keeps the
  columns of Q, K and V for its heads and the rows of the output projection; the Reshape to
  heads infers the head count (-1) or names it in a constant that the writer resizes.
- FFN: a projection whose output reaches a second one only through elementwise operators
  (bias, GELU in any of its forms, scales, quantization). A slice keeps the first one's columns
  and the second one's rows.

Between the column-cut projections and the row-cut one lies the *sliced space*: every tensor
there holds only the slice's heads or neurons, so every float weight applied to it elementwise
(biases, smoothing multipliers, per-channel dequantization scales) is cut alike. Which
initializers those are is found here and recorded in the plan (``Cut``), so the writer needs
no second look at the graph. The output-projection bias stays in the shared part after the
sum (added once).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from edgec.exporters.partition.graph import GraphProfile
from edgec.exporters.partition.plan import Cut
from onnx import helper

from edgec.errors import DeviceError, ExportError

_QUANTIZE = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Between a projection and the heads: shape moves, scales, biases, casts, quantization.
_PASS = {"Reshape", "Transpose", "Mul", "Div", "Add", "Where", "Cast", *_QUANTIZE}
_ELEMENTWISE = {
    *{"Add", "Mul", "Div", "Sub", "Erf", "Tanh", "Sigmoid", "Relu", "Pow", "Sqrt", "Cast"},
    *{"Gelu", "BiasGelu", "FastGelu", "QuickGelu"},  # onnxruntime's fused GELUs
    *_QUANTIZE,
}
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Block:
    """One parallel block: ``nodes`` (indices, constants left out) compute ``output`` from
    tensors made outside; ``units`` heads (or neurons) of ``width`` columns each; ``cuts`` say
    which initializers a slice cuts; ``heads_attributes`` name (by first output) the fused
    attention nodes whose ``num_heads`` a slice rewrites."""

    kind: str  # "attention" | "ffn"
    nodes: frozenset[int]
    output: str
    units: int
    width: int
    cuts: tuple[Cut, ...]
    heads_attributes: tuple[str, ...] = ()

    @property
    def first(self) -> int:
        return min(self.nodes)

    @property
    def last(self) -> int:
        return max(self.nodes)


class _Graph:
    def __init__(self, graph: GraphProfile):
        model = graph.model
        self.profile = graph
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.shapes = graph.tensor_shapes
        self.constant = {i for i, n in enumerate(graph.nodes) if n.constant}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for name in n.input:
                self.consumers.setdefault(name, []).append(i)

    def made_by(self, value: str) -> int | None:
        return self.producer.get(value)

    def op(self, index: int | None) -> str:
        return "" if index is None else self.nodes[index].op_type

    def is_weight(self, value: str) -> bool:
        """An initializer, or computed from initializers alone (e.g. a DequantizeLinear)."""
        return value in self.inits or value in self.profile.constants

    def weight(self, index: int) -> str | None:
        """The int8 or float weight initializer a projection multiplies by, if it is one."""
        node = self.nodes[index]
        if node.op_type == "Attention" and len(node.input) > 1 and node.input[1] in self.inits:
            return node.input[1]
        if node.op_type not in {"MatMul", "MatMulInteger"} or len(node.input) < 2:
            return None
        if node.input[1] in self.inits:
            return node.input[1]
        dq = self.made_by(node.input[1])
        if self.op(dq) == "DequantizeLinear" and self.nodes[dq].input[0] in self.inits:  # type: ignore[index]
            return self.nodes[dq].input[0]  # type: ignore[index]
        return None

    def float_input(self, index: int) -> str:
        """What a projection multiplies, before quantization: its first input, traced back
        through (Dynamic)QuantizeLinear/DequantizeLinear."""
        value = self.nodes[index].input[0]
        while (p := self.made_by(value)) is not None and self.op(p) in _QUANTIZE:
            if self.nodes[p].output[0] != value:
                break
            value = self.nodes[p].input[0]
        return value

    def float_output(self, index: int) -> str:
        """A projection's result as a float: past an int8 kernel's Cast and rescaling Mul."""
        value = self.nodes[index].output[0]
        if self.op(index) != "MatMulInteger":
            return value
        for expected in ("Cast", "Mul"):
            users = self.consumers.get(value, [])
            if len(users) != 1 or self.op(users[0]) != expected:
                break
            value = self.nodes[users[0]].output[0]
        return value

    def weight_cuts(self, index: int, axis: int) -> list[Cut]:
        """Cuts of a projection's weight along ``axis`` (1: its columns, 0: its rows), with the
        zero points and scales quantized per channel along that axis."""
        node = self.nodes[index]
        name = self.weight(index)
        if name is None:
            return []
        cuts = [Cut(name, axis)]
        if node.op_type == "MatMulInteger" and axis == 1 and len(node.input) > 3:
            zero = node.input[3]
            if (
                zero in self.inits
                and len(self.inits[zero].dims) == 1
                and self.inits[zero].dims[0] > 1
            ):
                cuts.append(Cut(zero, 0))
        dq = self.made_by(node.input[1])
        if name != node.input[1] and dq is not None:
            dq_node = self.nodes[dq]
            channel = next((a.i for a in dq_node.attribute if a.name == "axis"), 1)
            if channel % 2 == axis:
                cuts += [
                    Cut(n, 0)
                    for n in dq_node.input[1:]
                    if n in self.inits
                    and len(self.inits[n].dims) == 1
                    and self.inits[n].dims[0] > 1
                ]
        return cuts

    def back_to_projection(self, value: str) -> int | None:
        """Walk back from a value through ``_PASS`` operators to a projection, following the
        largest non-weight input at each step (the activation, not a scale)."""
        for _ in range(16):
            index = self.made_by(value)
            if index is None:
                return None
            if self.weight(index) is not None:
                return index
            if self.op(index) not in _PASS:
                return None
            inputs = [i for i in self.nodes[index].input if i and not self.is_weight(i)]
            if not inputs:
                return None
            value = max(inputs, key=lambda i: int(np.prod(self.shapes.get(i, (0,)))))
        return None

    def forward_to_projection(self, value: str) -> int | None:
        """Follow a value's single consumer through shape moves, scales and quantization to
        the projection that reads it."""
        for _ in range(10):
            users = self.consumers.get(value, [])
            if len(users) != 1:
                return None
            index = users[0]
            if self.weight(index) is not None and self.nodes[index].input[0] == value:
                return index
            if self.op(index) not in {"Reshape", "Transpose", "Mul", "Cast", *_QUANTIZE}:
                return None
            value = self.nodes[index].output[0]
        return None

    def ancestors(self, value: str, stop: str) -> set[int]:
        seen: set[int] = set()
        todo = [value]
        while todo:
            name = todo.pop()
            index = self.made_by(name)
            if name == stop or index is None or index in seen:
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

    def between(self, source: str, output: str) -> frozenset[int] | None:
        """The non-constant nodes that compute ``output`` from ``source``; None when a value
        made inside leaks to a node outside (then it is no block).

        Nodes that read only ``source`` and weights (e.g. a quantize-dequantize pair of the
        input) may also feed others: they stay outside, run once before the block."""
        nodes = (self.ancestors(output, source) & self.descendants(source)) - self.constant
        prologue: set[int] = set()
        for index in sorted(nodes):
            ins = [i for i in self.nodes[index].input if i and not self.is_weight(i)]
            if all(i == source or self.made_by(i) in prologue for i in ins):
                prologue.add(index)
        leaking = set()
        for index in nodes:
            for out in self.nodes[index].output:
                if out == output:
                    continue
                outside = any(user not in nodes for user in self.consumers.get(out, []))
                if outside or out in self.profile.outputs:
                    leaking.add(index)
        if leaking - prologue:
            return None
        for index in leaking:
            nodes -= self.ancestors(self.nodes[index].output[0], source) & prologue
        return frozenset(nodes)

    def cut_of(self, name: str, units: int, full: int) -> Cut | None:
        """The cut of a float weight applied elementwise in the sliced space, if it has the
        sliced width: along its last axis (…, units x width), or a heads axis (1, units, …)."""
        init = self.inits.get(name)
        if init is None or init.data_type not in _FLOAT:
            return None
        dims = list(init.dims)
        if dims and dims[-1] == full and int(np.prod(dims[:-1])) == 1:
            return Cut(name, len(dims) - 1)
        if len(dims) == 4 and dims[1] == units > 1 and dims[0] == 1:
            return Cut(name, 1)
        return None

    def sliced(self, name: str, units: int, full: int) -> bool:
        """Whether a value holds the sliced width: (…, units x width), or heads on their own
        axis, (B, heads, …) or (B, T, heads, width)."""
        shape = self.shapes.get(name, ())
        if not shape:
            return False
        if shape[-1] == full:
            return True
        width = full // units
        return len(shape) == 4 and (shape[1] == units or shape[2:] == (units, width))

    def space_cuts(
        self, nodes: frozenset[int], columns: set[int], rows: int, units: int, full: int
    ) -> list[Cut]:
        """Cuts of the weights applied in the sliced space: from the outputs of the column-cut
        projections up to the row-cut one, and the side branches that feed it (e.g. a
        per-channel scale multiplied by the activation's scale)."""
        space = {o for i in columns for o in self.nodes[i].output}
        cuts: dict[str, Cut] = {}

        def side(value: str) -> None:
            index = self.made_by(value)
            if index is None or index not in nodes or index in columns or index == rows:
                return
            for name in self.nodes[index].input:
                cut = self.cut_of(name, units, full) if name in self.inits else None
                if cut is not None:
                    cuts[name] = cut
                elif name and name not in self.inits and self.sliced(name, units, full):
                    side(name)

        for index in sorted(nodes):
            node = self.nodes[index]
            if index in columns or index == rows or not any(i in space for i in node.input):
                continue
            space.update(o for o in node.output if self.sliced(o, units, full))
            for name in node.input:
                if not name or name in space:
                    continue
                if name in self.inits:
                    cut = self.cut_of(name, units, full)
                    if cut is not None:
                        cuts[name] = cut
                elif self.sliced(name, units, full):
                    side(name)
        return list(cuts.values())


def _attention(g: _Graph, softmax: int) -> Block | None:
    node = g.nodes[softmax]
    scores = g.made_by(node.input[0])
    for _ in range(8):  # Softmax <- Add(mask) <- Mul(scale) <- (Q/DQ) <- MatMul(Q, Kᵀ)
        if scores is None or g.op(scores) == "MatMul":
            break
        scores = g.made_by(g.nodes[scores].input[0])
    if scores is None or g.op(scores) != "MatMul" or g.weight(scores):
        return None
    users = g.consumers.get(node.output[0], [])
    while len(users) == 1 and g.op(users[0]) in _QUANTIZE:
        users = g.consumers.get(g.nodes[users[0]].output[0], [])
    if len(users) != 1 or g.op(users[0]) != "MatMul":
        return None
    pv = users[0]
    projections = [
        g.back_to_projection(g.nodes[scores].input[0]),
        g.back_to_projection(g.nodes[scores].input[1]),
        g.back_to_projection(g.nodes[pv].input[1]),
    ]
    out = g.forward_to_projection(g.nodes[pv].output[0])
    if out is None or any(p is None for p in projections):
        return None
    columns = {p for p in projections if p is not None}
    sources = {g.float_input(p) for p in columns}
    if len(sources) != 1:
        return None
    (source,) = sources
    heads_shape = g.shapes.get(g.nodes[pv].output[0])  # (B, heads, T, head_dim)
    if heads_shape is None or len(heads_shape) != 4:
        return None
    units, width = heads_shape[1], heads_shape[3]
    output = g.float_output(out)
    nodes = g.between(source, output)
    if nodes is None or softmax not in nodes:
        return None
    cuts = [cut for p in sorted(columns) for cut in g.weight_cuts(p, 1)]
    cuts += g.weight_cuts(out, 0)
    cuts += g.space_cuts(nodes, columns, out, units, units * width)
    return Block("attention", nodes, output, units, width, tuple(cuts))


def _fused_attention(g: _Graph, index: int) -> Block | None:
    """onnxruntime's ``Attention``: one weight holds Q|K|V side by side."""
    node = g.nodes[index]
    weight = g.weight(index)
    heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
    if weight is None or heads < 1 or any(a.name == "qkv_hidden_sizes" for a in node.attribute):
        return None
    columns = list(g.inits[weight].dims)[1]
    if columns % (3 * heads):
        return None
    width = columns // 3 // heads
    out = g.forward_to_projection(node.output[0])
    if out is None:
        return None
    source = g.float_input(index)
    output = g.float_output(out)
    nodes = g.between(source, output)
    if nodes is None or index not in nodes:
        return None
    cuts = [Cut(weight, 1, groups=3)]
    if len(node.input) > 2 and node.input[2] in g.inits:
        cuts.append(Cut(node.input[2], 0, groups=3))
    cuts += g.weight_cuts(out, 0)
    cuts += g.space_cuts(nodes, {index}, out, heads, heads * width)
    return Block("attention", nodes, output, heads, width, tuple(cuts), (node.output[0],))


def _ffn(g: _Graph, first: int, used: set[int]) -> Block | None:
    frontier = [g.nodes[first].output[0]]
    seen: set[int] = set()
    second = None
    while frontier:
        value = frontier.pop()
        for index in g.consumers.get(value, []):
            node = g.nodes[index]
            if g.weight(index) is not None and node.input[0] == value:
                if second not in (None, index):
                    return None
                second = index
            elif g.op(index) in _ELEMENTWISE and index not in used:
                if index not in seen:
                    seen.add(index)
                    frontier.append(node.output[0])
            else:
                return None
    if second is None or not seen:
        return None
    neurons = g.shapes.get(g.nodes[first].output[0], (0,))[-1]
    output = g.float_output(second)
    nodes = g.between(g.float_input(first), output)
    if nodes is None or nodes & used:
        return None
    cuts = [*g.weight_cuts(first, 1), *g.weight_cuts(second, 0)]
    cuts += g.space_cuts(nodes, {first}, second, neurons, neurons)
    return Block("ffn", nodes, output, neurons, 1, tuple(cuts))


def find_blocks(graph: GraphProfile) -> list[Block]:
    """Every attention and FFN block of the graph, in topological order."""
    g = _Graph(graph)
    blocks: list[Block] = []
    used: set[int] = set()
    for index, node in enumerate(g.nodes):
        block = None
        if node.op_type == "Softmax":
            block = _attention(g, index)
        elif node.op_type == "Attention" and node.domain == "com.microsoft":
            block = _fused_attention(g, index)
        if block:
            blocks.append(block)
            used |= block.nodes
    for index in range(len(g.nodes)):
        if index not in used and g.op(index) in {"MatMul", "MatMulInteger"} and g.weight(index):
            block = _ffn(g, index, used)
            if block:
                blocks.append(block)
                used |= block.nodes
    blocks.sort(key=lambda b: b.first)
    for a, b in itertools.pairwise(blocks):
        if b.first <= a.last:
            raise ExportError(f"{a.kind} and {b.kind} blocks overlap at node {b.first}")
    if not blocks:
        ops = sorted({n.op_type for n in g.nodes})
        raise DeviceError(
            "strategy heads found no attention or FFN block in this graph: no Softmax between "
            "projections of one input, and no pair of weight MatMuls joined by elementwise "
            f"operators (operators present: {', '.join(ops)})"
        )
    return blocks


def _resize_reshapes(sub: onnx.ModelProto, units: int, width: int, kept: int) -> None:
    """Reshape targets stored as constants name the head count (…, heads, head_dim) or the
    width (…, heads * head_dim): give them the slice's."""
    inits = {i.name: i for i in sub.graph.initializer}
    for node in sub.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
        if target.ndim != 1:
            continue
        if len(target) == 4 and target[2] == units and target[3] == width:
            target[2] = kept
        elif target[-1] == units * width:
            target[-1] = kept * width
        else:
            continue
        name = f"{node.input[1]}__{kept}_heads"
        if name not in inits:
            inits[name] = onnx.numpy_helper.from_array(target, name)
            sub.graph.initializer.append(inits[name])
        node.input[1] = name


def cut_array(array: np.ndarray, cut: Cut, lo: int, hi: int) -> np.ndarray:
    """Columns ``[lo, hi)`` of each of ``cut.groups`` equal parts of ``array``'s cut axis."""
    parts = np.split(array, cut.groups, axis=cut.axis)
    index: list[slice] = [slice(None)] * array.ndim
    index[cut.axis] = slice(lo, hi)
    return np.ascontiguousarray(np.concatenate([p[tuple(index)] for p in parts], axis=cut.axis))


def slice_block(
    sub: onnx.ModelProto,
    cuts: tuple[Cut, ...],
    units: int,
    width: int,
    span: tuple[int, int],
    heads_attributes: tuple[str, ...] = (),
) -> None:
    """Cut, in place, an extracted block model to units ``span`` of its ``units``."""
    lo, hi = span[0] * width, span[1] * width
    wanted = {c.name: c for c in cuts}
    kept = []
    for init in sub.graph.initializer:
        cut = wanted.get(init.name)
        if cut is None:
            kept.append(init)
            continue
        array = onnx.numpy_helper.to_array(init)
        kept.append(onnx.numpy_helper.from_array(cut_array(array, cut, lo, hi), init.name))
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(kept)
    count = span[1] - span[0]
    for node in sub.graph.node:
        if node.output and node.output[0] in heads_attributes:
            for attribute in node.attribute:
                if attribute.name == "num_heads":
                    attribute.CopyFrom(helper.make_attribute("num_heads", count))
    _resize_reshapes(sub, units, width, count)
    used = {name for node in sub.graph.node for name in node.input}
    for init in [i for i in sub.graph.initializer if i.name not in used]:
        sub.graph.initializer.remove(init)
    del sub.graph.value_info[:]  # shapes inside changed with the slice
