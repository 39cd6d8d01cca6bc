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
    done = np.array([x for per in latencies for x in per]) * 1000
    return {
        "concurrency": clients,
        "seconds": seconds,
        "requests": int(done.size),
        "errors": int(sum(errors)),
        "throughput_rps": float(done.size / seconds),
        "p50_ms": float(np.percentile(done, 50)) if done.size else None,
        "p99_ms": float(np.percentile(done, 99)) if done.size else None,
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
    lines = [
        f"Serving minilm on loopback, {results['machine']}; closed-loop clients, one sentence per "
        f"request, {results['duration_s']:.0f} s per run; model busy: share of the run the inference "
        f"thread spent running batches. Command: `{results['command']}`",
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
        f"Dynamic batching vs max batch 1 at 16 clients: **{results['speedup_16']:.2f}×** throughput.",
    ]
    rss = results["rss_repeats_mb"]
    lines.append(
        f"Server RSS after each of {len(rss)} repeated 16-client runs: "
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
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds per run.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of the top run (RSS).")
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
        "runs": {},
    }
    top = max(args.concurrency)
    results["batching_ceiling"] = batching_ceiling(package, sentences)
    print("ceiling", results["batching_ceiling"], flush=True)
    for setting, options in SETTINGS.items():
        server = Server(package, options)
        runs = []
        try:
            for clients in args.concurrency:
                closed_loop(server.url, sentences, clients, 2.0)  # warm-up
                before = batch_counters(server.url)
                run = closed_loop(server.url, sentences, clients, args.duration)
                after = batch_counters(server.url)
                batches, rows, busy = (a - b for a, b in zip(after, before, strict=True))
                run["rows_per_batch"] = rows / batches if batches else None
                run["busy_fraction"] = busy / args.duration
                run["rss_mb"] = rss_mb(server.process.pid)
                runs.append(run)
                print(setting, run, flush=True)
            if setting.startswith("dynamic"):
                repeats = [runs[-1]["rss_mb"]]
                for _ in range(args.repeats - 1):
                    closed_loop(server.url, sentences, top, args.duration)
                    repeats.append(rss_mb(server.process.pid))
                results["rss_repeats_mb"] = repeats
                results["malformed"] = run_malformed(server.url, args.malformed)
                print("malformed", results["malformed"], flush=True)
        finally:
            server.stop()
        results["runs"][setting] = runs
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
