"""lora_merge_deltas: a plain model plus the merged deltas computes what the peft model computes."""

from __future__ import annotations

import pytest
import torch

from raylign.config import LoraConfig
from raylign.models import load_causal_lm
from raylign.models.lora import apply_lora, lora_merge_deltas, plain_param_name, uses_conv1d

LORA = LoraConfig(r=4, alpha=8)


def random_peft_model(arch: str):
    """A peft model whose adapters are random, B included (peft starts B at 0: a no-op adapter)."""
    model, tokenizer = load_causal_lm(f"tiny:{arch}")
    peft_model = apply_lora(model, LORA, "CAUSAL_LM").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return peft_model, tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_base_plus_deltas_equals_peft_model(arch):
    peft_model, tokenizer = random_peft_model(arch)
    base, _ = load_causal_lm(f"tiny:{arch}")
    base.eval()
    adapter = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapter and all(".lora_" in n for n in adapter)

    deltas = lora_merge_deltas(adapter, LORA.alpha / LORA.r, fan_in_fan_out=uses_conv1d(base))

    assert len(deltas) == len(adapter) // 2  # one delta per (lora_A, lora_B) pair
    params = dict(base.named_parameters())
    ids = torch.tensor([tokenizer("The sea is wide and blue.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = base(ids).logits
        for name, delta in deltas.items():
            assert delta.shape == params[name].shape, name
            params[name].add_(delta)
        merged, expected = base(ids).logits, peft_model(input_ids=ids).logits
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapters really change the model
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_gpt2_deltas_are_transposed_for_conv1d():
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    name = "base_model.model.transformer.h.0.attn.c_attn"
    adapter = {f"{name}.lora_A.default.weight": a, f"{name}.lora_B.default.weight": b}
    (key, delta), = lora_merge_deltas(adapter, 0.5, fan_in_fan_out=True).items()
    assert key == "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(delta, 0.5 * (b @ a).T)


def test_plain_param_name_strips_peft_prefix_and_base_layer():
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert plain_param_name(name) == "model.layers.0.self_attn.q_proj.weight"
    assert plain_param_name("model.norm.weight") == "model.norm.weight"


def test_incomplete_or_mixed_adapters_are_rejected():
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    with pytest.raises(ValueError, match="lack lora_B"):
        lora_merge_deltas({f"{prefix}.lora_A.default.weight": torch.zeros(2, 3)}, 1.0, False)
    with pytest.raises(ValueError, match="several adapters"):
        lora_merge_deltas({f"{prefix}.lora_A.default.weight": torch.zeros(2, 3),
                           f"{prefix}.lora_A.other.weight": torch.zeros(2, 3)}, 1.0, False)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        lora_merge_deltas({"model.norm.weight": torch.zeros(3)}, 1.0, False)
