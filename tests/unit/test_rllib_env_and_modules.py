"""RLlib on text without a Ray cluster: the environment (gymnasium's checker, episode ends, rewards), the
Q and policy modules (shapes, the top-k mask in the online and the target network, greedy / double-Q /
epsilon-greedy choices), and the pure math (masked Q, KL to the reference, the greedy KL penalty, SEM)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ray.rllib")

from raylign.rllib.env import TextGenerationEnv, greedy_kl_penalty  # noqa: E402
from raylign.rllib.modules import categorical_kl, masked_q_values, topk_allowed  # noqa: E402
from raylign.rllib.runner import mean_and_sem  # noqa: E402

MODEL = "tiny:llama"
REWARD = {"sources": [{"source": "function:tests.rl_rewards:letter_share", "weight": 10.0}]}
TOP_K = 5


@pytest.fixture(scope="module")
def tokenizer():
    from raylign.models import load_tokenizer

    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def env_config(tokenizer):
    prompts = ["Hello there", "Tell me about the sea please"]
    return {"prompts": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
            "prompt_texts": prompts, "tokenizer": MODEL, "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "max_new_tokens": 4, "reward": REWARD, "score_offset": 1.0}


# ---- pure math ------------------------------------------------------------------------------------


def test_masked_q_is_tau_log_softmax_on_the_top_k_and_minus_inf_elsewhere():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    allowed = topk_allowed(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 2)  # the reference prefers tokens 0, 1
    assert allowed.tolist() == [[True, True, False, False]]
    q = masked_q_values(logits, allowed, tau=0.5)
    assert q[0, 0].item() == pytest.approx(0.5 * math.log(0.1)) and q[0, 1].item() == pytest.approx(0.5 * math.log(0.2))
    assert torch.isneginf(q[0, 2:]).all()
    assert topk_allowed(logits, 0).all() and topk_allowed(logits, 99).all()  # 0 or k >= V: every token


def test_categorical_kl_against_a_hand_computed_case():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.1438
    assert categorical_kl(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)
    assert categorical_kl(q.log(), q.log()).item() == pytest.approx(0.0, abs=1e-7)
    masked = torch.tensor([[math.log(0.5), math.log(0.5), torch.finfo(torch.float32).min]])
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert categorical_kl(masked, ref).item() == pytest.approx(math.log(2.0), abs=1e-6)  # masked token adds 0


def test_greedy_kl_penalty_is_minus_beta_times_the_reference_log_prob():
    # a deterministic policy's KL to π_ref at s is −log π_ref(a_t|s): π_ref = 0.25 gives ln 4
    assert greedy_kl_penalty(math.log(0.25), 0.1) == pytest.approx(0.1 * math.log(4.0))
    assert greedy_kl_penalty(0.0, 0.1) == 0.0


def test_mean_and_sem():
    mean, sem = mean_and_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sem == pytest.approx(math.sqrt(5 / 3) / 2)  # s² = 5/3, n = 4
    assert mean_and_sem([2.0]) == (2.0, 0.0)


# ---- the environment -------------------------------------------------------------------------------


def test_env_passes_gymnasiums_checker(env_config):
    from gymnasium.utils.env_checker import check_env

    check_env(TextGenerationEnv(env_config), skip_render_check=True)


def test_episode_ends_terminated_at_eos_with_the_score_at_the_end(env_config, tokenizer):
    env = TextGenerationEnv(env_config)
    obs, info = env.reset(seed=0)
    prompt = env_config["prompts"][info["prompt_index"]]
    assert obs["length"].tolist() == [len(prompt)] and obs["tokens"][: len(prompt)].tolist() == prompt
    assert (obs["tokens"][len(prompt):] == tokenizer.pad_token_id).all() and obs["tokens"].shape == (env.max_length,)
    e_token = tokenizer.convert_tokens_to_ids("e")
    obs, reward, terminated, truncated, info = env.step(e_token)
    assert (reward, terminated, truncated) == (0.0, False, False) and obs["length"][0] == len(prompt) + 1
    obs, reward, terminated, truncated, info = env.step(tokenizer.eos_token_id)
    assert terminated and not truncated and info["completion"] == "e"
    assert info["score"] == pytest.approx(10.0)  # 10 x the share of 'e' in "e"
    assert reward == pytest.approx(10.0 - 1.0)  # score - score_offset


def test_episode_ends_terminated_after_max_new_tokens(env_config, tokenizer):
    env = TextGenerationEnv(env_config)
    env.reset(seed=1)
    token = tokenizer.convert_tokens_to_ids("a")
    ends = [env.step(token)[2] for _ in range(env_config["max_new_tokens"])]
    assert ends == [False, False, False, True]
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(token)


def test_env_kl_penalty_is_the_reference_log_prob_of_each_token(env_config, tokenizer):
    from raylign.models import load_causal_lm

    env = TextGenerationEnv({**env_config, "kl_coef": 0.5, "reference": {"path": MODEL}})
    obs, _ = env.reset(seed=0)
    reference = load_causal_lm(MODEL)[0].eval()
    token = tokenizer.convert_tokens_to_ids("a")
    ids = torch.as_tensor(obs["tokens"][: obs["length"][0]])[None]
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference(input_ids=ids).logits[0, -1], -1)[token].item()
    _, reward, terminated, _, _ = env.step(token)
    assert not terminated and reward == pytest.approx(-0.5 * -ref_logp, rel=1e-5) and reward < 0


# ---- the modules -----------------------------------------------------------------------------------


def _batch(env, n, seed=0):
    """n observations of different lengths (some tokens generated), as a torch batch."""
    rows = []
    for i in range(n):
        obs, _ = env.reset(seed=seed + i)
        for _ in range(i % 3):
            obs = env.step(7 + i)[0]
        rows.append(obs)
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}


@pytest.fixture(scope="module")
def q_module(env_config):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from raylign.rllib.modules import CausalLMQModule

    env = TextGenerationEnv(env_config)
    config = {"model": {"path": MODEL}, "top_k": TOP_K, "tau": 0.5, "double_q": True, "dueling": False,
              "num_atoms": 1, "epsilon": [(0, 1.0), (10, 1.0)]}
    module = RLModuleSpec(module_class=CausalLMQModule, observation_space=env.observation_space,
                          action_space=env.action_space, model_config=config).build()
    module.make_target_networks()
    with torch.no_grad():  # a target network that differs from the online one (as after some training)
        for p in module._target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module, env


def test_q_values_are_tau_log_softmax_at_the_last_real_position(q_module):
    from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS

    module, env = q_module
    obs = _batch(env, 4)
    q = module.compute_q_values({"obs": obs})[QF_PREDS]
    assert q.shape == (4, env.vocab_size)
    finite = torch.isfinite(q)
    assert (finite.sum(-1) == TOP_K).all() and (q[finite] <= 0).all()
    i, n = 2, int(obs["length"][2])
    with torch.no_grad():
        logits = module.encoder.lm(input_ids=obs["tokens"][i : i + 1, :n]).logits[0, -1]
    expected = 0.5 * torch.log_softmax(logits, -1)
    assert torch.allclose(q[i][finite[i]], expected[finite[i]], atol=1e-5)


def test_masked_tokens_are_minus_inf_in_both_networks_and_never_chosen(q_module):
    from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS

    module, env = q_module
    obs, next_obs = _batch(env, 6), _batch(env, 6, seed=10)
    out = module.forward_train({"obs": obs, "new_obs": next_obs})
    assert out[QF_PREDS].shape == out[QF_NEXT_PREDS].shape == out[QF_TARGET_NEXT_PREDS].shape == (6, env.vocab_size)
    online_next, target_next = out[QF_NEXT_PREDS], out[QF_TARGET_NEXT_PREDS]
    assert not torch.allclose(online_next[torch.isfinite(online_next)], target_next[torch.isfinite(target_next)])
    assert torch.equal(torch.isneginf(online_next), torch.isneginf(target_next))  # one mask for both networks
    allowed = module.allowed_actions(next_obs)
    assert torch.equal(torch.isneginf(target_next), ~allowed)
    # the double-Q argmax (online net on s') indexes a finite target value; so does the plain max
    double_q_pick = online_next.argmax(-1)
    assert torch.isfinite(target_next.gather(-1, double_q_pick[:, None])).all()
    assert allowed.gather(-1, target_next.argmax(-1)[:, None]).all()
    # greedy (inference) and epsilon-greedy (epsilon = 1: every action random) choose allowed tokens only
    greedy = module.forward_inference({"obs": next_obs})["actions"]
    assert allowed.gather(-1, greedy[:, None]).all()
    for t in range(4):
        explored = module.forward_exploration({"obs": next_obs}, t=t)["actions"]
        assert allowed.gather(-1, explored[:, None]).all()


def test_policy_module_has_masked_logits_values_and_zero_kl_at_start(env_config):
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from raylign.rllib.modules import REF_LOGITS, CausalLMPolicyModule

    env = TextGenerationEnv(env_config)
    module = RLModuleSpec(module_class=CausalLMPolicyModule, observation_space=env.observation_space,
                          action_space=env.action_space, model_config={"model": {"path": MODEL}, "top_k": TOP_K}).build()
    obs = _batch(env, 3)
    out = module.forward_train({"obs": obs})
    logits = out[Columns.ACTION_DIST_INPUTS]
    assert logits.shape == (3, env.vocab_size) and torch.isfinite(logits).all()
    probs = torch.softmax(logits, -1)
    assert ((probs > 0).sum(-1) == TOP_K).all()  # outside the top-k: probability 0
    values = module.compute_values({"obs": obs}, embeddings=out[Columns.EMBEDDINGS])
    assert values.shape == (3,) and torch.equal(values, module.compute_values({"obs": obs}))
    assert categorical_kl(logits, out[REF_LOGITS]).abs().max().item() < 1e-5  # starts as the reference
    assert not any(k.startswith("_frozen") for k in module.state_dict())  # the reference is not synced


def test_recipes_load_and_pipelines_import_without_rllib():
    from raylign.config import load_config

    assert load_config("dqn").algorithm == "dqn" and load_config("rllib_ppo").algorithm == "rllib_ppo"
    code = "import sys, raylign.pipelines as p; assert {'dqn', 'rllib_ppo'} <= set(p.PIPELINES); " \
           "assert 'ray.rllib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_non_prompt_dataset_is_one_config_error():
    from raylign.config import ConfigError, load_config
    from raylign.rllib.runner import check_rllib_config

    with pytest.raises(ConfigError, match="data.kind=prompts"):
        check_rllib_config(load_config("dqn", ["data.kind=pairs"]))
