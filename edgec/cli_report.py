"""``edgec report``: the HTML report (and PNG) of a checkpoint or a package."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="HTML file to write; the plot is also written beside it as .png.",
)
@click.option(
    "--no-profile",
    is_flag=True,
    help="Skip the diagnosis (a checkpoint would be exported to a temporary package for it).",
)
def report(source: Path, output: Path, no_profile: bool) -> None:
    """Write a self-contained HTML report of SOURCE (checkpoint or package): the frontier plot
    (with every candidate `--recipe auto` measured and the compression benchmark's peers), the
    layers' bits, compute and heads and why, and the diagnosis (float operators, int8
    instructions, time by operator type)."""
    from edgec.cli import progress
    from edgec.compressor.report import write_report

    result = write_report(source, output, profile=not no_profile, on_step=progress)
    click.echo(f"wrote {result.html} and {result.png}")


def echo_diagnosis(package: Path) -> None:
    """Print ``edgec.runtimes.diagnosis.diagnose`` of PACKAGE as tables (for `inspect`)."""
    from edgec.runtimes.diagnosis import diagnose
    from edgec.table import format_table

    d = diagnose(package)
    click.echo(
        f"CPU {d.cpu.model_name}: int8 instructions {d.cpu.best} "
        f"({', '.join(d.cpu.features) or 'none'}); expected int8 gain: {d.cpu.expected_gain}"
    )
    total = d.ms_total or 1.0
    rows = [[op, f"{ms:.3f}", f"{100 * ms / total:.1f}%"] for op, ms in d.ms_by_op.items()]
    title = f"where the time goes: {d.ms_total:.2f} ms of kernels per b1 x 128 request"
    click.echo(format_table(["operator", "ms per run", "share"], rows[:12], title=title))
    rows = [[f.op_type, f.count, f.why] for f in d.float_operators if f.op_type in d.ms_by_op]
    click.echo(
        format_table(
            ["operator", "count", "why float"],
            rows[:12],
            title=f"operators that stayed float ({d.int8_operators} int8 operators)",
        )
    )
    for row in d.float_linears:
        click.echo(f"float Linear {row['linear']}: {row['why']}")
