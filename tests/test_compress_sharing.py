"""Weight sharing: k-means codebooks, and the packed encoding (exact; low in memory)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from edgec.compressor.sharing import kmeans_rows, share_tensor
from edgec.exporters.partition import load_stage_file
from edgec.exporters.weight_sharing import encode_shared_weights
from edgec.runtimes.backends import create_session
from edgec.runtimes.lowbit import load_coded_weights, pack_rows, unpack_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_kmeans_leaves_at_most_2_to_the_bits_values(bits, granularity):
    torch.manual_seed(0)
    weight = torch.randn(24, 300)
    shared = share_tensor(weight, bits, granularity)
    if granularity == "channel":
        assert max(len(row.unique()) for row in shared) <= 2**bits
    else:
        assert len(shared.unique()) <= 2**bits
    # A lossy step against a stated floor: SQNR grows about 6 dB a bit (per-row k-means).
    sqnr = 10 * torch.log10(weight.pow(2).sum() / (weight - shared).pow(2).sum())
    assert sqnr >= {2: 9, 3: 14, 4: 19, 8: 36}[bits] - (3 if granularity == "tensor" else 0)


def test_activation_weighted_kmeans_favours_heavy_columns():
    torch.manual_seed(0)
    weight = torch.randn(8, 200)
    heavy = torch.ones(200)
    heavy[:20] = 100.0
    plain = kmeans_rows(weight, 2)
    weighted = kmeans_rows(weight, 2, heavy)

    def err(cb_idx):
        return (weight[:, :20] - cb_idx[0].gather(1, cb_idx[1])[:, :20]).pow(2).sum()

    assert err(weighted) < err(plain)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    seed=st.integers(0, 100),
)
def test_row_packing_round_trips(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, cols))
    packed = pack_rows(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (rows, -(-cols // 8) * bits + 1)  # groups of 8 codes, a spare byte
    assert np.array_equal(unpack_rows(packed, bits, cols), codes)


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _shared(rng: np.random.Generator, bits: int, shape: tuple[int, int]) -> np.ndarray:
    codebook = rng.standard_normal((shape[0], 2**bits)).astype(np.float16).astype(np.float32)
    return np.take_along_axis(codebook, rng.integers(0, 2**bits, shape), 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_weight_is_decoded_exactly_by_the_runtime_before_the_session(
    bits, transpose, tmp_path
):
    weight = _shared(np.random.default_rng(bits), bits, (96, 160))
    if transpose:  # a per-output-column codebook, as MatMul weights have
        weight = np.ascontiguousarray(weight.T)
    model = _matmul_model(weight)
    result = encode_shared_weights(model)
    assert [e.bits for e in result.encoded] == [bits]
    assert [e.decoded_at for e in result.encoded] == ["load"]
    assert result.encoded[0].bytes_after <= weight.size * bits / 8 + 160 + 96 * 2**bits * 2
    assert [n.op_type for n in model.graph.node] == ["MatMul"]  # no decode in the graph
    (coded,) = result.coded
    assert coded.transpose == transpose and coded.shape == weight.shape
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    with open(tmp_path / "model.weights.npz", "wb") as fh:
        np.savez(fh, **result.arrays)
    decoded = load_stage_file(tmp_path / "model.onnx", "model.weights.npz", [coded], tmp_path)
    onnx.checker.check_model(decoded, full_check=True)
    assert np.array_equal(
        load_coded_weights(tmp_path / "model.weights.npz", [coded])["w"], weight
    )  # bit for bit
    session = create_session(
        tmp_path / "model.onnx",
        ort.SessionOptions(),
        ["CPUExecutionProvider"],
        tmp_path / "model.weights.npz",
        (coded,),
    )
    x = np.random.default_rng(0).standard_normal((3, weight.shape[0])).astype(np.float32)
    reference = ort.InferenceSession(_matmul_model(weight).SerializeToString())
    assert np.array_equal(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0])


def _gather_model(table: np.ndarray, rank: int) -> onnx.ModelProto:
    ids_shape = ["batch", "seq"][:rank]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [*ids_shape, table.shape[1]])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("bits", "cols"), [(2, 64), (3, 64), (3, 60), (4, 64), (5, 37), (8, 1024)])
@pytest.mark.parametrize("rank", [1, 2])
def test_embedding_table_stays_packed_and_gathered_rows_decode_exactly(bits, cols, rank):
    table = _shared(np.random.default_rng(bits), bits, (300, cols))
    model = _gather_model(table, rank)
    result = encode_shared_weights(model)
    assert [e.decoded_at for e in result.encoded] == ["gather"] and not result.coded
    assert [e.bits for e in result.encoded] == [bits]
    onnx.checker.check_model(model, full_check=True)
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in model.graph.initializer}
    assert "table" not in sizes
    assert sizes["table.codes"] == 300 * (-(-cols // 8) * bits + 1)  # what the device holds
    ids = np.random.default_rng(1).integers(0, 300, (2, 9)[:rank] if rank == 2 else (7,))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"ids": ids})[0], table[ids])


def test_float_weights_off_the_codebook_grid_are_left_alone():
    weight = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    model = _matmul_model(weight)
    result = encode_shared_weights(model)
    assert result.encoded == [] and result.arrays == {}
    assert [i.name for i in model.graph.initializer] == ["w"]


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_cluster_projection_keeps_the_codebook_and_averages_each_cluster(granularity):
    from edgec.compressor.sharing import Clusters

    torch.manual_seed(0)
    shared = share_tensor(torch.randn(16, 64), 3, granularity)
    clusters = Clusters(shared, 8)
    moved = shared + 0.01 * torch.randn_like(shared)  # what an optimizer step does
    projected = moved.clone()
    clusters.project(projected)
    rows = projected.reshape(1, -1) if granularity == "tensor" else projected
    assert max(len(r.unique()) for r in rows) <= 8
    # Members of one cluster before stay together, at their mean (fp16-rounded) after.
    before = shared.reshape(rows.shape)
    for r in range(rows.shape[0]):
        for value in before[r].unique():
            members = before[r] == value
            mean = moved.reshape(rows.shape)[r][members].mean()
            assert torch.allclose(rows[r][members], mean.half().float(), atol=1e-3)
            assert len(rows[r][members].unique()) == 1


def test_distillation_after_sharing_keeps_the_codebooks(wide_bert, text_calibration, tmp_path):
    from edgec.compressor import DistillStep, Recipe, ShareStep, compress
    from edgec.models import load_model

    share = ShareStep(bits=3)
    compress(wide_bert, Recipe(name="t", steps=(share,)), tmp_path / "shared", text_calibration)
    recipe = Recipe(name="t", steps=(share, DistillStep(steps=6, lr=1e-3)))
    result = compress(wide_bert, recipe, tmp_path / "tuned", calib=text_calibration)
    shared_bits = result.steps[1].details["bits"]
    assert result.steps[2].details["shared_kept"] == len(shared_bits) > 0
    tuned = dict(load_model(tmp_path / "tuned")[0].named_parameters())
    shared = dict(load_model(tmp_path / "shared")[0].named_parameters())
    for name in shared_bits:
        weight = tuned[name].detach()
        assert max(len(row.unique()) for row in weight) <= 8, name
        assert not torch.equal(weight, shared[name].detach())  # the centroids were trained


def test_gptq_rounding_stays_on_the_codebook_and_lowers_the_output_error():
    from edgec.compressor.sharing import gptq_assign

    torch.manual_seed(0)
    mixing = torch.randn(64, 64) / 8 + torch.eye(64)
    inputs = torch.randn(2000, 64) @ mixing  # correlated columns, as activations are
    weight = torch.randn(32, 64)
    codebook, idx = kmeans_rows(weight, 3)
    nearest = codebook.gather(1, idx)
    rounded = gptq_assign(weight, codebook, inputs.T @ inputs / len(inputs))
    for row, book in zip(rounded, codebook, strict=True):
        assert set(row.tolist()) <= set(book.tolist())

    def output_error(w: torch.Tensor) -> float:
        return float(((weight - w) @ inputs.T).pow(2).sum())

    assert output_error(rounded) < 0.85 * output_error(nearest)  # measured: 0.74


@pytest.mark.parametrize("dropout", [False, True])
def test_distillation_without_dropout_measures_only_what_the_student_changed(
    wide_bert, text_calibration, dropout
):
    """A student equal to its teacher has nothing to learn: its loss is zero with dropout off,
    and dropout's noise alone when it is on (the recipes' default)."""
    from edgec.compressor.calibration import load_data
    from edgec.compressor.distillation import distill
    from edgec.compressor.recipe import DistillStep
    from edgec.models import load_model

    student, spec = load_model(wide_bert)
    teacher, _ = load_model(wide_bert)
    data = load_data(spec, calib=text_calibration, batch=8).calibration
    step = DistillStep(steps=4, lr=1e-9, batch_size=8, dropout=dropout)
    _, details = distill(student, teacher, spec, step, data)
    assert details["dropout"] is dropout
    if dropout:
        assert details["loss_first"] > 1e-3
    else:
        assert details["loss_first"] < 1e-6
