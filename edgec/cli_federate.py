"""``edgec federate simulate|serve|join``: federated recovery, thin over edgec.federated.

``register(group)`` adds the ``federate`` group to ``edgec`` (``edgec/cli.py`` calls it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgec.table import format_table


def progress(message: str) -> None:
    click.echo(f"• {message}", err=True)


def register(group: click.Group) -> None:
    group.add_command(federate)


@click.group()
def federate() -> None:
    """Federated recovery: devices improve a compressed model on data that never leaves them."""


def _plan_options(function: Any) -> Any:
    options = [
        click.option("--rounds", type=int, required=True, help="Federated rounds."),
        click.option(
            "--local-steps", default=10, show_default=True, help="Training steps a device a round."
        ),
        click.option("--lr", default=1e-3, show_default=True, help="Local learning rate."),
        click.option("--batch-size", default=16, show_default=True, help="Local batch size."),
        click.option(
            "--dropout/--no-dropout",
            default=False,
            show_default=True,
            help="Train with the model's dropout on (off: the loss is the compression's error).",
        ),
        click.option(
            "--aggregation",
            type=click.Choice(["fedavg", "fedprox"]),
            default="fedavg",
            show_default=True,
            help="FedAvg weighted by examples, or FedProx.",
        ),
        click.option(
            "--proximal-mu",
            default=0.0,
            show_default=True,
            help="FedProx's proximal weight (needed with --aggregation fedprox).",
        ),
        click.option(
            "--train",
            "mode",
            type=click.Choice(["auto", "centroids", "all"]),
            default="auto",
            show_default=True,
            help="What trains and travels: codebooks of shared weights, or every parameter "
            "(auto: centroids when the checkpoint shares weights).",
        ),
        click.option(
            "--secure-aggregation",
            is_flag=True,
            help="Average each round under Flower's SecAgg+: the coordinator sees only the "
            "average, never one device's update (needs 3 devices or more).",
        ),
        click.option(
            "--min-updates",
            default=1,
            show_default=True,
            help="Valid updates a round needs to change the model.",
        ),
        click.option(
            "--round-timeout-s",
            default=600.0,
            show_default=True,
            help="A device that has not answered by then is left out of the round.",
        ),
        click.option("--seed", default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option("-o", "--output", type=click.Path(path_type=Path), required=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _plan(min_clients: int, **kw: Any) -> Any:
    from edgec.federated import FederatedPlan, LocalTraining

    return FederatedPlan(
        rounds=kw["rounds"],
        min_clients=min_clients,
        min_updates=kw["min_updates"],
        round_timeout_s=kw["round_timeout_s"],
        start_timeout_s=kw.get("start_timeout_s", 600.0),
        aggregation=kw["aggregation"],
        local=LocalTraining(
            steps=kw["local_steps"],
            lr=kw["lr"],
            batch_size=kw["batch_size"],
            proximal_mu=kw["proximal_mu"],
            dropout=kw["dropout"],
        ),
        mode=kw["mode"],
        seed=kw["seed"],
        secure_aggregation=kw["secure_aggregation"],
    )


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    names = sorted({n for r in report["rounds"] for n in r["fidelity"]})
    rows = []
    for r in report["rounds"]:
        mean = r["mean_of_min_cos"]
        rows.append(
            [
                r["round"],
                len(r.get("clients", [])) if r["round"] else "-",
                len(r.get("rejected", [])) + len(r.get("dropped", [])) if r["round"] else "-",
                r.get("bytes_up_per_client", "-"),
                *[
                    f"{r['fidelity'][n]['cos_min']:.4f}" if n in r["fidelity"] else "-"
                    for n in names
                ],
                "-" if mean is None else f"{mean:.4f}",
            ]
        )
    headers = ["round", "updates", "left out", "bytes up/device", *names, "mean"]
    click.echo(format_table(headers, rows, title="held-out min cosine per device"))
    t = report["trainable"]
    click.echo(
        f"trainable set {t['mode']}: {t['bytes_per_update']:,} bytes an update, "
        f"{t['bytes_per_update'] / t['full_weights_bytes']:.4f} of the full weights"
    )


@federate.command("simulate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--clients",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of data files (.txt, .jsonl, .npz): one simulated device each.",
)
@click.option("--min-clients", type=int, default=None, help="Devices a round needs (default: all).")
@click.option("--teacher", default=None, help="The original model (default: the checkpoint's).")
@_plan_options
def simulate(
    checkpoint: Path, clients: Path, min_clients: int | None, teacher: str | None, **kw: Any
) -> None:
    """Run federated recovery of CHECKPOINT in Flower's simulation engine."""
    from edgec.federated import simulate as run
    from edgec.federated.apps import client_files

    count = len(client_files(clients))
    result = run(
        checkpoint,
        clients,
        kw.pop("output"),
        _plan(min_clients or count, **kw),
        teacher=teacher,
        say=progress,
    )
    _show(result.report, kw["as_json"])


@federate.command("serve")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--min-clients", type=int, required=True, help="Devices to wait for.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=9092, show_default=True, help="The SuperLink's port.")
@click.option(
    "--secrets",
    type=click.Path(path_type=Path),
    default=None,
    help="Cluster secrets (edgec cluster-secrets): TLS and SuperNode authentication.",
)
@click.option("--device", default=None, help="This coordinator's device name in the secrets.")
@click.option(
    "--allow",
    multiple=True,
    help="A device allowed to join (repeatable; default: every other device of the secrets).",
)
@click.option("--insecure", is_flag=True, help="No secrets: plain text, anyone may join.")
@click.option("--start-timeout-s", default=600.0, show_default=True, help="Wait for --min-clients.")
@_plan_options
def serve(
    checkpoint: Path,
    min_clients: int,
    host: str,
    port: int,
    secrets: Path | None,
    device: str | None,
    allow: tuple[str, ...],
    insecure: bool,
    **kw: Any,
) -> None:
    """Coordinate federated recovery of CHECKPOINT: a Flower SuperLink and the run."""
    from edgec.federated.deploy import serve as run

    result = run(
        checkpoint,
        kw.pop("output"),
        _plan(min_clients, **kw),
        host=host,
        port=port,
        secrets=secrets,
        device=device,
        allow=allow,
        insecure=insecure,
        say=progress,
    )
    _show(result.report, kw["as_json"])


@federate.command("join")
@click.argument("address")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="This device's data file."
)
@click.option(
    "--ckpt",
    "checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="The compressed checkpoint this device runs (the one the server federates).",
)
@click.option("--name", default=None, help="This device's name in the report.")
@click.option("--teacher", default=None, help="The original model (default: the checkpoint's).")
@click.option("--port", default=9094, show_default=True, help="The SuperNode's local port.")
@click.option("--secrets", type=click.Path(path_type=Path), default=None)
@click.option("--device", default=None, help="This device's name in the secrets.")
@click.option("--insecure", is_flag=True, help="No secrets: plain text, no authentication.")
def join(
    address: str,
    data: Path,
    checkpoint: Path,
    name: str | None,
    teacher: str | None,
    port: int,
    secrets: Path | None,
    device: str | None,
    insecure: bool,
) -> None:
    """Take part in federated recovery at ADDRESS (host:port) with this device's data."""
    from edgec.federated.deploy import join as run

    code = run(
        address,
        checkpoint,
        data,
        name=name,
        teacher=teacher,
        port=port,
        secrets=secrets,
        device=device,
        insecure=insecure,
        say=progress,
    )
    raise SystemExit(code)
