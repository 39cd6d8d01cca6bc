"""The search space of ``--recipe auto`` and its cheap predictions.

Sensitivities are measured once on calibration batches (never the held-out sets): per block
Linear, the output error of sharing it alone at each width and of running it alone in int8; per
embedding encoding; per layer, of removing its least important heads (magnitude) or FFN neurons.
Each is a vector of ``1 - cos`` per calibration example, so the errors of independent changes
add per example and a prediction keeps a minimum, not only a mean. A ``Candidate`` is one point
of the joint space; ``predict`` gives its fidelity, stored and resident bytes and FLOP-model
milliseconds without building it; ``Candidate.recipe`` gives the steps that build it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from edgec.compressor.bit_allocation import choose, shared_bytes
from edgec.compressor.calibration import Dataset
from edgec.compressor.fidelity import model_vectors
from edgec.compressor.pipeline import CALIBRATION_BATCHES_FOR_CHOICES
from edgec.compressor.pruning import importance
from edgec.compressor.quantization import apply_int8, quantizable, quantize_weight, restore_float
from edgec.compressor.recipe import (
    Floor,
    PruneStep,
    QuantizeStep,
    Recipe,
    ShareStep,
    SmoothStep,
    Step,
)
from edgec.compressor.sharing import input_means, share_tensor
from edgec.compressor.smoothing import smooth
from edgec.models.adapters import adapter_for, embedding_tables
from edgec.models.spec import ModelSpec
from edgec.runtimes.devices import DeviceProfile
from torch import nn

SHARED_WIDTHS = (3, 4, 5, 6)  # widths a Linear may be shared at (k-means, per row)
# Calibration batches each sensitivity is measured on. On minilm (2 loaded cores) a Linear took
# 29 s over 8 batches (5 widths and int8), so 36 Linears took 17 min, more than half a 30-min
# budget; over 2 batches, 5 s. The held-out minimum the search is judged on is lower than over
# so few examples: measurements rescale the predictions (``Calibration.fidelity_scale``).
SEARCH_BATCHES = 2
AVERAGE_WIDTHS: tuple[int | None, ...] = (None, 6, 5, 4, 3)  # None: Linears not shared
EMBEDDINGS: tuple[str, ...] = ("fp32", "int8", "k6", "k5", "k4", "k3")  # kN: N-bit k-means rows
PRUNE_LEVELS = ("none", "heads-half", "heads-all", "heads-all+ffn-half", "heads2-all+ffn-all")
KMEANS_ITERATIONS = 8  # sensitivity probes only; the built candidate uses the step's default
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
TOKENS = 128  # the sequence length latency is predicted and measured at (batch 1)
# --- sensitivity --------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Per-example output error (``1 - cos`` against the original, (N,) arrays) of each change
    made alone, on ``SEARCH_BATCHES`` calibration batches."""

    shared: dict[str, dict[int, np.ndarray]]  # Linear weight name -> width -> error
    int8: dict[str, np.ndarray]  # Linear module name -> int8 weights and dynamic activations
    embeddings: dict[str, np.ndarray]  # encoding (EMBEDDINGS but fp32) -> error
    heads: list[dict[int, np.ndarray]]  # per layer: heads removed -> error
    ffn: list[dict[float, np.ndarray]]  # per layer: fraction of neurons removed -> error
    shapes: dict[str, tuple[int, int]]  # Linear weight name -> (out, in)
    table_shapes: dict[str, tuple[int, int]]  # embedding module name -> (rows, dim)
    layer_of: dict[str, int]  # Linear module name -> block index
    role: dict[str, str]  # Linear module name -> query|key|value|attn_out|ffn_in|ffn_out
    num_heads: list[int]
    head_dim: list[int]
    ffn_size: list[int]
    examples: int
    seconds: float

    def mean(self, error: np.ndarray) -> float:
        return float(error.mean())


def _errors(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    return np.clip(1.0 - (ref * act).sum(axis=1) / np.maximum(norms, 1e-30), 0.0, 2.0)


def measure_sensitivity(
    model: nn.Module, spec: ModelSpec, data: Dataset, say: Callable[[str], None]
) -> Sensitivity:
    """Each change alone, measured on the first ``SEARCH_BATCHES`` batches of ``data``."""
    started = time.perf_counter()
    head = Dataset(data.batches[:SEARCH_BATCHES], None, data.origin)
    reference = model_vectors(model, spec, head)
    # Candidates smooth before they share or quantize (``Candidate.recipe``), so their errors
    # are measured on the model smoothed as they are: alpha chosen (``auto``) on the batches the
    # pipeline chooses it on, so on the same data, the same alpha. With alpha fixed at 0.5
    # instead, minilm's two most int8-sensitive Linears (FFN outputs) were predicted to lose
    # 0.016 of min cosine between them, all 36 in int8 0.021 (calibration examples), where the
    # built-in int8 recipe measures 0.9932 held out: the search kept them float, at 0.82x int8's
    # speed.
    say("sensitivity: smoothing (SmoothQuant, alpha chosen as the candidates choose it)")
    choices = Dataset(data.batches[:CALIBRATION_BATCHES_FOR_CHOICES], None, data.origin)
    smooth(model, spec, SmoothStep(alpha="auto"), choices, model_vectors(model, spec, choices))

    def error() -> np.ndarray:
        return _errors(reference, model_vectors(model, spec, head))

    linears = quantizable(model)
    energy = input_means(model, spec, head, linears, lambda x: x.pow(2).sum(dim=0))
    shared: dict[str, dict[int, np.ndarray]] = {}
    int8: dict[str, np.ndarray] = {}
    total = len(linears)
    for index, (name, linear) in enumerate(linears.items()):
        say(f"sensitivity: {name} ({index + 1}/{total})")
        original = linear.weight.data.clone()
        shared[f"{name}.weight"] = {}
        for bits in SHARED_WIDTHS:
            with torch.no_grad():
                linear.weight.data.copy_(
                    share_tensor(original, bits, "channel", energy[name].float(), KMEANS_ITERATIONS)
                )
            shared[f"{name}.weight"][bits] = error()
        with torch.no_grad():
            linear.weight.data.copy_(original)
        saved = apply_int8(model, linears, [name])
        int8[name] = error()
        restore_float(model, linears, saved)
    say("sensitivity: embeddings")
    tables = embedding_tables(model)
    embeddings: dict[str, np.ndarray] = {}
    originals = {n: t.weight.data.clone() for n, t in tables.items()}
    for encoding in EMBEDDINGS[1:] if tables else ():
        with torch.no_grad():
            for n, table in tables.items():
                table.weight.data.copy_(_encode_table(originals[n], encoding))
        embeddings[encoding] = error()
    with torch.no_grad():
        for n, table in tables.items():
            table.weight.data.copy_(originals[n])
    say("sensitivity: heads and FFN neurons")
    layers = adapter_for(model).layers(model)
    scores = importance(model, spec, head, "magnitude")
    heads: list[dict[int, np.ndarray]] = []
    ffn: list[dict[float, np.ndarray]] = []
    for parts, head_scores, neuron_scores in zip(layers, scores.heads, scores.neurons, strict=True):
        out = parts.attn_out.weight.data
        heads.append({})
        for removed in (1, 2):
            if removed >= parts.num_heads:
                continue
            saved_out = out.clone()
            with torch.no_grad():  # zero what the weakest heads write: as if they were sliced off
                for h in np.argsort(head_scores, kind="stable")[:removed].tolist():
                    out[:, h * parts.head_dim : (h + 1) * parts.head_dim] = 0
            heads[-1][removed] = error()
            out.copy_(saved_out)
        down = parts.ffn_out.weight.data
        ffn.append({})
        for fraction in (0.25, 0.5):
            saved_down = down.clone()
            cut = round(len(neuron_scores) * fraction)
            with torch.no_grad():
                down[:, np.argsort(neuron_scores, kind="stable")[:cut].tolist()] = 0
            ffn[-1][fraction] = error()
            down.copy_(saved_down)
    names = {id(m): n for n, m in model.named_modules()}
    layer_of, role = {}, {}
    for index, parts in enumerate(layers):
        for part in ROLES:
            name = names[id(getattr(parts, part))]
            layer_of[name], role[name] = index, part
    return Sensitivity(
        shared=shared,
        int8=int8,
        embeddings=embeddings,
        heads=heads,
        ffn=ffn,
        shapes={f"{n}.weight": _shape(lin.weight) for n, lin in linears.items()},
        table_shapes={n: _shape(t.weight) for n, t in tables.items()},
        layer_of=layer_of,
        role=role,
        num_heads=[p.num_heads for p in layers],
        head_dim=[p.head_dim for p in layers],
        ffn_size=[p.ffn_in.out_features for p in layers],
        examples=len(reference),
        seconds=time.perf_counter() - started,
    )


def _shape(weight: torch.Tensor) -> tuple[int, int]:
    rows, cols = weight.shape
    return int(rows), int(cols)


def _encode_table(weight: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "int8":
        return quantize_weight(weight, per_channel=True)
    return share_tensor(weight, int(encoding[1:]), "channel", None, KMEANS_ITERATIONS)


# --- the space ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One point of the joint space.

    ``widths``: shared Linear weights -> bits (absent: not shared: int8 or fp32 storage, as its
    compute). ``float_linears``: Linears kept in float compute (the rest run int8).
    ``embedding``: an ``EMBEDDINGS`` encoding. ``heads_removed`` / ``ffn_removed``: per layer.
    """

    label: str
    widths: tuple[tuple[str, int], ...]
    float_linears: tuple[str, ...]
    embedding: str
    heads_removed: tuple[int, ...]
    ffn_removed: tuple[float, ...]

    def recipe(self, floor: Floor, linears: list[str], heads: list[int]) -> Recipe:
        """The steps that build this candidate, in the pipeline's order."""
        steps: list[Step] = []
        if any(self.heads_removed) or any(self.ffn_removed):
            kept = tuple(h - r for h, r in zip(heads, self.heads_removed, strict=True))
            steps.append(PruneStep(heads=kept, ffn=self.ffn_removed, importance="magnitude"))
        int8_linears = [n for n in linears if n not in self.float_linears]
        if int8_linears or self.widths:  # as the sensitivities were measured
            steps.append(SmoothStep(alpha="auto"))
        share_embeddings = self.embedding.startswith("k")
        if self.widths or share_embeddings:
            layers = (("linears",) if self.widths else ()) + (
                ("embeddings",) if share_embeddings else ()
            )
            bits = max(b for _, b in self.widths) if self.widths else int(self.embedding[1:])
            steps.append(
                ShareStep(
                    bits=bits,
                    embedding_bits=int(self.embedding[1:]) if share_embeddings else None,
                    layers=layers,
                    widths=self.widths,
                )
            )
        if int8_linears or self.embedding == "int8":
            steps.append(
                QuantizeStep(
                    mode="dynamic",
                    exclude=self.float_linears,
                    embeddings=self.embedding == "int8",
                )
            )
        return Recipe(name=f"auto: {self.label}", steps=tuple(steps), floor=floor)


@dataclass(frozen=True)
class Prediction:
    """Cheap figures of a candidate, before calibration against measurements.

    ``error``: per-example summed ``1 - cos`` (calibration batches); ``weight_bytes``: stored
    bytes of the weights; ``resident_bytes``: bytes the runtime keeps for them; ``model_ms``: the
    FLOP model's milliseconds at b1 x ``TOKENS``.
    """

    error: np.ndarray
    weight_bytes: int
    resident_bytes: int
    model_ms: float

    @property
    def error_max(self) -> float:
        return float(self.error.max())

    @property
    def error_mean(self) -> float:
        return float(self.error.mean())


def _knapsack(sens: Sensitivity, average: int) -> dict[str, int]:
    """Widths per Linear weight within the bytes of ``average`` bits each, least summed error."""
    options = [b for b in SHARED_WIDTHS if abs(b - average) <= 2]  # as ShareStep(allocate) tries
    errors = {n: {b: float(sens.shared[n][b].mean()) for b in options} for n in sens.shapes}
    sizes = {n: {b: shared_bytes(s, b) for b in options} for n, s in sens.shapes.items()}
    budget = sum(shared_bytes(s, average) for s in sens.shapes.values())
    return choose(errors, sizes, budget)


def _prune_plan(sens: Sensitivity, level: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    layers = len(sens.num_heads)
    half = max(1, math.ceil(layers / 2))
    by_heads = sorted(
        range(layers),
        key=lambda i: float(sens.heads[i][1].mean()) if 1 in sens.heads[i] else np.inf,
    )
    by_ffn = sorted(range(layers), key=lambda i: float(sens.ffn[i][0.25].mean()))
    heads = [0] * layers
    ffn = [0.0] * layers
    if level == "heads-half":
        for i in by_heads[:half]:
            heads[i] = 1
    elif level in ("heads-all", "heads-all+ffn-half"):
        heads = [1] * layers
        if level.endswith("ffn-half"):
            for i in by_ffn[:half]:
                ffn[i] = 0.25
    elif level == "heads2-all+ffn-all":
        heads, ffn = [2] * layers, [0.25] * layers
    heads = [h if h in sens.heads[i] else 0 for i, h in enumerate(heads)]
    return tuple(heads), tuple(ffn)


def enumerate_space(sens: Sensitivity) -> Iterator[Candidate]:
    """Every candidate of the grid (the uncompressed model excluded)."""
    linears = [n.removesuffix(".weight") for n in sens.shapes]
    by_int8 = sorted(linears, key=lambda n: -float(sens.int8[n].mean()))
    counts = sorted(
        {c for c in (0, 1, 2, 4, 8, len(linears) // 2, len(linears)) if c <= len(linears)}
    )
    allocations = {a: ({} if a is None else _knapsack(sens, a)) for a in AVERAGE_WIDTHS}
    for average, widths in allocations.items():
        for count in counts:
            for embedding in EMBEDDINGS if sens.table_shapes else EMBEDDINGS[:1]:
                for level in PRUNE_LEVELS:
                    heads, ffn = _prune_plan(sens, level)
                    if level != "none" and not any(heads) and not any(ffn):
                        continue
                    original = average is None and count == len(linears) and level == "none"
                    if original and embedding == "fp32":
                        continue
                    label = (
                        f"linears {'unshared' if average is None else f'{average}b avg'}, "
                        f"{len(linears) - count}/{len(linears)} int8, emb {embedding}, "
                        f"prune {level}"
                    )
                    yield Candidate(
                        label=label,
                        widths=tuple(sorted(widths.items())),
                        float_linears=tuple(sorted(by_int8[:count])),
                        embedding=embedding,
                        heads_removed=heads,
                        ffn_removed=ffn,
                    )


def predict(candidate: Candidate, sens: Sensitivity, device: DeviceProfile) -> Prediction:
    """Fidelity, bytes and time of ``candidate`` from the sensitivities and its encoding."""
    error = np.zeros(sens.examples)
    widths = dict(candidate.widths)
    floats = set(candidate.float_linears)
    weight_bytes = resident = 0
    fp32_flops = int8_flops = 0.0
    for weight, (rows, cols) in sens.shapes.items():
        module = weight.removesuffix(".weight")
        layer, role = sens.layer_of[module], sens.role[module]
        heads = sens.num_heads[layer]
        kept = (
            1.0 - candidate.ffn_removed[layer]
            if role.startswith("ffn")
            else (heads - candidate.heads_removed[layer]) / heads
        )
        out_rows = round(rows * kept) if role in ("query", "key", "value", "ffn_in") else rows
        elements = round(rows * cols * kept)
        is_int8 = module not in floats
        if weight in widths:
            bits = widths[weight]
            error = error + sens.shared[weight][bits]
            weight_bytes += elements * bits // 8 + out_rows * 2**bits * (1 if is_int8 else 2)
        else:
            weight_bytes += elements * (1 if is_int8 else 4) + (4 * out_rows if is_int8 else 0)
        resident += elements * (1 if is_int8 else 4)
        if is_int8:
            error = error + sens.int8[module]
            int8_flops += 2.0 * elements * TOKENS
        else:
            fp32_flops += 2.0 * elements * TOKENS
    for layer, removed in enumerate(candidate.heads_removed):
        if removed:
            error = error + sens.heads[layer][removed]
        if candidate.ffn_removed[layer]:
            error = error + sens.ffn[layer][candidate.ffn_removed[layer]]
        heads = sens.num_heads[layer] - removed
        fp32_flops += 2.0 * 2 * heads * sens.head_dim[layer] * TOKENS * TOKENS  # QK^T and AV
    if candidate.embedding != "fp32":
        error = error + sens.embeddings[candidate.embedding]
    for rows, dim in sens.table_shapes.values():
        if candidate.embedding == "fp32":
            table = rows * dim * 4
        elif candidate.embedding == "int8":
            table = rows * dim + 4 * rows
        else:
            bits = int(candidate.embedding[1:])
            table = rows * dim * bits // 8 + rows * 2**bits * 2
        weight_bytes += table
        resident += table  # int8 and packed tables stay as stored: rows decode after the lookup
    per_matmul = len(sens.shapes) or 1  # the speed curves are per matmul size
    model_ms = 1e3 * (
        fp32_flops / (device.matmul_speed("gflops_fp32", fp32_flops / per_matmul) * 1e9)
        + int8_flops / (device.matmul_speed("gops_int8", int8_flops / per_matmul) * 1e9)
    )
    return Prediction(error, weight_bytes, resident, model_ms)


def why_layers(candidate: Candidate, sens: Sensitivity) -> list[dict[str, Any]]:
    """Per Linear: width, compute, and the measured errors that decided them."""
    widths = dict(candidate.widths)
    rank = {
        n: i + 1 for i, n in enumerate(sorted(sens.int8, key=lambda n: -float(sens.int8[n].mean())))
    }
    rows = []
    for weight in sens.shapes:
        module = weight.removesuffix(".weight")
        bits = widths.get(weight)
        errors = {b: float(e.mean()) for b, e in sens.shared[weight].items()}
        is_float = module in candidate.float_linears
        why = []
        if bits is not None:
            why.append(
                f"{bits} bits: error {errors[bits]:.2e} "
                + ", ".join(f"{b}b {errors[b]:.1e}" for b in sorted(errors) if b != bits)
            )
        why.append(
            f"int8 error {float(sens.int8[module].mean()):.2e}, rank {rank[module]} of {len(rank)}"
            + (" (most sensitive: kept float)" if is_float else "")
        )
        layer = sens.layer_of[module]
        rows.append(
            {
                "linear": module,
                "layer": layer,
                "bits": bits if bits is not None else (8 if not is_float else 32),
                "compute": "float" if is_float else "int8",
                "heads_removed": candidate.heads_removed[layer],
                "ffn_removed": candidate.ffn_removed[layer],
                "why": "; ".join(why),
            }
        )
    return rows
