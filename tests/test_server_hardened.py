"""The inputs that once broke the server (issue 13), each sent to a real server: a clear JSON
error (or, for a megabyte text, a cut), and the server healthy after.

The servers here run uvicorn as ``edgec serve-on-device`` does (``serve.uvicorn_config``), so
requests that HTTP itself cannot parse meet the same JSON refusals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import RunningServer
from edgec.models.data import bundled_sentences
from edgec.runtimes import load_package
from edgec.runtimes.processing import load_tokenizer
from edgec.runtimes.server import ServedModel, ServerConfig, create_app
from edgec.runtimes.server.guard import Guard

pytestmark = pytest.mark.slow

MB = 1_000_000


class Server(RunningServer):
    """The shared test server, with helpers to send requests as they come and as bytes."""

    def infer(self, body: object, **options: object) -> httpx.Response:
        options.setdefault("timeout", 60)
        url = f"{self.url}/v2/models/minilm/infer"
        if isinstance(body, bytes):
            return httpx.post(url, content=body, **options)  # type: ignore[arg-type]
        return httpx.post(url, json=body, **options)  # type: ignore[arg-type]

    def raw(self, request: bytes) -> bytes:
        """Sends ``request`` on a socket as is and returns all the server answers."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    def assert_healthy(self, timeouts: bool = False) -> None:
        """Ready, answers a sentence, and has never answered a 5xx (but 504 if ``timeouts``)."""
        assert httpx.get(f"{self.url}/v2/health/ready").status_code == 200
        response = self.infer(texts(["still fine"]))
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [1, 384]
        metrics = httpx.get(f"{self.url}/metrics").text
        answered = set(
            re.findall(r'^edgec_inference_requests_total\{.*status="(\d+)"', metrics, re.M)
        )
        assert {s for s in answered if s.startswith("5")} <= ({"504"} if timeouts else set())


def wait_until(condition, seconds: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.01)


def texts(values: list[str]) -> dict[str, object]:
    tensor = {"name": "text", "datatype": "BYTES", "shape": [len(values)], "data": values}
    return {"inputs": [tensor]}


class Recorder:
    """Wraps a tokenizer: the length of every text it is given."""

    def __init__(self, tokenizer):  # type: ignore[no-untyped-def]
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def encode(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.lengths.append(len(text))
        return self._tokenizer.encode(text, *args, **kwargs)

    def encode_batch(self, batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.lengths.extend(len(t) for t in batch)
        return self._tokenizer.encode_batch(batch, *args, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def runtime(minilm_package):
    return load_package(minilm_package)


@pytest.fixture(scope="module")
def server(runtime) -> Iterator[Server]:
    """Limits sized for the tests: 32 MB bodies, 2 M characters a text, 1 s to send a body."""
    config = ServerConfig(
        max_body_bytes=32 * MB, max_text_chars=2 * MB, body_timeout_s=1.0, request_timeout_s=20
    )
    model = ServedModel(runtime, max_text_chars=config.max_text_chars)
    with Server(create_app(model, config)) as running:
        yield running


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def uvicorn_errors() -> Iterator[list[logging.LogRecord]]:
    """What uvicorn logs at ERROR and above (it logs an application's traceback there)."""
    handler = Collected()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_fifteen_megabyte_texts_are_cut_before_tokenizing(
    server, runtime, minilm_package, monkeypatch
):
    sentences = " ".join(bundled_sentences("heldout"))
    big = [(sentences * (MB // len(sentences) + 1))[i : i + MB] for i in range(15)]
    recorder = Recorder(runtime.text_encoder._tokenizer)
    monkeypatch.setattr(runtime.text_encoder, "_tokenizer", recorder)
    response = server.infer(texts(big))
    assert response.status_code == 200, response.text
    assert max(recorder.lengths) <= 256 * 8  # the tokenizer saw 2,048 characters of each text
    served = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(15, 384)
    # the reference: the first text tokenized whole, truncated by the tokenizer itself
    tokenizer = load_tokenizer(minilm_package / "assets" / "tokenizer.json.gz")
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()
    encoding = tokenizer.encode(big[0])
    assert len(encoding.ids) == 256  # the tokenizer's maximum
    feeds = {
        name: np.array([values], dtype=np.int64)
        for name, values in (
            ("input_ids", encoding.ids),
            ("attention_mask", encoding.attention_mask),
            ("token_type_ids", encoding.type_ids),
        )
    }
    expected = runtime.run(feeds)["last_hidden_state"].mean(axis=1)[0]
    expected /= np.linalg.norm(expected)
    assert float(served[0] @ expected) >= 0.9999
    server.assert_healthy()


def test_a_text_above_the_character_cap_gets_413(server):
    response = server.infer(texts(["fine", "x" * (2 * MB + 1)]))
    assert response.status_code == 413
    message = response.json()["error"]
    assert "element 1 holds 2000001 characters" in message and "max_text_chars" in message
    server.assert_healthy()


def test_the_default_cap_refuses_fifteen_megabyte_texts(runtime):
    config = ServerConfig(max_body_bytes=32 * MB)
    with Server(create_app(ServedModel(runtime), config)) as server:
        response = server.infer(texts(["x" * MB] * 15))
        assert response.status_code == 413
        assert "above the limit of 100000 (max_text_chars)" in response.json()["error"]
        server.assert_healthy()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (  # the JSON escape of a lone surrogate
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\\ud800"]}]}',
            400,
            "element 0 holds a lone surrogate '\\ud800' at character 1",
        ),
        (
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [' + b"7" * 5000 + b"]}]}",
            400,
            "an integer of 5000 digits",
        ),
        (
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\x01b"]}]}',
            400,
            "invalid JSON: Invalid control character",
        ),
        (b'{"id": "\\udfff", "inputs": 7}', 400, "'inputs' must be a non-empty list"),
        (b"[" * 100_000, 400, "nested too deeply"),
    ],
    ids=["lone-surrogate", "5000-digit-integer", "raw-control-character", "surrogate-id", "nested"],
)
def test_bad_content_gets_a_json_4xx(server, body, status, says):
    response = server.infer(body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    server.assert_healthy()


def test_escaped_control_characters_are_text_like_any_other(server):
    response = server.infer(texts(["\x00\x01\x1b[31m\x7f", "tab\tand\nnewline"]))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/json; charset=utf-8", 200),
        ("application/octet-stream", 200),
    ],
)
def test_the_content_type_is_checked(server, content_type, status):
    body = json.dumps(texts(["typed"])).encode()
    response = server.infer(body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    if status == 415:
        assert "application/json" in response.json()["error"]


def test_a_refused_content_type_reaches_a_client_still_sending(server):
    """415 only once the body is in: answering earlier closed on clients mid-send, and their
    kernel dropped the answer (the soak benchmark saw ReadError)."""
    body = json.dumps(texts(["x" * 90_000] * 20)).encode()  # 1.8 MB
    for _ in range(5):
        response = server.infer(body, headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
    response = server.infer(body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert "Content-Encoding 'gzip' is not supported" in response.json()["error"]
    server.assert_healthy()


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999999999999999"])
def test_an_invalid_content_length_gets_a_json_400(server, length):
    answer = server.raw(
        b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: " + length + b"\r\n\r\n{}"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") or head.startswith(b"HTTP/1.1 413 "), answer
    assert b"application/json" in head
    assert json.loads(body)["error"]
    server.assert_healthy()


def test_the_guard_refuses_a_negative_content_length_itself():
    """Other ASGI servers may pass ``Content-Length: -1`` on: the guard answers it."""
    import asyncio

    sent: list[dict[str, object]] = []

    async def never(*_: object) -> None:
        raise AssertionError("the application was reached")

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    guard = Guard(never, token=None, max_body_bytes=1024)  # type: ignore[arg-type]
    scope = {"type": "http", "headers": [(b"content-length", b"-1")]}
    asyncio.run(guard(scope, never, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 400
    assert "not a non-negative whole number" in json.loads(sent[1]["body"])["error"]  # type: ignore[arg-type]


def _closed_by_client(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    match = re.search(
        r'^edgec_inference_requests_total\{model="minilm",status="499"\} (\S+)$',
        metrics,
        flags=re.M,
    )
    return float(match.group(1)) if match else 0.0


def test_a_client_leaving_mid_body_logs_no_traceback(server, uvicorn_errors):
    before = _closed_by_client(server)
    head = b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"inputs": [')
        time.sleep(0.2)  # the server is reading the body
    deadline = time.monotonic() + 10
    while _closed_by_client(server) == before and not uvicorn_errors:
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.05)
    assert uvicorn_errors == [], [r.getMessage() for r in uvicorn_errors]
    assert _closed_by_client(server) == before + 1  # counted as 499, an answer nobody receives
    server.assert_healthy()


def test_a_slow_body_gets_408(server):
    """One byte every 0.3 s: the 1 s the server gives the body runs out."""
    head = b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        sock.settimeout(0.3)
        for byte in b'{"inputs": [{"name": "text"':  # 27 bytes: 8 s at this pace
            sock.sendall(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
                break
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            answer += chunk
    head_out, _, body = answer.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 408 "), answer
    assert "did not arrive within 1.0 s (body_timeout_s)" in json.loads(body)["error"]
    server.assert_healthy()


def test_a_timed_out_request_stops_its_work(runtime):
    """1,024 long texts with a 3 s timeout: 504, and the batch stops between chunks instead of
    running all 1,024 of them; the request queued behind it is served or times out, never
    refused."""
    config = ServerConfig(max_batch=1, max_queue=1, request_timeout_s=3.0)
    model = ServedModel(runtime, run_tokens=256)  # one row of 256 tokens a model call
    calls: list[int] = []
    original = runtime.run

    def counted(feeds):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(feeds)

    long_text = " ".join(bundled_sentences("heldout"))[:1500]  # above 256 tokens: cut there
    app = create_app(model, config)
    with Server(app) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "run", counted)
        slow: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: slow.append(server.infer(texts([long_text] * 1024)))
        )
        sender.start()
        wait_until(lambda: calls or not sender.is_alive())
        assert calls, slow[0].text  # the slow batch is running
        queued = server.infer(texts(["behind the slow one"]))
        sender.join()
        assert slow[0].status_code == 504
        assert "timed out after 3.0 s" in slow[0].json()["error"]
        assert queued.status_code in (200, 504), queued.text
        wait_until(lambda: not app.state.service.batcher._busy)
        assert len(calls) < 1024  # it stopped long before its 1,024 chunks
        server.assert_healthy(timeouts=True)


class GatedModel(ServedModel):
    """Runs a batch holding the text "wait" only once the test opens the gate."""

    def __init__(self, runtime):  # type: ignore[no-untyped-def]
        super().__init__(runtime)
        self.gate = threading.Event()
        self.ran: list[str] = []

    def run_batch(self, batch):  # type: ignore[no-untyped-def]
        self.ran.extend(t for work in batch for t in work.texts)
        if "wait" in self.ran[-1]:
            self.gate.wait(timeout=30)
        return super().run_batch(batch)


def test_a_timed_out_request_frees_its_queue_slot_and_never_runs(runtime):
    """max_queue 1: a request that times out in the queue leaves it with its 504, so the next
    one is queued (not refused with 503), and the timed-out one never runs."""
    config = ServerConfig(max_batch=1, max_queue=1, request_timeout_s=2.0)
    model = GatedModel(runtime)
    app = create_app(model, config)
    answers: dict[str, httpx.Response] = {}

    with Server(app) as running:

        def send(text: str) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: answers.update({text: running.infer(texts([text]))})
            )
            thread.start()
            return thread

        holding = send("wait")
        wait_until(lambda: model.ran)  # "wait" holds the model
        assert running.infer(texts(["queued"])).status_code == 504  # its deadline passed queued
        assert app.state.service.batcher.depth == 0  # ...and its slot is free
        after = send("after")
        wait_until(lambda: app.state.service.batcher.depth == 1 or not after.is_alive())
        model.gate.set()
        holding.join()
        after.join()
        assert answers["wait"].status_code == 504
        assert answers["after"].status_code == 200, answers["after"].text  # queued, not refused
        assert "queued" not in model.ran  # skipped: its caller had gone
        running.assert_healthy(timeouts=True)


# --- below the application: slow headers and too many connections ------------------------


def _answer(sock: socket.socket, seconds: float = 10) -> tuple[bytes, dict[str, object]]:
    """The status line and JSON body of the one answer on ``sock``, read until it closes."""
    sock.settimeout(seconds)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


@pytest.fixture(scope="module")
def guarded(runtime) -> Iterator[Server]:
    """1 s for a request's line and headers, 4 connections at once."""
    config = ServerConfig(header_timeout_s=1.0, max_connections=4)
    with Server(create_app(ServedModel(runtime), config)) as running:
        yield running


def test_slow_headers_get_408_and_the_connection_closes(guarded):
    """A slowloris client (a header byte every 0.2 s) is cut off at 1 s; uvicorn alone would
    hold it as long as it keeps sending."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server closes while we still send
            for byte in b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nX-Slow: yes":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 5:
                    break
        status, body = _answer(sock)
    assert status.startswith(b"HTTP/1.1 408 "), status
    assert "did not arrive within 1.0 s" in str(body["error"])
    guarded.assert_healthy()


def test_a_kept_alive_connection_gets_a_fresh_header_deadline_per_request(guarded):
    """Two requests on one connection, each in time, answer 200 even though together they
    take longer than the deadline; an idle kept-alive connection is closed, never held."""
    request = json.dumps(texts(["on one connection"])).encode()
    head = (
        b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(request)
    )
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        for _ in range(2):
            time.sleep(0.7)  # 1.4 s in all: past one deadline, within each
            sock.sendall(head + request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        sock.settimeout(15)
        assert sock.recv(65536) == b""  # idle: closed (keep-alive's 5 s or the header deadline)


def test_connections_beyond_the_cap_get_503_and_are_closed(guarded):
    sockets = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(4)]
    try:
        time.sleep(0.1)  # the server has taken all four
        with socket.create_connection(("127.0.0.1", guarded.port)) as extra:
            status, body = _answer(extra)
        assert status.startswith(b"HTTP/1.1 503 "), status
        assert "holds 4 connections (max_connections)" in str(body["error"])
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the server sees the four close
        try:
            guarded.assert_healthy()
            break
        except AssertionError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_warming_runs_the_largest_call_the_server_makes(runtime, monkeypatch):
    """``serve-on-device`` warms the model before taking traffic: one call of ``run_tokens``
    tokens at the tokenizer's maximum length, the call whose attention tensors are biggest."""
    shapes: list[tuple[int, ...]] = []
    run = runtime.run

    def recording(feeds):  # type: ignore[no-untyped-def]
        shapes.append(next(iter(feeds.values())).shape)
        return run(feeds)

    monkeypatch.setattr(runtime, "run", recording)
    model = ServedModel(runtime, run_tokens=1024)
    assert model.warm()
    longest = runtime.manifest.preprocessing.max_length
    assert shapes == [(1024 // longest, longest)]
