"""Device profiles: what each device is (providers, threads, memory) and how fast it computes.

A profile file is YAML::

    devices:
      - {name: board-a, providers: [CPUExecutionProvider], threads: 1, memory_mb: 60}
    links:
      - {between: [board-a, board-b], bandwidth_mbps: 100, latency_ms: 2}
    entry: board-a      # where requests enter (default: the first device)
    exit: board-a       # where results go (default: the entry)

with optional measured fields per device (``edgec profile-device`` writes them):
``gflops_fp32`` and ``gops_int8`` (matmul throughput, 1e9 operations/s), ``memory_gbps``
(elementwise traffic, 1e9 bytes/s), ``op_overhead_us`` (fixed cost per operator, µs),
``stage_overhead_us`` (fixed cost per stage call: the runtime handing a stage its tensors on a
worker thread and taking its outputs back, µs), and
``matmul_fp32_curve`` / ``matmul_int8_curve``: ``[[mflop, gflops], ...]`` pairs, the speed
measured per matmul size (small matmuls run far below the peak).
Torch-free: the planner and the device both read it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from edgec.runtimes.manifest import DeviceInfo
from edgec.runtimes.network import Network

from edgec.errors import DeviceError
from edgec.schema import check_json

MB = 1_000_000  # memory_mb counts decimal megabytes, as package sizes do
# Used only where a profile states no measurement; the plan reports that it assumed them.
ASSUMED = {
    "gflops_fp32": 20.0,
    "gops_int8": 40.0,
    "memory_gbps": 5.0,
    "op_overhead_us": 5.0,
    "stage_overhead_us": 50.0,
}
ASSUMED_LINK = {"bandwidth_mbps": 1000.0, "latency_ms": 0.1}
CURVES = {"gflops_fp32": "matmul_fp32_curve", "gops_int8": "matmul_int8_curve"}


def _positive(owner: str, key: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise DeviceError(f"{owner}: {key} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DeviceProfile:
    """One device. ``memory_mb`` (1e6 bytes) bounds what its stage may hold; None: unbounded."""

    name: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    memory_mb: float | None = None
    gflops_fp32: float | None = None
    gops_int8: float | None = None
    memory_gbps: float | None = None
    op_overhead_us: float | None = None
    stage_overhead_us: float | None = None
    matmul_fp32_curve: tuple[tuple[float, float], ...] = ()
    matmul_int8_curve: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DeviceError(f"device name must be a non-empty string, got {self.name!r}")
        if not self.providers or not all(isinstance(p, str) for p in self.providers):
            raise DeviceError(f"device {self.name!r}: providers must list provider names")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise DeviceError(f"device {self.name!r}: threads must be an integer >= 0")
        for key in ("memory_mb", *ASSUMED):
            _positive(f"device {self.name!r}", key, getattr(self, key))
        for key in CURVES.values():
            for point in getattr(self, key):
                if len(point) != 2 or min(point) <= 0:
                    raise DeviceError(
                        f"device {self.name!r}: {key} needs [mflop, gflops] pairs > 0, got {point!r}"
                    )

    def matmul_speed(self, key: str, flops: float) -> float:
        """1e9 operations/s of a matmul of ``flops`` operations: the measured curve
        interpolated in log size, else the single figure ``key``."""
        curve = sorted(getattr(self, CURVES[key]))
        if not curve:
            return self.speed(key)
        mflop = max(flops / 1e6, 1e-9)
        if mflop <= curve[0][0]:
            return curve[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(curve):
            if mflop <= x1:
                t = (math.log(mflop) - math.log(x0)) / (math.log(x1) - math.log(x0))
                return y0 + t * (y1 - y0)
        return curve[-1][1]

    def speed(self, key: str) -> float:
        """A measured figure, or the stated assumption when the profile has none."""
        value = getattr(self, key)
        return float(ASSUMED[key] if value is None else value)

    def assumed(self) -> list[str]:
        """The speed fields this profile does not measure."""
        return [key for key in ASSUMED if getattr(self, key) is None]

    @property
    def memory_bytes(self) -> float | None:
        return None if self.memory_mb is None else self.memory_mb * MB

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "providers": list(self.providers),
            "threads": self.threads,
            "memory_mb": self.memory_mb,
        }
        data.update({k: getattr(self, k) for k in ASSUMED if getattr(self, k) is not None})
        data.update(
            {k: [list(p) for p in getattr(self, k)] for k in CURVES.values() if getattr(self, k)}
        )
        return data

    def to_device_info(self) -> DeviceInfo:
        extra = {k: v for k, v in self.to_json().items() if k in ASSUMED or k in CURVES.values()}
        return DeviceInfo(self.name, self.providers, self.threads, self.memory_mb, extra)

    @classmethod
    def from_json(cls, data: Any, where: str = "device") -> DeviceProfile:
        """A device from its JSON/YAML; ``DeviceError`` naming the field for a value of the
        wrong form or an unknown key (the annotations are the schema: ``edgec.schema``)."""
        check_json(data, cls, where, error=DeviceError)
        return cls(
            **{
                **data,
                "providers": tuple(data.get("providers", ("CPUExecutionProvider",))),
                **{k: tuple(map(tuple, data.get(k, ()))) for k in CURVES.values()},
            }
        )


@dataclass(frozen=True)
class Link:
    """A network link between two devices: bandwidth in megabits/s, latency in ms."""

    between: tuple[str, str]
    bandwidth_mbps: float = ASSUMED_LINK["bandwidth_mbps"]
    latency_ms: float = ASSUMED_LINK["latency_ms"]

    def __post_init__(self) -> None:
        owner = f"link {list(self.between)}"
        _positive(owner, "bandwidth_mbps", self.bandwidth_mbps, allow_none=False)
        if isinstance(self.latency_ms, bool) or not isinstance(self.latency_ms, int | float):
            raise DeviceError(f"{owner}: latency_ms must be a number, got {self.latency_ms!r}")
        if self.latency_ms < 0:
            raise DeviceError(f"{owner}: latency_ms must be >= 0, got {self.latency_ms}")

    def transfer_ms(self, nbytes: float) -> float:
        """Time to move ``nbytes`` bytes over this link, in ms."""
        return self.latency_ms + nbytes * 8 / (self.bandwidth_mbps * 1e6) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "between": list(self.between),
            "bandwidth_mbps": self.bandwidth_mbps,
            "latency_ms": self.latency_ms,
        }


@dataclass(frozen=True)
class DeviceSet:
    """The devices a plan may use, in the order given, the links between them, and where
    requests enter (``entry``: their raw inputs live there) and results go (``exit``)."""

    devices: tuple[DeviceProfile, ...]
    links: tuple[Link, ...] = field(default=())
    entry: str | None = None
    exit: str | None = None

    def __post_init__(self) -> None:
        if not self.devices:
            raise DeviceError("a device profile file must list at least one device")
        names = [d.name for d in self.devices]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DeviceError(f"device name(s) {duplicates} appear more than once")
        for key in ("entry", "exit"):
            value = getattr(self, key)
            if value is not None and value not in names:
                raise DeviceError(f"{key} {value!r} is not a listed device; known: {names}")
        for link in self.links:
            for end in link.between:
                if end not in names:
                    raise DeviceError(f"link {list(link.between)} names unknown device {end!r}")

    @property
    def entry_device(self) -> str:
        """Where requests enter (their raw inputs live): ``entry``, else the first device."""
        return self.entry or self.devices[0].name

    @property
    def exit_device(self) -> str:
        """Where results go: ``exit``, else where requests entered."""
        return self.exit or self.entry_device

    def device(self, name: str) -> DeviceProfile:
        for device in self.devices:
            if device.name == name:
                return device
        raise DeviceError(f"unknown device {name!r}; known: {[d.name for d in self.devices]}")

    def link(self, a: str, b: str) -> Link:
        """The link between ``a`` and ``b``; an unstated link is assumed (``ASSUMED_LINK``)."""
        for link in self.links:
            if set(link.between) == {a, b}:
                return link
        return Link((a, b), **ASSUMED_LINK)

    def transfer_ms(self, a: str, b: str, nbytes: float) -> float:
        """ms to move ``nbytes`` bytes from ``a`` to ``b``; zero on the same device."""
        return 0.0 if a == b else self.link(a, b).transfer_ms(nbytes)

    def network(self, used: set[str] | None = None) -> Network:
        """Entry, exit and the links among ``used`` devices (all by default), as a split
        package records them (``edgec.runtimes.network``)."""
        names = used or {d.name for d in self.devices}
        links = {}
        for a in sorted(names | {self.entry_device, self.exit_device}):
            for b in sorted(names | {self.entry_device, self.exit_device}):
                if a < b:
                    link = self.link(a, b)
                    links[(a, b)] = (float(link.latency_ms), float(link.bandwidth_mbps))
        return Network(self.entry_device, self.exit_device, links)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "devices": [d.to_json() for d in self.devices],
            "links": [link.to_json() for link in self.links],
        }
        data.update({k: getattr(self, k) for k in ("entry", "exit") if getattr(self, k)})
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "device profiles") -> DeviceSet:
        """Devices, links, entry and exit from a profile file's JSON/YAML; ``DeviceError``
        naming the field (``devices.yaml.devices[1].threads``) for anything of the wrong form."""
        if isinstance(data, dict) and data.get("links", ()) is None:
            data = {**data, "links": []}  # YAML's `links:` with nothing under it
        check_json(data, cls, where, error=DeviceError)
        devices = tuple(
            DeviceProfile.from_json(d, f"{where}.devices[{i}]")
            for i, d in enumerate(data["devices"])
        )
        links = tuple(
            Link(**{**link, "between": tuple(link["between"])}) for link in data.get("links", ())
        )
        return cls(devices, links, data.get("entry"), data.get("exit"))


def load_devices(path: str | Path) -> DeviceSet:
    """Read and validate a device profile YAML file."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeviceError(f"cannot read device profiles {str(file)!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DeviceError(f"{file}: not valid YAML ({exc})") from exc
    return DeviceSet.from_json(data, file.name)


def save_devices(devices: DeviceSet, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(devices.to_json(), sort_keys=False), encoding="utf-8")
