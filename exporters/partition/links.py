"""int8 activations across a slow link: the producing stage quantizes what crosses, the
consuming stage dequantizes it, so the link carries a quarter of the bytes.

Per token (the last axis): ``scale = max |x / c| / 127`` and ``q = round(x / c / scale)`` as
int8; the consumer computes ``q * scale * c``. A transformer's hidden states hold a few channels
far larger than the rest, which would set every token's scale and leave the others a handful
of levels: ``c``, one constant per channel measured on example inputs when the stages are
written (the channel's largest magnitude), evens them out first. The link carries the int8
values and one float per token.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANTIZED = "{}__int8"
SCALE = "{}__scale"
_EPS = 1e-12


def link_names(tensor: str) -> tuple[str, str]:
    """The two tensors that carry ``tensor`` across a link: int8 values and per-token scales."""
    return QUANTIZED.format(tensor), SCALE.format(tensor)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def _const(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    if all(i.name != name for i in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def channel_scales(values: np.ndarray) -> np.ndarray:
    """Per channel (last axis) of example activations: its largest magnitude, floored at a
    millionth of the largest, so that no channel is divided by zero."""
    peak = np.abs(values.reshape(-1, values.shape[-1])).max(axis=0).astype(np.float32)
    return np.maximum(peak, float(peak.max()) * 1e-6 + _EPS).astype(np.float32)


def quantize_outputs(
    model: onnx.ModelProto, names: list[str], channels: dict[str, np.ndarray]
) -> None:
    """Replace, in place, each float graph output in ``names`` by its int8 values and scales;
    ``channels[name]`` evens its channels out first (``channel_scales``)."""
    if not names:
        return
    graph = model.graph
    axes = _const(model, "link__axes", np.array([-1], dtype=np.int64))
    eps = _const(model, "link__eps", np.array(_EPS, dtype=np.float32))
    top = _const(model, "link__127", np.array(127.0, dtype=np.float32))
    low = _const(model, "link__-127", np.array(-127.0, dtype=np.float32))
    for name in names:
        output = next(o for o in graph.output if o.name == name)
        rank = len(output.type.tensor_type.shape.dim)
        values, scales = link_names(name)
        absmax = f"{name}__absmax"
        even = _const(model, f"{name}__channels", channels[name])
        nodes = [
            helper.make_node("Div", [name, even], [f"{name}__even"]),
            helper.make_node("Abs", [f"{name}__even"], [f"{name}__abs"]),
        ]
        if _opset(model) >= 18:
            nodes.append(helper.make_node("ReduceMax", [f"{name}__abs", axes], [absmax]))
        else:
            nodes.append(helper.make_node("ReduceMax", [f"{name}__abs"], [absmax], axes=[-1]))
        nodes += [
            helper.make_node("Max", [absmax, eps], [f"{name}__floor"]),
            helper.make_node("Div", [f"{name}__floor", top], [scales]),
            helper.make_node("Div", [f"{name}__even", scales], [f"{name}__scaled"]),
            helper.make_node("Round", [f"{name}__scaled"], [f"{name}__rounded"]),
            helper.make_node("Clip", [f"{name}__rounded", low, top], [f"{name}__clipped"]),
            helper.make_node("Cast", [f"{name}__clipped"], [values], to=TensorProto.INT8),
        ]
        graph.node.extend(nodes)
        graph.output.remove(output)
        graph.output.extend(
            [
                helper.make_tensor_value_info(values, TensorProto.INT8, [None] * rank),
                helper.make_tensor_value_info(scales, TensorProto.FLOAT, [None] * rank),
            ]
        )


def dequantize_inputs(
    model: onnx.ModelProto, names: list[str], channels: dict[str, np.ndarray]
) -> None:
    """Replace, in place, each float graph input in ``names`` by its int8 values and scales,
    multiplied back (and by ``channels[name]``) before the first node."""
    graph = model.graph
    first = []
    for name in names:
        given = next(i for i in graph.input if i.name == name)
        rank = len(given.type.tensor_type.shape.dim)
        values, scales = link_names(name)
        graph.input.remove(given)
        graph.input.extend(
            [
                helper.make_tensor_value_info(values, TensorProto.INT8, [None] * rank),
                helper.make_tensor_value_info(scales, TensorProto.FLOAT, [None] * rank),
            ]
        )
        even = _const(model, f"{name}__channels", channels[name])
        first += [
            helper.make_node("Cast", [values], [f"{name}__float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}__float", scales], [f"{name}__even"]),
            helper.make_node("Mul", [f"{name}__even", even], [name]),
        ]
    for node in reversed(first):
        graph.node.insert(0, node)


def carried(model: onnx.ModelProto, names: list[str], rank_min: int = 2) -> list[str]:
    """The float tensors among ``names`` worth carrying as int8: at least ``rank_min`` axes
    (token states, not shape vectors or scalars)."""
    values = {v.name: v for v in (*model.graph.output, *model.graph.input)}
    found = []
    for name in names:
        value = values.get(name)
        if value is None:
            continue
        kind = value.type.tensor_type
        if kind.elem_type == TensorProto.FLOAT and len(kind.shape.dim) >= rank_min:
            found.append(name)
    return found


def carried_bytes(tensor_bytes: int, shape: tuple[int, ...]) -> int:
    """Bytes a float32 tensor of ``shape`` takes across a link as int8 values and per-token
    scales."""
    elements = tensor_bytes // 4
    tokens = elements // shape[-1] if shape and shape[-1] else elements
    return elements + 4 * tokens
