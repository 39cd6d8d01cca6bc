"""Pre- and post-processing a package carries: tokenization, image scaling, pooling, softmax.

numpy and tokenizers only, so a device runs them without torch.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    TextPreprocessing,
)

from edgec.errors import InputError, PackageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face ``tokenizer.json``, plain or gzipped (``tokenizer.json.gz``, what export
    writes: the vocabulary compresses to a third of its size)."""
    from tokenizers import Tokenizer

    try:
        if path.suffix == ".gz":
            return Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise PackageError(f"cannot load tokenizer {path.name}: {exc}") from exc


class TextEncoder:
    """Turns sentences into the model's token tensors, padded to the longest in the batch."""

    def __init__(self, config: TextPreprocessing, tokenizer_path: Path):
        self._tokenizer = load_tokenizer(tokenizer_path)
        self.vocab_size = int(self._tokenizer.get_vocab_size())
        self._tokenizer.enable_truncation(max_length=config.max_length)
        pad_id = self._tokenizer.token_to_id("[PAD]")
        if pad_id is None:
            pad_id = self._tokenizer.token_to_id("<pad>") or 0
        self._tokenizer.enable_padding(pad_id=pad_id)
        self.config = config

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a list of strings")
        if not texts:
            raise InputError("texts is empty")
        encodings = self._tokenizer.encode_batch(list(texts))
        feeds = {self.config.input_ids: np.array([e.ids for e in encodings], dtype=np.int64)}
        if self.config.attention_mask:
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds[self.config.attention_mask] = mask
        if self.config.token_type_ids:
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
            feeds[self.config.token_type_ids] = types
        return feeds


def encode_images(config: ImagePreprocessing, images: np.ndarray) -> dict[str, np.ndarray]:
    """``images`` as (N, H, W) or (N, C, H, W) raw pixel values -> normalized float32 feeds."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3 and config.channels == 1:
        array = array[:, None]
    expected = (config.channels, config.height, config.width)
    if array.ndim != 4 or array.shape[1:] != expected:
        raise InputError(
            f"images must have shape (N, {config.channels}, {config.height}, {config.width}) "
            f"or (N, {config.height}, {config.width}) for one channel; got {array.shape}"
        )
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return {config.input: (array * np.float32(config.scale) - mean) / std}


def pool(
    config: EmbeddingPostprocessing, hidden: np.ndarray, attention_mask: np.ndarray | None
) -> np.ndarray:
    """(N, T, D) token states -> (N, D) embeddings, as sentence-transformers pools them."""
    if hidden.ndim == 2:  # already pooled by the graph
        pooled = hidden
    elif config.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = (
            np.ones(hidden.shape[:2], dtype=np.float32)
            if attention_mask is None
            else attention_mask.astype(np.float32)
        )[..., None]
        if config.pooling == "mean":
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        elif config.pooling == "max":
            pooled = np.where(mask > 0, hidden, -1e9).max(axis=1)
        else:
            raise PackageError(f"unknown pooling {config.pooling!r}; known: mean, cls, max")
    if config.normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.clip(norms, 1e-12, None)
    return pooled.astype(np.float32)


def softmax(config: ClassificationPostprocessing, logits: np.ndarray) -> np.ndarray:
    """(N, classes) logits -> probabilities."""
    del config
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
