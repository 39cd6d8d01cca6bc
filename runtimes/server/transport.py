"""uvicorn's HTTP/1.1 protocols, refusing what they cannot parse with a JSON 400.

uvicorn refuses a request it cannot parse (``Content-Length: -1``, a bad chunk size, a header
with control characters) before the application sees it, with a plain-text ``Invalid HTTP
request received.``. These subclasses send the same refusal as ``{"error": ...}``, like every
other answer of the server, and close the connection as uvicorn does.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def malformed_response(message: str) -> bytes:
    """A complete HTTP/1.1 400 response with a JSON body, closing the connection."""
    body = json.dumps(
        {
            "error": f"malformed HTTP request: {message.rstrip('.')} "
            "(request line, headers, Content-Length or chunked framing)"
        }
    ).encode()
    head = (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n\r\n"
    ) % len(body)
    return head + body


class _JsonRefusal:
    transport: asyncio.Transport

    def send_400_response(self, msg: str) -> None:
        self.transport.write(malformed_response(msg))
        self.transport.close()


class JsonH11Protocol(_JsonRefusal, H11Protocol):
    """uvicorn's h11 protocol; malformed requests get a JSON 400."""


def http_protocol() -> type[asyncio.Protocol]:
    """The protocol uvicorn's ``http="auto"`` would pick (httptools when installed, else h11),
    with JSON refusals."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return JsonH11Protocol

    class JsonHttpToolsProtocol(_JsonRefusal, HttpToolsProtocol):
        """uvicorn's httptools protocol; malformed requests get a JSON 400."""

    return JsonHttpToolsProtocol
