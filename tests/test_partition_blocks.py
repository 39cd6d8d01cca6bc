"""Heads find their blocks on onnxruntime-fused graphs: BiasGelu/SkipLayerNormalization from
its transformer optimizer, and its fused ``Attention`` operator (Q|K|V in one weight)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgec.exporters.package_writer import hash_files, write_manifest
from edgec.exporters.partition import analyse, partition_package
from edgec.exporters.partition.blocks import find_blocks, slice_block
from edgec.exporters.partition.write import typed
from edgec.runtimes import read_package
from edgec.runtimes.devices import DeviceProfile, DeviceSet
from onnx import TensorProto, helper, numpy_helper

TWO = DeviceSet((DeviceProfile("a", threads=1), DeviceProfile("b", threads=1)))


@pytest.fixture(scope="module")
def fused_bert_package(bert_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random BERT after onnxruntime's transformer optimizer, as a single-stage package."""
    from edgec.exporters.fusion import _optimize

    root = tmp_path_factory.mktemp("packages") / "bert-fused"
    shutil.copytree(bert_package, root)
    fused = _optimize(bert_package / "model.onnx", "bert", attention=True)
    onnx.save_model(fused, str(root / "model.onnx"))
    manifest = read_package(bert_package).manifest
    files = hash_files(root, list(manifest.files))
    stage = replace(manifest.stages[0], sha256=files["model.onnx"], contrib_ops=True)
    write_manifest(root, replace(manifest, files=files, stages=(stage,)))
    return root


def test_heads_split_a_fused_graph_losslessly(fused_bert_package, tmp_path):
    ops = {n.op_type for n in onnx.load(str(fused_bert_package / "model.onnx")).graph.node}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops
    result = partition_package(fused_bert_package, tmp_path / "split", TWO, "heads")
    assert result.max_abs_error <= 1e-5
    kinds = {s.slice.kind for s in result.plan.stages if s.slice}
    assert kinds == {"attention", "ffn"}
    # BiasGelu's bias is cut with the neurons it belongs to
    ffn = next(s for s in result.plan.stages if s.slice and s.slice.kind == "ffn")
    assert any(c.name.endswith("intermediate.dense.bias") for c in ffn.slice.cuts)


def _fused_attention_model(hidden: int = 16, heads: int = 4) -> onnx.ModelProto:
    """x -> Attention(Q|K|V) -> MatMul(Wo) -> y, with random weights."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node(
            "Attention",
            ["x", "qkv", "qkv_bias"],
            ["context"],
            domain="com.microsoft",
            num_heads=heads,
            name="attention",
        ),
        helper.make_node("MatMul", ["context", "wo"], ["projected"], name="out"),
        helper.make_node("Add", ["projected", "bo"], ["y"], name="out_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [
            weight("qkv", hidden, 3 * hidden),
            weight("qkv_bias", 3 * hidden),
            weight("wo", hidden, hidden),
            weight("bo", hidden),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def test_fused_attention_slices_sum_to_the_whole_block():
    model = _fused_attention_model()
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    graph = analyse(model, {"x": x})
    (block,) = find_blocks(graph)
    assert (block.kind, block.units, block.width) == ("attention", 4, 4)
    assert {(c.name, c.groups) for c in block.cuts} >= {("qkv", 3), ("qkv_bias", 3), ("wo", 1)}
    assert block.output == "projected"  # the output bias stays after the sum, added once
    model = typed(model, graph)  # a type on every value, as the writer cuts from
    whole = _run(
        onnx.utils.Extractor(model).extract_model(["x"], ["projected"]), {"x": x}, "projected"
    )
    total = np.zeros_like(whole)
    for span in ((0, 1), (1, 4)):
        sub = onnx.utils.Extractor(model).extract_model(["x"], [block.output])
        slice_block(sub, block.cuts, block.units, block.width, span, block.heads_attributes)
        heads = next(a.i for n in sub.graph.node for a in n.attribute if a.name == "num_heads")
        assert heads == span[1] - span[0]
        total += _run(sub, {"x": x}, block.output)
    np.testing.assert_allclose(total, whole, atol=1e-5)
