"""FSDP2 learners (`resources.learner_strategy=fsdp`) on the shared local Ray, against one plain learner:
the same update on one batch (SFT, DPO), each of 2 ranks holding half of the parameter + optimizer
bytes, checkpoints that move between 2 and 1 learners, `final/` gathered into one HF directory, and
the online-RL policy (LoRA, weights synced to the rollout worker) and critic. One-rank cases, LoRA's
merged final/ and reward models: tests/unit/test_fsdp.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from raylign.config import load_config
from raylign.workers.group import WorkerGroup
from raylign.workers.learner import LearnerWorker
from raylign.workers.objectives import count_units

pytestmark = pytest.mark.usefixtures("ray_session")

TINY = ["model.path=tiny:llama", "model.lora=null", "progress=false", "output.trackers=[]"]
FSDP = "resources.learner_strategy=fsdp"


def _config(tmp_path, pairs_file, *extra):
    # micro_batch_size 3 over shards of 4 and 3 rows: the ranks run 2 and 1 micro-batches, so the
    # second rank needs a stand-in pass (learner._lockstep).
    return load_config("sft", TINY + [f"data.train={pairs_file}", f"output.dir={tmp_path}/runs", "train.lr=1e-3",
                                      "train.batch_size=7", "train.micro_batch_size=3", "train.warmup_steps=0", *extra])


def _batch(cfg, pairs_file, objective: str, start: int = 0) -> dict[str, np.ndarray]:
    from raylign.data import load_dataset
    from raylign.models import load_tokenizer
    from raylign.pipelines.offline import collate, encode_pair_rows, encode_sft_rows

    tok = load_tokenizer(cfg.model.path)
    rows = load_dataset(pairs_file, "pairs").to_pylist()[start : start + 7]
    encode = encode_sft_rows if objective == "sft" else encode_pair_rows
    return collate(encode(rows, "pairs", tok, cfg), tok.pad_token_id)


def _group(cfg, learners: int, objective: str, name: str) -> WorkerGroup:
    group = WorkerGroup(LearnerWorker, learners, 0.5, name=name,
                        init_kwargs={"config": cfg.model_dump(), "objective": objective})
    addr, port = group.call("master_address")[0]
    group.call("setup_distributed", addr, port)
    group.call("setup_optimizer", 10)
    return group


def _close(group: WorkerGroup) -> None:
    try:
        group.call("shutdown")
    finally:
        group.shutdown()


def _step(group: WorkerGroup, batch, objective: str) -> float:
    """One optimizer step; the loss summed over the ranks."""
    shards = group.call_sharded("train_step", batch, global_units=count_units(objective, batch))
    return sum(s["nll_sum" if objective == "sft" else "loss_sum"] for s in shards)


def _weights(group: WorkerGroup) -> dict[str, np.ndarray]:
    weights = group.call("get_weights")
    if len(weights) > 1:  # fsdp gathers onto rank 0 only
        assert all(w == {} for w in weights[1:])
    return weights[0]


def _assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=2e-5, err_msg=name)


def _plain_step(cfg, batch, objective: str):
    """One plain learner (ddp, world size 1: no process group) in this process: initial weights,
    weights after one step, and its bytes."""
    learner = LearnerWorker(0, 1, 2, cfg.model_dump(), objective)
    learner.setup_optimizer(10)
    initial = {k: v.copy() for k, v in learner.get_weights().items()}  # views of the live tensors on CPU
    learner.train_step(batch, global_units=count_units(objective, batch))
    return initial, learner.get_weights(), learner.memory_bytes()


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_fsdp_learners_match_one_learner_each_holding_half(tmp_path, pairs_file, objective):
    """DPO computes its reference log-probs in the step here (the batch carries none), through the
    frozen reference, itself sharded under fsdp."""
    cfg = _config(tmp_path, pairs_file)
    batch = _batch(cfg, pairs_file, objective)
    if objective == "sft":  # uneven lengths: a per-shard mean would not match
        assert len(set(batch["loss_mask"].sum(1).tolist())) > 1
    initial, plain, plain_bytes = _plain_step(cfg, batch, objective)
    two = _group(_config(tmp_path, pairs_file, FSDP), 2, objective, f"fsdp-{objective}")
    try:
        _step(two, batch, objective)
        sharded, per_rank = _weights(two), two.call("memory_bytes")
    finally:
        _close(two)
    moved = max(float(np.abs(plain[k] - initial[k]).max()) for k in plain)
    assert moved > 5e-4  # the step really changed the weights
    _assert_close(sharded, plain)

    held = {k: plain_bytes[k] for k in ("parameters", "gradients", "optimizer_state")}
    print(f"\n{objective}: 1 learner holds {held} bytes")
    for rank, mem in enumerate(per_rank):
        print(f"{objective}: fsdp rank {rank} of 2 holds { {k: mem[k] for k in held} } bytes, "
              f"{(mem['parameters'] + mem['optimizer_state']) / (held['parameters'] + held['optimizer_state']):.3f}"
              " of the parameter + optimizer bytes")
    # The shards partition every parameter and gradient; the optimizer state too, but for AdamW's
    # per-tensor step counters, which every rank keeps.
    assert sum(m["parameters"] for m in per_rank) == held["parameters"]
    assert sum(m["gradients"] for m in per_rank) == held["gradients"]
    half = (held["parameters"] + held["optimizer_state"]) / 2
    for mem in per_rank:
        assert abs(mem["parameters"] + mem["optimizer_state"] - half) <= 0.1 * half
    # docs/SCALING.md's figures for tiny:llama are these bytes: DDP for the plain learner, FSDP2 over 2
    # shards for each rank (both without AdamW's 4-byte step counter per tensor, which the table leaves out).
    table = _scaling_table()
    counters = plain_bytes["optimizer_state"] - 2 * plain_bytes["parameters"]
    assert counters == 4 * len(initial)
    assert plain_bytes["total"] - counters == table.ddp_bytes(table.SHAPES["tiny:llama"], "fp32")
    for mem in per_rank:
        assert mem["total"] - counters == table.fsdp_bytes(table.SHAPES["tiny:llama"], "fp32", 2)


def _scaling_table():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "docs" / "scaling_table.py"
    spec = importlib.util.spec_from_file_location("scaling_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fsdp_checkpoint_moves_between_two_and_one_learners(tmp_path, pairs_file):
    """2 learners step on A and save; 1 learner loads that and saves again; each group then steps on
    B and C from its loaded state, matching the 2 learners' own continuation (losses, weights); the
    2 learners' final/ is one HF directory holding the gathered weights."""
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, pairs_file, FSDP, "train.lr=3e-3")
    a, b, c = (_batch(cfg, pairs_file, "sft", start) for start in (0, 7, 14))
    ckpt2, ckpt1, final = tmp_path / "ckpt2", tmp_path / "ckpt1", tmp_path / "final"
    two = _group(cfg, 2, "sft", "fsdp-two")
    try:
        _step(two, a, "sft")
        two.call("save_checkpoint", str(ckpt2))
        assert (ckpt2 / "model" / "config.json").is_file()  # the gathered HF dir of a checkpoint
        losses = [_step(two, batch, "sft") for batch in (b, c)]
        after = _weights(two)
        two.call("save_final", str(final))
        one = _group(cfg, 1, "sft", "fsdp-one")
        try:
            one.call("load_checkpoint", str(ckpt2))  # 2 -> 1
            one.call("save_checkpoint", str(ckpt1), with_model_dir=False)
            assert [_step(one, batch, "sft") for batch in (b, c)] == pytest.approx(losses, rel=1e-5)
            _assert_close(_weights(one), after)
        finally:
            _close(one)
        two.call("load_checkpoint", str(ckpt1))  # 1 -> 2
        assert [_step(two, batch, "sft") for batch in (b, c)] == pytest.approx(losses, rel=1e-5)
        _assert_close(_weights(two), after)
    finally:
        _close(two)
    print(f"\nlosses on B, C after resuming: {losses}")
    loaded = AutoModelForCausalLM.from_pretrained(final)
    state = loaded.state_dict()
    for name, value in after.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)


def test_ppo_policy_and_critic_train_under_fsdp_with_lora(tmp_path):
    """The online-RL path: the policy (LoRA; its reference is the adapter switched off) and the critic
    (a scalar-head model) as 2 fsdp learners each; the rollout worker gets the gathered adapter."""
    from transformers import AutoModelForCausalLM

    from raylign.pipelines import run_pipeline
    from raylign.rundir import read_metrics

    reward = 'reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]'
    cfg = load_config("ppo", [
        "model.path=tiny:llama", "model.lora={r: 4, alpha: 8}", "progress=false", "output.trackers=[]", reward,
        FSDP, "resources.learners=2", "train.lr=1e-2",
        "resources.cpus_per_learner=0.25", "resources.cpus_per_rollout_worker=0.5",
        "resources.cpus_per_reward_worker=0.25", "rollout.max_new_tokens=8", "rollout.prompts_per_step=8",
        "rollout.n_samples=1", "rl.epochs=1", "train.batch_size=8", "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.eval_every=0", "rl.eval_prompts=0", f"output.dir={tmp_path}/runs", "output.name=ppo"])
    result = run_pipeline(cfg)
    steps = [r for r in read_metrics(result.run_dir) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["critic/value_loss"]) and math.isfinite(r["kl/seq_mean"]) for r in steps)
    assert steps[0]["kl/seq_mean"] == pytest.approx(0.0, abs=1e-4)  # sampled by the policy as it starts
    print("\n" + "\n".join(f"step {r['step']}: kl/seq_mean {r['kl/seq_mean']:.4g}, rollout/logp_gap "
                           f"{r['rollout/logp_gap']:.3g}" for r in steps))
    # Step 2 samples with the adapter step 1 trained: the policy has left the reference, and the
    # rollout worker's log-probs are the learners' (a stale adapter would put them ~KL apart).
    assert steps[1]["kl/seq_mean"] > 1e-3 and steps[1]["rollout/logp_gap"] < 1e-4
    AutoModelForCausalLM.from_pretrained(Path(result.run_dir) / "final")
