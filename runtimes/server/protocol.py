"""Open Inference Protocol (KServe v2) tensors: parse requests, write responses.

Covers JSON tensors and the binary tensor data extension (``Inference-Header-Content-Length``):
a JSON header followed by raw little-endian tensor bytes, in input order. Every malformed request
raises ``ProtocolError`` with a message naming the offending field or value; nothing else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgec.errors import InputError

HEADER_LENGTH = "inference-header-content-length"

# Open Inference Protocol datatype <-> numpy dtype; BYTES is a list of bytes/str.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
MAX_RANK = 8
# Digits of a JSON integer: UINT64's largest has 20. Longer ones are refused before Python parses
# them (its limit of 4300 digits raises a ValueError, and parsing costs time quadratic in length).
MAX_INTEGER_DIGITS = 40
# Media types an inference body may declare; none declared is taken as JSON (tritonclient sends
# none). ``curl -d`` declares application/x-www-form-urlencoded: it needs -H.
CONTENT_TYPES = ("application/json", "application/octet-stream")


class ProtocolError(InputError):
    """A request that does not follow the protocol or does not fit the model; answered 4xx."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A parsed request: named tensors (BYTES as object arrays of ``bytes``), outputs asked."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def datatype_of(dtype: np.dtype) -> str:
    if dtype.kind in "OSU":
        return "BYTES"
    return DATATYPE_OF[np.dtype(dtype).name]


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"invalid JSON: {name} is not a JSON number")


def _parse_integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ProtocolError(
            f"invalid JSON: an integer of {len(digits.lstrip('-'))} digits; "
            f"at most {MAX_INTEGER_DIGITS} are accepted"
        )
    return int(digits)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_int=_parse_integer)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError("invalid JSON: nested too deeply") from exc
    except ValueError as exc:  # any other number Python will not parse
        raise ProtocolError(f"invalid JSON: {exc}") from exc


def check_content_encoding(value: str | None) -> None:
    """Refuses (415) a compressed body: tritonclient's gzip and deflate are not supported."""
    encoding = (value or "identity").lower()
    if encoding != "identity":
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported", status=415)


def check_content_type(value: str | None) -> None:
    """Refuses (415) a body declared as anything but JSON or binary tensor data."""
    if value is None:
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        hint = " (curl -d sends it: add -H 'Content-Type: application/json')"
        raise ProtocolError(
            f"Content-Type {value!r} is not supported; send {' or '.join(CONTENT_TYPES)}"
            + (hint if media_type == "application/x-www-form-urlencoded" else ""),
            status=415,
        )


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split a request body into its JSON header and binary part, and decode every input."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                f"{len(body)}-byte body"
            )
        header, binary = body[:size], body[size:]
    document = _parse_json(header)
    if not isinstance(document, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(document, "request")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(raw_inputs):
        name, array, offset = _parse_input(index, item, binary, offset)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError(
            f"the binary part holds {len(binary)} bytes but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameter 'binary_data_output' must be true or false")
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_parse_outputs(document.get("outputs"), binary_default),
        binary_default=binary_default,
        parameters=parameters,
    )


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{what} 'parameters' must be a JSON object")
    return parameters


def _parse_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list of {'name': ...} objects")
    outputs = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{index}] must be an object with a string 'name'")
        binary = _parameters(item, f"outputs[{index}]").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"outputs[{index}] parameter 'binary_data' must be true or false")
        outputs.append(RequestedOutput(name=item["name"], binary=binary))
    return outputs


def _shape(where: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK:
        raise ProtocolError(f"{where} 'shape' must be a list of at most {MAX_RANK} sizes")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ProtocolError(f"{where} 'shape' {raw} must hold non-negative integers")
    return tuple(raw)


def _parse_input(index: int, item: Any, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict):
        raise ProtocolError(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{index}] needs a string 'name'")
    where = f"input {name!r}"
    datatype = item.get("datatype")
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise ProtocolError(
            f"{where}: unknown datatype {datatype!r}; known: {sorted([*DATATYPES, 'BYTES'])}"
        )
    shape = _shape(where, item.get("shape"))
    count = math.prod(shape)
    size = _parameters(item, where).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise ProtocolError(
                f"{where}: binary_data_size {size} runs past the end of the binary part "
                f"({len(binary) - offset} bytes left)"
            )
        chunk = binary[offset : offset + size]
        array = _from_binary(where, datatype, shape, count, chunk)
        return name, array, offset + size
    if "data" not in item:
        raise ProtocolError(f"{where} has neither 'data' nor a binary_data_size parameter")
    return name, _from_json(where, datatype, shape, count, item["data"]), offset


def _from_binary(
    where: str, datatype: str, shape: tuple[int, ...], count: int, chunk: bytes
) -> np.ndarray:
    if datatype == "BYTES":
        elements, position = [], 0
        while position < len(chunk):
            if position + 4 > len(chunk):
                raise ProtocolError(f"{where}: truncated BYTES element length at byte {position}")
            (length,) = struct.unpack_from("<I", chunk, position)
            position += 4
            if position + length > len(chunk):
                raise ProtocolError(f"{where}: BYTES element of {length} bytes is truncated")
            elements.append(chunk[position : position + length])
            position += length
        if len(elements) != count:
            raise ProtocolError(
                f"{where}: shape {list(shape)} needs {count} BYTES elements, got {len(elements)}"
            )
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(chunk)}"
        )
    return (
        np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    )


def _flatten(where: str, data: Any, count: int) -> list[Any]:
    """Row-major elements of ``data`` (flat or nested lists); stops early past ``count``."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: 'data' must be a list")
    flat: list[Any] = []
    stack: list[Any] = [data]
    while stack and len(flat) <= count:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        else:
            flat.append(value)
    if len(flat) != count or stack:
        held = "more" if len(flat) > count or stack else str(len(flat))
        raise ProtocolError(f"{where}: its shape needs {count} elements, 'data' holds {held}")
    return flat


def _from_json(
    where: str, datatype: str, shape: tuple[int, ...], count: int, data: Any
) -> np.ndarray:
    flat = _flatten(where, data, count)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [_utf8(where, index, v) for index, v in enumerate(flat)]
        return array.reshape(shape)
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in flat):
            raise ProtocolError(f"{where}: BOOL data must be true or false")
        return np.array(flat, dtype=bool).reshape(shape)
    bad = next((v for v in flat if isinstance(v, bool) or not isinstance(v, int | float)), None)
    if bad is not None:
        raise ProtocolError(f"{where}: {datatype} data must be numbers, got {bad!r}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        for v in flat:
            if isinstance(v, float) or not info.min <= v <= info.max:
                raise ProtocolError(f"{where}: {v!r} is not a {datatype} value")
        return np.array(flat, dtype=dtype).reshape(shape)
    with np.errstate(over="ignore"):
        array = np.array(flat, dtype=dtype)
    if not np.isfinite(array).all():
        raise ProtocolError(f"{where}: {datatype} value out of range for {datatype}")
    return array.reshape(shape)


def _utf8(where: str, index: int, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as the JSON escape \ud800
        raise ProtocolError(
            f"{where}: element {index} holds a lone surrogate {value[exc.start]!r} at character "
            f"{exc.start}; strings must be valid Unicode"
        ) from exc


def encode_response(
    model: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when any output travels as binary."""
    wanted = request.outputs
    if wanted is None:
        wanted = [RequestedOutput(name, request.binary_default) for name in outputs]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for item in wanted:
        value = outputs[item.name]
        tensor: dict[str, Any] = {
            "name": item.name,
            "datatype": datatype_of(value.dtype),
            "shape": list(value.shape),
        }
        if item.binary:
            raw = _to_binary(value)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _to_json(value)
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _to_binary(value: np.ndarray) -> bytes:
    if value.dtype.kind in "OSU":
        parts = []
        for element in value.reshape(-1):
            data = element if isinstance(element, bytes) else str(element).encode("utf-8")
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()


def _to_json(value: np.ndarray) -> list[Any]:
    flat = value.reshape(-1)
    if value.dtype.kind in "OSU":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()
