"""Per-stage timing through the backend registry, without touching the executor.

``load_package(path, backend="timed", inner="local", on_stage=callback)`` wraps whichever
backend ``inner`` names (local, ray, ...) and reports each stage's seconds to ``callback``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgec.runtimes.backends import Backend, Feeds, create_backend, register_backend
from edgec.runtimes.package import Package

StageObserver = Callable[[str, float], None]


class TimedBackend:
    """Delegates to another backend and times every ``run_stage``."""

    def __init__(
        self,
        package: Package,
        *,
        inner: str = "local",
        on_stage: StageObserver | None = None,
        **options: Any,
    ):
        self._inner: Backend = create_backend(inner, package, **options)
        self._on_stage = on_stage

    def run_stage(self, stage: str, feeds: Feeds) -> Feeds:
        started = time.perf_counter()
        outputs = self._inner.run_stage(stage, feeds)
        if self._on_stage is not None:
            self._on_stage(stage, time.perf_counter() - started)
        return outputs

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else the inner backend offers
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class StageClock:
    """A stage observer whose sink is connected later (once the server's metrics exist)."""

    def __init__(self) -> None:
        self.sink: StageObserver | None = None

    def __call__(self, stage: str, seconds: float) -> None:
        if self.sink is not None:
            self.sink(stage, seconds)


register_backend("timed", TimedBackend)
