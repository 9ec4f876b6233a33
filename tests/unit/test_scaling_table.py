"""docs/scaling_table.py: its output is what docs/SCALING.md holds, its parameter count is that of the
model raylign builds for `tiny:llama`, and its bytes are those of a real AdamW step on that model."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("scaling_table", REPO / "docs" / "scaling_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


st = _load_script()
TINY = st.SHAPES["tiny:llama"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def tiny_after_one_adam_step():
    """tiny:llama in fp32 after one AdamW step on a small batch (raylign's learner optimizer)."""
    from raylign.models import load_causal_lm

    model, _ = load_causal_lm("tiny:llama")
    model.train()
    ids = torch.randint(3, TINY.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_the_committed_tables_are_the_scripts_output():
    text = st.SCALING_MD.read_text(encoding="utf-8")
    assert text.count(st.BEGIN) == 1 and text.count(st.END) == 1
    assert st.committed_tables(text) == st.render(), "run: python docs/scaling_table.py --write"
    assert st.main(["--check"]) == 0


def test_check_fails_on_a_stale_table_and_write_repairs_it(tmp_path, monkeypatch, capsys):
    original = st.SCALING_MD.read_text(encoding="utf-8")
    stale = tmp_path / "SCALING.md"
    stale.write_text(original.replace("| Llama-3-8B | bf16 |", "| Llama-3-8B | bf17 |"), encoding="utf-8")
    monkeypatch.setattr(st, "SCALING_MD", stale)
    assert st.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert st.main(["--write"]) == 0 and st.main(["--check"]) == 0
    assert stale.read_text(encoding="utf-8") == original  # the prose around the tables is kept


def test_param_count_formula_by_hand():
    # SmolLM2-135M: 49152·576 tied embeddings + 30 layers·(576·(576 + 192 + 192 + 576) + 3·576·1536 + 2·576) + 576
    assert st.param_count(st.SHAPES["SmolLM2-135M"]) == 49152 * 576 + 30 * (576 * 1536 + 3 * 576 * 1536 + 1152) + 576
    assert st.param_count(st.SHAPES["SmolLM2-135M"]) == 134_515_008
    # an untied head doubles the vocabulary term
    untied = st.Shape(**{**st.SHAPES["SmolLM2-135M"].__dict__, "tied": False})
    assert st.param_count(untied) - st.param_count(st.SHAPES["SmolLM2-135M"]) == 49152 * 576


def test_the_tiny_shape_and_count_are_those_of_the_model_raylign_builds(tiny_after_one_adam_step):
    model, _ = tiny_after_one_adam_step
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, c.head_dim) == (
        TINY.hidden, TINY.layers, TINY.heads, TINY.kv_heads, TINY.intermediate, TINY.vocab, TINY.tied, TINY.d)
    assert st.param_count(TINY) == sum(p.numel() for p in model.parameters())


def test_the_lora_count_is_peft_all_linear_r16_on_the_tiny_model():
    from raylign.config import LoraConfig, ModelConfig
    from raylign.models import load_causal_lm

    model, _ = load_causal_lm(ModelConfig(path="tiny:llama", lora=LoraConfig(r=st.LORA_RANK)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert st.lora_param_count(TINY) == trainable
    # peft keeps the adapters in fp32 (what lora_bytes charges them at) and freezes the base
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_ddp_bytes_are_the_bytes_of_a_real_adam_step(tiny_after_one_adam_step):
    model, optimizer = tiny_after_one_adam_step
    params = list(model.parameters())
    state = [optimizer.state[p] for p in params]
    measured = {
        "weights": _tensor_bytes(params),
        "grads": _tensor_bytes(p.grad for p in params),
        "adam": _tensor_bytes([s["exp_avg"] for s in state] + [s["exp_avg_sq"] for s in state]),
    }
    print(f"tiny:llama fp32 after one AdamW step: {measured} = {sum(measured.values())} B; "
          f"script: {st.training_state_bytes(TINY, 'fp32')} = {st.ddp_bytes(TINY, 'fp32')} B")
    assert st.training_state_bytes(TINY, "fp32") == measured
    assert st.ddp_bytes(TINY, "fp32") == sum(measured.values()) == 16 * st.param_count(TINY)
    # bf16 weights and their gradients: half the bytes; the Adam moments stay fp32 in the table
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = st.training_state_bytes(TINY, "bf16")
    assert bf16["weights"] == _tensor_bytes(model_bf16.parameters()) and bf16["adam"] == measured["adam"]


def test_fsdp_two_shards_hold_half_of_the_ddp_bytes(tiny_after_one_adam_step):
    model, optimizer = tiny_after_one_adam_step
    ddp = st.ddp_bytes(TINY, "fp32")
    assert abs(st.fsdp_bytes(TINY, "fp32", 2) - ddp / 2) <= 1  # within rounding
    assert st.fsdp_bytes(TINY, "fp32", 1) == ddp
    # FSDP2 shards every tensor on dim 0 (torch.chunk): rank r holds chunk r of each parameter and of its
    # gradient and Adam moments. Cut the real tensors that way: each rank holds half, up to the padding.
    per_rank = [0, 0]
    for p in model.parameters():
        tensors = [p, p.grad, optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]]
        for t in tensors:
            for rank, chunk in enumerate(torch.chunk(t.detach(), 2, dim=0)):
                per_rank[rank] += chunk.numel() * chunk.element_size()
    print(f"tiny:llama fp32, dim-0 halves of params + grads + Adam: {per_rank} B; script: "
          f"{st.fsdp_bytes(TINY, 'fp32', 2)} B per shard")
    assert sum(per_rank) == ddp
    assert all(math.isclose(b, st.fsdp_bytes(TINY, "fp32", 2), rel_tol=0.01) for b in per_rank)


def test_lora_and_activation_formulas_by_hand():
    s = st.Shape(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10, tied=True)
    # linears: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 -> Σ(in+out) = 16+12+12+16+24+24+24 = 128
    assert st.lora_param_count(s, r=4) == 2 * 4 * 128
    # P = 10·8 + 2·(64 + 32 + 32 + 64 + 3·128 + 16) + 8 = 80 + 1184 + 8
    assert st.param_count(s) == 1272
    assert st.lora_bytes(s, "bf16", r=4) == 1272 * 2 + 1024 * 16
    # e = 6h + 2·kv·d + 4i = 48 + 8 + 64 = 120 elements per token per layer
    assert st.activation_elements_per_token(s) == 120
    assert st.activation_bytes(s, tokens=3) == 3 * 2 * 120 * 2 + 3 * 10 * 6
    assert st.activation_bytes(s, tokens=3, checkpointing=True) == 3 * (2 * 8 + 120) * 2 + 3 * 10 * 6


def test_fits_logic_names_the_cheapest_strategy():
    assert st.on_one_node(st.SHAPES["SmolLM2-135M"], "bf16") == "full, DDP ×8"
    assert st.on_one_node(st.SHAPES["Llama-3-8B"], "bf16") == "full, FSDP2 ×8"  # 89.7 GiB > 64 GB usable
    assert st.on_one_node(st.SHAPES["Llama-3-70B"], "bf16") == "LoRA, FSDP2 ×8"
    assert st.gpus_for_full_finetune(st.SHAPES["Llama-3-70B"], "bf16") == math.ceil(
        12 * st.param_count(st.SHAPES["Llama-3-70B"]) / (0.8 * 80e9))
    assert st.on_this_box(st.SHAPES["SmolLM2-1.7B"], "bf16") == "full"  # 19.1 GiB <= 0.8·24 GiB
    assert st.on_this_box(st.SHAPES["SmolLM2-1.7B"], "bf16", online=True) == "LoRA only"


def test_human_units():
    assert st.human(1000 * 2**20) == "0.977 GiB"
    assert st.human(1536) == "1.5 KiB"
    assert st.human(150 * 2**30) == "150 GiB"


@pytest.mark.slow
def test_the_smollm2_135m_shape_is_that_of_the_real_builtin_model():
    """The real SmolLM2-135M-Instruct (from its PyPI wheel, converted once: ~1 minute) has the shape and
    the parameter count the script gives it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raylign.models import pull_model

    c = AutoConfig.from_pretrained(pull_model("builtin:smollm2-135m-instruct"))
    s = st.SHAPES["SmolLM2-135M"]
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings) == (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate,
                                                      s.vocab, s.tied)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(c)
    assert st.param_count(s) == sum(p.numel() for p in model.parameters())
