"""Weight sharing: k-means clustering of weights into ``2**bits`` centroids.

Per output channel (one codebook per row of the weight) or per tensor. With ``sensitivity``, a
Linear's clustering is weighted by the mean squared activation of each input column on the
calibration data, so centroids sit where errors cost the most output (an activation-aware
distortion, as AWQ/GPTQ-style methods weigh columns). The weights stay dense in torch; the
exporter stores them as packed indices plus a codebook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.recipe import ShareStep
from edgec.models.adapters import adapter_for
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm


def kmeans_rows(
    weight: torch.Tensor, bits: int, importance: torch.Tensor | None = None, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``weight`` (R, C) into 2**bits values (1-D, so sorted centroids).

    ``importance`` (C,) weighs each column. Returns (codebook (R, K) sorted, indices (R, C) int64);
    ``codebook.gather(1, indices)`` is the shared weight.
    """
    w = weight.detach().double()
    rows, cols = w.shape
    k = min(2**bits, cols)
    imp = torch.ones(cols, dtype=w.dtype) if importance is None else importance.double()
    imp = imp.clamp_min(1e-12).expand(rows, cols)
    # Initialise at evenly spaced quantiles: robust to the heavy tails of trained weights.
    qs = (torch.arange(k, dtype=w.dtype) + 0.5) / k
    codebook = torch.quantile(w, qs, dim=1).T.contiguous()  # (R, K)
    for _ in range(iterations):
        codebook, _ = codebook.sort(dim=1)
        mids = (codebook[:, 1:] + codebook[:, :-1]) / 2  # (R, K-1)
        idx = torch.searchsorted(mids.contiguous(), w.contiguous())  # (R, C)
        total = torch.zeros(rows, k, dtype=w.dtype).scatter_add_(1, idx, w * imp)
        mass = torch.zeros(rows, k, dtype=w.dtype).scatter_add_(1, idx, imp)
        codebook = torch.where(mass > 0, total / mass.clamp_min(1e-30), codebook)
    # fp16 centroids: the exporter stores float codebooks as fp16, and its decode stays exact.
    codebook, _ = codebook.half().double().sort(dim=1)
    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2
    idx = torch.searchsorted(mids.contiguous(), w.contiguous())
    return codebook.to(weight.dtype), idx


def share_tensor(
    weight: torch.Tensor,
    bits: int,
    granularity: str,
    importance: torch.Tensor | None = None,
    iterations: int = 15,
) -> torch.Tensor:
    """The weight with every row (or the whole tensor) replaced by its nearest centroids."""
    if granularity == "tensor":
        flat = weight.reshape(1, -1)
        imp = None if importance is None else importance.repeat(weight.shape[0])
        codebook, idx = kmeans_rows(flat, bits, imp, iterations)
        return codebook.gather(1, idx).reshape(weight.shape)
    codebook, idx = kmeans_rows(weight, bits, importance, iterations)
    return codebook.gather(1, idx)


def input_energy(
    model: nn.Module, spec: ModelSpec, data: Dataset, linears: Iterable[nn.Linear], batches: int = 4
) -> dict[int, torch.Tensor]:
    """Mean squared input activation per column of each Linear, keyed by ``id(linear)``."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        sums[id(module)] = sums.get(id(module), 0) + x.pow(2).sum(0)
        counts[id(module)] = counts.get(id(module), 0) + x.shape[0]

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]
    try:
        with torch.inference_mode():
            for feeds in tqdm(data.batches[:batches], desc="activation statistics", leave=False):
                model(**{n: torch.from_numpy(feeds[n]) for n in spec.input_names})
    finally:
        for h in handles:
            h.remove()
    return {key: sums[key] / counts[key] for key in sums}


def shared_weights(model: nn.Module, step: ShareStep) -> dict[str, tuple[nn.Module, int]]:
    """Parameter name -> (module, bits) for the weights ``step`` shares."""
    adapter = adapter_for(model)
    chosen: dict[int, tuple[nn.Module, int]] = {}
    if "linears" in step.layers:
        for p in adapter.layers(model):
            for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
                chosen[id(lin)] = (lin, step.bits)
    if "embeddings" in step.layers:
        bits = step.embedding_bits or step.bits
        for emb in adapter.embeddings(model):
            chosen[id(emb)] = (emb, bits)
        prefix = str(getattr(model, "base_model_prefix", ""))
        base = getattr(model, prefix) if prefix and hasattr(model, prefix) else model
        position = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
        if isinstance(position, nn.Embedding):
            chosen[id(position)] = (position, bits)
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[key]}.weight": value for key, value in chosen.items()}


def share_weights(
    model: nn.Module, spec: ModelSpec, step: ShareStep, data: Dataset
) -> tuple[nn.Module, dict[str, object]]:
    """Replace the chosen weights by their k-means centroids, in place; report bits per tensor."""
    targets = shared_weights(model, step)
    linears = [m for m, _ in targets.values() if isinstance(m, nn.Linear)]
    energy = input_energy(model, spec, data, linears) if step.sensitivity and linears else {}
    bits_of: dict[str, int] = {}
    for name, (module, bits) in tqdm(
        targets.items(), desc="clustering", unit="tensor", leave=False
    ):
        weight = module.weight
        with torch.no_grad():
            shared = share_tensor(
                weight.data, bits, step.granularity, energy.get(id(module)), step.iterations
            )
            weight.data.copy_(shared)
        bits_of[name] = bits
    return model, {
        "granularity": step.granularity,
        "activation_weighted": bool(energy),
        "bits": bits_of,
        "tensors": len(bits_of),
    }
