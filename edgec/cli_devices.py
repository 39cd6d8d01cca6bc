"""CLI commands for devices: ``profile-device``, ``plan``, ``partition``, ``join`` and
``cluster-secrets``.

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

from edgec.errors import DeviceError, SecretsError, SourceError

if TYPE_CHECKING:
    import onnx

    from edgec.runtimes.cluster_secrets import ClusterSecrets
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
    device: str,
    address: str | None,
    head: bool,
    port: int,
    num_cpus: int | None,
    host: str | None = None,
    block: bool = False,
) -> list[str]:
    """The ``ray start`` command line for a device joining (or heading) a cluster. ``host``:
    the address this node gives the others (``--node-ip-address``); a loopback or wildcard
    address is left to Ray, which advertises this machine's reachable address instead."""
    from edgec.runtimes.ray_backend import device_resource

    args = ["ray", "start", f'--resources={{"{device_resource(device)}": 1}}']
    if head:
        args += ["--head", f"--port={port}", "--include-dashboard=false"]
    elif address:
        args.append(f"--address={address}")
    else:
        raise click.UsageError("give --address HOST:PORT, or --head to start a cluster")
    if host is not None and not _is_loopback(host) and not _is_wildcard(host):
        args.append(f"--node-ip-address={host}")
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if block:
        args.append("--block")
    return args


def _host_of(address: str) -> str:
    """HOST of ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    if address.startswith("["):
        host = address[1:].split("]", 1)[0]
    return host


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _advertised_ip(head: bool, address: str | None, host: str | None) -> str:
    """The address Ray gives this node (what the other nodes dial and check this device's
    certificate against): ``host`` where it names one, else what ``ray start`` picks, by Ray's
    own functions: the address that routes to the head (a loopback one never: Ray swaps it for
    this machine's reachable address)."""
    if host is not None and not _is_loopback(host) and not _is_wildcard(host):
        return host
    try:
        from ray._private import services
    except ImportError:
        raise DeviceError("joining a cluster needs ray: pip install 'edgec[cluster]'") from None
    if head or address is None:
        return str(services.get_node_ip_address())
    bootstrap = services.canonicalize_bootstrap_address(address)
    return str(services.get_node_ip_address(bootstrap))


def _check_certificate_names(secrets: ClusterSecrets, device: str, ip: str) -> None:
    """Refuse to start a node whose certificate the others would reject: Ray's nodes dial each
    other by IP address, and TLS checks that address against the certificate's IP names."""
    import ipaddress

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(secrets.cert(device).read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    ips = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    if str(ipaddress.ip_address(ip)) not in ips:
        raise SecretsError(
            f"device {device!r}'s certificate names {sorted(ips) or 'no IP address'}, but Ray "
            f"will give this node the address {ip}, which the other devices dial and check: "
            f"make the secrets again listing every device's address (`edgec cluster-secrets "
            f"--host {ip} --host ...`), or give this device's address with --host"
        )


INSECURE_REASON = (
    "the cluster would have no token authentication and no TLS: anyone who reaches "
    "the head's port can join it or submit work to it (Ray then runs their code: remote code "
    "execution) and read what the devices send each other"
)


@click.command("join")
@click.option("--device", required=True, help="The device name the stages ask for.")
@click.option("--address", default=None, help="The cluster head, HOST:PORT.")
@click.option("--head", is_flag=True, help="Start the cluster here (this device is the head).")
@click.option("--port", default=6379, show_default=True, help="Head port (with --head).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="This device's address, which the other devices reach it at (Ray's "
    "--node-ip-address); loopback and 0.0.0.0 leave it to Ray. Ray 2.60 listens on every "
    "interface whatever this says.",
)
@click.option("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here.")
@click.option(
    "--secrets",
    "secrets_dir",
    type=click.Path(path_type=Path),
    help="Cluster secrets (`edgec cluster-secrets`): token authentication and TLS.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback --host or --address without --secrets (anyone on the network "
    "can then join the cluster and run code on it).",
)
@click.option(
    "--block",
    is_flag=True,
    help="Stay in the foreground (`ray start --block`): the node stops with this command.",
)
@click.option("--dry-run", is_flag=True, help="Print the environment and ray command only.")
def join_command(
    device: str,
    address: str | None,
    head: bool,
    port: int,
    host: str,
    num_cpus: int | None,
    secrets_dir: Path | None,
    insecure: bool,
    block: bool,
    dry_run: bool,
) -> None:
    """Join this machine to a Ray cluster as device NAME (wraps `ray start`)."""
    import os

    from edgec.runtimes.ray_backend import SECURITY_ENV, ray_security_env

    args = ray_start_args(device, address, head, port, num_cpus, host=host, block=block)
    env: dict[str, str] = {}
    if secrets_dir is not None:
        from edgec.runtimes.cluster_secrets import load_cluster_secrets

        secrets = load_cluster_secrets(secrets_dir, device)
        _check_certificate_names(secrets, device, _advertised_ip(head, address, host))
        env = ray_security_env(secrets, device)
    else:
        exposed = [f"--host {host}"] if not _is_loopback(host) else []
        if address is not None and not head and not _is_loopback(_host_of(address)):
            exposed.append(f"--address {address}")
        if exposed and not insecure:
            raise DeviceError(
                f"refusing {' and '.join(exposed)} without --secrets: {INSECURE_REASON}. Make "
                "secrets with `edgec cluster-secrets` and give --secrets DIR (or --insecure on "
                "a network you trust)"
            )
        if not insecure:
            progress(
                "warning: no --secrets: Ray 2.60 listens on every interface whatever --host "
                "says, so other machines can reach this node too; use --secrets beyond a test"
            )
    if dry_run:
        if env:
            click.echo(
                f"# token authentication: on (RAY_AUTH_MODE=token; the token is read from "
                f"{env['RAY_AUTH_TOKEN_PATH']}, shown nowhere: <redacted>)"
            )
            click.echo(
                f"# TLS: on (RAY_USE_TLS=1, mutual: the certificate and key of device {device!r}; "
                "peers must hold one signed by the cluster's CA)"
            )
            for key, value in env.items():
                click.echo(f"{key}={value}")
        click.echo(" ".join(args))
        return
    if shutil.which("ray") is None:
        raise DeviceError("the `ray` command is missing: pip install 'edgec[cluster]'")
    full_env = {k: v for k, v in os.environ.items() if not (env and k in SECURITY_ENV)}
    full_env.update(env)
    progress(" ".join(args))
    if env:
        progress("token authentication and TLS: on")
    if block:  # become `ray start --block`: signals reach it, and it stops the node's processes
        os.execvpe(args[0], args, full_env)
    completed = subprocess.run(args, check=False, env=full_env)
    if completed.returncode != 0:
        raise DeviceError(
            f"`ray start` failed with exit code {completed.returncode} for device {device!r}"
        )
    click.echo(f"device {device!r} joined: stages placed on {device!r} now run here")


@click.command("cluster-secrets")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Directory to write."
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    required=True,
    help="A device of the cluster (repeat for each): one certificate and key each.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="An address the devices are reached at (repeat: every device's IP address or name); "
    "the certificates name them [default: 127.0.0.1 and localhost].",
)
@click.option("--force", is_flag=True, help="Replace an existing directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the files as JSON.")
def cluster_secrets_command(
    output: Path, devices: tuple[str, ...], hosts: tuple[str, ...], force: bool, as_json: bool
) -> None:
    """Make a cluster's secrets: a shared token, a CA and a certificate per device (never
    printed; files 0600)."""
    from edgec.runtimes.cluster_secrets import DEFAULT_HOSTS, create_cluster_secrets

    secrets = create_cluster_secrets(output, devices, hosts or DEFAULT_HOSTS, force=force)
    root = secrets.root

    def rel(path: Path) -> str:
        return str(path.relative_to(root))

    per_device = {
        d: [rel(p) for p in (secrets.manifest_path, *secrets.device_files(d))]
        for d in secrets.devices
    }
    if as_json:
        emit_json(
            {
                "directory": str(root),
                "hosts": list(secrets.hosts),
                "files": [rel(p) for p in secrets.files()],
                "devices": per_device,
                "keep_here": [rel(secrets.ca_key)],
            }
        )
        return
    rows = [[d, " ".join(files)] for d, files in per_device.items()]
    click.echo(
        format_table(
            ["device", f"copy from {root} (keep the layout; files 0600, folders 0700)"],
            rows,
            title=f"wrote {root}: token, CA and {len(secrets.devices)} device certificate(s) "
            f"for {', '.join(secrets.hosts)}",
        )
    )
    click.echo(
        f"{rel(secrets.ca_key)} stays here: it signs certificates. Then on each device: "
        f"edgec join --device NAME --secrets DIR ...; the token is in {rel(secrets.token_path)} "
        "(never printed)."
    )


COMMANDS = (
    profile_device_command,
    plan_command,
    partition_command,
    join_command,
    cluster_secrets_command,
)


def register(group: click.Group) -> None:
    """Add the device commands to the ``edgec`` group."""
    for command in COMMANDS:
        group.add_command(command)
