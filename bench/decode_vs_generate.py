"""Sampling speed: raylign's decode loop (`raylign.workers.rollout.sample_batch`: prefill once per prompt,
KV cache repeated n times, one forward per token) vs transformers' `generate` on the same rows, on a
randomly initialised model shaped like SmolLM2-135M (no download); also checks that both pick the
same greedy tokens. Runs on CUDA when there is a GPU, else on the CPU (slow there: try --new 16).

    python bench/decode_vs_generate.py [--prompts 16 --n 4 --new 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raylign.config import RolloutConfig
from raylign.workers.rollout import sample_batch

SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
                 "tie_word_embeddings": True}


def measure(model, ids: torch.Tensor, mask: torch.Tensor, n: int, new: int, label: str) -> None:
    device = ids.device
    no_eos = np.array([-1])  # every row runs to `new` tokens on both sides

    def ours(temperature: float = 1.0) -> torch.Tensor:
        cfg = RolloutConfig(n_samples=n, max_new_tokens=new, temperature=temperature)
        return sample_batch(model, ids, mask, n, cfg, no_eos, 0)[0]

    @torch.no_grad()
    def theirs(greedy: bool = False) -> torch.Tensor:
        out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                             max_new_tokens=new, min_new_tokens=new, do_sample=not greedy,
                             temperature=None if greedy else 1.0, top_p=None, top_k=None, pad_token_id=0,
                             eos_token_id=None)
        return out[:, ids.shape[1]:].cpu()

    agree = (ours(0.0) == theirs(True)).float().mean().item()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {}
    for name, fn in (("raylign sample_batch", ours), ("transformers generate", theirs)):
        fn()
        sync()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
        rows = ids.shape[0] * n
        print(f"{label:15s} {name:22s} {rows * new / best[name]:9.0f} tokens/s  ({best[name] * 1000:.0f} ms for "
              f"{rows} rows x {new} tokens, best of 3, {device.type})")
    print(f"{label:15s} ratio raylign/transformers: {best['transformers generate'] / best['raylign sample_batch']:.2f}x;"
          f" greedy tokens equal to generate's: {agree:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device, dtype).eval()
        ids = torch.randint(10, 49000, (args.prompts, 64), device=device)
        mask = torch.ones_like(ids)
        mask[: args.prompts // 2, :16] = 0  # half the rows left padded
        measure(model, ids, mask, args.n, args.new, str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    main()
