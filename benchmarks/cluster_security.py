"""What token authentication and TLS cost a Ray cluster: the same 2-stage pipeline, per request,
on a local 2-node cluster started by ``edgec join`` with ``--secrets`` and without.

    python benchmarks/cluster_security.py --out benchmarks/results/cluster_security.json

minilm (fp32) is exported and split as a pipeline over devices ``board-a`` and ``board-b``
(batch 1, sequence 128). For each mode, ``edgec join --head`` and ``edgec join`` start the
cluster (with ``--secrets``: token authentication and mutual TLS; plain: ``--insecure``, token
authentication explicitly off), a coordinator process loads the package on the Ray backend,
checks its outputs equal the local backend's, and times ``--repeats`` requests after a warm-up.
Each request makes two hops (coordinator -> stage actor -> coordinator), each carrying the
stage's inputs and outputs through Ray. The modes alternate ``--rounds`` times (fresh clusters),
so a change in the machine's load reaches both.

Writes JSON to ``--out`` and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = ("board-a", "board-b")

_COORDINATOR = """
import json, sys, time
import numpy as np
from edgec.exporters.partition import planning_feeds
from edgec.runtimes import load_package
package, address, repeats, secrets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
local = load_package(package)
feeds = planning_feeds(local.manifest.inputs, 1, 128)
feeds["input_ids"] = (np.arange(128, dtype=np.int64).reshape(1, 128) % 90) + 1000
expected = local.run(feeds)
options = {"secrets": secrets} if secrets else {}
remote = load_package(package, backend="ray", address=address, timeout_s=120, **options)
try:
    for _ in range(3):
        got = remote.run(feeds)
    equal = all(np.array_equal(got[k], expected[k]) for k in expected)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        remote.run(feeds)
        times.append((time.perf_counter() - started) * 1e3)
finally:
    remote.close()
hops = len(local.manifest.stages)
print(json.dumps({"median_ms": float(np.median(times)), "hops": hops, "equal": bool(equal)}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _join(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgec.cli", "join", *args, "--num-cpus", "1", "--block"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_started(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)


def _stop(processes: list[subprocess.Popen[bytes]], ray_tmp: Path) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    # anything of this cluster left, by pid: its command line or environment (RAY_TMPDIR,
    # which Ray's workers inherit; Ray rewrites their command lines) names our temp dir
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
                if str(ray_tmp).encode() in seen:
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def run_mode(package: Path, secrets: Path | None, repeats: int, work: Path) -> dict[str, Any]:
    from edgec.cli_devices import _advertised_ip

    ip = _advertised_ip(True, None, None)
    port = _free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ecb", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    if secrets is None:
        env["RAY_AUTH_MODE"] = "disabled"  # plain, even where ~/.ray/auth_token exists
        extra = ["--insecure"]
    else:
        extra = ["--secrets", str(secrets)]
    mode = "secured" if secrets else "plain"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        head_log, worker_log = work / f"{mode}-head.log", work / f"{mode}-worker.log"
        processes.append(
            _join(["--head", "--device", DEVICES[0], "--port", str(port), *extra], head_log, env)
        )
        _wait_started(processes[0], head_log)
        address = f"{ip}:{port}"
        processes.append(
            _join(["--device", DEVICES[1], "--address", address, *extra], worker_log, env)
        )
        _wait_started(processes[1], worker_log)
        coordinator = subprocess.run(
            [sys.executable, "-c", _COORDINATOR, str(package), address, str(repeats),
             str(secrets or "")],
            capture_output=True, text=True, timeout=1200, env=env,
        )  # fmt: skip
        if coordinator.returncode != 0:
            raise RuntimeError(coordinator.stderr[-3000:])
        return dict(json.loads(coordinator.stdout.strip().splitlines()[-1]))
    finally:
        _stop(processes, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def markdown(result: dict[str, Any]) -> str:
    plain, secured = result["plain"], result["secured"]
    lines = [
        f"`{result['command']}` — {result['machine']}, load average {result['load_average_1min']}",
        "",
        "| cluster | ms per request (median of rounds) | rounds | outputs equal local |",
        "| --- | --- | --- | --- |",
        f"| plain (`--insecure`) | {plain['median_ms']} | {plain['rounds_ms']} | {plain['equal']} |",
        f"| token + TLS (`--secrets`) | {secured['median_ms']} | {secured['rounds_ms']} | "
        f"{secured['equal']} |",
        "",
        f"Token authentication and TLS add {result['added_ms_per_request']} ms per request, "
        f"{result['added_ms_per_hop']} ms per hop ({result['hops']} hops a request; "
        f"{result['bytes_between_stages']} bytes between the stages).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/cluster_security.json")
    )
    parser.add_argument("--source", default="minilm")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    from edgec.exporters import export
    from edgec.exporters.partition import partition_package
    from edgec.runtimes.cluster_secrets import create_cluster_secrets
    from edgec.runtimes.devices import DeviceProfile, DeviceSet, Link

    from edgec.cli_devices import _advertised_ip

    work = Path(tempfile.mkdtemp(prefix="edgec-bench-security-"))
    print(f"• exporting {args.source} and splitting it over {', '.join(DEVICES)}")
    export(args.source, work / "fp32")
    boards = DeviceSet(
        (DeviceProfile(DEVICES[0], threads=1), DeviceProfile(DEVICES[1], threads=1)),
        (Link(DEVICES, bandwidth_mbps=100_000, latency_ms=0.0),),
        entry=DEVICES[0],
        exit=DEVICES[1],
    )
    split = partition_package(work / "fp32", work / "pipeline", boards, "pipeline", "throughput")
    crossing = sum(e["bytes"] for e in split.manifest.edges if e["from"] != "input")
    secrets = create_cluster_secrets(
        work / "secrets", DEVICES, ("127.0.0.1", "localhost", _advertised_ip(True, None, None))
    ).root
    load_before = os.getloadavg()[0]
    rounds: dict[str, list[dict[str, Any]]] = {"plain": [], "secured": []}
    for i in range(args.rounds):
        for mode, given in (("plain", None), ("secured", secrets)):
            print(f"• round {i + 1}/{args.rounds}: {mode} cluster, {args.repeats} requests")
            rounds[mode].append(run_mode(work / "pipeline", given, args.repeats, work))
    summary: dict[str, dict[str, Any]] = {}
    for mode, runs in rounds.items():
        summary[mode] = {
            "median_ms": round(float(np.median([r["median_ms"] for r in runs])), 3),
            "rounds_ms": [round(r["median_ms"], 3) for r in runs],
            "equal": all(r["equal"] for r in runs),
        }
    hops = rounds["plain"][0]["hops"]
    added = summary["secured"]["median_ms"] - summary["plain"]["median_ms"]
    result = {
        "command": f"python benchmarks/cluster_security.py --repeats {args.repeats} --rounds "
        f"{args.rounds} --out {args.out}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "source": args.source,
        "batch": 1,
        "sequence": 128,
        "repeats": args.repeats,
        "hops": hops,
        "bytes_between_stages": crossing,
        "plain": summary["plain"],
        "secured": summary["secured"],
        "added_ms_per_request": round(added, 3),
        "added_ms_per_hop": round(added / hops, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
