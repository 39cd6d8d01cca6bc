"""``--recipe auto``: the search builds and measures real candidates, keeps the floor, respects
its candidate budget, and names the closest candidate when nothing meets the floor (exit 7).

On a small random BERT (hidden 64: wide enough for the coded weight encoding) calibrated on
random tokens; every candidate is compressed, exported and timed for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_edgec

from edgec.errors import RecipeError


def _dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(objective, fidelity): another is no worse on both and better on one."""
    return any(
        o[0] <= point[0] and o[1] >= point[1] and (o[0] < point[0] or o[1] > point[1])
        for o in others
    )


def _auto(model: Path, calib: Path, out: Path, floor: str, *options: str) -> Any:
    """``edgec compress MODEL --recipe auto --floor FLOOR [options] --calib CALIB -o OUT``."""
    return run_edgec(
        "compress",
        str(model),
        "--recipe",
        "auto",
        "--floor",
        floor,
        *options,
        "--calib",
        str(calib),
        "-o",
        str(out),
    )


@pytest.fixture(scope="module")
def auto_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, wide_bert: Path, text_calibration: Path
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("auto") / "ckpt"
    result = _auto(
        wide_bert,
        text_calibration,
        out,
        "min_cosine=0.95",
        "--objective",
        "size",
        "--max-candidates",
        "3",
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "search.json").read_text())


def test_auto_chooses_a_measured_candidate_that_meets_the_floor(
    auto_checkpoint: tuple[Path, dict],
) -> None:
    out, search = auto_checkpoint
    assert (out / "checkpoint.json").is_file() and (out / "model.safetensors").is_file()
    measured = search["measured"]
    assert 1 <= len(measured) <= 3  # the candidate budget
    chosen = next(m for m in measured if m["label"] == search["chosen"])
    assert chosen["meets_floor"]
    for fid in (chosen["fidelity"], chosen["fidelity_off_domain"]):
        assert fid is None or fid["cos_min"] >= 0.95
    # the checkpoint written is the chosen one: its own report says the same fidelity
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["recipe"]["name"] == f"auto: {chosen['label']}"
    final = meta["report"]["steps"][-1]["fidelity"]
    assert final["cos_min"] == pytest.approx(chosen["fidelity"]["cos_min"])
    # the best size among the measured that meet the floor, and not dominated by any of them
    passing = [m for m in measured if m["meets_floor"]]
    assert chosen["package_bytes"] == min(m["package_bytes"] for m in passing)
    points = [(m["package_bytes"], m["fidelity"]["cos_min"]) for m in passing if m is not chosen]
    assert not _dominated((chosen["package_bytes"], chosen["fidelity"]["cos_min"]), points)
    # measured, not looked up: sizes are the exported packages', latencies were timed
    assert all(m["package_bytes"] > 0 and m["ms_b1x128_here"] > 0 for m in measured)
    assert search["space"]["candidates"] > 100


def test_auto_checkpoint_exports(auto_checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    out, search = auto_checkpoint
    result = run_edgec("export", str(out), "-o", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr
    size = sum(f.stat().st_size for f in (tmp_path / "pkg").rglob("*") if f.is_file())
    chosen = next(m for m in search["measured"] if m["label"] == search["chosen"])
    assert size == pytest.approx(chosen["package_bytes"], rel=0.01)


def test_floor_nothing_meets_exits_7_naming_the_closest(
    wide_bert: Path, text_calibration: Path, tmp_path: Path
) -> None:
    """Only the original meets min cosine 1.0 (0.9999999 was met by int8 embeddings alone)."""
    out = tmp_path / "never"
    result = _auto(wide_bert, text_calibration, out, "min_cosine=1.0", "--max-candidates", "1")
    assert result.returncode == 7, result.stderr
    assert "the closest" in result.stderr and "min cosine" in result.stderr
    assert not out.exists()  # no half-written artifact


def test_budget_is_a_count_of_candidates(
    wide_bert: Path, text_calibration: Path, tmp_path: Path
) -> None:
    """Through the Python API, ``edgec.compress(..., "auto", ...)``."""
    import edgec

    messages: list[str] = []
    result = edgec.compress(
        wide_bert,
        "auto",
        tmp_path / "one",
        calib=text_calibration,
        on_step=messages.append,
        floor="mean_cosine=0.5",
        objective="latency",
        max_candidates=1,
    )
    assert len(result.measured) == 1
    assert result.stopped == "the candidate budget (1) was spent"
    assert any(m.startswith("candidate 1 ") for m in messages)  # progress was shown
    assert result.chosen.meets and result.chosen.ms_here > 0
    with pytest.raises(RecipeError, match="only apply to recipe='auto'"):
        edgec.compress(wide_bert, "int8", tmp_path / "two", max_candidates=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--floor", "cosine=0.9"], "KEY=NUMBER"),
        (["--floor", "min_cosine=high"], "must be a number"),
        (["--floor", "min_cosine=1.5"], "floor.min_cosine"),
        (["--floor", "min_cosine=0.9", "--objective", "speed"], "objective must be one of"),
        ([], "needs --floor"),
    ],
)
def test_bad_auto_options_exit_3(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_edgec("compress", "minilm", "--recipe", "auto", *args, "-o", str(tmp_path / "x"))
    assert result.returncode == 3, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "x").exists()


def test_auto_options_refused_with_a_fixed_recipe(tmp_path: Path) -> None:
    result = run_edgec(
        "compress", "minilm", "--recipe", "int8", "--floor", "min_cosine=0.9", "-o", str(tmp_path)
    )
    assert result.returncode == 3 and "only apply to --recipe auto" in result.stderr


def test_recipe_steps_the_search_needs(
    wide_bert: Path, text_calibration: Path, tmp_path: Path
) -> None:
    """Explicit widths per weight, Linears excluded from int8, FFN pruning per layer."""
    from edgec.compressor import PruneStep, QuantizeStep, Recipe, ShareStep, compress

    query = "encoder.layer.0.attention.self.query"
    recipe = Recipe(
        steps=(
            PruneStep(heads=(4, 3), ffn=(0.25, 0.0), importance="magnitude"),
            ShareStep(bits=4, layers=("linears",), widths={f"{query}.weight": 6}),
            QuantizeStep(exclude=(query,)),
        )
    )
    result = compress(
        wide_bert, recipe, tmp_path / "c", calib=text_calibration, predict_memory=False
    )
    prune, share, quant = (s.details for s in result.steps[1:])
    assert prune["heads_kept"] == [4, 3] and prune["ffn_kept"] == [96, 128]
    assert share["bits"][f"{query}.weight"] == 6
    assert {b for n, b in share["bits"].items() if n != f"{query}.weight"} == {4}
    assert query in quant["float_fallback"] and query not in quant["quantized"]
    with pytest.raises(RecipeError, match=r"share\.widths names weights"):
        compress(
            wide_bert,
            Recipe(steps=(ShareStep(widths={"nope.weight": 4}),)),
            tmp_path / "d",
            calib=text_calibration,
            predict_memory=False,
        )
    with pytest.raises(RecipeError, match=r"quantize\.exclude names no block Linear"):
        compress(
            wide_bert,
            Recipe(steps=(QuantizeStep(exclude=("nope",)),)),
            tmp_path / "e",
            calib=text_calibration,
            predict_memory=False,
        )
    with pytest.raises(RecipeError, match=r"share\.widths"):
        ShareStep(widths={"x.weight": 9})
    with pytest.raises(RecipeError, match="ffn"):
        PruneStep(ffn=(0.25, 1.5))


@pytest.mark.parametrize(("memory_mb", "code"), [(500, 0), (0.01, 7)])
def test_memory_objective_on_a_device_profile(
    wide_bert: Path, text_calibration: Path, tmp_path: Path, memory_mb: float, code: int
) -> None:
    """``--objective memory --devices``: latency comes from the cost model on the profile, and a
    device too small for every candidate is a floor miss naming the memory (exit 7)."""
    devices = tmp_path / "board.yaml"
    devices.write_text(
        f"devices:\n  - {{name: board, threads: 1, memory_mb: {memory_mb}}}\n", encoding="utf-8"
    )
    out = tmp_path / "ckpt"
    result = _auto(
        wide_bert,
        text_calibration,
        out,
        "min_cosine=0.9",
        "--objective",
        "memory",
        "--devices",
        str(devices),
        "--max-candidates",
        "1",
    )
    assert result.returncode == code, result.stderr
    if code:
        assert "memory" in result.stderr and "device 'board' 0.01 MB" in result.stderr
        assert not out.exists()
        return
    search = json.loads((out / "search.json").read_text())
    assert search["objective"] == "memory" and search["device"]["name"] == "board"
    (chosen,) = search["measured"]
    assert chosen["ms_b1x128_device"] > 0  # the cost model on the profile, not this machine
    assert 0 < chosen["memory_bytes"] <= 500e6
