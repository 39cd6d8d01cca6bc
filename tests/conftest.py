"""Shared fixtures: small random Hugging Face models on disk, and exported packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _save(model, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-initialised small BERT, DistilBERT, RoBERTa and ViT saved as model directories."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    models = {
        "bert": tf.BertModel(tf.BertConfig(vocab_size=200, **common)),
        "roberta": tf.RobertaModel(tf.RobertaConfig(vocab_size=200, **common)),
        "distilbert": tf.DistilBertModel(
            tf.DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        ),
        "vit": tf.ViTForImageClassification(
            tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **common)
        ),
    }
    return {name: _save(model.eval(), root / name) for name, model in models.items()}


@pytest.fixture(scope="session")
def minilm_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "minilm"
    export("minilm", path)
    return path


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "digits"
    export("tiny-vit-digits", path)
    return path


@pytest.fixture(scope="session")
def bert_package(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "bert"
    export(tiny_models["bert"], path)
    return path
