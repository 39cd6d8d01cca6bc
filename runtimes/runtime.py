"""``Runtime``: a loaded package that runs tensors, embeds text and classifies inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from edgec.runtimes.backends import ONNXRUNTIME_ERRORS, Backend, Feeds, create_backend
from edgec.runtimes.executor import Executor
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    Manifest,
    TensorInfo,
    TextPreprocessing,
)
from edgec.runtimes.network import Network
from edgec.runtimes.package import Package, read_package
from edgec.runtimes.processing import TextEncoder, encode_images, pool, softmax

from edgec.errors import InputError, PackageError


@dataclass(frozen=True)
class Classification:
    """Per input: the most probable label, and the probabilities of every class (N, classes)."""

    labels: list[str]
    probabilities: np.ndarray


def check_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, Any]) -> Feeds:
    """Check names, dtypes and shapes against the package's inputs; symbolic dims must agree."""
    expected = {info.name: info for info in inputs}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the package takes {sorted(expected)}")
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise InputError(f"missing input(s) {missing}; the package takes {sorted(expected)}")
    bound: dict[str, tuple[int, str]] = {}
    checked: Feeds = {}
    for name, info in expected.items():
        value = feeds[name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input {name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(info.dtype):
            raise InputError(f"input {name!r} must be {info.dtype}, got {value.dtype}")
        if value.ndim != len(info.shape):
            raise InputError(
                f"input {name!r} must have {len(info.shape)} dimensions {list(info.shape)}, "
                f"got shape {list(value.shape)}"
            )
        for axis, (dim, size) in enumerate(zip(info.shape, value.shape, strict=True)):
            if isinstance(dim, int):
                if dim != size:
                    raise InputError(
                        f"input {name!r} axis {axis} must be {dim}, got {size} "
                        f"(shape {list(value.shape)})"
                    )
                continue
            if size == 0:
                raise InputError(f"input {name!r} axis {axis} ({dim}) is empty")
            if dim in bound and bound[dim][0] != size:
                other_size, other = bound[dim]
                raise InputError(
                    f"dimension {dim!r} is {other_size} in {other!r} but {size} in {name!r}"
                )
            bound.setdefault(dim, (size, name))
        checked[name] = value
    return checked


class Runtime:
    """A verified package with a backend that runs its stages.

    ``run`` takes and returns tensors; ``embed`` and ``classify`` add the pre- and
    post-processing the package carries.
    """

    def __init__(
        self,
        package: Package,
        *,
        backend: str = "local",
        emulate_links: bool = False,
        **backend_options: Any,
    ):
        self.package = package
        network = None
        if emulate_links:
            if package.manifest.network is None:
                raise PackageError(
                    "this package records no network to emulate: partition it over device "
                    "profiles (with links) first"
                )
            network = Network.from_json(package.manifest.network)
        try:
            self._backend: Backend = create_backend(backend, package, **backend_options)
        except ONNXRUNTIME_ERRORS as exc:
            raise PackageError(_unloadable(package, exc)) from exc
        self._executor = Executor(package.manifest, self._backend, network)

    @cached_property
    def text_encoder(self) -> TextEncoder | None:
        """The package's tokenizer, loaded on first use: a device fed token tensors never pays
        its memory (about 15 MB resident for minilm's). None for packages without one."""
        pre = self.package.manifest.preprocessing
        if not isinstance(pre, TextPreprocessing):
            return None
        # checked again here: the tokenizer may be read long after the package was verified
        limit = self.package.inflated_limit(pre.tokenizer)[0]
        return TextEncoder(pre, self.package.recheck(pre.tokenizer), limit)

    @property
    def manifest(self) -> Manifest:
        return self.package.manifest

    @property
    def link_traffic(self) -> dict[tuple[str, str], int]:
        """Bytes that crossed each emulated link so far (``emulate_links``), by direction."""
        emulator = self._executor.emulator
        return dict(emulator.sent) if emulator is not None else {}

    @property
    def name(self) -> str:
        return self.manifest.name

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Model input tensors in, model output tensors out (raw, before post-processing)."""
        return self._executor.run(check_feeds(self.manifest.inputs, feeds))

    def run_many(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Many requests at once, results in order; a pipelined package overlaps its stages."""
        checked = [check_feeds(self.manifest.inputs, feeds) for feeds in requests]
        return self._executor.run_many(checked)

    def encode(self, inputs: Sequence[str] | np.ndarray) -> Feeds:
        """Apply the package's pre-processing: texts -> token tensors, images -> pixel tensor."""
        pre = self.manifest.preprocessing
        if self.text_encoder is not None:
            if isinstance(inputs, np.ndarray):
                raise InputError("this package takes text: give a list of strings")
            return self.text_encoder(inputs)
        if isinstance(pre, ImagePreprocessing):
            return encode_images(pre, np.asarray(inputs))
        raise InputError(f"package {self.name!r} carries no pre-processing; use run() with tensors")

    def embed(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """Inputs -> (N, dim) float32 embeddings, pooled and normalized as the package says."""
        post = self.manifest.postprocessing
        if not isinstance(post, EmbeddingPostprocessing):
            raise InputError(f"package {self.name!r} is not an embedding model")
        feeds = self.encode(texts)
        outputs = self.run(feeds)
        mask = (
            feeds.get(self.text_encoder.config.attention_mask or "") if self.text_encoder else None
        )
        return pool(post, outputs[post.output], mask)

    def classify(self, inputs: Sequence[str] | np.ndarray) -> Classification:
        """Inputs (texts or raw images) -> labels and class probabilities."""
        post = self.manifest.postprocessing
        if not isinstance(post, ClassificationPostprocessing):
            raise InputError(f"package {self.name!r} is not a classifier")
        probabilities = softmax(post, self.run(self.encode(inputs))[post.output])
        labels = [post.labels[i] for i in probabilities.argmax(axis=-1)]
        return Classification(labels=labels, probabilities=probabilities)

    def close(self) -> None:
        self._executor.close()
        self._backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unloadable(package: Package, exc: Exception) -> str:
    """The message for a stage file onnxruntime refused (its hash matched: the file is what the
    manifest lists, but no model). onnxruntime names the file's path; that names the stage."""
    message = str(exc).strip()
    stages = package.manifest.stages
    named = [s for s in stages if str(package.path(s.file)) in message] or list(stages)
    which = ", ".join(f"stage {s.name!r} ({s.file!r})" for s in named)
    return f"onnxruntime cannot load {which} of package {str(package.root)!r}: {message}"


def load_package(
    path: str | Path,
    *,
    backend: str = "local",
    public_key: str | Path | None = None,
    emulate_links: bool = False,
    **backend_options: Any,
) -> Runtime:
    """Verify the package at ``path`` (format version, paths, sha256) and open it for running.

    With ``public_key`` (an Ed25519 PEM), refuse a package whose manifest is unsigned or whose
    signature does not verify (``SignatureError``). With ``emulate_links``, every crossing
    between devices waits what the planned network's links would take (``edgec.runtimes.
    network``): a split's end-to-end time measured on one machine.
    """
    return Runtime(
        read_package(path, public_key=public_key),
        backend=backend,
        emulate_links=emulate_links,
        **backend_options,
    )
