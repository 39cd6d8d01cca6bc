"""Cross-checks: one package run on two machines (e.g. x86 here, aarch64 there) on the same
inputs, and the outputs compared against the tolerance of the package's kind.

Both sides run ``python -m edgec.crosscheck run PKG PROBE OUT``: the probe (``make_probe``,
written here) holds token ids with padding, and real sentences or images where the package
pre-processes them; each side writes its outputs to an ``.npz``; ``compare_package`` turns the
two into a ``PackageReport``. The side that runs on the device needs ``edgec[device]`` only:
this module imports numpy and the runtime, never torch or onnx (``package_kind`` reads the
graph with onnx, on the machine that checks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgec.errors import EdgecError, InputError
from edgec.table import format_table

PROBE_FORMAT = 1
TOKEN_ROWS = 8  # token-id probe: rows of one batch, each padded to the longest
TOKEN_LENGTH = 64

Kind = Literal["float", "int8"]


@dataclass(frozen=True)
class Tolerance:
    """What two runs of one package may differ by: raw outputs within ``max_abs`` (float graphs)
    or every pooled output row within ``min_cosine`` (graphs that quantize activations)."""

    kind: Kind
    max_abs: float | None
    min_cosine: float | None
    reason: str


# Float graphs: the same operators on the same floats; kernels may only reorder sums (SIMD width,
# FMA), which moves minilm's outputs by ~2e-6. Graphs with dynamic int8 activations: measured per
# node (``diagnose``) on minilm ``int8`` and ``balanced`` against aarch64 (qemu cpus max,
# cortex-a76, cortex-a72), every int8 kernel gives the same bits on the same inputs; only the
# float LayerNormalization, SkipLayerNormalization and Softmax kernels differ, by 1-2 ulp
# (2.7e-7 relative). Each DynamicQuantizeLinear after them scales by the range of the whole
# tensor and rounds: an ulp moves a value near a rounding edge a whole int8 step, and from there
# the two machines part. The package already does this to itself on one machine when a request's
# batch changes (the ranges span the batch; ``batch_variation``), so a row is held to the floor
# below, or to that batch variation measured on the same inputs where it is further.
TOLERANCES: dict[Kind, Tolerance] = {
    "float": Tolerance(
        "float",
        max_abs=1e-4,
        min_cosine=None,
        reason="float graph: kernels may reorder sums, nothing more",
    ),
    "int8": Tolerance(
        "int8",
        max_abs=None,
        min_cosine=0.995,
        reason=(
            "dynamic int8 activations: the int8 kernels agree bit for bit, but an ulp from a "
            "float kernel (LayerNorm, Softmax) moves a value a whole int8 step; the floor per "
            "row, or how far the package moves here when its batch changes if that is further"
        ),
    ),
}


@dataclass(frozen=True)
class ProbeSize:
    """How much a probe runs: sentences (or images) through the package's processing, and a
    batch of ``rows`` x ``length`` token ids with padding."""

    sentences: int
    rows: int
    length: int


# Emulated float is slow: qemu runs float SIMD through soft-float helpers (under qemu on 2 loaded
# cores, ``there.run_s``: fp32 minilm 593 s for 16 sentences and 4 x 32 tokens, int8 282 s for 64
# sentences and 8 x 64 tokens), and a float graph is judged per element, which a few rows show.
# Graphs with int8 activations are judged per row, by the worst row: they get more rows.
PROBE_SIZES: dict[Kind, ProbeSize] = {
    "float": ProbeSize(sentences=16, rows=4, length=32),
    "int8": ProbeSize(sentences=64, rows=TOKEN_ROWS, length=TOKEN_LENGTH),
}

# Operators that quantize activations: a graph with any of them computes in int8.
INT8_COMPUTE_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    }
)


def package_kind(package_dir: str | os.PathLike[str]) -> tuple[Kind, list[str]]:
    """``int8`` when any stage quantizes activations, else ``float``; plus what shows it (the
    low-bit codes of ``balanced`` or ``smallest`` decode exactly, so they alone do not count).
    Reads the graphs with onnx: call it on the checking machine, not on the device."""
    import onnx

    from edgec.runtimes import read_package

    package = read_package(package_dir)
    found: set[str] = set()
    notes: list[str] = []
    for stage in package.manifest.stages:
        model = onnx.load(str(package.path(stage.file)), load_external_data=False)
        found |= {node.op_type for node in model.graph.node} & INT8_COMPUTE_OPS
        if stage.coded:
            notes.append(f"{stage.name}: {len(stage.coded)} low-bit coded weights")
    kind: Kind = "int8" if found else "float"
    return kind, sorted(found) + notes


# ---------------------------------------------------------------------------------------------
# The probe: the same inputs for both sides


def token_feeds(
    names: Sequence[str],
    vocab_size: int,
    rows: int = TOKEN_ROWS,
    length: int = TOKEN_LENGTH,
    seed: int = 0,
    ids_name: str = "input_ids",
    mask_name: str | None = "attention_mask",
) -> dict[str, np.ndarray]:
    """Random token ids, each row padded after its own length (the longest row has none), with
    the attention mask that says so; other inputs (token types) zero."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(length, max(2, length // 8), rows).astype(np.int64)
    low = min(1000, vocab_size // 2)  # above the special and unused ids where there are some
    ids = rng.integers(low, vocab_size, (rows, length), dtype=np.int64)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    feeds = {}
    for name in names:
        if name == ids_name:
            feeds[name] = np.where(mask > 0, ids, 0)
        elif name == mask_name:
            feeds[name] = mask
        else:
            feeds[name] = np.zeros((rows, length), np.int64)
    return feeds


def make_probe(
    package_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sentences: Sequence[str] = (),
    images: np.ndarray | None = None,
    seed: int = 0,
    rows: int = TOKEN_ROWS,
    length: int = TOKEN_LENGTH,
) -> None:
    """Write the inputs both sides run: ``feed:NAME`` raw tensors (token ids with padding for a
    text model, the encoded images for an image model), and ``sentences`` or ``images`` that go
    through the package's own pre- and post-processing."""
    from edgec.runtimes import load_package
    from edgec.runtimes.manifest import ImagePreprocessing, TextPreprocessing

    with load_package(package_dir) as runtime:
        pre = runtime.manifest.preprocessing
        arrays: dict[str, np.ndarray] = {"format": np.array(PROBE_FORMAT)}
        if isinstance(pre, TextPreprocessing):
            encoder = runtime.text_encoder
            vocab = encoder.vocab_size if encoder is not None else 1000
            names = [i.name for i in runtime.manifest.inputs]
            feeds = token_feeds(
                names,
                vocab,
                rows,
                length,
                seed=seed,
                ids_name=pre.input_ids,
                mask_name=pre.attention_mask,
            )
            if sentences:
                arrays["sentences"] = np.array(list(sentences), dtype=np.str_)
        elif isinstance(pre, ImagePreprocessing):
            if images is None:
                raise InputError("an image package needs images to probe it with")
            feeds = runtime.encode(images)
            arrays["images"] = np.asarray(images, dtype=np.float32)
        else:
            raise InputError(
                f"package {runtime.name!r} carries no pre-processing: cannot make its inputs"
            )
    arrays.update({f"feed:{name}": value for name, value in feeds.items()})
    _save_npz(Path(out), arrays)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary name, then rename: a failed run leaves no half-written file."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# One side: run the package on the probe


def run_probe(
    package_dir: str | os.PathLike[str],
    probe: str | os.PathLike[str],
    out: str | os.PathLike[str],
) -> dict[str, Any]:
    """Run the package on the probe and write ``raw:NAME`` (the raw outputs for the feeds),
    ``post`` (embeddings, or class probabilities) and ``labels`` (top-1 class indices) where the
    package post-processes, and ``meta`` (this machine, onnxruntime, stages, seconds)."""
    import onnxruntime

    from edgec.runtimes import load_package
    from edgec.runtimes.manifest import ClassificationPostprocessing, EmbeddingPostprocessing

    with np.load(probe, allow_pickle=False) as data:
        inputs = {k: data[k] for k in data.files}
    if int(inputs["format"]) != PROBE_FORMAT:
        raise InputError(f"probe format {int(inputs['format'])}; this edgec reads {PROBE_FORMAT}")
    feeds = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("feed:")}
    started = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    with load_package(package_dir) as runtime:
        loaded = time.perf_counter()
        for name, value in runtime.run(feeds).items():
            arrays[f"raw:{name}"] = value
        post = runtime.manifest.postprocessing
        source: Any = None
        if "sentences" in inputs:
            source = [str(s) for s in inputs["sentences"]]
        elif "images" in inputs:
            source = inputs["images"]
        if source is not None and isinstance(post, EmbeddingPostprocessing):
            arrays["post"] = runtime.embed(source)
        elif source is not None and isinstance(post, ClassificationPostprocessing):
            result = runtime.classify(source)
            arrays["post"] = result.probabilities
            arrays["labels"] = result.probabilities.argmax(axis=-1)
        stages = [f"{s.name}@{s.device}" for s in runtime.manifest.stages]
        strategy = runtime.manifest.strategy
    meta = {
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "strategy": strategy,
        "stages": stages,
        "load_s": round(loaded - started, 2),
        "run_s": round(time.perf_counter() - loaded, 2),
    }
    arrays["meta"] = np.array(json.dumps(meta))
    _save_npz(Path(out), arrays)
    return meta


def cpu_features() -> list[str]:
    """The SIMD features this CPU reports, as numpy detects them (from the kernel's HWCAP on
    aarch64, which is also where onnxruntime looks when it cannot read /sys)."""
    import importlib

    try:
        module = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1
        module = importlib.import_module("numpy.core._multiarray_umath")
    return sorted(name for name, present in module.__cpu_features__.items() if present)


def run_batches(
    package_dir: str | os.PathLike[str],
    batches: str | os.PathLike[str],
    out: str | os.PathLike[str],
) -> dict[str, Any]:
    """Run the package on each batch of ``batches`` (``b{i}:NAME`` tensors, batches of their own
    shapes) and write the raw outputs as ``b{i}:OUTPUT``, with ``meta``."""
    from edgec.runtimes import load_package

    with np.load(batches, allow_pickle=False) as data:
        inputs = {k: data[k] for k in data.files}
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in inputs.items():
        batch, _, name = key.partition(":")
        grouped.setdefault(batch, {})[name] = value
    arrays: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    with load_package(package_dir) as runtime:
        for batch, feeds in grouped.items():
            for name, value in runtime.run(feeds).items():
                arrays[f"{batch}:{name}"] = value
    meta = {"machine": platform.machine(), "cpu_features": cpu_features(), "batches": len(grouped)}
    meta["seconds"] = round(time.perf_counter() - started, 2)
    arrays["meta"] = np.array(json.dumps(meta))
    _save_npz(Path(out), arrays)
    return meta


# ---------------------------------------------------------------------------------------------
# Per node: where two machines start to differ


def make_node_probe(
    package_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: np.ndarray | None = None,
    rows: int = 2,
    length: int = 16,
) -> list[dict[str, Any]]:
    """A probe for ``run_nodes``: the single stage's graph with the output of every node that
    depends on the inputs exposed as a graph output (``model``), its nodes in graph order
    (``nodes``), and small inputs. Uses onnx: call it on the checking machine. Exposing an
    output keeps onnxruntime from fusing across it, so this graph runs unfused kernels."""
    import onnx

    from edgec.runtimes import read_package
    from edgec.runtimes.manifest import ImagePreprocessing, TextPreprocessing
    from edgec.runtimes.processing import encode_images

    package = read_package(package_dir)
    if len(package.manifest.stages) != 1:
        raise InputError("per-node comparison takes a single-stage package")
    stage = package.manifest.stages[0]
    model = onnx.load(str(package.path(stage.file)), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    dynamic = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    nodes = []
    for node in graph.node:
        inputs = [name for name in node.input if name in dynamic]
        if not inputs:
            continue  # weights only: a constant, folded at load
        outputs = [name for name in node.output if name]
        dynamic.update(outputs)
        nodes.append({"name": node.name, "op": node.op_type, "inputs": inputs, "outputs": outputs})
    known = {v.name: v for v in [*graph.value_info, *graph.output]}
    exposed = {o.name for o in graph.output}
    for entry in nodes:
        for name in entry["outputs"]:
            if name not in exposed:
                graph.output.append(known.get(name) or onnx.ValueInfoProto(name=name))
                exposed.add(name)
    pre = package.manifest.preprocessing
    if isinstance(pre, TextPreprocessing):
        names = [i.name for i in package.manifest.inputs]
        feeds = token_feeds(
            names, 1000, rows, length, ids_name=pre.input_ids, mask_name=pre.attention_mask
        )
    elif isinstance(pre, ImagePreprocessing) and images is not None:
        feeds = encode_images(pre, np.asarray(images)[:rows])
    else:
        raise InputError("per-node comparison needs a text package, or an image one with images")
    arrays = {
        "format": np.array(PROBE_FORMAT),
        "model": np.frombuffer(model.SerializeToString(), dtype=np.uint8),
        "nodes": np.array(json.dumps(nodes)),
        **{f"feed:{name}": value for name, value in feeds.items()},
    }
    _save_npz(Path(out), arrays)
    return nodes


def run_nodes(
    package_dir: str | os.PathLike[str],
    probe: str | os.PathLike[str],
    out: str | os.PathLike[str],
) -> dict[str, Any]:
    """Run a ``make_node_probe`` graph on this machine, as the package's stage runs (its device's
    session options, its low-bit weights decoded), and write every exposed value ``node:NAME``."""
    from edgec.runtimes import read_package
    from edgec.runtimes.backends import create_session, session_options

    package = read_package(package_dir)
    stage = package.manifest.stages[0]
    with np.load(probe, allow_pickle=False) as data:
        inputs = {k: data[k] for k in data.files}
    session = create_session(
        inputs["model"].tobytes(),
        session_options(package.manifest.device(stage.device)),
        ["CPUExecutionProvider"],
        None if stage.weights is None else package.path(stage.weights),
        stage.coded,
    )
    feeds = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("feed:")}
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    arrays = {f"node:{n}": v for n, v in zip(names, values, strict=True)}
    meta = {"machine": platform.machine(), "values": len(names)}
    arrays["meta"] = np.array(json.dumps(meta))
    _save_npz(Path(out), arrays)
    return meta


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs difference, and the fraction of elements that differ at all."""
    if a.shape != b.shape:
        return float("inf"), 1.0
    delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(delta.max(initial=0.0)), float(np.mean(delta > 0)) if delta.size else 0.0


def node_divergence(
    probe: str | os.PathLike[str], here: str | os.PathLike[str], there: str | os.PathLike[str]
) -> dict[str, Any]:
    """Per node of the probe's graph: how far its outputs differ between the two sides, and
    whether it is an *origin*: its inputs are bit-identical on both sides, its outputs are not
    (the operator's kernel itself differs; everything after inherits). Summarised per operator
    type: nodes, origins, the largest difference an origin made; the first origins in order."""
    nodes = json.loads(str(_read(probe)["nodes"]))
    ours, theirs = _read(here), _read(there)
    feeds = {k.split(":", 1)[1] for k in _read(probe) if k.startswith("feed:")}
    diff: dict[str, float] = dict.fromkeys(feeds, 0.0)
    per_op: dict[str, dict[str, Any]] = {}
    origins = []
    for node in nodes:
        out_diff, fraction = 0.0, 0.0
        for name in node["outputs"]:
            d, f = _difference(ours[f"node:{name}"], theirs[f"node:{name}"])
            diff[name] = d
            out_diff, fraction = max(out_diff, d), max(fraction, f)
        in_diff = max((diff.get(name, 0.0) for name in node["inputs"]), default=0.0)
        stats = per_op.setdefault(
            node["op"], {"nodes": 0, "differ": 0, "origins": 0, "origin_max_abs": 0.0}
        )
        stats["nodes"] += 1
        stats["differ"] += out_diff > 0
        if in_diff == 0.0 and out_diff > 0:
            stats["origins"] += 1
            stats["origin_max_abs"] = max(stats["origin_max_abs"], out_diff)
            origins.append(
                {"node": node["name"], "op": node["op"], "max_abs": out_diff, "differing": fraction}
            )
    return {"per_op": per_op, "origins": origins, "nodes": len(nodes)}


# ---------------------------------------------------------------------------------------------
# Comparing the two sides


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row of two (N, ...) arrays, flattened per row; float64."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # two zero rows are the same row; one zero row against another is as far as it gets
    same = np.all(a == b, axis=1)
    return np.where(same, 1.0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0))


def masked_mean(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(N, T, D) -> (N, D): the mean over the positions the mask keeps (all without one)."""
    if hidden.ndim < 3:
        return hidden
    weights = np.ones(hidden.shape[:2]) if mask is None else mask.astype(np.float64)
    weights = weights.reshape(*weights.shape, *([1] * (hidden.ndim - 2)))
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


@dataclass
class PackageReport:
    """The comparison of one package's outputs here and there."""

    package: str
    kind: Kind
    tolerance: Tolerance
    evidence: list[str]
    stages: list[str]
    here: dict[str, Any]
    there: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per compared output
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    divergence: dict[str, Any] | None = None  # node_divergence, when asked for

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "kind": self.kind,
            "tolerance": {
                "max_abs": self.tolerance.max_abs,
                "min_cosine": self.tolerance.min_cosine,
                "reason": self.tolerance.reason,
            },
            "evidence": self.evidence,
            "stages": self.stages,
            "here": self.here,
            "there": self.there,
            "outputs": self.rows,
            "passed": self.passed,
            "failures": self.failures,
            "error": self.error,
            "divergence": self.divergence,
        }


def _read(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def compare_package(
    package: str,
    kind: Kind,
    probe: str | os.PathLike[str],
    here: str | os.PathLike[str],
    there: str | os.PathLike[str],
    evidence: Sequence[str] = (),
    tolerance: Tolerance | None = None,
    batch_min_cosine: dict[str, float] | None = None,
) -> PackageReport:
    """Compare the outputs ``there`` against ``here`` (the reference) for one package.

    Per raw output: max abs difference (and the reference's range), min cosine per row of the
    output pooled over the probe's attention mask. Per post-processed output: max abs difference,
    min cosine per row, and top-1 agreement for classifiers. Float graphs fail above ``max_abs``
    on any output; int8 graphs below ``min_cosine`` on any pooled output, or below how far the
    output moves here between a batch and its rows alone (``batch_min_cosine``, by output:
    ``batch_variation``) where that is further."""
    tolerance = tolerance or TOLERANCES[kind]
    inputs, ours, theirs = _read(probe), _read(here), _read(there)
    report = PackageReport(
        package=package,
        kind=kind,
        tolerance=tolerance,
        evidence=list(evidence),
        stages=json.loads(str(ours["meta"]))["stages"],
        here=json.loads(str(ours["meta"])),
        there=json.loads(str(theirs["meta"])),
    )
    mask = next((v for k, v in inputs.items() if k == "feed:attention_mask"), None)
    names = sorted(k for k in ours if k.startswith("raw:") or k == "post")
    missing = sorted(set(names) - set(theirs))
    if missing:
        report.failures.append(f"outputs {missing} missing there")
    for key in names:
        if key not in theirs:
            continue
        a, b = ours[key], theirs[key]
        if a.shape != b.shape:
            report.failures.append(f"{key}: shape {list(b.shape)} there, {list(a.shape)} here")
            continue
        pooled_a, pooled_b = (
            (masked_mean(a, mask), masked_mean(b, mask)) if key != "post" else (a, b)
        )
        row: dict[str, Any] = {
            "output": key,
            "shape": list(a.shape),
            "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()),
            "range": float(np.abs(a).max()),
            "min_cosine": float(row_cosines(pooled_a, pooled_b).min()),
            "mean_cosine": float(row_cosines(pooled_a, pooled_b).mean()),
            "nonfinite_there": int((~np.isfinite(b)).sum()),
        }
        if key == "post" and "labels" in ours:
            agree = ours["labels"] == theirs.get("labels", -1)
            row["top1_agreement_%"] = float(100.0 * np.mean(agree))
        report.rows.append(row)
        if row["nonfinite_there"]:
            report.failures.append(f"{key}: {row['nonfinite_there']} non-finite values there")
        if tolerance.max_abs is not None and not row["max_abs_diff"] <= tolerance.max_abs:
            report.failures.append(
                f"{key}: max abs difference {row['max_abs_diff']:.3g} > {tolerance.max_abs:g}"
            )
        if tolerance.min_cosine is not None:
            floor = tolerance.min_cosine
            if batch_min_cosine and key in batch_min_cosine:
                row["here_batch_min_cosine"] = batch_min_cosine[key]
                floor = min(floor, batch_min_cosine[key])
            row["floor"] = floor
            if not row["min_cosine"] >= floor:
                report.failures.append(f"{key}: min cosine {row['min_cosine']:.6f} < {floor:.6g}")
    return report


def _stages(stages: Sequence[str], shown: int = 3) -> str:
    """``stage@device`` names, or for many stages their count and devices."""
    if len(stages) <= shown:
        return "stages " + ", ".join(stages)
    devices = sorted({s.rpartition("@")[2] for s in stages})
    return f"{len(stages)} stages on {', '.join(devices)}"


def format_report(report: PackageReport) -> str:
    """The table for one package, a line for its tolerance and one per failure."""
    there = report.there
    title = (
        f"{report.package}: {report.kind} · {_stages(report.stages)} · "
        f"there {there.get('machine', '?')} onnxruntime {there.get('onnxruntime', '?')}"
    )
    if report.error is not None:
        return f"{title}\n  error: {report.error}"
    rows = [
        [
            r["output"],
            "x".join(map(str, r["shape"])),
            r["max_abs_diff"],
            r["range"],
            r["min_cosine"],
            r["mean_cosine"],
            f"{r['top1_agreement_%']:.1f}%" if "top1_agreement_%" in r else "-",
            r.get("here_batch_min_cosine", "-"),
        ]
        for r in report.rows
    ]
    headers = ["output", "shape", "max abs diff", "range", "min cos", "mean cos", "top-1 agree"]
    headers.append("batch min cos here")
    lines = [format_table(headers, rows, title=title)]
    t = report.tolerance
    limit = f"max abs <= {t.max_abs:g}" if t.max_abs is not None else f"min cos >= {t.min_cosine}"
    lines.append(f"tolerance ({report.kind}): {limit} ({t.reason})")
    lines += [f"FAIL {failure}" for failure in report.failures]
    if report.divergence is not None:
        lines.append(format_divergence(report.divergence))
    lines.append("within tolerance" if report.passed else "NOT within tolerance")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running sides and checking packages


class Side(Protocol):
    """A place a package runs: ``run`` writes the outputs for ``probe`` to ``out``."""

    name: str

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None: ...


class LocalSide:
    """A Python on this machine, in a fresh process (``python -m edgec.crosscheck run``)."""

    def __init__(self, name: str = "here", python: str = sys.executable):
        self.name, self.python = name, python

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        module = [self.python, "-m", "edgec.crosscheck"]
        argv = [*module, command, str(package_dir), str(probe), str(out)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SideError(f"{self.name}: {' '.join(argv)} failed: {_tail(result.stderr)}")


class SideError(EdgecError):
    """The package could not be run on one side (install, load or run failed there)."""

    exit_code = 9


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_package(
    package_dir: Path,
    workdir: Path,
    here: Side,
    there: Side,
    *,
    sentences: Sequence[str] = (),
    images: np.ndarray | None = None,
    label: str | None = None,
) -> PackageReport:
    """Make the probe (``PROBE_SIZES`` for the package's kind: the first sentences of
    ``sentences``), run it on both sides, compare: one ``PackageReport`` (an error on a side is
    recorded in it, not raised, so the other packages still get checked)."""
    label = label or package_dir.name
    kind, evidence = package_kind(package_dir)
    size = PROBE_SIZES[kind]
    workdir.mkdir(parents=True, exist_ok=True)
    probe, ours, theirs = workdir / "probe.npz", workdir / "here.npz", workdir / "there.npz"
    make_probe(
        package_dir,
        probe,
        sentences=list(sentences)[: size.sentences],
        images=images,
        rows=size.rows,
        length=size.length,
    )
    try:
        here.run(package_dir, probe, ours)
        there.run(package_dir, probe, theirs)
    except SideError as exc:
        return PackageReport(label, kind, TOLERANCES[kind], evidence, [], {}, {}, error=str(exc))
    variation = batch_variation(package_dir, probe) if kind == "int8" else {}
    return compare_package(label, kind, probe, ours, theirs, evidence, batch_min_cosine=variation)


def batch_variation(package_dir: Path, probe: Path) -> dict[str, float]:
    """On this machine: min cosine per row between each input run alone and run in the probe's
    batch (pooled as ``compare_package`` pools), per output. A graph with dynamic int8
    activations already moves this far when a request's batch changes (its quantization ranges
    span the batch): the yardstick for how far another machine moves it."""
    from edgec.runtimes import load_package
    from edgec.runtimes.manifest import EmbeddingPostprocessing

    inputs = _read(probe)
    feeds = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("feed:")}
    mask = feeds.get("attention_mask")
    rows = len(next(iter(feeds.values())))
    result: dict[str, float] = {}
    with load_package(package_dir) as runtime:
        batched = runtime.run(feeds)
        alone = [runtime.run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows)]
        for name, value in batched.items():
            single = np.concatenate([a[name] for a in alone])
            result[f"raw:{name}"] = float(
                row_cosines(masked_mean(value, mask), masked_mean(single, mask)).min()
            )
        post = runtime.manifest.postprocessing
        if "sentences" in inputs:
            texts = [str(t) for t in inputs["sentences"]]
            if isinstance(post, EmbeddingPostprocessing):
                together = runtime.embed(texts)
                apart = np.concatenate([runtime.embed([t]) for t in texts])
            else:
                together = runtime.classify(texts).probabilities
                apart = np.concatenate([runtime.classify([t]).probabilities for t in texts])
            result["post"] = float(row_cosines(together, apart).min())
    return result


def make_replay_probe(
    node_probe: str | os.PathLike[str], values: str | os.PathLike[str], out: str | os.PathLike[str]
) -> None:
    """The node probe's graph with every node cut loose: each input a node reads from another
    node becomes a graph input, fed with the value ``values`` (one side's ``run_nodes``) holds
    for it. Run on both sides, every operator then computes from the same inputs, so each
    node's difference is its own kernel's, not inherited from upstream. Uses onnx."""
    import onnx
    from onnx import helper

    probe = _read(node_probe)
    recorded = _read(values)
    model = onnx.load_from_string(probe["model"].tobytes())
    produced = {name for node in json.loads(str(probe["nodes"])) for name in node["outputs"]}
    feeds = {k: v for k, v in probe.items() if k.startswith("feed:")}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in produced:
                continue
            replayed = f"{name}::replay"
            node.input[index] = replayed
            if f"feed:{replayed}" not in feeds:
                value = recorded[f"node:{name}"]
                elem = helper.np_dtype_to_tensor_dtype(value.dtype)
                model.graph.input.append(helper.make_tensor_value_info(replayed, elem, value.shape))
                feeds[f"feed:{replayed}"] = value
    arrays = {
        "format": probe["format"],
        "model": np.frombuffer(model.SerializeToString(), dtype=np.uint8),
        "nodes": probe["nodes"],
        **feeds,
    }
    _save_npz(Path(out), arrays)


def replay_divergence(
    probe: str | os.PathLike[str], here: str | os.PathLike[str], there: str | os.PathLike[str]
) -> dict[str, Any]:
    """Per node of a replay probe: its outputs' max abs difference between the sides and that
    difference relative to the output's largest magnitude; per operator type: nodes, how many
    differ, the largest absolute and relative difference; the nodes that differ most."""
    nodes = json.loads(str(_read(probe)["nodes"]))
    ours, theirs = _read(here), _read(there)
    per_op: dict[str, dict[str, Any]] = {}
    worst = []
    for node in nodes:
        out_diff, relative, fraction = 0.0, 0.0, 0.0
        for name in node["outputs"]:
            a, b = ours[f"node:{name}"], theirs[f"node:{name}"]
            d, f = _difference(a, b)
            scale = float(np.abs(a.astype(np.float64)).max(initial=0.0))
            out_diff, fraction = max(out_diff, d), max(fraction, f)
            relative = max(relative, d / scale if scale > 0 else float(d > 0))
        stats = per_op.setdefault(
            node["op"], {"nodes": 0, "differ": 0, "max_abs": 0.0, "max_relative": 0.0}
        )
        stats["nodes"] += 1
        stats["differ"] += out_diff > 0
        stats["max_abs"] = max(stats["max_abs"], out_diff)
        stats["max_relative"] = max(stats["max_relative"], relative)
        if out_diff > 0:
            worst.append(
                {
                    "node": node["name"],
                    "op": node["op"],
                    "max_abs": out_diff,
                    "relative": relative,
                    "differing": fraction,
                }
            )
    worst.sort(key=lambda w: -w["relative"])
    return {"per_op": per_op, "worst": worst[:10], "nodes": len(nodes)}


def diagnose(
    package_dir: Path, workdir: Path, here: Side, there: Side, images: np.ndarray | None = None
) -> dict[str, Any]:
    """Where a single-stage package's outputs part between the two sides: ``chained`` (every
    node's outputs as the graph runs, ``node_divergence``) and ``replay`` (every node on this
    side's inputs, ``replay_divergence``: each operator's own difference)."""
    workdir.mkdir(parents=True, exist_ok=True)
    probe, ours, theirs = (workdir / f"nodes{s}.npz" for s in ("", "-here", "-there"))
    make_node_probe(package_dir, probe, images=images)
    here.run(package_dir, probe, ours, command="nodes")
    there.run(package_dir, probe, theirs, command="nodes")
    replay, replay_ours, replay_theirs = (
        workdir / f"replay{s}.npz" for s in ("", "-here", "-there")
    )
    make_replay_probe(probe, ours, replay)
    here.run(package_dir, replay, replay_ours, command="nodes")
    there.run(package_dir, replay, replay_theirs, command="nodes")
    return {
        "chained": node_divergence(probe, ours, theirs),
        "replay": replay_divergence(replay, replay_ours, replay_theirs),
    }


def format_divergence(divergence: dict[str, Any], first: int = 5) -> str:
    """The chained comparison's first origins (identical inputs, different outputs), then per
    operator type what the replay shows: nodes, how many differ on the same inputs, the largest
    absolute and relative difference; then the nodes that differ most."""
    chained, replay = divergence["chained"], divergence["replay"]
    lines = [f"per node ({chained['nodes']} nodes on the inputs; exposed, so unfused kernels):"]
    differ = sum(s["differ"] for s in chained["per_op"].values())
    if not differ:
        lines.append("  every node's outputs identical")
    for origin in chained["origins"][:first]:
        lines.append(
            f"  the outputs first part at {origin['node']} ({origin['op']}): max abs "
            f"{origin['max_abs']:.3g} on identical inputs; {differ} nodes differ from there on"
        )
    rows = [
        [op, s["nodes"], s["differ"], s["max_abs"], s["max_relative"]]
        for op, s in sorted(replay["per_op"].items(), key=lambda kv: -kv[1]["max_relative"])
        if s["differ"]
    ]
    if rows:
        headers = ["operator", "nodes", "differ", "max abs", "max relative"]
        lines.append(format_table(headers, rows, title="every node on the same inputs (replay):"))
        for w in replay["worst"][:first]:
            lines.append(
                f"  {w['node']} ({w['op']}): max abs {w['max_abs']:.3g}, relative "
                f"{w['relative']:.3g}, {100 * w['differing']:.2f}% of its elements"
            )
    elif differ:
        lines.append("every node on the same inputs (replay): identical")
    return "\n".join(lines)


def exit_code(reports: Sequence[PackageReport]) -> int:
    """0 when every package is within its tolerance; 1 when one is not; SideError's code when
    one could not run at all."""
    if any(r.error is not None for r in reports):
        return SideError.exit_code
    return 0 if all(r.passed for r in reports) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgec.crosscheck", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runs = {"run": run_probe, "batches": run_batches, "nodes": run_nodes}
    for name, what in (
        ("run", "a probe"),
        ("batches", "b{i}:NAME batches"),
        ("nodes", "a node probe"),
    ):
        command = commands.add_parser(name, help=f"run PKG on {what} here, write OUT (.npz)")
        command.add_argument("package")
        command.add_argument("probe")
        command.add_argument("out")
    args = parser.parse_args(argv)
    try:
        meta = runs[args.command](args.package, args.probe, args.out)
    except EdgecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
