"""`raylign tune` end to end on tiny:llama: the multitask-weights sweep with 4 trials under ASHA is
interrupted (Ctrl-C) and a second invocation resumes it to the end; ASHA stops a trial early;
`raylign tune summarize` prints the ranked table and writes the plot; `raylign dashboard` serves
TensorBoard on the sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raylign.cli import main
from raylign.tuning.summary import load_summary
from tests.conftest import synthetic_pairs, write_jsonl
from tests.integration.test_multitask import synthetic_ratings

ROOT = Path(__file__).resolve().parents[2]


def _tune_cmd(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "raylign.cli", "tune", "tune_configs/multitask_weights.yaml",
        "num_samples=4", "iterations=3", "steps_per_iteration=2", f"output_dir={out}",
        "trial_resources.max_concurrent_trials=2",
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "train.lr=2e-3",
        "train.warmup_steps=0", "train.scheduler=constant", "train.batch_size=12", "train.micro_batch_size=12",
        f"multitask.tasks.imitation.data.train={data / 'text.jsonl'}", "multitask.tasks.imitation.data.kind=text",
        f"multitask.tasks.preference.data.train={data / 'pairs.jsonl'}",
        f"multitask.tasks.rating.data.train={data / 'ratings.jsonl'}",
        *(f"multitask.tasks.{t}.data.limit=120" for t in ("imitation", "preference", "rating")),
        *(f"multitask.tasks.{t}.data.val_fraction=0.2" for t in ("imitation", "preference", "rating")),
        "--no-dashboard",
    ]


def _env(ray_address: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1")
    env.pop("RAY_ADDRESS", None)
    if ray_address:  # the CLI attaches to the tests' Ray as it would to a cluster (saves a Ray start per call)
        env["RAY_ADDRESS"] = ray_address
    return env


def _reported(sweep: Path) -> bool:
    return any(p.stat().st_size > 0 for p in sweep.glob("trial_*/result.json"))


@pytest.mark.slow  # ~2 minutes: four trials, each with its own learner actor; run by `make test-slow`
def test_tune_multitask_weights_asha_interrupt_resume_summarize(tmp_path, capsys, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "pairs.jsonl", synthetic_pairs(200))
    write_jsonl(data / "text.jsonl", [{"text": p["chosen"]} for p in synthetic_pairs(200, seed=1)])
    write_jsonl(data / "ratings.jsonl", synthetic_ratings(200))
    out = tmp_path / "sweeps"
    sweep = out / "multitask-weights"
    cmd = _tune_cmd(data, out)

    # 1. start the sweep and interrupt it (Ctrl-C) once the first trial has reported
    log1 = tmp_path / "first.log"
    with open(log1, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=_env(address))
        deadline = time.time() + 300
        while proc.poll() is None and not _reported(sweep) and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + log1.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    first = load_summary(sweep)
    finished = [r for r in first.rows if r.status == "TERMINATED"]
    assert len(finished) < 4, log1.read_text()[-3000:]  # it really was interrupted

    # 2. the same command resumes the sweep and runs it to the end
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(address), timeout=600)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "resuming the interrupted sweep" in log2
    assert "Ray dashboard:" in log2 and f"tensorboard --logdir {sweep}" in log2
    summary = load_summary(sweep)
    assert len(summary.rows) == 4
    assert all(r.status == "TERMINATED" for r in summary.rows), [(r.trial_id, r.status) for r in summary.rows]
    assert summary.stopped_early, [(r.trial_id, r.iterations) for r in summary.rows]  # ASHA stopped >= 1 trial
    assert max(r.iterations for r in summary.rows) == 3
    for row in summary.rows:
        steps = [json.loads(line)["step"] for line in (Path(row.path) / "run" / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps), steps  # a resumed trial continues its log, it does not repeat it
        assert list(Path(row.path).rglob("events.out.tfevents*")), row.path  # TensorBoard per trial

    # 3. summarize: ranked table, plot, best checkpoint
    assert main(["tune", "summarize", str(sweep)]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "stopped early" in text and "imitation.weight" in text
    assert (sweep / "sweep.png").stat().st_size > 10_000
    best = summary.best
    assert f"best checkpoint: {best.checkpoint}" in text.replace("\n", "")
    assert (Path(best.checkpoint) / "config.json").exists()

    # 4. raylign dashboard serves TensorBoard on the sweep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    board = subprocess.Popen([sys.executable, "-m", "raylign.cli", "dashboard", str(sweep), "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and not ok:
            try:
                ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ok
    finally:
        board.terminate()
        board.wait(timeout=30)
