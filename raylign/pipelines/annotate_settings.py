"""What one `raylign data annotate` run needs to know: prompts, model, annotator, output, sampling and
workers. Shared by the CLI, `run_annotate` and tests.

Imports neither torch nor Ray itself (its package, `raylign.pipelines`, imports the driver loops) and
starts nothing, so a command line is checked before any actor starts. What needs the file system (the
prompts file, the model, `out` not being a directory) is checked by `run_annotate`, also before any
actor starts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raylign.config import ConfigError, RolloutConfig, validate_settings


class AnnotateSettings(BaseModel):
    """Settings of one annotation run (`raylign data annotate --help` documents each)."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(description="prompts file (JSONL, Parquet, CSV, ...) or builtin:everyday-prompts")
    model: str = Field(description="model that writes the answers: HF id, local dir, builtin:/tiny:")
    annotator: str = Field(description="reward source spec that scores them: lexicon:vader, length, "
                           "[function:]module:attr, or a reward model")
    out: str = Field(description="output pairs file (.jsonl), written atomically")
    n: int = Field(2, description="samples per prompt (>= 2)")
    seed: int = Field(0, description="sampling seed; the same seed gives the same file for any number of workers")
    max_new_tokens: int = Field(48, description="tokens per sample")
    temperature: float = Field(1.0, description="sampling temperature (> 0)")
    top_p: float = Field(1.0, description="nucleus sampling (1.0 = off)")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    workers: int = Field(1, description="rollout actors sharing the prompts (>= 1)")
    cpus_per_worker: float = Field(1.0, description="CPUs per rollout actor (> 0)")
    batch_size: int = Field(8, description="prompts per generate call (the chunk a worker samples at once)")
    min_margin: float = Field(0.0, description="keep only pairs whose annotator scores differ by at least this")
    progress: bool = Field(True, description="progress bar")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: $RAY_ADDRESS, else local)")

    @model_validator(mode="after")
    def _check(self) -> AnnotateSettings:
        if self.n < 2:
            raise ConfigError(f"--n must be at least 2 (a pair needs two samples per prompt), got {self.n}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.temperature <= 0:
            raise ConfigError(
                f"--temperature must be > 0 (got {self.temperature}): greedy decoding gives n identical "
                "completions, so every prompt would tie"
            )
        try:
            _ = self.sampling  # max_new_tokens, top_p and batch_size as RolloutConfig checks them
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid sampling settings: {problems}") from None
        return self

    @property
    def sampling(self) -> RolloutConfig:
        """The rollout workers' sampling settings: `n` samples per prompt, `batch_size` prompts per chunk."""
        return RolloutConfig.model_validate({"batch_size": self.batch_size, "n_samples": self.n, "top_p": self.top_p,
                                             "max_new_tokens": self.max_new_tokens, "temperature": self.temperature})


def settings_from(values: dict) -> AnnotateSettings:
    """`AnnotateSettings` from CLI values; a bad value or combination is one `ConfigError` naming it."""
    return validate_settings(AnnotateSettings, values)
