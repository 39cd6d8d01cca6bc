"""The dynamic batcher and length grouping, without a model: batches, keys, bounds, timeouts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
from edgec.runtimes.server.batching import BatchingConfig, DynamicBatcher, QueueFull
from edgec.runtimes.server.text import length_groups

from edgec.errors import ServerError


def _echo_batcher(config: BatchingConfig, seen: list[list[object]], delay: float = 0.0):  # type: ignore[no-untyped-def]
    def run(works):  # type: ignore[no-untyped-def]
        seen.append(list(works))
        time.sleep(delay)
        return [w if w != "boom" else ValueError("boom") for w in works]

    return DynamicBatcher(run, config)


def test_requests_are_joined_up_to_max_batch_and_never_across_keys():
    seen: list[list[object]] = []

    async def scenario() -> list[object]:
        batcher = _echo_batcher(BatchingConfig(max_batch=4, max_delay_ms=50), seen)
        batcher.start()
        works = [(f"a{i}", ("a",)) for i in range(6)] + [(f"b{i}", ("b",)) for i in range(3)]
        results = await asyncio.gather(*(batcher.submit(w, k, 1) for w, k in works))
        await batcher.close()
        return list(results)

    results = asyncio.run(scenario())
    assert results == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)]
    assert all(len(batch) <= 4 for batch in seen)
    assert all(len({str(w)[0] for w in batch}) == 1 for batch in seen)
    assert len(seen) < 9  # some requests shared a batch


def test_an_error_reaches_only_its_request():
    async def scenario() -> list[object]:
        batcher = _echo_batcher(BatchingConfig(max_batch=8, max_delay_ms=20), [])
        batcher.start()
        outcome = await asyncio.gather(
            *(batcher.submit(w, ("k",), 1) for w in ("x", "boom", "y")), return_exceptions=True
        )
        await batcher.close()
        return list(outcome)

    x, boom, y = asyncio.run(scenario())
    assert (x, y) == ("x", "y") and isinstance(boom, ValueError)


def test_a_full_queue_refuses_and_a_timed_out_request_never_runs():
    seen: list[list[object]] = []

    async def scenario() -> None:
        batcher = _echo_batcher(BatchingConfig(max_batch=1, max_queue=2, max_delay_ms=0), seen, 0.2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("first", ("k",), 1))
        await asyncio.sleep(0.05)  # "first" is running; the queue is empty
        late = asyncio.ensure_future(asyncio.wait_for(batcher.submit("late", ("k",), 1), 0.05))
        queued = asyncio.ensure_future(batcher.submit("queued", ("k",), 1))
        await asyncio.sleep(0.01)  # both are queued
        with pytest.raises(QueueFull):
            await batcher.submit("refused", ("k",), 1)
        with pytest.raises(asyncio.TimeoutError):
            await late
        assert await first == "first" and await queued == "queued"
        await batcher.close()

    asyncio.run(scenario())
    assert [w for batch in seen for w in batch] == ["first", "queued"]


def test_a_given_up_request_frees_its_slot_at_once():
    """max_queue 1 while a batch runs: the queued request's caller gives up, and a new request
    is queued in its place at once (it used to hold the slot until the batch ended)."""
    seen: list[list[object]] = []

    async def scenario() -> None:
        batcher = _echo_batcher(BatchingConfig(max_batch=1, max_queue=1, max_delay_ms=0), seen, 0.3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("running", ("k",), 1))
        await asyncio.sleep(0.05)  # "running" runs; the queue is empty
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit("gives up", ("k",), 1), 0.05)
        assert batcher.depth == 0
        assert await batcher.submit("next", ("k",), 1) == "next"  # not QueueFull
        assert await running == "running"
        await batcher.close()

    asyncio.run(scenario())
    assert [w for batch in seen for w in batch] == ["running", "next"]


def test_a_request_past_its_deadline_is_skipped():
    seen: list[list[object]] = []

    async def scenario() -> None:
        batcher = _echo_batcher(BatchingConfig(max_batch=1, max_delay_ms=0), seen, 0.2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("running", ("k",), 1))
        await asyncio.sleep(0.05)
        # queued behind "running", whose batch outlasts this deadline
        late = batcher.submit("late", ("k",), 1, deadline=time.perf_counter() + 0.05)
        with pytest.raises(asyncio.TimeoutError, match="deadline passed"):
            await late
        assert await running == "running"
        await batcher.close()

    asyncio.run(scenario())
    assert [w for batch in seen for w in batch] == ["running"]


def test_bad_settings_are_refused():
    with pytest.raises(ServerError, match="max batch must be at least 1, got 0"):
        BatchingConfig(max_batch=0)
    with pytest.raises(ServerError, match="max delay"):
        BatchingConfig(max_delay_ms=-1)


def test_length_groups_bound_padding_and_cover_every_row():
    lengths = np.array([5, 40, 6, 7, 38, 12, 5, 80, 41, 9])
    groups = length_groups(lengths, max_waste=0.25)
    assert sorted(int(i) for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * lengths[group].max()
        assert len(group) == 1 or padded <= 1.25 * lengths[group].sum()
    assert len(groups) < len(lengths)


def test_the_server_modules_load_neither_torch_nor_transformers():
    code = (
        "import sys, edgec.runtimes.server, edgec.runtimes.signing, edgec.cli_serve\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
