"""Config: recipes load, overrides apply, and every mistake is one exact message."""

from __future__ import annotations

import pytest

from raylign.config import ConfigError, dump_config, list_recipes, load_config, parse_overrides


def _error(recipe: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides)
    return str(info.value)


def test_every_builtin_recipe_validates():
    names = list_recipes()
    assert {"quickstart", "sft"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name
        assert names[name], f"recipe {name} has no description"


def test_dotted_overrides_are_typed():
    cfg = load_config("sft", ["train.lr=1e-5", "resources.learners=2", "model.lora.r=8", "data.limit=null"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.resources.learners == 2
    assert cfg.model.lora.r == 8
    assert cfg.data.limit is None


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null", "e=text"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": None, "e": "text"}


def test_unknown_key_names_key_suggestion_and_valid_keys():
    msg = _error("sft", ["train.lrr=1"])
    assert msg == (
        "invalid recipe 'sft':\n  unknown key 'train.lrr'. Did you mean 'train.lr'? Valid keys in train: "
        "batch_size, counterfactual_penalty, epochs, eval_every, log_every, lr, max_grad_norm, max_steps, micro_batch_size, on_nonfinite, "
        "scheduler, warmup_steps, weight_decay"
    )


def test_unknown_top_level_section():
    msg = _error("sft", ["trian.lr=1"])
    assert "unknown key 'trian'. Did you mean 'train'?" in msg
    assert "Valid keys in the top level:" in msg


def test_wrong_type_names_key_expected_type_and_value():
    assert _error("sft", ["train.lr=abc"]) == (
        "invalid recipe 'sft':\n  'train.lr': expected float; got 'abc' (str) "
        "(Input should be a valid number, unable to parse string as a number)"
    )


def test_wrong_literal_lists_choices():
    msg = _error("sft", ["data.kind=pair"])
    assert "'data.kind': expected one of 'prompts', 'pairs', 'unpaired', 'ratings', 'text'; got 'pair'" in msg


def test_union_type_error_is_one_line():
    msg = _error("sft", ["model.lora.target_modules=5"])
    assert msg.count("\n") == 1
    assert "'model.lora.target_modules': expected list of str or one of 'all-linear'; got 5 (int)" in msg


def test_cross_field_check():
    assert "train.micro_batch_size (4) must be <= train.batch_size (2)" in _error(
        "sft", ["train.batch_size=2", "train.micro_batch_size=4"])


def test_bad_override_syntax_and_unknown_recipe():
    assert "is not of the form key=value" in _error("sft", ["train.lr"])
    msg = _error("sfft", [])
    assert "unknown recipe 'sfft'. Did you mean 'sft'?" in msg


def test_recipe_from_path_and_dump_roundtrip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("algorithm: sft\ntrain:\n  lr: 0.001\n")
    cfg = load_config(str(path), ["seed=3"])
    assert cfg.recipe == "mine" and cfg.train.lr == 0.001 and cfg.seed == 3
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)).model_dump() | {"recipe": "mine"} == cfg.model_dump()


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    assert "is not valid YAML" in _error(str(path), [])


def test_later_override_wins_and_enables_a_null_section():
    cfg = load_config("sft", ["model.lora=null", "model.lora.r=8"])
    assert cfg.model.lora is not None and cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32
    assert load_config("sft", ["model.lora.r=8", "model.lora=null"]).model.lora is None


def test_a_moved_key_points_to_its_new_place():
    """rollout.workers was accepted and read by nothing; the worker count is resources.rollout_workers."""
    msg = _error("grpo", ["rollout.workers=2"])
    assert "unknown key 'rollout.workers'. Did you mean 'resources.rollout_workers'?" in msg
    assert load_config("grpo", ["resources.rollout_workers=2"]).resources.rollout_workers == 2


def test_algorithm_is_checked_at_load_with_a_did_you_mean():
    msg = _error("sft", ["algorithm=gpro"])
    assert "'algorithm'" in msg and "Did you mean 'grpo'?" in msg
    from raylign.config import ALGORITHMS
    from raylign.pipelines import PIPELINES

    assert set(ALGORITHMS) == set(PIPELINES)  # every algorithm the config accepts has a loop, and back
