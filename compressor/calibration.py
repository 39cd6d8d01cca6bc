"""Calibration and evaluation data: text file, JSONL or ``.npz`` tensors, or a bundled sample.

Data is turned into model feeds (numpy, by input name) in batches. Unless evaluation data is
given, a held-out part of the calibration data is split off for the fidelity figures, so no step
is measured on the data it calibrated on. A second held-out set from another domain (``off_domain``:
the user's, or the bundled Wikipedia sentences with the bundled text sample) shows whether
fidelity holds off the calibration domain.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgec.models.spec import ModelSpec
from edgec.runtimes.manifest import ImagePreprocessing, TextPreprocessing
from edgec.runtimes.processing import TextEncoder, encode_images

from edgec.errors import InputError

Feeds = dict[str, np.ndarray]
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Inputs as one padded feed dict per batch, labels when known, and where they came from."""

    batches: list[Feeds]
    labels: np.ndarray | None
    origin: str

    @property
    def size(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches)


@dataclass(frozen=True)
class CalibrationData:
    """What the steps calibrate on, the held-out set from the same domain (``evaluation``), and
    optionally a held-out set from another domain and source (``off_domain``)."""

    calibration: Dataset
    evaluation: Dataset
    notes: tuple[str, ...] = ()
    off_domain: Dataset | None = None


def _batches_of_text(spec: ModelSpec, texts: list[str], batch: int) -> list[Feeds]:
    pre = spec.preprocessing
    if not isinstance(pre, TextPreprocessing):
        raise InputError(f"{spec.name} does not take text; give .npz tensors by input name")
    encoder = TextEncoder(pre, Path(spec.assets[pre.tokenizer]))
    # Sort by length so batches carry little padding; order inside the dataset does not matter.
    ordered = sorted(texts, key=len)
    feeds = [encoder(ordered[i : i + batch]) for i in range(0, len(ordered), batch)]
    for f in feeds:
        for name in spec.input_names:
            if name not in f:  # e.g. token_type_ids the tokenizer does not produce
                f[name] = np.zeros_like(f["input_ids"])
    return feeds


def _batches_of_tensors(spec: ModelSpec, arrays: dict[str, np.ndarray], batch: int) -> list[Feeds]:
    missing = sorted(set(spec.input_names) - set(arrays))
    if missing:
        raise InputError(f".npz lacks input(s) {missing}; the model takes {spec.input_names}")
    count = len(arrays[spec.input_names[0]])
    return [{n: arrays[n][i : i + batch] for n in spec.input_names} for i in range(0, count, batch)]


def _read(
    path: Path, what: str = "calibration data"
) -> tuple[list[str] | None, dict[str, np.ndarray] | None, np.ndarray | None]:
    """(texts, tensors, labels) from a .txt, .jsonl or .npz file."""
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        labels = arrays.pop("labels", None)
        return None, arrays, labels
    lines = [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if path.suffix == ".jsonl":
        texts, labels = [], []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(
                    f'{path}:{number}: each line must be {{"text": ..., "label"?: ...}}'
                )
            texts.append(row["text"])
            if "label" in row:
                labels.append(int(row["label"]))
        return texts, None, np.array(labels) if len(labels) == len(texts) and labels else None
    return lines, None, None


def _dataset(
    spec: ModelSpec,
    texts: list[str] | None,
    arrays: dict[str, np.ndarray] | None,
    labels: np.ndarray | None,
    origin: str,
    batch: int,
) -> Dataset:
    if texts is not None:
        if not texts:
            raise InputError(f"{origin} holds no sentences")
        if labels is not None:  # keep labels in the sorted order of the batches
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            labels = labels[order]
        return Dataset(_batches_of_text(spec, texts, batch), labels, origin)
    pre = spec.preprocessing
    if (
        isinstance(pre, ImagePreprocessing)
        and arrays
        and pre.input not in arrays
        and "images" in arrays
    ):
        arrays = encode_images(pre, arrays["images"])
    return Dataset(_batches_of_tensors(spec, arrays or {}, batch), labels, origin)


def _split(
    texts: list[str] | None, arrays: dict[str, np.ndarray] | None, labels: np.ndarray | None
) -> tuple[tuple, tuple]:
    count = len(texts) if texts is not None else len(next(iter((arrays or {}).values())))
    cut = count - max(1, int(count * HELDOUT_FRACTION))
    if cut < 1:
        raise InputError("calibration data needs at least 2 examples to hold one out")
    lab = (None, None) if labels is None else (labels[:cut], labels[cut:])
    if texts is not None:
        return (texts[:cut], None, lab[0]), (texts[cut:], None, lab[1])
    a = arrays or {}
    return (
        ({k: v[:cut] for k, v in a.items()}, lab[0]),
        ({k: v[cut:] for k, v in a.items()}, lab[1]),
    )


def bundled(spec: ModelSpec, batch: int) -> CalibrationData:
    """A built-in model's own sample: bundled sentences (and Wikipedia sentences off-domain), or
    the digits train/test images (no off-domain set)."""
    from edgec.models.data import bundled_sentences, digits, wikipedia_sentences

    if isinstance(spec.preprocessing, TextPreprocessing):
        cal = bundled_sentences("calibration")
        held = bundled_sentences("heldout")
        note = f"using the bundled sample: {len(cal)} sentences, {len(held)} held out"
        return CalibrationData(
            _dataset(spec, cal, None, None, "bundled sentences", batch),
            _dataset(spec, held, None, None, "bundled held-out sentences", batch),
            (note,),
            _dataset(spec, wikipedia_sentences(), None, None, "bundled Wikipedia sentences", batch),
        )
    if isinstance(spec.preprocessing, ImagePreprocessing) and spec.name == "tiny-vit-digits":
        train_x, train_y = digits("train")
        test_x, test_y = digits("test")
        note = f"using the bundled sample: digits, {len(train_x)} train, {len(test_x)} test"
        return CalibrationData(
            _dataset(
                spec,
                None,
                encode_images(spec.preprocessing, train_x),
                train_y,
                "digits train",
                batch,
            ),
            _dataset(
                spec, None, encode_images(spec.preprocessing, test_x), test_y, "digits test", batch
            ),
            (note,),
        )
    raise InputError(f"{spec.name} has no bundled sample; give --calib DATA")


def load_data(
    spec: ModelSpec,
    calib: str | os.PathLike[str] | None = None,
    eval: str | os.PathLike[str] | None = None,
    batch: int = 16,
    off_domain: str | os.PathLike[str] | None = None,
) -> CalibrationData:
    """Calibration and evaluation datasets for ``spec``: from files, or the bundled sample.

    ``off_domain``: a file of held-out data from another domain (same formats); without it, the
    bundled sample's off-domain set when ``calib`` is not given, else none.
    """
    data = _load_in_domain(spec, calib, eval, batch)
    other = data.off_domain
    if off_domain is not None:
        texts, arrays, labels = _read(Path(off_domain), "off-domain data")
        other = _dataset(spec, texts, arrays, labels, str(off_domain), batch)
    if other is None:
        return data
    notes = (*data.notes, f"off-domain held-out set: {other.size} examples of {other.origin}")
    return CalibrationData(data.calibration, data.evaluation, notes, other)


def _load_in_domain(
    spec: ModelSpec,
    calib: str | os.PathLike[str] | None,
    eval: str | os.PathLike[str] | None,
    batch: int,
) -> CalibrationData:
    if calib is None:
        data = bundled(spec, batch)
        if eval is None:
            return data
        texts, arrays, labels = _read(Path(eval), "evaluation data")
        evaluation = _dataset(spec, texts, arrays, labels, str(eval), batch)
        return CalibrationData(data.calibration, evaluation, data.notes, data.off_domain)
    texts, arrays, labels = _read(Path(calib))
    if eval is not None:
        e_texts, e_arrays, e_labels = _read(Path(eval), "evaluation data")
        return CalibrationData(
            _dataset(spec, texts, arrays, labels, str(calib), batch),
            _dataset(spec, e_texts, e_arrays, e_labels, str(eval), batch),
        )
    first, second = _split(texts, arrays, labels)
    if texts is not None:
        cal = _dataset(spec, first[0], None, first[2], str(calib), batch)
        held = _dataset(spec, second[0], None, second[2], f"{calib} (held-out part)", batch)
    else:
        cal = _dataset(spec, None, first[0], first[1], str(calib), batch)
        held = _dataset(spec, None, second[0], second[1], f"{calib} (held-out part)", batch)
    note = f"held out the last {held.size} examples of {calib} for the fidelity figures"
    return CalibrationData(cal, held, (note,))
