"""The server's options, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass

from edgec.errors import ServerError


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Batching, limits and the optional bearer token. Sizes in bytes, times in ms or s."""

    max_batch: int = 16  # rows per batch; 1 turns dynamic batching off
    max_delay_ms: float = 5.0  # longest the oldest request waits for its batch to fill
    max_queue: int = 256  # requests waiting; beyond, 503
    request_timeout_s: float = 30.0  # from receipt to answer; beyond, 504
    max_body_bytes: int = 16 * 1024 * 1024  # beyond, 413
    max_request_rows: int = 1024  # rows in one request; beyond, 400
    token: str | None = None

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ServerError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ServerError(f"max body must be at least 1024 bytes, got {self.max_body_bytes}")
        if self.max_request_rows < 1:
            raise ServerError(f"max request rows must be at least 1, got {self.max_request_rows}")
        if self.token is not None and not self.token:
            raise ServerError("the token is empty")
