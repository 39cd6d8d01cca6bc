"""Pre- and post-processing a package carries: tokenization, image scaling, pooling, softmax.

numpy and tokenizers only, so a device runs them without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from edgec.runtimes.manifest import (
    DEFAULT_INFLATED_LIMIT,
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    TextPreprocessing,
)

from edgec.errors import InputError, PackageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(path: Path, limit: int = DEFAULT_INFLATED_LIMIT) -> Tokenizer:
    """A Hugging Face ``tokenizer.json``, plain or gzipped (``tokenizer.json.gz``, what export
    writes: the vocabulary compresses to a third of its size), inflated in chunks and refused
    past ``limit`` bytes (the size the manifest records)."""
    from edgec.runtimes.package import read_inflated
    from tokenizers import Tokenizer

    if path.suffix == ".gz":
        text = read_inflated(path, limit, path.name)  # PackageError past the limit
    try:
        if path.suffix == ".gz":
            return Tokenizer.from_str(text.decode("utf-8"))
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise PackageError(f"cannot load tokenizer {path.name}: {exc}") from exc


# The first prefix of a long text that is tokenized to find its cut: 8 characters a token of the
# maximum (English WordPiece averages about 4.5 with the spaces), grown 4x while undecided.
PROBE_CHARS_PER_TOKEN = 8
PROBE_GROWTH = 4


class TextEncoder:
    """Turns sentences into the model's token tensors, padded to the longest in the batch.

    A text longer than the tokenizer needs is cut before it is tokenized (``prefix_to_tokenize``),
    so a megabyte of text costs what its first few thousand characters cost; the token ids are
    those of the whole text truncated at ``max_length`` (tested against the untruncated text).
    """

    def __init__(
        self, config: TextPreprocessing, tokenizer_path: Path, limit: int = DEFAULT_INFLATED_LIMIT
    ):
        self._tokenizer = load_tokenizer(tokenizer_path, limit)
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
        prefixes = [self.prefix_to_tokenize(text, index) for index, text in enumerate(texts)]
        encodings = self._tokenizer.encode_batch(prefixes)
        feeds = {self.config.input_ids: np.array([e.ids for e in encodings], dtype=np.int64)}
        if self.config.attention_mask:
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds[self.config.attention_mask] = mask
        if self.config.token_type_ids:
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
            feeds[self.config.token_type_ids] = types
        return feeds

    def prefix_to_tokenize(self, text: str, index: int = 0) -> str:
        """The shortest probed prefix of ``text`` that decides its first ``max_length`` tokens.

        The tokenizer cuts a text into words (its pre-tokenizer's splits) and tokenizes each word
        on its own, so cutting the text changes at most its last words. A prefix decides the
        truncated tokens when it overflows ``max_length`` and the last kept token's word lies at
        least two words before the prefix's last word. Probes start at ``PROBE_CHARS_PER_TOKEN``
        characters a token and grow; a text no probe decides (one endless word, a tokenizer
        without a pre-tokenizer) is tokenized whole, which the server's character cap bounds.
        """
        size = self.config.max_length * PROBE_CHARS_PER_TOKEN
        while size < len(text):
            prefix = text[:size]
            if self._decides(_valid_text(prefix, index)):
                return prefix
            size *= PROBE_GROWTH
        return _valid_text(text, index)

    def _decides(self, prefix: str) -> bool:
        encoding = self._tokenizer.encode(prefix)
        if not encoding.overflowing:
            return False  # the prefix does not even fill max_length
        kept = [w for w in encoding.word_ids if w is not None]
        last = [w for w in encoding.overflowing[-1].word_ids if w is not None]
        return bool(kept) and bool(last) and max(kept) <= max(last) - 2


def _valid_text(text: str, index: int) -> str:
    """``text`` itself; InputError when it cannot be UTF-8 (a lone surrogate, e.g. from a JSON
    ``\\ud800`` escape), which the tokenizer would refuse with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"text {index} holds a lone surrogate {text[exc.start]!r} at character {exc.start}: "
            "it is not valid Unicode"
        ) from exc
    return text


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
