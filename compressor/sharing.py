"""Weight sharing: k-means clustering of weights into ``2**bits`` centroids.

Per output channel (one codebook per row of the weight) or per tensor. With ``sensitivity``, a
Linear's clustering is weighted by the mean squared activation of each input column on the
calibration data, so centroids sit where errors cost the most output. With ``gptq`` (per
channel), the weights are then rounded onto those codebooks column by column with GPTQ's error
feedback through the inputs' Gram matrix. The weights stay dense in torch; the exporter stores
them as packed indices plus a codebook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from edgec.compressor.bit_allocation import Allocation, allocate
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import observe_inputs
from edgec.compressor.recipe import ShareStep
from edgec.models.adapters import adapter_for, embedding_tables
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm

from edgec.errors import RecipeError

GPTQ_BATCHES = 16  # calibration batches for the input Gram matrices


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


class Clusters:
    """The fixed cluster assignment of a shared weight (at most ``k`` distinct values per row,
    or in the whole tensor), and the projection that puts each cluster at its members' mean."""

    def __init__(self, weight: torch.Tensor, k: int):
        flat = weight.detach().reshape(1, -1)
        self.whole = int(flat.unique().numel()) <= k  # one codebook for the tensor
        rows = flat if self.whole else weight.detach().reshape(weight.shape[0], -1)
        values, order = rows.sort(dim=1)
        starts = torch.ones_like(values, dtype=torch.bool)
        starts[:, 1:] = values[:, 1:] != values[:, :-1]
        rank = starts.long().cumsum(dim=1) - 1
        self.index = torch.empty_like(rank).scatter_(1, order, rank)
        self.k = int(rank.max()) + 1
        if self.k > k:
            raise ValueError(f"weight has {self.k} distinct values in a row, more than {k}")
        self.count = torch.zeros(rows.shape[0], self.k).scatter_add_(
            1, self.index, torch.ones_like(rows)
        )

    def project(self, weight: torch.Tensor) -> None:
        """In place: every value becomes its cluster's mean (fp16-exact, as the exporter stores)."""
        rows = weight.data.reshape(self.index.shape)
        total = torch.zeros(rows.shape[0], self.k, dtype=rows.dtype).scatter_add_(
            1, self.index.to(rows.device), rows
        )
        means = (total / self.count.to(rows.device).clamp_min(1)).half().to(rows.dtype)
        weight.data.copy_(means.gather(1, self.index.to(rows.device)).reshape(weight.shape))


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


def gptq_assign(
    weight: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor, damping: float = 0.01
) -> torch.Tensor:
    """Round ``weight`` (R, C) onto its rows' codebooks (R, K) column by column, spreading each
    column's rounding error over the columns not yet rounded (GPTQ, Frantar et al. 2023), so the
    output error ``(W - Q) X`` is what is minimised, not the weight error.

    ``hessian`` (C, C) is ``X^T X`` over the calibration inputs. Returns the rounded weight.
    """
    # Columns with the most input energy first ("act-order"): their errors get spread the most.
    order = torch.argsort(torch.diag(hessian), descending=True)
    w = weight.detach().double()[:, order].clone()
    h = hessian.double()[order][:, order].clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(h.shape[0], dtype=h.dtype) * damping * torch.diag(h).mean()
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    book = codebook.double()
    mids = ((book[:, 1:] + book[:, :-1]) / 2).contiguous()
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        column = w[:, j]
        idx = torch.searchsorted(mids, column.contiguous().unsqueeze(1)).squeeze(1)
        out[:, j] = book.gather(1, idx.unsqueeze(1)).squeeze(1)
        error = (column - out[:, j]) / upper[j, j]
        w[:, j + 1 :] -= error.unsqueeze(1) * upper[j, j + 1 :].unsqueeze(0)
    return out[:, torch.argsort(order)].to(weight.dtype)


def input_means(
    model: nn.Module,
    spec: ModelSpec,
    data: Dataset,
    linears: dict[str, nn.Linear],
    statistic: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per Linear (by name), ``statistic`` of its input rows (tokens, float64) summed over the
    calibration data and divided by the number of tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        value = statistic(x.double())
        sums[name] = sums[name] + value if name in sums else value
        counts[name] = counts.get(name, 0) + x.shape[0]

    observe_inputs(model, spec, data, dict(linears), accumulate)
    return {name: sums[name] / counts[name] for name in sums}


def input_gram(
    model: nn.Module, spec: ModelSpec, data: Dataset, linears: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` of each Linear's input over the calibration tokens, by name: its diagonal
    is the mean squared activation per column."""
    return input_means(model, spec, data, linears, lambda x: x.T @ x)


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
        for emb in embedding_tables(model).values():
            chosen[id(emb)] = (emb, bits)
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[key]}.weight": value for key, value in chosen.items()}


def _stages(model: nn.Module, targets: dict[str, tuple[nn.Module, int]]) -> list[list[str]]:
    """The shared weights in the order inputs reach them: embeddings, then block by block."""
    block_of = {}
    for index, p in enumerate(adapter_for(model).layers(model)):
        for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
            block_of[id(lin)] = index
    stages: dict[int, list[str]] = {}
    for name, (module, _) in targets.items():
        stages.setdefault(block_of.get(id(module), -1), []).append(name)
    return [stages[k] for k in sorted(stages)]


def _allocate(
    model: nn.Module,
    spec: ModelSpec,
    step: ShareStep,
    data: Dataset,
    targets: dict[str, tuple[nn.Module, int]],
) -> Allocation | None:
    """Bits per Linear by sensitivity (``bit_allocation``), written into ``targets``."""
    linears = {n: m for n, (m, _) in targets.items() if isinstance(m, nn.Linear)}
    if not linears:
        return None
    head = Dataset(data.batches[:GPTQ_BATCHES], None, data.origin)
    # Only the diagonal of the Gram matrix, for the sensitivity weighting of k-means.
    energy = input_means(model, spec, head, linears, lambda x: x.pow(2).sum(dim=0))

    def quantizer(name: str, weight: torch.Tensor, bits: int) -> torch.Tensor:
        importance = energy[name].float() if step.sensitivity else None
        return share_tensor(weight, bits, step.granularity, importance, step.iterations)

    allocation = allocate(model, spec, data, linears, step.bits, quantizer)
    for name, bits in allocation.bits.items():
        targets[name] = (targets[name][0], bits)
    return allocation


def share_weights(
    model: nn.Module, spec: ModelSpec, step: ShareStep, data: Dataset
) -> tuple[nn.Module, dict[str, object]]:
    """Replace the chosen weights by their shared values, in place; report bits per tensor.

    Block by block, in input order: each block's input statistics are measured with the blocks
    before it already shared, so later blocks compensate for earlier errors (as GPTQ does).
    """
    targets = shared_weights(model, step)
    unknown = sorted(name for name, _ in step.widths if name not in targets)
    if unknown:
        raise RecipeError(
            f"share.widths names weights this step does not share: {unknown}; "
            f"shared: {sorted(targets)}"
        )
    allocation = _allocate(model, spec, step, data, targets) if step.allocate else None
    for name, bits in step.widths:  # explicit widths win over the uniform and allocated ones
        targets[name] = (targets[name][0], bits)
    use_gptq = step.gptq and step.granularity == "channel"
    head = Dataset(data.batches[: GPTQ_BATCHES if use_gptq else 4], None, data.origin)
    bits_of: dict[str, int] = {}
    bar = tqdm(total=len(targets), desc="clustering", unit="tensor", leave=False)
    for stage in _stages(model, targets):
        linears = {n: m for n in stage if isinstance(m := targets[n][0], nn.Linear)}
        gram = (
            input_gram(model, spec, head, linears)
            if (step.sensitivity or use_gptq) and linears
            else {}
        )
        for name in stage:
            module, bits = targets[name]
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            hessian = gram.get(name)
            energy = torch.diagonal(hessian).float() if hessian is not None else None
            with torch.no_grad():
                if use_gptq and hessian is not None:
                    codebook, _ = kmeans_rows(weight.data, bits, energy, step.iterations)
                    shared = gptq_assign(weight.data, codebook, hessian)
                else:
                    importance = energy if step.sensitivity else None
                    shared = share_tensor(
                        weight.data, bits, step.granularity, importance, step.iterations
                    )
                weight.data.copy_(shared)
            bits_of[name] = bits
            bar.update()
    bar.close()
    return model, {
        **({"allocation": allocation.to_json()} if allocation else {}),
        "granularity": step.granularity,
        "activation_weighted": step.sensitivity,
        "gptq": use_gptq,
        "bits": bits_of,
        "tensors": len(bits_of),
    }
