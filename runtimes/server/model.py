"""The served model: checks a request against the package, and runs batches of requests.

Two request kinds: ``text`` (a BYTES tensor named ``text``, for packages with a tokenizer;
answered post-processed) and ``tensors`` (the package's own inputs; answered with its raw
outputs). Batches join requests of one kind along the batch axis and split the results back;
a batch that fails is retried request by request, so one bad request never fails the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    TensorInfo,
    TextPreprocessing,
)
from edgec.runtimes.runtime import Runtime, check_feeds
from edgec.runtimes.server.protocol import DATATYPE_OF, ProtocolError
from edgec.runtimes.server.text import answer_texts

from edgec.errors import DeviceError, InputError

TEXT_INPUT = "text"
Result = dict[str, np.ndarray] | Exception
DEFAULT_MAX_SEQUENCE = 512


@dataclass(frozen=True)
class Work:
    """One checked request: its kind, its batching key, its rows and its tensors or texts."""

    kind: str  # "text" | "tensors"
    key: tuple[Any, ...]
    rows: int
    texts: tuple[str, ...] = ()
    feeds: dict[str, np.ndarray] | None = None


class ModelFailure(Exception):
    """The model could not run one isolated request; its message says why (answered 422)."""


def tensor_metadata(info: TensorInfo) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else -1 for d in info.shape]
    return {"name": info.name, "datatype": DATATYPE_OF[info.dtype], "shape": shape}


class ServedModel:
    """A ``Runtime`` seen through the Open Inference Protocol."""

    def __init__(self, runtime: Runtime, *, max_request_rows: int = 1024):
        self.runtime = runtime
        self.name = runtime.name
        self.max_request_rows = max_request_rows
        manifest = runtime.manifest
        self.text = isinstance(manifest.preprocessing, TextPreprocessing)
        self.post = manifest.postprocessing
        self.max_sequence = (
            manifest.preprocessing.max_length
            if isinstance(manifest.preprocessing, TextPreprocessing)
            else DEFAULT_MAX_SEQUENCE
        )
        self.batch_axis_name = _shared_batch_axis(manifest.inputs, manifest.outputs)
        self.vocab_size = self._vocab_size()

    def _vocab_size(self) -> int | None:
        # the runtime's own tokenizer: loading it here also makes the server ready for text
        encoder = self.runtime.text_encoder
        return None if encoder is None else encoder.vocab_size

    # metadata -----------------------------------------------------------------------------

    def text_outputs(self) -> list[dict[str, Any]]:
        if isinstance(self.post, EmbeddingPostprocessing):
            return [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
        if isinstance(self.post, ClassificationPostprocessing):
            return [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.post.labels)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ]
        return []

    def metadata(self) -> dict[str, Any]:
        manifest = self.runtime.manifest
        data: dict[str, Any] = {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t) for t in manifest.inputs],
            "outputs": [tensor_metadata(t) for t in manifest.outputs],
            "parameters": {"stages": [s.name for s in manifest.stages]},
        }
        if self.text:
            data["parameters"]["text_input"] = {
                "name": TEXT_INPUT,
                "datatype": "BYTES",
                "shape": [-1],
            }
            data["parameters"]["text_outputs"] = self.text_outputs()
        return data

    # checking -----------------------------------------------------------------------------

    def check(self, inputs: dict[str, np.ndarray]) -> Work:
        """A request's tensors -> ``Work``, or ``ProtocolError`` naming what is wrong."""
        if TEXT_INPUT in inputs and self.text:
            return self._check_text(inputs)
        return self._check_tensors(inputs)

    def _check_text(self, inputs: dict[str, np.ndarray]) -> Work:
        if len(inputs) != 1:
            others = sorted(set(inputs) - {TEXT_INPUT})
            raise ProtocolError(f"input 'text' stands alone; drop {others}")
        if not self.text_outputs():
            raise ProtocolError(f"model {self.name!r} has no post-processing to answer text with")
        value = inputs[TEXT_INPUT]
        if value.dtype != object:
            raise ProtocolError(
                f"input 'text' must be BYTES, got {DATATYPE_OF.get(value.dtype.name, value.dtype.name)}"
            )
        if value.ndim != 1 or value.shape[0] == 0:
            raise ProtocolError(
                f"input 'text' must have shape [N] with N >= 1, got {list(value.shape)}"
            )
        self._check_rows(value.shape[0])
        try:
            texts = tuple(v.decode("utf-8") for v in value)
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"input 'text' is not UTF-8: {exc}") from exc
        return Work(kind="text", key=("text",), rows=len(texts), texts=texts)

    def _check_tensors(self, inputs: dict[str, np.ndarray]) -> Work:
        for name, value in inputs.items():
            if value.dtype == object:
                hint = " (text goes in an input named 'text')" if self.text else ""
                raise ProtocolError(f"input {name!r} is BYTES; the model takes numbers{hint}")
        try:
            feeds = check_feeds(self.runtime.manifest.inputs, inputs)
        except InputError as exc:
            raise ProtocolError(str(exc)) from exc
        for info in self.runtime.manifest.inputs:
            value = feeds[info.name]
            for axis, dim in enumerate(info.shape):
                if axis > 0 and isinstance(dim, str) and value.shape[axis] > self.max_sequence:
                    raise ProtocolError(
                        f"input {info.name!r} axis {axis} ({dim}) is {value.shape[axis]}, "
                        f"above the limit {self.max_sequence}"
                    )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ProtocolError(f"input {info.name!r} holds NaN or infinity")
            if self._out_of_vocabulary(info.name, value):
                raise ProtocolError(
                    f"input {info.name!r} holds token ids outside [0, {self.vocab_size})"
                )
        rows = feeds[self.runtime.manifest.inputs[0].name].shape[0] if feeds else 0
        self._check_rows(rows)
        if self.batch_axis_name is None:
            key: tuple[Any, ...] = ("tensors", id(feeds))  # unbatchable: a key of its own
        else:
            key = ("tensors", tuple((n, v.shape[1:]) for n, v in sorted(feeds.items())))
        return Work(kind="tensors", key=key, rows=rows, feeds=feeds)

    def _out_of_vocabulary(self, name: str, value: np.ndarray) -> bool:
        if self.vocab_size is None or name != self._input_ids_name() or not value.size:
            return False
        return bool(value.min() < 0 or value.max() >= self.vocab_size)

    def _input_ids_name(self) -> str | None:
        pre = self.runtime.manifest.preprocessing
        return pre.input_ids if isinstance(pre, TextPreprocessing) else None

    def _check_rows(self, rows: int) -> None:
        if rows > self.max_request_rows:
            raise ProtocolError(
                f"the request holds {rows} rows, above the limit of {self.max_request_rows}"
            )

    # running ------------------------------------------------------------------------------

    def run_batch(self, batch: Sequence[Work]) -> list[Result]:
        """Run works that share one key; on failure, run each alone so errors stay theirs."""
        if len(batch) == 1:
            return [self._run_alone(batch[0])]
        try:
            return self._run_joined(batch)
        except DeviceError:
            raise
        except Exception:  # one request's fault must not become the others'
            return [self._run_alone(work) for work in batch]

    def _run_alone(self, work: Work) -> Result:
        try:
            return self._run_joined([work])[0]
        except DeviceError as exc:
            return exc
        except Exception as exc:  # the model refused this request only
            return ModelFailure(f"model {self.name!r} could not run this request: {exc}")

    def _run_joined(self, batch: Sequence[Work]) -> list[Result]:
        if batch[0].kind == "text":
            texts = [t for work in batch for t in work.texts]
            outputs = answer_texts(self.runtime, texts)
        else:
            names = list(batch[0].feeds or {})
            joined = {
                n: np.concatenate([w.feeds[n] for w in batch if w.feeds is not None], axis=0)
                for n in names
            }
            outputs = self.runtime.run(joined)
        results: list[Result] = []
        start = 0
        for work in batch:
            stop = start + work.rows
            results.append({name: value[start:stop] for name, value in outputs.items()})
            start = stop
        return results

    def output_names(self, work: Work) -> list[str]:
        if work.kind == "text":
            return [o["name"] for o in self.text_outputs()]
        return [o.name for o in self.runtime.manifest.outputs]


def _shared_batch_axis(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> str | None:
    """The symbolic name of axis 0 when every input and output shares it; else None."""
    firsts = {t.shape[0] if t.shape else None for t in (*inputs, *outputs)}
    if len(firsts) == 1:
        (first,) = firsts
        if isinstance(first, str):
            return first
    return None
