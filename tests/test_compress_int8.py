"""int8 in the exported graph runs on onnxruntime's integer kernels; fallbacks stay float."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import model_vectors
from edgec.compressor.quantization import quantize, quantize_weight, remove_simulation
from edgec.compressor.recipe import QuantizeStep
from edgec.exporters.quantize import nodes_using, quantize_int8
from edgec.models import load_model
from edgec.runtimes import read_package
from edgec.runtimes.backends import create_session

INTEGER_OPS = {
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "QAttention",
    "QGemm",
}


def _optimized_ops(path, tmp_path) -> Counter:
    """Operator counts of the graph onnxruntime runs; ``path``: an .onnx file or a package."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    if path.is_dir():  # a package: its coded weights decoded as edgec's runtime does
        stage = read_package(path).manifest.stages[0]
        weights = None if stage.weights is None else path / stage.weights
        create_session(path / stage.file, options, ["CPUExecutionProvider"], weights, stage.coded)
    else:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _float_matmuls_with_constant_weight(path) -> int:
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def test_quantized_package_runs_on_integer_kernels(compressed_bert, tmp_path):
    _, package = compressed_bert
    ops = _optimized_ops(package, tmp_path)
    integer = sum(ops[o] for o in INTEGER_OPS)
    assert integer >= 8, ops  # q/k/v (or the fused QAttention), o, and the FFN of two layers
    assert _float_matmuls_with_constant_weight(tmp_path / "optimized.onnx") == 0
    manifest = read_package(package).manifest
    sharing = manifest.report["graph"]["weight_sharing"]
    assert sharing and all(e["bits"] == 4 for e in sharing)
    # 4-bit storage, int8 compute: the Linears' codes are decoded before the session...
    linears = [e for e in sharing if e["tensor"].endswith("quantized")]
    assert linears and all(e["decoded_at"] == "load" for e in linears)
    assert {c.name for c in manifest.stages[0].coded} == {e["tensor"] for e in linears}
    # ...and only the embedding lookups decode per run: one shift per gathered table
    gathered = [e for e in sharing if e["decoded_at"] == "gather"]
    assert gathered and ops["BitShift"] == len(gathered)


def test_weights_on_the_int8_grid_are_reproduced_by_onnxruntime(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    grid = quantize_weight(weight)
    scale = weight.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(grid, weight, atol=float(scale.max()) / 2 + 1e-7)
    assert (grid / scale).round().sub(grid / scale).abs().max() < 1e-4


def test_static_qdq_is_fused_into_integer_kernels(wide_bert, tmp_path):
    from edgec.exporters.torch_to_onnx import export_onnx

    model, spec = load_model(wide_bert)
    export_onnx(model, spec, tmp_path / "float.onnx")
    batches = [spec.example_inputs(batch=2, sequence=12, seed=s) for s in range(4)]
    proto = quantize_int8(
        onnx.load(str(tmp_path / "float.onnx")),
        mode="static",
        per_channel=True,
        exclude=[],
        calibration=batches,
        method="minmax",
    )
    assert Counter(n.op_type for n in proto.graph.node)["QuantizeLinear"] > 0
    onnx.save_model(proto, str(tmp_path / "qdq.onnx"))
    ops = _optimized_ops(tmp_path / "qdq.onnx", tmp_path)
    assert sum(ops[o] for o in INTEGER_OPS) >= 12, ops
    assert _float_matmuls_with_constant_weight(tmp_path / "optimized.onnx") == 0


@pytest.mark.parametrize(("floor", "fallbacks"), [(0.0, 0), (1.0, 12)])
def test_fallback_layers_stay_float_until_the_floor_is_met(floor, fallbacks, tiny_models):
    model, spec = load_model(tiny_models["bert"])
    data = Dataset([spec.example_inputs(batch=4, sequence=12, seed=s) for s in range(2)], None, "r")
    reference = model_vectors(model, spec, data)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, details = quantize(model, spec, QuantizeStep(fidelity_floor=floor), data, reference)
    remove_simulation(model)
    assert len(details["float_fallback"]) == fallbacks
    assert len(details["quantized"]) == 12 - fallbacks
    for name in details["float_fallback"]:  # float layers keep their exact weights
        assert torch.equal(model.get_submodule(name).weight, original[f"{name}.weight"])
    for name in details["quantized"]:
        assert not torch.equal(model.get_submodule(name).weight, original[f"{name}.weight"])


def test_excluded_layers_are_found_by_value(wide_bert, tmp_path):
    from edgec.exporters.torch_to_onnx import export_onnx

    model, spec = load_model(wide_bert)
    export_onnx(model, spec, tmp_path / "float.onnx")
    proto = onnx.load(str(tmp_path / "float.onnx"))
    query = model.encoder.layer[1].attention.self.query.weight.detach().numpy()
    found = nodes_using(proto, [query])
    assert len(found) == 1
    quantized = quantize_int8(proto, mode="dynamic", per_channel=True, exclude=found)
    weights = {i.name for i in quantized.graph.initializer}
    float_linears = [
        n.name
        for n in quantized.graph.node
        if n.op_type == "MatMul" and any(name in weights for name in n.input)
    ]
    assert float_linears == found  # the excluded Linear alone stays float...
    int8_linears = [n for n in quantized.graph.node if n.op_type == "MatMulInteger"]
    assert len(int8_linears) == 11  # ...and the other 11 of wide_bert's 12 run int8


def test_static_recipe_exports_qdq_with_its_calibration(wide_bert, text_calibration, tmp_path):
    from edgec.compressor import Recipe, compress
    from edgec.exporters import export

    recipe = Recipe(name="static", steps=(QuantizeStep(mode="static", calibration="percentile"),))
    compress(wide_bert, recipe, tmp_path / "ckpt", calib=text_calibration)
    assert (tmp_path / "ckpt" / "calibration.npz").is_file()
    export(tmp_path / "ckpt", tmp_path / "pkg")
    manifest = read_package(tmp_path / "pkg").manifest
    assert manifest.report["graph"]["int8"]["mode"] == "static"
    assert manifest.report["graph"]["vs_checkpoint"]["cos_mean"] > 0.99
    ops = _optimized_ops(tmp_path / "pkg" / "model.onnx", tmp_path)
    assert sum(ops[o] for o in INTEGER_OPS) >= 8, ops


def test_distillation_after_int8_trains_on_the_grid_and_exports_exactly(
    wide_bert, text_calibration, tmp_path
):
    """share -> quantize -> distill: quantization-aware, so the weights end on the int8 grid
    within their codebooks, and onnxruntime's int8 graph reproduces the checkpoint."""
    from edgec.compressor import DistillStep, Recipe, ShareStep, compress
    from edgec.exporters import export

    steps = (ShareStep(bits=3, layers=("linears",)), QuantizeStep(mode="dynamic"))
    compress(wide_bert, Recipe(name="t", steps=steps), tmp_path / "q", calib=text_calibration)
    recipe = Recipe(name="t", steps=(*steps, DistillStep(steps=6, lr=1e-3)))
    result = compress(wide_bert, recipe, tmp_path / "qat", calib=text_calibration)
    quantized = result.steps[2].details["quantized"]
    assert result.steps[3].details["int8_aware"] == len(quantized) > 0
    before = dict(load_model(tmp_path / "q")[0].named_modules())
    after = dict(load_model(tmp_path / "qat")[0].named_modules())
    for name in quantized:
        weight = after[name].weight.detach()
        assert torch.equal(quantize_weight(weight), weight), name  # on the grid
        assert max(len(row.unique()) for row in weight) <= 8, name  # within its codebook
        assert not torch.equal(weight, before[name].weight.detach())  # and trained
    export(tmp_path / "qat", tmp_path / "pkg")
    graph = read_package(tmp_path / "pkg").manifest.report["graph"]
    assert graph["vs_checkpoint"]["cos_min"] > 0.9999
    assert graph["weight_sharing"] and all(e["bits"] == 3 for e in graph["weight_sharing"])
