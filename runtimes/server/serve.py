"""Load a package for serving and run it under uvicorn on a socket bound here.

Binding here (not in uvicorn) lets ``port=0`` pick a free port that the caller learns at once.
uvicorn handles SIGTERM/SIGINT gracefully: it stops accepting, lets in-flight requests finish,
then the application's lifespan drains the batcher.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from edgec.runtimes.runtime import load_package
from edgec.runtimes.server.app import create_app
from edgec.runtimes.server.config import ServerConfig
from edgec.runtimes.server.model import ServedModel
from edgec.runtimes.server.stages import StageClock
from edgec.runtimes.server.transport import ConnectionLimits, http_protocol
from fastapi import FastAPI

from edgec.errors import ServerError

if TYPE_CHECKING:
    import uvicorn


def load_app(
    package: str | Path,
    config: ServerConfig,
    *,
    public_key: str | Path | None = None,
    cluster: str | None = None,
    secrets: str | Path | None = None,
) -> FastAPI:
    """Verify and load ``package`` (signature first when ``public_key``), and build the app.

    ``cluster`` runs the stages on the Ray backend at that address, connecting with the
    cluster's token and TLS when ``secrets`` (a cluster-secrets directory) is given.
    """
    clock = StageClock()
    options: dict[str, object] = {"inner": "local", "on_stage": clock}
    if cluster is not None:
        options = {"inner": "ray", "on_stage": clock, "address": cluster}
        if secrets is not None:
            options["secrets"] = secrets
    runtime = load_package(package, backend="timed", public_key=public_key, **options)
    model = ServedModel(
        runtime,
        max_request_rows=config.max_request_rows,
        max_text_chars=config.max_text_chars,
    )
    model.warm()  # the arena's peak now, not in the night (``ServedModel.warm``)
    return create_app(model, config, clock)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServerError(f"cannot resolve host {host!r}: {exc}") from exc
    family = infos[0][0]
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def uvicorn_config(
    app: FastAPI,
    *,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    graceful_timeout_s: float = 60.0,
) -> uvicorn.Config:
    """How ``run_server`` runs uvicorn: quiet, no server header, JSON refusals of requests that
    HTTP itself cannot parse, and the app's header deadline and connection cap
    (``transport.http_protocol``)."""
    import uvicorn

    config: ServerConfig = app.state.service.config
    limits = ConnectionLimits(config.header_timeout_s, config.max_connections)

    return uvicorn.Config(
        app,
        http=http_protocol(limits),
        ws="none",  # the protocol is plain HTTP; no websocket handler to expose or import
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(graceful_timeout_s),
        server_header=False,
    )


def run_server(
    app: FastAPI,
    sock: socket.socket,
    *,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    graceful_timeout_s: float = 60.0,
) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT; returns after a graceful shutdown."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ServerError("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ServerError(f"TLS file {str(path)!r} does not exist")
    config = uvicorn_config(
        app, tls_cert=tls_cert, tls_key=tls_key, graceful_timeout_s=graceful_timeout_s
    )
    uvicorn.Server(config).run(sockets=[sock])
