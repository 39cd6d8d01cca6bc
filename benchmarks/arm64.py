"""aarch64 under qemu-user: the compression benchmark's fidelity recomputed from aarch64 outputs,
where the outputs part per operator (on each emulated CPU), the device install, the server, and
tiny-vit-digits there and here.

    python benchmarks/arm64.py --out benchmarks/results/arm64.json

Needs root and Debian's debootstrap, qemu-user-static and binfmt-support (``edgec.emulated``
makes the arm64 root in ``--root`` once and reuses it), and the packages of the compression
benchmark in ``--bench`` (``python benchmarks/compression.py --reuse`` makes them). The minilm
packages' tables (fp32, int8, balanced, smallest, pipeline and heads splits) come from
``scripts/arm64-check`` (README, "Running on ARM"); here: the digits packages' tables; every
node of ``int8`` and ``balanced`` compared on each CPU of ``--cpus`` (``edgec.crosscheck.
diagnose``: chained, and replayed on the same inputs); ``serve-on-device`` in the root; and
fidelity: the held-out sets of ``benchmarks/compression.py`` (200 bundled sentences, 200
Wikipedia sentences) through each recipe whose outputs differ on aarch64, pooled and compared
with torch fp32 by that benchmark's own functions, beside the same here; the recipe's floor
must hold on aarch64. Emulated seconds are recorded to size CI, not as a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from compression import _cosines, _pool, _torch_variant  # the compression benchmark's own

from edgec.crosscheck import (
    LocalSide,
    Side,
    check_package,
    diagnose,
    format_divergence,
    format_report,
)
from edgec.emulated import ChrootSide, Root, check_server

CHECKOUT = Path(__file__).resolve().parent.parent
RECIPES = ["fp32", "int8", "balanced", "smallest"]  # minilm packages of the compression benchmark
# Emulated CPUs: qemu's default (every feature: dot product, i8mm, SVE), a Raspberry Pi 5's
# (dot product), a Pi 4's (plain NEON): onnxruntime's int8 kernels differ between them.
CPUS = ["max", "cortex-a76", "cortex-a72"]
NODE_PACKAGES = ["int8", "balanced"]  # every node compared, on every CPU of --cpus
SERVED = "digits-balanced"  # scripts/arm64-check --server serves fp32 minilm
# Fidelity on aarch64 for the recipes whose outputs differ there (int8 activations); fp32's are
# within 1e-4 of x86's, so its held-out cosines are x86's.
FIDELITY_RECIPES = ["int8", "balanced", "smallest"]
DIGITS = ["digits-fp32", "digits-balanced"]
IMAGES = 64


class Reused:
    """A side whose outputs already in ``--work`` are kept (``--reuse``): the probes are
    seeded, so a rerun writes the same inputs, and only what is missing runs."""

    def __init__(self, side: Side):
        self.side, self.name = side, side.name

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        if out.exists():
            log(f"reusing {out}")
            return
        self.side.run(package_dir, probe, out, command)


def log(message: str) -> None:
    print(f"• {message}", file=sys.stderr, flush=True)


def fidelity(
    bench: Path, work: Path, here: Side, there: Side
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per recipe: cosine of pooled embeddings against torch fp32 on the compression benchmark's
    held-out sets, from the aarch64 outputs and from this machine's; the recipe's floor."""
    from edgec.compressor.calibration import load_data
    from edgec.compressor.recipe import BUILTIN_RECIPES
    from edgec.models import load_model

    model, spec = load_model("minilm")
    data = load_data(spec)
    assert data.off_domain is not None, "minilm's bundled sample has an off-domain set"
    sets = {"": data.evaluation.batches, "off_": data.off_domain.batches}
    batches = {
        f"{prefix}{i}:{name}": value
        for prefix, held in sets.items()
        for i, batch in enumerate(held)
        for name, value in batch.items()
    }
    work.mkdir(parents=True, exist_ok=True)
    for prefix, name in (("", "held"), ("off_", "off")):  # a file per set: twice the processes
        chosen = {
            k: v for k, v in batches.items() if k.split(":")[0].rstrip("0123456789") == prefix
        }
        np.savez(work / f"heldout-{name}.npz", **chosen)
    reference_run = _torch_variant("torch fp32 (eager)", model, 0).make()
    references = {
        prefix: np.concatenate([_pool(reference_run(b), b["attention_mask"]) for b in held])
        for prefix, held in sets.items()
    }
    rows, timing = [], {}
    jobs = [(recipe, name) for recipe in FIDELITY_RECIPES for name in ("held", "off")]

    def out(recipe: str, name: str, key: str) -> Path:
        return work / f"heldout-{recipe}-{name}-{key}.npz"

    for recipe, name in jobs:  # here first (fast), then every recipe and set there at once
        probe = work / f"heldout-{name}.npz"
        here.run(bench / f"{recipe}.pkg", probe, out(recipe, name, "x86"), "batches")

    def run_there(job: tuple[str, str]) -> None:
        recipe, name = job
        log(f"held-out set {name} through {recipe} on {there.name}")
        started = time.time()
        probe = work / f"heldout-{name}.npz"
        there.run(bench / f"{recipe}.pkg", probe, out(recipe, name, "aarch64"), "batches")
        timing[f"{recipe} {name}"] = round(time.time() - started, 1)

    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(run_there, jobs))
    for recipe in FIDELITY_RECIPES:
        row: dict[str, Any] = {"package": recipe}
        floor = BUILTIN_RECIPES[recipe].floor.min_cosine if recipe in BUILTIN_RECIPES else None
        row["floor_min_cosine"] = floor
        for key in ("x86", "aarch64"):
            for (prefix, held), name in zip(sets.items(), ("held", "off"), strict=True):
                with np.load(out(recipe, name, key)) as result:
                    pooled = np.concatenate(
                        [
                            _pool(result[f"{prefix}{i}:last_hidden_state"], b["attention_mask"])
                            for i, b in enumerate(held)
                        ]
                    )
                cos = _cosines(references[prefix], pooled)
                row.update({f"{key}_{prefix}{k}": v for k, v in cos.items()})
                row[f"_{key}_{prefix}pooled"] = pooled
        for prefix in sets:
            between = _cosines(row.pop(f"_x86_{prefix}pooled"), row.pop(f"_aarch64_{prefix}pooled"))
            row[f"aarch64_vs_x86_{prefix}cos_min"] = between["cos_min"]
            if floor is not None:
                row[f"{prefix}floor_holds"] = row[f"aarch64_{prefix}cos_min"] >= floor
        rows.append(row)
    return rows, timing


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Measured with `{result['command']}`: here {result['machine']['here']}, there "
        f"{result['machine']['there']} (qemu-user), onnxruntime {result['machine']['onnxruntime']} "
        "on both.",
        "",
        "| package | kind | stages | output | max abs diff | range | min cos | mean cos | top-1 agree | within |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["packages"]:
        tol = p["tolerance"]
        limit = (
            f"≤ {tol['max_abs']:g} abs"
            if tol["max_abs"] is not None
            else f"cos ≥ {tol['min_cosine']}"
        )
        for o in p["outputs"]:
            agree = f"{o['top1_agreement_%']:.1f}%" if "top1_agreement_%" in o else "–"
            lines.append(
                f"| {p['package']} | {p['kind']} | {len(p['stages'])} | {o['output']} "
                f"{'×'.join(map(str, o['shape']))} | {o['max_abs_diff']:.3g} | {o['range']:.3g} | "
                f"{o['min_cosine']:.7f} | {o['mean_cosine']:.7f} | {agree} | "
                f"{'yes' if p['passed'] else 'NO'} ({limit}) |"
            )
    lines += [
        "",
        "Fidelity against torch fp32 (the compression benchmark's held-out sets: 200 bundled "
        "sentences / 200 Wikipedia sentences), min / mean cosine:",
        "",
        "| package | x86 held-out | aarch64 held-out | x86 off-domain | aarch64 off-domain | aarch64 vs x86 min (held-out / off) | floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["fidelity"]:
        floor = "–"
        if r["floor_min_cosine"] is not None:
            holds = r["floor_holds"] and r["off_floor_holds"]
            floor = f"{r['floor_min_cosine']} ({'holds' if holds else 'MISSED'})"
        lines.append(
            f"| {r['package']} | {r['x86_cos_min']:.4f} / {r['x86_cos_mean']:.4f} | "
            f"{r['aarch64_cos_min']:.4f} / {r['aarch64_cos_mean']:.4f} | "
            f"{r['x86_off_cos_min']:.4f} / {r['x86_off_cos_mean']:.4f} | "
            f"{r['aarch64_off_cos_min']:.4f} / {r['aarch64_off_cos_mean']:.4f} | "
            f"{r['aarch64_vs_x86_cos_min']:.5f} / {r['aarch64_vs_x86_off_cos_min']:.5f} | {floor} |"
        )
    lines += [
        "",
        "Per operator, every node on the same inputs (2 x 16 tokens; unfused kernels):",
        "",
    ]
    lines += ["| package (CPU) | first part at | operators that differ on the same inputs |"]
    lines += ["|---|---|---|"]
    for name, d in result["divergence"].items():
        origins = d["chained"]["origins"]
        first = f"{origins[0]['op']} ({origins[0]['max_abs']:.2g})" if origins else "nowhere"
        ops = ", ".join(
            f"{op} {s['differ']}/{s['nodes']} (rel {s['max_relative']:.1g})"
            for op, s in d["replay"]["per_op"].items()
            if s["differ"]
        )
        lines.append(f"| {name} | {first} | {ops or 'none'} |")
    install, server = result["install"], result["server"]
    lines += [
        "",
        f"Install: `pip install edgec[device]` in the root ({result['root']['python']}, from PyPI): "
        f"{len(install['freeze'])} distributions, torch: {'none' if install['torch_free'] else 'PULLED IN'}.",
        f"Server: `edgec serve-on-device {server['package']}` in the root answered one request from "
        f"here ({server['rows']} rows of `{server['output']}`): max abs diff "
        f"{server['max_abs_diff']:.3g}, min cosine {server['min_cosine']:.7f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/arm64.json"))
    parser.add_argument("--root", type=Path, default=CHECKOUT / "build/arm64-root")
    parser.add_argument("--bench", type=Path, default=CHECKOUT / "build/bench")
    parser.add_argument("--work", type=Path, default=CHECKOUT / "build/arm64")
    parser.add_argument(
        "--reuse", action="store_true", help="keep aarch64 outputs already in --work"
    )
    parser.add_argument(
        "--cpus",
        default=",".join(CPUS),
        help="CPUs qemu emulates, comma-separated: the first runs everything; each runs the "
        "per-node comparison of the packages with int8 activations",
    )
    args = parser.parse_args()
    from edgec.models.data import digits

    missing = [n for n in RECIPES + DIGITS if not (args.bench / f"{n}.pkg/manifest.json").exists()]
    if missing:
        sys.exit(f"missing {missing} in {args.bench}: run python benchmarks/compression.py --reuse")
    cpus = args.cpus.split(",")
    started = time.time()
    roots = {cpu: Root(args.root, cpu=cpu) for cpu in cpus}
    root = roots[cpus[0]]
    root_info = root.ensure()
    install = root.install(CHECKOUT)
    here = LocalSide("here")

    def chroot(cpu: str) -> Side:
        side = ChrootSide(roots[cpu], name=f"aarch64 {cpu}")
        return Reused(side) if args.reuse else side

    images = digits("test")[0][:IMAGES]
    seconds: dict[str, float] = {}
    reports = []
    for name in DIGITS:  # the minilm packages: scripts/arm64-check, in the README
        package = args.bench / f"{name}.pkg"
        log(f"{name}: here and on aarch64 ({cpus[0]})")
        tic = time.time()
        report = check_package(
            package, args.work / "probes" / name, here, chroot(cpus[0]), images=images, label=name
        )
        seconds[name] = round(time.time() - tic, 1)
        print(format_report(report), flush=True)
        reports.append(report)
    divergence = {}
    for name in NODE_PACKAGES:
        for cpu in cpus:
            log(f"{name}: every node here and on aarch64 ({cpu})")
            tic = time.time()
            divergence[f"{name} ({cpu})"] = diagnose(
                args.bench / f"{name}.pkg", args.work / "nodes" / f"{name}-{cpu}", here,
                chroot(cpu),
            )  # fmt: skip
            seconds[f"{name} nodes ({cpu})"] = round(time.time() - tic, 1)
            print(format_divergence(divergence[f"{name} ({cpu})"]), flush=True)
    log(f"serve-on-device {SERVED}.pkg in the root")
    server = check_server(root, args.bench / f"{SERVED}.pkg", [], images)
    fidelity_rows, fidelity_seconds = fidelity(
        args.bench, args.work / "fidelity", here, chroot(cpus[0])
    )
    import onnxruntime

    result = {
        "command": "python benchmarks/arm64.py " + " ".join(sys.argv[1:]),
        "machine": {
            "here": f"{platform.machine()}, {platform.python_version()}",
            "there": f"{root_info['machine']}, {root_info['python']}",
            "onnxruntime": onnxruntime.__version__,
        },
        "root": root_info,
        "cpus": cpus,
        "install": {k: v for k, v in install.items() if k != "pip_log_tail"},
        "packages": [r.to_json() for r in reports],
        "divergence": divergence,
        "server": server,
        "fidelity": fidelity_rows,
        "emulated_seconds": {"check": seconds, "fidelity": fidelity_seconds},
        "passed": all(r.passed for r in reports) and bool(server["passed"]),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
