"""``edgec serve-on-device``, ``edgec sign`` and ``edgec keygen``: thin over edgec.runtimes.

``register(group)`` adds them to the ``edgec`` group (``edgec/cli.py`` calls it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from edgec.errors import ServerError


def progress(message: str) -> None:
    click.echo(f"• {message}", err=True)


def register(group: click.Group) -> None:
    for command in (serve_on_device, sign, keygen):
        group.add_command(command)


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServerError(f"cannot read token file {str(path)!r}: {exc.strerror}") from exc
    if not token:
        raise ServerError(f"token file {str(path)!r} is empty")
    return token


@click.command("serve-on-device")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="Port (0: any free port).")
@click.option("--max-batch", default=16, show_default=True, help="Rows per batch (1: off).")
@click.option(
    "--max-delay-ms",
    default=5.0,
    show_default=True,
    help="Longest a request waits for a batch to fill.",
)
@click.option("--max-queue", default=256, show_default=True, help="Waiting requests; then 503.")
@click.option("--timeout-s", default=30.0, show_default=True, help="Per-request timeout; 504.")
@click.option(
    "--max-body-mb", default=16.0, show_default=True, help="Request body limit (MB); 413."
)
@click.option(
    "--body-timeout-s", default=30.0, show_default=True, help="Time to receive a body; 408."
)
@click.option(
    "--max-text-chars", default=100_000, show_default=True, help="Characters in one text; 413."
)
@click.option(
    "--header-timeout-s",
    default=10.0,
    show_default=True,
    help="Time to receive a request's line and headers; 408.",
)
@click.option(
    "--max-connections", default=128, show_default=True, help="Open connections; beyond, 503."
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    help="File holding a bearer token every request must carry.",
)
@click.option("--tls-cert", type=click.Path(path_type=Path), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(path_type=Path), help="TLS private key (PEM).")
@click.option(
    "--public-key",
    type=click.Path(path_type=Path),
    help="Ed25519 public key (PEM): refuse an unsigned or tampered package.",
)
@click.option("--cluster", help="Run the stages on the Ray cluster at this address.")
@click.option(
    "--secrets",
    "secrets_dir",
    type=click.Path(path_type=Path),
    help="Cluster secrets (`edgec cluster-secrets`): join --cluster with its token and TLS.",
)
def serve_on_device(
    package: Path,
    host: str,
    port: int,
    max_batch: int,
    max_delay_ms: float,
    max_queue: int,
    timeout_s: float,
    max_body_mb: float,
    body_timeout_s: float,
    max_text_chars: int,
    header_timeout_s: float,
    max_connections: int,
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    public_key: Path | None,
    cluster: str | None,
    secrets_dir: Path | None,
) -> None:
    """Serve PACKAGE over the Open Inference Protocol (KServe v2 REST) until SIGTERM."""
    from edgec.runtimes.server import ServerConfig, bind, load_app, run_server

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    config = ServerConfig(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        request_timeout_s=timeout_s,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        body_timeout_s=body_timeout_s,
        max_text_chars=max_text_chars,
        header_timeout_s=header_timeout_s,
        max_connections=max_connections,
        token=_read_token(token_file),
    )
    progress(f"verifying and loading {package}")
    if secrets_dir is not None and cluster is None:
        raise click.UsageError("--secrets goes with --cluster ADDRESS")
    app = load_app(package, config, public_key=public_key, cluster=cluster, secrets=secrets_dir)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if tls_cert else "http"
    name = app.state.service.model.name
    progress(f"serving {name!r} on {scheme}://{bound_host}:{bound_port}/v2 (SIGTERM stops)")
    # uvicorn re-raises the signal after its graceful shutdown; SIGINT lands here
    with contextlib.suppress(KeyboardInterrupt):
        run_server(app, sock, tls_cert=tls_cert, tls_key=tls_key, graceful_timeout_s=timeout_s + 5)
    progress("stopped")


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option(
    "--key", required=True, type=click.Path(path_type=Path), help="Ed25519 private key (PEM)."
)
def sign(package: Path, key: Path) -> None:
    """Verify PACKAGE, then sign its manifest (which holds every file's sha256) with KEY."""
    from edgec.runtimes import read_package
    from edgec.runtimes.signing import sign_manifest

    read_package(package)
    click.echo(f"signed {package}: {sign_manifest(package, key)}")


@click.command()
@click.option(
    "--private", "private_key", required=True, type=click.Path(path_type=Path), help="Write here."
)
@click.option(
    "--public", "public_key", required=True, type=click.Path(path_type=Path), help="Write here."
)
def keygen(private_key: Path, public_key: Path) -> None:
    """Make an Ed25519 key pair for ``edgec sign`` and ``--public-key``."""
    from edgec.runtimes.signing import generate_keypair

    generate_keypair(private_key, public_key)
    click.echo(f"private key {private_key} (keep it off devices), public key {public_key}")
