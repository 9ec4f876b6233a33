"""The chaos script of issue 15: a tiny GRPO run with checkpoints, broken in turn.

* a rollout worker or a reward worker killed mid-run: Ray restarts it, the step is retried under the
  same seeds, and the run's metrics equal an uninterrupted run's;
* one of two learners killed with SIGKILL: the driver stops within seconds with one error and no actor
  of the run left; the metrics log is then torn (the last line cut mid-write, as a kill can leave it)
  and `--resume` finishes the run with the uninterrupted run's metrics;
* the disk full while a checkpoint is written (OSError(ENOSPC) at the write; this machine cannot mount a
  small tmpfs): one message, the previous checkpoint intact, no half-written one left, and `--resume`
  finishes the run with the uninterrupted run's metrics;
* Ctrl-C and SIGTERM to `raylign train`: exit 130 / 143 within a step, no temp dir, and the Ray the
  command started gone.

Runs on the shared local Ray (the CLI cases start their own) and is part of `make test`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import METRICS_FILE, read_metrics
from raylign.runtime import RunStopped
from tests.faults import run_actor

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.faults]

STEPS = 5
ARGS = ["model.path=tiny:llama", "model.lora=null", "progress=false", "output.trackers=[]",
        'reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]',
        "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.n_samples=4", "train.batch_size=16",
        "train.micro_batch_size=8", "train.lr=3e-3", "rl.eval_prompts=0", f"train.max_steps={STEPS}",
        "output.save_every=2", "resources.learners=2", "resources.cpus_per_learner=0.25",
        "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_reward_worker=0.25"]
COMPARED = ("reward/mean", "kl/seq_mean", "policy/loss")


def _config(tmp_path, name):
    return load_config("grpo", ARGS + [f"output.dir={tmp_path}/runs", f"output.name={name}"])


def _steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


def _assert_same_run(run_dir, baseline) -> None:
    steps = _steps(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))  # no step lost or logged twice
    for step, row in steps.items():
        for key in COMPARED:
            assert row[key] == pytest.approx(baseline[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return _steps(run_pipeline(_config(tmp_path_factory.mktemp("baseline"), "baseline")).run_dir)


def _in_thread(config):
    """Run `config` in a thread; returns (thread, outcome) with outcome["error"] set if it raised."""
    outcome: dict = {}

    def train():
        try:
            outcome["result"] = run_pipeline(config)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc
            outcome["failed_at"] = time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    return thread, outcome


def _wait_for(predicate, timeout_s=180):
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _logged(run_dir, step):
    metrics = run_dir / METRICS_FILE
    return lambda: metrics.exists() and f'"step": {step},' in metrics.read_text()


def test_killed_rollout_and_reward_workers_are_restarted_and_the_run_unchanged(tmp_path, baseline):
    config = _config(tmp_path, "workers")
    run_dir = tmp_path / "runs" / "workers"
    thread, outcome = _in_thread(config)
    for step, role in ((1, "rollout-0"), (3, "reward-0")):
        _wait_for(_logged(run_dir, step))
        ray.kill(run_actor("workers", role), no_restart=False)  # a crash: Ray restarts it and retries its call
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    _assert_same_run(run_dir, baseline)


def test_a_killed_learner_a_torn_log_and_a_full_disk_each_stop_or_resume_cleanly(tmp_path, baseline, monkeypatch):
    """One run broken three times: a learner killed in step 3 (stops at once, one error, no actor
    left), the log torn, resumed into a full disk at the step-4 checkpoint (one message, step_2
    intact, no half-written step_4), resumed once more to the end: the uninterrupted run's metrics."""
    import raylign.pipelines.loop as loop

    config = _config(tmp_path, "broken")
    run_dir = tmp_path / "runs" / "broken"
    checkpoints = run_dir / "checkpoints"
    thread, outcome = _in_thread(config)
    learner = run_actor("broken", "policy-1")
    pid = ray.get(learner.__ray_call__.remote(lambda self: os.getpid()))
    _wait_for(lambda: (checkpoints / "step_2").is_dir())
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, RunStopped), outcome
    assert "policy[" in str(error) and "the worker died" in str(error) and "--resume" in str(error)
    assert outcome["failed_at"] - killed_at < 30
    assert not [n for n in ray.util.list_named_actors() if n.startswith("raylign-broken-")]  # all released
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]

    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as log:
        log.write('{"step": 3, "reward/me')  # the last line cut mid-write

    real_write = loop.write_trainer_state

    def full_at_step_4(path, state):
        if state["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, state)

    monkeypatch.setattr(loop, "write_trainer_state", full_at_step_4)
    with pytest.raises(RunStopped, match="is full; the run stopped and the last checkpoint, step_2, is intact"):
        run_pipeline(config, resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]  # no half-written step_4
    assert not (run_dir / "final").exists()
    monkeypatch.setattr(loop, "write_trainer_state", real_write)  # space freed
    run_pipeline(config, resume=True)
    _assert_same_run(run_dir, baseline)


def _cli(tmp_path, name):
    return [sys.executable, "-m", "raylign.cli", "train", "grpo", *ARGS, "train.max_steps=200",
            f"output.dir={tmp_path}/runs", f"output.name={name}", "output.save_every=1"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_within_a_step_and_leave_nothing_behind(tmp_path, sig, code):
    env = dict(os.environ, RAY_ADDRESS="")  # the command starts its own local Ray
    proc = subprocess.Popen(_cli(tmp_path, "stopped"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    run_dir = tmp_path / "runs" / "stopped"
    try:
        _wait_for(_logged(run_dir, 1), timeout_s=240)
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes and the actors
        assert started
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    step_seconds = max(r["perf/step_seconds"] for r in read_metrics(run_dir) if "perf/step_seconds" in r)
    assert time.monotonic() - sent < 30 + 2 * step_seconds  # within about a step (plus releasing the actors)
    assert "Traceback" not in err and ("terminated" if code == 143 else "interrupted") in err
    assert not list((run_dir / "checkpoints").glob(".tmp*"))
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.info for p in psutil.process_iter(["pid", "name"]) if p in alive]
    shutil.rmtree(run_dir, ignore_errors=True)
