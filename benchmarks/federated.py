"""Federated recovery of minilm ``balanced`` on three text domains, against central distillation.

    nice python benchmarks/federated.py --ckpt build/bench/balanced.ckpt \
        --out benchmarks/results/federated.json

1. Three simulated devices, one per file of ``models/zoo/domains`` (technical documentation,
   Wikipedia, licence texts; 320 sentences to train on and 80 held out each), run
   ``edgec federate simulate`` in Flower's simulation engine (Ray): ``--rounds`` rounds of
   ``--local-steps`` distillation steps a device (dropout off unless ``--dropout``), FedAvg
   weighted by examples (under SecAgg+ with ``--secure-aggregation``), only the codebooks of
   the shared weights trained and sent.
2. The central baseline: the same starting checkpoint distilled on the three training splits
   pooled, with the same step budget (rounds x local steps x devices), the same batch size,
   learning rate and schedule shape, the same trainable set, fixed cluster assignments and
   int8-aware training.
3. Both measured as each device measures: min and mean cosine of the pooled embedding against
   the original minilm on each device's held-out split, and the mean over devices of the min.
4. Bytes a device sends a round (the codebooks, as Flower serializes them) against the full
   fp32 weights.

Writes JSON to ``--out`` and a markdown table beside it (``.md``); each part's result is kept
in ``build/<out's stem>.parts/`` (``--part federated`` and ``--part central`` may run as two
processes at once, and the results are written when both are there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgec.federated import FederatedPlan, LocalTraining, simulate
from edgec.federated.apps import client_files
from edgec.federated.local import Device, pooled_device, resolve_teacher
from edgec.federated.trainable import MODES

DOMAINS = Path(__file__).resolve().parent.parent / "models" / "zoo" / "domains"


def central(ckpt: Path, files: list[Path], plan: FederatedPlan) -> dict[str, Any]:
    """Distil on the pooled training splits with the federated run's whole step budget."""
    devices = [Device(ckpt, f, mode=plan.mode) for f in files]
    student = devices[0]
    start = student.trainable.extract(student.model)
    budget = plan.rounds * plan.local.steps * len(devices)
    local = dataclasses.replace(plan.local, steps=budget, proximal_mu=0.0)
    started = time.perf_counter()
    trained, loss = student.train(start, local, 1, 1, plan.seed, data=pooled_device(devices))
    seconds = time.perf_counter() - started
    fidelity = {}
    for f, device in zip(files, devices, strict=True):
        fid = device.evaluate(trained)
        fidelity[f.stem] = {"cos_min": fid.cos_min, "cos_mean": fid.cos_mean}
    return {
        "steps": budget,
        "train_loss_last": loss,
        "seconds": round(seconds, 1),
        "fidelity": fidelity,
        "mean_of_min_cos": float(np.mean([v["cos_min"] for v in fidelity.values()])),
    }


def where_lost(ckpt: Path, files: list[Path]) -> dict[str, float]:
    """Mean over devices of the held-out min cosine as the compressions are undone one by one:
    the embeddings back to the original's float tables, then the activations back to float
    (no dynamic int8). What stays is the shared Linears' loss, which recovery has to win."""
    import torch
    from edgec.models import load_model

    devices = [Device(ckpt, f) for f in files]
    original, _ = load_model(resolve_teacher(devices[0].spec, None))
    weights = dict(original.named_parameters())

    def mean_of_min() -> float:
        return float(np.mean([d.evaluate().cos_min for d in devices]))

    found = {"start": mean_of_min()}
    for device in devices:
        params = dict(device.model.named_parameters())
        with torch.no_grad():
            for name in device.storage.shared_bits:
                if name.startswith("embeddings."):
                    params[name].copy_(weights[name])
    found["float embeddings"] = mean_of_min()
    for device in devices:
        device.storage = dataclasses.replace(device.storage, dynamic_activations=False)
    found["float embeddings and activations"] = mean_of_min()
    return found


def markdown(result: dict[str, Any]) -> str:
    fed, cen = result["federated"], result["central"]
    start, end = fed["rounds"][0], fed["rounds"][-1]
    names = sorted(start["fidelity"])
    lines = [
        f"Measured on {result['machine']} with `{result['command']}` "
        f"({result['seconds']:.0f} s). minilm `balanced`; three simulated devices, each "
        f"holding one domain; {fed['plan']['rounds']} rounds x "
        f"{fed['plan']['local']['steps']} local steps (batch {fed['plan']['local']['batch_size']},"
        f" lr {fed['plan']['local']['lr']}, dropout {'on' if fed['plan']['local'].get('dropout') else 'off'}), FedAvg"
        f"{' under SecAgg+' if fed['plan'].get('secure_aggregation') else ''}, trainable set "
        f"{fed['trainable']['mode']}. Central: the same "
        f"{cen['steps']} steps on the pooled training splits. Held-out min cosine against "
        "the original (mean cosine in brackets):",
        "",
        "| model | " + " | ".join(names) + " | mean of min |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]

    def row(label: str, fidelity: dict[str, Any], mean: float) -> str:
        cells = [f"{fidelity[n]['cos_min']:.4f} ({fidelity[n]['cos_mean']:.4f})" for n in names]
        return f"| {label} | " + " | ".join(cells) + f" | {mean:.4f} |"

    lines.append(row("start (`balanced`)", start["fidelity"], start["mean_of_min_cos"]))
    lines.append(row("federated", end["fidelity"], end["mean_of_min_cos"]))
    lines.append(row("central, pooled data", cen["fidelity"], cen["mean_of_min_cos"]))
    t = fed["trainable"]
    lines += [
        "",
        f"Rise over the start: {result['rise']:+.4f} (federated), "
        f"{cen['mean_of_min_cos'] - start['mean_of_min_cos']:+.4f} (central); federated "
        f"minus central: {result['gap_to_central']:+.4f}.",
        "",
        f"Bytes a device sends a round: {result['bytes_up_per_device']:,} ("
        + (
            "its masked codebooks, keys and key shares, as SecAgg+ sends them"
            if fed["plan"].get("secure_aggregation")
            else f"codebooks of {t['tensors']} shared tensors, as Flower serializes them"
        )
        + ") against "
        f"{t['full_weights_bytes']:,} for the full fp32 weights: 1/"
        f"{t['full_weights_bytes'] / result['bytes_up_per_device']:.0f}.",
        "",
        "| round | " + " | ".join(names) + " | mean of min |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for r in fed["rounds"]:
        cells = [f"{r['fidelity'][n]['cos_min']:.4f}" for n in names]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + f" | {r['mean_of_min_cos']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("build/bench/balanced.ckpt"))
    parser.add_argument("--clients", type=Path, default=DOMAINS)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument(
        "--lr", type=float, default=1e-3
    )  # central: as good as 2e-3, better than 1e-4
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--train",
        choices=MODES,
        default="auto",
        help="the trainable set: codebooks only (auto, centroids) or every float tensor (all)",
    )
    parser.add_argument(
        "--dropout",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train with the model's dropout on (off by default, as edgec federate)",
    )
    parser.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="average the federated rounds under SecAgg+ (the central baseline is unchanged)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/federated.json"))
    parser.add_argument(
        "--part",
        choices=["all", "federated", "central", "losses"],
        default="all",
        help="Run one part (two processes can run the two at once); the results are written "
        "once both parts are there. 'losses': where the start loses its fidelity (no training).",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = FederatedPlan(
        rounds=args.rounds,
        min_clients=3,
        local=LocalTraining(
            steps=args.local_steps, lr=args.lr, batch_size=args.batch_size, dropout=args.dropout
        ),
        mode=args.train,
        secure_aggregation=args.secure_aggregation,
    )
    files = client_files(args.clients)
    command = (
        "python benchmarks/federated.py "
        + f"--ckpt {args.ckpt} --rounds {args.rounds} --local-steps {args.local_steps} "
        + f"--lr {args.lr} --batch-size {args.batch_size} --train {args.train}"
        + (" --dropout" if args.dropout else "")
        + (" --secure-aggregation" if args.secure_aggregation else "")
    )
    if args.part == "losses":  # where the start loses, printed as JSON; nothing trains
        print(json.dumps(where_lost(args.ckpt, files), indent=1))
        return
    parts = Path("build") / f"{args.out.stem}.parts"  # each part's result: the two can run at once
    parts.mkdir(parents=True, exist_ok=True)
    if args.part in ("federated", "all"):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run = simulate(args.ckpt, files, Path(tmp) / "federated.ckpt", plan)
        piece = {"report": run.report, "seconds": time.perf_counter() - started}
        (parts / "federated.json").write_text(json.dumps(piece), encoding="utf-8")
    if args.part in ("central", "all"):
        started = time.perf_counter()
        piece = {"central": central(args.ckpt, files, plan), "seconds": 0.0}
        piece["seconds"] = time.perf_counter() - started
        (parts / "central.json").write_text(json.dumps(piece), encoding="utf-8")
        print(json.dumps({k: piece["central"][k] for k in ("steps", "mean_of_min_cos")}))
    if not all((parts / f"{p}.json").is_file() for p in ("federated", "central")):
        return
    fed = json.loads((parts / "federated.json").read_text(encoding="utf-8"))
    cen = json.loads((parts / "central.json").read_text(encoding="utf-8"))
    rounds = fed["report"]["rounds"]
    ups = [r["bytes_up_per_client"] for r in rounds[1:]]
    baseline = cen["central"]
    result = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(fed["seconds"] + cen["seconds"], 1),
        "federated": fed["report"],
        "central": baseline,
        "rise": rounds[-1]["mean_of_min_cos"] - rounds[0]["mean_of_min_cos"],
        "gap_to_central": rounds[-1]["mean_of_min_cos"] - baseline["mean_of_min_cos"],
        "bytes_up_per_device": int(max(ups)),
        "bytes_ratio_to_full": max(ups) / fed["report"]["trainable"]["full_weights_bytes"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
