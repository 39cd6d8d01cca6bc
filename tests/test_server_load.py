"""Concurrent clients on loopback (bounded), and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from edgec.models.data import bundled_sentences
from edgec.runtimes import load_package

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS_EACH = 16, 6


def _embed_request(text: str) -> dict[str, object]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def _histogram_count(metrics: str, name: str) -> float:
    match = re.search(rf'^{name}_count{{model="minilm"}} (\S+)$', metrics, flags=re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_clients_each_get_their_own_answer(minilm_server, minilm_package):
    sentences = bundled_sentences("heldout")[: CLIENTS * REQUESTS_EACH]
    expected = load_package(minilm_package).embed(sentences)
    url = f"{minilm_server.url}/v2/models/minilm/infer"
    before = httpx.get(f"{minilm_server.url}/metrics").text

    def client(index: int) -> list[tuple[int, int, np.ndarray | str]]:
        answers = []
        with httpx.Client(timeout=60) as http:
            for k in range(REQUESTS_EACH):
                i = index * REQUESTS_EACH + k
                if index % 4 == 3 and k % 2:  # bad requests interleaved with good ones
                    response = http.post(
                        url,
                        content=b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}',
                    )
                    answers.append((i, response.status_code, response.text))
                    continue
                response = http.post(url, json=_embed_request(sentences[i]))
                vector = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
                answers.append((i, response.status_code, vector))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for batch in pool.map(client, range(CLIENTS)) for a in batch]

    good = [(i, v) for i, status, v in answers if status == 200]
    bad = [(status, text) for i, status, text in answers if isinstance(text, str)]
    assert len(good) + len(bad) == CLIENTS * REQUESTS_EACH
    assert all(status == 400 and "neither 'data'" in text for status, text in bad)
    for i, vector in good:  # every answer is its own sentence's embedding
        assert float(vector @ expected[i]) >= 0.9999, i
    after = httpx.get(f"{minilm_server.url}/metrics").text
    batches = _histogram_count(after, "edgec_batch_size_rows") - _histogram_count(
        before, "edgec_batch_size_rows"
    )
    assert 0 < batches < len(good)  # some requests shared a batch


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(minilm_package):
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgec.cli", "serve-on-device", str(minilm_package)),
            *("--port", "0", "--timeout-s", "120"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        base = ""
        deadline = time.monotonic() + 120
        while not base and time.monotonic() < deadline:
            line = process.stderr.readline()
            match = re.search(r"on (http://127\.0\.0\.1:\d+)/v2", line)
            base = match.group(1) if match else ""
        assert base, "the server did not report its address"
        while httpx.get(f"{base}/v2/health/ready").status_code != 200:
            time.sleep(0.1)

        texts = [" ".join(bundled_sentences("heldout")[:6])] * 24  # long enough to be in flight
        request = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [24], "data": texts}]}
        results: list[int] = []

        def send() -> None:
            response = httpx.post(f"{base}/v2/models/minilm/infer", json=request, timeout=120)
            results.append(response.status_code)

        senders = [threading.Thread(target=send) for _ in range(3)]
        for thread in senders:
            thread.start()
        time.sleep(0.5)  # the requests are in flight
        process.send_signal(signal.SIGTERM)
        refused = False
        stop = time.monotonic() + 10
        while not refused and time.monotonic() < stop:
            try:
                httpx.get(f"{base}/v2/health/live", timeout=1)
                time.sleep(0.05)
            except httpx.TransportError:
                refused = True
        assert refused, "new connections were still accepted after SIGTERM"
        for thread in senders:
            thread.join(timeout=120)
        assert results == [200, 200, 200]
        # uvicorn re-raises the signal once it has shut down gracefully: dying by SIGTERM is the
        # conventional exit of a process told to stop by it.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_a_full_queue_answers_503(minilm_package):
    from conftest import RunningServer
    from edgec.runtimes.server import ServerConfig, load_app

    app = load_app(minilm_package, ServerConfig(max_batch=1, max_queue=1, max_delay_ms=0))
    texts = [" ".join(bundled_sentences("heldout")[:10])] * 32
    request = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [32], "data": texts}]}
    with RunningServer(app) as server, ThreadPoolExecutor(6) as pool:
        url = f"{server.url}/v2/models/minilm/infer"
        responses = list(pool.map(lambda _: httpx.post(url, json=request, timeout=120), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 503 in statuses and 200 in statuses, statuses
        full = next(r for r in responses if r.status_code == 503)
        assert "overloaded" in json.loads(full.text)["error"]
        assert full.headers["retry-after"] == "1"
