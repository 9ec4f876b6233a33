"""raylign on a real 3-node cluster (`raylign cluster up`: three raylets on this machine, token auth),
every job submitted with `ray job submit`, every node on its own RAYLIGN_HOME and TMPDIR, and no path
shared between nodes but `output.storage` (a local directory standing in for NFS/S3); the driver (the
job, on the head, node_a) owns `output.dir`. What actors on other nodes write reaches the driver:

* adversarial training with the discriminator's reward actor on another node: D is in every checkpoint
  and in final/ on the driver, and `--resume` from storage (the driver's checkpoints deleted) hands D back
  to that actor and repeats the last step exactly;
* multi-task learners on another node: the rating heads and task weights are in the checkpoint, final/
  holds the rating head's scorer, and `--resume` from storage repeats the last step exactly;
* two FSDP learners on two nodes: each rank's shards reach the driver's one checkpoint, which a single
  learner then resumes;
* last (it kills a node), a tiny GRPO run with learner, rollout and reward groups each pinned to its own
  node loses the rollout worker's node mid-run, and `--resume` finishes the run.

One cluster for the module (bringing one up costs more than a job): its own ports, temp dirs and token,
brought down by pid in the fixture's finalizer whatever happens; every other Ray on the machine is left
running.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest

from raylign import storage
from raylign.rundir import CHECKPOINTS_DIR, DISCRIMINATOR_DIR, FINAL_DIR, PLACEMENT_FILE, read_metrics
from raylign.workers.fsdp import SHARDED_STATE
from raylign.workers.multitask import RATING_HEADS_DIR
from tests.conftest import synthetic_pairs, write_jsonl
from tests.e2e.clusterjobs import job, job_logs, local_cluster, node_names, run_job, submit, wait_job

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

COMMON = ("model.path=tiny:llama model.lora=null progress=false output.trackers=[] output.keep_last=5 "
          "resources.cpus_per_learner=0.5 resources.cpus_per_rollout_worker=0.5 resources.cpus_per_reward_worker=0.25")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(3, tmp_path_factory.mktemp("cluster")) as state:
        yield state


@pytest.fixture
def job_dir(tmp_path):
    """The upload (data files only), the driver's output.dir and the shared storage."""
    workdir = tmp_path / "job"
    workdir.mkdir()
    write_jsonl(workdir / "pairs.jsonl", synthetic_pairs(24))
    write_jsonl(workdir / "ratings.jsonl", [{"text": p["chosen"], "rating": float(i % 5)}
                                            for i, p in enumerate(synthetic_pairs(24, seed=2))])
    return workdir, tmp_path / "driver-disk" / "runs", tmp_path / "storage"


def _landed(cluster, run: Path) -> dict[str, list[str]]:
    nodes = node_names(cluster)
    placement = json.loads((run / PLACEMENT_FILE).read_text())
    return {group: [nodes[i] for i in info["node_ids"]] for group, info in placement.items()}


def _steps(run: Path, key: str) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run) if key in row}


def test_adversarial_discriminator_on_another_node_is_saved_and_resumed_through_storage(cluster, job_dir):
    workdir, out, store = job_dir
    args = [*shlex.split(
        f"raylign train adversarial {COMMON} data.kind=pairs data.train=pairs.jsonl adversarial.discriminator=tiny:llama "
        "adversarial.warmup_steps=1 adversarial.replay_size=16 adversarial.lr=1e-3 rollout.prompts_per_step=4 "
        "rollout.n_samples=2 rollout.max_new_tokens=8 train.batch_size=8 train.micro_batch_size=8 train.max_steps=3 "
        "rl.eval_prompts=0 output.save_every=2 output.name=gan resources.learner_placement=node_a "
        "resources.rollout_placement=node_b resources.reward_placement=node_c"),
        f"output.dir={out}", f"output.storage=file://{store}"]
    run_job(cluster, workdir, args)
    run = out / "gan"
    assert _landed(cluster, run)["reward"] == ["node_c"]
    for d in (run / CHECKPOINTS_DIR / "step_2" / DISCRIMINATOR_DIR, run / FINAL_DIR / DISCRIMINATOR_DIR):
        assert (d / "config.json").is_file() and any(d.glob("*.safetensors")), d  # on the driver's disk
    assert storage.exists(str(store / "gan" / CHECKPOINTS_DIR / "step_2"))
    before = _steps(run, "discriminator/loss")

    # The driver's disk loses its checkpoints; --resume fetches step_2 from storage and hands D to node_c.
    shutil.rmtree(run / CHECKPOINTS_DIR)
    logs = run_job(cluster, workdir, [*args, "--resume"])
    assert "fetching checkpoint step_2 from" in logs and "at step 2" in logs, logs
    after = _steps(run, "discriminator/loss")
    assert sorted(after) == [1, 2, 3]
    for key in ("discriminator/loss", "discriminator/accuracy_human", "discriminator/replay_size", "reward/mean"):
        assert after[3][key] == pytest.approx(before[3][key], rel=1e-4, abs=1e-5), key  # D came back as it was


def test_multitask_learner_on_another_node_checkpoints_its_heads_and_task_weights(cluster, job_dir):
    workdir, out, store = job_dir
    tasks = " ".join(f"multitask.tasks.{t}.data.train={f} multitask.tasks.{t}.data.val_fraction=0"
                     for t, f in (("imitation", "pairs.jsonl"), ("preference", "pairs.jsonl"),
                                  ("rating", "ratings.jsonl")))
    args = [*shlex.split(
        f"raylign train multitask {COMMON} {tasks} multitask.weighting=uncertainty train.batch_size=12 "
        "train.micro_batch_size=4 train.max_steps=2 train.eval_every=0 output.save_every=1 output.name=mt "
        "resources.learner_placement=node_b"), f"output.dir={out}", f"output.storage=file://{store}"]
    run_job(cluster, workdir, args)
    run = out / "mt"
    assert _landed(cluster, run)["multitask-learners"] == ["node_b"]
    step = run / CHECKPOINTS_DIR / "step_1"
    assert (step / RATING_HEADS_DIR / "heads.safetensors").is_file()
    assert (step / "task_weighting.safetensors").is_file()  # uncertainty weighting's log-variances
    scorer = run / FINAL_DIR / RATING_HEADS_DIR / "rating"
    assert (scorer / "config.json").is_file() and any(scorer.glob("*.safetensors")), scorer
    before = _steps(run, "train/rating/loss")

    # The learner on node_b reads step_1 (heads and task weights too) back from storage.
    shutil.rmtree(run / CHECKPOINTS_DIR)
    logs = run_job(cluster, workdir, [*args, "--resume"])
    assert "fetching checkpoint step_1 from" in logs, logs
    after = _steps(run, "train/rating/loss")
    assert sorted(after) == [1, 2]
    for key in ("train/rating/loss", "train/preference/loss", "train/imitation/loss"):
        assert after[2][key] == pytest.approx(before[2][key], rel=1e-4), key


def test_two_fsdp_learners_on_two_nodes_write_one_checkpoint_that_one_learner_resumes(cluster, job_dir):
    workdir, out, store = job_dir
    args = [*shlex.split(
        f"raylign train sft {COMMON} data.train=pairs.jsonl resources.learner_strategy=fsdp resources.learners=2 "
        "resources.learner_placement=spread train.batch_size=8 train.micro_batch_size=4 train.max_steps=3 "
        "train.lr=1e-3 train.eval_every=0 output.save_every=2 output.name=fsdp"),
        f"output.dir={out}", f"output.storage=file://{store}"]
    run_job(cluster, workdir, args)
    run = out / "fsdp"
    landed = _landed(cluster, run)["learners"]
    assert len(set(landed)) == 2 and set(landed) != {"node_a"}, landed  # two nodes, not both the driver's
    shards = sorted(p.name for p in (run / CHECKPOINTS_DIR / "step_2" / SHARDED_STATE).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards  # both ranks' files, one index
    before = _steps(run, "train/loss")

    # One learner, on the driver's node, resumes what two wrote on two others.
    shutil.rmtree(run / CHECKPOINTS_DIR)
    logs = run_job(cluster, workdir, [*args, "resources.learners=1", "resources.learner_placement=node_a", "--resume"])
    assert "fetching checkpoint step_2 from" in logs, logs
    after = _steps(run, "train/loss")
    assert sorted(after) == [1, 2, 3]
    assert after[3]["train/loss"] == pytest.approx(before[3]["train/loss"], rel=1e-4)


# ---- last: this one kills node_c -------------------------------------------------------------------
def test_grpo_job_on_three_nodes_survives_losing_the_rollout_node(cluster, tmp_path):
    state = cluster
    assert state.get("/api/jobs/", auth=False)[0] == 401  # token authentication is on
    nodes = node_names(state)
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
