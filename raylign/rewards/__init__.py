"""Every reward source behind one interface, and their weighted mix.

    from raylign.rewards import build_reward_source, build_reward
    vader = build_reward_source("lexicon:vader")
    vader.score(prompts, completions)            # np.ndarray float32, one score per completion

Spec strings (`build_reward_source`, the config's `reward.sources[].source`, `--annotator`):

  lexicon:vader              VADER compound valence in [-1, 1] (human-rated word lexicon)
  length                     completion length: tokens with a tokenizer, else whitespace words
  function:module:attr       a user callable f(prompts, completions) -> sequence of floats
  module:attr                the same, without the prefix
  <path or model name>       a reward model: a `raylign train reward` output dir (runs/x/final), a
                             Hugging Face id, builtin:<name> or tiny:<arch> (random; for tests)

`build_reward(cfg.reward)` builds the config's sources into a `WeightedMix`. This module imports
neither torch nor transformers; a reward model loads them when it is built.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylign.rewards.base import (
    SPEC_FORMS,
    RewardSource,
    RewardSourceError,
    WeightedMix,
    as_scores,
    check_batch,
)

if TYPE_CHECKING:
    from raylign.config import RewardConfig

LEXICON_PREFIX = "lexicon:"
FUNCTION_PREFIX = "function:"
MODEL_PREFIXES = ("builtin:", "tiny:")
# `module:attr` with dotted parts, e.g. `my_rewards:score` or `pkg.rewards:Scorer.score`.
_CALLABLE_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# Keyword arguments some source understands; each builder takes the ones it needs and ignores the rest,
# so one set of settings (e.g. from RewardConfig) can be passed to every source of a mix.
MODEL_KWARGS = ("batch_size", "max_length", "max_prompt_length", "apply_chat_template", "device", "dtype",
                "trust_remote_code")
KNOWN_KWARGS = frozenset(("tokenizer", "name", *MODEL_KWARGS))


def build_reward_source(spec: str, **kw: Any) -> RewardSource:
    """A reward source from its spec string (forms in the module docstring).

    Keyword arguments: `tokenizer` (object or model name; for `length`), `name` (overrides the logged
    name), and for reward models `batch_size`, `max_length`, `max_prompt_length`,
    `apply_chat_template`, `device`, `dtype`, `trust_remote_code`. Arguments a source does not use
    are ignored; unknown ones raise TypeError. Raises RewardSourceError for a spec that fits no form
    or cannot be loaded.
    """
    unknown = set(kw) - KNOWN_KWARGS
    if unknown:
        raise TypeError(f"build_reward_source() got unknown arguments {sorted(unknown)}; "
                        f"known: {sorted(KNOWN_KWARGS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSourceError(f"empty reward source spec {spec!r}. Use one of: {SPEC_FORMS}")
    spec = spec.strip()
    kind = reward_spec_kind(spec)
    source: RewardSource
    if kind == "lexicon":
        from raylign.rewards.lexicon import LEXICONS

        which = spec[len(LEXICON_PREFIX):]
        if which not in LEXICONS:
            raise RewardSourceError(
                f"unknown lexicon '{spec}'; available: {', '.join(LEXICON_PREFIX + k for k in LEXICONS)}. "
                f"Reward sources are: {SPEC_FORMS}"
            )
        source = LEXICONS[which]()
    elif kind == "length":
        from raylign.rewards.length import LengthReward

        source = LengthReward(kw.get("tokenizer"))
    elif kind == "function":
        from raylign.rewards.function import FunctionReward

        source = FunctionReward(spec)
    else:
        source = _reward_model(spec, {k: v for k, v in kw.items() if k in MODEL_KWARGS})
    if kw.get("name"):
        source.name = kw["name"]
    return source


def reward_spec_kind(spec: str) -> str:
    """"lexicon", "length", "function" or "model": which form of the module docstring `spec` has."""
    if spec.startswith(LEXICON_PREFIX):
        return "lexicon"
    if spec == "length":
        return "length"
    if spec.startswith(FUNCTION_PREFIX) or (
        _CALLABLE_SPEC.match(spec) and not spec.startswith(MODEL_PREFIXES) and not Path(spec).exists()
    ):
        return "function"
    return "model"


def check_reward_specs(cfg: RewardConfig) -> None:
    """Fail fast, before any actor starts: build every light source (lexicon, length, function) and
    make sure every reward model can be found, without loading its weights."""
    from raylign.models import ModelNotFoundError, resolve_model_path

    if not cfg.sources:
        build_reward(cfg)  # raises the empty-sources message
    for s in cfg.sources:
        spec = s.source.strip()
        if reward_spec_kind(spec) != "model":
            build_reward_source(spec)
            continue
        _check_typo(spec)
        try:
            resolve_model_path(spec)
        except ModelNotFoundError as exc:
            raise RewardSourceError(f"reward model '{spec}' could not be loaded: {exc}") from None


def _looks_like_model(spec: str) -> bool:
    return spec.startswith(MODEL_PREFIXES) or Path(spec).expanduser().exists() or "/" in spec or "\\" in spec


def _check_typo(spec: str) -> None:
    """A bare word that is close to a named form is a typo, not a Hub model id."""
    from raylign.rewards.lexicon import LEXICONS

    if not _looks_like_model(spec):  # a bare word: catch typos of the named forms before asking the Hub
        named = ["length", *(LEXICON_PREFIX + k for k in LEXICONS)]
        close = [LEXICON_PREFIX + spec] if spec in LEXICONS else difflib.get_close_matches(spec, named, n=1)
        if close:
            raise RewardSourceError(
                f"unknown reward source '{spec}'. Did you mean '{close[0]}'? Use one of: {SPEC_FORMS}"
            )


def _reward_model(spec: str, kwargs: dict[str, Any]) -> RewardSource:
    from raylign.models import ModelNotFoundError

    looks_like_model = _looks_like_model(spec)
    _check_typo(spec)
    try:
        from raylign.rewards.model import RewardModelSource

        return RewardModelSource(spec, **kwargs)
    except ModelNotFoundError as exc:
        if looks_like_model:
            raise RewardSourceError(f"reward model '{spec}' could not be loaded: {exc}") from None
        raise RewardSourceError(
            f"unknown reward source '{spec}': it is none of the named forms and no model of that name was "
            f"found. Use one of: {SPEC_FORMS}"
        ) from None


def build_reward(cfg: RewardConfig, **kw: Any) -> WeightedMix:
    """The config's `reward.sources` ({source, weight} each) as one WeightedMix.

    `cfg.batch_size` becomes the reward models' batch size; `kw` (e.g. `tokenizer=` for `length`)
    goes to every source's builder.
    """
    if not cfg.sources:
        raise RewardSourceError(
            "reward.sources is empty: add at least one {source, weight}, e.g. "
            f"reward.sources=[{{source: lexicon:vader, weight: 1.0}}]. Sources are: {SPEC_FORMS}"
        )
    kw = {"batch_size": cfg.batch_size, **kw}
    sources = [build_reward_source(s.source, **kw) for s in cfg.sources]
    return WeightedMix(sources, [s.weight for s in cfg.sources])


__all__ = [
    "RewardSource",
    "RewardSourceError",
    "SPEC_FORMS",
    "WeightedMix",
    "as_scores",
    "build_reward",
    "build_reward_source",
    "check_batch",
    "check_reward_specs",
    "reward_spec_kind",
]
