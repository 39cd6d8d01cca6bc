"""What a federated round trains and sends: the trainable set of a compressed checkpoint.

A weight-shared tensor travels as its codebook: one row of centroids per output row (or one
for the tensor), with the assignment of every weight to a centroid fixed by the starting
checkpoint, so the compression is kept and a few KB cross the network instead of the weight.
With ``mode="all"``, every other float parameter the model's output depends on travels whole
as well (biases, norms, unshared weights); pruned shapes are what the checkpoint has.

Rounds exchange the float values; what is measured and what the run writes is each tensor
put back on the grid its storage uses (int8 per row for the int8 Linears and tables, fp16 for
float codebooks), so the result exports as the start did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from edgec.compressor.quantization import quantize_weight
from edgec.compressor.sharing import Clusters
from edgec.models.checkpoint import read_checkpoint
from torch import nn

from edgec.errors import FederatedError

CODEBOOK_SUFFIX = ":codebook"  # a shared weight's travelling name: "<param>:codebook"
Mode = Literal["auto", "centroids", "all"]
MODES: tuple[str, ...] = ("auto", "centroids", "all")


@dataclass(frozen=True)
class Storage:
    """How the checkpoint stores its weights: shared bits, int8 Linears and tables."""

    shared_bits: dict[str, int]
    int8: frozenset[str]  # Linear module names
    int8_tables: frozenset[str]  # embedding module names on a per-row int8 grid
    per_channel: bool
    dynamic_activations: bool  # int8 Linears compute with dynamically quantized inputs

    @classmethod
    def of(cls, ckpt: Path) -> Storage:
        meta = read_checkpoint(ckpt)
        storage = meta.get("storage", {})
        quantize = [s for s in meta.get("steps", []) if s.get("step") == "quantize"]
        per_channel = bool(quantize[-1].get("per_channel", True)) if quantize else True
        dynamic = bool(quantize) and quantize[-1].get("mode") == "dynamic"
        return cls(
            shared_bits={str(k): int(v) for k, v in storage.get("shared_bits", {}).items()},
            int8=frozenset(storage.get("int8", [])),
            int8_tables=frozenset(storage.get("int8_tables", [])),
            per_channel=per_channel,
            dynamic_activations=dynamic,
        )


class TrainableSet:
    """The named tensors a federated round exchanges for one checkpoint's model.

    Built the same way on the server and on every device from the same checkpoint, so both
    hold the same names, shapes and cluster assignments; ``fingerprint`` proves it.
    """

    def __init__(self, model: nn.Module, storage: Storage, mode: Mode = "auto"):
        if mode not in MODES:
            raise FederatedError(f"unknown trainable set {mode!r}; known: {', '.join(MODES)}")
        params = dict(model.named_parameters())
        shared = {n: b for n, b in storage.shared_bits.items() if n in params}
        if mode == "auto":
            mode = "centroids" if shared else "all"
        if mode == "centroids" and not shared:
            raise FederatedError(
                "the checkpoint has no weight-shared tensors, so there are no centroids to "
                "train; use the trainable set 'all'"
            )
        self.mode: Mode = mode
        self.storage = storage
        self.clusters = {n: Clusters(params[n].detach(), 2**b) for n, b in shared.items()}
        reachable = _reachable(model)
        self.dense = (
            sorted(n for n in params if n not in shared and n in reachable) if mode == "all" else []
        )
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, clusters in self.clusters.items():
            self.shapes[name + CODEBOOK_SUFFIX] = (clusters.index.shape[0], clusters.k)
        for name in self.dense:
            self.shapes[name] = tuple(params[name].shape)

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    @property
    def parameters(self) -> list[str]:
        """Model parameter names that train (shared ones through their codebooks)."""
        return sorted([*self.clusters, *self.dense])

    def nbytes(self) -> int:
        """Bytes of one update as float32 values (what a client sends each round)."""
        return sum(int(np.prod(s)) * 4 for s in self.shapes.values())

    def fingerprint(self) -> str:
        """sha256 over the names, shapes and cluster assignments."""
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(f"{name}:{self.shapes[name]};".encode())
        for name in sorted(self.clusters):
            digest.update(self.clusters[name].index.to(torch.int32).numpy().tobytes())
        return digest.hexdigest()

    def extract(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The trainable tensors of ``model`` (float32 numpy), by travelling name."""
        params = dict(model.named_parameters())
        out: dict[str, np.ndarray] = {}
        for name, clusters in self.clusters.items():
            out[name + CODEBOOK_SUFFIX] = _codebook(params[name].detach().cpu(), clusters)
        for name in self.dense:
            out[name] = params[name].detach().cpu().float().numpy().copy()
        return out

    def apply(
        self, model: nn.Module, arrays: Mapping[str, np.ndarray], settle: bool = True
    ) -> None:
        """Write ``arrays`` (checked) into ``model`` in place, each on its storage grid (with
        ``settle`` off, the float values: training goes on from them, and rounding each round
        would undo every step smaller than a grid step)."""
        problems = self.problems(arrays)
        if problems:
            raise FederatedError("update does not fit the model: " + "; ".join(problems))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, clusters in self.clusters.items():
                book = torch.from_numpy(np.asarray(arrays[name + CODEBOOK_SUFFIX]))
                rows = book.to(params[name].dtype).gather(1, clusters.index)
                params[name].copy_(rows.reshape(params[name].shape))
            for name in self.dense:
                params[name].copy_(torch.from_numpy(np.asarray(arrays[name])))
            if settle:
                self._settle(params)

    def _settle(self, params: dict[str, nn.Parameter]) -> None:
        """Each trained tensor back on its storage grid: int8 per row, or fp16 codebooks."""
        for name in self.parameters:
            module = name.rsplit(".", 1)[0]
            on_int8 = name.endswith(".weight") and (
                module in self.storage.int8 or module in self.storage.int8_tables
            )
            per_channel = self.storage.per_channel or module in self.storage.int8_tables
            if on_int8:
                params[name].copy_(quantize_weight(params[name], per_channel))
            elif name in self.clusters:
                params[name].copy_(params[name].half().to(params[name].dtype))

    def problems(self, arrays: Mapping[str, Any]) -> list[str]:
        """Why ``arrays`` is not an update of this set (empty when it is): names missing or
        unknown, a value that is not a float32 tensor, a wrong shape, NaN or infinity."""
        found: list[str] = []
        missing = sorted(set(self.shapes) - set(arrays))
        unknown = sorted(set(arrays) - set(self.shapes))
        if missing:
            found.append(f"missing {_few(missing)}")
        if unknown:
            found.append(f"unknown {_few(unknown)}")
        for name in self.names:
            if name not in arrays:
                continue
            value = arrays[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                found.append(f"{name} is {kind}, not a float32 tensor")
            elif value.shape != self.shapes[name]:
                found.append(f"{name} has shape {list(value.shape)}, not {list(self.shapes[name])}")
            elif not np.isfinite(value).all():
                found.append(f"{name} holds NaN or infinity")
        return found


def _codebook(weight: torch.Tensor, clusters: Clusters) -> np.ndarray:
    """Each cluster's value, (rows, k) float32: the centroids (clusters with no member: 0).

    The value of the cluster's first member, not the mean of its members: they are equal (the
    training projects them), and a float32 mean of equal values can miss the value by an ulp,
    which moves a row's int8 scale."""
    rows = weight.float().reshape(clusters.index.shape)
    width = rows.shape[1]
    positions = torch.arange(width).expand_as(clusters.index)
    first = torch.full((rows.shape[0], clusters.k), width - 1, dtype=torch.long)
    first.scatter_reduce_(1, clusters.index, positions, reduce="amin")
    values = rows.gather(1, first)
    return torch.where(clusters.count > 0, values, torch.zeros_like(values)).numpy()


def _reachable(model: nn.Module) -> set[str]:
    """Parameters whose value the first output depends on (a pooler a model's embedding
    output never reaches is not sent), found by one backward pass on a two-token input."""
    config = getattr(model, "config", None)
    names = set()
    try:
        if hasattr(config, "image_size") and hasattr(config, "num_channels"):
            size = int(config.image_size)  # type: ignore[union-attr]
            feeds = {"pixel_values": torch.zeros(1, int(config.num_channels), size, size)}  # type: ignore[union-attr]
        else:
            feeds = {"input_ids": torch.ones(1, 2, dtype=torch.long)}
        model.zero_grad()
        out = model(**feeds)
        first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
        first.float().sum().backward()
        names = {n for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
    return names


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
