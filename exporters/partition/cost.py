"""The cost model: predicted ms of a node on a device, and of a stage's hops between devices.

``ms = flops / matmul speed + bytes touched / memory speed + per-operator overhead``, plus a
fixed cost per stage call, with the speeds from the device profile (measured by ``edgec profile-device``; assumed otherwise).
"""

from __future__ import annotations

from edgec.exporters.partition.graph import GraphProfile, NodeCost
from edgec.runtimes.devices import DeviceProfile


def node_ms(node: NodeCost, device: DeviceProfile) -> float:
    """Predicted time of one node on ``device``, in ms."""
    if node.op_type == "Constant":
        return 0.0
    speed = device.matmul_speed("gops_int8" if node.int8 else "gflops_fp32", node.flops)
    compute = node.flops / (speed * 1e9) * 1e3
    memory = node.bytes_touched / (device.speed("memory_gbps") * 1e9) * 1e3
    return compute + memory + device.speed("op_overhead_us") / 1e3


def stage_overhead_ms(device: DeviceProfile) -> float:
    """The fixed cost of one stage call on ``device`` (handing it its tensors), in ms."""
    return device.speed("stage_overhead_us") / 1e3


class CostTable:
    """Prefix sums of node times per device, so any segment's time is one subtraction (ms)."""

    def __init__(self, graph: GraphProfile, devices: tuple[DeviceProfile, ...]):
        self._prefix: dict[str, list[float]] = {}
        for device in devices:
            total, prefix = 0.0, [0.0]
            for node in graph.nodes:
                total += node_ms(node, device)
                prefix.append(total)
            self._prefix[device.name] = prefix
        self._overhead = {d.name: stage_overhead_ms(d) for d in devices}
        flops, prefix_flops = 0.0, [0.0]
        for node in graph.nodes:
            flops += node.flops
            prefix_flops.append(flops)
        self._flops = prefix_flops

    def segment_ms(self, device: str, start: int, stop: int) -> float:
        """Nodes ``[start, stop)`` run as one stage on ``device``: their time and the call's."""
        prefix = self._prefix[device]
        return prefix[stop] - prefix[start] + self._overhead[device]

    def segment_flops(self, start: int, stop: int) -> float:
        return self._flops[stop] - self._flops[start]
