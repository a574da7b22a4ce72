"""Recipe loading, inheritance, overrides and validation (all problems at once, each with its fix)."""

import pytest

from pipeline.errors import RecipeError
from pipeline.recipe import check_against_model, list_recipes, load_recipe, recipe_from_dict
from pipeline.shapes import SHAPES

SMOL = SHAPES["smollm2-135m"]


def test_every_recipe_in_the_repo_loads_and_names_its_command():
    paths = list_recipes()
    assert {"gpt2-fp16", "gpt2-tp2", "smollm2-135m-bf16-pp2", "smollm2-135m-fp16-tp3",
            "llama-3.1-8b-bf16-tp2"} <= {p.stem for p in paths}
    for path in paths:
        recipe = load_recipe(path)
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith(f"# make build RECIPE={path.stem}"), path
        assert f"mpirun -n {recipe.world_size} " in first_line, path


def test_extends_merges_and_child_wins():
    r = load_recipe("gpt2-tp2")
    assert r.parallel.tp == 2 and r.model.hub == "openai-community/gpt2" and r.precision.dtype == "float16"


def test_overrides_are_yaml_values():
    r = load_recipe("gpt2-fp16", ["parallel.tp=2", "runtime.prompts=[hi, there]", "runtime.temperature=0.7"])
    assert r.parallel.tp == 2 and r.runtime.prompts == ("hi", "there") and r.runtime.temperature == 0.7


def test_all_problems_reported_at_once_with_did_you_mean():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({
            "model": {"random": "gpt2", "seeed": 1},
            "paralel": {"tp": 2},
            "precision": {"dtype": "fp16"},
            "build": {"max_batch_size": "eight", "plugins": {"context_fmha": "yes"}},
            "runtime": {"prompts": "one prompt"},
        })
    text = str(err.value)
    assert "6 problems" in text
    assert "model.seeed: unknown key; did you mean 'model.seed'?" in text
    assert "paralel: unknown key; did you mean 'parallel'?" in text
    assert "precision.dtype: 'fp16' is not one of auto, float32, float16, bfloat16; did you mean 'float16'?" in text
    assert "build.max_batch_size: expected an integer, found str 'eight'" in text
    assert "build.plugins.context_fmha: expected true or false" in text
    assert "runtime.prompts: expected a list" in text


def test_source_rules():
    with pytest.raises(RecipeError, match="set exactly one of model.hub, model.local or model.random"):
        recipe_from_dict({"model": {"random": "gpt2", "local": "x"}})
    with pytest.raises(RecipeError, match="a Hub model needs a revision"):
        recipe_from_dict({"model": {"hub": "openai-community/gpt2"}})
    # a branch or tag is accepted here and pinned to its commit at fetch (tests/test_hub.py)
    assert recipe_from_dict({"model": {"hub": "openai-community/gpt2", "revision": "main"}}).model.revision == "main"
    with pytest.raises(RecipeError, match="unknown shape 'gpt3'; did you mean 'gpt2'"):
        recipe_from_dict({"model": {"random": "gpt3"}})


def test_plugin_combinations_refused_with_reason():
    with pytest.raises(RecipeError, match="build.plugins.context_fmha: needs gpt_attention_plugin, which is disabled"):
        recipe_from_dict({"model": {"random": "gpt2"}, "build": {"plugins": {"gpt_attention_plugin": "disable"}}})


def test_model_checks_name_key_value_and_choices():
    r = recipe_from_dict({"model": {"random": "smollm2-135m"}, "parallel": {"tp": 2, "pp": 4},
                          "build": {"max_seq_len": 100000}})
    problems = check_against_model(r, SMOL)
    assert problems[0] == ("parallel.tp: 2 does not divide the model's 9 attention heads; choose tp from [1, 3, 9], "
                           "or split the model with parallel.pp instead")
    assert "parallel.pp: 4 does not divide the model's 30 layers; choose pp from [1, 2, 3, 5, 6, 10, 15, 30]" in problems
    assert "build.max_seq_len: 100000 exceeds the model's 8192 positions" in problems[2]


def test_tp_must_fit_kv_heads():
    r = recipe_from_dict({"model": {"random": "llama-tiny"}, "parallel": {"tp": 8}})
    assert check_against_model(r, SHAPES["llama-tiny"]) == []  # 8 heads, 2 KV heads: replicated 4x
    shape = dict(SHAPES["llama-tiny"], num_attention_heads=12, num_key_value_heads=8)
    r = recipe_from_dict({"model": {"random": "llama-tiny"}, "parallel": {"tp": 6}})
    assert "does not fit the model's 8 KV heads" in check_against_model(r, shape)[0]


def test_extends_cycle_and_unknown_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_RECIPES", str(tmp_path))
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(RecipeError, match="cycle: a -> b -> a"):
        load_recipe("a")
    with pytest.raises(RecipeError, match="no recipe 'c'"):
        load_recipe("c")


def test_conflicting_overrides():
    with pytest.raises(RecipeError, match="set the same key or a parent and its child"):
        load_recipe("gpt2-fp16", ["parallel.tp=2", "parallel={tp: 1}"])


def test_name_is_not_a_key():
    with pytest.raises(RecipeError, match="name: not a recipe key"):
        recipe_from_dict({"name": "x", "model": {"random": "gpt2"}})
