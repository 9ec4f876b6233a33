"""A tiny GRPO run as a Ray job on a real 3-node cluster (`raylign cluster up`: three raylets on this
machine, token auth), learner, rollout and reward groups each pinned to its own node, no shared path
but `output.storage`; then the rollout worker's node is killed mid-run and `--resume` finishes the run.

Every node has its own RAYLIGN_HOME and TMPDIR; the driver (the job, on the head) owns `output.dir`,
and the learner, on another node, reaches it only through `output.storage` (a local directory standing
in for NFS/S3). The cluster is this test's alone: its own ports, temp dirs and token, brought down by
pid in the fixture's finalizer whatever happens, and every other Ray on the machine is left running.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from raylign import localcluster, storage
from raylign.rundir import CHECKPOINTS_DIR, PLACEMENT_FILE, read_metrics
from tests.conftest import synthetic_pairs, write_jsonl

BIN = Path(sys.executable).parent
STEPS = 4
# Run as `ray job submit -- <JOB> output.dir=... output.storage=...` from a working dir holding pairs.jsonl.
JOB = ("raylign train grpo model.path=tiny:llama model.lora=null data.train=pairs.jsonl data.kind=prompts "
       "'reward.sources=[{source: length}]' rollout.prompts_per_step=4 rollout.n_samples=2 rollout.max_new_tokens=8 "
       f"train.batch_size=8 train.micro_batch_size=8 train.max_steps={STEPS} rl.eval_prompts=0 output.save_every=1 "
       "output.keep_last=5 output.trackers=[] progress=false output.name=grpo "
       "resources.cpus_per_learner=0.5 resources.cpus_per_rollout_worker=0.5 resources.cpus_per_reward_worker=0.25 "
       # A generate call waiting on a rollout worker whose node is gone stops the run after this long.
       "resources.call_timeout_s=20 "
       "resources.learner_placement=node_b resources.rollout_placement=node_c resources.reward_placement=node_a")


def other_rays() -> dict[int, float]:
    """Raylets of every other Ray on the machine (the test session's, other engineers'), by pid."""
    out = {}
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["name"] == "raylet":
            out[p.pid] = p.info["create_time"]
    return out


@pytest.fixture
def cluster(tmp_path):
    before = other_rays()
    state_dir = tmp_path / "cluster"
    try:
        # Each node is retried up to 4 times: `ray start` gives a raylet 30 s to register, which a loaded
        # machine can miss.
        yield localcluster.up(3, cpus_per_node=1.0, state_dir=state_dir, tries=4)
    finally:
        localcluster.down(state_dir)
        for pid, started in before.items():  # nobody else's Ray was touched
            if psutil.pid_exists(pid):
                assert psutil.Process(pid).create_time() == started


def submit(state: localcluster.ClusterState, workdir: Path, args: list[str], wait: bool) -> tuple[str, str]:
    """`ray job submit` (the CLI, token from the cluster's token file); (submission id, CLI output)."""
    job_id = f"raylign-cluster-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | state.env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", state.dashboard, "--working-dir", str(workdir),
           "--submission-id", job_id, *([] if wait else ["--no-wait"]), "--", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return job_id, done.stdout + done.stderr


def job(state: localcluster.ClusterState, job_id: str) -> dict:
    status, body = state.get(f"/api/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def job_logs(state: localcluster.ClusterState, job_id: str) -> str:
    status, body = state.get(f"/api/jobs/{job_id}/logs")
    return json.loads(body)["logs"] if status == 200 else ""


def wait_job(state: localcluster.ClusterState, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (info := job(state, job_id))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {info['status']}:\n{job_logs(state, job_id)}"
        time.sleep(1)
    return info


def test_grpo_job_on_three_nodes_survives_losing_the_rollout_node(cluster, tmp_path):
    state = cluster
    assert state.get("/api/jobs/", auth=False)[0] == 401  # token authentication is on
    nodes = {n["node_id"]: next(k for k in n["resources_total"] if k.startswith("node_"))
             for n in localcluster.alive_nodes(state)}
    assert sorted(nodes.values()) == ["node_a", "node_b", "node_c"]
    workdir = tmp_path / "job"  # the upload: the data file only
    workdir.mkdir()
    write_jsonl(workdir / "pairs.jsonl", synthetic_pairs(16))
    out, store = tmp_path / "driver-disk" / "runs", tmp_path / "storage"  # output.dir: the head's; storage: shared
    args = [*shlex.split(JOB), f"output.dir={out}", f"output.storage=file://{store}"]
    run, stored = out / "grpo", store / "grpo"

    # ---- the run starts, pinned: policy on node_b, rollout on node_c, reward on node_a (the driver's)
    first, _ = submit(state, workdir, args, wait=False)
    deadline = time.monotonic() + 600
    while not storage.exists(str(stored / CHECKPOINTS_DIR / "step_1")):
        info = job(state, first)
        assert info["status"] in ("PENDING", "RUNNING"), f"{info['status']}:\n{job_logs(state, first)}"
        assert time.monotonic() < deadline, job_logs(state, first)
        time.sleep(0.2)
    # ... and mid-run (a checkpoint is on storage, steps remain) the rollout worker's node dies.
    node_c = next(n for n in state.nodes if n.name == "node_c")
    assert node_c.raylet_pid is not None
    os.kill(node_c.raylet_pid, signal.SIGKILL)
    info = wait_job(state, first)
    logs = job_logs(state, first)

    # Where the groups landed, as the actors reported it (placement.json, the log) and as Ray's state API has it.
    placement = json.loads((run / PLACEMENT_FILE).read_text())
    landed = {group: [nodes[i] for i in placement[group]["node_ids"]] for group in ("policy", "rollout", "reward")}
    assert landed == {"policy": ["node_b"], "rollout": ["node_c"], "reward": ["node_a"]}, placement
    for group, where in landed.items():
        assert f"raylign: placement: {group} ({where[0]}) -> {where[0]} [" in logs, logs
    driver = info["driver_info"]
    actors = {a["name"].rsplit("-", 2)[-2]: nodes.get(a["node_id"]) for a in state.state_api("actors")
              if a["job_id"] == driver["id"] and (a.get("name") or "").startswith("raylign-")}
    assert actors == {"policy": "node_b", "rollout": "node_c", "reward": "node_a"}, actors
    assert nodes.get(info.get("driver_node_id")) == "node_a", info  # the job's driver runs on the head
    # Each node materialised tiny:llama in its own RAYLIGN_HOME (nothing shared a model cache).
    for node in state.nodes:
        assert (Path(node.home) / "models" / "tiny-llama" / "config.json").is_file(), node.name

    # The run either finished on the remaining nodes or stopped with a resumable checkpoint on storage.
    stopped = info["status"] == "FAILED"
    if stopped:
        assert "rollout[0].generate" in logs and "the run stopped" in logs, logs
    else:
        assert info["status"] == "SUCCEEDED", logs
    on_storage = storage.list_complete(str(stored / CHECKPOINTS_DIR))
    assert on_storage and all(name.startswith("step_") for name in on_storage), on_storage
    assert storage.list_complete(str(stored / storage.STAGING_DIR)) == []  # every hand-off was collected

    if stopped:
        # The driver's disk loses its checkpoints: --resume finds the latest on storage. The rollout group
        # moves to a live node (resources may change on resume; what makes the run the same run may not).
        shutil.rmtree(run / CHECKPOINTS_DIR)
        resumed, cli = submit(state, workdir, [*args, "resources.rollout_placement=node_a", "--resume"], wait=True)
        info = job(state, resumed)
        logs = job_logs(state, resumed)
        assert info["status"] == "SUCCEEDED", cli + logs
        latest = max(on_storage, key=lambda n: int(n.split("_")[1]))
        assert f"fetching checkpoint {latest} from" in logs and f"at step {latest.split('_')[1]}" in logs, logs

    steps = [row["step"] for row in read_metrics(run) if "reward/mean" in row]
    assert steps == list(range(1, STEPS + 1)), steps  # every step once: the resumed run cut nothing twice
    # final/ is in the driver's output.dir and on storage, and is a plain transformers model.
    assert storage.exists(str(stored / "final"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size >= len(tokenizer) > 0
