"""What a device pays: low-bit weights stay low in memory, and the manifest predicts it."""

from __future__ import annotations

import numpy as np
import pytest
from edgec.models import load_model
from edgec.models.checkpoint import read_checkpoint
from edgec.runtimes import read_package
from edgec.runtimes.lowbit import load_coded_weights
from edgec.runtimes.memory import baseline, measure

pytestmark = pytest.mark.slow


def test_coded_weights_decode_exactly_to_the_checkpoints_int8_weights(minilm_lowbit):
    checkpoint, package = minilm_lowbit
    pkg = read_package(package)
    stage = pkg.manifest.stages[0]
    assert len(stage.coded) == 36  # every Linear of the 6 blocks, decoded at load
    decoded = load_coded_weights(pkg.path(stage.weights), stage.coded)
    model, _ = load_model(checkpoint)
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    rows = {}
    for lin in linears:
        weight = lin.weight.detach().numpy()
        scale = np.abs(weight).max(axis=1) / 127  # the per-row int8 grid the checkpoint holds
        rows[np.round(weight / scale[:, None]).astype(np.int8).T.tobytes()] = lin
    # each decoded int8 tensor is, bit for bit, one checkpoint Linear's integers (transposed)
    assert all(w.tobytes() in rows for w in decoded.values())
    assert len({w.tobytes() for w in decoded.values()}) == len(decoded)


def test_embedding_table_stays_packed_in_the_graph(minilm_lowbit):
    _, package = minilm_lowbit
    sharing = read_package(package).manifest.report["graph"]["weight_sharing"]
    tables = [e for e in sharing if e["decoded_at"] == "gather"]
    assert any(e["shape"] == [30522, 384] and e["bits"] == 3 for e in tables)
    word = next(e for e in tables if e["shape"] == [30522, 384])
    assert word["bytes_after"] < word["bytes_before"] / 9  # ~3.3 bits a value, codebook included


def test_loaded_package_holds_what_the_manifest_predicts(minilm_lowbit):
    checkpoint, package = minilm_lowbit
    predicted = read_package(package).manifest.stages[0].memory_bytes
    assert predicted is not None
    # compress predicted the same, from a trial export of the same checkpoint
    assert read_checkpoint(checkpoint)["report"]["predicted_memory_bytes"] == predicted
    figures = measure(package, shapes=[(1, 128)], threads=2)
    held = max(figures.load_peak, figures.run_peak["1x128"]) - figures.baseline
    # generous: the prediction is a cost model, the measurement a shared machine's process
    assert 0.6 * predicted <= held <= 1.4 * predicted, (held, predicted)
    # and what loading costs is of the order of the int8 weights, not of the decode: the old
    # fold-at-load decode passed 2 GB for this model
    assert figures.load_peak - figures.baseline < 120e6
    assert 30e6 < baseline() < figures.baseline + 1  # the bare interpreter is the floor


def test_one_60_mb_board_holds_the_low_bit_package_and_decoded_weights_count_as_parameters(
    minilm_lowbit,
):
    from edgec.exporters.partition import load_stage, plan_model
    from edgec.runtimes.devices import DeviceProfile, DeviceSet

    _, package = minilm_lowbit
    pkg = read_package(package)
    stage = pkg.manifest.stages[0]
    pinned = frozenset(c.name for c in stage.coded)
    board = DeviceSet((DeviceProfile(name="board", threads=1, memory_mb=60),))
    plan, graph = plan_model(
        load_stage(pkg, stage), pkg.manifest.inputs, board, "auto", pinned=pinned
    )
    assert plan.strategy == "single"
    (only,) = plan.stages
    decoded = sum(c.decoded_bytes for c in stage.coded)
    # the int8 Linears are parameters (once as held, once more while onnxruntime prepacks them)
    assert only.param_bytes >= decoded and only.memory_bytes >= only.param_bytes + decoded
    assert only.memory_bytes <= 60e6
    assert stage.memory_bytes is not None and stage.memory_bytes <= 60e6
    # no decode passes through weight-sized activations: the embedding table decoded would be
    # 47 MB, one FFN Linear's int64 positions (what the old fold-at-load decode made) 4.7 MB
    activations = [b for name, b in graph.tensor_bytes.items() if name not in graph.param_bytes]
    assert max(activations) < 4e6
