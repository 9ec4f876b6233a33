"""Sampling speed: raylign's decode loop (`raylign.workers.rollout.sample_batch`: prefill once per prompt,
KV cache repeated n times, one forward per token) vs transformers' `generate` on the same rows, on a
randomly initialised model shaped like SmolLM2-135M (no download); also checks that both pick the
same greedy tokens. Runs on CUDA when there is a GPU, else on the CPU (slow there: try --new 16).

Then batch-1 decode against the memory-bandwidth bound: one prompt, one sample, and the time of one
decode step = (time for `--batch1-new` tokens − time for 1 token) / (`--batch1-new` − 1), so the
prefill is left out. A batch-1 step must read every weight once (the LM head included), so
tokens/s <= bandwidth / bytes of weights (+ KV cache) per step; the bandwidth is the triad that
`bench/peak.py` measures in this run (`peak.memory_bandwidth`), the bytes `peak.decode_bytes_per_step`.
Target: within 2x of the bound (a fraction of the bound >= 0.5).

    python bench/decode_vs_generate.py [--prompts 16 --n 4 --new 128]
    python bench/decode_vs_generate.py --prompts 2 --n 2 --new 8 --batch1-new 16 --dtypes float32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raylign.config import RolloutConfig
from raylign.workers.rollout import sample_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak  # noqa: E402

SMOLLM2_SHAPE: dict[str, Any] = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
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


def batch1_decode(model, new: int, bandwidth: float, label: str, prompt_len: int = 64) -> dict[str, float]:
    """Batch-1 decode tokens/s of raylign's loop and of generate (prefill subtracted), against the bound."""
    device = next(model.parameters()).device
    ids = torch.randint(10, 49000, (1, prompt_len), device=device)
    mask = torch.ones_like(ids)
    no_eos = np.array([-1])

    def ours(tokens: int) -> None:
        sample_batch(model, ids, mask, 1, RolloutConfig(n_samples=1, max_new_tokens=tokens, temperature=0.0), no_eos, 0)

    @torch.no_grad()
    def theirs(tokens: int) -> None:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0, eos_token_id=None)

    dtype_bytes = next(model.parameters()).element_size()
    # the KV cache at the middle of the decode is part of every step's reads
    step_bytes = peak.decode_bytes_per_step(model.config, dtype_bytes, context=prompt_len + new // 2)
    bound = peak.decode_bound_tokens_per_s(step_bytes, bandwidth)
    out = {"bound_tokens_per_s": bound, "bytes_per_step": step_bytes}
    for name, fn in (("raylign sample_batch", ours), ("transformers generate", theirs)):
        fn(2)
        best_1 = min(_seconds(fn, 1) for _ in range(2))
        best_n = min(_seconds(fn, new) for _ in range(2))
        rate = (new - 1) / max(best_n - best_1, 1e-9)
        out[name] = rate
        print(f"{label:15s} batch 1 {name:22s} {rate:7.1f} decode tokens/s = {rate / bound:.2f} of the bandwidth "
              f"bound {bound:.1f} tokens/s ({step_bytes / 1e6:.0f} MB per step at {bandwidth / 1e9:.1f} GB/s; target "
              f">= 0.5: {'met' if rate / bound >= 0.5 else 'NOT met'})", flush=True)
    return out


def _seconds(fn, tokens: int) -> float:
    start = time.perf_counter()
    fn(tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
    parser.add_argument("--batch1-new", type=int, default=32, help="batch-1 decode: tokens per timed run (0: skip)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    bandwidth = 0.0
    if args.batch1_new and device.type == "cpu":
        bw = peak.memory_bandwidth(threads=args.threads)
        bandwidth = bw["triad_gbs"] * 1e9
        print(f"memory bandwidth (bench/peak.py, {args.threads} threads): triad {bw['triad_gbs']:.1f} GB/s, "
              f"copy {bw['copy_gbs']:.1f} GB/s", flush=True)
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device, dtype).eval()
        ids = torch.randint(10, 49000, (args.prompts, 64), device=device)
        mask = torch.ones_like(ids)
        mask[: args.prompts // 2, :16] = 0  # half the rows left padded
        label = str(dtype).removeprefix("torch.")
        measure(model, ids, mask, args.n, args.new, label)
        if bandwidth:
            batch1_decode(model, args.batch1_new, bandwidth, label)


if __name__ == "__main__":
    main()
