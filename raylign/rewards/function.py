"""A user's Python function as the reward: `function:my_rewards:politeness` or just `my_rewards:politeness`.

The callable is `f(prompts, completions) -> sequence of floats`, one per completion. `module` is imported
normally (installed packages, or files on `sys.path`; the current directory is tried last, so a
`my_rewards.py` next to where `raylign` runs is found); `attr` may be dotted (`module:Class.method`).
Every failure (no module, no attribute, not callable, wrong number of scores, nan) is one
RewardSourceError naming the spec.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raylign.rewards.base import RewardSource, RewardSourceError, as_scores, check_batch

FUNCTION_PREFIX = "function:"


def load_callable(target: str, spec: str) -> Callable[..., Any]:
    """`module:attr` -> the object; errors name `spec` (what the user wrote)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RewardSourceError(
            f"reward source '{spec}': expected 'module:attr' after 'function:' (e.g. function:my_rewards:score)"
        )
    module = _import(module_name, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                            and getattr(v, "__module__", None) == module.__name__)
            shown = ", ".join(public[:15]) + (", ..." if len(public) > 15 else "")
            raise RewardSourceError(
                f"reward source '{spec}': module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                f"attribute '{attr}'. Callables it defines: {shown or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSourceError(
            f"reward source '{spec}': '{module_name}:{attr}' is a {type(obj).__name__}, not a function "
            "f(prompts, completions) -> list of floats"
        )
    return obj


def _import(module_name: str, spec: str):
    cwd = os.getcwd()
    # The `raylign` script does not put the working directory on sys.path; try it after everything else.
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise RewardSourceError(
                f"reward source '{spec}': no module named '{module_name}' (looked on sys.path and in {cwd}). "
                "Put the file in the working directory, install it, or add its folder to PYTHONPATH"
            ) from None
        raise RewardSourceError(
            f"reward source '{spec}': importing '{module_name}' failed because it needs '{missing}', "
            "which is not installed"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any error in the user's module becomes one clear message
        raise RewardSourceError(
            f"reward source '{spec}': importing module '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


class FunctionReward(RewardSource):
    """Calls `fn(prompts, completions)` and checks it returned one finite number per completion."""

    def __init__(self, fn: Callable[..., Any] | str, name: str | None = None):
        if isinstance(fn, str):
            spec = fn
            target = spec[len(FUNCTION_PREFIX):] if spec.startswith(FUNCTION_PREFIX) else spec
            fn = load_callable(target, spec)
            name = name or spec
        self.fn = fn
        self.name = name or f"function:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        prompts = check_batch(prompts, completions)
        values = self.fn(prompts, list(completions))  # errors in the user's code keep their traceback
        if values is None:
            raise RewardSourceError(f"reward source '{self.name}' returned None; it must return one number "
                                    f"per completion ({len(completions)} here)")
        return as_scores(values, len(completions), self.name, finite=True)
