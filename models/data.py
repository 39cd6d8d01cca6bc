"""Bundled real data: English sentences for calibration and held-out evaluation, digits images.

Calibration and evaluation never overlap: the held-out part is the last ``heldout`` sentences
of a fixed shuffle. A second held-out set comes from another domain and source: sentences of
Wikipedia articles (CC BY-SA; see ``zoo/sentences/LICENSE-wikipedia.md``), none of which is in
the first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from edgec.models.sources import ZOO

SENTENCES = ZOO / "sentences" / "sentences.txt"
HELDOUT_SENTENCES = 200
WIKIPEDIA_SENTENCES = ZOO / "sentences" / "wikipedia.txt"

Split = Literal["calibration", "heldout", "all"]


def bundled_sentences(split: Split = "all") -> list[str]:
    """The bundled sentences: ``calibration`` and ``heldout`` parts are disjoint."""
    lines = [line for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split == "calibration":
        return lines[:-HELDOUT_SENTENCES]
    if split == "heldout":
        return lines[-HELDOUT_SENTENCES:]
    return lines


def wikipedia_sentences() -> list[str]:
    """The bundled off-domain held-out set: 200 Wikipedia sentences, one per article."""
    return read_sentences(WIKIPEDIA_SENTENCES)


def digits(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as raw (N, 8, 8) pixels 0..16 and labels, split as in training."""
    from sklearn.datasets import load_digits

    data = load_digits()
    indices = json.loads((ZOO / "tiny_vit_digits" / "split.json").read_text())[f"{split}_indices"]
    images = data.images[indices].astype(np.float32)
    return images, data.target[indices].astype(np.int64)


def read_sentences(path: Path) -> list[str]:
    """One sentence a line; blank lines skipped."""
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
