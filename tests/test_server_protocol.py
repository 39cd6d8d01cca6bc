"""Open Inference Protocol codec: JSON and binary tensors in, responses out, errors named."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from edgec.runtimes.server.protocol import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    encode_response,
    parse_request,
)


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def test_json_tensors_flat_or_nested():
    body = _json(
        {
            "id": "r1",
            "inputs": [
                {"name": "a", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
                {"name": "b", "shape": [2], "datatype": "FP32", "data": [0.5, 1]},
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["héllo"]},
            ],
        }
    )
    request = parse_request(body, None)
    assert request.id == "r1"
    assert request.inputs["a"].dtype == np.int64 and request.inputs["a"].tolist() == [
        [1, 2],
        [3, 4],
    ]
    assert request.inputs["b"].dtype == np.float32
    assert request.inputs["text"].tolist() == ["héllo".encode()]
    assert request.outputs is None


def test_binary_tensors_round_trip():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    words = [b"edge", b""]
    raw_words = b"".join(struct.pack("<I", len(w)) + w for w in words)
    header = _json(
        {
            "inputs": [
                {
                    "name": "ids",
                    "shape": [2, 3],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": ids.nbytes},
                },
                {
                    "name": "words",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw_words)},
                },
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    )
    request = parse_request(header + ids.tobytes() + raw_words, str(len(header)))
    assert np.array_equal(request.inputs["ids"], ids)
    assert request.inputs["words"].tolist() == words
    assert request.outputs == [RequestedOutput("y", True), RequestedOutput("z", False)]

    y = np.linspace(0, 1, 4, dtype=np.float32).reshape(2, 2)
    body, length = encode_response("m", request, {"y": y, "z": np.array([b"a"], dtype=object)})
    assert length is not None
    document = json.loads(body[:length])
    assert document["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    assert document["outputs"][1]["data"] == ["a"]
    assert np.array_equal(np.frombuffer(body[length:], dtype=np.float32).reshape(2, 2), y)


def test_json_response_without_binary():
    request = InferRequest(id=None, inputs={}, outputs=None)
    body, length = encode_response("m", request, {"y": np.ones((1, 2), np.float32)})
    assert length is None
    assert json.loads(body)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}
    ]


def _input(**fields: object) -> bytes:
    tensor = {"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 2]}
    tensor.update(fields)
    return _json({"inputs": [tensor]})


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"{not json", None, "invalid JSON"),
        (
            b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
            None,
            "NaN is not a JSON number",
        ),
        (b"[]", None, "must be a JSON object"),
        (_json({"inputs": []}), None, "'inputs' must be a non-empty list"),
        (_input(datatype="FP128"), None, "unknown datatype 'FP128'"),
        (_input(shape=[3]), None, "needs 3 elements, 'data' holds 2"),
        (_input(shape=[1]), None, "needs 1 elements, 'data' holds more"),
        (_input(shape=[-2]), None, "non-negative integers"),
        (_input(shape="2"), None, "'shape' must be a list"),
        (_input(data=[1.5, 2]), None, "1.5 is not a INT64 value"),
        (_input(data=[1, 2**70]), None, "is not a INT64 value"),
        (_input(data=[1, "2"]), None, "must be numbers, got '2'"),
        (_input(data=[True, 2]), None, "must be numbers, got True"),
        (_input(datatype="FP16", data=[1e10, 0]), None, "out of range"),
        (_input(data=None), None, "'data' must be a list"),
        (_input(name=3), None, "needs a string 'name'"),
        (_input(datatype="BYTES", data=[1, 2]), None, "BYTES data must be strings"),
        (_input(), "99999", "is not a length within"),
        (_input(), "x", "is not a length within"),
        (_input(parameters={"binary_data_size": 99}), None, "runs past the end"),
        (
            _json({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1]}] * 2}),
            None,
            "given twice",
        ),
        (
            _json({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8"}]}),
            None,
            "neither 'data' nor",
        ),
        (
            _json(
                {
                    "inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1]}],
                    "outputs": [{"x": 1}],
                }
            ),
            None,
            r"outputs\[0\] must be an object",
        ),
        (b"[" * 100_000, None, "invalid JSON"),
    ],
)
def test_malformed_requests_are_named(body: bytes, header: str | None, message: str):
    with pytest.raises(ProtocolError, match=message):
        parse_request(body, header)


def _binary_header(size: int) -> bytes:
    tensor = {
        "name": "a",
        "shape": [2],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }
    return _json({"inputs": [tensor]})


def test_binary_size_must_match_shape():
    header = _binary_header(4)
    with pytest.raises(ProtocolError, match="needs 8 bytes, got 4"):
        parse_request(header + b"\0" * 4, str(len(header)))
    header = _binary_header(8)
    with pytest.raises(ProtocolError, match=r"holds 12 bytes but .* add up to 8"):
        parse_request(header + b"\0" * 12, str(len(header)))
