"""One device's side of federated recovery: its data, the teacher it computes, a local round.

The device holds the compressed checkpoint it runs and its own data file. The data is split
as ``edgec compress`` splits calibration data (the last 20% held out, never trained on); the
teacher (the original model, in torch) is computed on the device, so neither text nor
activations leave it. A round: load the global trainable tensors, distil towards the teacher
for a few steps with the compression kept (centroids train with the assignments fixed, int8
Linears quantization-aware, dynamic int8 activations simulated), return the trainable tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from edgec.compressor.calibration import Dataset, load_data
from edgec.compressor.distillation import distill
from edgec.compressor.fidelity import Fidelity, compare, model_vectors
from edgec.compressor.quantization import apply_int8, quantizable, remove_simulation
from edgec.compressor.recipe import DistillStep
from edgec.federated.trainable import Mode, Storage, TrainableSet
from edgec.models import load_model
from edgec.models.checkpoint import load_checkpoint
from edgec.models.sources import BUILTIN
from edgec.models.spec import ModelSpec

from edgec.errors import EdgecError, FederatedError


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """What a device does in one round: ``steps`` AdamW steps of ``batch_size`` at ``lr``,
    FedProx's ``proximal_mu`` (0: plain FedAvg), within a schedule of ``total_steps``;
    ``dropout`` off by default: the student then matches the teacher's own (eval-mode) outputs,
    and the loss is the compression's error, not the dropout's noise (see ``DistillStep``)."""

    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    proximal_mu: float = 0.0
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FederatedError(f"local steps must be >= 1, got {self.steps}")
        if not 0 < self.lr < 1:
            raise FederatedError(f"learning rate must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise FederatedError(f"batch size must be >= 1, got {self.batch_size}")
        if self.proximal_mu < 0:
            raise FederatedError(f"proximal mu must be >= 0, got {self.proximal_mu}")
        if not isinstance(self.dropout, bool):
            raise FederatedError(f"dropout must be true or false, got {self.dropout!r}")


def resolve_teacher(spec: ModelSpec, teacher: str | os.PathLike[str] | None) -> str:
    """The original model's source: ``teacher`` when given, else the checkpoint's own source
    (its directory when it exists here, else its built-in name)."""
    if teacher is not None:
        return os.fspath(teacher)
    if spec.source and Path(spec.source).is_dir():
        return spec.source
    if spec.name in BUILTIN:
        return spec.name
    raise FederatedError(
        f"the original of {spec.name!r} is not on this device ({spec.source!r} is missing); "
        "give the teacher model with --teacher"
    )


class Device:
    """A device's compressed model, teacher, data split and trainable set, loaded once."""

    def __init__(
        self,
        checkpoint: Path,
        data: Path,
        teacher: str | os.PathLike[str] | None = None,
        mode: Mode = "auto",
        batch_size: int = 16,
    ):
        try:
            self.model, self.spec = load_checkpoint(checkpoint)
            self.storage = Storage.of(checkpoint)
            teacher_model, _ = load_model(resolve_teacher(self.spec, teacher))
            loaded = load_data(self.spec, calib=data, batch=batch_size)
        except EdgecError as exc:
            raise FederatedError(f"device cannot start: {exc}") from exc
        self.teacher = teacher_model.eval()
        self.trainable = TrainableSet(self.model, self.storage, mode)
        self.train_data: Dataset = loaded.calibration
        self.heldout: Dataset = loaded.evaluation
        self.reference = model_vectors(self.teacher, self.spec, self.heldout)
        self._int8 = sorted(n for n in self.storage.int8 if n in quantizable(self.model))

    def _simulating(self) -> None:
        """Dynamic int8 activations as the exported model computes them (hooks on)."""
        if self.storage.dynamic_activations and self._int8:
            linears = quantizable(self.model)
            floats = apply_int8(self.model, linears, self._int8, self.storage.per_channel)
            with torch.no_grad():  # the hooks only: training keeps its float weights
                for name, weight in floats.items():
                    linears[name].weight.copy_(weight)

    def evaluate(self, arrays: dict[str, np.ndarray] | None = None) -> Fidelity:
        """Fidelity of the model (with ``arrays`` applied) on this device's held-out split."""
        if arrays is not None:
            self.trainable.apply(self.model, arrays)
        self._simulating()
        try:
            vectors = model_vectors(self.model, self.spec, self.heldout)
        finally:
            remove_simulation(self.model)
        return compare(self.reference, vectors, self.spec, self.heldout.labels)

    def train(
        self,
        arrays: dict[str, np.ndarray],
        plan: LocalTraining,
        round_: int,
        rounds: int,
        seed: int,
        data: Dataset | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """One round from the global ``arrays``: the trained tensors and the last loss.

        ``data``: train on it instead of this device's split (the central baseline)."""
        self.trainable.apply(self.model, arrays, settle=False)
        trained = set(self.trainable.parameters)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in trained}
        params = dict(self.model.named_parameters())

        def proximal() -> torch.Tensor:  # FedProx: mu/2 * ||w - w_global||^2
            terms = [((params[n] - w.to(params[n].device)) ** 2).sum() for n, w in anchor.items()]
            return plan.proximal_mu / 2 * torch.stack(terms).sum()

        self._simulating()
        try:
            _, details = distill(
                self.model,
                self.teacher,
                self.spec,
                DistillStep(
                    steps=plan.steps, lr=plan.lr, batch_size=plan.batch_size, dropout=plan.dropout
                ),
                self.train_data if data is None else data,
                seed=seed,
                int8=[n for n in self._int8 if f"{n}.weight" in trained],
                per_channel=self.storage.per_channel,
                clusters=self.trainable.clusters,
                penalty=proximal if plan.proximal_mu > 0 else None,
                schedule=((round_ - 1) * plan.steps, rounds * plan.steps),
                keep_float=True,
            )
        finally:
            remove_simulation(self.model)
            for param in self.model.parameters():
                param.requires_grad_(True)
        out = self.trainable.extract(self.model)
        loss = details["loss_last"]
        return out, float(loss) if isinstance(loss, int | float) else float("nan")

    @property
    def examples(self) -> int:
        return self.train_data.size


def pooled_device(devices: list[Device]) -> Dataset:
    """Every device's training split in one dataset (the central baseline trains on it)."""
    batches = [b for d in devices for b in d.train_data.batches]
    return Dataset(batches, None, "pooled: " + ", ".join(d.train_data.origin for d in devices))
