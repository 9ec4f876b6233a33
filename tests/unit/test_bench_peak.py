"""The arithmetic of bench/peak.py (FLOPs, parameter counts, MFU, the bandwidth bound) against
hand-computed cases, and one tiny real measurement of each timing function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import peak  # noqa: E402

# tiny:llama's decoder (raylign/models/tiny.py: hidden 64, intermediate 128, 2 layers, 4 query and 2 kv
# heads, untied embeddings) with a made-up vocabulary of 100.
TINY: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}


def test_matmul_flops_is_two_m_n_k():
    assert peak.matmul_flops(2, 3, 4) == 48  # 2 x 4 dot products of length 3, one mul + one add each
    assert peak.Shape("x", 10, 576, 1536, count=30).flops == 2 * 10 * 576 * 1536 * 30


def test_linear_params_of_tiny_llama_by_hand():
    # per layer: q 64x64 + k,v 64x32 each (2 kv heads x head dim 16) + o 64x64 + gate,up 64x128 + down 128x64
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64
    assert per_layer == 36864
    assert peak.linear_params(TINY) == 2 * per_layer + 64 * 100  # + the LM head


def test_total_params_of_tiny_llama_by_hand():
    # untied: linear 80128 + input embedding 100 x 64 + norms (2 per layer + final) x 64
    assert peak.total_params(TINY) == 2 * 36864 + 64 * 100 + 64 * 100 + 5 * 64
    assert peak.total_params({**TINY, "tie_word_embeddings": True}) == 2 * 36864 + 64 * 100 + 5 * 64


@pytest.mark.slow  # importing transformers' Llama takes tens of seconds on a loaded machine
def test_total_params_match_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        cfg = {**TINY, "tie_word_embeddings": tied}
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        assert peak.total_params(cfg) == sum(p.numel() for p in model.parameters())


def test_smollm2_shape_counts():
    # SmolLM2-135M: 30 layers of (576x576 q + 2 x 576x192 k,v + 576x576 o + 3 x 576x1536 MLP) + 576x49152 head
    per_layer = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536
    assert peak.linear_params(peak.SMOLLM2_135M) == 30 * per_layer + 576 * 49152
    # 134.5M parameters in all (tied embeddings, 61 norm vectors): the published size
    assert peak.total_params(peak.SMOLLM2_135M) == 30 * per_layer + 576 * 49152 + 61 * 576 == 134_515_008


def test_lora_params_rank_times_in_plus_out():
    # rank 2 on tiny: per layer q 2(64+64) + k,v 2 x 2(64+32) + o 2(64+64) + gate,up 2 x 2(64+128) + down 2(128+64)
    per_layer = 256 + 384 + 256 + 768 + 384
    assert peak.lora_params(TINY, 2) == 2 * per_layer


def test_train_flops_full_and_lora():
    assert peak.train_flops_per_token(100) == 600  # 6N
    assert peak.train_flops_per_token(100, attn_flops_per_token=12) == 612
    # LoRA: forward 2N + 2n, backward 2N (activation grads only) + 4n
    assert peak.train_flops_per_token(100, n_lora=10) == 4 * 100 + 6 * 10
    assert peak.attention_train_flops_per_token(TINY, seq_len=10) == 12 * 2 * 4 * 16 * 10


def test_mfu_by_hand():
    # 600 FLOPs/token x 1000 tokens in 2 s = 300,000 FLOP/s against a 1,000,000 FLOP/s peak
    assert peak.mfu(600, 1000, 2.0, 1e6) == pytest.approx(0.3)
    # learner_mfu: 10 rows of 10 tokens in 1 s on tiny, full fine-tuning: (6N + 12·L·H·Q·10) x 100 FLOP/s
    m = peak.learner_mfu(TINY, None, tokens=100, rows=10, seconds=1.0, peak_gflops=1.0)
    per_token = 6 * peak.linear_params(TINY) + 12 * 2 * 4 * 16 * 10
    assert m["flops_per_token"] == per_token
    assert m["mfu"] == pytest.approx(per_token * 100 / 1e9)
    lora = peak.learner_mfu(TINY, 2, tokens=100, rows=10, seconds=1.0, peak_gflops=1.0)
    assert lora["flops_per_token"] == 4 * peak.linear_params(TINY) + 6 * peak.lora_params(TINY, 2) + 12 * 2 * 4 * 16 * 10


def test_decode_bandwidth_bound_by_hand():
    n = peak.linear_params(TINY)
    assert peak.decode_bytes_per_step(TINY, 4) == 4 * n
    # + K and V of 10 positions: 2 x 2 layers x 2 kv heads x 16 dims x 10 values, 2 bytes each
    assert peak.decode_bytes_per_step(TINY, 2, context=10) == 2 * (n + 2 * 2 * 2 * 16 * 10)
    assert peak.decode_bound_tokens_per_s(500e6, 10e9) == pytest.approx(20.0)
    assert peak.decode_bound_tokens_per_s(500e6, 10e9, batch=4) == pytest.approx(80.0)


def test_measurements_run_and_are_positive():
    shapes = peak.model_shapes(TINY, 8)
    assert [s.count for s in shapes] == [2, 4, 2, 4, 2, 1]
    res = peak.peak_flops(torch.float32, shapes, min_seconds=0.01)
    assert res["gflops"] > 0 and len(res["per_shape_gflops"]) == 6
    bw = peak.memory_bandwidth(mib=4, min_seconds=0.01)
    assert bw["copy_gbs"] > 0 and bw["triad_gbs"] > 0
    assert set(peak.cpu_flags()) >= {"avx512_bf16", "amx_bf16", "torch_cpu_capability"}
