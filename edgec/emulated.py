"""An aarch64 Debian root run through qemu-user on this machine: made once with debootstrap,
given this checkout's ``edgec[device]``, then used to run packages and the server as an ARM
board would (``scripts/arm64-check``, ``benchmarks/arm64.py``).

Needs root, and Debian's ``debootstrap``, ``qemu-user-static`` and ``binfmt-support``. The root
shares this machine's network namespace (a loopback port reaches a server inside it). /proc and
/sys stay unmounted in it: with them, ``import onnxruntime`` crashed under qemu. Emulation proves
install, loading and numerics; its times say nothing about a real board's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgec.crosscheck import SideError
from edgec.errors import EdgecError

SUITE = "bookworm"  # Python 3.11, as on the machines that build packages
MIRROR = "http://deb.debian.org/debian"
ROOT_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
VENV = "/opt/edgec"  # inside the root
WORK = "/var/edgec-check"  # inside the root: packages, probes, wheels
READY = ".edgec-root.json"  # written last: a root without it is rebuilt
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# A clean environment inside the root: nothing of this machine's pip configuration or paths.
ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    # this machine's CA bundle, copied in: its egress may re-sign TLS with a local CA
    "PIP_CERT": "/etc/ssl/certs/host-ca-certificates.crt",
    "SSL_CERT_FILE": "/etc/ssl/certs/host-ca-certificates.crt",
}
HOST_CA = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
# Wheels that would mean torch came with the device install.
TORCH_DISTRIBUTIONS = ("torch", "nvidia-", "triton", "transformers")


class EmulationError(EdgecError):
    """The aarch64 root cannot be made or used here (tools, binfmt, network, install)."""

    exit_code = 10


def log(message: str) -> None:
    print(f"• {message}", file=__import__("sys").stderr, flush=True)


def _run(command: Sequence[str], what: str, timeout: float = 3600, **kwargs: object) -> str:
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(f"{what}: timed out after {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise EmulationError(f"{what}: {exc.filename} not found") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
        raise EmulationError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return str(result.stdout)


def enable_binfmt() -> None:
    """Mount binfmt_misc if it is not, and enable Debian's qemu-aarch64 handler."""
    if os.geteuid() != 0:
        raise EmulationError("the aarch64 root needs root (chroot, binfmt_misc)")
    for tool in ("debootstrap", "update-binfmts", "chroot"):
        if shutil.which(tool) is None:
            raise EmulationError(
                f"{tool} not found: apt-get install -y debootstrap qemu-user-static binfmt-support"
            )
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists() or "enabled" not in handler.read_text():
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "enabling qemu-aarch64")
    if "enabled" not in (BINFMT / "qemu-aarch64").read_text():
        raise EmulationError("binfmt handler qemu-aarch64 is not enabled")


class Root:
    """The aarch64 root at ``path`` (cached: made once, reused)."""

    def __init__(self, path: str | os.PathLike[str], cpu: str | None = None):
        """``cpu``: the CPU qemu emulates (``QEMU_CPU``: ``cortex-a72`` as on a Raspberry Pi 4,
        plain NEON; ``cortex-a76`` as on a Pi 5, with dot product; ``max``, qemu's default,
        every feature qemu has, i8mm and SVE included). onnxruntime picks its int8 kernels by
        the features the CPU reports."""
        self.path = Path(path).resolve()
        self.cpu = cpu

    # -- making it ---------------------------------------------------------------------------

    def ensure(self) -> dict[str, object]:
        """Make the root unless a finished one is there: debootstrap (~3 min) and a venv, in a
        staging folder renamed into place when done. Returns what the root records."""
        enable_binfmt()
        ready = self.path / READY
        if ready.exists():
            return dict(json.loads(ready.read_text()))
        staging = self.path.with_name(self.path.name + ".partial")
        if not (staging / ".debootstrap-done").exists():
            shutil.rmtree(staging, ignore_errors=True)
            log(f"debootstrap --arch=arm64 {SUITE} into {staging} (a few minutes)")
            started = time.time()
            _run(
                [
                    "debootstrap",
                    "--arch=arm64",
                    "--variant=minbase",
                    f"--include={','.join(ROOT_PACKAGES)}",
                    SUITE,
                    str(staging),
                    MIRROR,
                ],
                "debootstrap",
            )
            (staging / ".debootstrap-done").write_text(f"{time.time() - started:.0f}\n")
        shutil.copyfile("/etc/resolv.conf", staging / "etc/resolv.conf")  # PyPI from inside
        if not (staging / VENV.lstrip("/") / "bin/python").exists():
            log(f"python3 -m venv {VENV} in the root")
            _chroot(staging, ["python3", "-m", "venv", VENV], "making the venv")
        info = {
            "suite": SUITE,
            "machine": _chroot(staging, ["uname", "-m"], "uname").strip(),
            "python": _chroot(staging, [f"{VENV}/bin/python", "-V"], "python -V").strip(),
            "debootstrap_s": float((staging / ".debootstrap-done").read_text()),
        }
        (staging / READY).write_text(json.dumps(info, indent=2) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(staging, self.path)
        return info

    # -- installing this checkout ------------------------------------------------------------

    def install(self, checkout: Path) -> dict[str, object]:
        """Build a wheel of ``checkout`` (its tracked and untracked, not ignored, files) here and
        install it with the ``device`` extra in the root's venv, from PyPI: as a user would.
        Reinstalls edgec itself when the wheel changed. Returns the wheel's sha256, the seconds
        taken and ``pip freeze`` of the root."""
        shutil.copyfile("/etc/resolv.conf", self.path / "etc/resolv.conf")
        shutil.copyfile(HOST_CA, self.path / ENV["PIP_CERT"].lstrip("/"))
        wheel = build_wheel(checkout, self.path / WORK.lstrip("/") / "dist")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        record = self.path / WORK.lstrip("/") / "installed.json"
        if record.exists():
            installed = json.loads(record.read_text())
            if installed.get("wheel_sha256") == digest:
                return dict(installed)
        inside = f"{WORK}/dist/{wheel.name}"
        started = time.time()
        if record.exists():  # the same version number: pip keeps it unless forced
            log("reinstalling edgec (the checkout changed)")
            self.pip(["install", "--force-reinstall", "--no-deps", inside], "pip install edgec")
        log(f"pip install '{wheel.name}[device]' in the root (PyPI, aarch64 wheels)")
        output = self.pip(["install", f"{inside}[device]"], "pip install edgec[device]")
        freeze = self.pip(["freeze", "--all"], "pip freeze").split()
        info = {
            "wheel": wheel.name,
            "wheel_sha256": digest,
            "install_s": round(time.time() - started, 1),
            "freeze": freeze,
            "torch_free": not torch_in(freeze),
            "pip_log_tail": output.strip().splitlines()[-3:],
        }
        _atomic_write(record, json.dumps(info, indent=2) + "\n")
        return info

    def pip(self, args: Sequence[str], what: str) -> str:
        return self.chroot([f"{VENV}/bin/python", "-m", "pip", *args], what)

    # -- using it ----------------------------------------------------------------------------

    def chroot(self, command: Sequence[str], what: str, timeout: float = 3600) -> str:
        return _chroot(self.path, command, what, timeout, self.cpu)

    def popen(self, command: Sequence[str]) -> subprocess.Popen[str]:
        """A long-running command in the root (the server); stdout and stderr merged."""
        return subprocess.Popen(
            ["chroot", str(self.path), "/usr/bin/env", "-i", *_env(self.cpu), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def inside(self, path: Path) -> str:
        """``path`` (under the root) as the root sees it."""
        return "/" + str(path.resolve().relative_to(self.path))

    def stage_package(self, package_dir: Path) -> Path:
        """The package copied into the root (hard links where the file system allows), under a
        name that changes when its manifest does. Returns the path on this machine."""
        manifest = (package_dir / "manifest.json").read_bytes()
        name = f"{package_dir.name}-{hashlib.sha256(manifest).hexdigest()[:12]}"
        target = self.path / WORK.lstrip("/") / "packages" / name
        if not target.exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(package_dir, partial, copy_function=_link_or_copy)
            os.replace(partial, target)
        return target

    def scratch(self) -> Path:
        """A fresh folder inside the root for one run's files."""
        base = self.path / WORK.lstrip("/") / "runs"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))


def _env(cpu: str | None = None) -> list[str]:
    return [f"{k}={v}" for k, v in ENV.items()] + ([f"QEMU_CPU={cpu}"] if cpu else [])


def _chroot(
    root: Path, command: Sequence[str], what: str, timeout: float = 3600, cpu: str | None = None
) -> str:
    argv = ["chroot", str(root), "/usr/bin/env", "-i", *_env(cpu), *command]
    return _run(argv, what, timeout)


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def torch_in(freeze: Sequence[str]) -> list[str]:
    """The lines of ``pip freeze`` that are torch or what only comes with it."""
    names = [line.split("==")[0].split(" @ ")[0].strip().lower() for line in freeze]
    return [n for n in names if n.startswith(TORCH_DISTRIBUTIONS)]


def build_wheel(checkout: Path, dist: Path) -> Path:
    """A wheel of the checkout's files (git's tracked and untracked, not ignored: what the
    working tree holds now), built in a copy so the checkout gets no build folders."""
    files = _run(
        [
            "git",
            "-C",
            str(checkout),
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
        "git ls-files",
    ).split("\0")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        for name in filter(None, files):
            path = checkout / name
            if path.is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, source / name)
        out = Path(tmp) / "dist"
        _run(
            [
                __import__("sys").executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(out),
                str(source),
            ],
            "building the edgec wheel",
        )
        wheel = next(out.glob("edgec-*.whl"))
        dist.mkdir(parents=True, exist_ok=True)
        for old in dist.glob("edgec-*.whl"):
            old.unlink()
        shutil.copy2(wheel, dist / wheel.name)
        return dist / wheel.name


class ChrootSide:
    """The other side of a cross-check: the package run in the aarch64 root."""

    def __init__(self, root: Root, name: str = "aarch64", timeout: float = 3600):
        self.root, self.name, self.timeout = root, name, timeout

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        staged = self.root.stage_package(package_dir)
        scratch = self.root.scratch()
        try:
            shutil.copyfile(probe, scratch / "probe.npz")
            argv = [
                f"{VENV}/bin/python", "-m", "edgec.crosscheck", command, self.root.inside(staged),
                self.root.inside(scratch / "probe.npz"), self.root.inside(scratch / "out.npz"),
            ]  # fmt: skip
            try:
                self.root.chroot(argv, f"running {package_dir.name} in the root", self.timeout)
            except EmulationError as exc:
                raise SideError(f"{self.name}: {exc}") from exc
            shutil.move(scratch / "out.npz", out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def serve_once(
    root: Root, package_dir: Path, body: dict[str, object], timeout: float = 600
) -> tuple[dict[str, object], float]:
    """Start ``edgec serve-on-device`` on the package in the root (port 0), wait until it says
    where it listens, POST one Open Inference Protocol request from here, then SIGTERM it.
    Returns the JSON answer and the seconds the server took to start. The server's request
    timeout is ``timeout`` too: an emulated float request takes tens of seconds."""
    import re
    import urllib.request

    staged = root.stage_package(package_dir)
    started = time.time()
    server = root.popen(
        [
            f"{VENV}/bin/edgec",
            "serve-on-device",
            root.inside(staged),
            "--port",
            "0",
            "--max-batch",
            "1",
            "--timeout-s",
            str(int(timeout)),
        ]
    )
    lines: list[str] = []
    try:
        assert server.stdout is not None
        url = None
        while url is None:
            line = server.stdout.readline()
            if not line:
                raise EmulationError("the server in the root exited:\n" + "".join(lines[-12:]))
            lines.append(line)
            match = re.search(r"serving .* on (http://[\d.]+:\d+)/v2", line)
            if match:
                url = match.group(1)
            if time.time() - started > timeout:
                raise EmulationError(f"the server did not start in {timeout:.0f} s")
        startup = time.time() - started
        name = json.loads((package_dir / "manifest.json").read_text())["name"]
        request = urllib.request.Request(
            f"{url}/v2/models/{name}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
        return answer, startup
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


SERVER_ROWS = 4


def check_server(
    root: Root, package: Path, sentences: Sequence[str], images: Any
) -> dict[str, object]:
    """``serve_once`` on ``package`` with a few sentences (as ``text``, for a package with a
    tokenizer) or images (as the model's own input tensor), the answer compared against this
    machine's ``embed`` or ``run`` within the tolerance of the package's kind."""
    import numpy as np

    from edgec.crosscheck import TOLERANCES, package_kind, row_cosines
    from edgec.runtimes import load_package

    kind, _ = package_kind(package)
    tolerance = TOLERANCES[kind]
    with load_package(package) as runtime:
        if runtime.text_encoder is not None:
            texts = list(sentences[:SERVER_ROWS])
            body: dict[str, object] = {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
                ]
            }
            output = "embedding"
            expected = runtime.embed(texts)
        else:
            feeds = runtime.encode(np.asarray(images)[:SERVER_ROWS])
            body = {
                "inputs": [
                    {
                        "name": k,
                        "datatype": "FP32",
                        "shape": list(v.shape),
                        "data": v.ravel().tolist(),
                    }
                    for k, v in feeds.items()
                ]
            }
            output = runtime.manifest.outputs[0].name
            expected = runtime.run(feeds)[output]
    answer, startup = serve_once(root, package, body)
    served = next(o for o in answer["outputs"] if o["name"] == output)  # type: ignore[attr-defined]
    got = np.asarray(served["data"], dtype=np.float32).reshape(served["shape"])
    difference = float(np.abs(expected - got).max())
    cosine = float(row_cosines(expected, got).min())
    if tolerance.max_abs is not None:
        passed = difference <= tolerance.max_abs
    else:
        passed = cosine >= (tolerance.min_cosine or 0.0)
    return {
        "package": package.name,
        "output": output,
        "rows": len(got),
        "startup_s": round(startup, 1),
        "max_abs_diff": difference,
        "min_cosine": cosine,
        "passed": passed,
    }
