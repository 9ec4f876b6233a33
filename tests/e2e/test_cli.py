"""The `raylign` command as a user runs it: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

from raylign.cli import main


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "raylign.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("quickstart", "train", "recipes", "models", "data"):
        assert command in out.stdout


def test_unknown_key_is_one_line_error_and_exit_2(capsys):
    assert main(["train", "sft", "train.lrr=1e-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'. Did you mean 'train.lr'?" in err
    assert "Traceback" not in err


def test_wrong_type_fails_before_anything_starts(capsys, tmp_path):
    assert main(["train", "sft", "train.batch_size=many", f"output.dir={tmp_path}"]) == 2
    assert "'train.batch_size': expected int; got 'many' (str)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_missing_data_file_is_a_clear_error(capsys, tmp_path):
    code = main(["train", "sft", "model.path=tiny:llama", f"data.train={tmp_path}/nope.jsonl",
                 f"output.dir={tmp_path}/runs"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_recipes_list_and_show(capsys):
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("sft", "dpo", "ipo", "kto", "orpo", "simpo", "reward", "quickstart", "ppo", "grpo", "rloo",
                 "reinforce_pp"):
        assert name in out
    assert main(["recipes", "show", "dpo"]) == 0
    assert "algorithm: dpo" in capsys.readouterr().out
    assert main(["recipes", "show", "dpoo"]) == 2
    assert "Did you mean 'dpo'?" in capsys.readouterr().err


def test_models_list_and_pull_tiny(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "builtin:smollm2-135m-instruct" in out and "tiny:llama" in out
    assert main(["models", "pull", "tiny:qwen2"]) == 0
    assert "ready:" in capsys.readouterr().out
    assert main(["models", "pull", "not-a-real/model-id-xyz"]) == 2
    assert "builtin:" in capsys.readouterr().err


def test_data_validate_summary_and_bad_row(capsys, tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i % 3}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(6)))
    assert main(["data", "validate", str(good), "--kind", "pairs"]) == 0
    out = capsys.readouterr().out
    assert "6 rows" in out and "valid:" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "", "rejected": "no"}) + "\n")
    assert main(["data", "validate", str(bad), "--kind", "pairs"]) == 2
    assert f"{bad}:1: field 'chosen': empty text" in capsys.readouterr().err


def test_online_rl_mistakes_fail_before_any_actor_starts(capsys, tmp_path):
    base = ["model.path=tiny:llama", f"output.dir={tmp_path}/runs"]
    assert main(["train", "grpo", *base, "rollout.n_samples=1"]) == 2
    assert "rollout.n_samples must be >= 2" in capsys.readouterr().err
    assert main(["train", "grpo", *base, "reward.sources=[{source: vader}]"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward source 'vader'. Did you mean 'lexicon:vader'?" in err and "Traceback" not in err
    assert main(["train", "ppo", *base, "rl.kl_estimator=k4"]) == 2
    assert "'rl.kl_estimator'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_quickstart_without_held_out_prompts_is_refused(capsys):
    assert main(["quickstart", "rl.eval_prompts=0"]) == 2
    assert "held-out prompts" in capsys.readouterr().err
