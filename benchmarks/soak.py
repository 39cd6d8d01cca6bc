"""Soak benchmark: ``edgec serve-on-device`` under mixed good and bad traffic for a long time.

``--clients`` closed-loop clients (default 16) send requests back to back for ``--duration``
seconds (default 600) against the real CLI server on the built-in minilm package, with its
default limits. Each request is drawn from a fixed mix (``MIX``): real sentences one and eight at
a time, token tensors, long texts the server cuts, and the bad input issue 13 found (megabyte
texts, lone surrogates, 5,000-digit integers, wrong Content-Type, ``Content-Length: -1``, clients
that leave mid-body or send slowly, malformed JSON, unknown models). Reported: every status by
kind, the 5xx count (target 0, counted by the clients and by the server's own metrics), p50/p99
latency of good and bad requests, and the server's resident memory sampled every
``--sample-s`` seconds: its drift from the end of the warm-up to the end (target < 5 %).

    python benchmarks/soak.py --package minilm.pkg --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Server, rss_mb

Outcome = tuple[str, int | str, float]  # (kind, HTTP status or what happened, seconds)


def text_body(texts: list[str]) -> bytes:
    tensor = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
    return json.dumps({"inputs": [tensor]}).encode()


class Traffic:
    """The request kinds, each a function of a client's HTTP client and random source."""

    def __init__(self, url: str, sentences: list[str], token_body: bytes):
        self.url = url
        self.infer = f"{url}/v2/models/minilm/infer"
        self.sentences = sentences
        self.token_body = token_body
        parsed = urlparse(url)
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        joined = " ".join(sentences)
        self.megabyte = (joined * (1_000_000 // len(joined) + 1))[:1_000_000]
        self.long = self.megabyte[:90_000]  # under the 100,000-character cap: cut at 256 tokens

    def post(self, http: httpx.Client, body: bytes, **headers: str) -> int:
        headers.setdefault("Content-Type", "application/json")
        return http.post(self.infer, content=body, headers=headers).status_code

    # good ----------------------------------------------------------------------------------
    def sentence(self, http: httpx.Client, rng: random.Random) -> int:
        return self.post(http, text_body([rng.choice(self.sentences)]))

    def eight_sentences(self, http: httpx.Client, rng: random.Random) -> int:
        return self.post(http, text_body(rng.sample(self.sentences, 8)))

    def tokens(self, http: httpx.Client, rng: random.Random) -> int:
        return self.post(http, self.token_body)

    def long_text(self, http: httpx.Client, rng: random.Random) -> int:
        return self.post(http, text_body([self.long[rng.randrange(1000) :]]))

    # bad -----------------------------------------------------------------------------------
    def megabyte_texts(self, http: httpx.Client, rng: random.Random) -> int:
        return self.post(http, text_body([self.megabyte] * 15))  # 413: above the character cap

    def surrogate(self, http: httpx.Client, rng: random.Random) -> int:
        body = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\\ud800"]}]}'
        return self.post(http, body)

    def huge_integer(self, http: httpx.Client, rng: random.Random) -> int:
        shape = b"9" * rng.randrange(4000, 6000)
        body = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [' + shape + b"]}]}"
        return self.post(http, body)

    def wrong_content_type(self, http: httpx.Client, rng: random.Random) -> int:
        body = text_body([rng.choice(self.sentences)])
        return self.post(http, body, **{"Content-Type": "application/x-www-form-urlencoded"})

    def malformed(self, http: httpx.Client, rng: random.Random) -> int:
        body = rng.choice(
            [
                b'{"inputs": [',
                b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
                b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}',
                b"[" * 50_000,
                bytes(rng.randrange(256) for _ in range(64)),
            ]
        )
        return self.post(http, body)

    def unknown_model(self, http: httpx.Client, rng: random.Random) -> int:
        url = f"{self.url}/v2/models/model-{rng.randrange(10**6)}/infer"
        return http.post(url, content=text_body(["hi"])).status_code

    def negative_length(self, http: httpx.Client, rng: random.Random) -> int | str:
        request = (
            b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}"
        )
        return _status(self._raw(request))

    def leaves_mid_body(self, http: httpx.Client, rng: random.Random) -> str:
        head = b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(head + text_body(["half a bo"])[:20])
            time.sleep(0.1)
        return "left"

    def slow_body(self, http: httpx.Client, rng: random.Random) -> str:
        """One byte every 0.2 s for 2 s, then gone (the server would wait 30 s at most)."""
        head = b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(head)
            for byte in text_body(["slow"])[:10]:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        return "left"

    def _raw(self, request: bytes) -> bytes:
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def _status(answer: bytes) -> int | str:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else "no answer"


# (kind, weight, good?): about 3 requests in 4 are good
MIX: list[tuple[str, float, bool]] = [
    ("sentence", 55, True),
    ("eight_sentences", 10, True),
    ("tokens", 6, True),
    ("long_text", 4, True),
    ("megabyte_texts", 0.5, False),
    ("surrogate", 4, False),
    ("huge_integer", 4, False),
    ("wrong_content_type", 4, False),
    ("malformed", 5, False),
    ("unknown_model", 3, False),
    ("negative_length", 2, False),
    ("leaves_mid_body", 2, False),
    ("slow_body", 0.5, False),
]
GOOD = {kind for kind, _, good in MIX if good}


def soak(traffic: Traffic, clients: int, seconds: float, seed: int = 0) -> list[Outcome]:
    """``clients`` threads drawing from ``MIX`` back to back for ``seconds``."""
    kinds = [kind for kind, _, _ in MIX]
    weights = [weight for _, weight, _ in MIX]
    outcomes: list[list[Outcome]] = [[] for _ in range(clients)]
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                send: Callable[[httpx.Client, random.Random], int | str] = getattr(traffic, kind)
                sent = time.perf_counter()
                try:
                    result: int | str = send(http, rng)
                except (httpx.HTTPError, OSError) as exc:
                    result = type(exc).__name__
                outcomes[index].append((kind, result, time.perf_counter() - sent))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for per in outcomes for o in per]


def sample_rss(
    pid: int, every_s: float, stop: threading.Event, into: list[tuple[float, float]]
) -> None:
    """Appends (seconds since start, RSS MB) every ``every_s`` until ``stop``."""
    started = time.perf_counter()
    while not stop.wait(every_s):
        into.append((time.perf_counter() - started, rss_mb(pid)))


def server_statuses(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(
        r'^edgec_inference_requests_total\{model="[^"]+",status="(\d+)"\} (\S+)$', text, re.M
    )
    counts: dict[str, float] = {}
    for status, value in found:
        counts[status] = counts.get(status, 0) + float(value)
    return counts


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    values = 1000 * np.array(seconds)
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def summarize(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = {}
    for kind, result, _ in outcomes:
        by_kind.setdefault(kind, Counter())[str(result)] += 1
    good = [s for kind, result, s in outcomes if kind in GOOD and result == 200]
    bad = [s for kind, result, s in outcomes if kind not in GOOD]
    five = sum(1 for _, result, _ in outcomes if isinstance(result, int) and result >= 500)
    return {
        "requests": len(outcomes),
        "requests_per_s": len(outcomes) / seconds,
        "five_xx": five,
        "good_not_200": sum(1 for kind, result, _ in outcomes if kind in GOOD and result != 200),
        "transport_errors": sum(
            1 for _, result, _ in outcomes if isinstance(result, str) and result != "left"
        ),
        "good": {"answered_200": len(good), **percentiles(good)},
        "bad": {"requests": len(bad), **percentiles(bad)},
        "statuses_by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
    }


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    rss = results["rss"]
    lines = [
        f"Soak: {results['clients']} closed-loop clients for {results['duration_s']:.0f} s against "
        f"`edgec serve-on-device` (default limits) on minilm, {results['machine']}; mixed good and "
        f"bad requests (weights in `benchmarks/soak.py`). Command: `{results['command']}`",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| requests | {summary['requests']} ({summary['requests_per_s']:.1f}/s) |",
        f"| 5xx answered (clients) | {summary['five_xx']} |",
        f"| 5xx counted by the server's metrics | {results['server_five_xx']:.0f} |",
        f"| good requests not answered 200 | {summary['good_not_200']} |",
        f"| transport errors (client side) | {summary['transport_errors']} |",
        f"| good requests p50 / p99 ms | {summary['good']['p50_ms']:.0f} / "
        f"{summary['good']['p99_ms']:.0f} |",
        f"| bad requests p50 / p99 ms | {summary['bad']['p50_ms']:.0f} / "
        f"{summary['bad']['p99_ms']:.0f} |",
        f"| server RSS after warm-up → end (MB) | {rss['after_warmup_mb']:.0f} → {rss['end_mb']:.0f} "
        f"(**{rss['drift']:+.1%}**; min {rss['min_mb']:.0f}, max {rss['max_mb']:.0f}) |",
        "",
        "| kind | good? | statuses |",
        "| --- | --- | --- |",
    ]
    for kind, _, good in MIX:
        counts = summary["statuses_by_kind"].get(kind, {})
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        lines.append(f"| {kind} | {'good' if good else 'bad'} | {shown} |")
    lines += [
        "",
        "Server statuses from its metrics, warm-up included (499: the client left before its "
        "answer; `Content-Length: -1` is refused before the application and not counted): "
        + ", ".join(f"{s}: {n:.0f}" for s, n in sorted(results["server_statuses"].items()))
        + ".",
        "RSS samples (s, MB): "
        + ", ".join(
            f"{t:.0f}: {mb:.0f}"
            for t, mb in results["rss"]["samples"][:: max(1, len(results["rss"]["samples"]) // 20)]
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def token_body(package: Path, sentences: list[str]) -> bytes:
    from edgec.runtimes import load_package

    feeds = load_package(package).encode(sentences[:2])
    inputs = [
        {"name": n, "datatype": "INT64", "shape": list(v.shape), "data": v.reshape(-1).tolist()}
        for n, v in feeds.items()
    ]
    return json.dumps({"inputs": inputs}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("--package", type=Path, help="An exported minilm package (else exported).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=600.0, help="Seconds of traffic.")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="Seconds of the same traffic before RSS counts."
    )
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period.")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = args.package
    if package is None:
        from edgec.exporters import export

        package = Path(tempfile.mkdtemp()) / "minilm"
        export("minilm", package)
    from edgec.models.data import bundled_sentences

    sentences = bundled_sentences("heldout")
    server = Server(package, [])
    try:
        traffic = Traffic(server.url, sentences, token_body(package, sentences))
        started_rss = rss_mb(server.process.pid)
        soak(traffic, args.clients, args.warmup, seed=1)  # warm-up: arenas and caches settle
        after_warmup = rss_mb(server.process.pid)
        samples: list[tuple[float, float]] = [(0.0, after_warmup)]
        stop = threading.Event()
        sampler = threading.Thread(
            target=sample_rss, args=(server.process.pid, args.sample_s, stop, samples)
        )
        sampler.start()
        outcomes = soak(traffic, args.clients, args.duration)
        stop.set()
        sampler.join()
        time.sleep(1.0)  # the last answers are counted
        end = rss_mb(server.process.pid)
        statuses = server_statuses(server.url)
        healthy = httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    finally:
        server.stop()
    values = [mb for _, mb in samples] + [end]
    results: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "clients": args.clients,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "mix": [{"kind": k, "weight": w, "good": g} for k, w, g in MIX],
        "summary": summarize(outcomes, args.duration),
        "server_statuses": statuses,
        "server_five_xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "healthy_after": healthy,
        "rss": {
            "at_start_mb": started_rss,
            "after_warmup_mb": after_warmup,
            "end_mb": end,
            "drift": (end - after_warmup) / after_warmup,
            "min_mb": min(values),
            "max_mb": max(values),
            "samples": samples,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
