"""What one `raylign eval` run needs to know: the model, the inputs of each section, the scorer and
judge, generation and bootstrap settings. Shared by the CLI (`raylign eval`), `run_eval` and tests.

Imports neither torch nor Ray, so the CLI checks a command line before anything starts. The rules
that involve several fields (something to evaluate; `--checkpoints` with `--prompts` and `--gold`;
`--proxy`/`--gold` only with `--checkpoints`) are checked here; what needs the file system (the run
directory's checkpoints, the models, the data files) is checked by `run_eval` before any model loads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylign.config import ConfigError, validate_settings


class EvalSettings(BaseModel):
    """Settings of one evaluation (`raylign eval --help` documents each)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="MODEL_OR_RUN: a run dir (its final/), a model dir, HF id, builtin:/tiny:")
    out: str = Field(description="output directory for eval.json, report.md and plots")
    # inputs: each one given runs its section
    pairs: str | None = Field(None, description="pairs file {prompt, chosen, rejected[, category]}")
    ratings: str | None = Field(None, description="ratings file {text | prompt+completion, rating}")
    bias: str | None = Field(None, description="'builtin' or a JSONL file of counterfactual bias sets")
    prompts: str | None = Field(None, description="prompts file (or builtin:everyday-prompts) to generate from")
    reference: str | None = Field(None, description="reference model (DPO scorer, KL, win rate); "
                                  "default for a run: its base model")
    references: str | None = Field(None, description="prompts with human answers (pairs or unpaired) for "
                                   "generation-vs-answer embedding similarity")
    human: str | None = Field(None, description="annotations database (raylign annotate): agreement of the scorer "
                              "with the human majority on its pairwise and human-vs-model items")
    embedder: str = Field("builtin:minilm-l6", description="sentence encoder for `references`")
    checkpoints: bool = Field(False, description="`model` is a run dir: reward over-optimisation curves "
                              "across its checkpoints on `prompts`")
    proxy: str | None = Field(None, description="with `checkpoints`: the reward trained on "
                              "(default: the run's reward.sources)")
    gold: str | None = Field(None, description="with `checkpoints`: a held-out gold reward source")
    # scoring
    scorer: str = Field("loglik-mean", description="loglik-mean, loglik-sum, dpo, or a reward source spec")
    judge: str = Field("lexicon:vader", description="reward source judging generations")
    beta: float = Field(0.1, description="β of the DPO implicit reward (the dpo scorer checks β > 0)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows of each file")
    # generation (Ray Data)
    max_new_tokens: int = Field(64, ge=1, description="generation length in tokens")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (1.0: unbiased KL; 0: greedy)")
    actors: int = Field(2, ge=1, description="Ray Data generator actors")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per generator actor")
    batch_size: int = Field(16, ge=1, description="prompts per generation batch")
    bias_generate: bool = Field(False, description="also compare the judge's score of generations per group")
    explain: int | None = Field(None, ge=1, description="with `pairs`: token attributions of the N pairs with the "
                                "largest |margin| into OUT/explain/ (raylign.evaluation.explain)")
    # statistics and output
    seed: int = Field(0, description="seed of sampling and of the bootstrap")
    n_boot: int = Field(1000, ge=1, description="bootstrap resamples of every 95% interval")
    progress: bool = Field(True, description="progress bars")

    @model_validator(mode="after")
    def _check(self) -> EvalSettings:
        if not any((self.pairs, self.ratings, self.bias, self.prompts, self.references, self.human)):
            raise ConfigError("nothing to evaluate: give at least one of --pairs, --ratings, --bias, --prompts, "
                              "--references, --human")
        if self.checkpoints:
            if not (self.prompts and self.gold):
                raise ConfigError("--checkpoints draws reward over-optimisation curves: it needs --prompts F "
                                  "(held-out prompts) and --gold S (a held-out reward, e.g. lexicon:vader or a "
                                  "reward model dir)")
        elif self.proxy or self.gold:
            raise ConfigError("--proxy and --gold go with --checkpoints (curves across a run's checkpoints)")
        if self.explain and not self.pairs:
            raise ConfigError("--explain N explains pairs: give --pairs F")
        if self.explain and (self.scorer.startswith(("loglik", "lexicon:")) or self.scorer == "length"):
            raise ConfigError(f"--explain needs a differentiable model score, not '{self.scorer}': --scorer dpo, "
                              "or a reward model, rating head or discriminator directory")
        return self

    @property
    def needs_scorer(self) -> bool:
        """Whether a section scores given texts (pairs, ratings, bias, human) with `scorer`."""
        return bool(self.pairs or self.ratings or self.bias or self.human)

    def generation_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `generate_with_ray_data` (and its checkpoint variant) these settings give."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed,
                "actors": self.actors, "cpus_per_actor": self.cpus_per_actor, "batch_size": self.batch_size,
                "progress": self.progress}


def settings_from(values: dict) -> EvalSettings:
    """`EvalSettings` from CLI values; a bad value or combination is one `ConfigError` naming it."""
    return validate_settings(EvalSettings, values)
