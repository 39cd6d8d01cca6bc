"""Structured pruning (attention heads, FFN neurons) and unstructured magnitude sparsity.

Structured pruning physically slices each block's Linears through the architecture adapter, so
the exported graph does less work; layers may keep different head counts. Unstructured pruning
only zeroes weights: it shrinks the compressed artifact, not CPU latency.

Importance:
- ``taylor``: gradient score of a gate on each head / neuron (Michel et al. 2019), squared and
  averaged over calibration batches (the Fisher form of Kwon et al. 2022). The loss is the
  cross-entropy against labels when known, else against the model's own sampled predictions
  (classifiers) or a Gaussian perturbation of its own outputs (encoders), so no labels are needed.
- ``magnitude``: L2 norms of the weights that feed and read each head / neuron.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from edgec.compressor.calibration import Dataset
from edgec.compressor.recipe import PruneStep
from edgec.models.adapters import LayerParts, adapter_for
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm

from edgec.errors import RecipeError


@dataclass(frozen=True)
class Importance:
    """Per layer: a score per head (num_heads,) and per FFN neuron (intermediate,)."""

    heads: list[np.ndarray]
    neurons: list[np.ndarray]


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim 0) or input columns (dim 1) at ``keep``."""
    weight = linear.weight.detach().index_select(dim, keep).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None)
    new = new.to(dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, keep) if dim == 0 else bias)
    return new


def _replace(parent_of: dict[int, tuple[nn.Module, str]], old: nn.Linear, new: nn.Linear) -> None:
    parent, name = parent_of[id(old)]
    setattr(parent, name, new)


def _parents(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {
        id(child): (module, name)
        for module in model.modules()
        for name, child in module.named_children()
    }


def slice_layer(
    model: nn.Module, parts: LayerParts, heads: Sequence[int], neurons: Sequence[int] | None
) -> None:
    """Keep only ``heads`` (indices) and FFN ``neurons`` of one block, in place."""
    if not heads:
        raise RecipeError("every layer must keep at least one head")
    parents = _parents(model)
    d = parts.head_dim
    rows = torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)
    for linear in (parts.query, parts.key, parts.value):
        _replace(parents, linear, _slice_linear(linear, rows, 0))
    _replace(parents, parts.attn_out, _slice_linear(parts.attn_out, rows, 1))
    setattr(parts.attention, parts.heads_attr, len(heads))
    for attr in ("all_head_size", "inner_dim"):
        if hasattr(parts.attention, attr):
            setattr(parts.attention, attr, len(heads) * d)
    if neurons is not None:
        keep = torch.tensor(sorted(neurons), dtype=torch.long)
        _replace(parents, parts.ffn_in, _slice_linear(parts.ffn_in, keep, 0))
        _replace(parents, parts.ffn_out, _slice_linear(parts.ffn_out, keep, 1))


def reshape_layers(model: nn.Module, heads: Sequence[int], ffn: Sequence[int]) -> None:
    """Give each block ``heads[i]`` heads and ``ffn[i]`` neurons (weights to be loaded after)."""
    layers = adapter_for(model).layers(model)
    if len(layers) != len(heads) or len(layers) != len(ffn):
        raise RecipeError(f"shape plan has {len(heads)} layers; the model has {len(layers)}")
    for parts, h, n in zip(layers, heads, ffn, strict=True):
        slice_layer(model, parts, list(range(h)), list(range(n)))


def layer_shapes(model: nn.Module) -> tuple[list[int], list[int]]:
    """(heads per layer, FFN neurons per layer)."""
    layers = adapter_for(model).layers(model)
    return [p.num_heads for p in layers], [p.ffn_in.out_features for p in layers]


def _magnitude(layers: list[LayerParts]) -> Importance:
    heads, neurons = [], []
    for p in layers:
        d = p.head_dim
        rows = sum(
            lin.weight.detach().reshape(p.num_heads, d, -1).pow(2).sum((1, 2))
            for lin in (p.query, p.key, p.value)
        )
        cols = p.attn_out.weight.detach().reshape(-1, p.num_heads, d).pow(2).sum((0, 2))
        heads.append((rows + cols).sqrt().numpy())
        n_in = p.ffn_in.weight.detach().norm(dim=1)
        n_out = p.ffn_out.weight.detach().norm(dim=0)
        neurons.append((n_in * n_out).numpy())
    return Importance(heads, neurons)


def _loss(spec: ModelSpec, output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if spec.task == "classification":
        target = labels
        if target is None:  # sample from the model's own predictive distribution
            target = torch.multinomial(output.detach().softmax(-1), 1).squeeze(-1)
        return nn.functional.cross_entropy(output, target)
    noise = torch.randn_like(output)  # Gaussian likelihood around the model's own output
    return 0.5 * ((output - (output.detach() + noise)) ** 2).sum() / output.shape[0]


def _taylor(
    model: nn.Module, layers: list[LayerParts], spec: ModelSpec, data: Dataset, batches: int
) -> Importance:
    gates_h = [torch.ones(p.num_heads, requires_grad=True) for p in layers]
    gates_n = [torch.ones(p.ffn_in.out_features, requires_grad=True) for p in layers]
    handles = []

    def gate(g: torch.Tensor, repeat: int) -> Callable[..., tuple[torch.Tensor]]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            return (args[0] * g.repeat_interleave(repeat),)

        return hook

    for p, gh, gn in zip(layers, gates_h, gates_n, strict=True):
        handles.append(p.attn_out.register_forward_pre_hook(gate(gh, p.head_dim)))
        handles.append(p.ffn_out.register_forward_pre_hook(gate(gn, 1)))
    scores_h = [np.zeros(p.num_heads) for p in layers]
    scores_n = [np.zeros(p.ffn_in.out_features) for p in layers]
    name = spec.output_names[0]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    offset = 0
    try:
        chosen = data.batches[:batches]
        for feeds in tqdm(chosen, desc="importance (taylor)", unit="batch", leave=False):
            size = len(next(iter(feeds.values())))
            labels = None
            if data.labels is not None:
                labels = torch.from_numpy(data.labels[offset : offset + size]).long()
            offset += size
            out = model(**{n: torch.from_numpy(feeds[n]) for n in spec.input_names})[name]
            grads = torch.autograd.grad(_loss(spec, out, labels), [*gates_h, *gates_n])
            for i in range(len(layers)):
                scores_h[i] += grads[i].detach().pow(2).numpy()
                scores_n[i] += grads[len(layers) + i].detach().pow(2).numpy()
    finally:
        for handle in handles:
            handle.remove()
        torch.random.set_rng_state(generator_state)
    return Importance(scores_h, scores_n)


def importance(
    model: nn.Module, spec: ModelSpec, data: Dataset, method: str, batches: int = 8
) -> Importance:
    """Scores per head and per FFN neuron, higher = more important."""
    layers = adapter_for(model).layers(model)
    if method == "magnitude":
        return _magnitude(layers)
    if method == "taylor":
        with torch.enable_grad():
            return _taylor(model, layers, spec, data, batches)
    raise RecipeError(f"unknown importance {method!r}; valid: ['magnitude', 'taylor']")


def _heads_to_keep(scores: list[np.ndarray], heads: float | tuple[int, ...]) -> list[list[int]]:
    """Indices kept per layer: by count per layer, or a global fraction over per-layer-normalised
    scores (Michel et al.), at least one head per layer."""
    if isinstance(heads, tuple):
        if len(heads) != len(scores):
            raise RecipeError(f"prune.heads lists {len(heads)} layers; the model has {len(scores)}")
        kept = []
        for s, k in zip(scores, heads, strict=True):
            if k > len(s):
                raise RecipeError(f"prune.heads keeps {k} heads in a layer of {len(s)}")
            kept.append(sorted(np.argsort(-s, kind="stable")[:k].tolist()))
        return kept
    normed = [s / max(float(np.linalg.norm(s)), 1e-30) for s in scores]
    total = sum(len(s) for s in scores)
    remove = round(total * heads)
    ranked = sorted(
        ((float(v), li, hi) for li, s in enumerate(normed) for hi, v in enumerate(s)),
    )
    removed: set[tuple[int, int]] = set()
    left = [len(s) for s in scores]
    for _, li, hi in ranked:
        if len(removed) >= remove:
            break
        if left[li] > 1:
            removed.add((li, hi))
            left[li] -= 1
    return [[h for h in range(len(s)) if (li, h) not in removed] for li, s in enumerate(scores)]


def unstructured_sparsity(model: nn.Module, fraction: float) -> float:
    """Zero the smallest-magnitude ``fraction`` of each block Linear's weights; the sparsity reached."""
    zeros = total = 0
    for p in adapter_for(model).layers(model):
        for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
            w = lin.weight.data
            k = int(w.numel() * fraction)
            if k:
                threshold = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= threshold] = 0
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def prune(
    model: nn.Module, spec: ModelSpec, step: PruneStep, data: Dataset
) -> tuple[nn.Module, dict[str, object]]:
    """Prune heads and FFN neurons, then unstructured sparsity; model changed in place."""
    layers = adapter_for(model).layers(model)
    scores = importance(model, spec, data, step.importance, step.batches)
    keep_heads = _heads_to_keep(scores.heads, step.heads)
    ffn = step.ffn if isinstance(step.ffn, tuple) else (step.ffn,) * len(layers)
    if len(ffn) != len(layers):
        raise RecipeError(f"prune.ffn lists {len(ffn)} layers; the model has {len(layers)}")
    for parts, heads, neuron_scores, fraction in zip(
        layers, keep_heads, scores.neurons, ffn, strict=True
    ):
        count = len(neuron_scores)
        keep_n = max(1, count - round(count * fraction))
        neurons = np.argsort(-neuron_scores, kind="stable")[:keep_n].tolist()
        slice_layer(model, parts, heads, neurons if keep_n < count else None)
    sparsity = unstructured_sparsity(model, step.unstructured) if step.unstructured else 0.0
    heads_kept, ffn_kept = layer_shapes(model)
    details: dict[str, object] = {
        "importance": step.importance,
        "heads_kept": heads_kept,
        "heads_removed": [
            [h for h in range(p.num_heads) if h not in kept]
            for p, kept in zip(layers, keep_heads, strict=True)
        ],
        "ffn_kept": ffn_kept,
        "sparsity": round(sparsity, 4),
    }
    if step.unstructured:
        details["note"] = "unstructured zeros shrink the compressed artifact, not CPU latency"
    return model, details
