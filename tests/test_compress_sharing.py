"""Weight sharing: k-means codebooks, and the packed ONNX encoding (exact, folded at load)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from edgec.compressor.sharing import kmeans_rows, share_tensor
from edgec.exporters.weight_sharing import encode_shared_weights, pack_bits, unpack_bits
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
@given(bits=st.integers(2, 8), count=st.integers(1, 300), seed=st.integers(0, 100))
def test_bit_packing_round_trips(bits, count, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, size=count)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8
    assert len(packed) <= (count * bits + 7) // 8 + 2
    assert np.array_equal(unpack_bits(packed, bits, count), values)


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


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("transpose", [False, True])
def test_encoded_weight_decodes_exactly_and_is_folded_at_load(bits, transpose, tmp_path):
    rng = np.random.default_rng(bits)
    codebook = rng.standard_normal((96, 2**bits)).astype(np.float16).astype(np.float32)
    weight = np.take_along_axis(codebook, rng.integers(0, 2**bits, (96, 160)), 1)
    if transpose:  # a per-output-column codebook, as MatMul weights have
        weight = np.ascontiguousarray(weight.T)
    model = _matmul_model(weight)
    encoded = encode_shared_weights(model)
    onnx.checker.check_model(model, full_check=True)
    assert [e.bits for e in encoded] == [bits]
    assert encoded[0].bytes_after <= weight.size * bits / 8 + 96 * 2**bits * 2 + 8
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options)
    x = rng.standard_normal((3, weight.shape[0])).astype(np.float32)
    reference = ort.InferenceSession(_matmul_model(weight).SerializeToString())
    # The decode is exact: same weight, so the same MatMul result bit for bit.
    assert np.array_equal(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops == ["MatMul"]  # every decode node was constant-folded away


def test_float_weights_off_the_codebook_grid_are_left_alone():
    weight = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    model = _matmul_model(weight)
    assert encode_shared_weights(model) == []
    assert [i.name for i in model.graph.initializer] == ["w"]
