"""Fidelity off the calibration domain: the bundled Wikipedia set, the report, the floor, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from edgec.compressor import Floor, Recipe, ShareStep, compress
from edgec.compressor.calibration import load_data
from edgec.compressor.fidelity import compare, model_vectors
from edgec.models import load_model
from edgec.models.data import WIKIPEDIA_SENTENCES, bundled_sentences, wikipedia_sentences

from edgec.cli import cli
from edgec.errors import FidelityError, InputError

# 2-bit embedding rows: a random BERT's outputs follow its embeddings (its layers barely move
# them), and the loss differs between token distributions (here 0.988 vs 0.994 min cosine).
LOSSY = (ShareStep(bits=2, layers=("embeddings",), sensitivity=False, gptq=False),)
LOSSY_YAML = "steps:\n  - share: {bits: 2, layers: [embeddings], sensitivity: false, gptq: false}\n"


@pytest.fixture(scope="module")
def other_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token tensors unlike ``text_calibration``: longer, from a narrow id range, no padding."""
    rng = np.random.default_rng(1)
    ids = rng.integers(150, 200, size=(12, 24))
    path = tmp_path_factory.mktemp("off-domain") / "other.npz"
    np.savez(
        path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)
    )
    return path


def test_bundled_wikipedia_set_is_200_sentences_from_200_articles_not_in_the_sample():
    wiki = wikipedia_sentences()
    articles = (WIKIPEDIA_SENTENCES.parent / "wikipedia-articles.txt").read_text().splitlines()
    assert len(wiki) == 200 == len(set(wiki))
    assert len(articles) == 200 == len(set(articles))  # one sentence per article
    assert not set(wiki) & set(bundled_sentences("all"))
    assert all(40 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?" for s in wiki)
    assert (WIKIPEDIA_SENTENCES.parent / "LICENSE-wikipedia.md").is_file()


@pytest.mark.slow
def test_bundled_sample_brings_the_off_domain_set_for_text_only(tmp_path):
    _, minilm = load_model("minilm")
    data = load_data(minilm)
    assert data.off_domain is not None and data.off_domain.size == 200
    assert data.off_domain.origin == "bundled Wikipedia sentences"
    assert any("off-domain" in n and "Wikipedia" in n for n in data.notes)
    # A user's own calibration data brings no off-domain set unless one is given.
    own = tmp_path / "own.txt"
    own.write_text("\n".join(bundled_sentences("calibration")[:20]))
    assert load_data(minilm, own).off_domain is None
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(wikipedia_sentences()[:7]))
    assert load_data(minilm, own, off_domain=mine).off_domain.size == 7
    assert load_data(minilm, off_domain=mine).off_domain.size == 7  # replaces the bundled one
    _, digits = load_model("tiny-vit-digits")
    assert load_data(digits).off_domain is None


def test_missing_off_domain_file_is_named(wide_bert, text_calibration, tmp_path):
    _, spec = load_model(wide_bert)
    with pytest.raises(InputError, match=r"off-domain data .*nope\.txt. does not exist"):
        load_data(spec, text_calibration, off_domain=tmp_path / "nope.txt")


def test_report_carries_fidelity_on_both_sets(wide_bert, text_calibration, other_tokens, tmp_path):
    recipe = Recipe(name="p", steps=LOSSY)
    result = compress(
        wide_bert, recipe, tmp_path / "c", calib=text_calibration, off_domain=other_tokens
    )
    assert [s.step for s in result.steps] == ["original", "share"]
    original, pruned = result.steps
    assert (
        original.fidelity_off_domain is not None and original.fidelity_off_domain.cos_min > 0.9999
    )
    off, held = pruned.fidelity_off_domain, pruned.fidelity
    assert off is not None and off.cos_min < 0.999
    # Measured on the user's file: the pruned checkpoint against the original on those tensors.
    teacher, spec = load_model(wide_bert)
    student, _ = load_model(tmp_path / "c")
    other = load_data(spec, text_calibration, off_domain=other_tokens).off_domain
    again = compare(model_vectors(teacher, spec, other), model_vectors(student, spec, other), spec)
    assert off.cos_min == pytest.approx(again.cos_min, abs=1e-5)
    assert off.cos_mean == pytest.approx(again.cos_mean, abs=1e-5)
    assert (off.cos_min, off.cos_mean) != pytest.approx((held.cos_min, held.cos_mean), abs=1e-3)
    row = pruned.to_json()
    assert row["fidelity_off_domain"]["cos_min"] == off.cos_min
    assert row["fidelity"]["cos_min"] == held.cos_min
    # Without an off-domain set the field is there, empty.
    alone = compress(wide_bert, recipe, tmp_path / "d", calib=text_calibration)
    assert alone.final.fidelity_off_domain is None
    assert alone.final.to_json()["fidelity_off_domain"] is None


def test_floor_missed_only_off_domain_names_the_off_domain_set(
    wide_bert, text_calibration, other_tokens, tmp_path
):
    # The same held-out data gives the same figures in either role: measure both once, then
    # give the better one as --eval and the worse as --off-domain, with the floor between them.
    # Short sequences pool fewer tokens: min cosine 0.977 against 0.994 on ``other_tokens``.
    ids = np.random.default_rng(2).integers(1, 200, size=(8, 4))
    held_out = tmp_path / "held.npz"
    np.savez(
        held_out, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)
    )
    probe = compress(
        wide_bert,
        Recipe(name="p", steps=LOSSY),
        tmp_path / "probe",
        calib=text_calibration,
        eval=held_out,
        off_domain=other_tokens,
    ).final
    assert probe.fidelity_off_domain is not None
    figures = {held_out: probe.fidelity.cos_min, other_tokens: probe.fidelity_off_domain.cos_min}
    better, worse = sorted(figures, key=figures.__getitem__, reverse=True)
    assert figures[better] - figures[worse] > 1e-3
    floor = (figures[better] + figures[worse]) / 2
    recipe = Recipe(name="both", steps=LOSSY, floor=Floor(min_cosine=floor))
    with pytest.raises(FidelityError) as info:
        compress(
            wide_bert,
            recipe,
            tmp_path / "c",
            calib=text_calibration,
            eval=better,
            off_domain=worse,
        )
    message = str(info.value)
    assert f"off-domain set ({worse}): min cosine {figures[worse]:.4f} < floor" in message
    assert "held-out set" not in message  # the in-domain set met the floor
    # The same floor with the sets the other way round fails on the held-out set only.
    with pytest.raises(FidelityError, match=r"held-out set .*min cosine") as info:
        compress(
            wide_bert,
            recipe,
            tmp_path / "e",
            calib=text_calibration,
            eval=worse,
            off_domain=better,
        )
    assert "off-domain set" not in str(info.value)
    # And met on both, no error.
    compress(wide_bert, recipe, tmp_path / "f", calib=text_calibration, eval=better)


def test_cli_off_domain_file_is_used_and_shown(wide_bert, text_calibration, other_tokens, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LOSSY_YAML)
    base = ["compress", str(wide_bert), "--recipe", str(recipe), "--calib", str(text_calibration)]
    runner = CliRunner()
    as_json = runner.invoke(
        cli, [*base, "-o", str(tmp_path / "c"), "--off-domain", str(other_tokens), "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert any(str(other_tokens) in n for n in report["notes"])
    assert "fidelity_off_domain" in report["evaluation"]
    off = [s["fidelity_off_domain"] for s in report["steps"]]
    api = compress(
        wide_bert, recipe, tmp_path / "api", calib=text_calibration, off_domain=other_tokens
    )
    assert off[-1]["cos_min"] == pytest.approx(api.final.fidelity_off_domain.cos_min, abs=1e-6)
    table = runner.invoke(
        cli, [*base, "-o", str(tmp_path / "d"), "--off-domain", str(other_tokens)]
    )
    assert table.exit_code == 0, table.output
    assert "off-domain cos min" in table.stdout and "off-domain cos mean" in table.stdout
    assert f"{off[-1]['cos_min']:.4f}" in table.stdout
    plain = runner.invoke(cli, [*base, "-o", str(tmp_path / "e")])
    assert plain.exit_code == 0 and "off-domain" not in plain.stdout
    missing = runner.invoke(cli, [*base, "-o", str(tmp_path / "f"), "--off-domain", "nope.txt"])
    assert missing.exit_code == InputError.exit_code  # one line on stderr, edgec's exit code
    assert "error: off-domain data 'nope.txt' does not exist" in missing.stderr
