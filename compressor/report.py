"""``edgec report``: one self-contained HTML page (and a PNG) about a checkpoint or a package.

What it shows: the frontier plot (size or latency against the worst held-out min cosine: every
candidate ``--recipe auto`` measured, the peers' rows of the compression benchmark, this model
marked), the frontier as a table, per-layer bits, compute and heads with the reason each got
them, and the diagnosis (``edgec.runtimes.diagnosis``: operators left float and why, the CPU's
int8 instructions, where the time goes). No network: the PNG is embedded as a data URI.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.compressor.search import SEARCH_FILE
from edgec.models.checkpoint import is_checkpoint, read_checkpoint
from edgec.runtimes.diagnosis import Diagnosis, diagnose
from edgec.runtimes.package import read_package

from edgec.errors import EdgecError, SourceError

PEERS_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compression.json"
PEERS_MODEL = "minilm"  # the model the compression benchmark measures


@dataclass
class Point:
    """One model on the plot: size (bytes), latency (ms b1 x 128), worst min cosine."""

    label: str
    kind: str  # this | candidate | failed | peer
    bytes: float | None
    ms: float | None
    cos_min: float | None


@dataclass
class ReportData:
    """What the page is drawn from."""

    title: str
    source: str
    recipe: str
    fidelity: dict[str, Any]
    fidelity_off_domain: dict[str, Any] | None
    size_bytes: int | None
    size_note: str
    search: dict[str, Any] | None
    layers: list[dict[str, Any]]
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _worst(fid: dict[str, Any] | None, off: dict[str, Any] | None) -> float | None:
    values = [f["cos_min"] for f in (fid, off) if f and f.get("cos_min") is not None]
    return min(values) if values else None


def _layers_from_steps(steps: list[dict[str, Any]], heads: list[int]) -> list[dict[str, Any]]:
    """Per Linear from a recipe's step details: bits, compute, heads kept, and why."""
    bits: dict[str, int] = {}
    quantized: set[str] = set()
    fallback: list[str] = []
    sensitivity: dict[str, float] = {}
    for step in steps:
        details = step.get("details") or step
        bits.update(details.get("bits") or {})
        quantized.update(details.get("quantized") or [])
        fallback += details.get("float_fallback") or []
        sensitivity.update(details.get("sensitivity") or {})
    names = sorted({n.removesuffix(".weight") for n in bits if "embeddings" not in n} | quantized)
    names += [n for n in fallback if n not in names]
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    rows = []
    for name in names:
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        why = []
        if f"{name}.weight" in bits:
            why.append(f"shared at {bits[f'{name}.weight']} bits by the recipe")
        if name in sensitivity:
            why.append(
                f"local int8 error {sensitivity[name]:.2e}, rank {ranked.index(name) + 1} of "
                f"{len(ranked)}" + (": kept float" if name in fallback else "")
            )
        rows.append(
            {
                "linear": name,
                "layer": layer,
                "bits": bits.get(f"{name}.weight", 8 if name in quantized else 32),
                "compute": "int8" if name in quantized else "float",
                "heads_kept": heads[layer] if layer is not None and layer < len(heads) else None,
                "why": "; ".join(why) or "as the recipe says",
            }
        )
    for name, b in sorted(bits.items()):
        if "embeddings" in name:
            rows.append(
                {
                    "linear": name,
                    "layer": None,
                    "bits": b,
                    "compute": "lookup",
                    "heads_kept": None,
                    "why": "embedding table shared by the recipe",
                }
            )
    return rows


def _peers(objective: str) -> list[Point]:
    try:
        rows = json.loads(PEERS_FILE.read_text(encoding="utf-8"))["rows"]
    except (OSError, KeyError, json.JSONDecodeError):
        return []
    return [
        Point(
            label=r["variant"],
            kind="peer",
            bytes=r.get("bytes"),
            ms=r.get("ms_b1x128"),
            cos_min=min(r["cos_min"], r.get("off_cos_min", r["cos_min"])),
        )
        for r in rows
        if r.get("cos_min") is not None
    ]


def gather(path: Path) -> ReportData:
    """The figures of a checkpoint (with ``search.json`` when ``--recipe auto`` made it) or a
    package."""
    search: dict[str, Any] | None = None
    if is_checkpoint(path):
        meta = read_checkpoint(path)
        report = meta.get("report") or {}
        name = (meta.get("spec") or {}).get("name", path.name)
        heads = (meta.get("shapes") or {}).get("heads") or []
        if (path / SEARCH_FILE).is_file():
            search = json.loads((path / SEARCH_FILE).read_text(encoding="utf-8"))
        kind = "checkpoint"
    else:
        package = read_package(path)
        report = (package.manifest.report or {}).get("compression") or {}
        name = package.manifest.name
        heads = []
        kind = "package"
    steps = report.get("steps") or []
    final = steps[-1] if steps else {}
    heads = heads or final.get("heads_kept") or []
    fid = final.get("fidelity") or {}
    off = final.get("fidelity_off_domain")
    size: int | None = None
    if kind == "package":
        size = sum((path / f).stat().st_size for f in package.manifest.files)
        note = "package bytes on disk"
    elif search is not None:
        chosen = next((m for m in search["measured"] if m["label"] == search.get("chosen")), None)
        size = chosen["package_bytes"] if chosen else None
        note = "bytes of the exported package, measured by the search"
    else:
        size = final.get("bytes")
        note = "estimated stored bytes of the weights (export for the package's size)"
    layers = (
        search["layers"].get(search.get("chosen"), [])
        if search is not None
        else _layers_from_steps(steps[1:], heads)
    )
    data = ReportData(
        title=f"{name} ({kind} {path.name})",
        source=str(path),
        recipe=str(report.get("recipe", "none (uncompressed)")),
        fidelity=fid,
        fidelity_off_domain=off,
        size_bytes=size,
        size_note=note,
        search=search,
        layers=layers,
    )
    objective = search["objective"] if search else "size"
    if search is not None:
        for m in search["measured"]:
            if m["label"] == search.get("chosen"):
                continue
            data.points.append(
                Point(
                    m["label"],
                    "candidate" if m["meets_floor"] else "failed",
                    m["package_bytes"],
                    m["ms_b1x128_device"] or m["ms_b1x128_here"],
                    _worst(m["fidelity"], m["fidelity_off_domain"]),
                )
            )
    chosen_ms = None
    if search is not None:
        chosen_row = next(m for m in search["measured"] if m["label"] == search.get("chosen"))
        chosen_ms = chosen_row["ms_b1x128_device"] or chosen_row["ms_b1x128_here"]
    data.points.append(
        Point(f"this model ({data.recipe})", "this", size, chosen_ms, _worst(fid, off))
    )
    if name == PEERS_MODEL:
        data.points += _peers(objective)
    else:
        data.notes.append(
            f"no peer points: the compression benchmark measures {PEERS_MODEL}, not {name}"
        )
    return data


STYLE: dict[str, dict[str, Any]] = {
    "this": {"marker": "*", "s": 260, "color": "#d62728", "zorder": 5},
    "candidate": {"marker": "o", "s": 40, "color": "#1f77b4", "zorder": 3},
    "failed": {"marker": "x", "s": 40, "color": "#7f7f7f", "zorder": 2},
    "peer": {"marker": "s", "s": 45, "color": "#2ca02c", "zorder": 4},
}
LEGEND = {
    "this": "chosen / this model",
    "candidate": "measured, meets the floor",
    "failed": "measured, misses the floor",
    "peer": "built-in recipes and peers (compression benchmark)",
}


def render_png(data: ReportData) -> bytes:
    """The frontier plot: size (or latency for a latency search) against the worst min cos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_latency = bool(data.search and data.search.get("objective") == "latency")
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    try:
        for kind in ("failed", "candidate", "peer", "this"):
            keep = [
                (x, p.cos_min, p)
                for p in data.points
                if p.kind == kind
                and p.cos_min is not None
                and (x := (p.ms if by_latency else (p.bytes or 0) / 1e6))
            ]
            if not keep:
                continue
            ax.scatter(
                [x for x, _, _ in keep],
                [y for _, y, _ in keep],
                label=LEGEND[kind],
                **STYLE[kind],
            )
            if kind in ("peer", "this"):
                for x, y, p in keep:
                    ax.annotate(
                        p.label,
                        (x, y),
                        fontsize=7,
                        xytext=(4, 3),
                        textcoords="offset points",
                    )
        floor = (data.search or {}).get("floor", {}).get("min_cosine")
        if floor is not None:
            ax.axhline(floor, color="#d62728", linestyle="--", linewidth=0.8, label="floor")
        ax.set_xscale("log")
        ax.set_xlabel("ms per request, b1 x 128" if by_latency else "package size, MB (log)")
        ax.set_ylabel("min cosine vs fp32, worst held-out set")
        ax.set_title(data.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


OBJECTIVE_UNITS = {"size": "MB", "memory": "MB", "latency": "ms b1 x 128"}
BEATERS_SHOWN = 12


def beat_the_choice(search: dict[str, Any]) -> list[dict[str, Any]]:
    """Candidates better than the chosen one on the objective, best first, and why each was not
    chosen: measured ones with what they missed, then the predicted frontier's, with their
    predicted min cosine against the floor (or, above it, why the search did not build them).
    The answer to "why is nothing faster than int8" when the chosen one is int8."""
    objective = search["objective"]
    chosen = next((m for m in search["measured"] if m["label"] == search.get("chosen")), None)
    if chosen is None:
        return []

    def value(m: dict[str, Any]) -> float:
        if objective == "size":
            return float(m["package_bytes"])
        if objective == "memory":
            return float(m["memory_bytes"])
        device = m.get("ms_b1x128_device")
        return float(device if device is not None else m["ms_b1x128_here"])

    scale = 1e-6 if objective in ("size", "memory") else 1.0
    best = value(chosen)
    floor = search["floor"].get("min_cosine")
    rows: list[dict[str, Any]] = []
    measured = {m["label"] for m in search["measured"]}
    for m in sorted(search["measured"], key=value):
        if value(m) < best and not m["meets_floor"]:
            off = m.get("fidelity_off_domain") or m["fidelity"]
            rows.append(
                {
                    "label": m["label"],
                    "value": f"{value(m) * scale:.2f}",
                    "cos_min": min(m["fidelity"]["cos_min"], off["cos_min"]),
                    "kind": "measured",
                    "why": "; ".join(m["failures"]),
                }
            )
    for p in search.get("predicted_frontier", []):
        if p["objective"] >= best or p["label"] in measured:
            continue
        below = floor is not None and p["cos_min"] < floor
        rows.append(
            {
                "label": p["label"],
                "value": f"{p['objective'] * scale:.2f}",
                "cos_min": p["cos_min"],
                "kind": "predicted",
                "why": f"predicted min cosine {p['cos_min']:.4f} < floor {floor}"
                if below
                else f"not built: {search['stopped']}",
            }
        )
    return rows[:BEATERS_SHOWN]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_html(data: ReportData, png: bytes, diagnosis: Diagnosis | None) -> str:
    """The page: summary, plot, frontier table, layers, diagnosis."""
    e = html.escape
    parts = [f"<h1>{e(data.title)}</h1>"]
    off = data.fidelity_off_domain or {}
    parts.append(
        _table(
            [
                "recipe",
                "size",
                "cos min / mean (held-out)",
                "cos min / mean (off-domain)",
                "accuracy %",
            ],
            [
                [
                    data.recipe,
                    "–"
                    if data.size_bytes is None
                    else f"{data.size_bytes / 1e6:.2f} MB ({data.size_note})",
                    f"{_f(data.fidelity.get('cos_min'))} / {_f(data.fidelity.get('cos_mean'))}",
                    f"{_f(off.get('cos_min'))} / {_f(off.get('cos_mean'))}",
                    _f(data.fidelity.get("accuracy"), 2),
                ]
            ],
        )
    )
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    parts.append(
        f'<h2>Frontier</h2><img id="frontier" alt="frontier plot" src="{uri}" width="880">'
    )
    if data.search is not None:
        s = data.search
        parts.append(
            f"<p>objective <b>{e(s['objective'])}</b>, floor {e(json.dumps(s['floor']))}; "
            f"{len(s['measured'])} of {s['space']['candidates']} candidates built and measured "
            f"in {s['seconds'] / 60:.1f} min ({e(s['stopped'])}).</p>"
        )
        rows = []
        for m in sorted(s["measured"], key=lambda m: m["package_bytes"]):
            o = m["fidelity_off_domain"] or {}
            rows.append(
                [
                    "chosen" if m["label"] == s.get("chosen") else "",
                    m["label"],
                    f"{m['package_bytes'] / 1e6:.2f}",
                    f"{m['memory_bytes'] / 1e6:.1f}",
                    _f(m["ms_b1x128_here"], 1),
                    _f(m["ms_b1x128_device"], 1),
                    _f(m["fidelity"]["cos_min"]),
                    _f(o.get("cos_min")),
                    _f(m["fidelity"].get("accuracy"), 2),
                    "yes" if m["meets_floor"] else "no",
                    "; ".join(m["failures"]),
                ]
            )
        parts.append(
            _table(
                [
                    "",
                    "candidate",
                    "package MB",
                    "memory MB (pred.)",
                    "ms here",
                    "ms device",
                    "cos min",
                    "off-domain cos min",
                    "accuracy %",
                    "meets",
                    "misses",
                ],
                rows,
            )
        )
        beaters = beat_the_choice(s)
        if beaters:
            unit = OBJECTIVE_UNITS.get(s["objective"], "")
            parts.append(
                f"<h3>What would beat the chosen one on {e(s['objective'])}, and why it was "
                "not chosen</h3>"
            )
            parts.append(
                _table(
                    ["candidate", f"{s['objective']} ({unit})", "cos min", "", "why not"],
                    [
                        [b["label"], b["value"], _f(b["cos_min"]), b["kind"], b["why"]]
                        for b in beaters
                    ],
                )
            )
    parts.append("<h2>Layers: bits, compute, heads, and why</h2>")
    keys = [
        "linear",
        "layer",
        "bits",
        "compute",
        "heads_removed",
        "heads_kept",
        "ffn_removed",
        "why",
    ]
    present = [k for k in keys if any(k in r for r in data.layers)]
    parts.append(_table(present, [[r.get(k, "") for k in present] for r in data.layers]))
    if diagnosis is not None:
        d = diagnosis
        parts.append("<h2>Diagnosis</h2>")
        parts.append(
            f"<p>CPU {e(d.cpu.model_name)}: int8 instructions <b>{e(str(d.cpu.best))}</b> "
            f"({e(', '.join(d.cpu.features) or 'none')}); expected int8 gain: "
            f"{e(d.cpu.expected_gain)}.</p>"
        )
        parts.append(
            f"<p>{d.int8_operators} int8 operators as onnxruntime runs the graph; "
            f"kernel time {_f(d.ms_total, 2)} ms per b1 x 128 request.</p>"
        )
        parts.append("<h3>Where the time goes (onnxruntime profiler, by operator type)</h3>")
        total = d.ms_total or 1.0
        parts.append(
            _table(
                ["operator", "ms per run", "share"],
                [[op, f"{ms:.3f}", f"{100 * ms / total:.1f}%"] for op, ms in d.ms_by_op.items()],
            )
        )
        parts.append("<h3>Operators that stayed float, and why</h3>")
        parts.append(
            _table(
                ["operator", "count", "why"],
                [[f.op_type, f.count, f.why] for f in d.float_operators],
            )
        )
        if d.float_linears:
            parts.append(
                _table(
                    ["Linear kept float", "why"], [[r["linear"], r["why"]] for r in d.float_linears]
                )
            )
    for note in data.notes:
        parts.append(f"<p class='note'>note: {e(note)}</p>")
    script = (
        "<script>const img=document.getElementById('frontier');function mark(){"
        "document.body.dataset.plot=img.naturalWidth+'x'+img.naturalHeight;}"
        "if(img.complete){mark();}else{img.addEventListener('load',mark);}</script>"
    )
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
        "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
        "th{background:#f3f3f3}.note{color:#666}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.title)}</title>"
        f"<style>{css}</style></head><body>{''.join(parts)}{script}</body></html>\n"
    )


@dataclass(frozen=True)
class ReportResult:
    html: Path
    png: Path
    diagnosis: Diagnosis | None


def write_report(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    profile: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> ReportResult:
    """Write the HTML report of a checkpoint or package to ``output`` and its plot beside it
    (``.png``). ``profile``: diagnose the package (a checkpoint is exported to a temporary
    package first). Both files appear whole or not at all."""
    say = on_step or (lambda _: None)
    path = Path(os.fspath(source))
    if not path.exists():
        raise SourceError(f"{path} does not exist: give a checkpoint or a package directory")
    if not is_checkpoint(path) and not (path / "manifest.json").is_file():
        raise SourceError(f"{path} is neither a checkpoint (checkpoint.json) nor a package")
    data = gather(path)
    diagnosis = None
    if profile:
        say("profiling the package with onnxruntime")
        if is_checkpoint(path):
            from edgec.exporters.build import export

            with tempfile.TemporaryDirectory(prefix="edgec-report-") as tmp:
                export(path, Path(tmp) / "pkg", on_step=say)
                diagnosis = diagnose(Path(tmp) / "pkg")
        else:
            diagnosis = diagnose(path)
    png = render_png(data)
    page = render_html(data, png, diagnosis)
    out = Path(os.fspath(output))
    png_path = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for target, payload in ((png_path, png), (out, page.encode("utf-8"))):
            tmp_file = target.with_name(f".{target.name}.tmp")
            tmp_file.write_bytes(payload)
            os.replace(tmp_file, target)
    except OSError as exc:
        raise EdgecError(f"cannot write the report to {out}: {exc}") from exc
    return ReportResult(out, png_path, diagnosis)
