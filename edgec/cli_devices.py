"""CLI commands for devices: ``profile-device``, ``plan``, ``partition`` and ``join``.

Registered on the ``edgec`` group at the bottom of ``edgec.cli``; thin over the library.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgec.errors import DeviceError, SourceError

if TYPE_CHECKING:
    import onnx

    from edgec.runtimes.devices import DeviceSet
    from edgec.runtimes.manifest import TensorInfo
from edgec.table import format_table


def progress(message: str) -> None:
    click.echo(f"• {message}", err=True)


def emit_json(data: object) -> None:
    from edgec.cli import emit_json as emit

    emit(data)


class StrategyType(click.ParamType):
    """A partition strategy's name, checked against the registry
    (``edgec.exporters.partition.strategies``) when used, so the CLI keeps no list of its own."""

    name = "strategy"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from edgec.exporters.partition.strategies import STRATEGIES

        return "[" + "|".join(STRATEGIES) + "]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        from edgec.exporters.partition.strategies import get_strategy

        try:
            return get_strategy(str(value)).name
        except DeviceError as exc:
            self.fail(str(exc), param, ctx)


STRATEGY = StrategyType()
OBJECTIVE = click.Choice(["latency", "throughput"])


def device_options(command: Callable[..., None]) -> Callable[..., None]:
    """--devices, --strategy, --objective, --keep-input-on-entry and --int8-links, shared by
    plan and partition."""
    for option in reversed(
        [
            click.option(
                "--devices",
                type=click.Path(path_type=Path, exists=True, dir_okay=False),
                help="Device profiles (YAML): partition the package over these devices.",
            ),
            click.option("--strategy", type=STRATEGY, default="auto", show_default=True),
            click.option(
                "--objective",
                type=OBJECTIVE,
                default=None,
                help="What the plan minimises [default: throughput for pipeline, else latency].",
            ),
            click.option(
                "--keep-input-on-entry",
                "keep_input",
                is_flag=True,
                help="Raw inputs never leave the entry device (the profiles' `entry`, default "
                "the first device): only stages there read them.",
            ),
            click.option(
                "--int8-links",
                type=click.Choice(["off", "auto", "on"]),
                default="off",
                show_default=True,
                help="Carry token states across links as int8 with per-token scales (a "
                "quarter of the bytes; checked to min cosine 0.999): auto where a link is "
                "the bottleneck.",
            ),
        ]
    ):
        command = option(command)
    return command


def _load(devices: Path | None) -> DeviceSet:
    from edgec.runtimes.devices import load_devices

    if devices is None:
        raise click.UsageError("--devices is required")
    return load_devices(devices)


@click.command("profile-device")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="YAML to write."
)
@click.option("--name", default=None, help="Device name [default: the host name].")
@click.option(
    "--threads", default=1, show_default=True, help="onnxruntime threads to measure with."
)
@click.option(
    "--memory-mb", type=float, default=None, help="Memory budget [default: available memory]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile_device_command(
    output: Path, name: str | None, threads: int, memory_mb: float | None, as_json: bool
) -> None:
    """Measure this machine (matmul fp32/int8, elementwise, operator overhead) into a profile."""
    import dataclasses
    import socket

    from edgec.runtimes.devices import DeviceSet, save_devices
    from edgec.runtimes.profiler import profile_device

    progress(f"measuring with {threads} thread(s)")
    profile = profile_device(name or socket.gethostname(), threads=threads)
    if memory_mb is not None:
        profile = dataclasses.replace(profile, memory_mb=memory_mb)
    save_devices(DeviceSet((profile,)), output)
    if as_json:
        emit_json(profile.to_json())
        return
    rows = [[k, v] for k, v in profile.to_json().items() if not k.endswith("_curve")]
    click.echo(format_table(["field", "value"], rows, title=f"wrote {output}"))


def _onnx_and_inputs(
    source: str, workdir: Path
) -> tuple[Path | onnx.ModelProto, tuple[TensorInfo, ...], frozenset[str], str]:
    """A package or a model source -> (ONNX path or model, model inputs, the weights the
    runtime decodes and supplies itself, the sha256 of the package's model or "")."""
    from edgec.exporters.partition import load_stage
    from edgec.runtimes.package import read_package

    path = Path(source)
    if (path / "manifest.json").is_file():
        package = read_package(path)
        if len(package.manifest.stages) != 1:
            raise DeviceError(f"package {source!r} is already partitioned; plan its source")
        stage = package.manifest.stages[0]
        pinned = frozenset(c.name for c in stage.coded)
        return load_stage(package, stage), package.manifest.inputs, pinned, stage.sha256
    from edgec.exporters.torch_to_onnx import export_onnx
    from edgec.models import load_model

    if path.suffix == ".onnx":
        raise SourceError("give a package or a model source; a bare .onnx file has no interface")
    progress(f"exporting {source} to ONNX to plan it")
    model, spec = load_model(source)
    target = workdir / "model.onnx"
    export_onnx(model, spec, target)
    return target, spec.inputs, frozenset(), ""


@click.command("plan")
@click.argument("source")
@device_options
@click.option("--batch", default=1, show_default=True, help="Batch size the plan is made for.")
@click.option("--sequence", default=128, show_default=True, help="Sequence length planned for.")
@click.option("--save", type=click.Path(path_type=Path), help="Also save the plan as JSON.")
@click.option(
    "--diff",
    "against",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A saved plan (JSON) to compare this one with.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(
    source: str,
    devices: Path | None,
    strategy: str,
    objective: str | None,
    keep_input: bool,
    int8_links: str,
    batch: int,
    sequence: int,
    save: Path | None,
    against: Path | None,
    as_json: bool,
) -> None:
    """Print the partition plan for SOURCE (package or model) without writing a package."""
    from edgec.exporters.partition import plan_model

    profiles = _load(devices)
    workdir = Path(tempfile.mkdtemp(prefix="edgec-plan-"))
    try:
        onnx_path, inputs, pinned, digest = _onnx_and_inputs(source, workdir)
        progress("measuring the graph and planning")
        plan, _ = plan_model(
            onnx_path,
            inputs,
            profiles,
            strategy,
            objective,
            batch=batch,
            sequence=sequence,
            pinned=pinned,
            source=digest,
            keep_input=keep_input,
            int8_links=int8_links,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if save:
        plan.save(save)
    if as_json:
        emit_json(plan.to_json())
    else:
        click.echo(plan.format())
    if against is not None:
        from edgec.exporters.partition.plan import Plan

        changes = Plan.load(against).diff(plan)
        click.echo(f"\nagainst {against}: " + ("no change" if not changes else ""))
        for line in changes:
            click.echo(f"  {line}")


@click.command("partition")
@click.argument("package", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@device_options
@click.option(
    "--plan",
    "saved",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Apply this saved plan (`edgec plan --save`) instead of planning again.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def partition_command(
    package: Path,
    output: Path,
    devices: Path | None,
    strategy: str,
    objective: str | None,
    keep_input: bool,
    int8_links: str,
    saved: Path | None,
    as_json: bool,
) -> None:
    """Partition an exported (or compressed) single-stage PACKAGE over devices into OUTPUT."""
    from edgec.exporters.partition import partition_package
    from edgec.exporters.partition.plan import Plan

    plan = None if saved is None else Plan.load(saved)
    result = partition_package(
        package,
        output,
        _load(devices),
        strategy,
        objective,
        plan=plan,
        keep_input=keep_input,
        int8_links=int8_links,
    )
    tolerance = result.tolerance.describe() if result.tolerance else ""
    if as_json:
        emit_json(
            {
                "package": str(output),
                "plan": result.plan.to_json(),
                "max_abs_error": result.max_abs_error,
                "min_cosine": result.min_cosine,
                "tolerance": tolerance,
            }
        )
        return
    click.echo(result.plan.format())
    click.echo(
        f"partitioned vs whole graph: max abs error {result.max_abs_error:.3g}, min cosine "
        f"{result.min_cosine:.6f} (tolerance: {tolerance})"
    )


def ray_start_args(
    device: str, address: str | None, head: bool, port: int, num_cpus: int | None
) -> list[str]:
    """The ``ray start`` command line for a device joining (or heading) a cluster."""
    from edgec.runtimes.ray_backend import device_resource

    args = ["ray", "start", f'--resources={{"{device_resource(device)}": 1}}']
    if head:
        args += ["--head", f"--port={port}", "--include-dashboard=false"]
    elif address:
        args.append(f"--address={address}")
    else:
        raise click.UsageError("give --address HOST:PORT, or --head to start a cluster")
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    return args


@click.command("join")
@click.option("--device", required=True, help="The device name the stages ask for.")
@click.option("--address", default=None, help="The cluster head, HOST:PORT.")
@click.option("--head", is_flag=True, help="Start the cluster here (this device is the head).")
@click.option("--port", default=6379, show_default=True, help="Head port (with --head).")
@click.option("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here.")
@click.option("--dry-run", is_flag=True, help="Print the ray command without running it.")
def join_command(
    device: str, address: str | None, head: bool, port: int, num_cpus: int | None, dry_run: bool
) -> None:
    """Join this machine to a Ray cluster as device NAME (wraps `ray start`)."""
    args = ray_start_args(device, address, head, port, num_cpus)
    if dry_run:
        click.echo(" ".join(args))
        return
    if shutil.which("ray") is None:
        raise DeviceError("the `ray` command is missing: pip install 'edgec[cluster]'")
    progress(" ".join(args))
    completed = subprocess.run(args, check=False)
    if completed.returncode != 0:
        raise DeviceError(
            f"`ray start` failed with exit code {completed.returncode} for device {device!r}"
        )
    click.echo(f"device {device!r} joined: stages placed on {device!r} now run here")


COMMANDS = (profile_device_command, plan_command, partition_command, join_command)


def register(group: click.Group) -> None:
    """Add the device commands to the ``edgec`` group."""
    for command in COMMANDS:
        group.add_command(command)
