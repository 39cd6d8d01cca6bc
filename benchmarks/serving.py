"""Serving benchmark: throughput and latency of ``edgec serve-on-device`` on loopback.

For each server setting (dynamic batching; max-batch 1) it starts the real CLI server as a
subprocess, runs closed-loop clients (each sends one real sentence per request as the Open
Inference Protocol's BYTES ``text`` input, waits for the answer, sends the next) at each
concurrency for ``--duration`` seconds, and records requests/s, p50/p99 latency, errors and the
server's resident memory after each run. The highest concurrency runs ``--repeats`` times to show
whether memory grows. Then ``--malformed`` malformed requests must all be answered 4xx.

    python benchmarks/serving.py --out benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SETTINGS = {
    "dynamic batching (max batch 16, 5 ms)": ["--max-batch", "16", "--max-delay-ms", "5"],
    "max batch 1": ["--max-batch", "1", "--max-delay-ms", "0"],
}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, flags=re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


class Server:
    """``edgec serve-on-device`` in a subprocess on a free port; stopped with SIGTERM."""

    def __init__(self, package: Path, options: list[str]):
        command = [sys.executable, "-m", "edgec.cli", "serve-on-device", str(package)]
        self.process = subprocess.Popen(
            [*command, "--port", "0", *options], stderr=subprocess.PIPE, text=True
        )
        self.url = self._address()
        while httpx.get(f"{self.url}/v2/health/ready").status_code != 200:
            time.sleep(0.1)

    def _address(self) -> str:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            match = re.search(r"on (http://[\d.]+:\d+)/v2", line)
            if match:
                return match.group(1)
        raise RuntimeError(f"the server exited with {self.process.wait()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        if self.process.stderr is not None:
            self.process.stderr.close()


def batch_counters(url: str) -> tuple[float, float, float]:
    """(batches, rows, seconds busy running batches) so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics").text

    def value(name: str) -> float:
        match = re.search(rf'^{name}{{model="minilm"}} (\S+)$', text, flags=re.M)
        return float(match.group(1)) if match else 0.0

    return (
        value("edgec_batch_size_rows_count"),
        value("edgec_batch_size_rows_sum"),
        value("edgec_batch_seconds_sum"),
    )


def closed_loop(url: str, sentences: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads sending requests back to back for ``seconds``."""
    infer = f"{url}/v2/models/minilm/infer"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_at = time.perf_counter() + 0.2
    stop_at = start_at + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=60) as http:
            k = index
            while time.perf_counter() < start_at:
                time.sleep(0.001)
            while time.perf_counter() < stop_at:
                text = sentences[k % len(sentences)]
                k += clients
                body = {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]
                }
                sent = time.perf_counter()
                try:
                    response = http.post(infer, json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies[index].append(time.perf_counter() - sent)
                else:
                    errors[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "latencies_ms": [1000 * x for per in latencies for x in per],
        "errors": int(sum(errors)),
        "seconds": seconds,
    }


def measure(server: Server, sentences: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """One closed-loop run plus what the server's metrics say about it."""
    before = batch_counters(server.url)
    part = closed_loop(server.url, sentences, clients, seconds)
    batches, rows, busy = (a - b for a, b in zip(batch_counters(server.url), before, strict=True))
    part.update(batches=batches, rows=rows, busy_s=busy, rss_mb=rss_mb(server.process.pid))
    return part


def summarize(parts: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Rounds of one setting at one concurrency, pooled."""
    done = np.array([x for part in parts for x in part["latencies_ms"]])
    seconds = sum(part["seconds"] for part in parts)
    batches = sum(part["batches"] for part in parts)
    return {
        "concurrency": clients,
        "seconds": seconds,
        "rounds": len(parts),
        "requests": int(done.size),
        "errors": sum(part["errors"] for part in parts),
        "throughput_rps": float(done.size / seconds),
        "p50_ms": float(np.percentile(done, 50)) if done.size else None,
        "p99_ms": float(np.percentile(done, 99)) if done.size else None,
        "rows_per_batch": sum(part["rows"] for part in parts) / batches if batches else None,
        "busy_fraction": sum(part["busy_s"] for part in parts) / seconds,
        "rss_mb": parts[-1]["rss_mb"],
        "rss_after_each_round_mb": [part["rss_mb"] for part in parts],
    }


def batching_ceiling(
    package: Path, sentences: list[str], rows: int = 16, repeats: int = 7
) -> dict[str, float]:
    """What batching can gain in the model alone, in one process: sentences/s of one call on
    ``rows`` sentences over ``rows`` single calls (medians), for mixed-length sentences padded to
    the longest, the same grouped by length as the server does, and equal-length sentences."""
    from edgec.runtimes import load_package
    from edgec.runtimes.server.text import answer_texts

    runtime = load_package(package)
    rng = np.random.default_rng(0)
    equal = [sentences[0]] * rows

    def rate(call: Any, texts: list[str]) -> float:
        call(texts)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call(texts)
            times.append(time.perf_counter() - started)
        return rows / float(np.median(times))

    def singles(texts: list[str]) -> None:
        for text in texts:
            runtime.embed([text])

    mixed = [str(x) for x in rng.choice(sentences, rows)]
    single_mixed = rate(singles, mixed)
    return {
        "rows": rows,
        "padded_vs_single": rate(runtime.embed, mixed) / single_mixed,
        "grouped_vs_single": rate(lambda t: answer_texts(runtime, t), mixed) / single_mixed,
        "equal_length_vs_single": rate(runtime.embed, equal) / rate(singles, equal),
    }


def malformed_bodies(count: int, seed: int = 0) -> list[tuple[str, bytes, dict[str, str]]]:
    """``count`` malformed requests cycling through the ways a client gets it wrong."""
    rng = np.random.default_rng(seed)

    def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": shape, "data": data}

    def ids(datatype: str = "INT64", shape: tuple[int, int] = (1, 4), value: Any = 1) -> bytes:
        inputs = [
            tensor(n, datatype, list(shape), [value] * (shape[0] * shape[1]))
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ]
        return json.dumps({"inputs": inputs}).encode()

    makers = [
        lambda: (
            "minilm",
            bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)),
            {},
        ),
        lambda: ("minilm", b'{"inputs": [', {}),
        lambda: (
            "minilm",
            b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
            {},
        ),
        lambda: ("minilm", ids("FP32", value=0.5), {}),
        lambda: ("minilm", ids(shape=(1, 4), value=[1, 2]), {}),
        lambda: ("minilm", ids(value=int(rng.integers(30522, 2**40))), {}),
        lambda: (
            "minilm",
            json.dumps({"inputs": [tensor("text", "BYTES", [2], ["only one"])]}).encode(),
            {},
        ),
        lambda: (
            "minilm",
            json.dumps({"inputs": [tensor("text", "INT64", [1], [1])]}).encode(),
            {},
        ),
        lambda: ("minilm", json.dumps({"inputs": []}).encode(), {}),
        lambda: ("minilm", json.dumps({"outputs": [{"name": "embedding"}]}).encode(), {}),
        lambda: (
            f"model-{int(rng.integers(1e6))}",
            json.dumps({"inputs": [tensor("text", "BYTES", [1], ["hi"])]}).encode(),
            {},
        ),
        lambda: ("minilm", b" " * (17 * 1024 * 1024), {}),
        lambda: (
            "minilm",
            json.dumps({"inputs": [tensor("text", "BYTES", [1], ["hi"])]}).encode(),
            {"Inference-Header-Content-Length": "999999"},
        ),
        lambda: (
            "minilm",
            json.dumps(
                {"inputs": [tensor("text", "BYTES", [1], ["hi"])], "outputs": [{"name": "nope"}]}
            ).encode(),
            {},
        ),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def run_malformed(url: str, count: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    without_message = 0
    with httpx.Client(timeout=60) as http:
        for name, body, headers in malformed_bodies(count):
            response = http.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            try:
                without_message += not response.json().get("error")
            except ValueError:
                without_message += 1
        healthy = http.get(f"{url}/v2/health/ready").status_code == 200
    all_4xx = all(400 <= int(s) < 500 for s in statuses)
    return {
        "requests": count,
        "statuses": statuses,
        "all_4xx": all_4xx,
        "without_message": without_message,
        "healthy_after": healthy,
    }


def markdown(results: dict[str, Any]) -> str:
    top = max(r["concurrency"] for runs in results["runs"].values() for r in runs)
    lines = [
        f"Serving minilm on loopback, {results['machine']}; closed-loop clients, one sentence per "
        f"request, {results['duration_s']:.0f} s per setting and concurrency in "
        f"{results['rounds']} rounds alternating between the two servers (so both see the same "
        "machine load); model busy: share of the time the inference thread ran batches. "
        f"Command: `{results['command']}`",
        "",
        "| server | clients | requests/s | p50 ms | p99 ms | errors | rows/batch | model busy | server RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting, runs in results["runs"].items():
        for run in runs:
            lines.append(
                f"| {setting} | {run['concurrency']} | {run['throughput_rps']:.1f} | "
                f"{run['p50_ms']:.1f} | {run['p99_ms']:.1f} | {run['errors']} | "
                f"{run['rows_per_batch']:.1f} | {run['busy_fraction']:.0%} | {run['rss_mb']:.0f} |"
            )
    lines += [
        "",
        f"Dynamic batching vs max batch 1 at {top} clients: **{results['speedup_16']:.2f}×** "
        "throughput.",
    ]
    rss = results["rss_repeats_mb"]
    lines.append(
        f"Server RSS (dynamic batching) after each of {len(rss)} repeated {top}-client rounds: "
        + ", ".join(f"{x:.0f}" for x in rss)
        + " MB."
    )
    ceiling = results["batching_ceiling"]
    lines.append(
        f"In one process, one call on {ceiling['rows']} sentences vs {ceiling['rows']} single calls "
        f"(sentences/s): mixed lengths padded to the longest {ceiling['padded_vs_single']:.2f}×, "
        f"grouped by length as the server does {ceiling['grouped_vs_single']:.2f}×, "
        f"equal lengths {ceiling['equal_length_vs_single']:.2f}×."
    )
    bad = results["malformed"]
    lines.append(
        f"{bad['requests']} malformed requests: statuses {bad['statuses']}, all 4xx: {bad['all_4xx']}, "
        f"without a message: {bad['without_message']}, healthy after: {bad['healthy_after']}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    parser.add_argument("--package", type=Path, help="An exported minilm package (else exported).")
    parser.add_argument(
        "--duration", type=float, default=30.0, help="Seconds per setting and concurrency."
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--rounds", type=int, default=3, help="Interleaved rounds the duration is split into."
    )
    parser.add_argument("--malformed", type=int, default=1000)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = args.package
    if package is None:
        from edgec.exporters import export

        package = Path(tempfile.mkdtemp()) / "minilm"
        export("minilm", package)
    from edgec.models.data import bundled_sentences

    sentences = bundled_sentences("heldout")
    results: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "runs": {},
    }
    top = max(args.concurrency)
    results["batching_ceiling"] = batching_ceiling(package, sentences)
    print("ceiling", results["batching_ceiling"], flush=True)
    servers = {setting: Server(package, options) for setting, options in SETTINGS.items()}
    results["runs"] = {setting: [] for setting in SETTINGS}
    try:
        for clients in args.concurrency:
            parts: dict[str, list[dict[str, Any]]] = {setting: [] for setting in SETTINGS}
            for server in servers.values():
                closed_loop(server.url, sentences, clients, 2.0)  # warm-up
            for _ in range(args.rounds):  # alternate: both settings see the same machine load
                for setting, server in servers.items():
                    parts[setting].append(
                        measure(server, sentences, clients, args.duration / args.rounds)
                    )
            for setting in SETTINGS:
                run = summarize(parts[setting], clients)
                results["runs"][setting].append(run)
                print(setting, run, flush=True)
        dynamic_server = servers[next(iter(SETTINGS))]
        results["rss_repeats_mb"] = results["runs"][next(iter(SETTINGS))][-1][
            "rss_after_each_round_mb"
        ]
        results["malformed"] = run_malformed(dynamic_server.url, args.malformed)
        print("malformed", results["malformed"], flush=True)
    finally:
        for server in servers.values():
            server.stop()
    dynamic, single = (results["runs"][s] for s in SETTINGS)
    results["speedup_16"] = (
        next(r for r in dynamic if r["concurrency"] == top)["throughput_rps"]
        / next(r for r in single if r["concurrency"] == top)["throughput_rps"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
