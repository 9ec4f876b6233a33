"""Reward functions for the online-RL tests (`function:tests.rl_rewards:<name>`): dense rewards that a
tiny random model can move in a few steps."""

from __future__ import annotations


def letter_share(prompts, completions, letter: str = "e") -> list[float]:
    """Share of the completion's characters that are `letter` (0 for an empty completion)."""
    return [c.count(letter) / len(c) if c else 0.0 for c in completions]


def never_returns(prompts, completions) -> list[float]:
    """A reward that hangs (a stuck HTTP call, a deadlock): resources.call_timeout_s must stop the run."""
    import time

    time.sleep(3600)
    return [0.0] * len(completions)
