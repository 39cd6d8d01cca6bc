"""Fidelity of a compressed model against the original, on data no step calibrated on.

Per example, the model's output is reduced to one vector: the pooled embedding (embedding and
feature models; mean over the attention mask) or the logits (classifiers). Figures: cosine
similarity (min, mean), SQNR in dB, top-1 agreement and accuracy for classifiers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from edgec.compressor.calibration import Dataset, Feeds
from edgec.models.spec import ModelSpec
from edgec.runtimes.manifest import EmbeddingPostprocessing
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class Fidelity:
    """Cosine (min, mean), SQNR (dB), and for classifiers top-1 agreement and accuracy (%)."""

    cos_min: float
    cos_mean: float
    sqnr_db: float
    top1_agreement: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


def reduce_outputs(spec: ModelSpec, outputs: np.ndarray, feeds: Feeds) -> np.ndarray:
    """(N, ...) raw output -> (N, D) vectors: pooled embeddings or logits."""
    if spec.task == "classification" or outputs.ndim == 2:
        return outputs
    mask = feeds.get("attention_mask")
    if mask is None:
        pooled = outputs.mean(axis=1)
    else:
        weights = mask[..., None].astype(np.float32)
        pooled = (outputs * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    post = spec.postprocessing
    if isinstance(post, EmbeddingPostprocessing) and post.pooling == "cls":
        pooled = outputs[:, 0]
    if isinstance(post, EmbeddingPostprocessing) and post.normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def model_vectors(model: nn.Module, spec: ModelSpec, data: Dataset) -> np.ndarray:
    """The reduced outputs of a torch model over every batch, (N, D) float32."""
    name = spec.output_names[0]
    vectors = []
    with torch.inference_mode():
        for feeds in data.batches:
            args = {n: torch.from_numpy(feeds[n]) for n in spec.input_names}
            out = model(**args)[name].float().numpy()
            vectors.append(reduce_outputs(spec, out, feeds))
    return np.concatenate(vectors)


def observe_inputs(
    model: nn.Module,
    spec: ModelSpec,
    data: Dataset,
    modules: dict[str, nn.Module],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``model`` over ``data`` calling ``observe(name, input)`` with each named module's
    first input (2-D: one row per token or example); the hooks are gone afterwards."""

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def call(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return call

    run_hooked(
        model, spec, data, [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    )


def run_hooked(
    model: nn.Module, spec: ModelSpec, data: Dataset, handles: list[RemovableHandle]
) -> None:
    """Run ``model`` over ``data`` for the hooks behind ``handles``, then remove them (also when
    the run fails)."""
    try:
        model_vectors(model, spec, data)
    finally:
        for h in handles:
            h.remove()


def compare(
    reference: np.ndarray, actual: np.ndarray, spec: ModelSpec, labels: np.ndarray | None = None
) -> Fidelity:
    """Fidelity figures of ``actual`` against ``reference`` vectors (both (N, D))."""
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    cos = (ref * act).sum(axis=1) / np.maximum(norms, 1e-30)
    noise = float(((ref - act) ** 2).sum())
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(float((ref**2).sum()) / noise))
    top1 = accuracy = ref_accuracy = None
    if spec.task == "classification":
        top1 = float((ref.argmax(1) == act.argmax(1)).mean() * 100)
        if labels is not None:
            accuracy = float((act.argmax(1) == labels).mean() * 100)
            ref_accuracy = float((ref.argmax(1) == labels).mean() * 100)
    return Fidelity(float(cos.min()), float(cos.mean()), sqnr, top1, accuracy, ref_accuracy)
