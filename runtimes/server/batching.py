"""Dynamic batching: a bounded queue, a collector that forms batches, one inference thread.

Requests wait in a bounded queue (full: ``QueueFull``, answered 503). The collector takes the
oldest request, then waits until it is ``max_delay_ms`` old for more with the same batching key, up to
``max_batch`` rows, and runs the batch on a single worker thread while the next one gathers.
A request whose caller gave up (timeout, disconnect) leaves the queue at once, freeing its slot;
one whose deadline passed before its batch runs is skipped and fails with ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgec.errors import ServerError


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class Abandoned(Exception):
    """Every request of a batch was given up before the batch finished; nobody waits for it."""


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """``max_batch`` rows per batch; ``max_delay_ms`` to wait for a batch to fill; queue bound."""

    max_batch: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ServerError(f"max batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ServerError(f"max delay must be 0..10000 ms, got {self.max_delay_ms}")
        if self.max_queue < 1:
            raise ServerError(f"max queue must be at least 1, got {self.max_queue}")


@dataclass(eq=False)  # compared by identity: the queue removes this very request
class _Pending:
    work: Any
    key: tuple[Any, ...]
    rows: int
    future: asyncio.Future[Any]
    deadline: float | None = None  # time.perf_counter() by which the caller wants the answer
    enqueued: float = field(default_factory=time.perf_counter)

    def given_up(self) -> bool:
        """Its caller left (the future is done), or its deadline passed (then it fails so)."""
        if self.future.done():
            return True
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.future.set_exception(asyncio.TimeoutError("the deadline passed before it ran"))
            return True
        return False


RunBatch = Callable[[Sequence[Any]], list[Any]]
Observer = Callable[[int, float], None]  # (rows in the batch, seconds it ran)


class DynamicBatcher:
    """Collects submitted work into batches and runs ``run_batch`` on one worker thread.

    ``run_batch`` takes works sharing one key and returns one result (or exception) per work.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchingConfig,
        *,
        on_batch: Observer | None = None,
        on_depth: Callable[[int], None] | None = None,
    ):
        self._run_batch = run_batch
        self.config = config
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgec-infer")
        self._closing = False
        self._busy = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="edgec-batcher")

    async def submit(
        self, work: Any, key: tuple[Any, ...], rows: int, *, deadline: float | None = None
    ) -> Any:
        """Queue ``work`` and wait for its result; raises ``QueueFull``, ``TimeoutError`` (its
        ``deadline``, in ``time.perf_counter()`` seconds, passed before it ran) or its error.

        Cancelling the caller takes the work out of the queue at once.
        """
        if self._closing or self._wakeup is None:
            raise QueueFull("the server is shutting down")
        if len(self._queue) >= self.config.max_queue:
            raise QueueFull(f"the queue holds {len(self._queue)} requests already")
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(work, key, rows, future, deadline)
        self._queue.append(pending)
        self._report_depth()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(pending)
            raise

    def _forget(self, pending: _Pending) -> None:
        if any(p is pending for p in self._queue):
            self._queue = deque(p for p in self._queue if p is not pending)
            self._report_depth()

    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))

    async def _collect(self) -> None:
        assert self._wakeup is not None  # start() set it
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._gather()
            if batch:
                await self._run(batch)

    async def _gather(self) -> list[_Pending]:
        """The oldest live request plus compatible ones, waiting up to max_delay for more."""
        first = self._pop_live()
        if first is None:
            return []
        batch, rows = [first], first.rows
        # The delay bounds how long the oldest request waits in all (as Triton's queue delay): a
        # request that queued while the model was busy has waited already, so it goes at once.
        deadline = first.enqueued + self.config.max_delay_ms / 1000
        assert self._wakeup is not None
        while rows < self.config.max_batch:
            rows += self._take_compatible(batch, first.key, self.config.max_batch - rows)
            remaining = deadline - time.perf_counter()
            if rows >= self.config.max_batch or remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        self._report_depth()
        return batch

    def _pop_live(self) -> _Pending | None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.given_up():
                return pending
        return None

    def _take_compatible(self, batch: list[_Pending], key: tuple[Any, ...], room: int) -> int:
        taken = 0
        kept: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.given_up():
                continue
            if pending.key == key and pending.rows <= room - taken:
                batch.append(pending)
                taken += pending.rows
            else:
                kept.append(pending)
        self._queue = kept
        return taken

    async def _run(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.given_up()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._busy = True
        try:
            results = await loop.run_in_executor(
                self._worker, self._run_batch, [p.work for p in live]
            )
        except Exception as exc:  # the whole batch failed (e.g. a device is lost)
            results = [exc] * len(live)
        finally:
            self._busy = False
        if self._on_batch is not None:
            self._on_batch(sum(p.rows for p in live), time.perf_counter() - started)
        for pending, result in zip(live, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def close(self) -> None:
        """Refuse new work, let queued work finish, then stop the collector and the worker."""
        self._closing = True
        while (self._queue or self._busy) and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._worker.shutdown(wait=True)
