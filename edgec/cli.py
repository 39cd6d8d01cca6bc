"""The ``edgec`` command line: a thin layer over the Python API.

User mistakes (``EdgecError``) print one line and exit with the error's code; no traceback.
Progress goes to stderr, results to stdout (a table, or JSON with ``--json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from edgec.cli_devices import OBJECTIVE, STRATEGY
from edgec.errors import EdgecError, InputError
from edgec.table import format_table, human_bytes

if TYPE_CHECKING:
    from edgec.runtimes.manifest import Manifest


def progress(message: str) -> None:
    click.echo(f"• {message}", err=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


class EdgecGroup(click.Group):
    """The ``edgec`` group: the one place an ``EdgecError`` becomes one line on stderr and its
    exit code (``edgec.errors``), however the commands are invoked (console script, ``python
    -m edgec.cli``, click's ``CliRunner``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgecError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=EdgecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgec")
def cli() -> None:
    """Compress transformer models, export them to ONNX, split and serve them on edge devices."""


@cli.command()
@click.argument("source")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Package directory to write.",
)
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option(
    "--devices",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Device profiles (YAML): partition the package over them.",
)
@click.option(
    "--strategy",
    type=STRATEGY,
    default="auto",
    show_default=True,
    help="How to partition (with --devices).",
)
@click.option(
    "--objective",
    type=OBJECTIVE,
    default=None,
    help="What the plan minimises [default: throughput for pipeline, else latency].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(
    source: str,
    output: Path,
    opset: int,
    devices: Path | None,
    strategy: str,
    objective: str | None,
    as_json: bool,
) -> None:
    """Export SOURCE (a built-in name or model directory) to a package."""
    from edgec.exporters import export as export_package

    result = export_package(
        source,
        output,
        opset=opset,
        on_step=progress,
        devices=devices,
        strategy=strategy,
        objective=objective,
    )
    manifest = result.manifest
    if as_json:
        emit_json(
            {"package": str(result.path), "bytes": result.size_bytes, "parity": manifest.parity}
        )
        return
    click.echo(_stages_table(result.path, manifest, title=f"package {result.path}"))
    click.echo(f"parity (onnxruntime vs torch): max abs error {result.max_abs_error:.3g}")


def _read_feeds(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read inputs from {path}: {exc}") from exc


def _describe(name: str, value: np.ndarray) -> list[Any]:
    return [name, value.dtype, list(value.shape), float(value.mean()), float(value.std())]


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="A sentence (repeatable).")
@click.option(
    "--input", "inputs", type=click.Path(path_type=Path), help="Tensors as .npz, by input name."
)
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    help="Raw images as .npy, (N, H, W) or (N, C, H, W).",
)
@click.option(
    "--save", type=click.Path(path_type=Path), help="Save raw output tensors to this .npz."
)
@click.option("--backend", default="local", show_default=True, help="Where stages run.")
@click.option("--address", default=None, help="Ray cluster HOST:PORT (with --backend ray).")
@click.option(
    "--secrets",
    "secrets_dir",
    type=click.Path(path_type=Path),
    help="Cluster secrets (`edgec cluster-secrets`): connect to the Ray cluster with its token "
    "and TLS.",
)
@click.option(
    "--emulate-links",
    is_flag=True,
    help="Wait, at each crossing between devices, what the planned links would take "
    "(latency + bytes / bandwidth), and report the time end to end.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(
    package: Path,
    texts: tuple[str, ...],
    inputs: Path | None,
    images: Path | None,
    save: Path | None,
    backend: str,
    address: str | None,
    secrets_dir: Path | None,
    emulate_links: bool,
    as_json: bool,
) -> None:
    """Run PACKAGE on text, images or raw tensors and print the outputs."""
    import time

    from edgec.runtimes import load_package

    given = sum(bool(x) for x in (texts, inputs, images))
    if given != 1:
        raise click.UsageError("give exactly one of --text, --input or --images")
    options: dict[str, Any] = {"address": address} if address else {}
    if secrets_dir is not None:
        if backend != "ray":
            raise click.UsageError("--secrets is for the Ray backend (--backend ray)")
        options["secrets"] = secrets_dir
    # closed at the end: a Ray backend stops its actors (and one with secrets disconnects)
    with load_package(package, backend=backend, emulate_links=emulate_links, **options) as runtime:
        if emulate_links:
            started = time.perf_counter()
            _run_and_print(runtime, texts, inputs, images, save, as_json)
            elapsed = (time.perf_counter() - started) * 1e3
            sent = runtime.link_traffic
            moved = ", ".join(f"{a}→{b} {human_bytes(n)}" for (a, b), n in sorted(sent.items()))
            click.echo(
                f"• links emulated: {elapsed:.1f} ms end to end; {moved or 'nothing crossed'}",
                err=True,
            )
            return
        _run_and_print(runtime, texts, inputs, images, save, as_json)


def _run_and_print(
    runtime: Any,
    texts: tuple[str, ...],
    inputs: Path | None,
    images: Path | None,
    save: Path | None,
    as_json: bool,
) -> None:
    post = runtime.manifest.postprocessing
    if inputs is not None:
        outputs = runtime.run(_read_feeds(inputs))
        if save:
            np.savez(save, **outputs)
        if as_json:
            emit_json({name: value for name, value in outputs.items()})
        else:
            rows = [_describe(n, v) for n, v in outputs.items()]
            click.echo(format_table(["output", "dtype", "shape", "mean", "std"], rows))
        return
    data: Any = list(texts) if texts else np.load(images, allow_pickle=False)  # type: ignore[arg-type]
    if post is not None and post.kind == "classification":
        result = runtime.classify(data)
        if as_json:
            emit_json({"labels": result.labels, "probabilities": result.probabilities})
            return
        names = list(texts) if texts else [f"image {i}" for i in range(len(result.labels))]
        rows = [
            [n, lbl, float(p.max())]
            for n, lbl, p in zip(names, result.labels, result.probabilities, strict=True)
        ]
        click.echo(format_table(["input", "label", "probability"], rows))
        return
    vectors = runtime.embed(data)
    if as_json:
        emit_json({"embeddings": vectors})
        return
    names = list(texts) if texts else [f"image {i}" for i in range(len(vectors))]
    rows = [[_short(n), vectors.shape[1], _preview(v)] for n, v in zip(names, vectors, strict=True)]
    click.echo(format_table(["input", "dim", "embedding"], rows))


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _preview(vector: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:+.3f}" for x in vector[:4]) + ", …]"


def _shape(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[int, int]]:
    shapes = []
    for value in values:
        batch, _, sequence = value.partition("x")
        if not (batch.isdigit() and sequence.isdigit() and int(batch) > 0 and int(sequence) > 0):
            raise click.BadParameter(f"{value!r} is not BATCHxSEQUENCE, e.g. 1x128")
        shapes.append((int(batch), int(sequence)))
    return shapes


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    default=("1x128", "32x128"),
    show_default=True,
    callback=_shape,
    help="BATCHxSEQUENCE of one run (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (bytes).")
def memory(package: Path, shapes: list[tuple[int, int]], as_json: bool) -> None:
    """Measure what PACKAGE costs a device: a fresh process loads it and runs each shape."""
    from edgec.runtimes import memory as probe
    from edgec.runtimes import read_package

    stages = read_package(package).manifest.stages
    progress(f"loading and running {package} in a fresh process")
    figures = probe.measure(package, shapes)
    bare = probe.baseline()
    predicted = (
        sum(s.memory_bytes or 0 for s in stages) if all(s.memory_bytes for s in stages) else None
    )
    if as_json:
        emit_json({**figures.to_json(), "bare_baseline": bare, "predicted": predicted})
        return
    rows = [
        ["bare interpreter + numpy + onnxruntime", human_bytes(bare), ""],
        ["this process before loading", human_bytes(figures.baseline), ""],
        [
            "peak while loading",
            human_bytes(figures.load_peak),
            human_bytes(figures.load_peak - bare),
        ],
        [
            "resident after loading",
            human_bytes(figures.after_load),
            human_bytes(figures.after_load - bare),
        ],
    ]
    for shape, peak in figures.run_peak.items():
        rows.append([f"peak running {shape}", human_bytes(peak), human_bytes(peak - bare)])
    click.echo(format_table(["", "resident", "above bare"], rows, title=f"memory of {package}"))
    if predicted is not None and "1x128" in figures.run_peak:
        measured = max(figures.load_peak, figures.run_peak["1x128"]) - figures.baseline
        click.echo(
            f"1x128 above this process before loading: predicted by the manifest "
            f"{human_bytes(predicted)}, measured {human_bytes(measured)}"
        )


def _stages_table(root: Path, manifest: Manifest, title: str = "") -> str:
    """Each stage: its device, files, bytes on disk and the memory its process is predicted to
    hold above the bare interpreter running one request of 1 x 128 (``memory_bytes``)."""
    # the sha256 of each file is in the manifest (``inspect --json``)
    rows = []
    for s in manifest.stages:
        files = [f for f in (s.file, s.weights) if f is not None]
        size = sum((root / f).stat().st_size for f in files)
        memory = "–" if s.memory_bytes is None else human_bytes(s.memory_bytes)
        rows.append([s.name, s.device, " + ".join(files), human_bytes(size), memory])
    headers = ["stage", "device", "files", "size", "memory (predicted)"]
    return format_table(headers, rows, title=title)


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--diagnose",
    is_flag=True,
    help="Also profile it: operators left float and why, the CPU's int8 instructions, time by "
    "operator type.",
)
def inspect(package: Path, as_json: bool, diagnose: bool) -> None:
    """Verify PACKAGE and show its manifest.

    The checks are those load_package and sign run: the manifest's fields, paths inside the
    package, every file it names listed with its sha256, the hashes, and the inflated size of
    compressed files."""
    from edgec.cli_report import echo_diagnosis
    from edgec.runtimes import read_package

    pkg = read_package(package)
    manifest = pkg.manifest
    if as_json:
        emit_json(manifest.to_json())
        return
    click.echo(
        f"package {package}: {manifest.name} (format {manifest.format_version}, {manifest.created_by})"
    )
    click.echo(f"strategy: {manifest.strategy}; files verified: {len(manifest.files)}")
    io_rows = [["input", t.name, t.dtype, list(t.shape)] for t in manifest.inputs]
    io_rows += [["output", t.name, t.dtype, list(t.shape)] for t in manifest.outputs]
    click.echo(format_table(["", "name", "dtype", "shape"], io_rows))
    click.echo(_stages_table(pkg.root, manifest))
    if manifest.preprocessing:
        click.echo(f"preprocessing: {manifest.preprocessing}")
    if manifest.postprocessing:
        click.echo(f"postprocessing: {manifest.postprocessing}")
    error = manifest.parity.get("max_abs_error")  # free-form: any JSON value
    if isinstance(error, int | float) and not isinstance(error, bool):
        click.echo(f"export parity: max abs error {error:.3g}")
    if diagnose:
        echo_diagnosis(package)


def main() -> None:
    """Entry point of the ``edgec`` console script."""
    cli(prog_name="edgec")


# The commands of each capability live in their own module; they import `cli` helpers from
# here, so they are registered after it is defined.
from edgec.cli_compress import compress as _compress  # noqa: E402
from edgec.cli_devices import register as _register_device_commands  # noqa: E402
from edgec.cli_federate import register as _register_federate_commands  # noqa: E402
from edgec.cli_report import report as _report  # noqa: E402
from edgec.cli_serve import register as _register_serve_commands  # noqa: E402

cli.add_command(_compress)  # compress
_register_device_commands(cli)  # profile-device, plan, partition, join
_register_serve_commands(cli)  # serve-on-device, sign, keygen
_register_federate_commands(cli)  # federate simulate|serve|join
cli.add_command(_report)  # report

if __name__ == "__main__":
    main()
