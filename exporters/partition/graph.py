"""What the planner knows about an ONNX graph: per node FLOPs, parameter bytes, tensor sizes.

Shapes come from running the graph once on example inputs (every intermediate made a graph
output), so the analysis holds for any ONNX graph onnxruntime runs, with dynamic shapes resolved
at the planning size. Generic: nothing here knows about transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgec.errors import ExportError

_MATMULS = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}
_CONVS = {"Conv", "ConvInteger", "QLinearConv"}
_INT8_WEIGHTS = {"DequantizeLinear"}  # a MatMul fed by these runs as an int8 kernel in ORT
# Computed from weights alone, but left unfolded by onnxruntime (it fuses a weight's
# DequantizeLinear into the int8 kernel that reads it): its int8 input is what is held.
_KEPT_UNFOLDED = {"DequantizeLinear"}

# What an onnxruntime session holds beyond its weights and activations, measured with
# ``edgec.runtimes.memory`` on this project's packages (CPU provider, fresh process): about
# 19 MB of its own (thread pools, allocators, graph structures, kernel code paged in), plus
# about a fifth of the weight bytes it parsed from the ONNX file, which the allocator keeps.
SESSION_BYTES = 19_000_000
PARSED_FRACTION = 0.2


def model_memory(params: int, pinned: int, live: int) -> int:
    """Bytes a stage's model holds in a session: what a device's memory budget bounds.

    ``params``: weight bytes as onnxruntime computes with them; ``pinned``: the part of them the
    runtime supplies decoded (its buffer and onnxruntime's prepacked copy coexist while the
    session loads, so it counts twice); ``live``: the peak bytes of activations alive at once.
    """
    return params + pinned + live


def session_memory(params: int, pinned: int, live: int) -> int:
    """Predicted resident bytes of a stage's process above the bare interpreter with
    onnxruntime: the model's bytes plus the session's own (``SESSION_BYTES``, and the parser's
    leftovers for the weights read from the ONNX file)."""
    parsed = params - pinned
    return model_memory(params, pinned, live) + SESSION_BYTES + int(PARSED_FRACTION * parsed)


@dataclass(frozen=True)
class NodeCost:
    """One node: matmul FLOPs (int8 or fp32), elementwise bytes touched, parameters it reads."""

    index: int
    name: str
    op_type: str
    flops: float
    int8: bool
    bytes_touched: float
    params: frozenset[str]
    constant: bool = False  # computed from weights alone: folded at load, costs no time


@dataclass(frozen=True)
class GraphProfile:
    """The analysed graph: nodes in topological order, tensor sizes at the planning shapes.

    ``tensor_bytes`` maps every value (input, intermediate, output) to its size in bytes;
    ``param_bytes`` maps each initializer (and Constant output) to its size in bytes;
    ``pinned`` names the initializers the runtime supplies decoded (``edgec.runtimes.lowbit``);
    ``constants`` the values computed from weights alone (a dequantize, a decode): parameters of
    the nodes that read them, never tensors crossing between stages.
    """

    model: onnx.ModelProto
    nodes: tuple[NodeCost, ...]
    tensor_bytes: dict[str, int]
    param_bytes: dict[str, int]
    producers: dict[str, int]
    consumers: dict[str, tuple[int, ...]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    feeds_shape: dict[str, tuple[int, ...]]
    tensor_types: dict[str, tuple[int, int]]  # value -> (ONNX element type, rank)
    tensor_shapes: dict[str, tuple[int, ...]]  # value -> shape at the planning size
    pinned: frozenset[str] = frozenset()
    constants: frozenset[str] = frozenset()

    def crossing(self, cut: int) -> list[str]:
        """Values made before position ``cut`` (or model inputs) and needed at or after it."""
        live = []
        for name in self.tensor_bytes:
            if name in self.param_bytes or name in self.constants:
                continue
            made = self.producers.get(name, -1)
            if made >= cut:
                continue
            needed = [c for c in self.consumers.get(name, ()) if c >= cut]
            if needed or (name in self.outputs and made >= 0):
                live.append(name)
        return sorted(live)

    def segment_params(self, start: int, stop: int) -> set[str]:
        names: set[str] = set()
        for node in self.nodes[start:stop]:
            names |= node.params
        return names


def _all_values_as_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = []
    for node in probe.graph.node:
        for out in node.output:
            if not out or out in known:
                continue
            value = onnx.ValueInfoProto(name=out)
            if out in types:
                value.type.CopyFrom(types[out])
            probe.graph.output.append(value)
            names.append(out)
            known.add(out)
    return probe, names


def _constant_bytes(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value":
            return int(numpy_helper.to_array(attr.t).nbytes)
    return 0


def _matmul_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> float:
    out = shapes.get(node.output[0])
    a = shapes.get(node.input[0])
    if out is None or a is None or not a:
        return 0.0
    inner = a[-1]
    if node.op_type == "Gemm":
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        inner = a[0] if trans_a else a[-1]
    return 2.0 * float(np.prod(out)) * inner


def _conv_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> float:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[3] if node.op_type == "QLinearConv" else node.input[1])
    if out is None or w is None:
        return 0.0
    return 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))


def analyse(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], pinned: frozenset[str] = frozenset()
) -> GraphProfile:
    """Run ``model`` once on ``feeds`` and measure every node. Raises ExportError if it fails.

    ``pinned``: initializers the runtime decodes and supplies itself (a stage's coded weights).
    """
    graph = model.graph
    params = {init.name: int(numpy_helper.to_array(init).nbytes) for init in graph.initializer}
    initializers = frozenset(params)
    for node in graph.node:
        if node.op_type == "Constant":
            params[node.output[0]] = _constant_bytes(node)
    probe, names = _all_values_as_outputs(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        outputs = [o.name for o in graph.output]
        values = session.run([*outputs, *names], dict(feeds))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"cannot run the graph to measure it: {exc}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    types: dict[str, tuple[int, int]] = {}
    for name, value in zip([*outputs, *names], values, strict=True):
        array = np.asarray(value)
        shapes[name], sizes[name] = tuple(array.shape), int(array.nbytes)
        types[name] = (onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.ndim)
    for name, value in feeds.items():
        shapes[name], sizes[name] = tuple(value.shape), int(value.nbytes)
    producers: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    nodes = []
    # value -> the weights it is computed from (and itself, where onnxruntime holds it folded)
    roots: dict[str, frozenset[str]] = {name: frozenset([name]) for name in params}
    for index, node in enumerate(graph.node):
        for out in node.output:
            producers[out] = index
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(index)
        used = frozenset().union(*(roots[i] for i in node.input if i in roots))
        constant = node.op_type == "Constant" or (
            any(node.input) and all(i in roots for i in node.input if i)
        )
        if constant:
            for out in node.output:
                held = node.op_type not in _KEPT_UNFOLDED and node.op_type != "Constant"
                if held and out in sizes:
                    params[out] = sizes[out]
                roots[out] = used | ({out} if held or node.op_type == "Constant" else set())
            nodes.append(
                NodeCost(
                    index,
                    node.name or f"{node.op_type}_{index}",
                    node.op_type,
                    0.0,
                    False,
                    0.0,
                    frozenset(),
                    True,
                )
            )
            continue
        flops = 0.0
        if node.op_type in _MATMULS:
            flops = _matmul_flops(node, shapes)
        elif node.op_type in _CONVS:
            flops = _conv_flops(node, shapes)
        int8 = node.op_type in {"MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv"}
        if node.op_type in _MATMULS | _CONVS and not int8:
            int8 = any(
                producers.get(i) is not None and graph.node[producers[i]].op_type in _INT8_WEIGHTS
                for i in node.input[:2]
            )
        touched = 0.0
        if not flops:
            touched = float(
                sum(sizes.get(i, 0) for i in node.input if i and i not in params)
                + sum(sizes.get(o, 0) for o in node.output)
            )
        nodes.append(
            NodeCost(
                index,
                node.name or f"{node.op_type}_{index}",
                node.op_type,
                flops,
                int8,
                touched,
                used,
            )
        )
    for name in (*params, *(i.name for i in graph.input)):
        sizes.setdefault(name, params.get(name, 0))
    return GraphProfile(
        model=model,
        nodes=tuple(nodes),
        tensor_bytes=sizes,
        param_bytes=params,
        producers=producers,
        consumers={k: tuple(v) for k, v in consumers.items()},
        inputs=tuple(i.name for i in graph.input if i.name not in params),
        outputs=tuple(o.name for o in graph.output),
        feeds_shape={k: tuple(v.shape) for k, v in feeds.items()},
        tensor_types=types,
        tensor_shapes={**shapes, **{i.name: tuple(i.dims) for i in graph.initializer}},
        pinned=frozenset(pinned),
        constants=frozenset(v for v in roots if v not in initializers),
    )
