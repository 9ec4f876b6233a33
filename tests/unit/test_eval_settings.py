"""EvalSettings (`raylign eval`) and AnnotateSettings (`raylign data annotate`): defaults equal the CLI's,
every flag reaches its field, cross-field rules give their messages, unknown fields are rejected. No Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from raylign.cli import annotate_settings, build_parser, eval_settings, main
from raylign.config import ConfigError, RolloutConfig
from raylign.evaluation.settings import EvalSettings
from raylign.evaluation.settings import settings_from as eval_from

EVAL_MIN = {"model": "M", "out": "O", "pairs": "P"}
ANNOTATE_MIN = {"prompts": "P", "model": "M", "annotator": "A", "out": "O"}


# ---- EvalSettings --------------------------------------------------------------------------------


def test_eval_defaults_equal_the_cli_defaults():
    args = build_parser().parse_args(["eval", "M", "--out", "O", "--pairs", "P"])
    assert eval_settings(args) == EvalSettings(model="M", out="O", pairs="P")


def test_every_eval_flag_reaches_its_field():
    argv = ["eval", "runs/x", "--out", "o", "--pairs", "p.jsonl", "--ratings", "r.jsonl", "--bias", "builtin",
            "--prompts", "q.jsonl", "--reference", "ref", "--references", "refs.jsonl", "--embedder", "emb",
            "--checkpoints", "--proxy", "length", "--gold", "lexicon:vader", "--scorer", "dpo", "--judge", "length",
            "--beta", "0.3", "--limit", "7", "--max-new-tokens", "9", "--temperature", "0.5", "--actors", "3",
            "--cpus-per-actor", "0.5", "--batch-size", "4", "--bias-generate", "--seed", "5", "--no-progress",
            "--human", "db.sqlite", "--explain", "2"]
    got = eval_settings(build_parser().parse_args(argv))
    assert got == EvalSettings(
        model="runs/x", out="o", pairs="p.jsonl", ratings="r.jsonl", bias="builtin", prompts="q.jsonl",
        reference="ref", references="refs.jsonl", embedder="emb", checkpoints=True, proxy="length",
        gold="lexicon:vader", scorer="dpo", judge="length", beta=0.3, limit=7, max_new_tokens=9, temperature=0.5,
        actors=3, cpus_per_actor=0.5, batch_size=4, bias_generate=True, seed=5, progress=False, human="db.sqlite",
        explain=2)
    defaults = EvalSettings(**EVAL_MIN)
    cli_fields = set(EvalSettings.model_fields) - {"n_boot"}  # n_boot has no flag
    assert {f for f in cli_fields if getattr(got, f) == getattr(defaults, f)} == set()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": "M", "out": "O"},
         "nothing to evaluate: give at least one of --pairs, --ratings, --bias, --prompts, --references"),
        ({"model": "M", "out": "O", "prompts": "p", "gold": "lexicon:vader"},
         "--proxy and --gold go with --checkpoints (curves across a run's checkpoints)"),
        ({"model": "M", "out": "O", "prompts": "p", "proxy": "length"},
         "--proxy and --gold go with --checkpoints (curves across a run's checkpoints)"),
        ({"model": "M", "out": "O", "prompts": "p", "checkpoints": True},
         "--checkpoints draws reward over-optimisation curves: it needs --prompts F (held-out prompts) and "
         "--gold S (a held-out reward, e.g. lexicon:vader or a reward model dir)"),
        ({"model": "M", "out": "O", "pairs": "p", "gold": "g", "checkpoints": True},
         "--checkpoints draws reward over-optimisation curves: it needs --prompts F"),
    ],
)
def test_eval_cross_field_rules(values, message):
    with pytest.raises(ConfigError) as info:
        eval_from(values)
    assert str(info.value).startswith(message)
    with pytest.raises(ValidationError) as direct:  # built directly: the same message inside pydantic's error
        EvalSettings(**values)
    assert message in str(direct.value)


def test_eval_checkpoints_with_prompts_and_gold_is_valid():
    s = eval_from({"model": "runs/x", "out": "O", "prompts": "p", "gold": "lexicon:vader", "checkpoints": True})
    assert s.checkpoints and not s.needs_scorer
    assert s.generation_kwargs() == {"max_new_tokens": 64, "temperature": 1.0, "seed": 0, "actors": 2,
                                     "cpus_per_actor": 1.0, "batch_size": 16, "progress": True}


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [("actors", 0, "actors:"), ("temperature", -0.1, "temperature:"), ("cpus_per_actor", 0, "cpus_per_actor:"),
     ("batch_size", 0, "batch_size:"), ("max_new_tokens", 0, "max_new_tokens:"), ("limit", 0, "limit:"),
     ("n_boot", 0, "n_boot:"), ("actors", "two", "actors:")],
)
def test_eval_bad_values_are_one_line_naming_the_field(field, value, where):
    with pytest.raises(ConfigError) as info:
        eval_from({**EVAL_MIN, field: value})
    assert str(info.value).startswith(where) and "\n" not in str(info.value)


def test_eval_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="^bogus: Extra inputs are not permitted"):
        eval_from({**EVAL_MIN, "bogus": 1})
    with pytest.raises(ValidationError, match="bogus"):
        EvalSettings(**EVAL_MIN, bogus=1)


def test_eval_cli_bad_value_is_one_line_before_anything_starts(tmp_path, capsys):
    assert main(["eval", "tiny:llama", "--pairs", "p.jsonl", "--actors", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "actors: Input should be greater than or equal to 1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- AnnotateSettings (imported in each test: the eval half needs nothing from raylign.pipelines) -----


def test_annotate_defaults_equal_the_cli_defaults():
    from raylign.pipelines.annotate_settings import AnnotateSettings

    args = build_parser().parse_args(["data", "annotate", "--prompts", "P", "--model", "M", "--annotator", "A",
                                      "--out", "O"])
    assert annotate_settings(args) == AnnotateSettings(prompts="P", model="M", annotator="A", out="O")


def test_every_annotate_flag_reaches_its_field():
    from raylign.pipelines.annotate_settings import AnnotateSettings

    argv = ["data", "annotate", "--prompts", "p", "--model", "m", "--annotator", "a", "--out", "o", "--n", "4",
            "--seed", "3", "--limit", "5", "--max-new-tokens", "7", "--temperature", "0.7", "--top-p", "0.9",
            "--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "3", "--min-margin", "0.2",
            "--no-progress"]
    got = annotate_settings(build_parser().parse_args(argv))
    assert got == AnnotateSettings(prompts="p", model="m", annotator="a", out="o", n=4, seed=3, limit=5,
                                   max_new_tokens=7, temperature=0.7, top_p=0.9, workers=2, cpus_per_worker=0.5,
                                   batch_size=3, min_margin=0.2, progress=False)
    defaults = AnnotateSettings(**ANNOTATE_MIN)
    cli_fields = set(AnnotateSettings.model_fields) - {"ray_address", *ANNOTATE_MIN}  # no --ray-address flag
    assert {f for f in cli_fields if getattr(got, f) == getattr(defaults, f)} == set()
    assert got.sampling == RolloutConfig(batch_size=3, n_samples=4, max_new_tokens=7, temperature=0.7, top_p=0.9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"n": 1}, "--n must be at least 2 (a pair needs two samples per prompt), got 1"),
        ({"workers": 0}, "--workers must be at least 1, got 0"),
        ({"cpus_per_worker": 0}, "cpus_per_worker must be positive, got 0.0"),
        ({"temperature": 0}, "--temperature must be > 0 (got 0.0): greedy decoding gives n identical completions, "
                             "so every prompt would tie"),
        ({"max_new_tokens": 0}, "invalid sampling settings: max_new_tokens: Input should be greater than 0"),
        ({"top_p": 1.5}, "invalid sampling settings: top_p: Input should be less than or equal to 1"),
        ({"batch_size": 0}, "invalid sampling settings: batch_size: Input should be greater than 0"),
        ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_annotate_rules_give_their_messages(extra, message):
    from raylign.pipelines.annotate_settings import AnnotateSettings
    from raylign.pipelines.annotate_settings import settings_from as annotate_from

    with pytest.raises(ConfigError) as info:
        annotate_from({**ANNOTATE_MIN, **extra})
    assert str(info.value) == message
    with pytest.raises(ValidationError):
        AnnotateSettings(**ANNOTATE_MIN, **extra)


# ---- layering ------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_evaluation_imports_neither_pipelines_nor_cli_and_overoptimization_not_runner():
    package = Path(__file__).resolve().parents[2] / "raylign" / "evaluation"
    for path in package.glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[:2] in (["raylign", "pipelines"], ["raylign", "cli"])}
        assert not bad, f"{path.name} imports {bad}"
    assert "raylign.evaluation.runner" not in _imports(package / "overoptimization.py")


def test_the_settings_modules_import_neither_torch_nor_ray():
    code = ("import sys, raylign.evaluation.settings; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
