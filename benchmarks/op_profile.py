"""Where an ONNX model's time goes: onnxruntime's profiler, summed by operator type.

    python benchmarks/op_profile.py build/bench/balanced.pkg --batch 1
    python benchmarks/op_profile.py build/bench/ort-dynamic-defaults.onnx --batch 32

MODEL is an .onnx file or a single-stage package (its coded weights decoded as edgec's runtime
does). 2 threads, random token ids (or pixels) at the given batch and 128 tokens, a few warm-up
runs, then the kernel time per run of each operator type in the optimized graph, largest first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgec.runtimes.diagnosis import kernel_times

THREADS = 2
WARMUP = 3


def _feeds(session: ort.InferenceSession, batch: int, sequence: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for info in session.get_inputs():
        if info.name == "input_ids":
            feeds[info.name] = rng.integers(1000, 30000, (batch, sequence), dtype=np.int64)
        elif info.name == "attention_mask":
            feeds[info.name] = np.ones((batch, sequence), np.int64)
        elif info.name == "token_type_ids":
            feeds[info.name] = np.zeros((batch, sequence), np.int64)
        else:
            shape = [batch, *(d if isinstance(d, int) else sequence for d in info.shape[1:])]
            feeds[info.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    if not path.is_dir():
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    from edgec.runtimes import read_package
    from edgec.runtimes.backends import create_session

    package = read_package(path)
    (stage,) = package.manifest.stages
    weights = None if stage.weights is None else package.path(stage.weights)
    return create_session(
        package.path(stage.file), options, ["CPUExecutionProvider"], weights, stage.coded
    )


def profile(path: Path, batch: int, sequence: int, runs: int) -> tuple[float, Counter[str]]:
    """(kernel milliseconds per run, milliseconds per run by operator type)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = _session(path, options)
        feeds = _feeds(session, batch, sequence)
        for _ in range(WARMUP + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op, _ = kernel_times(events, WARMUP, runs)
    return sum(by_op.values()), by_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    total, by_op = profile(args.model, args.batch, args.sequence, args.runs)
    print(f"{args.model}: batch {args.batch} x {args.sequence}, {total:.2f} ms of kernels per run")
    for op, ms in by_op.most_common(args.top):
        print(f"  {op:28s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
