"""Hypothesis-generated malformed requests: every one a 4xx with a message, the server healthy."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DATATYPES = ("BOOL", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "UINT8", "FP8", "")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _tensor(name: str, datatype: str, shape: list[int], data: object) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


@st.composite
def wrong_tensors(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """Structurally plausible requests whose tensors do not fit minilm."""
    rows = draw(st.integers(1, 3))
    length = draw(st.integers(1, 6))
    good = {n: _tensor(n, "INT64", [rows, length], [[1] * length] * rows) for n in INPUTS}
    kind = draw(
        st.sampled_from(
            ["dtype", "rank", "count", "missing", "extra", "mismatch", "vocab", "text", "outputs"]
        )
    )
    name = draw(st.sampled_from(INPUTS))
    if kind == "dtype":
        datatype = draw(st.sampled_from([d for d in DATATYPES if d != "INT64"]))
        value = [[True] * length] * rows if datatype == "BOOL" else [[1] * length] * rows
        good[name] = _tensor(name, datatype, [rows, length], value)
    elif kind == "rank":
        good[name] = _tensor(name, "INT64", [rows * length], [1] * (rows * length))
    elif kind == "count":
        good[name]["shape"] = [rows, length + draw(st.integers(1, 3))]
    elif kind == "missing":
        del good[name]
    elif kind == "extra":
        good["pixels"] = _tensor("pixels", "FP32", [1], [0.5])
    elif kind == "mismatch":
        good[name] = _tensor(name, "INT64", [rows + 1, length], [[1] * length] * (rows + 1))
    elif kind == "vocab":
        big = draw(st.sampled_from([-1, 30522, 2**40]))
        good["input_ids"] = _tensor("input_ids", "INT64", [rows, length], [[big] * length] * rows)
    elif kind == "text":
        datatype = draw(st.sampled_from(["INT64", "FP32"]))
        good = {"text": _tensor("text", datatype, [1], [1])}
    document: dict[str, object] = {"inputs": list(good.values())}
    if kind == "outputs":
        document["outputs"] = [{"name": draw(st.text(min_size=1, max_size=8))}]
    return "minilm", json.dumps(document).encode(), {}


@st.composite
def broken_documents(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """Bodies that are not a valid request at all: bytes, bad JSON, NaN, random JSON."""
    kind = draw(st.sampled_from(["bytes", "json", "nan", "header"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
    elif kind == "json":
        value = draw(json_values | st.fixed_dictionaries({"inputs": json_values}))
        body = json.dumps(value).encode()
    elif kind == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        tensor = '{"name": "text", "datatype": "FP32", "shape": [1], "data": [CONSTANT]}'
        body = ('{"inputs": [' + tensor.replace("CONSTANT", constant) + "]}").encode()
    else:
        body = json.dumps({"inputs": [_tensor("text", "BYTES", [1], ["hi"])]}).encode()
        ascii_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=5)
        size = draw(st.one_of(st.integers(len(body) + 1, 10**6), ascii_text))
        return "minilm", body, {"Inference-Header-Content-Length": str(size)}
    return "minilm", body, {}


@st.composite
def unknown_models(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n != "minilm"))
    body = json.dumps({"inputs": [_tensor("text", "BYTES", [1], ["hi"])]}).encode()
    return quote(name, safe=""), body, {}


@st.composite
def huge_payloads(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """Over the 1 MiB limit the test server sets: 413."""
    size = draw(st.integers((1 << 20) + 1, 3 << 20))
    return "minilm", b" " * size, {}


malformed = st.one_of(wrong_tensors(), broken_documents(), unknown_models(), huge_payloads())


def test_malformed_requests_get_a_4xx_with_a_message(minilm_server):
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=malformed)
    def answered_4xx(request: tuple[str, bytes, dict[str, str]]) -> None:
        name, body, headers = request
        url = f"{minilm_server.url}/v2/models/{name}/infer"
        response = httpx.post(url, content=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert response.json()["error"]

    answered_4xx()
    # ...and the server is healthy after: ready, still answers, never counted a 5xx.
    assert httpx.get(f"{minilm_server.url}/v2/health/ready").status_code == 200
    good = {"inputs": [_tensor("text", "BYTES", [1], ["still fine"])]}
    response = httpx.post(f"{minilm_server.url}/v2/models/minilm/infer", json=good, timeout=30)
    assert response.status_code == 200
    assert response.json()["outputs"][0]["shape"] == [1, 384]
    metrics = httpx.get(f"{minilm_server.url}/metrics").text
    assert 'status="5' not in metrics


def test_a_body_without_content_length_is_still_bounded(minilm_server):
    def chunks():  # streamed: no Content-Length header
        for _ in range(40):
            yield b" " * (64 * 1024)

    response = httpx.post(
        f"{minilm_server.url}/v2/models/minilm/infer", content=chunks(), timeout=30
    )
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


# --- text content (issue 13): surrogates, huge numbers, control characters, long strings ------

# any code point: lone surrogates and control characters included
any_character = st.one_of(
    st.characters(),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0, 0x1F).map(chr),
)
strings = st.one_of(
    st.text(any_character, max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u2028", "\ufeff", "[CLS]", "", " " * 50]),
    # long: around the 100,000-character cap, most of them cut at 256 tokens before tokenizing
    st.integers(1, 120_000).map(lambda n: ("edge devices run transformers " * (n // 30 + 1))[:n]),
)
digits = st.integers(1, 6000).map(lambda n: "9" * n) | st.sampled_from(
    ["-1", "0", "1e999", "-0.0", "1.5", "18446744073709551616", "1" + "0" * 4300]
)


def _nested(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


@st.composite
def text_content(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """Requests for the 'text' input whose content, not structure, is hostile."""
    values = draw(st.lists(strings, min_size=1, max_size=3))
    kind = draw(st.sampled_from(["texts", "names", "number", "nested", "raw-utf8", "parameters"]))
    tensor: dict[str, object] = _tensor("text", "BYTES", [len(values)], values)
    document: dict[str, object] = {"inputs": [tensor]}
    if kind == "names":  # hostile strings where names and ids go
        where = draw(st.sampled_from(["name", "datatype", "id", "output"]))
        if where in ("name", "datatype"):
            tensor[where] = values[0]
        elif where == "id":
            document["id"] = values[0]
        else:
            document["outputs"] = [{"name": v} for v in values]
    elif kind == "parameters":
        document["parameters"] = {values[0]: draw(json_values)}
        tensor["parameters"] = {"binary_data_size": draw(json_values)}
    body = json.dumps(document)  # ensure_ascii: surrogates and controls travel as \u escapes
    if kind == "number":  # a number JSON carries but Python (or the tensor) cannot take
        number, where = draw(digits), draw(st.sampled_from(["shape", "data", "id"]))
        shape = f"[{number}]" if where == "shape" else "[1]"
        data = f"[{number}]" if where == "data" else json.dumps(values[:1])
        request_id = f'"id": {number}, ' if where == "id" else ""
        body = (
            f'{{{request_id}"inputs": [{{"name": "text", "datatype": "BYTES", '
            f'"shape": {shape}, "data": {data}}}]}}'
        )
    elif kind == "nested":
        depth = draw(st.integers(2, 3000))
        body = body.replace('"data": [', '"data": [' + _nested(depth, '"x"') + ", ", 1)
    elif kind == "raw-utf8":  # surrogates as raw (invalid) UTF-8 bytes, not as escapes
        raw = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return "minilm", raw, {"Content-Type": "application/json"}
    return "minilm", body.encode(), {"Content-Type": "application/json"}


def test_hostile_text_content_never_gets_a_5xx(minilm_server):
    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=text_content())
    def never_5xx(request: tuple[str, bytes, dict[str, str]]) -> None:
        name, body, headers = request
        url = f"{minilm_server.url}/v2/models/{name}/infer"
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text)
        document = response.json()  # always JSON
        assert response.status_code == 200 or document["error"]

    never_5xx()
    assert httpx.get(f"{minilm_server.url}/v2/health/ready").status_code == 200
    good = {"inputs": [_tensor("text", "BYTES", [1], ["still fine"])]}
    response = httpx.post(f"{minilm_server.url}/v2/models/minilm/infer", json=good, timeout=30)
    assert response.status_code == 200
    assert 'status="5' not in httpx.get(f"{minilm_server.url}/metrics").text
