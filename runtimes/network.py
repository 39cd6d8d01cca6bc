"""The network a partitioned package was planned for, and its emulation on one machine.

A ``Network`` names where requests enter, where results go, and the links between devices
(latency and bandwidth). ``LinkEmulator`` makes a split run as if its devices were joined by
those links: before a stage runs, it waits the time its inputs would take to arrive from where
they were made (the entry, for raw inputs), and the results wait their trip to the exit. With it
a plan's end-to-end prediction can be checked on one machine.

Device side: no numpy needed beyond the arrays' ``nbytes``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgec.errors import PackageError

# Used where a package's network names no link between two of its devices.
DEFAULT_LINK = {"bandwidth_mbps": 1000.0, "latency_ms": 0.1}


@dataclass(frozen=True)
class Network:
    """``entry``/``exit`` devices and ``links``: ``{(a, b): (latency_ms, bandwidth_mbps)}``
    (either order)."""

    entry: str
    exit: str
    links: Mapping[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def transfer_ms(self, a: str, b: str, nbytes: float) -> float:
        """ms to move ``nbytes`` from ``a`` to ``b``; zero on one device."""
        if a == b:
            return 0.0
        latency, bandwidth = self.links.get(
            (a, b),
            self.links.get((b, a), (DEFAULT_LINK["latency_ms"], DEFAULT_LINK["bandwidth_mbps"])),
        )
        return latency + nbytes * 8 / (bandwidth * 1e6) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "exit": self.exit,
            "links": [
                {"between": [a, b], "latency_ms": lat, "bandwidth_mbps": bw}
                for (a, b), (lat, bw) in self.links.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> Network:
        if not isinstance(data, dict) or not isinstance(data.get("entry"), str):
            raise PackageError(f"manifest network must name an entry device, got {data!r}")
        links: dict[tuple[str, str], tuple[float, float]] = {}
        for link in data.get("links", []):
            try:
                a, b = (str(x) for x in link["between"])
                latency, bandwidth = float(link["latency_ms"]), float(link["bandwidth_mbps"])
            except (KeyError, TypeError, ValueError) as exc:
                raise PackageError(f"malformed network link {link!r}: {exc}") from exc
            if bandwidth <= 0 or latency < 0:
                raise PackageError(f"network link {link!r}: bandwidth > 0 and latency >= 0")
            links[(a, b)] = (latency, bandwidth)
        exit_ = data.get("exit", data["entry"])
        if not isinstance(exit_, str):
            raise PackageError(f"manifest network exit must name a device, got {exit_!r}")
        return cls(data["entry"], exit_, links)


class LinkEmulator:
    """Waits, per crossing, what the network's links would take.

    ``where`` maps each tensor to the device holding it; ``arrive`` moves tensors to a device
    (sleeping the slowest of their trips: links carry them in parallel from different
    devices, one after another from the same one) and records the ones sent. ``sent`` counts
    the bytes that crossed, per link direction.
    """

    def __init__(self, network: Network):
        self.network = network
        self.sent: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def arrive(
        self,
        tensors: Mapping[str, Any],
        names: Iterable[str],
        device: str,
        where: dict[str, str],
    ) -> None:
        by_source: dict[str, int] = {}
        for name in names:
            source = where.get(name, self.network.entry)
            if source != device:
                by_source[source] = by_source.get(source, 0) + int(tensors[name].nbytes)
        delay = max(
            (self.network.transfer_ms(s, device, n) for s, n in by_source.items()), default=0.0
        )
        with self._lock:
            for source, nbytes in by_source.items():
                key = (source, device)
                self.sent[key] = self.sent.get(key, 0) + nbytes
        if delay > 0:
            time.sleep(delay / 1e3)
