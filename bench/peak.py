"""The machine's own limits: matmul throughput (GFLOP/s, fp32 and bf16) at a model's own matrix shapes,
and memory bandwidth (GB/s), measured with torch in this process, so that the other benchmarks can
put their figures against them in the same run:

* model FLOPs utilisation (MFU) of a training step = the model FLOPs it did per second ÷ the measured
  matmul peak (`train_flops_per_token`, `mfu`);
* batch-1 decode tokens/s against the bandwidth bound = measured bandwidth ÷ the bytes of weights read
  per decode step (`decode_bytes_per_step`, `decode_bound_tokens_per_s`).

The functions the other benchmarks import: `model_shapes(config, tokens)`, `peak_flops(dtype, shapes)`,
`memory_bandwidth()`, `linear_params(config)`, `train_flops_per_token(...)`, `mfu(...)`,
`decode_bytes_per_step(...)`, `decode_bound_tokens_per_s(...)`, `cpu_flags()`.

    python bench/peak.py                                   # SmolLM2-135M's shapes, 1 / 64 / 512 tokens
    python bench/peak.py --tokens 1,512,2048 --threads 2 --json peak.json
    python bench/peak.py --model tiny:llama --dtypes float32

The peak is "at the model's shapes", not the chip's datasheet peak: a [1 x 576] @ [576 x 1536] decode
matmul is bandwidth-bound and reaches a small fraction of what a [512 x 576] @ [576 x 1536] one does,
and an MFU against the shape-matched peak says how much of the gap is the framework rather than the
arithmetic. On a machine shared with other work every figure here is a lower bound: check `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# SmolLM2-135M-Instruct's decoder (config.json of the builtin model), so that this file needs no model.
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}


@dataclass(frozen=True)
class Shape:
    """One matmul [m x k] @ [k x n], `count` times per forward pass."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> int:
        return matmul_flops(self.m, self.k, self.n) * self.count


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of one [m x k] @ [k x n] matmul: 2·m·k·n (one multiply and one add per term of each of the
    m·n dot products of length k)."""
    return 2 * m * k * n


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _dims(config: Any) -> dict[str, int]:
    """hidden h, intermediate i, layers L, query heads, kv heads, head dim, vocab V of a Llama-style config."""
    h, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    return {"h": h, "i": _get(config, "intermediate_size"), "L": _get(config, "num_hidden_layers"), "heads": heads,
            "kv": _get(config, "num_key_value_heads") or heads, "d": _get(config, "head_dim") or h // heads,
            "V": _get(config, "vocab_size")}


def model_shapes(config: Any, tokens: int) -> list[Shape]:
    """The matmuls of one forward pass of a Llama-style decoder (q/k/v/o projections, gate/up/down MLP,
    the LM head) over `tokens` tokens: [tokens x in] @ [in x out], each with its count per pass."""
    d = _dims(config)
    h, L = d["h"], d["L"]
    q, kv = d["heads"] * d["d"], d["kv"] * d["d"]
    return [Shape("q_proj", tokens, h, q, L), Shape("k_proj+v_proj", tokens, h, kv, 2 * L),
            Shape("o_proj", tokens, q, h, L), Shape("gate_proj+up_proj", tokens, h, d["i"], 2 * L),
            Shape("down_proj", tokens, d["i"], h, L), Shape("lm_head", tokens, h, d["V"], 1)]


def linear_params(config: Any) -> int:
    """Parameters that take part in matmuls: every linear weight of the decoder plus the LM head
    (V·h; with tied embeddings this is the embedding matrix). Norm weights, biases and the input
    embedding lookup (a gather, no FLOPs) are left out: this is the N of the 6N rule."""
    return sum(s.k * s.n * s.count for s in model_shapes(config, 1))


def total_params(config: Any) -> int:
    """All parameters of a bias-free Llama-style decoder: linear weights, the input embedding (unless tied
    to the LM head), and the RMSNorm weights (2 per layer + the final one)."""
    d = _dims(config)
    tied = bool(_get(config, "tie_word_embeddings", False))
    return linear_params(config) + (0 if tied else d["V"] * d["h"]) + (2 * d["L"] + 1) * d["h"]


def lora_params(config: Any, rank: int) -> int:
    """Adapter parameters of LoRA rank r on every linear layer of the decoder (not the LM head):
    r·(in + out) per adapted [in x out] weight (A is [r x in], B is [out x r]; Hu et al. 2021)."""
    return sum(rank * (s.k + s.n) * s.count for s in model_shapes(config, 1) if s.name != "lm_head")


def train_flops_per_token(n_linear: int, n_lora: int = 0, attn_flops_per_token: float = 0.0) -> float:
    """Model FLOPs of one training token (forward + backward).

    Full fine-tuning (n_lora = 0): 6N — forward 2N (a multiply-add per weight), backward 4N (2N for the
    gradients of the activations, 2N for those of the weights); Kaplan et al. 2020, "Scaling Laws for
    Neural Language Models", sec. 2.1, and the MFU definition of Chowdhery et al. 2022 (PaLM), appendix B
    (6N + the attention term 12·L·H·Q·T, passed here as `attn_flops_per_token`, already x3 for fwd+bwd).

    LoRA on the linear layers (n_lora > 0 adapter parameters): forward 2N + 2N_lora; backward 2N for the
    activation gradients through the frozen weights (there is no weight gradient for them) + 4N_lora for
    the adapters' activation and weight gradients: 4N + 6N_lora in all. Only useful work is counted
    (no activation recomputation), as MFU does.
    """
    if n_lora:
        return 4.0 * n_linear + 6.0 * n_lora + attn_flops_per_token
    return 6.0 * n_linear + attn_flops_per_token


def attention_train_flops_per_token(config: Any, seq_len: float) -> float:
    """PaLM's attention term per token, 12·L·H·Q·T (H heads of dim Q, context T, forward + backward):
    QKᵀ and AV are 2·H·Q·T FLOPs each per token and layer forward, x3 with the backward."""
    d = _dims(config)
    return 12.0 * d["L"] * d["heads"] * d["d"] * seq_len


def mfu(flops_per_token: float, tokens: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: (FLOPs per token x tokens / seconds) ÷ peak FLOP/s (PaLM, appendix B)."""
    return flops_per_token * tokens / seconds / peak_flops_per_s


def decode_bytes_per_step(config: Any, bytes_per_param: int, context: int = 0, batch: int = 1) -> int:
    """Bytes read from memory by one decode step: every linear weight once (the LM head included; the
    input embedding contributes one row per token, left out), plus the KV cache of `context` earlier
    positions per row (K and V: 2·L·kv_heads·head_dim values per position and row)."""
    d = _dims(config)
    kv_cache = 2 * d["L"] * d["kv"] * d["d"] * context * batch
    return (linear_params(config) + kv_cache) * bytes_per_param


def decode_bound_tokens_per_s(bytes_per_step: float, bandwidth_bytes_per_s: float, batch: int = 1) -> float:
    """The memory-bandwidth bound of decoding: each step must stream `bytes_per_step` and yields `batch`
    tokens, so tokens/s <= batch x bandwidth / bytes per step (the roofline of a batch-1 decode, whose
    arithmetic intensity is ~2 FLOPs per weight read)."""
    return batch * bandwidth_bytes_per_s / bytes_per_step


def learner_mfu(config: Any, lora_rank: int | None, tokens: float, rows: float, seconds: float,
                peak_gflops: float) -> dict[str, float]:
    """The MFU of a learner's training step(s): `tokens` real (unpadded) tokens in `rows` sequences
    trained in `seconds`, against `peak_gflops` measured at the model's shapes. FLOPs per token =
    `train_flops_per_token` (6N, or 4N + 6N_lora with LoRA of rank `lora_rank`) + PaLM's attention term
    at the mean sequence length."""
    n_lora = lora_params(config, lora_rank) if lora_rank else 0
    per_token = train_flops_per_token(linear_params(config), n_lora,
                                      attention_train_flops_per_token(config, tokens / max(rows, 1)))
    achieved = per_token * tokens / seconds
    return {"flops_per_token": per_token, "tokens": tokens, "seconds": seconds, "gflops": achieved / 1e9,
            "peak_gflops": peak_gflops, "mfu": achieved / (peak_gflops * 1e9)}


def mfu_line(name: str, m: dict[str, float]) -> str:
    return (f"{name:>8} learner MFU: {100 * m['mfu']:5.1f}%  ({m['flops_per_token'] / 1e9:.3f} GFLOP/token x "
            f"{m['tokens']:.0f} tokens in {m['seconds']:.2f} s = {m['gflops']:.3g} GFLOP/s of a measured "
            f"{m['peak_gflops']:.3g} GFLOP/s peak; target >= 40%)")


# ---- measurements ------------------------------------------------------------------------------


def _timed(fn, min_seconds: float) -> float:
    """Seconds per call of `fn`: one untimed call, then calls until `min_seconds` have passed; the best
    of those calls (outside load only ever slows a call down)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def peak_flops(dtype: torch.dtype, shapes: list[Shape], min_seconds: float = 0.2, threads: int | None = None,
               max_gflop: float = 0.5) -> dict[str, Any]:
    """Measured matmul throughput at `shapes` in `dtype`: per shape GFLOP/s, and overall = the shapes'
    total FLOPs (with their counts) ÷ their total time — the FLOP/s a forward pass made only of these
    matmuls would reach, the peak an MFU at these shapes is measured against."""
    if threads:
        torch.set_num_threads(threads)
    per_shape, total_flops, total_s = {}, 0, 0.0
    gen = torch.Generator().manual_seed(0)
    for s in shapes:
        # A wide matmul (the LM head) is timed on a slice of its output columns, at most max_gflop per
        # call: its rate barely depends on n once n is in the thousands, and a [512 x 576] @ [576 x 49152]
        # bf16 call without bf16 instructions takes minutes.
        n = max(1, min(s.n, int(max_gflop * 1e9 / matmul_flops(s.m, s.k, 1))))
        a = torch.randn(s.m, s.k, generator=gen).to(dtype)
        b = torch.randn(s.k, n, generator=gen).to(dtype)
        out = torch.empty(s.m, n, dtype=dtype)
        rate = matmul_flops(s.m, s.k, n) / _timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), min_seconds)
        per_shape[f"{s.name} [{s.m}x{s.k}]@[{s.k}x{s.n}]"] = rate / 1e9
        total_flops += s.flops
        total_s += s.flops / rate
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "gflops": total_flops / total_s / 1e9, "per_shape_gflops": per_shape}


def memory_bandwidth(mib: int = 256, min_seconds: float = 0.5, threads: int | None = None) -> dict[str, float]:
    """Measured memory bandwidth in GB/s (1e9 bytes/s) of two streams over arrays of `mib` MiB (far
    larger than any CPU cache): copy (b = a: reads a, writes b, 2 arrays of traffic) and triad
    (a = b + 3·c: reads b and c, writes a, 3 arrays), the STREAM benchmark's kernels (McCalpin 1995)."""
    if threads:
        torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.ones(n)
    copy_s = _timed(lambda: b.copy_(a), min_seconds)
    triad_s = _timed(lambda: torch.add(b, c, alpha=3.0, out=a), min_seconds)
    size = n * 4
    return {"copy_gbs": 2 * size / copy_s / 1e9, "triad_gbs": 3 * size / triad_s / 1e9, "mib": float(mib)}


def cpu_flags() -> dict[str, Any]:
    """The CPU's model name and its bf16/AMX/AVX-512 flags from /proc/cpuinfo (Linux), and what oneDNN
    (torch's CPU matmul backend) reports it can use."""
    flags: set[str] = set()
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"]
    return {"model": name, **{f: f in flags for f in wanted},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure(config: Any, tokens: list[int], dtypes: list[torch.dtype], threads: int, min_seconds: float,
            bandwidth_mib: int) -> dict[str, Any]:
    """Everything this file measures for one model config: {flags, bandwidth, peak[dtype][tokens]}."""
    out: dict[str, Any] = {"cpu": cpu_flags(), "threads": threads,
                           "bandwidth": memory_bandwidth(bandwidth_mib, threads=threads), "peak": {}}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        out["peak"][name] = {t: peak_flops(dtype, model_shapes(config, t), min_seconds, threads) for t in tokens}
    return out


def load_config_of(model: str) -> Any:
    """The HF config of a raylign model name or local directory (SmolLM2-135M's shape without one)."""
    if model == "smollm2-135m-shape":
        return SMOLLM2_135M
    from transformers import AutoConfig

    from raylign.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))



def model_peak(model_dir: str, model_name: str, tokens: int, threads: int) -> dict[str, Any]:
    """The float32 matmul peak at `model_dir`'s shapes with `tokens` rows, printed with the load:
    {config, gflops, per_shape_gflops}, what the training benchmarks divide their FLOPs by for the MFU."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    res = peak_flops(torch.float32, model_shapes(config, tokens), threads=threads)
    print(f"machine peak (bench/peak.py, float32, {threads} threads, {tokens}-row matmuls at "
          f"{model_name}'s shapes): {res['gflops']:.3g} GFLOP/s; load avg {os.getloadavg()[0]:.1f}", flush=True)
    return {"config": config, "gflops": res["gflops"], "per_shape_gflops": res["per_shape_gflops"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-shape",
                   help="whose matrix shapes: smollm2-135m-shape (no model needed), or a raylign model name/dir")
    p.add_argument("--tokens", default="1,64,512", help="rows of the activations (1 = batch-1 decode)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--min-seconds", type=float, default=0.2, help="timing per shape")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="size of each bandwidth array")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    config = load_config_of(args.model)
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    load = os.getloadavg()[0]
    res = measure(config, tokens, dtypes, args.threads, args.min_seconds, args.bandwidth_mib)
    cpu = res["cpu"]
    print(f"CPU {cpu['model']!r}, torch capability {cpu['torch_cpu_capability']}; flags: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.items() if isinstance(v, bool)))
    bw = res["bandwidth"]
    print(f"memory bandwidth ({args.threads} threads, {bw['mib']:.0f} MiB arrays): copy {bw['copy_gbs']:.1f} GB/s, "
          f"triad {bw['triad_gbs']:.1f} GB/s")
    n_linear = linear_params(config)
    for name, by_tokens in res["peak"].items():
        for t, r in by_tokens.items():
            print(f"matmul peak {name:8s} at {t:5d} tokens: {r['gflops']:7.1f} GFLOP/s  ("
                  + ", ".join(f"{k.split(' ')[0]} {v:.1f}" for k, v in r["per_shape_gflops"].items()) + ")")
    bytes_fp32 = decode_bytes_per_step(config, 4)
    print(f"linear parameters N = {n_linear / 1e6:.1f} M (6N = {6 * n_linear / 1e9:.2f} GFLOP per training token); "
          f"batch-1 decode reads {bytes_fp32 / 1e6:.0f} MB (fp32) / {bytes_fp32 / 2e6:.0f} MB (bf16) per token: bound "
          f"{decode_bound_tokens_per_s(bytes_fp32, bw['triad_gbs'] * 1e9):.1f} / "
          f"{decode_bound_tokens_per_s(bytes_fp32 / 2, bw['triad_gbs'] * 1e9):.1f} tokens/s at the triad bandwidth; "
          f"load avg {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_avg": load, **res,
                                               "shapes": {t: [asdict(s) for s in model_shapes(config, t)]
                                                          for t in tokens}}, indent=2))


if __name__ == "__main__":
    main()
