"""Request-aware plans against emulated links: a 1-thread phone and a faster server on one machine.

    python benchmarks/links.py --out benchmarks/results/links.json

1. ``profile-device`` measures this machine with 1 thread (the phone) and with 2 threads (the
   server); the link between them is 5 Mbit/s with 40 ms latency; requests enter and results
   return on the phone.
2. minilm is planned and partitioned as a pipeline (objective latency, so that every case
   crosses the link): without constraint, with the raw input kept on the phone
   (``--keep-input-on-entry``), and the same with int8 activations across the link
   (``--int8-links on``); and by ``auto`` with the input kept on the phone.
3. Each split runs with its links emulated (each crossing waits latency + bytes / bandwidth):
   the measured end-to-end median is compared with the plan's prediction.
4. int8 links against float links: bytes across the cut, and the min cosine of the sentence
   embeddings of 64 Wikipedia sentences.

Writes JSON to ``--out`` and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from edgec.exporters import export
from edgec.exporters.partition import partition_package, planning_feeds
from edgec.runtimes import load_package
from edgec.runtimes.devices import DeviceSet, Link
from edgec.runtimes.profiler import profile_device


def emulated_ms(package: Path, feeds: dict, repeats: int) -> float:  # type: ignore[type-arg]
    """Median end-to-end ms of one request with the links emulated."""
    runtime = load_package(package, emulate_links=True)
    runtime.run(feeds)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    runtime.close()
    return float(np.median(times))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def markdown(result: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"Measured on {result['machine']} with `{result['command']}`: phone = this machine "
        "with 1 thread, server = with 2 threads (both profiled just before), 5 Mbit/s and "
        "40 ms between them; requests enter and results return on the phone.",
        "",
        "| plan | stages | bytes across | predicted ms | emulated ms | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["plans"]:
        lines.append(
            f"| {row['case']} | {row['stages']} | {row['bytes_across']} | "
            f"{row['predicted_ms']} | {row['emulated_ms']} | {row['error']:+.0%} |"
        )
    f = result["int8_links"]
    lines += [
        "",
        f"int8 links: {f['float_bytes']} → {f['int8_bytes']} bytes across the cut "
        f"({f['ratio']:.2f}× fewer); sentence embeddings of {f['sentences']} Wikipedia "
        f"sentences against float links: min cosine {f['min_cosine']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/links.json"))
    parser.add_argument("--source", default="minilm")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgec-links-"))
    print(f"• exporting {args.source}")
    export(args.source, work / "whole")
    print("• profiling this machine: phone (1 thread), server (2 threads)")
    phone = profile_device("phone", threads=1)
    server = replace(profile_device("server", threads=2), memory_mb=None)
    devices = DeviceSet(
        (phone, server), (Link(("phone", "server"), bandwidth_mbps=5, latency_ms=40),), "phone"
    )
    cases = {  # pipelines, so that every case crosses the link (objective: latency)
        "pipeline, unconstrained": {"strategy": "pipeline", "objective": "latency"},
        "pipeline, raw input kept on the phone": {
            "strategy": "pipeline",
            "objective": "latency",
            "keep_input": True,
        },
        "pipeline, kept on the phone, int8 links": {
            "strategy": "pipeline",
            "objective": "latency",
            "keep_input": True,
            "int8_links": "on",
        },
        "auto, raw input kept on the phone": {"strategy": "auto", "keep_input": True},
    }
    rows, splits = [], {}
    feeds = planning_feeds(load_package(work / "whole").manifest.inputs, 1, 128)
    feeds["input_ids"] = (np.arange(128, dtype=np.int64).reshape(1, 128) % 90) + 1000
    for name, options in cases.items():
        print(f"• {name}")
        out = work / f"split-{len(rows)}"
        result = partition_package(work / "whole", out, devices, **options)  # type: ignore[arg-type]
        measured = emulated_ms(out, feeds, args.repeats)
        across = sum(e["bytes"] for e in result.manifest.edges if e["from"] != "input")
        rows.append(
            {
                "case": name,
                "stages": " → ".join(f"{s.name}@{s.device}" for s in result.manifest.stages),
                "bytes_across": across,
                "predicted_ms": round(result.plan.latency_ms, 1),
                "emulated_ms": round(measured, 1),
                "error": round(measured / result.plan.latency_ms - 1, 3),
                "reason": result.plan.reason,
            }
        )
        splits[name] = (out, across)
    wikipedia = Path(__file__).parents[1] / "models" / "zoo" / "sentences" / "wikipedia.txt"
    sentences = wikipedia.read_text(encoding="utf-8").splitlines()[: args.sentences]
    (float_path, float_bytes), (int8_path, int8_bytes) = (
        splits["pipeline, raw input kept on the phone"],
        splits["pipeline, kept on the phone, int8 links"],
    )
    a = load_package(float_path).embed(sentences)
    b = load_package(int8_path).embed(sentences)
    result = {
        "command": f"python benchmarks/links.py --out {args.out}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "devices": devices.to_json(),
        "plans": rows,
        "int8_links": {
            "float_bytes": float_bytes,
            "int8_bytes": int8_bytes,
            "ratio": round(float_bytes / max(int8_bytes, 1), 3),
            "sentences": len(sentences),
            "min_cosine": round(_min_cosine(a, b), 6),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
