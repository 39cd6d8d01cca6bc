"""Recipes: YAML and dataclasses, built-ins, and errors that name the bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgec.compressor.recipe import (
    BUILTIN_RECIPES,
    PruneStep,
    QuantizeStep,
    ShareStep,
    load_recipe,
    recipe_from_dict,
)

from edgec.errors import RecipeError


def test_builtin_recipes_by_name():
    assert set(BUILTIN_RECIPES) == {"int8", "balanced", "smallest"}
    balanced = load_recipe("balanced")
    assert [s.kind for s in balanced.steps] == ["share", "distill", "quantize"]
    assert [s.kind for s in load_recipe("int8").steps] == ["smooth", "quantize"]


def test_yaml_recipe_round_trips(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "floor: {min_cosine: 0.9}\n"
        "steps:\n"
        "  - prune: {heads: [2, 3], ffn: 0.25, importance: magnitude}\n"
        "  - share: {bits: 3, granularity: tensor, layers: [embeddings]}\n"
        "  - quantize\n"
    )
    recipe = load_recipe(path)
    assert recipe.name == "mine"
    assert recipe.steps[0] == PruneStep(heads=(2, 3), ffn=0.25, importance="magnitude")
    assert recipe.steps[1] == ShareStep(bits=3, granularity="tensor", layers=("embeddings",))
    assert recipe.steps[2] == QuantizeStep()
    assert recipe.floor.min_cosine == 0.9
    assert recipe_from_dict(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"steps": [{"prune": {"head": 0.5}}]}, ["'head'", "heads", "ffn"]),
        (
            {"steps": [{"squash": {}}]},
            ["'squash'", "distill", "prune", "quantize", "share", "smooth"],
        ),
        ({"steps": [{"share": {"bits": 9}}]}, ["share.bits", "2..8", "9"]),
        ({"steps": [{"share": {"bits": 1}}]}, ["share.bits", "1"]),
        ({"steps": [{"share": {"layers": ["convs"]}}]}, ["share.layers", "linears", "'convs'"]),
        ({"steps": [{"prune": {"ffn": 1.5}}]}, ["prune.ffn", "1.5"]),
        ({"steps": [{"prune": {"importance": "random"}}]}, ["prune.importance", "taylor"]),
        ({"steps": [{"quantize": {"mode": "float8"}}]}, ["quantize.mode", "dynamic", "static"]),
        ({"steps": [{"quantize": {"calibration": "mse"}}]}, ["entropy", "percentile"]),
        ({"steps": [{"distill": {"steps": 0}}]}, ["distill.steps"]),
        ({"steps": [{"distill": {"dropout": "no"}}]}, ["distill.dropout", "'no'"]),
        ({"steps": [{"quantize": {}}], "flor": {}}, ["'flor'", "floor"]),
        ({"steps": []}, ["steps"]),
    ],
)
def test_bad_recipes_name_the_problem(data, words):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    for word in words:
        assert word in str(info.value)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="int8, balanced, smallest"):
        load_recipe("fastest")


def test_dataclasses_refuse_bad_values():
    with pytest.raises(RecipeError, match=r"prune\.heads"):
        PruneStep(heads=(2, 0))
    with pytest.raises(RecipeError, match=r"share\.embedding_bits"):
        ShareStep(embedding_bits=12)


def test_the_readme_recipe_example_is_a_valid_recipe():
    import re
    from pathlib import Path

    import yaml
    from edgec.compressor.recipe import recipe_from_dict

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "steps:" in b)
    recipe = recipe_from_dict(yaml.safe_load(example))
    kinds = [s.kind for s in recipe.steps]
    assert kinds == ["prune", "distill", "smooth", "share", "distill", "quantize"]


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[1] / "examples" / "recipes").rglob("*.yaml")),
    ids=lambda p: p.name,
)
def test_example_recipes_load(path):
    assert load_recipe(path).steps
