"""``edgec serve-on-device``: the Open Inference Protocol (KServe v2) over HTTP for a package.

Needs the ``device`` extra (fastapi, uvicorn, prometheus-client, cryptography); never torch.
"""

from edgec.runtimes.server.app import create_app
from edgec.runtimes.server.config import ServerConfig
from edgec.runtimes.server.model import ServedModel
from edgec.runtimes.server.serve import bind, load_app, run_server

__all__ = ["ServedModel", "ServerConfig", "bind", "create_app", "load_app", "run_server"]
