"""The ASGI guard every request passes first: bearer token (401) and declared size (400, 413)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


class Guard:
    """Refuses requests without the bearer token, and bodies declared larger than the limit.

    The token comparison is constant-time (``hmac.compare_digest``). Bodies sent without a
    ``Content-Length`` are bounded again while they are read.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int):
        self.app = app
        self._expected = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self._expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await _reply(
                    send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")]
                )
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            # digits only: int() would take "-1", " 7" and "1_000"
            if not declared.isdigit() or len(declared) > 20:
                shown = declared[:40].decode("ascii", errors="backslashreplace")
                await _reply(
                    send, 400, f"Content-Length {shown!r} is not a non-negative whole number"
                )
                return
            size = int(declared)
            if size > self.max_body_bytes:
                await _reply(
                    send, 413, f"the request body of {size} bytes exceeds {self.max_body_bytes}"
                )
                return
        await self.app(scope, receive, send)


async def _reply(
    send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": message}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the request's body, if any, was never read
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
