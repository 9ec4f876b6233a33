"""bf16 on this CPU against float32: speed of generation, scoring (token log-probs) and one training step,
and the log-prob gap between a bf16 rollout and a float32 learner, on tiny:llama and SmolLM2-135M.

Precision modes (the model's weights are loaded once in float32; each mode works on its own copy):
  * float32           - weights and compute in float32 (raylign's CPU default, `model.dtype=float32`);
  * bf16-autocast     - float32 weights, `torch.autocast("cpu", dtype=torch.bfloat16)` around the work
                        (matmuls in bf16, reductions and the optimizer state in float32);
  * bf16-weights      - the weights cast to bfloat16 (`model.dtype=bfloat16`), compute in bf16.

Speed per mode: generation = raylign's decode loop (`raylign.workers.rollout.sample_batch`, the
rollout worker's own code) for `--rows` prompts x `--new` tokens (tokens/s); scoring = one forward pass
+ log_softmax over the sampled sequences, as the learner and the reference do (tokens/s); training =
forward + backward + AdamW step on those sequences (tokens/s); each the best of `--repeats` timed calls
after one untimed.

The log-prob gap: the rollout samples in one mode and records its per-token log-probs (from the
decode loop, as the rollout worker does); the learner recomputes them for the same tokens with one
full forward pass in another mode, and before its first update both have the same weights, so any
difference Δ = log p_learner − log p_rollout is precision alone. The PPO/GRPO ratio at that point is
exp(Δ) and should be 1; the surrogate clips it at 1 ± ε (ε = 0.2), so tokens with |exp(Δ) − 1| > ε lose
their gradient (Schulman et al. 2017, eq. 7) for no reason but rounding, and a gap that is a sizeable
share of ε biases every update. Reported: mean and max |Δ| per completion token, and the share of
tokens with |exp(Δ) − 1| above ε and above ε/10 (what "well within the clip range" asks).

    RAYLIGN_HOME=/tmp/qs-home python bench/cpu_precision.py                     # tiny + SmolLM2
    python bench/cpu_precision.py --models tiny:llama --rows 4 --new 16 --json precision.json

The verdict line says whether bf16 could be the CPU default on this machine: only where every phase is
faster in bf16 and no token leaves the clip range; `cpu_flags` (bench/peak.py) shows whether the CPU
has bf16 instructions (avx512_bf16 / amx_bf16) at all: without them oneDNN emulates bf16 matmuls with
conversions and they are slower than float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak  # noqa: E402

MODES = ["float32", "bf16-autocast", "bf16-weights"]
# (rollout mode, learner mode) pairs whose gap is measured; float32/float32 is the decode-vs-full-forward floor.
GAP_PAIRS = [("float32", "float32"), ("bf16-autocast", "float32"), ("bf16-weights", "float32"),
             ("bf16-autocast", "bf16-autocast")]


def logprob_gap(rollout_logps: torch.Tensor, learner_logps: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2) -> dict[str, float]:
    """Per-token gap Δ = learner − rollout log-probs over the `mask`ed tokens ([B, T] each): mean and max
    |Δ|, and the share of tokens whose importance ratio exp(Δ) is outside 1 ± ε and outside 1 ± ε/10
    (ε: the PPO/GRPO clip range; Schulman et al. 2017, eq. 7)."""
    sel = mask.bool()
    delta = (learner_logps.double() - rollout_logps.double())[sel]  # [N]
    off = (delta.exp() - 1).abs()
    n = max(int(sel.sum()), 1)
    return {"mean_abs": float(delta.abs().mean()), "max_abs": float(delta.abs().max()),
            "outside_clip": float((off > clip_eps).sum()) / n, "outside_tenth_clip": float((off > clip_eps / 10).sum()) / n,
            "tokens": float(n)}


def _ctx(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16-autocast" else torch.autocast("cpu", enabled=False)


def _model_for(base: torch.nn.Module, mode: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    return model.to(torch.bfloat16) if mode == "bf16-weights" else model


def full_logps(model: torch.nn.Module, seqs: torch.Tensor, attn: torch.Tensor, mode: str) -> torch.Tensor:
    """log p(x_t | x_<t) of every next token ([B, T-1]) from one forward pass, log_softmax in float32."""
    with _ctx(mode):
        logits = model(input_ids=seqs, attention_mask=attn).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, seqs[:, 1:, None])[..., 0]


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from raylign.config import RolloutConfig
    from raylign.data import load_dataset
    from raylign.data.templates import format_prompt
    from raylign.models import load_tokenizer, resolve_model_path
    from raylign.workers.rollout import sample_batch

    model_dir = resolve_model_path(name)
    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = load_dataset("builtin:everyday-prompts").column("prompt").to_pylist()[: args.rows]
    texts = [format_prompt(p, tokenizer, True) for p in prompts]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    no_eos = np.array([-1])  # every row runs to --new tokens, so every mode does the same work
    sampling = RolloutConfig(n_samples=1, max_new_tokens=args.new, temperature=1.0, top_p=1.0, top_k=0)
    models = {m: _model_for(base, m) for m in MODES}

    def rollout(mode: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        with torch.no_grad(), _ctx(mode):
            return sample_batch(models[mode], ids, mask, 1, sampling, no_eos, pad)

    out: dict[str, Any] = {"model": name, "rows": args.rows, "new_tokens": args.new, "speed": {}, "gap": {}}
    # One fixed set of sequences (sampled in float32) for scoring and training in every mode.
    tokens32, _ = rollout("float32")
    seqs = torch.cat([ids, tokens32], 1)
    attn = torch.cat([mask, torch.ones_like(tokens32)], 1)
    n_tokens = float(attn.sum())
    for mode in tqdm(MODES, desc=f"{name}: speed", leave=False):
        model = models[mode]
        gen_s = _best(lambda mode=mode: rollout(mode), args.repeats)

        def score(model=model, mode=mode):
            with torch.no_grad():
                full_logps(model, seqs, attn, mode)

        score_s = _best(score, args.repeats)
        train_model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(train_model.parameters(), lr=1e-6)

        def train(train_model=train_model, opt=opt, mode=mode):
            loss = -full_logps(train_model, seqs, attn, mode).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_s = _best(train, args.repeats)
        del train_model, opt
        out["speed"][mode] = {"generate_tokens_per_s": args.rows * args.new / gen_s,
                              "score_tokens_per_s": n_tokens / score_s, "train_tokens_per_s": n_tokens / train_s}
    for roll_mode, learn_mode in tqdm(GAP_PAIRS, desc=f"{name}: gap", leave=False):
        tokens, roll_logps = rollout(roll_mode, seed=1)
        s = torch.cat([ids, tokens], 1)
        a = torch.cat([mask, torch.ones_like(tokens)], 1)
        with torch.no_grad():
            learner = full_logps(models[learn_mode], s, a, learn_mode)[:, ids.shape[1] - 1 :]
        out["gap"][f"{roll_mode} rollout -> {learn_mode} learner"] = logprob_gap(
            roll_logps, learner, torch.ones_like(roll_logps), args.clip_eps)
    return out


def verdict(results: list[dict[str, Any]], clip_eps: float) -> str:
    """Whether bf16 autocast could be raylign's CPU default here: faster in every phase on every model and
    no token of a bf16 rollout scored by a float32 learner outside 1 ± ε."""
    slower = [f"{r['model']} {phase}" for r in results for phase in ("generate", "score", "train")
              if r["speed"]["bf16-autocast"][f"{phase}_tokens_per_s"] <= r["speed"]["float32"][f"{phase}_tokens_per_s"]]
    gaps = [r["gap"]["bf16-autocast rollout -> float32 learner"] for r in results]
    outside = max(g["outside_clip"] for g in gaps)
    if slower or outside > 0:
        why = []
        if slower:
            why.append("bf16 autocast is not faster for " + ", ".join(slower))
        if outside > 0:
            why.append(f"{100 * outside:.2f}% of tokens leave the clip range 1 ± {clip_eps}")
        return "keep float32 the CPU default: " + "; ".join(why)
    return (f"bf16 autocast could be the CPU default: faster in every phase and every token within 1 ± {clip_eps} "
            f"(largest share outside 1 ± {clip_eps / 10}: {100 * max(g['outside_tenth_clip'] for g in gaps):.2f}%)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="tiny:llama,builtin:smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=4, help="prompts per batch (one sample each)")
    p.add_argument("--new", type=int, default=16, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per phase (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--clip-eps", type=float, default=0.2, help="the PPO/GRPO clip range the gap is held against")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = peak.cpu_flags()
    print(f"CPU {cpu['model']!r}: avx512_bf16 {cpu['avx512_bf16']}, amx_bf16 {cpu['amx_bf16']}, torch capability "
          f"{cpu['torch_cpu_capability']}; {args.threads} threads; load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for name in args.models.split(","):
        r = run_model(name.strip(), args)
        results.append(r)
        for mode, sp in r["speed"].items():
            base = r["speed"]["float32"]
            print(f"{name:32s} {mode:14s} generate {sp['generate_tokens_per_s']:8.1f} tok/s "
                  f"({sp['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x), score "
                  f"{sp['score_tokens_per_s']:8.1f} tok/s ({sp['score_tokens_per_s'] / base['score_tokens_per_s']:.2f}x), "
                  f"train {sp['train_tokens_per_s']:8.1f} tok/s ({sp['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x)",
                  flush=True)
        for pair, g in r["gap"].items():
            print(f"{name:32s} {pair:42s} |Δ log p| mean {g['mean_abs']:.2e} max {g['max_abs']:.2e}; ratio outside "
                  f"1 ± {args.clip_eps}: {100 * g['outside_clip']:.2f}%, outside 1 ± {args.clip_eps / 10:g}: "
                  f"{100 * g['outside_tenth_clip']:.2f}% of {g['tokens']:.0f} tokens", flush=True)
    print(verdict(results, args.clip_eps) + f" (load avg {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
