"""Evaluation scorers on a tiny model: log-likelihoods, DPO implicit reward, spec errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylign.evaluation.scorers import (
    DPOImplicitScorer,
    LogLikelihood,
    LogLikScorer,
    build_scorer,
    resolve_model_or_run,
)
from raylign.rewards import RewardSourceError


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LogLikelihood("tiny:llama", batch_size=2)


def test_loglik_matches_a_manual_forward_pass_on_the_assistant_turn(lm):
    from raylign.data import format_prompt_completion

    prompts = ["Say hi.", [{"role": "user", "content": "Tell me a joke."}], "Why?"]
    answers = ["hi there", "a fairly long answer about cats and dogs", "because"]
    total, count = lm.logps(prompts, answers)
    for p, a, t, c in zip(prompts, answers, total, count, strict=True):
        prompt_text, completion_text = format_prompt_completion(p, a, lm.tokenizer)
        p_ids = lm.tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        c_ids = lm.tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        manual = sum(logp[len(p_ids) - 1 + j, tok].item() for j, tok in enumerate(c_ids))
        assert c == len(c_ids)
        assert t == pytest.approx(manual, abs=1e-3)  # batching/padding does not change the score
    mean = LogLikScorer(lm, mean=True).score(prompts, answers)
    summed = LogLikScorer(lm, mean=False).score(prompts, answers)
    np.testing.assert_allclose(mean, summed / count, rtol=1e-5)


def test_dpo_implicit_reward(lm):
    same = DPOImplicitScorer(lm, lm, beta=0.5).score(["a", "b"], ["x y", "z"])
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    pi, _ = lm.logps(["a"], ["x y"])
    scorer = DPOImplicitScorer(lm, lm, beta=0.5)
    scorer.reference = _Fixed(pi - 2.0)  # reference 2 nats less likely -> reward 0.5 * 2
    assert scorer.score(["a"], ["x y"])[0] == pytest.approx(1.0, abs=1e-4)


class _Fixed:
    def __init__(self, values):
        self.values = values

    def logps(self, prompts, completions):
        return self.values, np.ones_like(self.values)


def test_bad_scorer_names_say_what_to_do():
    with pytest.raises(RewardSourceError, match="Did you mean 'loglik-mean'"):
        build_scorer("loglik-maen", model="tiny:llama")
    with pytest.raises(RewardSourceError, match="--reference"):
        build_scorer("dpo", model="tiny:llama")
    with pytest.raises(RewardSourceError, match="loglik-mean, loglik-sum, dpo"):
        build_scorer("lexicon:vadr")
    assert build_scorer("lexicon:vader").name == "lexicon:vader"


def test_run_directory_resolves_to_final_and_its_base(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  path: tiny:llama\n")
    assert resolve_model_or_run(str(run)) == (str(run / "final"), "tiny:llama")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("{}")
    with pytest.raises(Exception, match="without final/"):
        resolve_model_or_run(str(tmp_path / "unfinished"))
