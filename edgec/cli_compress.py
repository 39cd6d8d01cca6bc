"""``edgec compress``: a thin layer over ``edgec.compressor.compress``."""

from __future__ import annotations

from pathlib import Path

import click

from edgec.table import format_table, human_bytes


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@click.command()
@click.argument("source")
@click.option(
    "--recipe", required=True, help="Built-in recipe (int8, balanced, smallest) or YAML file."
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint directory to write.",
)
@click.option(
    "--calib", type=click.Path(path_type=Path), help="Calibration data: .txt, .jsonl or .npz."
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    help="Evaluation data (else a held-out part of --calib).",
)
@click.option(
    "--off-domain",
    "off_domain",
    type=click.Path(path_type=Path),
    help="Held-out data from another domain: fidelity and the floor are checked on it too "
    "(without --calib, a built-in model's bundled set, if it has one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compress(
    source: str,
    recipe: str,
    output: Path,
    calib: Path | None,
    eval_data: Path | None,
    off_domain: Path | None,
    as_json: bool,
) -> None:
    """Compress SOURCE with RECIPE into a checkpoint; `edgec export CKPT -o PKG` packages it."""
    from edgec.cli import emit_json, progress  # here: edgec.cli imports this module
    from edgec.compressor import compress as run_compress

    result = run_compress(
        source,
        recipe,
        output,
        calib=calib,
        eval=eval_data,
        off_domain=off_domain,
        on_step=progress,
    )
    if as_json:
        emit_json({"checkpoint": str(result.path), **result.report()})
        return
    with_off_domain = any(s.fidelity_off_domain is not None for s in result.steps)
    rows = []
    for s in result.steps:
        d, f, off = s.details, s.fidelity, s.fidelity_off_domain
        bits = sorted(set(d.get("bits", {}).values())) if isinstance(d.get("bits"), dict) else []
        off_cells = ["–", "–"] if off is None else [_fmt(off.cos_min), _fmt(off.cos_mean)]
        rows.append(
            [
                s.step,
                f"{s.parameters / 1e6:.2f} M",
                human_bytes(s.bytes),
                "/".join(str(h) for h in s.heads_kept),
                d.get("sparsity", "–"),
                "/".join(str(b) for b in bits) or "–",
                len(d.get("float_fallback", [])) if "float_fallback" in d else "–",
                _fmt(f.cos_min),
                _fmt(f.cos_mean),
                *(off_cells if with_off_domain else []),
                _fmt(f.sqnr_db, 1),
                _fmt(f.top1_agreement, 1),
                _fmt(f.accuracy, 2),
            ]
        )
    headers = [
        "step",
        "params",
        "bytes (est.)",
        "heads/layer",
        "sparsity",
        "bits",
        "float layers",
        "cos min",
        "cos mean",
        *(["off-domain cos min", "off-domain cos mean"] if with_off_domain else []),
        "SQNR dB",
        "top-1 agree %",
        "accuracy %",
    ]
    click.echo(
        format_table(headers, rows, title=f"checkpoint {result.path} (recipe {result.recipe.name})")
    )
    if result.memory_bytes is not None:
        click.echo(
            f"predicted memory on a device: {human_bytes(result.memory_bytes)} above the bare "
            "interpreter, loading the exported package and running one request of 1 x 128"
        )
    for note in result.notes:
        click.echo(f"note: {note}")
