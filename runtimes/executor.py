"""Runs a package's stage graph over tensors: a chain of stages, or parallel stages aggregated.

``Executor.run`` serves one request; ``Executor.run_many`` streams requests through the stages
so that stage k works on request i while stage k+1 works on request i-1 (a pipeline: one
thread per stage; onnxruntime releases the GIL while it computes).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from edgec.runtimes.aggregation import aggregate
from edgec.runtimes.backends import Backend, Feeds
from edgec.runtimes.manifest import Manifest, StageInfo
from edgec.runtimes.network import LinkEmulator, Network

from edgec.errors import PackageError

_STOP = object()


def _run_stage(backend: Backend, stage: StageInfo, tensors: dict[str, np.ndarray]) -> Feeds:
    missing = [name for name in stage.inputs if name not in tensors]
    if missing:
        raise PackageError(f"stage {stage.name!r} needs {missing}, which no earlier stage makes")
    return backend.run_stage(stage.name, {n: tensors[n] for n in stage.inputs})


def run_chain(executor: Executor, feeds: Feeds) -> Feeds:
    """Every stage in manifest (topological) order; each reads inputs or earlier outputs."""
    tensors: dict[str, np.ndarray] = dict(feeds)
    where: dict[str, str] = {}
    for stage in executor.manifest.stages:
        executor.arrive(tensors, stage.inputs, stage.device, where)
        made = _run_stage(executor.backend, stage, tensors)
        tensors.update(made)
        where.update(dict.fromkeys(made, stage.device))
    return executor.deliver(tensors, where)


def batch_slices(shares: list[float], batch: int) -> list[tuple[int, int]]:
    """Split ``batch`` rows by ``shares`` (largest remainder); a stage may get zero rows."""
    total = sum(shares)
    exact = [batch * s / total for s in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: batch - sum(counts)]:
        counts[i] += 1
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def run_data_parallel(executor: Executor, feeds: Feeds) -> Feeds:
    """Split the batch (axis 0 of every batched input) over the stages; aggregate the outputs."""
    manifest = executor.manifest
    batched = [t.name for t in manifest.inputs if t.shape and isinstance(t.shape[0], str)]
    if not batched:
        raise PackageError("a data-parallel package needs inputs with a symbolic batch axis")
    batch = int(feeds[batched[0]].shape[0])
    shares = [1.0 if s.batch_share is None else s.batch_share for s in manifest.stages]
    jobs = []

    def run_part(stage: StageInfo, part: Feeds) -> Feeds:
        executor.arrive(part, stage.inputs, stage.device, {})
        made = _run_stage(executor.backend, stage, part)
        executor.arrive(made, made, executor.exit, dict.fromkeys(made, stage.device))
        return made

    for stage, (lo, hi) in zip(manifest.stages, batch_slices(shares, batch), strict=True):
        if hi > lo:
            part = {n: (v[lo:hi] if n in batched else v) for n, v in feeds.items()}
            jobs.append(executor.pool.submit(run_part, stage, part))
    results = [job.result() for job in jobs]
    kind = manifest.aggregation.get("kind", "concat")
    options = {k: v for k, v in manifest.aggregation.items() if k != "kind"}
    return {
        out.name: aggregate(kind, [r[out.name] for r in results], options)
        for out in manifest.outputs
    }


def run_groups(executor: Executor, feeds: Feeds) -> Feeds:
    """Head-parallel: stage groups in order (``StageInfo.group``); the stages of a group run at
    once on the same tensors and their same-named outputs are summed (the aggregation)."""
    manifest = executor.manifest
    groups: dict[int, list[StageInfo]] = {}
    for stage in manifest.stages:
        groups.setdefault(stage.group or 0, []).append(stage)
    kind = manifest.aggregation.get("kind", "sum")
    tensors: dict[str, np.ndarray] = dict(feeds)
    where: dict[str, str] = {}
    coordinator = executor.entry  # where the partial results are summed: the shared parts' device

    def run_slice(stage: StageInfo) -> Feeds:
        executor.arrive(tensors, stage.inputs, stage.device, where)
        made = _run_stage(executor.backend, stage, tensors)
        executor.arrive(made, made, coordinator, dict.fromkeys(made, stage.device))
        return made

    for _, stages in sorted(groups.items()):
        if len(stages) == 1:
            executor.arrive(tensors, stages[0].inputs, stages[0].device, where)
            made = _run_stage(executor.backend, stages[0], tensors)
            tensors.update(made)
            if stages[0].units is None:  # a shared part, not a block's only slice
                coordinator = stages[0].device
            where.update(dict.fromkeys(made, stages[0].device))
            continue
        parts = [job.result() for job in [executor.pool.submit(run_slice, s) for s in stages]]
        for name in parts[0]:
            tensors[name] = aggregate(kind, [p[name] for p in parts])
            where[name] = coordinator
    return executor.deliver(tensors, where)


Run = Callable[["Executor", Feeds], Feeds]
# How a manifest's stages run (``Manifest.execution``); each partition strategy names one.
EXECUTORS: dict[str, Run] = {
    "chain": run_chain,
    "batch": run_data_parallel,
    "groups": run_groups,
}


class Executor:
    """A manifest's stage graph over a backend. Thread-safe: requests may overlap.

    With ``network``, every crossing between stages on different devices (and the request's
    trip from the entry and back to the exit) waits what the network's links would take
    (``LinkEmulator``), so that a split's end-to-end time can be measured on one machine.
    """

    def __init__(self, manifest: Manifest, backend: Backend, network: Network | None = None):
        if manifest.execution not in EXECUTORS:
            raise PackageError(
                f"package execution {manifest.execution!r} (strategy {manifest.strategy!r}) "
                f"is unknown to this edgec; known: {sorted(EXECUTORS)}"
            )
        self.manifest = manifest
        self.backend = backend
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(manifest.stages)))
        self._run = EXECUTORS[manifest.execution]
        self.emulator = None if network is None else LinkEmulator(network)

    @property
    def entry(self) -> str:
        return self.emulator.network.entry if self.emulator else ""

    @property
    def exit(self) -> str:
        return self.emulator.network.exit if self.emulator else ""

    def arrive(self, tensors: Feeds, names: Any, device: str, where: dict[str, str]) -> None:
        """Wait, when emulating links, for ``names`` to reach ``device`` (see ``where``)."""
        if self.emulator is not None:
            self.emulator.arrive(tensors, names, device, where)

    def deliver(self, tensors: Feeds, where: dict[str, str]) -> Feeds:
        """The model's outputs, after (when emulating) their trip to the exit."""
        names = [out.name for out in self.manifest.outputs]
        self.arrive(tensors, names, self.exit, where)
        return {name: tensors[name] for name in names}

    def run(self, feeds: Feeds) -> Feeds:
        return self._run(self, feeds)

    def run_many(self, requests: Iterable[Feeds]) -> list[Feeds]:
        """Results of every request, in order. A chain of stages works as a pipeline.

        Raises the first request's error after every request has finished.
        """
        items = list(requests)
        if self._run is not run_chain or len(self.manifest.stages) < 2:
            return [self.run(feeds) for feeds in items]
        stages = self.manifest.stages
        queues: list[queue.Queue[Any]] = [queue.Queue() for _ in range(len(stages) + 1)]

        def work(index: int) -> None:
            stage = stages[index]
            while (item := queues[index].get()) is not _STOP:
                number, tensors, where, error = item
                if error is None:
                    try:
                        self.arrive(tensors, stage.inputs, stage.device, where)
                        made = _run_stage(self.backend, stage, tensors)
                        tensors.update(made)
                        where.update(dict.fromkeys(made, stage.device))
                        if index == len(stages) - 1:
                            self.deliver(tensors, where)
                    except BaseException as exc:  # handed to the caller with its request
                        error = exc
                queues[index + 1].put((number, tensors, where, error))
            queues[index + 1].put(_STOP)

        threads = [
            threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(stages))
        ]
        for thread in threads:
            thread.start()
        for number, feeds in enumerate(items):
            queues[0].put((number, dict(feeds), {}, None))
        queues[0].put(_STOP)
        done: dict[int, tuple[dict[str, np.ndarray], BaseException | None]] = {}
        while (item := queues[-1].get()) is not _STOP:
            done[item[0]] = (item[1], item[3])
        for thread in threads:
            thread.join()
        for number in range(len(items)):
            error = done[number][1]
            if error is not None:
                raise error
        names = [out.name for out in self.manifest.outputs]
        return [{n: done[i][0][n] for n in names} for i in range(len(items))]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def execute(manifest: Manifest, backend: Backend, feeds: Feeds) -> Feeds:
    """One request through a one-off executor (``Executor`` keeps its threads between calls)."""
    executor = Executor(manifest, backend)
    try:
        return executor.run(feeds)
    finally:
        executor.close()
