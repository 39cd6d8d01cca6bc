"""What a device pays in memory: resident memory of a fresh process that loads and runs a model.

``measure`` starts ``python -m edgec.runtimes.memory TARGET`` in a fresh interpreter, which loads
TARGET (an edgec package, or a bare ``.onnx`` file for the peers), runs it once per shape, and
reports from ``/proc/self/status``: the peak while loading (``VmHWM``), the resident set after
loading (``VmRSS``), and the peak of each run (``VmHWM`` after resetting it with
``/proc/self/clear_refs``). ``baseline`` is the same interpreter with numpy and onnxruntime
imported and nothing loaded: what every row pays before the model.

Linux only (``/proc``). Figures are bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgec.errors import DeviceError

STATUS = Path("/proc/self/status")
DEFAULT_SHAPES = ((1, 128), (32, 128))


def read_status() -> dict[str, int]:
    """``VmHWM`` (peak resident) and ``VmRSS`` (resident now) of this process, in bytes."""
    found = {}
    for line in STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) * 1024
    return found


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux: ``5`` into ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


@dataclass(frozen=True)
class MemoryFigures:
    """One fresh process: peaks and resident sets in bytes; ``run_peak`` per shape ``BxL``."""

    target: str
    baseline: int  # the process before loading: interpreter, numpy, onnxruntime, edgec
    load_peak: int
    after_load: int
    run_peak: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The highest resident set the process reached, loading or running."""
        return max([self.load_peak, *self.run_peak.values()])

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "peak": self.peak}


def _feeds(inputs: Sequence[tuple[str, str]], batch: int, sequence: int) -> dict[str, object]:
    import numpy as np

    rng = np.random.default_rng(batch)
    feeds: dict[str, object] = {}
    for name, dtype in inputs:
        if name == "attention_mask":
            feeds[name] = np.ones((batch, sequence), np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, sequence), np.int64)
        elif dtype == "int64":
            feeds[name] = rng.integers(1, 100, (batch, sequence), dtype=np.int64)  # any vocabulary
        else:
            raise DeviceError(f"the memory probe feeds token ids only; {name!r} is {dtype}")
    return feeds


def _probe_stage(target: Path, stage: str, feeds_file: Path) -> MemoryFigures:
    """In this (fresh) process: open one stage of the package ``target`` (as the device that
    runs it would) and run it once on the tensors saved in ``feeds_file`` (``.npz``)."""
    import numpy as np
    from edgec.runtimes.backends import open_session
    from edgec.runtimes.package import read_package

    with np.load(feeds_file, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    before = read_status()["VmRSS"]
    reset_peak()
    package = read_package(target)
    info = next((s for s in package.manifest.stages if s.name == stage), None)
    if info is None:
        raise DeviceError(f"package {str(target)!r} has no stage {stage!r}")
    session = open_session(package, info)
    status = read_status()
    figures = MemoryFigures(f"{target}:{stage}", before, status["VmHWM"], status["VmRSS"])
    reset_peak()
    session.run(None, {n: feeds[n] for n in info.inputs})
    figures.run_peak["stage"] = read_status()["VmHWM"]
    return figures


def _probe(target: Path, shapes: Sequence[tuple[int, int]], threads: int) -> MemoryFigures:
    """In this (fresh) process: load ``target``, run each shape, read the figures."""
    import onnxruntime as ort

    before = read_status()["VmRSS"]
    reset_peak()
    if target.is_dir():
        from edgec.runtimes import load_package

        runtime = load_package(target)
        inputs = [(t.name, t.dtype) for t in runtime.manifest.inputs]
        run = runtime.run
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        dtypes = {"tensor(int64)": "int64"}
        inputs = [(i.name, dtypes.get(i.type, i.type)) for i in session.get_inputs()]

        def run(feeds: dict[str, object]) -> object:
            return session.run(None, feeds)

    status = read_status()
    figures = MemoryFigures(str(target), before, status["VmHWM"], status["VmRSS"])
    for batch, sequence in shapes:
        feeds = _feeds(inputs, batch, sequence)
        reset_peak()
        run(feeds)
        figures.run_peak[f"{batch}x{sequence}"] = read_status()["VmHWM"]
        del feeds
    return figures


def _child(command: list[str], timeout_s: float) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"memory probe took over {timeout_s:.0f} s: {command}") from exc
    if done.returncode != 0:
        raise DeviceError(f"memory probe failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline(timeout_s: float = 120.0) -> int:
    """Peak resident bytes of a fresh interpreter that imports numpy and onnxruntime only."""
    code = (
        "import json, numpy, onnxruntime\n"
        "from pathlib import Path\n"
        "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() "
        "if l.startswith('VmHWM')][0]\n"
        "print(json.dumps({'VmHWM': int(hwm.split()[1]) * 1024}))"
    )
    return int(_child([sys.executable, "-c", code], timeout_s)["VmHWM"])  # type: ignore[call-overload]


def measure(
    target: str | os.PathLike[str],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    threads: int = 2,
    timeout_s: float = 600.0,
    *,
    stage: str | None = None,
    feeds: str | os.PathLike[str] | None = None,
) -> MemoryFigures:
    """Load and run ``target`` (a package directory or an ``.onnx`` file) in a fresh process;
    with ``stage``, only that stage of the package, on the tensors saved in ``feeds`` (what a
    device that runs one stage of a split pays; its run peak is ``run_peak["stage"]``)."""
    command = [sys.executable, "-m", "edgec.runtimes.memory", os.fspath(target)]
    command += ["--threads", str(threads)]
    for batch, sequence in shapes:
        command += ["--shape", f"{batch}x{sequence}"]
    if stage is not None:
        if feeds is None:
            raise DeviceError("measuring one stage needs the tensors it reads (feeds)")
        command += ["--stage", stage, "--feeds", os.fspath(feeds)]
    data = _child(command, timeout_s)
    return MemoryFigures(
        target=str(data["target"]),
        baseline=int(data["baseline"]),  # type: ignore[call-overload]
        load_peak=int(data["load_peak"]),  # type: ignore[call-overload]
        after_load=int(data["after_load"]),  # type: ignore[call-overload]
        run_peak={k: int(v) for k, v in data["run_peak"].items()},  # type: ignore[attr-defined]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Probe a model's resident memory (bytes, JSON).")
    parser.add_argument("target", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", action="append", default=[], help="BATCHxSEQUENCE")
    parser.add_argument("--stage", help="Probe only this stage of the package.")
    parser.add_argument("--feeds", type=Path, help="The stage's input tensors (.npz).")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape] or list(DEFAULT_SHAPES)
    if args.stage:
        figures = _probe_stage(args.target, args.stage, args.feeds)
    else:
        figures = _probe(args.target, shapes, args.threads)  # type: ignore[arg-type]
    print(json.dumps(figures.to_json()))


if __name__ == "__main__":
    main()
