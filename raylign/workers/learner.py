"""LearnerWorker: one rank of a data-parallel group that holds a model and its optimizer."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler

from raylign.algorithms.logprobs import response_start, rl_logits, sequence_logps, token_logps
from raylign.config import RunConfig, as_section
from raylign.rundir import LEARNER_INFO, MODEL_DIR, OPTIMIZER_STATE, RNG_STATE, TRAINABLE_WEIGHTS
from raylign.runtime import (
    NonFiniteError,
    Purpose,
    cpu_threads,
    derive_seed,
    quiet_libraries,
    seed_everything,
)
from raylign.workers.objectives import (
    MODEL_KIND,
    NEEDS_REFERENCE,
    causal_logits,
    make_objective,
)

if TYPE_CHECKING:
    import peft
    from transformers import PreTrainedTokenizerBase

    from raylign.config import ModelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_nonfinite(values: dict[str, float]) -> str | None:
    """The name of the first NaN/inf value among a step's metric sums and gradient norm, or None."""
    return next((k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)), None)


def micro_batches(batch: dict[str, np.ndarray], size: int, sort: bool = True) -> list[dict[str, torch.Tensor]]:
    """Split a shard into micro-batches of similar length and cut each one's padding columns.

    The loss is normalised by the global unit count, so the grouping changes no gradient, only how
    much padding gets computed (right padding: a micro-batch of short rows ends early).
    """
    attn = batch["attention_mask"]
    n = len(attn)
    lengths = attn.reshape(n, -1, attn.shape[-1]).sum(-1).max(-1)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(n)
    out = []
    for i in range(0, n, size):
        idx = order[i : i + size]
        width = int(lengths[idx].max())
        mb = {}
        for key, value in batch.items():
            part = value[idx]
            if part.ndim == attn.ndim and part.shape[-1] == attn.shape[-1]:
                part = part[..., :width]
            mb[key] = torch.tensor(part)
        out.append(mb)
    return out


class LearnerWorker:
    """Holds the trainable model; trains with torch DDP across the group (gloo on CPU, nccl on GPU)."""

    def __init__(self, rank: int, world_size: int, num_cpus: float, config: RunConfig | dict[str, Any],
                 objective: str):
        torch.set_num_threads(cpu_threads(num_cpus))
        quiet_libraries()
        from raylign.models import load_causal_lm, load_scalar_model, load_value_model  # actor process only

        self.rank, self.world_size = rank, world_size
        self.config = as_section(RunConfig, config)
        self.objective = make_objective(objective, self.config)
        seed_everything(derive_seed(self.config.seed, Purpose.INIT))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaders: dict[str | None, Callable[[ModelConfig], tuple[torch.nn.Module, PreTrainedTokenizerBase]]] = {
            "scalar": load_scalar_model, "value": load_value_model}
        load = loaders.get(MODEL_KIND.get(objective), load_causal_lm)
        self.model, self.tokenizer = load(self.config.model)
        self.model.to(self.device)
        self.ddp_model: torch.nn.Module = self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: LRScheduler | None = None
        self.reference: torch.nn.Module | None = None
        self.needs_reference = objective in NEEDS_REFERENCE
        if self.needs_reference:
            self._load_reference()

    # ---- reference model -----------------------------------------------------------------------
    def _load_reference(self) -> None:
        """A frozen copy, except under LoRA with no separate reference: then the reference is the
        same network with its adapters switched off, which costs no memory."""
        from raylign.models import is_peft_model, load_causal_lm

        if self.config.reference is None and is_peft_model(self.model):
            return
        ref_cfg = self.config.reference or self.config.model.model_copy(
            update={"lora": None, "gradient_checkpointing": False})
        self.reference, _ = load_causal_lm(ref_cfg)
        self.reference.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def _reference_fn(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Right-padded batches need no attention mask (see objectives.causal_logits).
        if self.reference is not None:
            logits = causal_logits(self.reference, ids)
        else:
            # No separate reference only under LoRA (see _load_reference): the model is a peft model.
            with cast("peft.PeftModel", self.model).disable_adapter():
                logits = causal_logits(self.model, ids)
        return sequence_logps(logits, ids, mask)

    def compute_reference_logps(self, shard: dict[str, np.ndarray]) -> np.ndarray:
        """Reference log-probs of a pair batch [B, 2], for precomputing them in one pass."""
        self.model.eval()
        out = []
        # Unsorted: the results must come back in the shard's row order.
        for mb in micro_batches(shard, self.config.train.micro_batch_size, sort=False):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            ids, mask = (mb[k].reshape(-1, mb[k].shape[-1]) for k in ("input_ids", "loss_mask"))
            out.append(self._reference_fn(ids, mask).view(-1, 2).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)

    # ---- online RL: per-token log-probs, values, weights for the rollout workers ------------------
    def _per_token(self, shard: dict[str, np.ndarray], fn) -> np.ndarray:
        """fn(ids, start) -> [b, t - start] outputs for tokens start..t-1 of a micro-batch, gathered into
        one [B, T] array aligned with input_ids (zero before each micro-batch's response start), in the
        shard's row order."""
        out = np.zeros(shard["input_ids"].shape, dtype=np.float32)
        row = 0
        for mb in micro_batches(shard, self.config.train.micro_batch_size, sort=False):
            ids, start = mb["input_ids"].to(self.device), response_start(mb["loss_mask"])
            values = fn(ids, start)
            out[row : row + len(ids), start : ids.shape[1]] = values.float().cpu().numpy()
            row += len(ids)
        return out

    @torch.no_grad()
    def rl_token_logps(self, shard: dict[str, np.ndarray], reference: bool = False) -> np.ndarray:
        """log π(token t | prefix) at the sampling temperature for every token of the shard, [B, T];
        under the frozen reference when `reference` (adapters off under LoRA)."""
        self.model.eval()
        temperature = self.config.rollout.temperature or 1.0

        def logps(ids: torch.Tensor, start: int) -> torch.Tensor:
            if not reference:
                return token_logps(rl_logits(self.model, ids, temperature, start), ids[:, start:])
            if self.reference is not None:
                return token_logps(rl_logits(self.reference, ids, temperature, start), ids[:, start:])
            with cast("peft.PeftModel", self.model).disable_adapter():  # LoRA without a separate reference
                return token_logps(rl_logits(self.model, ids, temperature, start), ids[:, start:])

        return self._per_token(shard, logps)

    @torch.no_grad()
    def values(self, shard: dict[str, np.ndarray]) -> np.ndarray:
        """Critic values [B, T]: entry t is V of the state before token t."""
        self.model.eval()
        return self._per_token(shard, lambda ids, start: self.model(input_ids=ids).values[:, start - 1 : -1])

    def get_weights(self) -> dict[str, np.ndarray]:
        """The trainable weights as numpy (only the LoRA adapter under LoRA), for one `ray.put` a step."""
        return {k: v.float().numpy() for k, v in self.trainable_state().items()}

    def drop_reference(self) -> None:
        """After precomputing, the reference is not needed during training."""
        self.reference = None
        self.needs_reference = False

    # ---- distributed setup ---------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup_distributed(self, master_addr: str, master_port: int) -> None:
        if self.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank, world_size=self.world_size
        )
        # DDP broadcasts rank 0's parameters, so every rank starts from the same weights.
        self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model)

    def setup_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        t = self.config.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for the whole update (TRL's default too); falls back where unsupported.
        try:
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        name = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
        self.scheduler = get_scheduler(
            name, self.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max(total_steps, 1)
        )

    # ---- training ------------------------------------------------------------------------------
    def train_step(self, shard: dict[str, np.ndarray], global_units: float,
                   hparams: dict[str, float] | None = None) -> dict[str, float]:
        """One optimizer step over this rank's shard, split into micro-batches.

        Loss = Σ unit losses / global_units; DDP averages gradients over ranks, so each rank scales by
        world_size to turn that average back into the global sum.
        """
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        mbs = micro_batches(shard, self.config.train.micro_batch_size)
        scale = self.world_size / max(global_units, 1.0)
        for i, mb in enumerate(mbs):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            last = i == len(mbs) - 1
            # With several ranks, setup_distributed wrapped the model in DDP.
            sync = (cast(DistributedDataParallel, self.ddp_model).no_sync() if (self.world_size > 1 and not last)
                    else nullcontext())
            with sync:
                loss_sum, mb_sums = self.objective(self.ddp_model, mb, self._ref_fn(), **(hparams or {}))
                (loss_sum * scale).backward()
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + v
        return self.optimizer_step([p for p in self.model.parameters() if p.requires_grad], sums)

    def optimizer_step(self, params: Sequence[torch.Tensor], sums: dict[str, float]) -> dict[str, float]:
        """Clip, check and step: `sums` gains grad_norm, lr and skipped_step (1.0 when skipped).

        A NaN/inf among this rank's sums or the gradient norm (equal on every rank: DDP has averaged
        the gradients, so one rank's NaN reaches all) never reaches the weights: under
        `train.on_nonfinite=stop` it raises `NonFiniteError` (the driver adds the step), under
        `skip_step` the optimizer step is skipped and the scheduler still advances, so the learning-rate
        schedule stays tied to the step count."""
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        max_norm = self.config.train.max_grad_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm
                          else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        bad = first_nonfinite({**sums, "grad_norm": grad_norm})
        if bad is not None and self.config.train.on_nonfinite == "stop":
            value = grad_norm if bad == "grad_norm" else sums[bad]
            raise NonFiniteError(f"{bad} is {value} on learner {self.rank}")
        if bad is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        sums["grad_norm"] = grad_norm
        sums["lr"] = cast(float, self.scheduler.get_last_lr()[0])  # a float (AdamW's lr); torch allows a Tensor
        sums["skipped_step"] = float(bad is not None)
        return sums

    def check_weights_finite(self) -> None:
        """Refuse to write non-finite weights anywhere (checkpoints, final/)."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"{len(bad)} trainable tensor(s) hold NaN/inf (e.g. {bad[0]}); nothing was saved")

    @torch.no_grad()
    def eval_step(self, shard: dict[str, np.ndarray]) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, float] = {}
        for mb in micro_batches(shard, self.config.train.micro_batch_size):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            _, mb_sums = self.objective(self.model, mb, self._ref_fn())
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + v
        return sums

    def _ref_fn(self):
        return self._reference_fn if self.needs_reference else None

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, path: str, with_model_dir: bool = True) -> None:
        """Rank 0 writes: HF model dir, trainable weights, optimizer/scheduler state, RNG state."""
        if self.rank != 0:
            return
        from raylign.models import save_model

        self.check_weights_finite()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if with_model_dir:
            save_model(self.model, self.tokenizer, out / MODEL_DIR, merge_lora=True)
        save_file(self.trainable_state(), str(out / TRAINABLE_WEIGHTS))
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            out / OPTIMIZER_STATE,
        )
        torch.save({"torch": torch.get_rng_state()}, out / RNG_STATE)
        (out / LEARNER_INFO).write_text(json.dumps({"world_size": self.world_size}))

    def load_checkpoint(self, path: str) -> None:
        src = Path(path)
        state = load_file(str(src / TRAINABLE_WEIGHTS))
        missing = set(self.trainable_state()) - set(state)
        if missing:
            raise ValueError(f"checkpoint {src} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        self.model.load_state_dict(state, strict=False)
        opt = torch.load(src / OPTIMIZER_STATE, weights_only=True)
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(torch.load(src / RNG_STATE, weights_only=True)["torch"])

    def save_final(self, path: str) -> None:
        if self.rank == 0:
            from raylign.models import save_model

            self.check_weights_finite()
            save_model(self.model, self.tokenizer, Path(path), merge_lora=self.config.model.lora is None
                       or self.config.model.lora.merge_on_save)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
