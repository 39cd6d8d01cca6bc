"""uvicorn's HTTP/1.1 protocols, with the limits a server on the open network needs below the
application, each refusal a JSON ``{"error": ...}`` like every other answer of the server.

- **Malformed requests**: uvicorn refuses what it cannot parse (``Content-Length: -1``, a bad
  chunk size, a header with control characters) before the application sees it, with a plain
  ``Invalid HTTP request received.``; here the same 400 is JSON, and the connection closes.
- **Slow headers**: uvicorn sets no deadline on a request's line and headers, so a client that
  sends them a byte a second (slowloris) holds a connection for as long as it likes. Here the
  request line and headers must arrive within ``header_timeout_s`` of the connection opening,
  or of the previous response on a kept-alive connection: else 408 where part of a request
  came, and the connection closes (an idle connection is closed without an answer, as
  uvicorn's keep-alive timeout closes it, so no client reads a 408 it did not ask for).
  (The body has its own deadline, in the application: ``body_timeout_s``.)
- **Connections**: beyond ``max_connections`` open at once, a new connection gets 503 and is
  closed at once, so sockets and memory stay bounded whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def refusal(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON ``{"error": message}`` body, closing the
    connection."""
    body = json.dumps({"error": message}).encode()
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n\r\n"
    ) % (status, _REASONS[status], len(body))
    return head + body


def malformed_response(message: str) -> bytes:
    """The 400 for a request HTTP itself cannot parse."""
    return refusal(
        400,
        f"malformed HTTP request: {message.rstrip('.')} "
        "(request line, headers, Content-Length or chunked framing)",
    )


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take before the application sees a request."""

    header_timeout_s: float = 10.0  # request line and headers, from the connection or last answer
    max_connections: int = 128  # open at once; beyond, 503 and close


class _Guarded:
    """Mixed into uvicorn's protocols (which hold ``transport``, ``loop``, ``cycle``, the server's
    ``connections`` and ``on_response_complete``): JSON refusals and the limits above."""

    limits = ConnectionLimits()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    connections: set[Any]
    _header_deadline: asyncio.TimerHandle | None = None
    _waiting_after: Any = None  # the cycle answered last; a new one means headers arrived
    _partial = False  # bytes of a request came since the deadline started

    def send_400_response(self, msg: str) -> None:
        self._refuse(malformed_response(msg))

    def _refuse(self, response: bytes) -> None:
        self._stop_header_deadline()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        crowded = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)  # type: ignore[misc]  # uvicorn's, via the protocol
        if crowded:
            limit = self.limits.max_connections
            self._refuse(refusal(503, f"the server holds {limit} connections (max_connections)"))
            return
        self._start_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        self._partial = True
        if self._header_deadline is not None and self.cycle is not self._waiting_after:
            self._stop_header_deadline()  # the request line and headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._start_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def _start_header_deadline(self) -> None:
        self._stop_header_deadline()
        self._waiting_after = self.cycle
        self._partial = False
        self._header_deadline = self.loop.call_later(
            self.limits.header_timeout_s, self._headers_too_slow
        )

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self._partial:
            self.transport.close()
            return
        timeout = self.limits.header_timeout_s
        self._refuse(
            refusal(408, f"the request line and headers did not arrive within {timeout} s")
        )


class JsonH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol with JSON refusals and connection limits."""


def http_protocol(limits: ConnectionLimits | None = None) -> type[asyncio.Protocol]:
    """The protocol uvicorn's ``http="auto"`` would pick (httptools when installed, else h11),
    with JSON refusals and ``limits``."""
    base: type[asyncio.Protocol] = H11Protocol
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    return type(
        f"Guarded{base.__name__}", (_Guarded, base), {"limits": limits or ConnectionLimits()}
    )
