"""FSDP2 helpers (raylign.workers.fsdp) and a one-rank fsdp learner in this process (gloo, no Ray):
byte counts, block discovery, LoRA (adapter-only weights, merged final/), a reward model, and
checkpoints refused across strategies. Two ranks: tests/integration/test_fsdp_learners.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raylign.config import ConfigError, load_config
from raylign.workers import fsdp
from raylign.workers.learner import LearnerWorker, _free_port
from raylign.workers.objectives import count_units


def test_sharded_bytes_of_an_unsharded_model_are_its_whole_tensors():
    model = nn.Linear(3, 2)  # weight [2, 3] + bias [2]: 8 float32 = 32 bytes
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert fsdp.sharded_bytes(model, optimizer) == {
        "parameters": 32, "trainable_parameters": 32, "gradients": 0, "optimizer_state": 0, "total": 32}
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    # exp_avg + exp_avg_sq (32 bytes each) + one float32 `step` per parameter tensor (2 x 4 bytes).
    assert fsdp.sharded_bytes(model, optimizer) == {
        "parameters": 32, "trainable_parameters": 32, "gradients": 32, "optimizer_state": 72, "total": 136}
    model.bias.requires_grad_(False)
    assert fsdp.sharded_bytes(model)["trainable_parameters"] == 24


@pytest.mark.parametrize("kind", ["causal", "lora", "value", "gpt2"])
def test_transformer_blocks_are_the_decoder_layers(kind):
    from raylign.config import LoraConfig, ModelConfig
    from raylign.models import load_causal_lm, load_value_model

    arch = "gpt2" if kind == "gpt2" else "llama"
    cfg = ModelConfig(path=f"tiny:{arch}", lora=LoraConfig(r=2) if kind == "lora" else None)
    model = (load_value_model if kind == "value" else load_causal_lm)(cfg)[0]
    blocks = fsdp.transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == [("GPT2Block" if arch == "gpt2" else "LlamaDecoderLayer")] * 2


def _learner(tmp_path, objective: str, *extra: str) -> LearnerWorker:
    from tests.conftest import synthetic_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16))
    cfg = load_config("sft", ["model.path=tiny:llama", f"data.train={pairs}", "train.micro_batch_size=4",
                              "train.warmup_steps=0", "train.lr=1e-2", "progress=false", "output.trackers=[]", *extra])
    learner = LearnerWorker(0, 1, 1, cfg.model_dump(), objective)
    learner.setup_distributed("127.0.0.1", _free_port())
    learner.setup_optimizer(10)
    return learner


def _batch(learner: LearnerWorker, objective: str) -> dict[str, np.ndarray]:
    from raylign.data import load_dataset
    from raylign.pipelines.offline import collate, encode_pair_rows, encode_sft_rows

    rows = load_dataset(learner.config.data.train, "pairs").to_pylist()[:6]
    encode = encode_sft_rows if objective == "sft" else encode_pair_rows
    return collate(encode(rows, "pairs", learner.tokenizer, learner.config), learner.tokenizer.pad_token_id)


def test_one_rank_fsdp_lora_learner_syncs_the_adapter_and_saves_base_plus_delta(tmp_path):
    from transformers import AutoModelForCausalLM

    from raylign.models import load_causal_lm
    from raylign.models.lora import is_lora_weight, lora_merge_deltas

    learner = _learner(tmp_path, "sft", "model.lora={r: 4, alpha: 8}", "resources.learner_strategy=fsdp")
    try:
        assert fsdp.is_sharded(learner.model)
        batch = _batch(learner, "sft")
        losses = [learner.train_step(batch, count_units("sft", batch))["nll_sum"] for _ in range(2)]
        adapter = {k: torch.tensor(v) for k, v in learner.get_weights().items()}
        learner.save_final(str(tmp_path / "final"))
        assert learner.template is not None and next(learner.template.parameters()).is_meta  # memory back
    finally:
        learner.shutdown()
    assert losses[1] < losses[0]
    assert adapter and all(is_lora_weight(k) for k in adapter)  # what the rollout workers get
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero
    base = dict(load_causal_lm(learner.config.model.model_copy(update={"lora": None}))[0].named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    deltas = lora_merge_deltas(adapter, scaling=8 / 4, fan_in_fan_out=False)
    assert set(merged) == set(base) and deltas
    for name, value in base.items():
        expected = value.detach() + deltas.get(name, 0.0)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_one_rank_fsdp_reward_model_resumes_saves_its_final_and_is_refused_by_ddp(tmp_path):
    fsdp_learner = _learner(tmp_path, "reward", "model.lora=null", "resources.learner_strategy=fsdp")
    try:
        batch = _batch(fsdp_learner, "reward")
        first = fsdp_learner.train_step(batch, count_units("reward", batch))
        assert np.isfinite(first["loss_sum"]) and first["grad_norm"] > 0
        fsdp_learner.save_checkpoint(str(tmp_path / "ckpt"), with_model_dir=False)
        again = fsdp_learner.train_step(batch, count_units("reward", batch))
        fsdp_learner.load_checkpoint(str(tmp_path / "ckpt"))
        assert fsdp_learner.train_step(batch, count_units("reward", batch))["loss_sum"] == pytest.approx(
            again["loss_sum"], rel=1e-6)
        fsdp_learner.save_final(str(tmp_path / "final"))
        ids = torch.tensor([[1, 5, 7, 9]])
        live = fsdp_learner.model(input_ids=ids).logits
    finally:
        fsdp_learner.shutdown()
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(saved(input_ids=ids).logits, live)
    ddp_learner = _learner(tmp_path, "reward", "model.lora=null")
    with pytest.raises(ConfigError, match="learner_strategy=fsdp"):
        ddp_learner.load_checkpoint(str(tmp_path / "ckpt"))
