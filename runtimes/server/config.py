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
    request_timeout_s: float = 30.0  # from the body's arrival to the answer; beyond, 504
    body_timeout_s: float = 30.0  # to receive the whole body; beyond, 408
    max_body_bytes: int = 16 * 1024 * 1024  # beyond, 413
    max_request_rows: int = 1024  # rows in one request; beyond, 400
    # characters in one text; beyond, 413. Texts are cut at the tokenizer's maximum before they
    # are tokenized, so this bounds parsing and copying, not the model's work.
    max_text_chars: int = 100_000
    header_timeout_s: float = 10.0  # request line and headers; beyond, 408 (slowloris)
    max_connections: int = 128  # open at once; beyond, a new one gets 503 and is closed
    token: str | None = None

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ServerError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.body_timeout_s <= 0:
            raise ServerError(f"body timeout must be positive, got {self.body_timeout_s}")
        if self.header_timeout_s <= 0:
            raise ServerError(f"header timeout must be positive, got {self.header_timeout_s}")
        if self.max_connections < 1:
            raise ServerError(f"max connections must be at least 1, got {self.max_connections}")
        if self.max_text_chars < 1:
            raise ServerError(f"max text chars must be at least 1, got {self.max_text_chars}")
        if self.max_body_bytes < 1024:
            raise ServerError(f"max body must be at least 1024 bytes, got {self.max_body_bytes}")
        if self.max_request_rows < 1:
            raise ServerError(f"max request rows must be at least 1, got {self.max_request_rows}")
        if self.token is not None and not self.token:
            raise ServerError("the token is empty")
