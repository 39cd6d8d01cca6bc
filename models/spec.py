"""``ModelSpec``: what a model takes and gives, and how to feed it.

The interface types (``TensorInfo``, pre/post-processing) are the package manifest's own, so a
spec turns into a manifest without translation.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from edgec.runtimes.manifest import Postprocessing, Preprocessing, TensorInfo

Task = Literal["embedding", "classification", "features"]


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model's interface.

    ``inputs``/``outputs`` carry symbolic dims ("batch", "sequence") for the dynamic axes.
    ``assets`` maps a path inside a package to the file it is copied from (e.g. the tokenizer);
    a ``.gz`` path is written gzipped (``write_asset``).
    ``family`` is the architecture adapter's key (``edgec.models.adapters``).
    """

    name: str
    family: str
    task: Task
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    preprocessing: Preprocessing | None = None
    postprocessing: Postprocessing | None = None
    assets: dict[str, Path] = field(default_factory=dict)
    source: str = ""
    vocab_size: int | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per tensor, axis index -> symbolic name, for every non-fixed axis."""
        return {
            t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
            for t in (*self.inputs, *self.outputs)
        }

    def example_inputs(
        self, batch: int = 2, sequence: int = 16, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random but valid inputs: token ids in the vocabulary with a padded tail, or pixels."""
        rng = np.random.default_rng(seed)
        sizes = {"batch": batch, "sequence": sequence}
        feeds: dict[str, np.ndarray] = {}
        for info in self.inputs:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in info.shape)
            if info.name == "attention_mask":
                mask = np.ones(shape, dtype=np.int64)
                if shape[1] > 2:  # pad the tail of every other row, as a real batch would be
                    mask[1::2, shape[1] // 2 :] = 0
                feeds[info.name] = mask
            elif info.name == "token_type_ids":
                feeds[info.name] = np.zeros(shape, dtype=np.int64)
            elif info.dtype == "int64":
                high = self.vocab_size or 1000
                feeds[info.name] = rng.integers(1, high, size=shape, dtype=np.int64)
            else:
                feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
        return feeds


def write_asset(source: Path, target: Path) -> None:
    """Copy an asset into a package or checkpoint; gzip it when ``target`` ends in ``.gz`` and
    ``source`` does not (deterministic: no timestamp, so the file's hash depends on its bytes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".gz" and source.suffix != ".gz":
        target.write_bytes(gzip.compress(source.read_bytes(), compresslevel=9, mtime=0))
    else:
        shutil.copyfile(source, target)
