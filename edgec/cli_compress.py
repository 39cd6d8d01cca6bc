"""``edgec compress``: a thin layer over ``edgec.compressor.compress``."""

from __future__ import annotations

from pathlib import Path

import click

from edgec.errors import RecipeError
from edgec.table import format_table, human_bytes

AUTO = "auto"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@click.command()
@click.argument("source")
@click.option(
    "--recipe",
    required=True,
    help="Built-in recipe (int8, balanced, smallest), a YAML file, or `auto`: search for the "
    "best model for --floor and --objective, by measurement.",
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
@click.option(
    "--floor",
    help="With --recipe auto: the fidelity to keep on both held-out sets, e.g. "
    "min_cosine=0.99[,mean_cosine=0.995,accuracy_drop=1.0].",
)
@click.option(
    "--objective",
    default="size",
    show_default=True,
    help="With --recipe auto: what the chosen model minimises: size (package bytes), latency "
    "(ms at b1x128) or memory (resident bytes). Checked by the search (torch is not imported "
    "for --help).",
)
@click.option(
    "--devices",
    type=click.Path(path_type=Path),
    help="With --recipe auto: a device profile YAML; latency is the cost model's on its first "
    "device and its memory_mb bounds the choice (else latency is measured here).",
)
@click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="With --recipe auto: no candidate is started that would end past this.",
)
@click.option(
    "--max-candidates",
    type=click.IntRange(min=1),
    help="With --recipe auto: build and measure at most this many candidates.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compress(
    source: str,
    recipe: str,
    output: Path,
    calib: Path | None,
    eval_data: Path | None,
    off_domain: Path | None,
    floor: str | None,
    objective: str,
    devices: Path | None,
    budget_minutes: float,
    max_candidates: int | None,
    as_json: bool,
) -> None:
    """Compress SOURCE with RECIPE into a checkpoint; `edgec export CKPT -o PKG` packages it."""
    from edgec.cli import emit_json, progress  # here: edgec.cli imports this module
    from edgec.compressor import compress as run_compress

    if recipe == AUTO:
        if floor is None:
            raise RecipeError("--recipe auto needs --floor, e.g. --floor min_cosine=0.99")
        _auto(
            source,
            output,
            floor,
            objective,
            devices,
            budget_minutes,
            max_candidates,
            calib,
            eval_data,
            off_domain,
            as_json,
        )
        return
    given = [n for n, v in (("--floor", floor), ("--devices", devices)) if v is not None]
    if given or max_candidates is not None:
        raise RecipeError(f"{', '.join(given) or '--max-candidates'} only apply to --recipe auto")

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


def _auto(
    source: str,
    output: Path,
    floor: str,
    objective: str,
    devices: Path | None,
    budget_minutes: float,
    max_candidates: int | None,
    calib: Path | None,
    eval_data: Path | None,
    off_domain: Path | None,
    as_json: bool,
) -> None:
    """``--recipe auto``: the search, then its frontier as a table."""
    from edgec.cli import emit_json, progress
    from edgec.compressor.search import search

    result = search(
        source,
        output,
        floor,
        objective,
        devices=devices,
        budget_minutes=budget_minutes,
        max_candidates=max_candidates,
        calib=calib,
        eval=eval_data,
        off_domain=off_domain,
        on_step=progress,
    )
    if as_json:
        emit_json({"checkpoint": str(result.path), **result.record})
        return
    rows = []
    for m in sorted(result.measured, key=lambda m: m.value(objective)):
        off = m.fidelity_off_domain
        rows.append(
            [
                "*" if m.candidate == result.chosen.candidate else "",
                m.candidate.label,
                human_bytes(m.package_bytes),
                human_bytes(m.memory_bytes),
                f"{m.latency_ms():.1f}",
                _fmt(m.fidelity.cos_min),
                "–" if off is None else _fmt(off.cos_min),
                _fmt(m.fidelity.accuracy, 2),
                "yes" if m.meets else "no",
            ]
        )
    headers = [
        "",
        "candidate",
        "package",
        "memory (pred.)",
        "ms b1x128" + (" (device)" if devices else ""),
        "cos min",
        "off-domain cos min",
        "accuracy %",
        "meets floor",
    ]
    title = (
        f"checkpoint {result.path}: {len(result.measured)} of {result.predicted} candidates "
        f"measured for {objective} ({result.seconds / 60:.1f} min; {result.stopped})"
    )
    click.echo(format_table(headers, rows, title=title))
    click.echo(f"`edgec report {result.path} -o report.html` draws the frontier")
