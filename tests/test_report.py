"""``edgec report`` and ``edgec inspect --diagnose``: a self-contained HTML page with the frontier
plot that a real browser (headless Chromium) renders, and the diagnosis of a package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_edgec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this, so a missing browser fails there instead of skipping
REQUIRE_CHROMIUM = os.environ.get("EDGEC_REQUIRE_CHROMIUM") == "1"


@pytest.fixture(scope="module")
def searched(
    tmp_path_factory: pytest.TempPathFactory, wide_bert: Path, text_calibration: Path
) -> Path:
    """A checkpoint from a two-candidate ``--recipe auto`` search (its search.json included)."""
    from edgec.compressor.search import search

    out = tmp_path_factory.mktemp("report") / "ckpt"
    search(wide_bert, out, "min_cosine=0.9", "size", max_candidates=2, calib=text_calibration)
    return out


@pytest.fixture(scope="module")
def report_html(searched: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    result = run_edgec("report", str(searched), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_report_is_self_contained_with_plot_table_and_layers(
    report_html: Path, searched: Path
) -> None:
    import json

    page = report_html.read_text()
    assert re.search(
        r'<img id="frontier"[^>]+src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page
    )
    assert report_html.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="https?://', page)  # nothing fetched from the network
    search = json.loads((searched / "search.json").read_text())
    for measured in search["measured"]:  # every measured candidate is in the frontier table
        assert measured["label"] in page
    assert "encoder.layer.1.output.dense" in page  # the per-layer table, with its reasons
    assert "int8 error" in page
    assert "Where the time goes" in page and "int8 instructions" in page


def test_chromium_renders_the_plot(report_html: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        if REQUIRE_CHROMIUM:
            pytest.fail("EDGEC_REQUIRE_CHROMIUM=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH (`apt-get install chromium`); CI installs it")
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        report_html.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    # the page's script writes the decoded image's size once the browser has loaded it
    found = re.search(r'<body data-plot="(\d+)x(\d+)"', dom)
    assert found, dom[:500]
    assert int(found.group(1)) >= 400 and int(found.group(2)) >= 300


def test_report_on_a_package_diagnoses_it(
    compressed_bert: tuple[Path, Path], tmp_path: Path
) -> None:
    _, package = compressed_bert
    result = run_edgec("report", str(package), "-o", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r.html").read_text()
    assert 'id="frontier"' in page
    assert "Operators that stayed float" in page and "Softmax" in page
    assert (
        "MatMulInteger" in page or "DynamicQuantizeMatMul" in page or "MatMulIntegerToFloat" in page
    )


def test_inspect_diagnose(compressed_bert: tuple[Path, Path]) -> None:
    _, package = compressed_bert
    result = run_edgec("inspect", str(package), "--diagnose")
    assert result.returncode == 0, result.stderr
    assert "int8 instructions" in result.stdout
    assert "where the time goes" in result.stdout
    assert "operators that stayed float" in result.stdout


def test_report_refuses_what_is_neither(tmp_path: Path) -> None:
    result = run_edgec("report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_edgec("report", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert result.returncode == 2 and "neither a checkpoint" in result.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("cpuinfo", "best", "features"),
    [
        (
            "flags\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n",
            "AVX-512 VNNI",
            ["avx512_vnni", "avx512bw", "avx2"],
        ),
        ("flags\t: fpu sse2 avx avx2\n", "AVX2", ["avx2"]),
        (
            "Features\t: fp asimd evtstrm aes asimddp i8mm\n",
            "ARM int8 matrix",
            ["i8mm", "asimddp", "asimd"],
        ),
        ("Features\t: fp asimd\n", "ARM NEON without dot product", ["asimd"]),
        ("flags\t: fpu sse2\n", None, []),
    ],
)
def test_cpu_int8_instructions(cpuinfo: str, best: str | None, features: list[str]) -> None:
    from edgec.runtimes.diagnosis import cpu_int8

    found = cpu_int8(cpuinfo)
    assert found.features == features
    if best is None:
        assert found.best is None and "no gain" in found.expected_gain
    else:
        assert found.best is not None and found.best.startswith(best)


def test_what_would_beat_the_choice_and_why_not() -> None:
    """The answer to "why is nothing faster (or smaller)": measured candidates better on the
    objective with what they missed, then the predicted frontier's below the chosen one."""
    from edgec.compressor.report import beat_the_choice

    def measured(label: str, mb: float, cos: float, failures: list[str]) -> dict:
        fid = {"cos_min": cos}
        return {
            "label": label,
            "package_bytes": int(mb * 1e6),
            "memory_bytes": 0,
            "ms_b1x128_here": 1.0,
            "ms_b1x128_device": None,
            "fidelity": fid,
            "fidelity_off_domain": None,
            "meets_floor": not failures,
            "failures": failures,
        }

    search = {
        "objective": "size",
        "floor": {"min_cosine": 0.99},
        "chosen": "c",
        "stopped": "the time budget (1 min) was spent",
        "measured": [
            measured("c", 10, 0.995, []),
            measured("small", 8, 0.95, ["held-out: min cosine 0.95 < floor 0.99"]),
            measured("big", 12, 0.999, []),
        ],
        "predicted_frontier": [
            {"label": "tiny", "objective": 5e6, "cos_min": 0.9},
            {"label": "small", "objective": 8e6, "cos_min": 0.99},  # measured: listed once
            {"label": "untried", "objective": 9e6, "cos_min": 0.995},
            {"label": "large", "objective": 11e6, "cos_min": 0.999},
        ],
    }
    rows = beat_the_choice(search)
    assert [(r["label"], r["kind"]) for r in rows] == [
        ("small", "measured"),
        ("tiny", "predicted"),
        ("untried", "predicted"),
    ]
    assert rows[0]["why"] == "held-out: min cosine 0.95 < floor 0.99"
    assert rows[1]["why"] == "predicted min cosine 0.9000 < floor 0.99"
    assert rows[2]["why"] == "not built: the time budget (1 min) was spent"
    assert rows[0]["value"] == "8.00"
    search["chosen"] = "tiny"  # never measured: no chosen figures to compare with
    assert beat_the_choice(search) == []
