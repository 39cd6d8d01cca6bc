"""Answering a batch of texts with little padding: group by token length, then post-process.

Joined requests pad to their longest text; with sentences of mixed lengths most of a batch can be
padding. Sorting by length and cutting the batch where padding would exceed ``max_waste`` keeps
the compute near the real token count while requests still share model calls. Trimming
right-padded columns gives exactly the tensors the tokenizer makes for the group alone. Large
groups run in chunks of at most ``run_tokens`` tokens, and between chunks the caller may stop
the work (``abandoned``) once nobody waits for it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    TextPreprocessing,
)
from edgec.runtimes.processing import pool, softmax
from edgec.runtimes.runtime import Runtime
from edgec.runtimes.server.batching import Abandoned

from edgec.errors import InputError


def length_groups(lengths: np.ndarray, max_waste: float = 0.25) -> list[np.ndarray]:
    """Row indices in groups of similar length; a group's padded size stays within
    ``1 + max_waste`` times its real token count."""
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = [[]]
    real = 0
    for index in order:
        length = int(lengths[index])
        group = groups[-1]
        if group and (len(group) + 1) * length > (1 + max_waste) * (real + length):
            groups.append([])
            group, real = groups[-1], 0
        group.append(int(index))
        real += length
    return [np.array(g, dtype=np.int64) for g in groups if g]


def chunks(rows: np.ndarray, lengths: np.ndarray, run_tokens: int) -> list[np.ndarray]:
    """``rows`` (ascending ``lengths``) in consecutive chunks whose rows x longest length stays
    within ``run_tokens``; at least one row each."""
    parts: list[np.ndarray] = []
    start = 0
    for stop in range(1, len(rows) + 1):
        if stop - start > 1 and (stop - start) * int(lengths[rows[stop - 1]]) > run_tokens:
            parts.append(rows[start : stop - 1])
            start = stop - 1
    parts.append(rows[start:])
    return [p for p in parts if len(p)]


def answer_texts(
    runtime: Runtime,
    texts: list[str],
    max_waste: float = 0.25,
    *,
    run_tokens: int | None = None,
    abandoned: Callable[[], bool] | None = None,
) -> dict[str, np.ndarray]:
    """Post-processed outputs for ``texts``: ``embedding`` (N, D), or ``probabilities`` (N, C)
    and ``label`` (N,) as UTF-8 bytes.

    With ``run_tokens``, each model call runs at most that many tokens (rows x length, one row at
    least); ``abandoned`` is asked before each call and, when true, raises ``Abandoned``.
    """
    pre = runtime.manifest.preprocessing
    post = runtime.manifest.postprocessing
    if not isinstance(pre, TextPreprocessing):
        raise InputError(f"model {runtime.name!r} takes no text")
    feeds = runtime.encode(texts)
    mask = feeds.get(pre.attention_mask) if pre.attention_mask else None
    trim = mask is not None and _right_padded(mask)
    width = next(iter(feeds.values())).shape[1]
    lengths = mask.sum(axis=1) if mask is not None and trim else np.full(len(texts), width)
    groups = length_groups(lengths, max_waste) if trim else [np.arange(len(texts))]
    if run_tokens is not None:
        groups = [part for rows in groups for part in chunks(rows, lengths, run_tokens)]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for rows in groups:
        if abandoned is not None and abandoned():
            raise Abandoned("every request of the batch was given up")
        columns = int(lengths[rows].max()) if trim and len(groups) > 1 else None
        group = {name: value[rows, :columns] for name, value in feeds.items()}
        parts.append((rows, _post_process(runtime, group, pre)))
    values = np.empty((len(texts), *parts[0][1].shape[1:]), dtype=np.float32)
    for rows, value in parts:
        values[rows] = value
    if isinstance(post, EmbeddingPostprocessing):
        return {"embedding": values}
    if isinstance(post, ClassificationPostprocessing):
        labels = np.empty(len(texts), dtype=object)
        labels[:] = [post.labels[i].encode("utf-8") for i in values.argmax(axis=-1)]
        return {"probabilities": values, "label": labels}
    raise InputError(f"model {runtime.name!r} has no post-processing to answer text with")


def _right_padded(mask: np.ndarray) -> bool:
    lengths = mask.sum(axis=1)
    return bool((mask == (np.arange(mask.shape[1]) < lengths[:, None])).all())


def _post_process(
    runtime: Runtime, feeds: dict[str, np.ndarray], pre: TextPreprocessing
) -> np.ndarray:
    post = runtime.manifest.postprocessing
    outputs = runtime.run(feeds)
    if isinstance(post, EmbeddingPostprocessing):
        mask = feeds.get(pre.attention_mask) if pre.attention_mask else None
        return pool(post, outputs[post.output], mask)
    if isinstance(post, ClassificationPostprocessing):
        return softmax(post, outputs[post.output]).astype(np.float32)
    raise InputError(f"model {runtime.name!r} has no post-processing to answer text with")
