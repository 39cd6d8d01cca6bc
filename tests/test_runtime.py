"""The runtime: embeddings against the torch original, classification, input checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from edgec.models.data import bundled_sentences
from edgec.runtimes import load_package

from edgec.errors import InputError


def _torch_sentence_embeddings(texts: list[str]) -> np.ndarray:
    """The original model with sentence-transformers' pooling: masked mean, then L2 norm."""
    import torch
    from edgec.models import resolve_source
    from transformers import AutoModel, AutoTokenizer

    _, directory = resolve_source("minilm")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.mark.slow
def test_minilm_embeddings_match_the_original(minilm_package):
    texts = bundled_sentences("heldout")[:64]
    expected = _torch_sentence_embeddings(texts)
    actual = load_package(minilm_package).embed(texts)
    cosine = (actual * expected).sum(axis=1)
    assert actual.shape == (64, 384)
    assert cosine.min() >= 0.99999


@pytest.mark.slow
def test_tiny_vit_digits_classifies_held_out_images(digits_package):
    from edgec.models.data import digits

    images, labels = digits("test")
    result = load_package(digits_package).classify(images)
    accuracy = float((np.array(result.labels, dtype=np.int64) == labels).mean())
    assert accuracy >= 0.95
    assert result.probabilities.shape == (len(labels), 10)
    assert np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def bert_runtime(bert_package):
    return load_package(bert_package)


def _feeds(batch: int = 2, sequence: int = 5) -> dict[str, np.ndarray]:
    ids = np.ones((batch, sequence), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": ids.copy(), "token_type_ids": np.zeros_like(ids)}


def test_run_returns_the_declared_outputs(bert_runtime):
    outputs = bert_runtime.run(_feeds())
    assert list(outputs) == ["last_hidden_state"]
    assert outputs["last_hidden_state"].shape == (2, 5, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("attention_mask"), r"missing input\(s\) \['attention_mask'\]"),
        (lambda f: f.update(pixels=np.zeros(1)), r"unknown input\(s\) \['pixels'\]"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "must be int64, got int32"),
        (lambda f: f.update(input_ids=np.ones((2, 5, 1), np.int64)), "must have 2 dimensions"),
        (
            lambda f: f.update(input_ids=np.ones((3, 5), np.int64)),
            "'batch' is 3 in 'input_ids' but 2",
        ),
        (lambda f: f.update(input_ids=[[1, 2]]), "must be a numpy array"),
        (lambda f: f.update(input_ids=np.ones((2, 0), np.int64)), "is empty"),
    ],
)
def test_bad_inputs_are_named(bert_runtime, change, message):
    feeds = _feeds()
    change(feeds)
    with pytest.raises(InputError, match=message):
        bert_runtime.run(feeds)


def test_embed_needs_an_embedding_package(bert_runtime):
    with pytest.raises(InputError, match="not an embedding model"):
        bert_runtime.embed(["hello"])


def test_importing_the_runtime_loads_neither_torch_nor_transformers():
    code = (
        "import sys, edgec, edgec.runtimes, edgec.runtimes.runtime\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


@pytest.mark.slow
def test_the_package_tokenizer_is_gzipped_and_encodes_like_the_source(minilm_package, tmp_path):
    from edgec.models import resolve_source
    from edgec.runtimes.processing import load_tokenizer
    from tokenizers import Tokenizer

    from edgec.errors import PackageError

    _, directory = resolve_source("minilm")
    source = directory / "tokenizer.json"
    packed = minilm_package / "assets" / "tokenizer.json.gz"
    assert packed.stat().st_size < source.stat().st_size / 2
    texts = bundled_sentences("heldout")[:32]
    expected = [e.ids for e in Tokenizer.from_file(str(source)).encode_batch(texts)]
    assert [e.ids for e in load_tokenizer(packed).encode_batch(texts)] == expected
    assert [e.ids for e in load_tokenizer(source).encode_batch(texts)] == expected  # plain loads
    broken = tmp_path / "tokenizer.json.gz"
    broken.write_bytes(packed.read_bytes()[:100])
    with pytest.raises(PackageError, match=r"tokenizer\.json\.gz"):
        load_tokenizer(broken)
