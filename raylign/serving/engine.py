"""Continuous batching for serving: many requests, each with its own sampling settings, decoded
together one token per step, with requests joining and leaving the running batch between steps.

`Engine.submit(jobs, emit)` hands a group of requests (one `@serve.batch` batch: an *admission*) to
the engine's decode thread, which runs one KV-cache decode loop over every live row of every admitted
request (a row = one prompt x one of its `n` choices):

* admission - between two steps, waiting admissions join as long as the running batch stays within
  `max_rows` rows: their prompts are prefilled (one forward pass per admission) and their KV caches
  merged into the running one (left-padded to a common length), so a request never waits for the
  batch ahead of it to finish (Yu et al. 2022, "Orca", iteration-level scheduling). Rows that
  finished leave the batch after the step that ended them, and cache columns no live row uses are cut.
* prefix sharing - prompts of one admission usually share a long head (a chat template's system
  prompt); its KV is computed once, kept for the next admissions with the same head, and only the rest
  of each prompt is prefilled (the idea of vLLM's automatic prefix caching). The cache is laid out
  [shared head | padding | own tail]: positions come from the attention mask, so the padding in the
  middle changes nothing but the work.
* sampling - `RowSampler` draws each row's token from that row's distribution (temperature, top-p)
  with that row's own `torch.Generator` (seeded from the request's `seed`, else at random), or takes
  the argmax for temperature 0. A row's draw depends only on its own logits and generator.
* stopping - `RowProgress` ends each row on EOS, on its own `max_tokens`, on one of its `stop`
  strings (cut from the text, as OpenAI does), or when its request was cancelled (client gone) or ran
  past its deadline. A request cancelled or past its deadline while it waits for admission is dropped
  before its prefill.
* streaming - after every step each admission's `emit` gets its rows' new text, holding back text
  that may still turn out to be the start of a stop string or an incomplete UTF-8 character.

A decode thread that dies (an error outside any one request) fails every request it holds at once and
makes `check_alive` raise, which the replica's health check reports so that Serve replaces it.

The engine is plain torch/transformers (no Ray); `raylign.serving.deployment` wraps it in Serve.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessor

from raylign.models.hf import cache_argument
from raylign.runtime import Purpose, derive_seed

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

# Temperatures below this sample the argmax (dividing logits by them overflows float32).
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings (already validated). `logprobs`: report each generated token's
    log-prob and its `logprobs` most likely alternatives (None: report nothing); `echo`: also the
    prompt's tokens' (the first one has none); `max_tokens` 0 generates nothing (scores the prompt, with
    echo). `stop_token_ids` end a row like EOS does (the stopping token is neither in the text nor in
    the log-probs)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Job:
    """One request: its tokenized prompts, each sampled `n` times. Rows are prompt-major. `deadline`
    (`time.monotonic()`) is when its request times out; the engine drops it from then on."""

    prompt_ids: list[list[int]]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.n

    def cancel(self) -> None:
        self.cancelled.set()

    def gone(self, now: float) -> bool:
        """Cancelled, or past its deadline at `now`: no more work for it."""
        return self.cancelled.is_set() or (self.deadline is not None and now >= self.deadline)


class EngineDead(RuntimeError):
    """The decode thread has stopped: this engine serves no more requests (the replica must be replaced)."""


# One token's log-prob entry: (token id, log-prob or None for a prompt's first token, the most likely
# alternatives as (token id, log-prob), most likely first).
TokenLogprob = tuple[int, float | None, tuple[tuple[int, float], ...]]


@dataclass
class RowUpdate:
    """New text of one row since its last update; `finish_reason` is set on its last update. For a row
    that asked for log-probs: `logprobs`, those of its tokens new since its last update, and, on its
    first update, `prompt_logprobs` when it asked for `echo`."""

    row: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


Emit = Callable[[dict[int, list[RowUpdate]]], None]  # {job index: updates}, once per generation step


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a request seeded `seed` (the project's scheme, `Purpose.SERVE`)."""
    return derive_seed(seed, Purpose.SERVE, 0, row)


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
        # transformers annotates scores as the legacy FloatTensor class, which no tensor is statically.
        return cast(torch.FloatTensor, one_hot_scores(self.choose(scores), scores))

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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_T(token) = log_softmax(logits / T)[token] of the untruncated temperature-scaled
    distribution, T = 1 where T < GREEDY_BELOW (greedy): the quantity raylign's rollouts record and its
    learner recomputes (`raylign.workers.rollout.sample_batch`), before any top-p truncation. Also the
    `top` most likely tokens and their log-probs. logits [rows, V], tokens [rows], temperature [rows] ->
    ([rows], [rows, top] values, [rows, top] ids)."""
    t = torch.where(temperature < GREEDY_BELOW, torch.ones_like(temperature), temperature).to(logits.device)
    logp = torch.log_softmax(logits.float() / t[:, None], dim=-1)  # [rows, V]
    chosen = logp.gather(1, tokens[:, None].to(logits.device))[:, 0]
    values, ids = logp.topk(top, dim=-1) if top > 0 else (logp[:, :0], logp[:, :0].long())
    return chosen.cpu(), values.cpu(), ids.cpu()


def logprob_entries(tokens: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
                    top: int) -> list[TokenLogprob]:
    """`token_logprobs`' tensors of one row as entries, with that row's own number of alternatives."""
    return [(token, logprob, tuple(zip(top_ids[:top], top_values[:top], strict=True)))
            for token, logprob, top_values, top_ids in zip(tokens.tolist(), chosen.tolist(), values.tolist(),
                                                           ids.tolist(), strict=True)]




class _Row:
    __slots__ = ("admission", "job", "index", "prompt", "max_tokens", "stops", "stream", "temperature", "top_p",
                 "generator", "tokens", "text", "sent", "finish", "top", "echo", "stop_ids", "logprobs",
                 "prompt_logprobs", "sent_logprobs", "sent_prompt")

    def __init__(self, job: int, index: int, max_tokens: int, stops: tuple[str, ...], stream: bool,
                 prompt: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, admission: Any = None, top: int | None = None,
                 echo: bool = False, stop_ids: Sequence[int] = ()):
        self.job, self.index, self.max_tokens, self.stops, self.stream = job, index, max_tokens, stops, stream
        self.prompt, self.temperature, self.top_p, self.generator = list(prompt), temperature, top_p, generator
        self.admission = admission
        self.top = top  # alternatives per log-prob entry; None: no log-probs for this row
        self.echo = echo and top is not None  # log-probs of the prompt's tokens too
        self.stop_ids = frozenset(stop_ids)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated token, while the row asks for them
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.sent_logprobs = 0  # entries already in an update
        self.sent_prompt = False
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = ""  # streamed so far, always a prefix of the final text
        self.finish: str | None = None


class RowProgress:
    """Advances a row by one sampled token: its tokens, its text, whether and why it finished, and the
    text it may stream so far."""

    def __init__(self, eos_ids: set[int], decode: Callable[[list[int]], str]):
        self.eos_ids, self.decode = eos_ids, decode

    def advance(self, row: _Row, token: int, cancelled: bool, logprob: TokenLogprob | None = None
                ) -> RowUpdate | None:
        """Take `token` (and its log-prob entry, for a row that asks for them) into `row`; the row's
        update to stream or to end it, if any."""
        row.tokens.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        self._advance(row, token, cancelled)
        if row.stream or row.finish is not None:
            return self.pending_update(row)
        return None

    def _advance(self, row: _Row, token: int, cancelled: bool) -> None:
        if cancelled:
            row.finish = "cancelled"
            return
        if token in self.eos_ids or token in row.stop_ids:
            row.finish = "stop"
            row.text = self.decode(row.tokens[:-1])
            del row.logprobs[len(row.tokens) - 1:]  # the stopping token is not part of the answer
            return
        if row.stream or row.stops or len(row.tokens) >= row.max_tokens:
            row.text = self.decode(row.tokens)
        if row.stops:
            cut = min((i for i in (row.text.find(s) for s in row.stops) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish = "stop"
                if row.top is not None:
                    del row.logprobs[self._tokens_covering(row.tokens, len(row.text)):]
                return
        if len(row.tokens) >= row.max_tokens:
            row.finish = "length"

    def _tokens_covering(self, tokens: list[int], chars: int) -> int:
        """The fewest leading tokens whose text has at least `chars` characters (those a stop string's
        cut keeps, the last one possibly in part)."""
        k = len(tokens)
        while k > 0 and len(self.decode(tokens[:k - 1])) >= chars:
            k -= 1
        return k

    def pending_update(self, row: _Row) -> RowUpdate | None:
        """The row's text not streamed yet that can no longer change (all of it once finished), with
        the log-prob entries not reported yet (held back with the text)."""
        text = row.text if row.finish is not None else self._settled(row)
        delta = text[len(row.sent):] if text.startswith(row.sent) else ""
        if not delta and row.finish is None:
            return None
        row.sent += delta
        update = RowUpdate(row.index, delta, row.finish, len(row.tokens), row.logprobs[row.sent_logprobs:])
        row.sent_logprobs = max(row.sent_logprobs, len(row.logprobs))
        if row.echo and not row.sent_prompt:
            update.prompt_logprobs, row.sent_prompt = row.prompt_logprobs, True
        return update

    @staticmethod
    def _settled(row: _Row) -> str:
        text = row.text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its other bytes
        # A tail that could be the start of a stop string is held back until it is known not to be.
        hold = max((k for s in row.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]


@dataclass
class BatchResult:
    """One admission's outcome. Per job, per row: (text, completion tokens, finish reason); `steps`:
    decode steps it had live rows in; `peak_rows`: the most rows (of every admission) one of those
    steps decoded together."""

    rows: list[list[tuple[str, int, str]]]
    steps: int
    seconds: float
    peak_rows: int = 0


@dataclass
class _Admission:
    jobs: Sequence[Job]
    emit: Emit | None
    future: concurrent.futures.Future
    rows: list[_Row] = field(default_factory=list)
    open_rows: int = 0
    steps: int = 0
    peak_rows: int = 0
    start: float = field(default_factory=time.perf_counter)

    def result(self) -> BatchResult:
        out: list[list[tuple[str, int, str]]] = [[] for _ in self.jobs]
        for row in self.rows:
            if row.finish is None:  # a result is only taken once every row has finished
                raise RuntimeError(f"row {row.index} of job {row.job} has not finished")
            out[row.job].append((row.text, len(row.tokens), row.finish))
        return BatchResult(out, self.steps, time.perf_counter() - self.start, self.peak_rows)


# A shared prompt head shorter than this is prefilled with each row (sharing it would save too little).
MIN_SHARED_PREFIX = 8



def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest head every sequence starts with."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, heads, length, head dim]


def kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """`cache.layers`, typed as what the engine's caches hold: key/value (attention) layers, the only
    kind `DynamicCache()` and `DynamicCache(ddp_cache_data=...)` of a decoder make."""
    return cast("list[DynamicLayer]", cache.layers)


def layer_kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values."""
    if layer.keys is None or layer.values is None:
        raise RuntimeError("a KV cache layer was never filled")
    return layer.keys, layer.values


def cache_tensors(cache: DynamicCache) -> KV:
    return [layer_kv(layer) for layer in kv_layers(cache)]


def left_pad(kv: KV, mask: torch.Tensor, length: int) -> tuple[KV, torch.Tensor]:
    """The cache and mask padded on the left (masked zeros) to `length` columns."""
    extra = length - mask.shape[1]
    if extra == 0:
        return kv, mask
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, extra, 0))  # noqa: E731 - dim -2 of [B, H, L, D]
    return [(pad(k), pad(v)) for k, v in kv], torch.nn.functional.pad(mask, (extra, 0))


@dataclass
class _Prefill:
    """The prompts of one admission on their way into the running batch, prefilled a chunk of columns
    at a time: `ids` [rows, L] are their tails (after a `shared` head already in `cache`), left-padded;
    `mask` [rows, shared + L]; `positions` [rows, L]; `lengths` the tails' lengths; `done` the columns
    prefilled so far and `logits` [rows, V] those of the last one."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    shared: int
    lengths: list[int]
    done: int = 0
    logits: torch.Tensor | None = None
    admission: Any = None
    rows: list[_Row] = field(default_factory=list)


class Engine:
    """A causal LM and its tokenizer, decoding every submitted request in one continuous batch."""

    def __init__(self, model: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 trust_remote_code: bool = False,
                 merge_lora: bool = True, device: str | None = None, max_rows: int = 32,
                 prefill_chunk: int = 0):
        from raylign.config import ModelConfig
        from raylign.models import is_peft_model, load_causal_lm

        cfg = ModelConfig(path=model, dtype=dtype, trust_remote_code=trust_remote_code)
        net, self.tokenizer = load_causal_lm(cfg)
        if is_peft_model(net):  # a saved LoRA adapter on its base model
            net = net.merge_and_unload() if merge_lora else net
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", None)
                                  or getattr(config, "n_positions", None) or self.tokenizer.model_max_length)
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk  # prompt tokens per decode step while rows run; 0: all at once
        embeddings = cast(torch.nn.Embedding, cast(Any, self.model).get_input_embeddings())
        self.vocab_size = int(embeddings.num_embeddings)  # token ids a request may give are < this
        self._progress = RowProgress(self.eos_ids, self.decode)
        self._cache_arg = cache_argument(self.model)
        self._entropy = np.random.default_rng()
        self._threads = torch.get_num_threads()
        # Shared with submitters (under _lock): admissions waiting to join the running batch.
        self._lock = threading.Condition()
        self._waiting: deque[_Admission] = deque()
        self._thread: threading.Thread | None = None
        self._died: BaseException | None = None  # what stopped the decode thread
        # Owned by the decode thread: the running batch.
        self._rows: list[_Row] = []
        self._joining: list[_Admission] = []  # taken from the waiting queue, not yet in the running batch
        self._prefills: deque[_Prefill] = deque()  # long prompts being prefilled a chunk per step
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, length], 1 = a real token
        self._logits: torch.Tensor | None = None  # [rows, vocab], the next token's
        self._sampler: RowSampler | None = None
        self._prefix: tuple[list[int], KV] | None = None  # the last shared prompt head and its KV

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
        # One sequence of ids decodes to one string (`decode` is typed for batches too).
        return cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job], emit: Emit | None = None) -> concurrent.futures.Future:
        """Queue `jobs` to join the running batch; the future's result is their `BatchResult` (or the
        exception their prefill or a shared step raised). `emit` is called from the decode thread
        after every step with `{job index: updates}` of the jobs' rows."""
        admission = _Admission(jobs, emit, concurrent.futures.Future())
        for j, job in enumerate(jobs):
            s = job.sampling
            base_seed = s.seed if s.seed is not None else int(self._entropy.integers(2**62))
            for r in range(job.rows):
                generator = None if s.temperature < GREEDY_BELOW else torch.Generator().manual_seed(row_seed(base_seed, r))
                admission.rows.append(_Row(j, r, s.max_tokens, s.stop, job.stream, job.prompt_ids[r // job.n],
                                           s.temperature, s.top_p, generator, admission, s.logprobs, s.echo,
                                           s.stop_token_ids))
        admission.open_rows = len(admission.rows)
        if not admission.rows:
            admission.future.set_result(admission.result())
            return admission.future
        with self._lock:
            if self._died is not None:
                raise EngineDead(f"the decode thread stopped: {self._died!r}")
            self._waiting.append(admission)
            if self._thread is None:
                self._thread = threading.Thread(target=self._decode_forever, name="raylign-decode", daemon=True)
                self._thread.start()
            self._lock.notify()
        return admission.future

    def generate(self, jobs: Sequence[Job], emit: Emit | None = None) -> BatchResult:
        """`submit` and wait for the result."""
        return self.submit(jobs, emit).result()

    def check_alive(self) -> None:
        """Raise `EngineDead` if the decode thread has stopped (it starts with the first request)."""
        if self._died is not None or (self._thread is not None and not self._thread.is_alive()):
            raise EngineDead(f"the decode thread stopped: {self._died!r}")

    # ---- the decode thread -----------------------------------------------------------------------
    def _decode_forever(self) -> None:
        try:
            self._decode_loop()
        except BaseException as error:  # noqa: BLE001 - outside any one request: the engine is done
            log.critical("raylign: the decode thread stopped: %r", error, exc_info=True)
            with self._lock:
                self._died = error
                pending = [*self._waiting, *self._joining, *(p.admission for p in self._prefills),
                           *{id(r.admission): r.admission for r in self._rows}.values()]
                self._waiting.clear()
            dead = EngineDead(f"the decode thread stopped: {error!r}")
            for admission in pending:
                if not admission.future.done():
                    admission.future.set_exception(dead)

    def _decode_loop(self) -> None:
        torch.set_num_threads(self._threads)  # the creating thread's setting (thread-local under OpenMP)
        while True:
            with self._lock:
                while not self._waiting and not self._rows and not self._prefills:
                    self._lock.wait()
                self._joining = joining = self._admit()
            with torch.inference_mode():
                for admission in joining:
                    try:
                        self._join(admission)
                    except Exception as error:  # a bad request fails alone; the batch carries on
                        self._prefill_failed(admission, error)
                self._joining = []
                if self._prefills:  # one chunk of the oldest long prompt, then one step for the running rows
                    prefill = self._prefills[0]
                    try:
                        if self._prefill_chunk(prefill):
                            self._prefills.popleft()
                            self._merge(prefill)
                    except Exception as error:
                        self._prefills.popleft()
                        self._prefill_failed(prefill.admission, error)
                try:
                    self._step()
                except Exception as error:  # a failed step fails every request in it
                    log.exception("raylign: decode step failed")
                    for admission in {id(r.admission): r.admission for r in self._rows}.values():
                        if not admission.future.done():
                            admission.future.set_exception(error)
                    self._reset()

    @staticmethod
    def _prefill_failed(admission: _Admission, error: Exception) -> None:
        log.warning("raylign: prefill failed: %r", error)
        if not admission.future.done():
            admission.future.set_exception(error)

    def _admit(self) -> list[_Admission]:
        """Waiting admissions that fit, first come first served (one too big for `max_rows` joins an
        empty batch alone). Rows of requests that are gone (cancelled, past their deadline) take no room."""
        live = len(self._rows) + sum(len(p.rows) for p in self._prefills)
        joining = []
        now = time.monotonic()
        while self._waiting:
            rows = sum(not job.gone(now) for job in self._row_jobs(self._waiting[0]))
            if live and live + rows > self.max_rows:
                break
            live += rows
            joining.append(self._waiting.popleft())
        return joining

    @staticmethod
    def _row_jobs(admission: _Admission) -> list[Job]:
        return [admission.jobs[row.job] for row in admission.rows]

    def _drop_gone(self, admission: _Admission) -> list[_Row]:
        """Finish, without prefill, the rows of `admission` whose request is gone; the rows left."""
        now = time.monotonic()
        gone: dict[int, list[RowUpdate]] = {}
        live = []
        for row in admission.rows:
            if admission.jobs[row.job].gone(now):
                row.finish = "cancelled"
                admission.open_rows -= 1
                gone.setdefault(row.job, []).append(RowUpdate(row.index, "", "cancelled", 0))
            else:
                live.append(row)
        self._emit(admission, gone)
        if not live and not admission.future.done():
            admission.future.set_result(admission.result())
        return live

    @staticmethod
    def _emit(admission: _Admission, updates: dict[int, list[RowUpdate]]) -> None:
        if updates and admission.emit is not None:
            try:
                admission.emit(updates)
            except Exception:  # noqa: BLE001 - its listener is gone: nothing left to tell
                admission.emit = None

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._logits, self._sampler = [], None, None, None, None

    def _running(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The running batch's KV cache, attention mask and next-token logits (set while rows are live)."""
        if self._cache is None or self._mask is None or self._logits is None:
            raise RuntimeError("no running batch")
        return self._cache, self._mask, self._logits

    def _join(self, admission: _Admission) -> None:
        """Prefill `admission`'s live rows and merge them into the running batch; a long prompt while
        rows are running is only started here, and prefilled a chunk per step (`prefill_chunk`)."""
        rows = self._drop_gone(admission)
        if not rows:
            return
        prefill = self._prefill([row.prompt for row in rows], share_head=not any(row.echo for row in rows))
        prefill.admission, prefill.rows = admission, rows
        chunked = self.prefill_chunk > 0 and (self._rows or self._prefills)
        if chunked and prefill.ids.numel() > self.prefill_chunk:
            self._prefills.append(prefill)
            return
        self._prefill_chunk(prefill, everything=True)
        self._merge(prefill)

    def _prefill(self, prompts: list[list[int]], share_head: bool = True) -> _Prefill:
        """The prefill of `prompts` set up (their shared head's KV taken or computed once): the tails,
        left-padded, to run through the model."""
        shared, head_kv = self._shared_head(prompts) if share_head else (0, [])
        tails = [p[shared:] for p in prompts]
        enc = self.tokenizer.pad({"input_ids": tails}, padding=True, return_tensors="pt")
        rows = len(prompts)
        mask = torch.cat([torch.ones(rows, shared, dtype=torch.long), enc["attention_mask"]], dim=1).to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # a token's position: real tokens before it
        cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                             for k, v in head_kv]) if shared else DynamicCache()
        return _Prefill(enc["input_ids"].to(self.device), mask, positions, cache, shared,
                        [len(t) for t in tails])

    def _prefill_chunk(self, prefill: _Prefill, everything: bool = False) -> bool:
        """Run the next `prefill_chunk` prompt tokens of `prefill` (all of them if `everything`) through
        the model, scoring the prompt tokens of rows that asked for `echo`; True once it is done. A
        prefill whose requests are all gone is dropped (its rows finished as cancelled)."""
        rows = prefill.rows
        if not everything and all(prefill.admission.jobs[row.job].gone(time.monotonic()) for row in rows):
            self._finish_rows(prefill.admission, rows, "cancelled")
            prefill.rows = []
            return True
        width = prefill.ids.shape[1]
        start = prefill.done
        end = width if everything else min(width, start + max(1, self.prefill_chunk // len(rows)))
        scoring = [i for i, row in enumerate(rows) if row.echo]
        logits = self.model(input_ids=prefill.ids[:, start:end], attention_mask=prefill.mask[:, :prefill.shared + end],
                            position_ids=prefill.positions[:, start:end], use_cache=True,
                            logits_to_keep=0 if scoring else 1, **{self._cache_arg: prefill.cache}).logits
        for i in scoring:
            self._score_prompt(prefill, i, logits[i], start, end)
        prefill.logits = logits[:, -1].float()
        prefill.done = end
        return end == width

    def _score_prompt(self, prefill: _Prefill, i: int, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-prob entries of row `i`'s prompt tokens in columns [start, end) (its first token has none):
        column c is predicted by the logits of column c - 1, the last one of the previous chunk for c = start."""
        row = prefill.rows[i]
        first = prefill.ids.shape[1] - prefill.lengths[i]  # the column of its first real token
        if row.prompt_logprobs is None:
            row.prompt_logprobs = [(row.prompt[0], None, ())]
        if prefill.logits is not None:
            logits = torch.cat([prefill.logits[i:i + 1].to(logits.dtype), logits[:-1]])  # predicts columns start..end-1
        else:
            logits = logits[:-1]  # predicts columns start+1..end-1 (start = 0)
        lo = max(start, first + 1)
        if lo >= end:
            return
        offset = lo - (start if prefill.logits is not None else start + 1)
        top = row.top or 0
        targets = prefill.ids[i, lo:end].cpu()
        chosen, values, ids = token_logprobs(logits[offset:], targets, torch.full((end - lo,), row.temperature), top)
        row.prompt_logprobs.extend(logprob_entries(targets, chosen, values, ids, top))

    def _finish_rows(self, admission: _Admission, rows: list[_Row], reason: str) -> None:
        """End `rows` of `admission` without generating (cancelled, or echo with max_tokens 0) and tell it."""
        updates: dict[int, list[RowUpdate]] = {}
        for row in rows:
            row.finish = reason
            admission.open_rows -= 1
            update = self._progress.pending_update(row)
            if update is not None:
                updates.setdefault(row.job, []).append(update)
        self._emit(admission, updates)
        if admission.open_rows == 0 and not admission.future.done():
            admission.future.set_result(admission.result())

    def _merge(self, prefill: _Prefill) -> None:
        """Put a finished prefill's rows into the running batch (rows asking for no tokens end here)."""
        rows = prefill.rows
        if not rows or prefill.logits is None:
            return
        self._finish_rows(prefill.admission, [row for row in rows if row.max_tokens == 0], "length")
        keep = [i for i, row in enumerate(rows) if row.max_tokens > 0]
        if not keep:
            return
        kv, mask, logits = cache_tensors(prefill.cache), prefill.mask, prefill.logits
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            kv = [(k[index], v[index]) for k, v in kv]
            mask, logits = mask[index], logits[index]
        if self._rows:  # both sides padded on the left to a common length, then stacked
            cache, running_mask, running_logits = self._running()
            length = max(mask.shape[1], running_mask.shape[1])
            old_kv, old_mask = left_pad(cache_tensors(cache), running_mask, length)
            kv, mask = left_pad(kv, mask, length)
            kv = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(old_kv, kv, strict=True)]
            mask = torch.cat([old_mask, mask])
            logits = torch.cat([running_logits, logits])
        self._cache = DynamicCache(ddp_cache_data=kv)
        self._mask, self._logits = mask, logits
        self._rows = self._rows + [rows[i] for i in keep]
        self._sampler = None

    def _shared_head(self, prompts: list[list[int]]) -> tuple[int, KV]:
        """How many leading tokens every prompt shares (at least one token of each is left to prefill)
        and their KV: the kept head's, cut to length, when it covers them; else computed now and kept."""
        limit = min(len(p) for p in prompts) - 1
        if self._prefix is not None:
            ids, kv = self._prefix
            shared = min(common_prefix([ids, *prompts]), limit)
            if shared >= MIN_SHARED_PREFIX:
                return shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in kv]
        shared = min(common_prefix(prompts), limit) if len(prompts) > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            return 0, []
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([prompts[0][:shared]], device=self.device), use_cache=True,
                   logits_to_keep=1, **{self._cache_arg: cache})
        self._prefix = (prompts[0][:shared], cache_tensors(cache))
        return shared, self._prefix[1]

    def _step(self) -> None:
        """Sample every live row's next token, report it, retire finished rows, and run one decode
        forward pass for the rest."""
        rows = self._rows
        if not rows:
            return
        cache, mask, logits = self._running()
        if self._sampler is None:
            self._sampler = RowSampler([r.temperature for r in rows], [r.top_p for r in rows],
                                       [r.generator for r in rows])
        tokens = self._sampler.choose(logits)
        entries = self._logprobs(rows, logits, tokens)
        updates: dict[int, dict[int, list[RowUpdate]]] = {}
        admissions: dict[int, _Admission] = {}
        now = time.monotonic()
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            admission = row.admission
            admissions[id(admission)] = admission
            update = self._progress.advance(row, token, admission.jobs[row.job].gone(now), entries.get(i))
            if update is not None:
                updates.setdefault(id(admission), {}).setdefault(row.job, []).append(update)
            if row.finish is not None:
                admission.open_rows -= 1
        for key, admission in admissions.items():
            admission.steps += 1
            admission.peak_rows = max(admission.peak_rows, len(rows))
            if admission.emit is not None and key in updates:
                try:
                    admission.emit(updates[key])
                except Exception as error:  # its consumer is gone (e.g. a closed event loop): stop its rows
                    log.debug("raylign: dropping a batch whose listener failed: %r", error)
                    admission.emit = None
                    for job in admission.jobs:
                        job.cancel()
            if admission.open_rows == 0:
                admission.future.set_result(admission.result())
        keep = [i for i, row in enumerate(rows) if row.finish is None]
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask, tokens = mask[index], tokens[keep]
            self._rows = [rows[i] for i in keep]
            self._sampler = None
            mask = self._trim(cache, mask)
        positions = mask.sum(-1, keepdim=True)
        self._mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        self._logits = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=self._mask,
                                  position_ids=positions, use_cache=True,
                                  **{self._cache_arg: cache}).logits[:, -1].float()

    @staticmethod
    def _logprobs(rows: list[_Row], logits: torch.Tensor, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """The log-prob entry of each chosen token, {row position: entry}, for the rows that ask for them."""
        asking = [i for i, row in enumerate(rows) if row.top is not None]
        if not asking:
            return {}
        index = torch.tensor(asking)
        top = max(rows[i].top or 0 for i in asking)
        chosen, values, ids = token_logprobs(logits[index.to(logits.device)], tokens[index.to(tokens.device)],
                                             torch.tensor([rows[i].temperature for i in asking]), top)
        return {i: logprob_entries(tokens[i:i + 1], chosen[k:k + 1], values[k:k + 1], ids[k:k + 1], rows[i].top or 0)[0]
                for k, i in enumerate(asking)}

    @staticmethod
    def _trim(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        """Cut the leading cache columns that no live row uses (left by rows that have left); the
        mask without them."""
        unused = int((mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            mask = mask[:, unused:]
            for layer in kv_layers(cache):
                keys, values = layer_kv(layer)
                layer.keys, layer.values = keys[:, :, unused:], values[:, :, unused:]
        return mask
