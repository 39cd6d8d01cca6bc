"""``profile-device``: measure this machine through onnxruntime, as a device profile.

Times four weightless graphs shipped with edgec (``runtimes/kernels``): an fp32 MatMul and an
int8 MatMulInteger at four transformer-like sizes (GFLOP/s, GOP/s, per size), a transformer block's elementwise
operators (Erf, Softmax, LayerNormalization, Add) on 786 KB tensors (bytes touched per second) and a chain of tiny Adds (fixed cost per operator, µs).
numpy and onnxruntime only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgec.runtimes.devices import DeviceProfile

KERNELS = Path(__file__).parent / "kernels"
MATMUL_SHAPE = (128, 384, 1536)  # (M, K, N): the headline figure, an FFN at sequence 128
# Matmul sizes for the speed curve, (M, K, N): attention scores up to a BERT-base FFN.
CURVE_SHAPES = ((128, 32, 128), (128, 384, 384), (128, 384, 1536), (512, 768, 3072))
ELEMENTWISE_SHAPE = (128, 1536)  # an FFN activation at sequence 128 (786 KB)
ELEMENTWISE_TOUCHED = 12  # tensors of that size read or written by the graph's 5 operators
CHAIN = 64


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``call`` over ``repeats`` runs, after ``warmup`` runs.
    Also what the benchmarks time with."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _session(name: str, threads: int, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(KERNELS / f"{name}.onnx"), options, providers=providers)


def available_memory_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux), else physical memory, in 1e6 bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6


def profile_device(
    name: str,
    *,
    threads: int = 1,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    repeats: int = 20,
) -> DeviceProfile:
    """Measure this machine with ``threads`` onnxruntime threads; returns its profile."""
    rng = np.random.default_rng(0)
    plist = list(providers)
    fp32, int8 = _session("matmul_fp32", threads, plist), _session("matmul_int8", threads, plist)
    curves: dict[str, list[tuple[float, float]]] = {"fp32": [], "int8": []}
    for m, k, n in CURVE_SHAPES:
        flops = 2.0 * m * k * n
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        qa = rng.integers(0, 255, (m, k), dtype=np.uint8)
        qb = rng.integers(-127, 127, (k, n), dtype=np.int8)
        fp32_ms = median_ms(partial(fp32.run, None, {"a": a, "b": b}), repeats)
        int8_ms = median_ms(partial(int8.run, None, {"a": qa, "b": qb}), repeats)
        curves["fp32"].append((flops / 1e6, round(flops / (fp32_ms * 1e-3) / 1e9, 3)))
        curves["int8"].append((flops / 1e6, round(flops / (int8_ms * 1e-3) / 1e9, 3)))
    headline = CURVE_SHAPES.index(MATMUL_SHAPE)
    mix = _session("elementwise", threads, plist)
    x = rng.standard_normal(ELEMENTWISE_SHAPE, np.float32)
    gain, bias = np.ones(x.shape[1], np.float32), np.zeros(x.shape[1], np.float32)
    mix_ms = median_ms(lambda: mix.run(None, {"x": x, "g": gain, "b": bias}), repeats)
    chain = _session("overhead", threads, plist)
    small = np.ones(16, np.float32)
    chain_ms = median_ms(lambda: chain.run(None, {"x": small, "y": small}), repeats * 5)
    with ThreadPoolExecutor(max_workers=1) as pool:  # as the executor hands a stage its work
        handed_ms = median_ms(
            lambda: pool.submit(chain.run, None, {"x": small, "y": small}).result(), repeats * 5
        )
    return DeviceProfile(
        name=name,
        providers=tuple(providers),
        threads=threads,
        memory_mb=round(available_memory_mb(), 1),
        gflops_fp32=curves["fp32"][headline][1],
        gops_int8=curves["int8"][headline][1],
        memory_gbps=round(ELEMENTWISE_TOUCHED * x.nbytes / (mix_ms * 1e-3) / 1e9, 3),
        op_overhead_us=round(chain_ms * 1e3 / CHAIN, 3),
        stage_overhead_us=round(max(handed_ms - chain_ms, 0.0) * 1e3 + chain_ms * 1e3 / CHAIN, 3),
        matmul_fp32_curve=tuple(curves["fp32"]),
        matmul_int8_curve=tuple(curves["int8"]),
    )
