"""What checking a manifest costs a device: edgec's schema checker against pydantic v2.

Each row is a fresh interpreter that imports numpy and onnxruntime (what every device process
holds), then checks one package's ``manifest.json`` ``--repeat`` times and reports its resident
memory (``VmRSS``) and peak (``VmHWM``) from ``/proc/self/status``, and the time per check:

- ``bare``: nothing checked (the baseline);
- ``edgec``: ``Manifest.from_json`` (``edgec.schema.check_json`` over the dataclasses);
- ``pydantic``: ``pydantic.TypeAdapter(Manifest).validate_python`` over the same dataclasses
  (pydantic's own support for them: the schema stated once, as the issue asked), then the
  same ``Manifest.from_json`` so both rows build the same objects.

    python benchmarks/schema_memory.py --package build/bench/fp32.pkg \\
        --out benchmarks/results/schema_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time
import numpy, onnxruntime

def status():
    found = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) * 1024
    return found

kind, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.loads(open(path, encoding="utf-8").read())
seconds = 0.0
if kind != "bare":
    from edgec.runtimes.manifest import Manifest
    check = Manifest.from_json
    if kind == "pydantic":
        import pydantic
        adapter = pydantic.TypeAdapter(Manifest)
        def check(data):
            adapter.validate_python(data)
            return Manifest.from_json(data)
    start = time.perf_counter()
    for _ in range(repeat):
        check(data)
    seconds = (time.perf_counter() - start) / repeat
print(json.dumps({**status(), "check_ms": seconds * 1e3}))
"""


def measure(kind: str, manifest: Path, repeat: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(manifest), str(repeat)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per row")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    manifest = args.package / "manifest.json"
    rows = {}
    for kind in ("bare", "edgec", "pydantic"):
        runs = [measure(kind, manifest, args.repeat) for _ in range(args.rounds)]
        rows[kind] = {key: min(run[key] for run in runs) for key in runs[0]}
    bare = rows["bare"]["VmRSS"]
    lines = [
        "| checker | resident MB | above bare MB | peak MB | ms per check |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, row in rows.items():
        lines.append(
            f"| {kind} | {row['VmRSS'] / 2**20:.1f} | {(row['VmRSS'] - bare) / 2**20:.1f} | "
            f"{row['VmHWM'] / 2**20:.1f} | {row['check_ms']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        result = {"package": str(args.package), "repeat": args.repeat, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
