"""Issue 15 items 4-6 and 8 on the shared local Ray: a non-finite loss stops the run (or skips the
step) and nothing non-finite is saved; a hung remote call times out naming the actor and method and
every actor is released; a prompt + completion longer than the model's context is refused at start;
two runs with one name on one cluster (Ray Tune trials) do not collide."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import ray
from safetensors.numpy import load_file

from raylign.config import ConfigError, load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics
from raylign.runtime import NonFiniteError, RunStopped

pytestmark = pytest.mark.usefixtures("ray_session")

TINY = ["model.path=tiny:llama", "model.lora=null", "progress=false", "output.trackers=[]",
        "resources.cpus_per_learner=0.5"]
RL = TINY + ['reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]',
             "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.n_samples=2", "train.batch_size=8",
             "train.micro_batch_size=8", "rl.eval_prompts=4", "resources.cpus_per_rollout_worker=0.5",
             "resources.cpus_per_reward_worker=0.25"]


def _run_actors(name: str) -> list[str]:
    return [n for n in ray.util.list_named_actors() if n.startswith(f"raylign-{name}-")]


def _live_placement_groups() -> list[str]:
    return [pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def _all_finite(safetensors_file: Path) -> bool:
    return all(bool(math.isfinite(float(abs(t).max()))) for t in load_file(str(safetensors_file)).values() if t.size)


def test_a_nan_loss_stops_the_run_leaves_no_final_and_only_finite_checkpoints(tmp_path, pairs_file):
    config = load_config("sft", TINY + [f"data.train={pairs_file}", f"output.dir={tmp_path}", "output.name=nan",
                                        "train.lr=1e6", "train.max_steps=8", "output.save_every=1",
                                        "output.keep_last=1", "train.batch_size=4", "train.micro_batch_size=4"])
    with pytest.raises(NonFiniteError, match=r"step \d+: (grad_norm|nll_sum) is (nan|inf) on learner 0") as info:
        run_pipeline(config)
    assert "train.on_nonfinite=skip_step" in str(info.value)
    run = tmp_path / "nan"
    assert not (run / "final").exists()
    (last,) = (run / "checkpoints").iterdir()  # keep_last=1: the one left is the last finite one
    assert last.name.startswith("step_") and _all_finite(last / "trainable.safetensors")
    assert _run_actors("nan") == []


def test_skip_step_skips_the_nonfinite_steps_and_saves_finite_weights(tmp_path, pairs_file):
    config = load_config("sft", TINY + [f"data.train={pairs_file}", f"output.dir={tmp_path}", "output.name=skip",
                                        "train.lr=1e6", "train.max_steps=8", "train.on_nonfinite=skip_step",
                                        "train.batch_size=4", "train.micro_batch_size=4"])
    result = run_pipeline(config)
    rows = [r for r in read_metrics(result.run_dir) if "train/skipped_steps" in r]
    assert len(rows) == 8 and sum(r["train/skipped_steps"] for r in rows) >= 1
    assert _all_finite(Path(result.run_dir) / "final" / "model.safetensors")


def test_a_hung_reward_call_times_out_naming_the_actor_and_releases_everything(tmp_path):
    config = load_config("grpo", RL + [f"output.dir={tmp_path}", "output.name=hung", "train.max_steps=2",
                                       'reward.sources=[{source: "function:tests.rl_rewards:never_returns"}]',
                                       "resources.call_timeout_s=5"])
    started = time.monotonic()
    with pytest.raises(RunStopped, match=r"reward\[0\]\.score did not return within resources.call_timeout_s=5s"):
        run_pipeline(config)
    assert time.monotonic() - started < 120
    assert _run_actors("hung") == [] and _live_placement_groups() == []


def test_prompt_plus_completion_longer_than_the_context_is_refused_at_start(tmp_path):
    # tiny:* models attend over 512 positions.
    config = load_config("grpo", RL + [f"output.dir={tmp_path}", "output.name=long", "data.max_prompt_length=500",
                                       "rollout.max_new_tokens=64"])
    with pytest.raises(ConfigError, match=r"\(500\) \+ rollout.max_new_tokens \(64\) = 564 tokens, more than the 512"):
        run_pipeline(config)
    assert not (tmp_path / "long").exists()  # refused before anything was created


def test_two_runs_with_one_name_on_one_cluster_do_not_collide(tmp_path):
    """Ray Tune runs every trial as output.name=run in one namespace: actor names must still differ."""
    results: dict[int, object] = {}

    def train(i: int) -> None:
        try:
            results[i] = run_pipeline(load_config("grpo", RL + [
                f"output.dir={tmp_path}/trial{i}", "output.name=run", "train.max_steps=1", "rl.eval_prompts=0",
                "resources.cpus_per_learner=0.25", "resources.cpus_per_rollout_worker=0.25"]))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert len(results) == 2 and all((tmp_path / f"trial{i}" / "run" / "final").is_dir() for i in range(2))
