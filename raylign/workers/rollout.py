"""RolloutWorker: holds a plain copy of the policy and samples completions for online RL.

Generation runs on a plain transformers model (no peft wrapper) at base-model speed. The learner's
weights arrive with `set_weights`: either a LoRA adapter, folded in as W = W0 + (α/r)·B·A from a
pristine copy of the base weight W0, or plain (full fine-tuning) weights copied in. `generate`
returns token ids, the log-probabilities the tokens were sampled with, and which rows ended with EOS.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import numpy as np
import peft
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from raylign.config import ModelConfig, RolloutConfig, as_section
from raylign.models.hf import cache_argument
from raylign.models.lora import is_lora_weight, lora_merge_deltas, plain_param_name, uses_conv1d
from raylign.runtime import Purpose, cpu_threads, derive_seed, quiet_libraries


@torch.no_grad()
def sample_batch(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_samples: int,
                 cfg: RolloutConfig, eos_ids: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `n_samples` continuations of each left-padded prompt row: (tokens, logprobs), [rows·n, L].

    A plain KV-cache decode loop instead of `model.generate`: each prompt is prefilled once and its
    cache repeated n times, and a step is one forward call plus sampling, without generate's per-token
    machinery (which costs more than the forward pass of a small model on a CPU). logprobs are
    log_softmax(logits / T)[y_t] of the untruncated temperature-scaled distribution (T = 1 when greedy),
    what the learner recomputes; top-k and top-p (transformers' own warpers) only shape the sampling.
    Rows that emitted an EOS continue with `pad_id`; the loop stops when every row has, or at L.
    """
    greedy = cfg.temperature == 0
    temperature = 1.0 if greedy else cfg.temperature
    warpers: list[TopKLogitsWarper | TopPLogitsWarper] = []
    if not greedy and cfg.top_k > 0:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if not greedy and cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Left padding: a real token's position is the number of real tokens before it.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    kv = {cache_argument(model): cache}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=True, logits_to_keep=1, **kv).logits[:, -1]
    cache.batch_repeat_interleave(n_samples)
    logits = logits.repeat_interleave(n_samples, dim=0)
    attention_mask = attention_mask.repeat_interleave(n_samples, dim=0)
    position = attention_mask.sum(-1, keepdim=True)
    eos = torch.as_tensor(eos_ids, device=device)
    done = torch.zeros(len(logits), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(cfg.max_new_tokens):
        scores = logits.float() / temperature
        logp = torch.log_softmax(scores, dim=-1)
        if greedy:
            token = scores.argmax(-1, keepdim=True)
        else:
            for warp in warpers:
                scores = warp(None, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1)
        token = token.masked_fill(done[:, None], pad_id)
        tokens.append(token)
        logprobs.append(logp.gather(1, token))
        done |= torch.isin(token[:, 0], eos)
        if done.all() or step == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        logits = model(input_ids=token, attention_mask=attention_mask, position_ids=position,
                       use_cache=True, **kv).logits[:, -1]
        position = position + 1
    return torch.cat(tokens, dim=1).cpu(), torch.cat(logprobs, dim=1).cpu()


def cut_at_eos(tokens: np.ndarray, eos_ids: np.ndarray) -> tuple[int, bool]:
    """(length up to and including the first EOS, whether there was one)."""
    hits = np.flatnonzero(np.isin(tokens, eos_ids))
    return (int(hits[0]) + 1, True) if len(hits) else (len(tokens), False)


class RolloutWorker:
    """One sampler: a plain causal LM, the learner's latest weights merged in, batched generation."""

    def __init__(self, rank: int, world_size: int, num_cpus: float, model: ModelConfig | dict[str, Any], seed: int = 0,
                 apply_chat_template: bool = True, reference: bool = False):
        torch.set_num_threads(cpu_threads(num_cpus))
        quiet_libraries()
        from raylign.models import is_peft_model, load_causal_lm

        self.rank = rank
        self.seed = seed
        self.apply_chat_template = apply_chat_template
        cfg = as_section(ModelConfig, model)
        # The base model, never wrapped: adapters are merged into its weights instead.
        net, self.tokenizer = load_causal_lm(cfg.model_copy(update={"lora": None, "gradient_checkpointing": False}))
        self.lora_scaling = cfg.lora.alpha / cfg.lora.r if cfg.lora is not None else None
        saved_adapter: dict[str, torch.Tensor] = {}
        if is_peft_model(net):  # a saved adapter directory: its base is W0, the adapter its first weights
            peft_cfg = net.peft_config[net.active_adapter]
            assert isinstance(peft_cfg, peft.LoraConfig), f"not a LoRA adapter: {type(peft_cfg).__name__}"
            self.lora_scaling = peft_cfg.lora_alpha / (math.sqrt(peft_cfg.r) if peft_cfg.use_rslora else peft_cfg.r)
            saved_adapter = {n: p.detach().clone() for n, p in net.named_parameters() if is_lora_weight(n)}
            net = net.unload()  # removes the adapter layers without merging: the pristine base
        # Ray shows an actor only the GPUs it reserved (resources.gpus_per_rollout_worker); none -> CPU.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = net.to(self.device).eval().requires_grad_(False)
        # rollout.reference_on_workers: the frozen initial model (the base under LoRA), copied before any
        # weights are merged in, scores the samples as the learner's reference would.
        self.reference = copy.deepcopy(self.model) if reference else None
        self.fan_in_fan_out = uses_conv1d(self.model)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        self.eos_ids = self._eos_ids()
        # Every parameter and buffer by name, tied aliases included (GPT-2's lm_head.weight is wte's).
        self.params: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        self.params |= dict(self.model.named_buffers(remove_duplicate=False))
        self.pristine: dict[str, torch.Tensor] = {}  # W0 of every weight a LoRA merge has touched
        self.merged: set[str] = set()  # weights that currently hold W0 + ΔW
        self.version = -1  # the base weights
        if saved_adapter:
            self.set_weights(saved_adapter, -1)

    def _eos_ids(self) -> np.ndarray:
        """The tokenizer's EOS and every EOS id of the generation config (chat models list end-of-turn)."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, list) else {configured}
        return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_weights(self, weights: dict[str, Any], version: int) -> None:
        """Load the learner's weights as `version`.

        LoRA adapter weights (peft names `...lora_A.<adapter>.weight` / `lora_B`) set every adapted
        weight to W0 + (α/r)·B·A, computed from the pristine base weight W0, so no merge/unmerge
        rounding ever accumulates and any worker given the same adapter holds bit-identical weights;
        weights merged before but absent from this adapter return to W0. Other names (plain or peft
        names, `base_model.model.` and `.base_layer` removed) are copied in, like
        `load_state_dict(strict=False)`. Values are numpy arrays or tensors.
        """
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; these tensors are only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {name: torch.as_tensor(value) for name, value in weights.items()}
        adapter = {n: t for n, t in tensors.items() if is_lora_weight(n)}
        plain = {plain_param_name(n): t for n, t in tensors.items() if n not in adapter}
        deltas: dict[str, torch.Tensor] = {}
        if adapter:
            if self.lora_scaling is None:
                raise ValueError("got LoRA adapter weights, but the model config has no `lora` section (α and r)")
            deltas = lora_merge_deltas(adapter, self.lora_scaling, self.fan_in_fan_out)
        self._check_names(deltas, plain)
        for name in self.merged - set(deltas):
            self.params[name].copy_(self.pristine[name])
        for name, delta in deltas.items():
            param = self.params[name]
            w0 = self.pristine.setdefault(name, param.detach().clone())  # first touch: still pristine
            param.copy_((w0.float() + delta.to(w0.device)).to(param.dtype))
        self.merged = set(deltas)
        for name, value in plain.items():
            self.params[name].copy_(value.to(self.params[name].device, self.params[name].dtype))
        self.version = version

    def _check_names(self, deltas: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(deltas) - set(self.params) | set(plain) - set(self.params))
        if unknown:
            raise ValueError(f"{len(unknown)} weight names are not in the model, e.g. {unknown[:3]}; "
                             f"it has e.g. {sorted(self.params)[:3]}")
        for name, value in (deltas | plain).items():
            if value.shape != self.params[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != model's {tuple(self.params[name].shape)}")

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[Any], sampling: RolloutConfig | dict[str, Any], seed: int, *, step: int = 0,
                 purpose: Purpose = Purpose.SAMPLE, first_index: int = 0, weights: Any = None,
                 version: int | None = None, reference: bool = False) -> dict[str, Any]:
        """Sample `n_samples` completions per prompt (string, chat messages, or token ids taken as they
        are) with the given weights.

        `weights` (with its `version`) is loaded first unless this worker already holds that version:
        the driver sends them with every call so that an actor Ray restarted reloads them before a
        retried call. Each chunk of `batch_size` prompts is seeded with `derive_seed(seed, purpose, step,
        first_index + its first prompt's index here)`: `first_index` is where `prompts` start in the
        caller's list (the step's prompts, a file), so the output depends only on the arguments. Rows are prompt-major (prompt i's samples contiguous):

        prompt_ids / response_ids (int64) / logprobs (float32): per row, the unpadded prompt, the
        generated tokens up to and including the first EOS, and log_softmax(logits / T) of each of
        them (T = temperature, 1 when greedy; top-p/top-k not applied); texts: decoded responses
        without special tokens; finished [rows] bool: ended with EOS rather than at max_new_tokens;
        prompt_index [rows]: index into `prompts`; version; seconds (wall time); tokens (response total);
        with `reference` (a worker built with `reference=True`), ref_logps: per row, log π_ref of each
        response token at the sampling temperature, as the learner's `rl_token_logps(reference=True)`.
        """
        if weights is not None and version != self.version:
            if version is None:
                raise ValueError("weights need a version")
            if not isinstance(weights, dict):  # an ObjectRef nested somewhere Ray did not resolve it
                import ray

                weights = ray.get(weights)
            self.set_weights(weights, version)
        cfg = as_section(RolloutConfig, sampling)
        start = time.perf_counter()
        out: dict[str, list] = {"prompt_ids": [], "response_ids": [], "logprobs": [], "finished": [],
                                "prompt_index": []}
        for first in range(0, len(prompts), cfg.batch_size):
            torch.manual_seed(derive_seed(seed, purpose, step, first_index + first))
            rows = self._generate_chunk(prompts[first : first + cfg.batch_size], cfg)
            for key, values in rows.items():
                out[key].extend(values)
            out["prompt_index"].extend(first + i // cfg.n_samples for i in range(len(rows["finished"])))
        texts = self.tokenizer.batch_decode(out["response_ids"], skip_special_tokens=True)
        if reference:
            if self.reference is None:
                raise ValueError("this rollout worker was built without a reference model (reference=True)")
            out["ref_logps"] = self._reference_logps(out["prompt_ids"], out["response_ids"], cfg)
        return {
            **out,
            "texts": [t.strip() for t in texts],
            "finished": np.array(out["finished"], dtype=bool),
            "prompt_index": np.array(out["prompt_index"], dtype=np.int64),
            "version": self.version,
            "seconds": time.perf_counter() - start,
            "tokens": int(sum(len(r) for r in out["response_ids"])),
        }

    @torch.no_grad()
    def _reference_logps(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray],
                         cfg: RolloutConfig) -> list[np.ndarray]:
        """log π_ref(response token | prefix) per row, computed as the learner does: right-padded
        prompt + response rows (no attention mask needed), logits at the sampling temperature."""
        from raylign.algorithms.logprobs import rl_logits, token_logps

        assert self.reference is not None, "generate() checks for the reference model before calling this"
        temperature = cfg.temperature or 1.0
        rows_per_call = cfg.batch_size * cfg.n_samples
        out: list[np.ndarray] = []
        for first in range(0, len(prompt_ids), rows_per_call):
            prompts, responses = prompt_ids[first : first + rows_per_call], response_ids[first : first + rows_per_call]
            rows = [np.concatenate([p, r]) for p, r in zip(prompts, responses, strict=True)]
            ids = torch.full((len(rows), max(len(r) for r in rows)), int(self.tokenizer.pad_token_id or 0))
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.from_numpy(row)
            start = max(min(len(p) for p in prompts), 1)
            ids = ids.to(self.device)
            logps = token_logps(rl_logits(self.reference, ids, temperature, start), ids[:, start:]).float().cpu()
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
                out.append(logps[i, len(p) - start : len(p) - start + len(r)].numpy().astype(np.float32))
        return out

    def _prompt_ids(self, prompt: Any) -> np.ndarray:
        """Token ids of a prompt: a string or chat messages go through the chat template; token ids
        (a sequence of ints, e.g. a prompt plus a response prefix for Monte-Carlo rollouts) are kept."""
        from raylign.data import format_prompt

        if isinstance(prompt, np.ndarray) or (isinstance(prompt, list | tuple) and prompt and
                                              all(isinstance(t, int | np.integer) for t in prompt)):
            return np.asarray(prompt, dtype=np.int64)
        text = format_prompt(prompt, self.tokenizer, self.apply_chat_template)
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def _generate_chunk(self, prompts: list[Any], cfg: RolloutConfig) -> dict[str, list]:
        """One batched decode (KV cache, left padding) over `prompts` x `n_samples`."""
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        enc = self.tokenizer.pad({"input_ids": [ids.tolist() for ids in prompt_ids]}, padding=True,
                                 return_tensors="pt")
        sampled, sampled_logprobs = sample_batch(self.model, enc["input_ids"], enc["attention_mask"], cfg.n_samples,
                                                 cfg, self.eos_ids, self.tokenizer.pad_token_id)
        responses, logprobs = sampled.numpy(), sampled_logprobs.numpy()
        rows: dict[str, list] = {"prompt_ids": [], "response_ids": [], "logprobs": [], "finished": []}
        for i, response in enumerate(responses):
            # After its EOS a row is padded; those columns are not part of the response.
            length, finished = cut_at_eos(response, self.eos_ids)
            rows["prompt_ids"].append(prompt_ids[i // cfg.n_samples])
            rows["response_ids"].append(response[:length].astype(np.int64))
            rows["logprobs"].append(logprobs[i, :length].astype(np.float32))
            rows["finished"].append(finished)
        return rows

    def generate_texts(self, prompts: list[Any], sampling: RolloutConfig | dict[str, Any], seed: int | None = None, *,
                       step: int = 0, purpose: Purpose = Purpose.SAMPLE, first_index: int = 0) -> list[list[str]]:
        """For each prompt, its `n_samples` completion texts (evaluation, quickstart, annotation)."""
        out = self.generate(prompts, sampling, self.seed if seed is None else seed, step=step, purpose=purpose,
                            first_index=first_index)
        n = as_section(RolloutConfig, sampling).n_samples
        return [out["texts"][i : i + n] for i in range(0, len(out["texts"]), n)]
