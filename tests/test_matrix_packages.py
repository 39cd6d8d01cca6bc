"""Every architecture through every recipe (issue 12), on the package side.

Each cell of ``package_matrix`` (minilm, RoBERTa, DistilBERT classifier, ViT classifier x fp32,
int8, balanced, smallest) is an unsplit package that loads with ``edgec.runtimes``, runs, stays
close to its architecture's fp32 package, and carries coded (weight-shared) weights exactly where
its recipe shares weights. Model classes the loader refuses get an error that names why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from edgec.runtimes import load_package, read_package
from edgec.runtimes.manifest import Manifest

from edgec.errors import SourceError

ARCHS = ("minilm", "roberta", "distilbert", "vit")
RECIPES = ("fp32", "int8", "balanced", "smallest")
CELLS = [(arch, recipe) for arch in ARCHS for recipe in RECIPES]
COMPRESSED = [(arch, recipe) for arch, recipe in CELLS if recipe != "fp32"]

# Cosine against the fp32 package of the same arch, per input (pooled embedding, or logits),
# over package_matrix.feeds(arch, 16): (min floor, mean floor). Loose on purpose: they catch a
# broken cell, not a small loss. Measured here (min / mean; the third decimal moves with
# torch's thread count):
#   int8      roberta 1.0000 / 1.0000, distilbert 0.9998 / 0.9999, vit 0.9993 / 0.9997
#   balanced  minilm 0.9278 / 0.9422 (minilm_lowbit: no search, no distillation), roberta
#             0.9980 / 0.9985, distilbert 0.9292 / 0.9658, vit 0.9962 / 0.9987
#   smallest  roberta 0.9913 / 0.9932, distilbert 0.8111 / 0.9278, vit 0.9310 / 0.9775
# (DistilBERT and ViT are classifiers here: the cosine of 10 logits moves more than that of
# a 128-wide embedding.)
FLOORS = {
    "int8": (0.99, 0.995),
    "balanced": (0.85, 0.9),
    "smallest": (0.7, 0.85),
}
SHARED = ("balanced", "smallest")  # recipes with a share step: coded weights in the package


def _vectors(manifest: Manifest, outputs: dict[str, np.ndarray], feeds: dict) -> np.ndarray:
    """One vector per input: token states mean-pooled over the attention mask, or the logits."""
    states = outputs[manifest.outputs[0].name]
    if states.ndim == 2:
        return states
    mask = feeds.get("attention_mask", np.ones(states.shape[:2]))[..., None].astype(np.float32)
    return (states * mask).sum(1) / mask.sum(1)


def _run(package: Path, feeds: dict[str, np.ndarray]) -> tuple[Manifest, dict[str, np.ndarray]]:
    with load_package(package) as runtime:
        return runtime.manifest, runtime.run(feeds)


def test_the_matrix_is_the_one_the_fixture_builds(package_matrix):
    assert (package_matrix.archs, package_matrix.recipes) == (ARCHS, RECIPES)
    with pytest.raises(ValueError, match="archs"):
        package_matrix.get("bert", "fp32")


@pytest.mark.parametrize(("arch", "recipe"), CELLS)
def test_cell_runs_and_stays_close_to_fp32(package_matrix, arch, recipe):
    package = package_matrix.get(arch, recipe)
    feeds = package_matrix.feeds(arch, batch=16)
    manifest, outputs = _run(package, feeds)
    assert sorted(outputs) == sorted(o.name for o in manifest.outputs)
    for info in manifest.outputs:
        value = outputs[info.name]
        assert value.dtype == np.dtype(info.dtype)
        assert value.shape[0] == 16 and value.ndim == len(info.shape)
        assert np.isfinite(value).all(), f"{arch} x {recipe}: {info.name} is not finite"
    if recipe == "fp32":
        return
    reference_manifest, reference = _run(package_matrix.get(arch, "fp32"), feeds)
    ref = _vectors(reference_manifest, reference, feeds).astype(np.float64)
    act = _vectors(manifest, outputs, feeds).astype(np.float64)
    cosine = (ref * act).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(act, axis=1)
    least, average = FLOORS[recipe]
    assert cosine.min() >= least and cosine.mean() >= average, (
        f"{arch} x {recipe} against fp32: cosine min {cosine.min():.4f} (floor {least}), "
        f"mean {cosine.mean():.4f} (floor {average})"
    )


@pytest.mark.parametrize(("arch", "recipe"), CELLS)
def test_coded_weights_exactly_where_the_recipe_shares(package_matrix, arch, recipe):
    manifest = read_package(package_matrix.get(arch, recipe)).manifest
    (stage,) = manifest.stages
    if recipe in SHARED:
        assert stage.coded and stage.weights, f"{arch} x {recipe}: no coded weights"
    else:
        assert not stage.coded and stage.weights is None


@pytest.mark.parametrize(("arch", "recipe"), [c for c in COMPRESSED if c[0] != "vit"])
def test_compressed_embedding_tables_stay_gathered(package_matrix, arch, recipe):
    """Shared embedding tables are decoded per gathered row, never whole at load (an
    EmbedLayerNormalization fusion reads the whole table: it fused on DistilBERT)."""
    manifest = read_package(package_matrix.get(arch, recipe)).manifest
    ops = _ops(package_matrix.get(arch, recipe) / manifest.stages[0].file)
    assert "EmbedLayerNormalization" not in ops
    tables = [e for e in manifest.report["graph"]["weight_sharing"] if "embeddings" in e["tensor"]]
    if recipe in SHARED:
        assert tables and all(e["decoded_at"] == "gather" for e in tables), tables


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# --- what the loader accepts, and what it refuses -----------------------------------------


def _small(model_type: str):  # type: ignore[no-untyped-def]
    """A random 2-layer model of ``model_type`` (hidden 64), or a classifier where noted."""
    import transformers as tf

    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"vocab_size": 200, "intermediate_size": 128, **size}
    image = {"image_size": 16, "patch_size": 4, "num_channels": 3, "intermediate_size": 128}
    return {
        "electra": lambda: tf.ElectraModel(tf.ElectraConfig(embedding_size=32, **text)),
        "deit": lambda: tf.DeiTForImageClassificationWithTeacher(
            tf.DeiTConfig(num_labels=4, **image, **size)
        ),
    }[model_type]()


@pytest.mark.parametrize("model_type", ["electra", "deit"])
def test_the_other_model_types_the_loader_accepts_compress_and_export(
    model_type, text_calibration, one_torch_thread, tmp_path
):
    """Model types the adapters accept beyond the matrix's, where their modules differ: ELECTRA
    (an embedding projection before the encoder) and DeiT with its distillation head (its
    ``logits``: the mean of two heads). XLM-R and CamemBERT are RoBERTa's modules under other
    names. Through every step kind: ``smallest`` with 10 distillation steps instead of 400 (the
    flow, not the fidelity)."""
    import dataclasses

    import torch
    from edgec.compressor import DistillStep, compress
    from edgec.compressor.recipe import BUILTIN_RECIPES
    from edgec.exporters import export

    torch.manual_seed(0)
    source = tmp_path / model_type
    _small(model_type).eval().save_pretrained(source)
    smallest = BUILTIN_RECIPES["smallest"]
    steps = tuple(
        dataclasses.replace(s, steps=10) if isinstance(s, DistillStep) else s
        for s in smallest.steps
    )
    calibration = text_calibration
    if model_type == "deit":
        calibration = tmp_path / "images.npz"
        images = np.random.default_rng(0).integers(0, 256, size=(40, 3, 16, 16), dtype=np.uint8)
        np.savez(calibration, images=images)
    result = compress(
        source,
        dataclasses.replace(smallest, steps=steps),
        tmp_path / "ckpt",
        calib=calibration,
        predict_memory=False,
    )
    assert [s.step for s in result.steps] == ["original", "prune", "distill", "share", "quantize"]
    export(tmp_path / "ckpt", tmp_path / "pkg")
    with load_package(tmp_path / "pkg") as runtime:
        feeds = {
            "pixel_values": np.random.default_rng(1).standard_normal((2, 3, 16, 16)),
            "input_ids": np.full((2, 12), 5),
            "attention_mask": np.ones((2, 12)),
            "token_type_ids": np.zeros((2, 12)),
        }
        inputs = runtime.manifest.inputs
        outputs = runtime.run({i.name: feeds[i.name].astype(i.dtype) for i in inputs})
    expected = "logits" if model_type == "deit" else "last_hidden_state"
    assert list(outputs) == [expected] and np.isfinite(outputs[expected]).all()


@pytest.mark.parametrize(
    ("head", "base"),
    [
        ("BertForMaskedLM", "BertModel"),
        ("BertForTokenClassification", "BertModel"),
        ("BertForQuestionAnswering", "BertModel"),
        ("DistilBertForMultipleChoice", "DistilBertModel"),
        ("ViTForMaskedImageModeling", "ViTModel"),
    ],
)
def test_heads_edgec_does_not_export_are_refused_by_name(head, base, tiny_models, tmp_path):
    """They loaded, then failed deep in the ONNX export with KeyError: 'last_hidden_state'."""
    from edgec.compressor import compress
    from edgec.exporters import export
    from edgec.models import load_model

    family = {"Bert": "bert", "DistilBert": "distilbert", "ViT": "vit"}[base[: -len("Model")]]
    source = tmp_path / head
    source.mkdir()
    for item in tiny_models[family].iterdir():
        (source / item.name).write_bytes(item.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": [head]}))
    for attempt in (
        lambda: load_model(source),
        lambda: export(source, tmp_path / "pkg"),
        lambda: compress(source, "int8", tmp_path / "ckpt", predict_memory=False),
    ):
        with pytest.raises(SourceError, match=head) as caught:
            attempt()
        assert f'"architectures": ["{base}"]' in str(caught.value)
    assert not os.path.exists(tmp_path / "pkg") and not os.path.exists(tmp_path / "ckpt")
