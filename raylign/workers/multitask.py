"""MultiTaskLearner: one shared backbone, several tasks, one optimizer step from their weighted gradients.

Each step the learner takes a batch per active task, computes each task's mean loss L_i and its
gradient g_i on the shared (backbone) parameters by its own backward pass, and hands (L, g) to
`TaskWeighting` (static λ, uncertainty, GradNorm, PCGrad), which returns the update direction. Task
heads (the rating head) get their own task's gradient times the task's weight. With several learners
each rank's per-task gradient is all-reduced (gloo/NCCL) before combining, so every rank combines the
same global gradients and the update equals one big batch's.

Tasks:
- imitation: next-token NLL of human text (SFT), summed over tokens, divided by the step's tokens;
- preference: DPO/IPO/hinge (reference log-probs precomputed in the batch), SimPO or ORPO, per pair;
- rating: a linear head on the last hidden state of the last real token, regressing standardised
  ratings (MSE) or classifying K classes (cross-entropy), per example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from raylign.algorithms.task_weighting import TaskWeighting, cosine_matrix
from raylign.config import ConfigError, RunConfig, as_section
from raylign.data.batches import rating_sums
from raylign.models.heads import last_token_index
from raylign.models.hf import as_hf
from raylign.runtime import Purpose, derive_seed
from raylign.workers.learner import LearnerWorker, micro_batches
from raylign.workers.objectives import make_objective, sft_objective

REFERENCE_LOSSES = {"dpo", "ipo", "hinge"}
RATING_HEADS_DIR = "rating_heads"


def preference_objective_name(loss: str) -> tuple[str, Literal["sigmoid", "ipo", "hinge"] | None]:
    """Task loss -> (learner objective, preference.loss_type override)."""
    if loss in REFERENCE_LOSSES:
        # REFERENCE_LOSSES are DPO's loss types, with dpo's own named sigmoid.
        return "dpo", cast('Literal["sigmoid", "ipo", "hinge"]', {"dpo": "sigmoid"}.get(loss, loss))
    return loss, None


def _grad(p: torch.Tensor) -> torch.Tensor:
    """`p.grad` right after a backward pass through `p`."""
    assert p.grad is not None, "no gradient reached this parameter"
    return p.grad


class MultiTaskLearner(LearnerWorker):
    def __init__(self, rank: int, world_size: int, num_cpus: float, config: RunConfig | dict[str, Any],
                 objective: str = "multitask"):
        cfg = as_section(RunConfig, config)
        if cfg.resources.learner_strategy == "fsdp":
            # Task weighting reads and rewrites whole per-task gradients of the shared parameters
            # (GradNorm, PCGrad), which FSDP holds only as shards.
            raise ConfigError("multitask trains with resources.learner_strategy=ddp only; set "
                              "resources.learner_strategy=ddp (or train the tasks one by one with fsdp)")
        tasks = cfg.multitask.tasks
        needs_ref = any(t.type == "preference" and t.loss in REFERENCE_LOSSES for t in tasks.values())
        # The base class loads the causal LM (and a frozen reference when a DPO-like task needs one).
        super().__init__(rank, world_size, num_cpus, config, "dpo" if needs_ref else "sft")
        self.task_names = list(tasks)
        self.tasks = tasks
        self.objectives = {}
        for name, task in tasks.items():
            if task.type == "preference":
                objective_name, loss_type = preference_objective_name(task.loss)
                task_cfg = cfg.model_copy(deep=True)
                if loss_type:
                    task_cfg.preference.loss_type = loss_type
                self.objectives[name] = make_objective(objective_name, task_cfg)
        hidden = as_hf(self.model).config.get_text_config().hidden_size
        dtype = next(self.model.parameters()).dtype
        self.heads = nn.ModuleDict()
        for name, task in tasks.items():
            if task.type == "rating":
                outputs = task.num_classes if task.head == "classification" else 1
                assert outputs is not None, "TaskConfig requires num_classes for a classification head"
                head = nn.Linear(hidden, outputs, dtype=dtype)
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                self.heads[name] = head
        self.heads.to(self.device)
        m = cfg.multitask
        self.weighting = TaskWeighting(m.weighting, [t.weight for t in tasks.values()], m.gradnorm_alpha,
                                       m.weighting_lr, seed=derive_seed(cfg.seed, Purpose.TASK_WEIGHTING))
        self.rating_stats: dict[str, tuple[float, float]] = {}

    # ---- setup ---------------------------------------------------------------------------------
    def setup_distributed(self, master_addr: str, master_port: int) -> None:
        """A process group only: per-task gradients are all-reduced by hand (no DDP wrapper)."""
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size)
            for p in list(self.model.parameters()) + list(self.heads.parameters()):
                dist.broadcast(p.data, 0)

    def setup_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        t = self.config.train
        groups: list[dict[str, Any]] = [{"params": self.shared_params() + list(self.heads.parameters())}]
        if self.weighting.log_vars is not None:
            groups.append({"params": [self.weighting.log_vars], "lr": self.config.multitask.weighting_lr,
                           "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        name = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=max(total_steps, 1))

    def set_rating_stats(self, stats: dict[str, tuple[float, float]]) -> None:
        """(mean, std) of each rating task's training ratings, saved with the heads for scoring."""
        self.rating_stats = {k: (float(m), float(s)) for k, (m, s) in stats.items()}

    def shared_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- losses --------------------------------------------------------------------------------
    def _rating_forward(self, name: str, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                         output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        idx = last_token_index(mb["attention_mask"], hidden.shape[1], hidden.shape[0]).to(hidden.device)
        return self.heads[name](hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]).float()

    def _task_loss(self, name: str, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the micro-batch's units, metric sums) for one task."""
        task = self.tasks[name]
        if task.type == "imitation":
            return sft_objective(self.model, mb)
        if task.type == "preference":
            loss_sum, sums = self.objectives[name](self.model, mb, self._ref_fn())
            return loss_sum, sums
        pred = self._rating_forward(name, mb)
        target = mb["rating"].float()
        if task.head == "classification":
            losses = nn.functional.cross_entropy(pred, target.long(), reduction="none")
            return losses.sum(), rating_sums(losses, pred, target, classification=True)
        p = pred[:, 0]
        losses = (p - target) ** 2
        return losses.sum(), rating_sums(losses, p, target, classification=False)

    # ---- training ------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (NCCL needs the tensor on the GPU; the result comes back where it was)."""
        if self.world_size > 1:
            moved = t.to(self.device)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)
        return t

    def multitask_train_step(self, shards: dict[str, dict[str, np.ndarray]], units: dict[str, float],
                             active: dict[str, bool]) -> dict[str, Any]:
        """One optimizer step. `shards`: this rank's batch of each active task; `units`: each task's
        global unit count (tokens / pairs / examples); `active`: priority gates. Returns per-task
        metric sums (summed over ranks by the driver) and the per-rank-equal weights/cosines."""
        assert self.optimizer is not None and self.scheduler is not None, "setup_optimizer first"
        self.model.train()
        self.heads.train()
        shared = self.shared_params()
        n = len(self.task_names)
        grads: list[torch.Tensor | None] = [None] * n
        head_grads: dict[str, list[torch.Tensor]] = {}
        losses = torch.zeros(n)
        sums: dict[str, dict[str, float]] = {}
        live = [i for i, name in enumerate(self.task_names) if active.get(name) and name in shards]
        for i in live:
            name = self.task_names[i]
            self.optimizer.zero_grad(set_to_none=True)
            task_sums: dict[str, float] = {}
            scale = 1.0 / max(units[name], 1.0)
            for mb in micro_batches(shards[name], self.config.train.micro_batch_size):
                mb = {k: v.to(self.device) for k, v in mb.items()}
                loss_sum, mb_sums = self._task_loss(name, mb)
                (loss_sum * scale).backward()
                for k, v in mb_sums.items():
                    task_sums[k] = task_sums.get(k, 0.0) + v
            sums[name] = task_sums
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in shared])
            grads[i] = self._all_reduce(flat)
            if name in self.heads:
                head_grads[name] = [self._all_reduce(_grad(p).clone()) for p in self.heads[name].parameters()]
            loss_key = "nll_sum" if "nll_sum" in task_sums else "loss_sum"
            losses[i] = task_sums.get(loss_key, 0.0) * scale
        self._all_reduce(losses)
        active_mask = [i in live for i in range(n)]
        combined, weights = self.weighting.combine(losses, grads, active_mask)
        log_vars_grad = self.weighting.log_vars.grad if self.weighting.log_vars is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in shared:
            numel = p.numel()
            p.grad = combined[offset : offset + numel].view_as(p).to(p.dtype)
            offset += numel
        for name, gs in head_grads.items():
            w = float(weights[self.task_names.index(name)])
            for p, g in zip(self.heads[name].parameters(), gs, strict=True):
                p.grad = g * w
        if log_vars_grad is not None:
            assert self.weighting.log_vars is not None  # the gradient came from it
            self.weighting.log_vars.grad = log_vars_grad  # ∂L/∂s_i from combine()
        task_losses = {f"{name}/loss": float(losses[i]) for i, name in enumerate(self.task_names)}
        stepped = self.optimizer_step(shared + list(self.heads.parameters()), task_losses)
        info: dict[str, float] = {k: stepped[k] for k in ("grad_norm", "lr", "skipped_step")}
        for i, name in enumerate(self.task_names):
            info[f"{name}/weight"] = float(weights[i])
            if (task_grad := grads[i]) is not None:
                info[f"{name}/grad_norm"] = float(task_grad.norm())
        if len(live) >= 2:
            # Every live task's gradient was set above.
            cos = cosine_matrix(cast("list[torch.Tensor]", [grads[i] for i in live]))
            for a in range(len(live)):
                for b in range(a + 1, len(live)):
                    info[f"{self.task_names[live[a]]}~{self.task_names[live[b]]}"] = float(cos[a, b])
        return {"sums": sums, "info": info}

    @torch.no_grad()
    def multitask_eval_step(self, shards: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
        self.model.eval()
        self.heads.eval()
        out: dict[str, dict[str, float]] = {}
        for name, shard in shards.items():
            sums: dict[str, float] = {}
            for mb in micro_batches(shard, self.config.train.micro_batch_size):
                mb = {k: v.to(self.device) for k, v in mb.items()}
                _, mb_sums = self._task_loss(name, mb)
                for k, v in mb_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
            out[name] = sums
        return out

    # ---- checkpoints: the rating heads and the task weights beside the learner's own files ----------
    def _write_checkpoint(self, out: Path, with_model_dir: bool) -> None:
        super()._write_checkpoint(out, with_model_dir)
        self._save_heads(out / RATING_HEADS_DIR)
        state = self.weighting.state_dict()
        if state:
            save_file(state, str(out / "task_weighting.safetensors"))

    def _read_checkpoint(self, src: Path) -> None:
        heads = src / RATING_HEADS_DIR / "heads.safetensors"
        if heads.exists():
            self.heads.load_state_dict(load_file(str(heads)))
        weighting = src / "task_weighting.safetensors"
        if weighting.exists():
            self.weighting.load_state_dict(load_file(str(weighting)))
        super()._read_checkpoint(src)

    def _save_heads(self, out: Path) -> None:
        """The rating heads (safetensors) and, per head, the ratings' mean/std to undo standardisation:
        rating = mean + std · head(h_last)."""
        if not len(self.heads):
            return
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  str(out / "heads.safetensors"))
        record = {name: {"head": self.tasks[name].head, "num_classes": self.tasks[name].num_classes,
                         "mean": self.rating_stats.get(name, (0.0, 1.0))[0],
                         "std": self.rating_stats.get(name, (0.0, 1.0))[1]} for name in self.heads}
        (out / "heads.json").write_text(json.dumps(record, indent=2) + "\n")

    def _write_final(self, model: torch.nn.Module, out: Path) -> None:
        super()._write_final(model, out)
        self._save_heads(out / RATING_HEADS_DIR)
        for name in self.heads:
            if self.tasks[name].head == "regression":
                self._save_rating_scorer(out, name)

    def _save_rating_scorer(self, final: Path, name: str) -> None:
        """`final/rating_heads/<task>/`: a reward-model directory (`ScalarHeadModel` format) that scores
        any text in rating units, so the rating head can score generations wherever a reward model is
        accepted (`reward.sources`, `raylign eval --scorer`, `raylign serve --reward-model`).

        The head sits on the last hidden state (after the final norm), which is what the backbone alone
        (`AutoModel`) returns, so the backbone is the run's final model: its files are linked, not
        copied. Standardisation is folded in: rating = std · (w·h + b) + mean.
        """
        import os
        import shutil

        from raylign.models.heads import HEAD_CONFIG, HEAD_WEIGHTS

        if (final / "adapter_config.json").exists():
            return  # an unmerged LoRA adapter is no backbone directory
        out = final / RATING_HEADS_DIR / name
        out.mkdir(parents=True, exist_ok=True)
        for item in final.iterdir():
            if item.is_file():
                target = out / item.name
                if item.suffix in (".safetensors", ".bin"):
                    if not target.exists():
                        os.symlink(os.path.relpath(item, out), target)
                else:
                    shutil.copy2(item, target)
        mean, std = self.rating_stats.get(name, (0.0, 1.0))
        head = self.heads[name]
        assert isinstance(head, nn.Linear)  # every rating head is one (see __init__)
        weight = (head.weight.detach().float() * std).cpu().contiguous()
        bias = (head.bias.detach().float() * std + mean).cpu().contiguous()
        save_file({"weight": weight, "bias": bias}, str(out / HEAD_WEIGHTS))
        record = {"kind": "scalar_head", "hidden_size": head.in_features, "format": 1,
                  "source": f"multitask rating task '{name}'", "rating_mean": mean, "rating_std": std}
        (out / HEAD_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
