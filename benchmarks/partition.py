"""Partitioning benchmark: predicted against measured stage times, pipeline throughput, Ray hops.

    python benchmarks/partition.py --out benchmarks/results/partition.json

1. ``profile-device`` measures this machine with 1 thread; two devices ``a`` and ``b`` get that
   profile (one machine, two 1-thread devices, a link as fast as memory).
2. minilm (fp32, and each ``--package`` given, e.g. the compressed ones) is planned as a
   2-stage pipeline (objective throughput) and as heads at batch 1, sequence 128; each stage's
   measured median time and memory (a fresh process opening only that stage) are compared
   with the manifest's predictions.
3. 64 requests stream through the pipeline (local backend, ``run_many``), and run one at a
   time through the heads split, against the same 64 through the whole model on one 1-thread
   device.
4. The pipeline runs on a local 2-node Ray cluster; the extra time per request over the local
   backend, divided by the hops (stage calls), is Ray's cost per hop; bytes per hop from the
   manifest's edges.

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
from edgec.runtimes.memory import measure
from edgec.runtimes.profiler import median_ms, profile_device


def stage_rows(package: Path, feeds: dict, repeats: int, label: str, work: Path) -> list[dict]:  # type: ignore[type-arg]
    """Each stage's measured median time and, in a fresh process that opens only that stage,
    its peak resident memory above the interpreter, beside the manifest's predictions."""
    runtime = load_package(package)
    backend = runtime._backend  # measure each stage alone, on its own session
    tensors = dict(feeds)
    rows = []
    for stage in runtime.manifest.stages:
        part = {n: tensors[n] for n in stage.inputs}
        measured = median_ms(
            lambda s=stage.name, p=part: backend.run_stage(s, p), repeats, warmup=3
        )
        tensors.update(backend.run_stage(stage.name, part))
        saved = work / f"{package.name}-{stage.name}.npz"
        np.savez(saved, **part)
        memory = measure(package, stage=stage.name, feeds=saved)
        used = memory.run_peak["stage"] - memory.baseline
        predicted = float(stage.predicted_ms or 0.0)
        rows.append(
            {
                "stage": f"{label} {stage.name}",
                "device": stage.device,
                "nodes": list(stage.nodes or ()),
                "predicted_ms": round(predicted, 3),
                "measured_ms": round(measured, 3),
                "error": round(measured / predicted - 1, 3),
                "predicted_mb": round((stage.memory_bytes or 0) / 1e6, 1),
                "measured_mb": round(used / 1e6, 1),
                "memory_error": round(used / (stage.memory_bytes or 1) - 1, 3),
            }
        )
    return rows


def stream_seconds(package: Path, requests: list[dict], pipelined: bool) -> float:  # type: ignore[type-arg]
    runtime = load_package(package)
    runtime.run_many(requests[:4])  # warm-up
    start = time.perf_counter()
    if pipelined:
        runtime.run_many(requests)
    else:
        for feeds in requests:
            runtime.run(feeds)
    return time.perf_counter() - start


def parallel_ceiling(package: Path, requests: list[dict]) -> float:  # type: ignore[type-arg]
    """What two cores give right now: two independent whole-model 1-thread sessions running the
    requests in two threads, against one session running them all (time ratio)."""
    import threading

    first, second = load_package(package), load_package(package)
    first.run(requests[0])
    second.run(requests[0])
    start = time.perf_counter()
    for feeds in requests:
        first.run(feeds)
    alone = time.perf_counter() - start
    half = len(requests) // 2
    threads = [
        threading.Thread(target=lambda r=r, part=part: [r.run(f) for f in part])
        for r, part in ((first, requests[:half]), (second, requests[half:]))
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return alone / (time.perf_counter() - start)


def ray_hops(package: Path, feeds: dict, repeats: int) -> dict:  # type: ignore[type-arg]
    import ray
    from ray.cluster_utils import Cluster

    manifest = load_package(package).manifest
    head = {"num_cpus": 1, "resources": {"device:a": 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(num_cpus=1, resources={"device:b": 1})
        cluster.wait_for_nodes()
        local = load_package(package)
        remote = load_package(package, backend="ray", address=cluster.address, timeout_s=60)
        local_ms = median_ms(lambda: local.run(feeds), repeats, warmup=3)
        ray_ms = median_ms(lambda: remote.run(feeds), repeats, warmup=3)
        remote.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    hops = len(manifest.stages)
    stage_edges = [e for e in manifest.edges if e["from"] != "input"]
    return {
        "local_ms": round(local_ms, 3),
        "ray_ms": round(ray_ms, 3),
        "hops": hops,
        "ms_per_hop": round((ray_ms - local_ms) / hops, 3),
        "bytes_between_stages": sum(e["bytes"] for e in stage_edges),
        "note": "each hop is coordinator -> stage actor -> coordinator through Ray's object store",
    }


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def split_fidelity(
    whole: Path, splits: dict[str, Path], reference: Path, sentences: list[str]
) -> dict[str, dict]:  # type: ignore[type-arg]
    """Min cosine of each split's sentence embeddings against the whole package's and against
    the fp32 package's, with the tolerance the split was checked against."""
    expected = load_package(whole).embed(sentences)
    fp32 = load_package(reference).embed(sentences)
    rows = {"whole": {"vs_fp32": round(_min_cosine(expected, fp32), 4)}}
    for name, path in splits.items():
        runtime = load_package(path)
        got = runtime.embed(sentences)
        rows[name] = {
            "vs_whole": round(_min_cosine(got, expected), 4),
            "vs_fp32": round(_min_cosine(got, fp32), 4),
            "raw_min_cosine": round(runtime.manifest.parity["partition_min_cosine"], 4),
            "tolerance": runtime.manifest.parity["partition_tolerance"],
        }
    return rows


def markdown(result: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"Measured on {result['machine']} with `{result['command']}`; 1-minute load average "
        f"{result['load_average_1min'][0]} before and {result['load_average_1min'][1]} after the "
        "timings (other work on the machine). Memory: peak resident bytes of a fresh process "
        "that opens only that stage and runs it once at 1×128, above the same process before "
        "it loaded anything.",
        "",
        "| what | predicted | measured | | predicted memory | measured memory | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["stages"]:
        nodes = f" (nodes {row['nodes'][0]}..{row['nodes'][1]})" if row["nodes"] else ""
        lines.append(
            f"| {row['stage']} on {row['device']}{nodes} "
            f"| {row['predicted_ms']} ms | {row['measured_ms']} ms | {row['error']:+.0%} "
            f"| {row['predicted_mb']} MB | {row['measured_mb']} MB | {row['memory_error']:+.0%} |"
        )
    lines += [
        "",
        "| throughput, 64 requests at 1×128 | predicted | measured | |",
        "| --- | --- | --- | --- |",
    ]
    for label, t in result["throughput"].items():
        lines.append(
            f"| {label}: 2-stage pipeline (2×1 thread, streamed) vs one 1-thread device | "
            f"{t['predicted_pipeline_speedup']:.2f}× | {t['pipeline_speedup']:.2f}× | "
            f"{t['pipeline_s']} s vs {t['single_s']} s |"
        )
        lines.append(
            f"| {label}: heads over 2×1 thread (one request at a time) vs one 1-thread device | "
            f"{t['predicted_heads_speedup']:.2f}× | {t['heads_speedup']:.2f}× | "
            f"{t['heads_s']} s vs {t['single_s']} s |"
        )
    lines.append(
        "| ceiling: two independent 1-thread sessions in two threads vs one (what the cores give now) "
        f"| 2.00× | {result['two_independent_sessions_speedup']:.2f}× | |"
    )
    r = result.get("ray")
    if r:
        lines.append(
            f"| Ray cost per hop (local 2-node cluster, fp32 pipeline) | – | {r['ms_per_hop']} ms | "
            f"{r['bytes_between_stages']} bytes between stages; {r['ray_ms']} ms vs {r['local_ms']} ms local per request |"
        )
    lines += [
        "",
        f"Fidelity of the splits: min cosine of the sentence embeddings of {result['sentences']} "
        "Wikipedia sentences (`models/zoo/sentences/wikipedia.txt`), against the unsplit package "
        "and against fp32; the raw check (min cosine per output row, on token ids) and its "
        "tolerance from the manifest.",
        "",
        "| package | split | vs whole | vs fp32 | raw check | tolerance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, rows in result["fidelity"].items():
        for split, row in rows.items():
            lines.append(
                f"| {label} | {split} | {row.get('vs_whole', '–')} | {row['vs_fp32']} | "
                f"{row.get('raw_min_cosine', '–')} | {row.get('tolerance', '–')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/partition.json"))
    parser.add_argument("--source", default="minilm")
    parser.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="A compressed single-stage package to add rows for (e.g. int8=build/bench/int8.pkg, "
        "as benchmarks/compression.py leaves them).",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgec-bench-"))
    print(f"• exporting {args.source}")
    export(args.source, work / "fp32")
    packages = {"fp32": work / "fp32"}
    for item in args.package:
        label, _, path = item.partition("=")
        packages[label] = Path(path)
    print("• profiling this machine (1 thread)")  # just before the timings it predicts
    me = profile_device("a", threads=1)
    devices = DeviceSet(
        (me, replace(me, name="b")),
        (Link(("a", "b"), bandwidth_mbps=100_000, latency_ms=0.0),),  # same machine
    )
    load_before = os.getloadavg()[0]
    stages: list[dict] = []  # type: ignore[type-arg]
    throughput: dict[str, dict] = {}  # type: ignore[type-arg]
    plans = {}
    fidelity = {}
    wikipedia = Path(__file__).parents[1] / "models" / "zoo" / "sentences" / "wikipedia.txt"
    sentences = wikipedia.read_text(encoding="utf-8").splitlines()[: args.sentences]
    for label, source in packages.items():
        print(f"• {label}: partitioning (pipeline for throughput, heads, single)")
        piped = partition_package(
            source, work / f"{label}-pipeline", devices, "pipeline", "throughput"
        )
        heads = partition_package(source, work / f"{label}-heads", devices, "heads")
        single = partition_package(source, work / f"{label}-single", DeviceSet((me,)), "single")
        plans[label] = piped.plan.to_json()
        feeds = planning_feeds(piped.manifest.inputs, 1, 128)
        feeds["input_ids"] = (np.arange(128, dtype=np.int64).reshape(1, 128) % 90) + 1000
        print(f"• {label}: timing stages and probing their memory")
        stages += stage_rows(
            work / f"{label}-pipeline", feeds, args.repeats, f"{label} pipeline", work
        )
        stages += stage_rows(
            work / f"{label}-single", feeds, args.repeats, f"{label} whole model,", work
        )
        data = partition_package(source, work / f"{label}-data", devices, "data")
        print(f"• {label}: fidelity of the splits on {len(sentences)} sentences")
        fidelity[label] = split_fidelity(
            source,
            {"pipeline": piped.path, "heads": heads.path, "data": data.path},
            packages["fp32"],
            sentences,
        )
        print(f"• {label}: {args.requests} requests")
        requests = [feeds] * args.requests
        single_s = stream_seconds(work / f"{label}-single", requests, pipelined=False)
        pipeline_s = stream_seconds(work / f"{label}-pipeline", requests, pipelined=True)
        heads_s = stream_seconds(work / f"{label}-heads", requests, pipelined=False)
        throughput[label] = {
            "requests": args.requests,
            "single_s": round(single_s, 3),
            "pipeline_s": round(pipeline_s, 3),
            "heads_s": round(heads_s, 3),
            "pipeline_speedup": round(single_s / pipeline_s, 3),
            "heads_speedup": round(single_s / heads_s, 3),
            "predicted_pipeline_speedup": round(single.plan.period_ms / piped.plan.period_ms, 3),
            "predicted_heads_speedup": round(single.plan.latency_ms / heads.plan.latency_ms, 3),
        }
    ceiling = parallel_ceiling(work / "fp32-single", [feeds] * args.requests)
    result = {
        "command": "python benchmarks/partition.py "
        + " ".join(f"--package {p}" for p in args.package)
        + f" --out {args.out}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "profile": me.to_json(),
        "plans": plans,
        "stages": stages,
        "throughput": throughput,
        "sentences": len(sentences),
        "fidelity": fidelity,
        "two_independent_sessions_speedup": round(ceiling, 3),
    }
    if not args.no_ray:
        print("• Ray: local 2-node cluster")
        result["ray"] = ray_hops(work / "fp32-pipeline", feeds, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
