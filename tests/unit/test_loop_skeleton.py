"""The driver skeleton's own behaviour, without Ray: phase timers, checkpoints, resume, and the release
of every group on every path out (fake groups stand in for actor groups)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import raylign.pipelines.loop as loop
from raylign.config import load_config
from raylign.pipelines.loop import Algorithm, LearnerSlot, PhaseTimer, run_loop
from raylign.rundir import read_metrics, read_trainer_state


class FakeGroup:
    """Records calls like a WorkerGroup would receive them; optionally fails one method."""

    name = "fake"

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.fail = fail
        self.released = False

    def ready_async(self) -> list[Any]:
        return []  # constructed at once: nothing to wait for

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        self.calls.append(method)
        if method == self.fail:
            raise RuntimeError(f"{method} failed")
        if method == "master_address":
            return [("127.0.0.1", 1)]
        if method in ("save_checkpoint", "save_final"):
            Path(args[0]).mkdir(parents=True, exist_ok=True)
        return [None]

    def shutdown(self) -> None:
        self.released = True


class Counting(Algorithm):
    """Its "loss" is 1 / (step + 1); it fails at `fail_at` when asked to."""

    name = "counting"

    def __init__(self, config, fail_at: int | None = None, group_fail: str | None = None):
        super().__init__(config, Console(quiet=True))
        self.total_steps = 4
        self.fail_at = fail_at
        self.policy, self.other = FakeGroup(group_fail), FakeGroup()
        self.resumed_at: int | None = None

    def start(self, run):
        self.learners = [LearnerSlot(self.policy)]
        self.groups = [self.other]

    def load_state(self, checkpoint, state):
        self.resumed_at = state["step"]

    def step(self, step, timer: PhaseTimer):
        if step == self.fail_at:
            raise ValueError(f"boom at step {step}")
        with timer.phase("train"):
            pass
        return {"train/loss": 1.0 / (step + 1)}

    def save_state(self, checkpoint):
        return {"marker": 42}


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(loop, "init_ray", lambda address=None: None)


def _config(tmp_path, *extra):
    return load_config("sft", [f"output.dir={tmp_path}", "output.name=run", "output.trackers=[]", "progress=false",
                               *extra])


def test_phase_timer_names_phases_and_rejects_unknown_ones():
    timer = PhaseTimer()
    for _ in range(2):  # a phase entered twice adds up
        with timer.phase("train"):
            time.sleep(0.01)
    with timer.phase("generate"):
        pass
    m = timer.metrics()
    assert set(m) == {"perf/train_seconds", "perf/generate_seconds", "perf/step_seconds"}
    assert m["perf/train_seconds"] >= 0.02 and m["perf/step_seconds"] >= m["perf/train_seconds"]
    with pytest.raises(ValueError, match="unknown phase"):
        with timer.phase("thinking"):
            pass


def test_a_run_logs_checkpoints_saves_final_and_releases_its_groups(tmp_path):
    algo = Counting(_config(tmp_path, "output.save_every=2"))
    result = run_loop(algo.config, algo)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/loss"] == pytest.approx(0.25) and "perf/train_seconds" in rows[-1]
    ckpt = Path(result.run_dir) / "checkpoints" / "step_2"
    assert read_trainer_state(ckpt) == {"step": 2, "marker": 42}
    assert algo.policy.calls[:3] == ["master_address", "setup_distributed", "setup_optimizer"]
    assert "save_final" in algo.policy.calls and algo.policy.calls[-1] == "shutdown"
    assert algo.policy.released and algo.other.released


def test_resume_restores_the_step_and_the_algorithm_state(tmp_path):
    algo = Counting(_config(tmp_path, "output.save_every=2"), fail_at=3)
    with pytest.raises(ValueError, match="boom at step 3"):
        run_loop(algo.config, algo)
    again = Counting(_config(tmp_path, "output.save_every=2"))
    result = run_loop(again.config, again, resume=True)
    assert again.resumed_at == 2 and "load_checkpoint" in again.policy.calls
    assert [r["step"] for r in read_metrics(result.run_dir)] == [1, 2, 3, 4]  # rows after step 2 cut, no doubles


def test_an_error_releases_every_group_and_surfaces_unchanged(tmp_path):
    """The step's own error reaches the user, even when releasing a group fails too."""
    algo = Counting(_config(tmp_path), fail_at=1, group_fail="shutdown")
    with pytest.raises(ValueError, match="boom at step 1"):
        run_loop(algo.config, algo)
    assert algo.policy.released and algo.other.released
