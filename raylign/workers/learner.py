"""LearnerWorker: one rank of a data-parallel group that holds a model and its optimizer.

Two strategies (`resources.learner_strategy`): `ddp` (every rank holds the whole model and optimizer,
torch DDP averages gradients) and `fsdp` (PyTorch FSDP2: parameters, gradients and optimizer state
sharded across the ranks, see `raylign.workers.fsdp`). Both give the update of one big batch.
"""

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
from raylign.config import ConfigError, RunConfig, as_section
from raylign.rundir import LEARNER_INFO, MODEL_DIR, OPTIMIZER_STATE, RNG_STATE, TRAINABLE_WEIGHTS
from raylign.runtime import (
    NonFiniteError,
    Purpose,
    cpu_threads,
    derive_seed,
    quiet_libraries,
    seed_everything,
)
from raylign.storage import ActorInput, ActorOutput, Delivered, Handoff, Source
from raylign.workers import fsdp
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
    if n == 0:  # an evaluation chunk smaller than the group leaves some rank an empty shard
        return []
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


def stand_in_batch(shard: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A one-row micro-batch shaped like `shard`'s rows (all zeros but one scored token), for a rank
    whose shard is empty to run the passes FSDP needs it to take part in; its result is dropped."""
    mb = {k: np.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in shard.items()}
    for key in ("attention_mask", "loss_mask"):
        if key in mb:
            mb[key][..., :] = 1
    return {k: torch.tensor(v) for k, v in mb.items()}


class LearnerWorker:
    """Holds the trainable model; trains with torch DDP or FSDP2 across the group (gloo on CPU, nccl on GPU)."""

    def __init__(self, rank: int, world_size: int, num_cpus: float, config: RunConfig | dict[str, Any],
                 objective: str):
        torch.set_num_threads(cpu_threads(num_cpus))
        quiet_libraries()
        from raylign.models import load_causal_lm, load_scalar_model, load_value_model  # actor process only

        self.rank, self.world_size = rank, world_size
        self.config = as_section(RunConfig, config)
        self.sharded = self.config.resources.learner_strategy == "fsdp"
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
        # fsdp: rank 0's memory-free unsharded copy, filled with the gathered weights to save HF dirs.
        self.template: torch.nn.Module | None = None
        self.memory: dict[str, int] = {}  # sharded_bytes after the last optimizer step
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
        for mb, real in self._lockstep(micro_batches(shard, self.config.train.micro_batch_size, sort=False), shard):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            ids, mask = (mb[k].reshape(-1, mb[k].shape[-1]) for k in ("input_ids", "loss_mask"))
            logps = self._reference_fn(ids, mask).view(-1, 2).cpu().numpy()
            if real:
                out.append(logps)
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)

    # ---- online RL: per-token log-probs, values, weights for the rollout workers ------------------
    def _per_token(self, shard: dict[str, np.ndarray], fn) -> np.ndarray:
        """fn(ids, start) -> [b, t - start] outputs for tokens start..t-1 of a micro-batch, gathered into
        one [B, T] array aligned with input_ids (zero before each micro-batch's response start), in the
        shard's row order."""
        out = np.zeros(shard["input_ids"].shape, dtype=np.float32)
        row = 0
        for mb, real in self._lockstep(micro_batches(shard, self.config.train.micro_batch_size, sort=False), shard):
            ids, start = mb["input_ids"].to(self.device), response_start(mb["loss_mask"])
            values = fn(ids, start)
            if not real:
                continue
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
        """The trainable weights as numpy (only the LoRA adapter under LoRA), for one `ray.put` a step.

        Under fsdp a collective: every rank must call it; rank 0 gets the gathered weights, the
        others {}."""
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
        """ddp: a process group and the DDP wrapper (none for one learner). fsdp: a process group even
        for one learner (its checkpoints must load on any count, and vice versa), then the model, and
        the reference if there is one, sharded block by block."""
        if self.sharded:
            fsdp.init_process_group(self.rank, self.world_size, master_addr, master_port, self.device)
            if self.rank == 0:
                self.template = fsdp.meta_copy(self.model)
            mesh = fsdp.device_mesh(self.device)
            # Every rank loaded the same weights (one seed, one path), so every shard is cut from one model.
            self.model = fsdp.shard_model(self.model, mesh, fsdp.mixed_precision(self.model, self.device))
            if self.reference is not None:
                fsdp.shard_model(self.reference, mesh, fsdp.mixed_precision(self.reference, self.device), frozen=True)
            self.ddp_model = self.model
            return
        if self.world_size == 1:
            return
        fsdp.init_process_group(self.rank, self.world_size, master_addr, master_port, self.device)
        # DDP broadcasts rank 0's parameters, so every rank starts from the same weights.
        self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model)

    def _lockstep(self, mbs: list[dict[str, torch.Tensor]],
                  shard: dict[str, np.ndarray]) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """`mbs` marked real, then (fsdp with several ranks) stand-ins up to the group's largest count:
        every FSDP forward/backward is a collective, so all ranks run as many as the busiest one."""
        marked = [(mb, True) for mb in mbs]
        if not self.sharded or self.world_size == 1:
            return marked
        extra = fsdp.lockstep_count(len(mbs), self.device) - len(mbs)
        stand_in = mbs[-1] if mbs else stand_in_batch(shard)
        return marked + [(stand_in, False)] * extra

    def setup_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        t = self.config.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for the whole update (TRL's default too); falls back where unsupported
        # (and under fsdp on CPU, where the fused kernel takes no DTensor shards).
        try:
            if self.sharded and self.device.type == "cpu":
                raise TypeError("no fused AdamW for DTensors on CPU")
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

        Loss = Σ unit losses / global_units; DDP (and FSDP's reduce-scatter) average gradients over
        ranks, so each rank scales by world_size to turn that average back into the global sum. Under
        fsdp a rank with fewer micro-batches also runs stand-in passes whose loss counts zero times.
        """
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        mbs = self._lockstep(micro_batches(shard, self.config.train.micro_batch_size), shard)
        scale = self.world_size / max(global_units, 1.0)
        ddp = self.world_size > 1 and not self.sharded  # then setup_distributed wrapped the model in DDP
        for i, (mb, real) in enumerate(mbs):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            last = i == len(mbs) - 1
            fsdp.set_gradient_sync(self.model, last)
            sync = cast(DistributedDataParallel, self.ddp_model).no_sync() if (ddp and not last) else nullcontext()
            with sync:
                loss_sum, mb_sums = self.objective(self.ddp_model, mb, self._ref_fn(), **(hparams or {}))
                (loss_sum * (scale if real else 0.0)).backward()
            if not real:
                continue
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
        # Under fsdp the gradients are DTensor shards: the norm is the global one, a DTensor itself.
        grad_norm = fsdp.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm
                                  else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        bad = first_nonfinite({**sums, "grad_norm": grad_norm})
        if bad is not None and self.config.train.on_nonfinite == "stop":
            value = grad_norm if bad == "grad_norm" else sums[bad]
            raise NonFiniteError(f"{bad} is {value} on learner {self.rank}")
        if bad is None:
            self.optimizer.step()
        self.memory = fsdp.sharded_bytes(self.model, self.optimizer)  # gradients still held, for memory_bytes
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        sums["grad_norm"] = grad_norm
        sums["lr"] = cast(float, self.scheduler.get_last_lr()[0])  # a float (AdamW's lr); torch allows a Tensor
        sums["skipped_step"] = float(bad is not None)
        return sums

    def memory_bytes(self) -> dict[str, int]:
        """`fsdp.sharded_bytes` of this rank (parameters, gradients, optimizer state) as the last
        optimizer step left them, gradients included; {} before the first step."""
        return dict(self.memory)

    def check_weights_finite(self) -> None:
        """Refuse to write non-finite weights anywhere (checkpoints, final/). Under fsdp each rank checks
        its shards and all agree, so that no rank goes on into a collective the others left."""
        bad = [n for n, p in self.model.named_parameters()
               if p.requires_grad and not torch.isfinite(fsdp.local_tensor(p)).all()]
        if (fsdp.any_rank(bool(bad), self.device) if self.sharded and self.world_size > 1 else bool(bad)):
            where = f"e.g. {bad[0]}" if bad else "on another learner"
            raise NonFiniteError(f"trainable tensor(s) hold NaN/inf ({where}); nothing was saved")

    @torch.no_grad()
    def eval_step(self, shard: dict[str, np.ndarray]) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, float] = {}
        for mb, real in self._lockstep(micro_batches(shard, self.config.train.micro_batch_size), shard):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            _, mb_sums = self.objective(self.model, mb, self._ref_fn())
            if not real:
                continue
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + v
        return sums

    def _ref_fn(self):
        return self._reference_fn if self.needs_reference else None

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, whole, on CPU. Under fsdp gathered onto rank 0 (a collective; the
        other ranks get {})."""
        if self.sharded:
            return fsdp.full_state_dict(self.model, trainable_only=True)
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _gathered_model(self) -> torch.nn.Module | None:
        """fsdp: the whole model gathered into rank 0's unsharded copy (a collective; None elsewhere)."""
        state = fsdp.full_state_dict(self.model)
        if self.rank != 0:
            return None
        assert self.template is not None, "setup_distributed first"
        return fsdp.materialize(self.template, state, self.model)

    def _release_gathered(self) -> None:
        if self.template is not None:
            self.template.to("meta")  # back to holding no memory

    def save_checkpoint(self, path: str, with_model_dir: bool = True, handoff: Handoff | None = None) -> Delivered | None:
        """Rank 0 writes: HF model dir, trainable weights, optimizer/scheduler state, RNG state; into
        `path` on the driver's node, or a node-local dir that `handoff` carries there (raylign.storage).
        Under fsdp every rank writes its shards (`_save_sharded_checkpoint`)."""
        if self.sharded:
            return self._save_sharded_checkpoint(path, with_model_dir, handoff)
        if self.rank != 0:
            return None
        self.check_weights_finite()
        writer = ActorOutput(handoff or Handoff(path))
        with writer as out:
            out.mkdir(parents=True, exist_ok=True)
            self._write_checkpoint(out, with_model_dir)
        return writer.delivered

    def _write_checkpoint(self, out: Path, with_model_dir: bool) -> None:
        """Rank 0's checkpoint files into `out` (a subclass adds its own after these)."""
        from raylign.models import save_model

        if with_model_dir:
            save_model(self.model, self.tokenizer, out / MODEL_DIR, merge_lora=True)
        save_file(self.trainable_state(), str(out / TRAINABLE_WEIGHTS))
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            out / OPTIMIZER_STATE,
        )
        torch.save({"torch": torch.get_rng_state()}, out / RNG_STATE)
        (out / LEARNER_INFO).write_text(json.dumps({"world_size": self.world_size, "strategy": "ddp"}))

    def _save_sharded_checkpoint(self, path: str, with_model_dir: bool, handoff: Handoff | None) -> Delivered | None:
        """fsdp, on every rank: DCP shards of the trainable weights and the optimizer state in
        `sharded/` (rank r writes its own files, rank 0 also the index), and from rank 0 the gathered HF
        model dir, the scheduler and RNG state. Off the driver's node each rank delivers its own files
        (distinct names), which together make the directory."""
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        self.check_weights_finite()
        model = self._gathered_model() if with_model_dir else None
        try:
            writer = ActorOutput(handoff or Handoff(path))
            with writer as out:
                out.mkdir(parents=True, exist_ok=True)
                fsdp.save_sharded(out / fsdp.SHARDED_STATE, self.model, self.optimizer)
                if self.rank == 0:
                    from raylign.models import save_model

                    if model is not None:
                        save_model(model, self.tokenizer, out / MODEL_DIR, merge_lora=True)
                    torch.save({"scheduler": self.scheduler.state_dict()}, out / OPTIMIZER_STATE)
                    torch.save({"torch": torch.get_rng_state()}, out / RNG_STATE)
                    (out / LEARNER_INFO).write_text(json.dumps({"world_size": self.world_size, "strategy": "fsdp"}))
        finally:
            self._release_gathered()
        return writer.delivered

    def _check_strategy(self, src: Path) -> None:
        info = json.loads((src / LEARNER_INFO).read_text()) if (src / LEARNER_INFO).is_file() else {}
        saved = info.get("strategy", "ddp")  # checkpoints from before fsdp existed are ddp's
        if saved != self.config.resources.learner_strategy:
            raise ConfigError(
                f"the checkpoint {src} was written with resources.learner_strategy={saved}; resume with "
                f"resources.learner_strategy={saved} (any resources.learners), or start a new run")

    def load_checkpoint(self, path: str, source: Source | None = None) -> None:
        """From `path` on the driver's node, or the node-local copy `source` gives (raylign.storage).
        Under fsdp (a collective) a checkpoint written by any number of learners."""
        with ActorInput(source or Source(path)) as src:
            self._check_strategy(src)
            assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
            if self.sharded:
                fsdp.load_sharded(src / fsdp.SHARDED_STATE, self.model, self.optimizer)
                self.scheduler.load_state_dict(torch.load(src / OPTIMIZER_STATE, weights_only=True)["scheduler"])
                torch.set_rng_state(torch.load(src / RNG_STATE, weights_only=True)["torch"])
                return
            self._read_checkpoint(src)

    def _read_checkpoint(self, src: Path) -> None:
        """What `_write_checkpoint` wrote, from a local directory (a subclass reads its own files too)."""
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

    def save_final(self, path: str, handoff: Handoff | None = None) -> Delivered | None:
        """Rank 0 writes `final/` (a plain HF model dir) at `path`, or for `handoff` to carry there.
        Under fsdp every rank takes part in gathering the weights into rank 0's unsharded copy."""
        self.check_weights_finite()
        model = self._gathered_model() if self.sharded else self.model
        if self.rank != 0:
            return None
        assert model is not None
        try:
            writer = ActorOutput(handoff or Handoff(path))
            with writer as out:
                self._write_final(model, out)
        finally:
            self._release_gathered()
        return writer.delivered

    def _write_final(self, model: torch.nn.Module, out: Path) -> None:
        """Rank 0's `final/` into `out`: the HF model directory (a subclass adds its own files after it)."""
        from raylign.models import save_model

        save_model(model, self.tokenizer, out, merge_lora=self.config.model.lora is None
                   or self.config.model.lora.merge_on_save)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
