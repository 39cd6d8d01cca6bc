"""The served model: checks a request against the package, and runs batches of requests.

Two request kinds: ``text`` (a BYTES tensor named ``text``, for packages with a tokenizer;
answered post-processed) and ``tensors`` (the package's own inputs; answered with its raw
outputs). Batches join requests of one kind along the batch axis and split the results back;
a batch that fails is retried request by request, so one bad request never fails the others.
A batch runs the model in chunks of about ``run_tokens`` tokens and stops between chunks once
every request in it has been given up (timed out or disconnected), so abandoned work ends soon.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    TensorInfo,
    TextPreprocessing,
)
from edgec.runtimes.runtime import Runtime, check_feeds
from edgec.runtimes.server.batching import Abandoned
from edgec.runtimes.server.protocol import DATATYPE_OF, ProtocolError
from edgec.runtimes.server.text import answer_texts

from edgec.errors import DeviceError, InputError

TEXT_INPUT = "text"
Result = dict[str, np.ndarray] | Exception
DEFAULT_MAX_SEQUENCE = 512
# Tokens (rows x sequence length) one model call runs. It bounds what onnxruntime's arena grows
# to and keeps (minilm, one process: +125 MB after 8 x 256 tokens, +250 MB after 16 x 256) and
# how long a given-up batch runs on (~1 s on 2 cores); 16 sentences of up to 128 tokens still run
# in one call.
RUN_TOKENS = 2048


@dataclass(frozen=True)
class Work:
    """One checked request: its kind, its batching key, its rows and its tensors or texts."""

    kind: str  # "text" | "tensors"
    key: tuple[Any, ...]
    rows: int
    texts: tuple[str, ...] = ()
    feeds: dict[str, np.ndarray] | None = None
    # set by the server when the client has given up; the batch stops between chunks once every
    # work in it has been given up
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


class ModelFailure(Exception):
    """The model could not run one isolated request; its message says why (answered 422)."""


def tensor_metadata(info: TensorInfo) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else -1 for d in info.shape]
    return {"name": info.name, "datatype": DATATYPE_OF[info.dtype], "shape": shape}


class ServedModel:
    """A ``Runtime`` seen through the Open Inference Protocol."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_request_rows: int = 1024,
        max_text_chars: int = 100_000,
        run_tokens: int = RUN_TOKENS,
    ):
        self.runtime = runtime
        self.name = runtime.name
        self.max_request_rows = max_request_rows
        self.max_text_chars = max_text_chars
        self.run_tokens = run_tokens
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

    def warm(self) -> bool:
        """Run the largest model call this server makes, once, before the first request.

        onnxruntime's CPU arena grows to what the largest call needs and keeps it. A text call
        holds at most ``run_tokens`` tokens, and its biggest tensors (attention scores, rows x
        heads x length^2) are biggest at the longest sequence, so that call is
        ``run_tokens // max_length`` rows of the tokenizer's maximum length. Run at start, the
        resident memory the device pays is reached at once (a device that cannot hold it fails
        before it takes traffic) and stays flat after. False for packages without a tokenizer:
        their largest call depends on the shapes clients send.
        """
        if not self.text:
            return False
        rows = max(1, self.run_tokens // self.max_sequence)
        longest = " ".join(["warm"] * (2 * self.max_sequence))  # cut at the maximum
        answer_texts(self.runtime, [longest] * rows, run_tokens=self.run_tokens)
        return True

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
        for index, raw in enumerate(value):  # bytes: at least one byte a character
            if len(raw) > self.max_text_chars:
                self._check_text_length(index, raw)
        try:
            texts = tuple(v.decode("utf-8") for v in value)
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"input 'text' is not UTF-8: {exc}") from exc
        return Work(kind="text", key=("text",), rows=len(texts), texts=texts)

    def _check_text_length(self, index: int, raw: bytes) -> None:
        try:
            chars = len(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"input 'text' element {index} is not UTF-8: {exc}") from exc
        if chars > self.max_text_chars:
            raise ProtocolError(
                f"input 'text' element {index} holds {chars} characters, above the limit of "
                f"{self.max_text_chars} (max_text_chars)",
                status=413,
            )

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
        except (DeviceError, Abandoned):
            raise
        except Exception:  # one request's fault must not become the others'
            return [self._run_alone(work) for work in batch]

    def _run_alone(self, work: Work) -> Result:
        try:
            return self._run_joined([work])[0]
        except (DeviceError, Abandoned) as exc:
            return exc
        except Exception as exc:  # the model refused this request only
            return ModelFailure(f"model {self.name!r} could not run this request: {exc}")

    def _run_joined(self, batch: Sequence[Work]) -> list[Result]:
        def abandoned() -> bool:
            return all(work.cancelled.is_set() for work in batch)

        if batch[0].kind == "text":
            texts = [t for work in batch for t in work.texts]
            outputs = answer_texts(
                self.runtime, texts, run_tokens=self.run_tokens, abandoned=abandoned
            )
        else:
            names = list(batch[0].feeds or {})
            joined = {
                n: np.concatenate([w.feeds[n] for w in batch if w.feeds is not None], axis=0)
                for n in names
            }
            outputs = self._run_tensors(joined, abandoned)
        results: list[Result] = []
        start = 0
        for work in batch:
            stop = start + work.rows
            results.append({name: value[start:stop] for name, value in outputs.items()})
            start = stop
        return results

    def _run_tensors(
        self, feeds: dict[str, np.ndarray], abandoned: Callable[[], bool]
    ) -> dict[str, np.ndarray]:
        """The model on ``feeds``, in chunks of rows along the shared batch axis."""
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        if self.batch_axis_name is None or rows <= 1:  # unbatchable: one call
            return self.runtime.run(feeds)
        width = max((v.shape[1] if v.ndim > 1 else 1 for v in feeds.values()), default=1)
        step = max(1, self.run_tokens // max(width, 1))  # rows a call
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, rows, step):
            if abandoned():
                raise Abandoned("every request of the batch was given up")
            parts.append(self.runtime.run({n: v[start : start + step] for n, v in feeds.items()}))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}

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
