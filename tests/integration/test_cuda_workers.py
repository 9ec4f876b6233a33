"""The RL workers on a GPU, in-process (skipped without CUDA): the rollout worker samples on the GPU
with LoRA weights from a GPU learner, and the learner recomputes the same log-probs.

On a CUDA machine: `pytest tests/integration/test_cuda_workers.py -q`. CI has no GPU, so these skip
there; the project's GPU check runs them on a lent machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylign.config import load_config
from raylign.pipelines.online import training_batch
from raylign.workers.objectives import rl_units

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["Tell me about the sea.", "Hi", [{"role": "user", "content": "How do I make a cup of tea?"}]]
SAMPLING = {"batch_size": 3, "n_samples": 4, "max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 50}


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would round the two passes differently; compare in full float32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_gpu_rollout_logprobs_match_the_gpu_learner_after_a_lora_update():
    from raylign.workers.learner import LearnerWorker
    from raylign.workers.rollout import RolloutWorker

    config = load_config("grpo", ["model.path=tiny:llama", "model.lora.r=4", "model.lora.alpha=8", "train.lr=5e-2",
                                  "rl.kl_coef=0", "rollout.temperature=0.7", "train.batch_size=12",
                                  "train.micro_batch_size=12"])
    learner = LearnerWorker(0, 1, 1, config.model_dump(), "policy")
    assert learner.device.type == "cuda"
    learner.setup_distributed(*learner.master_address())
    learner.setup_optimizer(10)
    worker = RolloutWorker(0, 1, 1, config.model.model_dump(), seed=0)
    assert worker.device.type == "cuda" and next(worker.model.parameters()).is_cuda

    # One policy step on random advantages makes the adapter non-zero (B starts at 0).
    first = worker.generate(PROMPTS, SAMPLING, seed=1, weights=learner.get_weights(), version=0)
    batch = training_batch(first, worker.tokenizer.pad_token_id)
    batch["advantages"] = np.random.default_rng(0).normal(size=batch["old_logps"].shape).astype(np.float32)
    metrics = learner.train_step(batch, rl_units(batch["loss_mask"], "token-mean"))
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0

    out = worker.generate(PROMPTS, SAMPLING, seed=2, weights=learner.get_weights(), version=1)
    assert out["version"] == 1 and len(out["texts"]) == 12
    batch = training_batch(out, worker.tokenizer.pad_token_id)
    recomputed = learner.rl_token_logps(batch)
    mask = batch["loss_mask"].astype(bool)
    np.testing.assert_allclose(recomputed[mask], batch["old_logps"][mask], atol=2e-4, rtol=0)
    # The adapter moved the policy: the reference (adapters off) now disagrees.
    reference = learner.rl_token_logps(batch, reference=True)
    assert np.abs(reference[mask] - batch["old_logps"][mask]).max() > 1e-3


def test_discriminator_trains_on_the_gpu_and_survives_a_save_load(tmp_path):
    from raylign.rewards.discriminator import Discriminator

    human = ["eee see the bee", "feel the sweet tree", "here we see deer"] * 3
    policy = ["xq zk plm", "brr grr ok", "qwop tv"] * 3
    d = Discriminator("tiny:llama", lr=3e-3, gradient_penalty=1.0, seed=0)
    assert d.device.type == "cuda" and next(d.model.parameters()).is_cuda
    for _ in range(15):
        metrics = d.update(None, policy, human_texts=human)
    assert metrics["accuracy_human"] == 1.0 and metrics["accuracy_policy"] == 1.0
    assert d.score(None, human).min() > d.score(None, policy).max()
    d.save(tmp_path / "d")
    again = Discriminator("tiny:llama", seed=1)
    again.load(tmp_path / "d")
    np.testing.assert_allclose(again.logits(None, policy), d.logits(None, policy), atol=1e-4)
