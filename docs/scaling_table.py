"""Memory per learner under DDP, FSDP2 and LoRA, computed from parameter counts: docs/SCALING.md's tables.

    python docs/scaling_table.py            # print the tables (markdown)
    python docs/scaling_table.py --write    # rewrite them in docs/SCALING.md, between its markers
    python docs/scaling_table.py --check    # exit 1 if docs/SCALING.md holds other tables

Parameter counts come from each architecture's shape (the numbers in its Hugging Face config.json), not
from a model card: a Llama-style decoder (RMSNorm, grouped-query attention, SwiGLU MLP, no biases) has

    P = V·h·(1 if tied else 2) + L·(h·(q + 2·kv + q) + 3·h·i + 2·h) + h        q = heads·d, kv = kv_heads·d

(embeddings [+ output head], per layer the q/k/v/o projections, gate/up/down and two norms, the final
norm; d = head_dim). tests/unit/test_scaling_table.py checks the formula against the model raylign builds
for `tiny:llama`, and the bytes against the tensors of a real AdamW step. Standard library only: the
script runs anywhere.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

SCALING_MD = Path(__file__).with_name("SCALING.md")
BEGIN = "<!-- BEGIN docs/scaling_table.py output: edit the script, then `python docs/scaling_table.py --write` -->"
END = "<!-- END docs/scaling_table.py output -->"

GiB = 2**30
GB = 10**9


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder, in the terms of its HF config.json."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    head_dim: int | None = None  # head_dim; None = hidden // heads

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads


# From each model's config.json (Hugging Face Hub: HuggingFaceTB/SmolLM2-*, meta-llama/Meta-Llama-3-*,
# meta-llama/Llama-3.2-3B); tiny:llama is raylign/models/tiny.py (vocab = its 460-token BPE).
SHAPES: dict[str, Shape] = {
    "tiny:llama": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=460, tied=False),
    "SmolLM2-135M": Shape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "SmolLM2-360M": Shape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152, tied=True),
    "SmolLM2-1.7B": Shape(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192, vocab=49152, tied=True),
    "Llama-3.2-3B": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "Llama-3-8B": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),
    "Llama-3-70B": Shape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256, tied=False),
}

LORA_RANK = 16  # raylign's default model.lora.r, target_modules: all-linear
# Bytes per element of the weights and of their gradients (same dtype); Adam's two moments stay fp32.
PRECISIONS = {"fp32": 4, "bf16": 2}
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32 each
LORA_PARAM_BYTES = 4 + 4 + ADAM_BYTES  # peft keeps adapter weights in fp32 (autocast_adapter_dtype), + grad + Adam

# Where it has to fit. "Fits" leaves 20% of the memory free for activations (tables below), the CUDA
# context and allocator fragmentation.
HEADROOM = 0.8
BOX_BYTES = 24 * GiB  # this development box: 2 CPU cores, 24 GiB RAM for every process together
GPU_BYTES = 80 * GB  # one 80 GB GPU (A100/H100 80GB)
GPUS_PER_NODE = 8
FSDP_SHARDS = (2, 8, 64)  # two learners; one 8-GPU node; eight such nodes


# ---- counts ----------------------------------------------------------------------------------------


def linear_shapes(s: Shape) -> list[tuple[int, int]]:
    """(in_features, out_features) of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
    q, kv = s.heads * s.d, s.kv_heads * s.d
    return [(s.hidden, q), (s.hidden, kv), (s.hidden, kv), (q, s.hidden),
            (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]


def param_count(s: Shape) -> int:
    """P = V·h·(1 if tied else 2) + L·(Σ in·out over the layer's linears + 2h) + h (module docstring)."""
    per_layer = sum(i * o for i, o in linear_shapes(s)) + 2 * s.hidden  # + input/post-attention RMSNorm
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * per_layer + s.hidden


def lora_param_count(s: Shape, r: int = LORA_RANK) -> int:
    """LoRA on every linear layer but the output head (peft's all-linear): A [r, in] + B [out, r] each,
    P_lora = L·Σ r·(in + out) (Hu et al. 2021)."""
    return s.layers * sum(r * (i + o) for i, o in linear_shapes(s))


# ---- bytes -----------------------------------------------------------------------------------------


def training_state_bytes(s: Shape, precision: str) -> dict[str, int]:
    """What one learner holds for full fine-tuning with AdamW, unsharded (DDP): weights P·w, gradients
    P·w, Adam's exp_avg and exp_avg_sq P·8 (fp32), w = 4 (fp32) or 2 (bf16) bytes."""
    p, w = param_count(s), PRECISIONS[precision]
    return {"weights": p * w, "grads": p * w, "adam": p * ADAM_BYTES}


def ddp_bytes(s: Shape, precision: str) -> int:
    """DDP: every learner holds all of it, P·(2w + 8) bytes (16 B/param fp32, 12 B/param bf16)."""
    return sum(training_state_bytes(s, precision).values())


def fsdp_bytes(s: Shape, precision: str, shards: int) -> int:
    """FSDP2 (ZeRO-3): weights, gradients and Adam state split over `shards` learners, ⌈P·(2w + 8)/N⌉.
    Excluded (transient): the all-gathered full weights of the layer being computed (and the next,
    prefetched) and its unsharded gradients before the reduce-scatter, 2·w·(largest layer) or so."""
    return math.ceil(ddp_bytes(s, precision) / shards)


def lora_bytes(s: Shape, precision: str, shards: int = 1, r: int = LORA_RANK) -> int:
    """LoRA: the frozen base P·w (no gradients, no Adam) + the adapters P_lora·(4 + 4 + 8), split over
    `shards` learners under FSDP2 (1 = DDP)."""
    return math.ceil((param_count(s) * PRECISIONS[precision] + lora_param_count(s, r) * LORA_PARAM_BYTES) / shards)


def activation_elements_per_token(s: Shape) -> int:
    """Elements autograd keeps per token of one decoder layer (no recomputation), counted from the ops:
    attention block: its input (h), the normed input shared by q/k/v (h), q (h), k and v (2·kv·d), the
    attention output = o's input (h); MLP block: its input (h), the normed input (h), gate, SiLU(gate), up
    and their product = down's input (4·i). Total 6h + 2·kv·d + 4i. Fused (SDPA/flash) attention keeps only
    a log-sum-exp per head; eager attention also keeps the probabilities, heads·seq per token
    (the 5as/h term of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", whose GPT count is s·b·h·(34 + 5as/h) bytes per layer)."""
    return 6 * s.hidden + 2 * s.kv_heads * s.d + 4 * s.intermediate


def activation_bytes(s: Shape, tokens: int, act_bytes: int = 2, checkpointing: bool = False) -> int:
    """Activation estimate for one micro-batch of `tokens` = batch·seq tokens, fused attention:
    no checkpointing  A = tokens·L·e·a            (e = activation_elements_per_token, a = bytes)
    checkpointing     A = tokens·(L·h + e)·a      (each layer's input kept, one layer recomputed at a time)
    plus the logits and their fp32 log-softmax for the loss, tokens·V·(a + 4), in both cases."""
    e = activation_elements_per_token(s)
    kept = tokens * (s.layers * s.hidden + e) if checkpointing else tokens * s.layers * e
    return kept * act_bytes + tokens * s.vocab * (act_bytes + 4)


# ---- where it fits ---------------------------------------------------------------------------------


def fits(state: int, memory: int) -> bool:
    return state <= HEADROOM * memory


def gpus_for_full_finetune(s: Shape, precision: str) -> int:
    """Fewest 80 GB GPUs that hold the FSDP2-sharded state within the headroom, ⌈state / (0.8·80 GB)⌉."""
    return math.ceil(ddp_bytes(s, precision) / (HEADROOM * GPU_BYTES))


def on_one_node(s: Shape, precision: str) -> str:
    if fits(ddp_bytes(s, precision), GPU_BYTES):
        return "full, DDP ×8"
    if fits(fsdp_bytes(s, precision, GPUS_PER_NODE), GPU_BYTES):
        return "full, FSDP2 ×8"
    if fits(lora_bytes(s, precision), GPU_BYTES):
        return "LoRA, DDP ×8"
    if fits(lora_bytes(s, precision, GPUS_PER_NODE), GPU_BYTES):
        return "LoRA, FSDP2 ×8"
    return "no"


def on_this_box(s: Shape, precision: str, online: bool = False) -> str:
    """One learner on this box (FSDP2 between two learners on one machine splits the state, but the
    shards share the same 24 GiB, so it fits nothing more than one learner does). Online RL adds one
    rollout worker's copy of the weights, P·w, and under full fine-tuning the frozen reference, P·w
    (under LoRA the reference is the base with adapters off: no copy)."""
    copy = param_count(s) * PRECISIONS[precision]
    if fits(ddp_bytes(s, precision) + (2 * copy if online else 0), BOX_BYTES):
        return "full"
    if fits(lora_bytes(s, precision) + (copy if online else 0), BOX_BYTES):
        return "LoRA only"
    return "no"


# ---- rendering -------------------------------------------------------------------------------------


def human(n: float) -> str:
    """Bytes in binary units, 3 significant digits: '1.52 MiB', '20.1 GiB'."""
    units = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", GiB), ("TiB", 2**40))
    unit, size = next(((u, s) for u, s in units if n / s < 999.5), units[-1])  # 1000 MiB -> 0.977 GiB
    value = n / size
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def render() -> str:
    """The markdown docs/SCALING.md holds between its markers."""
    out: list[str] = ["**Parameters** (counted from the shapes; LoRA r=16 on every linear layer but the output head)", ""]
    out += _table(
        ["model", "layers", "hidden", "heads / kv", "intermediate", "vocab", "tied", "parameters P", "LoRA P_lora"],
        [[name, str(s.layers), str(s.hidden), f"{s.heads} / {s.kv_heads}", str(s.intermediate), str(s.vocab),
          "yes" if s.tied else "no", f"{param_count(s):,} ({count(param_count(s))})",
          f"{lora_param_count(s):,} ({100 * lora_param_count(s) / param_count(s):.2g}%)"]
         for name, s in SHAPES.items()])
    out += ["", "**Memory per learner**: weights + gradients + AdamW moments (fp32), activations excluded; "
            "FSDP2 ×N = sharded over N learners", ""]
    shard_cols = [f"FSDP2 ×{n}" for n in FSDP_SHARDS]
    out += _table(
        ["model", "weights", "DDP", *shard_cols, "LoRA (DDP)", f"LoRA + FSDP2 ×{GPUS_PER_NODE}"],
        [[name, precision, human(ddp_bytes(s, precision)), *(human(fsdp_bytes(s, precision, n)) for n in FSDP_SHARDS),
          human(lora_bytes(s, precision)), human(lora_bytes(s, precision, GPUS_PER_NODE))]
         for name, s in SHAPES.items() for precision in PRECISIONS])
    out += ["", f"**Where it fits** (state ≤ {HEADROOM:.0%} of the memory; `full` = full fine-tuning)", ""]
    out += _table(
        ["model", "weights", "this box: offline (1 learner)", "this box: online RL (+ rollout, reference)",
         "one 8×80 GB node",
         "full fine-tuning, FSDP2: GPUs (8-GPU nodes)"],
        [[name, precision, on_this_box(s, precision), on_this_box(s, precision, online=True),
          on_one_node(s, precision),
          f"{gpus_for_full_finetune(s, precision)} ({math.ceil(gpus_for_full_finetune(s, precision) / GPUS_PER_NODE)})"]
         for name, s in SHAPES.items() if name != "tiny:llama" for precision in PRECISIONS])
    out += ["", "**Activations per micro-batch** (estimate, bf16 activations, fused attention, logits + fp32 "
            "log-softmax included; formula in the text)", ""]
    out += _table(
        ["model", "1×1024 tokens", "1×1024, checkpointing", "8×4096 tokens", "8×4096, checkpointing"],
        [[name, human(activation_bytes(s, 1024)), human(activation_bytes(s, 1024, checkpointing=True)),
          human(activation_bytes(s, 8 * 4096)), human(activation_bytes(s, 8 * 4096, checkpointing=True))]
         for name, s in SHAPES.items() if name != "tiny:llama"])
    return "\n".join(out) + "\n"


def replace_between_markers(text: str, body: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + body + text[end:]


def committed_tables(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].removeprefix("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite the tables in {SCALING_MD}")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {SCALING_MD} holds other tables")
    args = parser.parse_args(argv)
    body = render()
    if args.write:
        text = SCALING_MD.read_text(encoding="utf-8")
        tmp = SCALING_MD.with_suffix(".md.tmp")
        tmp.write_text(replace_between_markers(text, body), encoding="utf-8")
        tmp.replace(SCALING_MD)  # atomic: a failed write leaves the old file
        print(f"wrote the tables into {SCALING_MD}")
    elif args.check:
        if committed_tables(SCALING_MD.read_text(encoding="utf-8")) != body:
            print(f"{SCALING_MD} is out of date: run python docs/scaling_table.py --write", file=sys.stderr)
            return 1
        print(f"{SCALING_MD} is up to date")
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
