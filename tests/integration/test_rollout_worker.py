"""RolloutWorker on tiny:llama with LoRA: sampled log-probs, EOS, seeding, weight versions, Ray restarts.

Most tests instantiate the worker in-process (no Ray needed, fast); one runs it as a Ray actor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylign.config import LoraConfig
from raylign.models import load_causal_lm
from raylign.models.lora import apply_lora
from raylign.workers.rollout import RolloutWorker

LORA = LoraConfig(r=4, alpha=8)
MODEL = {"path": "tiny:llama", "lora": LORA.model_dump()}
PROMPTS = ["Tell me about the sea.", "Hi", [{"role": "user", "content": "How do I make a cup of tea?"}]]
# Temperature != 1 and top-p/top-k < full: the log-probs must still be of the untruncated distribution.
SAMPLING = {"batch_size": 2, "n_samples": 3, "max_new_tokens": 12, "temperature": 0.7, "top_p": 0.8,
            "top_k": 40}
EOS_BIAS = 1.0  # makes EOS likely enough that some rows finish early and others run to max_new_tokens


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """Workers set torch's thread count for their process; here that is pytest's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def worker(**kwargs) -> RolloutWorker:
    return RolloutWorker(rank=0, world_size=1, num_cpus=1, model=MODEL, seed=0, **kwargs)


def make_peft_model():
    """The learner's view of the policy: tiny:llama wrapped with LoRA adapters by peft."""
    model, _ = load_causal_lm("tiny:llama")
    return apply_lora(model, LORA, "CAUSAL_LM").eval()


@pytest.fixture(scope="module")
def peft_model():
    return make_peft_model()


def adapter(peft_model, seed: int, only: str = "") -> dict[str, np.ndarray]:
    """Random LoRA weights (B non-zero) under the learner's names, as numpy like the driver sends them;
    `only` keeps the modules whose name contains it."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(p.shape, generator=gen) * 0.2).numpy()
            for n, p in peft_model.named_parameters() if p.requires_grad and only in n}


def load_into(peft_model, weights: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in weights:
                param.copy_(torch.from_numpy(weights[name]))


def bias_eos(model, eos_id: int) -> None:
    """Test-only tweak: an output bias that favours EOS (the tiny random model rarely emits it)."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = EOS_BIAS
    model.set_output_embeddings(biased)


def same_rows(a: dict, b: dict) -> bool:
    return (len(a["response_ids"]) == len(b["response_ids"])
            and all(np.array_equal(x, y) for x, y in zip(a["response_ids"], b["response_ids"], strict=True))
            and all(np.array_equal(x, y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)))


def test_logprobs_match_the_learners_forward_and_rows_stop_at_eos():
    w, peft_model = worker(), make_peft_model()  # its own peft model: the EOS tweak changes it
    weights = adapter(peft_model, seed=1)
    load_into(peft_model, weights)
    eos = w.tokenizer.eos_token_id
    bias_eos(w.model, eos)
    bias_eos(peft_model.get_base_model(), eos)  # lm_head is not LoRA-adapted: the same tweak on both

    out = w.generate(PROMPTS, SAMPLING, seed=3, weights=weights, version=5)

    temperature = SAMPLING["temperature"]
    rows = len(out["response_ids"])
    for i in range(rows):
        prompt, response = out["prompt_ids"][i], out["response_ids"][i]
        assert len(out["logprobs"][i]) == len(response) > 0
        # Teacher forcing on the unpadded row, as the learner recomputes it (peft model, adapters on).
        ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits / temperature, -1).gather(1, torch.from_numpy(response)[:, None])
        np.testing.assert_allclose(out["logprobs"][i], expected[:, 0].numpy(), atol=1e-4, rtol=0)
        # Ends at the first EOS, nothing after it; unfinished rows were cut at max_new_tokens.
        eos_at = np.flatnonzero(response == eos)
        if out["finished"][i]:
            assert list(eos_at) == [len(response) - 1]
        else:
            assert len(eos_at) == 0 and len(response) == SAMPLING["max_new_tokens"]
        assert "<|im_end|>" not in out["texts"][i]
    assert 0 < out["finished"].sum() < rows  # the bias made both kinds of row happen
    assert out["tokens"] == sum(len(r) for r in out["response_ids"]) and out["seconds"] > 0
    assert out["version"] == 5 == w.version


def test_reference_logprobs_are_the_initial_models_whatever_weights_were_loaded(peft_model):
    """rollout.reference_on_workers: the worker scores its samples under the frozen initial model as the
    learner's reference would (teacher forcing on the base model, adapters off), not the loaded weights."""
    w = worker(reference=True)
    out = w.generate(PROMPTS, SAMPLING, seed=3, weights=adapter(peft_model, seed=1), version=1, reference=True)
    base = make_peft_model()  # B = 0: the adapter is the identity, this is the initial model
    temperature = SAMPLING["temperature"]
    changed = 0
    for prompt, response, ref, logp in zip(out["prompt_ids"], out["response_ids"], out["ref_logps"],
                                            out["logprobs"], strict=True):
        ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits / temperature, -1).gather(1, torch.from_numpy(response)[:, None])[:, 0]
        np.testing.assert_allclose(ref, expected.numpy(), atol=1e-4, rtol=0)
        changed += not np.allclose(ref, logp, atol=1e-3)  # the loaded adapter changed the sampler
    assert changed == len(out["ref_logps"])
    assert "ref_logps" not in w.generate(PROMPTS[:1], SAMPLING, seed=3)  # only when asked
    with pytest.raises(ValueError, match="without a reference"):
        worker().generate(PROMPTS[:1], SAMPLING, seed=3, reference=True)


def test_rows_are_prompt_major_with_n_samples_each():
    w = worker()
    out = w.generate(PROMPTS, SAMPLING, seed=0)
    n = SAMPLING["n_samples"]
    np.testing.assert_array_equal(out["prompt_index"], np.repeat(np.arange(len(PROMPTS)), n))
    assert len(out["texts"]) == len(out["finished"]) == len(PROMPTS) * n
    for i, prompt_ids in enumerate(out["prompt_ids"]):
        assert prompt_ids.dtype == np.int64 and out["response_ids"][i].dtype == np.int64
        assert out["logprobs"][i].dtype == np.float32
        np.testing.assert_array_equal(prompt_ids, out["prompt_ids"][i - i % n])  # no padding, same prompt
    text = w.tokenizer.decode(out["prompt_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "Tell me about the sea." in text  # chat template
    assert out["version"] == -1  # base weights


def test_same_seed_same_output_whatever_ran_before():
    w = worker()
    first = w.generate(PROMPTS, SAMPLING, seed=11)
    other = w.generate(PROMPTS[:1], SAMPLING, seed=12)
    torch.rand(100)  # global RNG use between calls must not matter
    again = w.generate(PROMPTS, SAMPLING, seed=11)
    assert same_rows(first, again) and first["texts"] == again["texts"]
    assert not same_rows(first, w.generate(PROMPTS, SAMPLING, seed=12))
    assert not same_rows(other, again)


def test_greedy_logprobs_are_of_the_unscaled_distribution(peft_model):
    w = worker()
    out = w.generate(PROMPTS[:1], SAMPLING | {"temperature": 0.0, "n_samples": 2}, seed=0)
    assert np.array_equal(out["response_ids"][0], out["response_ids"][1])  # greedy: samples agree
    prompt, response = out["prompt_ids"][0], out["response_ids"][0]
    with torch.no_grad():
        logits = w.model(torch.from_numpy(np.concatenate([prompt, response]))[None]).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    np.testing.assert_array_equal(response, logp.argmax(-1).numpy())
    np.testing.assert_allclose(out["logprobs"][0], logp.max(-1).values.numpy(), atol=1e-4, rtol=0)


def test_top_k_one_samples_the_greedy_tokens_and_padding_does_not_change_a_row():
    """top-k = 1 leaves only the argmax to sample; a short prompt batched beside a long one (so left
    padded, prefilled once, its KV cache repeated n times) continues exactly as it does alone."""
    w = worker()
    greedy = SAMPLING | {"temperature": 0.0, "n_samples": 2, "batch_size": 3}
    sampled = w.generate(PROMPTS, SAMPLING | {"top_k": 1, "top_p": 1.0, "batch_size": 3}, seed=5)
    reference = w.generate(PROMPTS, greedy, seed=0)
    for row in range(len(sampled["response_ids"])):
        np.testing.assert_array_equal(sampled["response_ids"][row], reference["response_ids"][2 * (row // 3)])
    alone = w.generate(PROMPTS[1:2], greedy, seed=0)  # "Hi": the shortest prompt, padded above
    np.testing.assert_array_equal(alone["response_ids"][0], reference["response_ids"][2])
    np.testing.assert_allclose(alone["logprobs"][0], reference["logprobs"][2], atol=1e-5, rtol=0)


def test_weights_come_from_pristine_base_whatever_was_loaded_before(peft_model):
    fresh, base = worker(), worker()
    used = worker()
    used.set_weights(adapter(peft_model, seed=1), 1)
    used.set_weights(adapter(peft_model, seed=2), 2)
    # The last adapter covers only q_proj: every other weight merged before must return to W0.
    last = adapter(peft_model, seed=3, only="q_proj")
    used.set_weights(last, 3)
    fresh.set_weights(last, 3)

    for name, param in used.model.state_dict().items():
        assert torch.equal(param, fresh.model.state_dict()[name]), name  # bit-identical
    assert same_rows(used.generate(PROMPTS, SAMPLING, seed=4), fresh.generate(PROMPTS, SAMPLING, seed=4))
    assert used.version == fresh.version == 3

    used.set_weights({}, 4)  # an empty adapter: back to the base weights exactly
    for name, param in used.model.state_dict().items():
        assert torch.equal(param, base.model.state_dict()[name]), name


def test_full_weights_and_peft_names_are_copied_in(peft_model):
    w = worker()
    norm = np.full(w.model.model.norm.weight.shape, 0.5, dtype=np.float32)
    w.set_weights({"base_model.model.model.norm.weight": norm}, 7)
    np.testing.assert_array_equal(w.model.model.norm.weight.numpy(), norm)
    assert w.version == 7


def test_generate_loads_weights_only_for_a_new_version(peft_model, monkeypatch):
    w = worker()
    loads = []
    original = w.set_weights
    monkeypatch.setattr(w, "set_weights", lambda weights, version: (loads.append(version), original(weights, version)))
    weights = adapter(peft_model, seed=1)
    assert w.generate(PROMPTS[:1], SAMPLING, seed=0, weights=weights, version=1)["version"] == 1
    assert w.generate(PROMPTS[:1], SAMPLING, seed=0, weights=weights, version=1)["version"] == 1
    assert w.generate(PROMPTS[:1], SAMPLING, seed=0)["version"] == 1
    assert w.generate(PROMPTS[:1], SAMPLING, seed=0, weights=adapter(peft_model, 2), version=2)["version"] == 2
    assert loads == [1, 2]


def test_bad_weights_are_rejected_before_anything_changes(peft_model):
    w = worker()
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    with pytest.raises(ValueError, match="not in the model.*model.nonsense.weight"):
        w.set_weights(adapter(peft_model, 1) | {"model.nonsense.weight": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        w.set_weights({"model.norm.weight": np.zeros(3, np.float32)}, 1)
    no_lora = RolloutWorker(rank=0, world_size=1, num_cpus=1, model={"path": "tiny:llama"})
    with pytest.raises(ValueError, match="no `lora` section"):
        no_lora.set_weights(adapter(peft_model, 1), 1)
    assert w.version == -1
    assert all(torch.equal(v, before[k]) for k, v in w.model.state_dict().items())


def test_saved_adapter_directory_starts_from_its_adapter_on_the_pristine_base(tmp_path):
    from raylign.models import save_model

    learner = make_peft_model()
    load_into(learner, adapter(learner, seed=5))
    _, tokenizer = load_causal_lm("tiny:llama")
    path = save_model(learner, tokenizer, tmp_path / "adapter", merge_lora=False)
    w = RolloutWorker(rank=0, world_size=1, num_cpus=1, model={"path": str(path)})
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(w.model(ids).logits, learner(input_ids=ids).logits, atol=1e-5, rtol=0)
        # Training continues that adapter: new adapter weights replace it, they do not stack on it.
        newer = adapter(learner, seed=6)
        load_into(learner, newer)
        w.set_weights(newer, 1)
        torch.testing.assert_close(w.model(ids).logits, learner(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert w.version == 1


def test_generate_texts_groups_completions_per_prompt():
    w = worker()
    texts = w.generate_texts(PROMPTS, SAMPLING, seed=2)
    assert [len(t) for t in texts] == [SAMPLING["n_samples"]] * len(PROMPTS)
    assert all(isinstance(s, str) for group in texts for s in group)
    assert sum(texts, []) == w.generate(PROMPTS, SAMPLING, seed=2)["texts"]
    assert w.generate_texts(PROMPTS, SAMPLING) == w.generate_texts(PROMPTS, SAMPLING, seed=0)  # worker's seed


def test_ray_actor_takes_weights_by_object_ref_and_matches_in_process(ray_session, peft_model):
    """Through Ray the weights arrive as an ObjectRef (resolved by Ray) and the output depends only on
    the arguments, not on the process. (tests/integration/test_online_rl.py kills and restarts one.)"""
    import ray

    from raylign.workers.group import WorkerGroup

    weights = adapter(peft_model, seed=1)
    local = worker().generate(PROMPTS, SAMPLING, seed=9, weights=weights, version=3)
    group = WorkerGroup(RolloutWorker, 1, 0.5, name="rollout-test", init_kwargs={"model": MODEL, "seed": 0})
    try:
        (remote,) = group.call("generate", PROMPTS, SAMPLING, seed=9, weights=ray.put(weights), version=3)
    finally:
        group.shutdown()
    assert remote["version"] == 3 and same_rows(remote, local) and remote["texts"] == local["texts"]
