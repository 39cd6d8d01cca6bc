"""Compression benchmark: edgec's recipes against the peers, on minilm, in one run.

    python benchmarks/compression.py --out benchmarks/results/compression.json

2 threads everywhere. For each variant: bytes on disk (the model: ONNX file, plus the weights
file of a package that has one; package = all its files), median latency at batch 1 x 128 and
batch 32 x 128 tokens (warm-up, then repeats), fidelity against torch fp32 on the 200 held-out
bundled sentences and on 200 Wikipedia sentences of another domain (cosine of the pooled,
normalized embedding: min and mean), and memory: a fresh process per variant loads it (edgec
rows: ``edgec.load_package``) and runs each shape, reporting peak and resident bytes
(``edgec.runtimes.memory``), beside the bare interpreter with numpy and onnxruntime. Each edgec
row lists the peers that dominate it on size, peak RSS, min cosine and both speeds at once.
Also tiny-vit-digits test accuracy, fp32 against ``balanced``. Writes the JSON and a markdown
table beside it (``.md``).

Timing isolates the variants: each onnxruntime session is built just before it is timed and
released after, with a pause after every variant (torch's included), so no other runtime's
worker threads (onnxruntime's and OpenMP's spin after a run) compete for the 2 cores. ``--rounds`` passes go over
all variants in turn; each variant keeps its fastest round's median, which damps a noisy
neighbour on a shared machine without favouring any variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgec.runtimes import memory
from edgec.runtimes.profiler import median_ms

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2
SHAPES = [(1, 128), (32, 128)]
RECIPES = ["int8", "balanced", "smallest"]
PAUSE_S = 1.0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = mask[..., None].astype(np.float32)
    pooled = (hidden * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _cosines(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    cos = (reference * actual).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(actual, axis=1)
    )
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


def _timing_feeds(names: list[str], batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {
        "input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return {n: feeds[n] for n in names}


Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class Variant:
    """A way of running minilm: a name, bytes on disk, and ``make`` building a batch runner
    (feeds -> hidden states); each measurement builds its own runner and drops it after."""

    def __init__(
        self,
        name: str,
        size: int,
        make: Callable[[], Runner],
        package: int | None = None,
        note: str = "",
        memory_target: list[str] | None = None,
    ):
        self.name, self.size, self.make, self.package, self.note = name, size, make, package, note
        # what a fresh process loads for the memory figures: a package or ONNX path, or torch
        self.memory_target = memory_target


def _ort_variant(
    name: str,
    path: Path,
    package: int | None = None,
    note: str = "",
    load: Path | None = None,
    size: int | None = None,
) -> Variant:
    """A variant run by onnxruntime on ``path``; or, with ``load``, the package a device loads
    (``size``: its model files)."""

    def make() -> Runner:
        if load is not None:
            from edgec.runtimes import load_package

            runtime = load_package(load)
            return lambda feeds: runtime.run(feeds)[runtime.manifest.outputs[0].name]
        session = _session(path)
        inputs = [i.name for i in session.get_inputs()]

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return session.run(None, {n: feeds[n] for n in inputs})[0]

        return run

    size = path.stat().st_size if size is None else size
    return Variant(name, size, make, package, note, [str(load or path)])


def _torch_variant(
    name: str, model: Any, size: int, note: str = "", quantized: bool = False
) -> Variant:
    import torch

    def make() -> Runner:
        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                args = {k: torch.from_numpy(v) for k, v in feeds.items()}
                return model(**args)["last_hidden_state"].numpy()

        return run

    return Variant(name, size, make, None, note, ["torch", "int8" if quantized else "fp32"])


def _package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _model_bytes(path: Path) -> int:
    """Bytes of a package's model files: each stage's ONNX file and weights file."""
    from edgec.runtimes import read_package

    stages = read_package(path).manifest.stages
    names = {n for s in stages for n in (s.file, s.weights) if n is not None}
    return sum((path / n).stat().st_size for n in names)


def build_variants(work: Path, reuse: bool, log: Callable[[str], None]) -> list[Variant]:
    import io

    import torch
    from edgec.exporters.fusion import _optimize
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import edgec

    torch.set_num_threads(THREADS)
    model, _ = edgec.load_model("minilm")
    fp32 = work / "fp32.pkg"
    if not (reuse and fp32.is_dir()):
        log("exporting fp32")
        edgec.export("minilm", fp32)
    fp32_onnx = fp32 / "model.onnx"
    fused = work / "ort-fp32-optimized.onnx"
    if not (reuse and fused.is_file()):
        log("onnxruntime transformer optimizer")
        import onnx

        onnx.save_model(_optimize(fp32_onnx, "bert", attention=True), str(fused))
    for per_channel, label in ((False, "defaults"), (True, "per-channel")):
        out = work / f"ort-dynamic-{label}.onnx"
        if not (reuse and out.is_file()):
            log(f"onnxruntime quantize_dynamic ({label})")
            quantize_dynamic(fused, out, per_channel=per_channel, weight_type=QuantType.QInt8)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch_int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    buffer8 = io.BytesIO()
    torch.save(torch_int8.state_dict(), buffer8)
    variants = [
        _torch_variant("torch fp32 (eager)", model, buffer.getbuffer().nbytes, "state_dict bytes"),
        _ort_variant("onnxruntime fp32", fp32_onnx),
        _ort_variant("onnxruntime fp32 + transformer optimizer", fused),
        _ort_variant("onnxruntime quantize_dynamic (defaults)", work / "ort-dynamic-defaults.onnx"),
        _ort_variant(
            "onnxruntime quantize_dynamic (per-channel)", work / "ort-dynamic-per-channel.onnx"
        ),
        _torch_variant(
            "torch dynamic int8",
            torch_int8,
            buffer8.getbuffer().nbytes,
            "state_dict bytes",
            quantized=True,
        ),
    ]
    for recipe in RECIPES:
        ckpt, pkg = work / f"{recipe}.ckpt", work / f"{recipe}.pkg"
        if not (reuse and (ckpt / "checkpoint.json").is_file()):
            log(f"edgec compress minilm --recipe {recipe}")
            try:
                edgec.compress("minilm", recipe, ckpt)
            except edgec.FidelityError as exc:  # the checkpoint is written; report what it reached
                log(f"  {exc}")
        if not (reuse and pkg.is_dir()):
            log(f"edgec export {recipe}")
            edgec.export(ckpt, pkg)
        variants.append(
            _ort_variant(
                f"edgec {recipe}",
                pkg / "model.onnx",
                _package_bytes(pkg),
                load=pkg,
                size=_model_bytes(pkg),
            )
        )
    return variants


def _memory(variant: Variant) -> memory.MemoryFigures:
    """The variant's memory figures from a fresh process (torch rows: this script's probe)."""
    assert variant.memory_target is not None
    if variant.memory_target[0] != "torch":
        return memory.measure(variant.memory_target[0], SHAPES, THREADS)
    command = [sys.executable, __file__, "--probe-torch", variant.memory_target[1]]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return memory.MemoryFigures(
        data["target"], data["baseline"], data["load_peak"], data["after_load"], data["run_peak"]
    )


def probe_torch(kind: str) -> None:
    """In a fresh process: load minilm in torch (``fp32`` or dynamic ``int8``), run each shape,
    print the memory figures as JSON (what ``edgec.runtimes.memory`` reports for packages)."""
    import torch

    before = memory.read_status()["VmRSS"]
    memory.reset_peak()
    import edgec

    torch.set_num_threads(THREADS)
    model, spec = edgec.load_model("minilm")
    if kind == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    run = _torch_variant(kind, model, 0).make()
    status = memory.read_status()
    figures = memory.MemoryFigures(f"torch {kind}", before, status["VmHWM"], status["VmRSS"])
    for batch, seq in SHAPES:
        feeds = _timing_feeds(spec.input_names, batch, seq, spec.vocab_size or 30000)
        memory.reset_peak()
        run(feeds)
        figures.run_peak[f"{batch}x{seq}"] = memory.read_status()["VmHWM"]
    print(json.dumps(figures.to_json()))


def measure(
    variants: list[Variant], repeats: int, rounds: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    from edgec.compressor.calibration import load_data
    from edgec.models import load_model

    _, spec = load_model("minilm")
    data = load_data(spec)
    # held-out bundled sentences (the calibration domain), and Wikipedia sentences (another)
    sets = {"": data.evaluation, "off_": data.off_domain}
    references: dict[str, np.ndarray] = {}
    rows = []
    fp32_bytes = next(v.size for v in variants if v.name == "onnxruntime fp32")
    for variant in variants:
        log(f"fidelity of {variant.name}")
        run = variant.make()
        row: dict[str, Any] = {
            "variant": variant.name,
            "bytes": variant.size,
            "package_bytes": variant.package,
            "size_vs_fp32_onnx": variant.size / fp32_bytes,
        }
        for prefix, held in sets.items():
            assert held is not None, "minilm's bundled sample has an off-domain set"
            pooled = np.concatenate([_pool(run(b), b["attention_mask"]) for b in held.batches])
            reference = references.setdefault(prefix, pooled)  # torch fp32 comes first
            row.update({prefix + k: v for k, v in _cosines(reference, pooled).items()})
        del run
        rows.append(row)
    baseline = memory.baseline()
    for variant, row in zip(variants, rows, strict=True):
        log(f"memory of {variant.name} (a fresh process)")
        figures = _memory(variant)
        row["memory"] = figures.to_json()
        row["memory"]["bare_onnxruntime_baseline"] = baseline
        row["peak_rss"] = max(figures.load_peak, figures.run_peak["1x128"])
    for index in range(rounds):
        for variant, row in zip(variants, rows, strict=True):
            log(f"timing {variant.name} (round {index + 1}/{rounds})")
            run = variant.make()
            for batch, seq in SHAPES:
                feeds = _timing_feeds(spec.input_names, batch, seq, spec.vocab_size or 30000)
                count = repeats * (3 if batch == 1 else 1)
                key = f"ms_b{batch}x{seq}"
                median = median_ms(functools.partial(run, feeds), count, warmup=3)
                row.setdefault(f"{key}_rounds", []).append(median)
                row[key] = min(row[f"{key}_rounds"])
            del run
            time.sleep(PAUSE_S)  # let the idle runtime's threads stop spinning
    base = next(r for r in rows if r["variant"] == "onnxruntime fp32 + transformer optimizer")
    for row in rows:
        for batch, seq in SHAPES:
            key = f"ms_b{batch}x{seq}"
            row[f"speedup_b{batch}x{seq}"] = base[key] / row[key]
    return rows


def digits_accuracy(work: Path, reuse: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """tiny-vit-digits test accuracy: fp32 package against the ``balanced`` package."""
    from edgec.models.data import digits
    from edgec.runtimes import load_package

    import edgec

    try:
        edgec.load_model("tiny-vit-digits")
    except edgec.EdgecError as exc:
        return {"skipped": str(exc)}
    images, labels = digits("test")
    result: dict[str, Any] = {"test_images": len(labels)}
    for name, source in (("fp32", "tiny-vit-digits"), ("balanced", None)):
        pkg = work / f"digits-{name}.pkg"
        if source is None:
            ckpt = work / "digits-balanced.ckpt"
            if not (reuse and ckpt.is_dir()):
                log("edgec compress tiny-vit-digits --recipe balanced")
                try:
                    edgec.compress("tiny-vit-digits", "balanced", ckpt)
                except edgec.FidelityError as exc:
                    log(f"  {exc}")
            source = str(ckpt)
        if not (reuse and pkg.is_dir()):
            edgec.export(source, pkg)
        runtime = load_package(pkg)
        predicted = runtime.classify(images).labels
        names = runtime.manifest.postprocessing.labels  # type: ignore[union-attr]
        accuracy = float(
            np.mean([names.index(p) == y for p, y in zip(predicted, labels, strict=True)])
        )
        result[f"{name}_accuracy_%"] = accuracy * 100
        result[f"{name}_bytes"] = (pkg / "model.onnx").stat().st_size
    return result


def _megabytes(size: int | None) -> str:
    return "–" if size is None else f"{size / 1e6:.2f}"


AXES = ("size", "peak RSS", "min cosine", "speed b1", "speed b32")


def _axes(row: dict[str, Any]) -> tuple[float, ...]:
    """The five figures a device buyer compares, each oriented so that larger is better."""
    return (
        -row["bytes"],
        -row["peak_rss"],
        min(row["cos_min"], row["off_cos_min"]),
        row["speedup_b1x128"],
        row["speedup_b32x128"],
    )


def dominated_by(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[str]:
    """The peer rows at least as good as ``row`` on all five axes and better on one."""
    mine = _axes(row)
    found = []
    for other in rows:
        if other["variant"].startswith("edgec"):
            continue
        theirs = _axes(other)
        if all(t >= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
            found.append(other["variant"])
    return found


def markdown(rows: list[dict[str, Any]], digits_result: dict[str, Any]) -> str:
    head = (
        "| variant | model MB | vs fp32 ONNX | peak RSS MB (load, b1×128) | above baseline MB "
        "| RSS after load MB | peak RSS b32×128 MB | cos min / mean, held-out | "
        "cos min / mean, off-domain | ms b1×128 | ms b32×128 | speed-up b1 | speed-up b32 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        mem = r["memory"]
        lines.append(
            f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | 1/{1 / r['size_vs_fp32_onnx']:.1f} | "
            f"{r['peak_rss'] / 1e6:.1f} | "
            f"{(r['peak_rss'] - mem['bare_onnxruntime_baseline']) / 1e6:.1f} | "
            f"{mem['after_load'] / 1e6:.1f} | {mem['run_peak']['32x128'] / 1e6:.1f} | "
            f"{r['cos_min']:.4f} / {r['cos_mean']:.4f} | "
            f"{r['off_cos_min']:.4f} / {r['off_cos_mean']:.4f} | "
            f"{r['ms_b1x128']:.1f} | {r['ms_b32x128']:.0f} | "
            f"{r['speedup_b1x128']:.2f}× | {r['speedup_b32x128']:.2f}× |"
        )
    text = head + "\n".join(lines) + "\n"
    baseline = rows[0]["memory"]["bare_onnxruntime_baseline"]
    text += (
        "\nSpeed-ups are against onnxruntime fp32 with its transformer optimizer. Memory: a fresh "
        "process per row loads the model and runs it once per shape (`VmHWM` from "
        f"/proc/self/status); the bare interpreter with numpy and onnxruntime is {baseline / 1e6:.1f} MB.\n"
    )
    text += "\nDominance on (" + ", ".join(AXES) + "):\n\n"
    for r in rows:
        if r["variant"].startswith("edgec"):
            peers = r["dominated_by"]
            text += (
                f"- {r['variant']}: "
                + ("dominated by " + ", ".join(peers) if peers else "not dominated by any peer")
                + "\n"
            )
    if "skipped" in digits_result:
        text += f"\ntiny-vit-digits: skipped ({digits_result['skipped']})\n"
    else:
        text += (
            f"\ntiny-vit-digits test accuracy ({digits_result['test_images']} images): fp32 "
            f"{digits_result['fp32_accuracy_%']:.2f}%, balanced {digits_result['balanced_accuracy_%']:.2f}%\n"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression.json"))
    parser.add_argument(
        "--work", type=Path, default=Path("build/bench"), help="Where artifacts go."
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=2, help="Timing passes; each variant keeps its best."
    )
    parser.add_argument("--reuse", action="store_true", help="Reuse artifacts already in --work.")
    parser.add_argument("--probe-torch", choices=["fp32", "int8"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_torch:  # a child process of the memory measurement
        probe_torch(args.probe_torch)
        return

    def log(message: str) -> None:
        print(f"• {message}", file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    variants = build_variants(args.work, args.reuse, log)
    rows = measure(variants, args.repeats, args.rounds, log)
    for row in rows:
        if row["variant"].startswith("edgec"):
            row["dominated_by"] = dominated_by(rows, row)
    digits_result = digits_accuracy(args.work, args.reuse, log)
    import onnxruntime
    import torch

    result = {
        "command": "python benchmarks/compression.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": THREADS,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
        },
        "fidelity_data": (
            "cosine of pooled embeddings vs torch fp32 on the 200 held-out bundled sentences "
            "(cos_*) and on 200 Wikipedia sentences from another domain (off_cos_*)"
        ),
        "rows": rows,
        "tiny_vit_digits": digits_result,
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, digits_result))
    print(markdown(rows, digits_result))


if __name__ == "__main__":
    main()
