"""Batched generation for serving: many requests, each with its own sampling settings, in one
`model.generate` call, with per-row streaming of text.

One call of `Engine.generate` runs a single transformers `generate` (KV cache, left padding) over
every row of every request in a batch (a row = one prompt x one of its `n` choices). What differs
between rows is handled per row, so requests with different settings still share each forward pass:

* sampling - `RowSampler`, a logits processor, draws each row's token from that row's distribution
  (temperature, top-p) with that row's own `torch.Generator` (seeded from the request's `seed`, else
  at random), or takes the argmax for temperature 0, and hands transformers a one-hot score, so
  `generate` itself runs greedy. A row's draw depends only on its own logits and generator.
* stopping - `RowProgress`, a stopping criterion, ends each row on EOS, on its own `max_tokens`, on
  one of its `stop` strings (cut from the text, as OpenAI does), or when its request was cancelled
  (timeout, client gone); `generate` stops once every row has.
* streaming - after every step `RowProgress` reports each row's new text to `emit`, holding back text
  that may still turn out to be the start of a stop string or an incomplete UTF-8 character.

The engine is plain torch/transformers (no Ray); `raylign.serving.deployment` wraps it in Serve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

log = logging.getLogger(__name__)

# Settings that would change the logits before RowSampler sees them; kept neutral so a model's own
# generation_config cannot slip them in.
_NEUTRAL_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}


# Temperatures below this sample the argmax (dividing logits by them overflows float32).
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Job:
    """One request: its tokenized prompts, each sampled `n` times. Rows are prompt-major."""

    prompt_ids: list[list[int]]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.n

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class RowUpdate:
    """New text of one row since its last update; `finish_reason` is set on its last update."""

    row: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    completion_tokens: int = 0


Emit = Callable[[dict[int, list[RowUpdate]]], None]  # {job index: updates}, once per generation step


def row_seed(seed: int, row: int) -> int:
    """A well-mixed 63-bit seed for row `row` of a request seeded `seed`."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), row]).generate_state(1, np.uint64)[0] >> 1)


class RowSampler(LogitsProcessor):
    """Per-row sampling inside one batched `generate`: returns one-hot scores (0 at the drawn token,
    -inf elsewhere) so that greedy decoding picks exactly the token drawn here."""

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float],
                 generators: Sequence[torch.Generator | None]):
        self.temperature = torch.tensor(temperatures, dtype=torch.float32)
        self.top_p = torch.tensor(top_ps, dtype=torch.float32)
        self.generators = list(generators)
        self.greedy = self.temperature < GREEDY_BELOW
        self.sampled = [i for i, g in enumerate(self.generators) if g is not None and not self.greedy[i]]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return one_hot_scores(self.choose(scores), scores)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token of every row, [rows] int64."""
        chosen = scores.argmax(dim=-1)
        if not self.sampled:
            return chosen
        rows = torch.tensor(self.sampled)
        # On the CPU, where the rows' generators live.
        probs = nucleus_probs(scores[rows.to(scores.device)].float().cpu(), self.temperature[rows], self.top_p[rows])
        for k, i in enumerate(self.sampled):
            chosen[i] = int(torch.multinomial(probs[k], 1, generator=self.generators[i])[0])
        return chosen


def nucleus_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T) restricted to the smallest set of tokens whose mass reaches top_p
    (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), per row; [rows, V]."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    drop = before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays (even for a top_p that rounds to 0)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def one_hot_scores(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(like, float("-inf"))
    out.scatter_(1, tokens[:, None], 0.0)
    return out


class _Row:
    __slots__ = ("job", "index", "max_tokens", "stops", "stream", "tokens", "text", "sent", "finish")

    def __init__(self, job: int, index: int, max_tokens: int, stops: tuple[str, ...], stream: bool):
        self.job, self.index, self.max_tokens, self.stops, self.stream = job, index, max_tokens, stops, stream
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = ""  # streamed so far, always a prefix of the final text
        self.finish: str | None = None


class RowProgress(StoppingCriteria):
    """Tracks every row after each step: its tokens, text, whether and why it finished, and what
    text it may stream. Returns the rows that are done, so `generate` pads them from then on."""

    def __init__(self, rows: list[_Row], jobs: Sequence[Job], eos_ids: set[int], decode: Callable[[list[int]], str],
                 emit: Emit | None):
        self.rows, self.jobs, self.eos_ids, self.decode, self.emit = rows, jobs, eos_ids, decode, emit
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        last = input_ids[:, -1].tolist()
        updates: dict[int, list[RowUpdate]] = {}
        for row, token in zip(self.rows, last, strict=True):
            if row.finish is not None:
                continue
            row.tokens.append(token)
            self._advance(row, token)
            if row.stream or row.finish is not None:
                update = self.pending_update(row)
                if update is not None:
                    updates.setdefault(row.job, []).append(update)
        if self.emit is not None and updates:
            self.emit(updates)
        return torch.tensor([row.finish is not None for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _advance(self, row: _Row, token: int) -> None:
        if self.jobs[row.job].cancelled.is_set():
            row.finish = "cancelled"
            return
        if token in self.eos_ids:
            row.finish = "stop"
            row.text = self.decode(row.tokens[:-1])
            return
        if row.stream or row.stops or len(row.tokens) >= row.max_tokens:
            row.text = self.decode(row.tokens)
        if row.stops:
            cut = min((i for i in (row.text.find(s) for s in row.stops) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish = "stop"
                return
        if len(row.tokens) >= row.max_tokens:
            row.finish = "length"

    def pending_update(self, row: _Row) -> RowUpdate | None:
        """The row's text not streamed yet that can no longer change (all of it once finished)."""
        text = row.text if row.finish is not None else self._settled(row)
        delta = text[len(row.sent):] if text.startswith(row.sent) else ""
        if not delta and row.finish is None:
            return None
        row.sent += delta
        return RowUpdate(row.index, delta, row.finish, len(row.tokens))

    @staticmethod
    def _settled(row: _Row) -> str:
        text = row.text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its other bytes
        # A tail that could be the start of a stop string is held back until it is known not to be.
        hold = max((k for s in row.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]


@dataclass
class BatchResult:
    """Per job, per row: (text, completion tokens, finish reason); plus batch statistics."""

    rows: list[list[tuple[str, int, str]]]
    steps: int
    seconds: float


class Engine:
    """A causal LM and its tokenizer, ready for batched, per-row-configured generation."""

    def __init__(self, model: str, dtype: str = "float32", trust_remote_code: bool = False,
                 merge_lora: bool = True, device: str | None = None):
        from raylign.config import ModelConfig
        from raylign.models import is_peft_model, load_causal_lm

        cfg = ModelConfig(path=model, dtype=dtype, trust_remote_code=trust_remote_code)
        net, self.tokenizer = load_causal_lm(cfg)
        if is_peft_model(net):  # a saved LoRA adapter on its base model
            net = net.merge_and_unload() if merge_lora else net
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        self.eos_ids = self._eos_ids()
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", None)
                                  or getattr(config, "n_positions", None) or self.tokenizer.model_max_length)
        self._entropy = np.random.default_rng()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, list) else {configured}
        return {int(i) for i in ids if i is not None}

    # ---- prompts -------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """A completions prompt: the raw text, with the tokenizer's usual special tokens (e.g. BOS)."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat: the model's chat template with the assistant turn opened (as in training)."""
        from raylign.data import format_prompt

        return self.tokenizer(format_prompt(messages, self.tokenizer), add_special_tokens=False)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, jobs: Sequence[Job], emit: Emit | None = None) -> BatchResult:
        """Generate every row of every job in one batched `generate` call (see the module docstring)."""
        start = time.perf_counter()
        rows: list[_Row] = []
        prompts: list[list[int]] = []
        temperatures: list[float] = []
        top_ps: list[float] = []
        generators: list[torch.Generator | None] = []
        for j, job in enumerate(jobs):
            s = job.sampling
            base_seed = s.seed if s.seed is not None else int(self._entropy.integers(2**62))
            for r in range(job.rows):
                rows.append(_Row(j, r, s.max_tokens, s.stop, job.stream))
                prompts.append(job.prompt_ids[r // job.n])
                temperatures.append(s.temperature)
                top_ps.append(s.top_p)
                generators.append(None if s.temperature < GREEDY_BELOW else
                                  torch.Generator().manual_seed(row_seed(base_seed, r)))
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        progress = RowProgress(rows, jobs, self.eos_ids, self.decode, emit)
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in rows), do_sample=False,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.tokenizer.pad_token_id,
            **_NEUTRAL_PROCESSORS,
        )
        self.model.generate(
            input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(temperatures, top_ps, generators)]),
            stopping_criteria=[progress],
        )
        out: list[list[tuple[str, int, str]]] = [[] for _ in jobs]
        last: dict[int, list[RowUpdate]] = {}
        for row in rows:
            if row.finish is None:  # generate stopped before the row's own check did (cannot happen
                row.finish = "length"  # while requests fit the context; kept so no row is left open)
                row.text = self.decode(row.tokens)
                last.setdefault(row.job, []).append(progress.pending_update(row))
            out[row.job].append((row.text, len(row.tokens), row.finish))
        if emit is not None and last:
            emit(last)
        return BatchResult(out, progress.steps, time.perf_counter() - start)
