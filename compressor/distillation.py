"""Distillation recovery: a short fine-tune of the compressed model towards the original.

Unlabeled: the loss is the masked mean squared error between the student's and the teacher's
output states (encoders), or the KL divergence of the logits (classifiers). Runs on CPU; on a
GPU when one is present.

Weights already shared keep their clusters: after every optimizer step each cluster is set to
the mean of its members, which trains the centroids with the cluster assignments fixed (the
"trained quantization" of Han et al. 2016), so a distillation after ``share`` recovers accuracy
without leaving the codebooks.
"""

from __future__ import annotations

import numpy as np
import torch
from edgec.compressor.calibration import Dataset, Feeds
from edgec.compressor.recipe import DistillStep
from edgec.compressor.sharing import Clusters
from edgec.models.spec import ModelSpec
from torch import nn
from tqdm import tqdm


def _loss(
    spec: ModelSpec, student: torch.Tensor, teacher: torch.Tensor, feeds: dict[str, torch.Tensor]
) -> torch.Tensor:
    if spec.task == "classification":
        return nn.functional.kl_div(
            student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
        )
    mask = feeds.get("attention_mask")
    weights = torch.ones(student.shape[:-1]) if mask is None else mask.float()
    error = ((student - teacher) ** 2).mean(-1)  # (B, T)
    # Cosine of the mean-pooled vectors as well: what an embedding's user compares.
    pooled_s = (student * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    pooled_t = (teacher * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    cos = nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1)
    return (error * weights).sum() / weights.sum() + (1 - cos).mean() * 10


def _batches(data: Dataset, batch_size: int, rng: np.random.Generator) -> list[Feeds]:
    """Re-batch the dataset's examples at random into ``batch_size`` groups (one epoch)."""
    rows = [
        (bi, i) for bi, b in enumerate(data.batches) for i in range(len(next(iter(b.values()))))
    ]
    order = rng.permutation(len(rows))
    out = []
    for start in range(0, len(order), batch_size):
        picked = [rows[j] for j in order[start : start + batch_size]]
        feeds: Feeds = {}
        for name in data.batches[0]:
            parts = [data.batches[bi][name][i] for bi, i in picked]
            if parts[0].ndim >= 1 and name != "pixel_values":
                width = max(len(p) for p in parts)
                parts = [np.pad(p, (0, width - len(p))) for p in parts]
            feeds[name] = np.stack(parts)
        out.append(feeds)
    return out


def distill(
    student: nn.Module,
    teacher: nn.Module,
    spec: ModelSpec,
    step: DistillStep,
    data: Dataset,
    seed: int = 0,
    shared: dict[str, int] | None = None,
) -> tuple[nn.Module, dict[str, object]]:
    """Fine-tune ``student`` for ``step.steps`` AdamW steps; returns it in eval mode.

    ``shared``: parameter name -> bits of the weights already shared; they keep their clusters.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student.to(device).train()
    teacher.to(device).eval()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=step.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1 - i / step.steps)
    )
    params = dict(student.named_parameters())
    clusters = {n: Clusters(params[n], 2**bits) for n, bits in (shared or {}).items()}
    name = spec.output_names[0]
    queue: list[Feeds] = []
    losses = []
    bar = tqdm(range(step.steps), desc="distillation", unit="step", leave=False)
    for _ in bar:
        if not queue:
            queue = _batches(data, step.batch_size, rng)
        feeds = {
            n: torch.from_numpy(v).to(device)
            for n, v in queue.pop().items()
            if n in spec.input_names
        }
        with torch.no_grad():
            target = teacher(**feeds)[name]
        loss = _loss(spec, student(**feeds)[name], target, feeds)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for param, cluster in clusters.items():
                cluster.project(params[param])
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.to("cpu").eval()
    teacher.to("cpu")
    return student, {
        "steps": step.steps,
        "lr": step.lr,
        "batch_size": step.batch_size,
        "device": device,
        "loss_first": round(float(np.mean(losses[:10])), 6),
        "loss_last": round(float(np.mean(losses[-10:])), 6),
        "shared_kept": len(clusters),
    }
