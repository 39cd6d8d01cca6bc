"""Why a package runs as fast as it does: which operators stayed float and why, the CPU's int8
instructions and what int8 can gain on them, and where the time goes by operator type.

Torch-free (a device runs it): the package's manifest and ONNX graphs, ``/proc/cpuinfo`` and
onnxruntime's profiler.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from edgec.runtimes.package import Package, read_package

# Instruction-set features of int8 matmul kernels, best first, as /proc/cpuinfo names them
# (x86 "flags", ARM "Features"), with the int8 over fp32 gain of onnxruntime's MLAS kernels one
# can expect at best on a compute-bound matmul: multiply-accumulates per instruction per lane,
# int8 against fp32 FMA. Measured here (AVX-512 VNNI machine, 2 threads, K=384, N=1536): fp32
# MatMul 36-60 GFLOP/s, MatMulInteger 95-207 GOP/s (DESIGN.md §5); `edgec profile-device`
# measures a device's own figures (gflops_fp32, gops_int8).
INT8_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("amx_int8", "AMX-INT8 tiles", "up to 8x fp32 on large matmuls (tile kernels)"),
    (
        "avx512_vnni",
        "AVX-512 VNNI (vpdpbusd)",
        "up to 4x fp32 in theory; 2.6-3.5x measured on this project's test machine",
    ),
    ("avx_vnni", "AVX-VNNI (256-bit vpdpbusd)", "up to 4x fp32 in theory, about 2-3x"),
    ("avx512bw", "AVX-512 BW without VNNI (vpmaddubsw)", "about 2x fp32"),
    ("avx2", "AVX2 (vpmaddubsw, no VNNI)", "about 1.5-2x fp32 (u8s8 saturating path)"),
    ("i8mm", "ARM int8 matrix multiply (smmla)", "up to 8x fp32 in theory, 3-4x typical"),
    ("asimddp", "ARM dot product (sdot/udot)", "up to 4x fp32 in theory, 2-3x typical"),
    ("asimd", "ARM NEON without dot product", "about 1-1.5x fp32: int8 rarely pays"),
)
INT8_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "DynamicQuantizeMatMul",
     "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear", "ConvInteger", "QLinearConv"}
)  # fmt: skip
PROFILE_RUNS = 10
PROFILE_WARMUP = 3


@dataclass(frozen=True)
class CpuInt8:
    """The CPU's int8 matmul instructions: the best found, all int8-relevant flags, the gain."""

    best: str | None
    features: list[str]
    expected_gain: str
    model_name: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cpu_int8(cpuinfo: str | None = None) -> CpuInt8:
    """Read ``/proc/cpuinfo`` (or the text given) for int8 matmul instructions."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model_name = "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key in ("model name", "cpu model", "hardware") and model_name == "unknown":
            model_name = value.strip()
    found = [(flag, name, gain) for flag, name, gain in INT8_FEATURES if flag in flags]
    if not found:
        return CpuInt8(
            None, [], "no int8 dot-product instructions found: expect no gain", model_name
        )
    return CpuInt8(found[0][1], [f for f, _, _ in found], found[0][2], model_name)


@dataclass(frozen=True)
class FloatOperator:
    """An operator type that computes in float, how many there are, and why."""

    op_type: str
    count: int
    why: str


@dataclass
class Diagnosis:
    """Everything ``diagnose`` finds about one package."""

    cpu: CpuInt8
    operators: dict[str, int]  # op type -> count, over every stage
    int8_operators: int
    float_operators: list[FloatOperator]
    float_linears: list[dict[str, Any]]  # Linears the compressor kept float, with their reason
    ms_by_op: dict[str, float] = field(default_factory=dict)  # profiled ms per run, b1 x 128
    ms_total: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"] = self.cpu.to_json()
        return data


def _why_float(op_type: str, count: int, float_linears: int) -> str:
    if op_type == "FusedMatMul":
        return "attention scores (Q x K^T, its scale fused): two activations, never int8"
    if op_type == "MatMul":
        return (
            f"{max(0, count - float_linears)} multiply two activations (attention scores and "
            "context), which dynamic int8 never quantizes; "
            f"{min(count, float_linears)} are Linears the compressor kept float (below)"
        )
    reasons = {
        "Gemm": "a weight matmul the recipe left in float",
        "Softmax": "float by design in onnxruntime's int8 path (exponentials need range)",
        "LayerNormalization": "float by design: the statistics need precision",
        "SkipLayerNormalization": "float by design (fused residual add and LayerNorm)",
        "SkipSimplifiedLayerNormalization": "float by design (fused residual add and norm)",
        "Gelu": "float by design (a transcendental)",
        "BiasGelu": "float by design (a transcendental, fused with its bias)",
        "FastGelu": "float by design (a transcendental)",
        "Erf": "float by design (a transcendental)",
        "Gather": "embedding rows are looked up, then dequantized: the lookup does no math",
        "GatherBlockQuantized": "packed embedding rows, dequantized after the lookup",
        "Conv": "the patch embedding: the recipes quantize the blocks' Linears only",
        "BitShift": "integer ops that unpack low-bit codes of packed embedding rows",
        "BitwiseAnd": "integer ops that unpack low-bit codes of packed embedding rows",
        "Attention": "onnxruntime's fused attention runs in float",
        "MultiHeadAttention": "onnxruntime's fused attention runs in float",
    }
    return reasons.get(op_type, "elementwise or shape operator: float, memory-bound, cheap")


def _float_linears(package: Package) -> list[dict[str, Any]]:
    """Linears the compressor kept float, with the reason its report gives."""
    report = package.manifest.report or {}
    compression = report.get("compression") or {}
    steps = compression.get("steps") or []
    rows = []
    for step in steps:
        details = step.get("details") or {}
        sensitivity = details.get("sensitivity") or {}
        ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
        for name in details.get("float_fallback") or []:
            why = "kept float by the recipe (exclude) or its int8 fallback"
            if name in sensitivity:
                why = (
                    f"kept float: local int8 error {sensitivity[name]:.2e}, rank "
                    f"{ranked.index(name) + 1} of {len(ranked)} (most sensitive first)"
                )
            rows.append({"linear": name, "why": why})
    if not any("quantize" in (s.get("step") or "") for s in steps):
        rows.append(
            {"linear": "(all)", "why": "the recipe has no int8 step: every Linear is float"}
        )
    return rows


def _feeds(session: ort.InferenceSession, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """Inputs of ``session`` at ``batch`` x ``sequence``: token ids and masks of ones, random
    floats (images)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = [
            d if isinstance(d, int) else (batch if axis == 0 else sequence)
            for axis, d in enumerate(arg.shape)
        ]
        if "int" in arg.type:
            feeds[arg.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def kernel_times(
    events: list[dict[str, Any]], warmup: int, runs: int
) -> tuple[Counter[str], dict[str, set[str]]]:
    """From onnxruntime's profile of ``warmup + runs`` runs of one session: kernel ms per run by
    operator type, the warm-up runs left out (they are profiled too), and each operator type's
    kernel event names (its nodes as run, after onnxruntime's fusions)."""
    model_runs = sorted(
        (e for e in events if e.get("name") == "model_run"), key=lambda e: int(e["ts"])
    )
    warm = model_runs[warmup - 1]
    after = int(warm["ts"]) + int(warm["dur"])
    by_op: Counter[str] = Counter()
    nodes: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        nodes.setdefault(op, set()).add(event["name"])
        if int(event["ts"]) >= after:
            by_op[op] += event["dur"] / 1000 / runs
    return by_op, nodes


def profile_ops(
    package: Package, runs: int = PROFILE_RUNS, threads: int = 0
) -> tuple[float, dict[str, float], dict[str, int]]:
    """onnxruntime's profiler over ``runs`` requests of b1 x 128 after warm-up, every stage:
    (kernel ms per run, ms per run by operator type, nodes by operator type as run, i.e. after
    onnxruntime's fusions). Stages that need another stage's outputs are not profiled."""
    from edgec.runtimes.backends import create_session

    by_op: Counter[str] = Counter()
    nodes: dict[str, set[str]] = {}
    for stage in package.manifest.stages:
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            session = create_session(
                package.path(stage.file),
                options,
                ["CPUExecutionProvider"],
                weights_file=package.path(stage.weights) if stage.weights else None,
                coded=stage.coded,
            )
            inputs = {a.name for a in session.get_inputs()}
            if not inputs <= {t.name for t in package.manifest.inputs}:
                continue  # a later stage of a split: its inputs come from the stage before
            feeds = _feeds(session, 1, 128)
            for _ in range(PROFILE_WARMUP + runs):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        stage_ms, stage_nodes = kernel_times(events, PROFILE_WARMUP, runs)
        by_op.update(stage_ms)
        for op, names in stage_nodes.items():
            nodes.setdefault(op, set()).update(f"{stage.name}/{n}" for n in names)
    counts = {op: len(names) for op, names in nodes.items()}
    return float(sum(by_op.values())), {k: round(v, 4) for k, v in by_op.most_common()}, counts


def diagnose(path: str | Path, runs: int = PROFILE_RUNS) -> Diagnosis:
    """The diagnosis of the package at ``path`` (verified first)."""
    package = read_package(Path(path))
    total, by_op, counts = profile_ops(package, runs)
    float_linears = _float_linears(package)
    named = [r for r in float_linears if r["linear"] != "(all)"]
    floats = [
        FloatOperator(op, n, _why_float(op, n, len(named)))
        for op, n in sorted(counts.items(), key=lambda kv: -by_op.get(kv[0], 0.0))
        if op not in INT8_OPS
    ]
    return Diagnosis(
        cpu=cpu_int8(),
        operators=counts,
        int8_operators=sum(n for op, n in counts.items() if op in INT8_OPS),
        float_operators=floats,
        float_linears=float_linears,
        ms_by_op=by_op,
        ms_total=round(total, 3),
    )
