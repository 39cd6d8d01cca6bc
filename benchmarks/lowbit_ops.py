"""Which in-memory form should low-bit Linears take? onnxruntime's kernels, measured.

    python benchmarks/lowbit_ops.py --out benchmarks/results/lowbit_ops.json

One minilm FFN-sized weight (K=384, N=1536, 4-bit on disk in every case), run as:

- ``fp32 MatMul``: decoded to float (what folding a decode subgraph gives);
- ``int8 DynamicQuantizeMatMul``: int8 in the ONNX file (what ``quantize_dynamic`` writes);
- ``int8, decoded at load (edgec)``: int8 supplied by the runtime as external initializers, as
  edgec's runtime does after decoding a package's 4-bit codes (the decode's own cost aside);
- ``MatMulNBits acc0`` / ``acc4``: onnxruntime's 4-bit kernel, block 32, float or int8 compute.

For each: median ms at M=128 and M=4096 rows (batch 1 and 32 of 128 tokens), and the resident
bytes the session adds in a fresh process (``VmRSS`` after load, peak ``VmHWM`` after a run),
24 copies of the weight so the figure stands out of the noise. 2 threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from edgec.runtimes.lowbit import DECODED_LOCATION, CodedWeight, decoded_layout

K, N, BLOCK, COPIES, THREADS = 384, 1536, 32, 24, 2
VARIANTS = (
    "fp32 MatMul",
    "int8 DynamicQuantizeMatMul",
    "int8, decoded at load (edgec)",
    "MatMulNBits acc0",
    "MatMulNBits acc4",
)
EXTERNAL = "int8, decoded at load (edgec)"  # int8 weights supplied by the runtime, not the file


def _coded(copies: int) -> list[CodedWeight]:
    return [CodedWeight(name=f"q{i}", shape=(K, N), dtype="int8", bits=4) for i in range(copies)]


def _int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    return np.round(w / scale).astype(np.int8), scale


def _weight(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((K, N)) * 0.05).astype(np.float32)


def _model(variant: str, copies: int) -> bytes:
    """A chain of ``copies`` layers y = x @ W_i (each W_i its own weight) in ``variant``'s form."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i in range(copies):
        w, y = _weight(i), f"y{i}"
        if variant == "fp32 MatMul":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        elif variant in ("int8 DynamicQuantizeMatMul", EXTERNAL):
            q, scale = _int8(w)
            weight = numpy_helper.from_array(q, f"q{i}")
            if variant == EXTERNAL:  # declared external: the runtime supplies it decoded
                weight.ClearField("raw_data")
                weight.data_location = TensorProto.EXTERNAL
                offset = decoded_layout(_coded(copies))[0][i]
                for key, value in (
                    ("location", DECODED_LOCATION),
                    ("offset", str(offset)),
                    ("length", str(q.nbytes)),
                ):
                    entry = weight.external_data.add()
                    entry.key, entry.value = key, value
            inits += [weight, numpy_helper.from_array(scale, f"s{i}")]
            nodes.append(
                helper.make_node(
                    "DynamicQuantizeMatMul", [x, f"q{i}", f"s{i}"], [y], domain="com.microsoft"
                )
            )
        else:
            blocks = w.T.reshape(N, K // BLOCK, BLOCK)
            lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
            scale = np.maximum(hi - lo, 1e-8) / 15
            zero = np.clip(np.round(-lo / scale), 0, 15)
            q = np.clip(np.round(blocks / scale + zero), 0, 15).astype(np.uint8)
            packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            zq = zero.reshape(N, K // BLOCK).astype(np.uint8)
            zpacked = (zq[:, 0::2] | (zq[:, 1::2] << 4)).reshape(-1)
            inits += [
                numpy_helper.from_array(packed, f"b{i}"),
                numpy_helper.from_array(scale.reshape(-1).astype(np.float32), f"s{i}"),
                numpy_helper.from_array(zpacked, f"z{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, f"b{i}", f"s{i}", f"z{i}"],
                    [y],
                    domain="com.microsoft",
                    K=K,
                    N=N,
                    bits=4,
                    block_size=BLOCK,
                    accuracy_level=4 if variant.endswith("acc4") else 0,
                )
            )
        # back to K columns for the next layer: keep the first K outputs
        nodes.append(helper.make_node("Slice", [y, "zero", "k", "one"], [f"x{i}"]))
        x = f"x{i}"
    inits += [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([K], np.int64), "k"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", K])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _session(model: bytes, variant: str, copies: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    if variant != EXTERNAL:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    # what edgec's runtime does after decoding: one buffer, handed over in memory, then dropped
    offsets, total = decoded_layout(_coded(copies))
    buffer = np.zeros(total, np.uint8)
    rng = np.random.default_rng(0)
    for i, offset in enumerate(offsets):
        q = _int8(_weight(i))[0] if copies == 1 else rng.integers(-127, 128, (K, N), np.int8)
        buffer[offset : offset + q.nbytes] = q.reshape(-1).view(np.uint8)
    options.add_external_initializers_from_files_in_memory(
        [DECODED_LOCATION], [buffer], [buffer.nbytes]
    )
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def one(variant: str, path: Path) -> dict[str, Any]:
    """In a fresh process: the session's resident bytes over ``COPIES`` weights, per weight."""
    from edgec.runtimes.memory import read_status, reset_peak

    model = path.read_bytes()
    before = read_status()["VmRSS"]
    reset_peak()
    session = _session(model, variant, COPIES)
    del model
    after = read_status()
    session.run(None, {"x": np.ones((128, K), np.float32)})
    ran = read_status()
    return {
        "variant": variant,
        "after_load_per_weight": (after["VmRSS"] - before) / COPIES,
        "peak_per_weight": (ran["VmHWM"] - before) / COPIES,
    }


def timing(variant: str, repeats: int) -> dict[str, float]:
    from edgec.runtimes.profiler import median_ms

    session = _session(_model(variant, 1), variant, 1)
    figures = {}
    for m in (128, 4096):
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        figures[f"ms_m{m}"] = median_ms(
            lambda x=x: session.run(None, {"x": x}), repeats if m == 128 else repeats // 4, 3
        )
        figures[f"gflops_m{m}"] = 2 * m * K * N / figures[f"ms_m{m}"] / 1e6
    reference = np.ones((4, K), np.float32) @ _weight(0)
    got = session.run(None, {"x": np.ones((4, K), np.float32)})[0]
    figures["max_rel_error"] = float(np.abs(got - reference[:, :K]).max() / np.abs(reference).max())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowbit_ops.json"))
    parser.add_argument("--work", type=Path, default=Path("build/lowbit_ops"))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process of the memory measurement
        print(json.dumps(one(args.one, args.work / f"{VARIANTS.index(args.one)}.onnx")))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, variant in enumerate(VARIANTS):
        print(f"• {variant}", file=sys.stderr, flush=True)
        (args.work / f"{index}.onnx").write_bytes(_model(variant, COPIES))
        command = [sys.executable, __file__, "--work", str(args.work), "--one", variant]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(timing(variant, args.repeats))
        rows.append(row)
    lines = [
        "| in-memory form | MB held per weight after load | peak MB per weight | ms M=128 "
        "| ms M=4096 | GFLOP/s M=4096 | max rel. error vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['after_load_per_weight'] / 1e6:.2f} | "
            f"{r['peak_per_weight'] / 1e6:.2f} | {r['ms_m128']:.3f} | {r['ms_m4096']:.2f} | "
            f"{r['gflops_m4096']:.0f} | {r['max_rel_error']:.4f} |"
        )
    table = "\n".join(lines) + (
        f"\n\nOne {K}×{N} weight ({K * N / 1e6:.2f} M values; fp32 {K * N * 4 / 1e6:.2f} MB, "
        f"int8 {K * N / 1e6:.2f} MB, 4-bit block {BLOCK} {K * N * (4 + 16 / BLOCK) / 8e6:.2f} MB), "
        f"{THREADS} threads, memory over {COPIES} copies in a fresh process.\n"
    )
    import onnxruntime

    result = {
        "command": "python benchmarks/lowbit_ops.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "onnxruntime": onnxruntime.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
