"""Writes the tiny ONNX graphs ``edgec profile-device`` times (run at development time).

The graphs have no weights (every tensor is an input), so the files are a few hundred bytes and
the device needs onnxruntime only, not the onnx package. Rerun after changing a graph:
``python runtimes/kernels/make_kernels.py``.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).parent
CHAIN = 64  # operators in the overhead graph


def _save(name: str, nodes: list, inputs: list, outputs: list) -> None:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(HERE / f"{name}.onnx"))


def main() -> None:
    f, u8, i8, i32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
    value = helper.make_tensor_value_info
    _save(
        "matmul_fp32",
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [value("a", f, ["m", "k"]), value("b", f, ["k", "n"])],
        [value("c", f, ["m", "n"])],
    )
    _save(
        "matmul_int8",
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        [value("a", u8, ["m", "k"]), value("b", i8, ["k", "n"])],
        [value("c", i32, ["m", "n"])],
    )
    # The elementwise work of a transformer block: GELU's Erf, Softmax, LayerNorm, residual Adds.
    _save(
        "elementwise",
        [
            helper.make_node("Erf", ["x"], ["e"]),
            helper.make_node("Softmax", ["x"], ["s"], axis=-1),
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
            helper.make_node("Add", ["e", "s"], ["es"]),
            helper.make_node("Add", ["es", "n"], ["y"]),
        ],
        [value("x", f, ["m", "k"]), value("g", f, ["k"]), value("b", f, ["k"])],
        [value("y", f, ["m", "k"])],
    )
    nodes = [
        helper.make_node("Add", ["x" if i == 0 else f"t{i}", "y"], [f"t{i + 1}"])
        for i in range(CHAIN)
    ]
    _save(
        "overhead",
        nodes,
        [value("x", f, ["n"]), value("y", f, ["n"])],
        [value(f"t{CHAIN}", f, ["n"])],
    )


if __name__ == "__main__":
    main()
