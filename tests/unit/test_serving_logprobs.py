"""Log-probs, echo, token-id prompts, stop token ids and chunked prefill of the serving engine and its
HTTP app (no Ray): the log-probs are checked against a direct forward pass of the same model through
`transformers`, in OpenAI's response shapes."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from raylign.serving.engine import Job, Sampling, token_logprobs

MODEL = "tiny:llama"


def test_token_logprobs_are_the_temperature_scaled_untruncated_log_softmax():
    # logits log([1, 4, 1, 2]) / T: at T = 2 the probabilities are sqrt([1, 4, 1, 2]) / (1 + 2 + 1 + sqrt 2)
    logits = torch.log(torch.tensor([[1.0, 4.0, 1.0, 2.0], [1.0, 4.0, 1.0, 2.0]]))
    chosen, values, ids = token_logprobs(logits, torch.tensor([3, 1]), torch.tensor([2.0, 0.0]), top=2)
    z = 1 + 2 + 1 + math.sqrt(2)
    assert chosen[0].item() == pytest.approx(math.log(math.sqrt(2) / z), abs=1e-6)
    assert chosen[1].item() == pytest.approx(math.log(4 / 8), abs=1e-6)  # greedy (T = 0): T = 1
    assert ids.tolist() == [[1, 3], [1, 3]]
    assert values[1].tolist() == pytest.approx([math.log(4 / 8), math.log(2 / 8)], abs=1e-6)
    none, empty, _ = token_logprobs(logits, torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), top=0)
    assert empty.shape == (2, 0) and none[0].item() == pytest.approx(math.log(1 / 8), abs=1e-6)


@pytest.fixture(scope="module")
def engine():
    from raylign.serving.engine import Engine

    return Engine(MODEL, prefill_chunk=16)


@pytest.fixture(scope="module")
def reference(engine):
    """The same weights through a plain `transformers` forward pass."""
    from transformers import AutoModelForCausalLM

    from raylign.models import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32).eval()


def _reference_logprobs(reference, ids: list[int], temperature: float, top: int):
    """log_softmax(logits / T) of every token of `ids` after the first, and the top alternatives."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, :-1].float()  # [T-1, V], predicts ids[1:]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp.topk(top, dim=-1)


def test_echo_and_generated_logprobs_match_a_direct_forward_pass(engine, reference):
    prompt = engine.encode_text("What is the capital of France? The capital of France is")
    for temperature in (0.0, 0.7):
        job = Job([prompt], Sampling(6, temperature=temperature, seed=5, logprobs=3, echo=True))
        updates = []
        result = engine.generate([job], emit=updates.append)
        [update] = [u for step in updates for u in step[0]]
        text, n_tokens, _ = result.rows[0][0]
        generated = [t for t, _, _ in update.logprobs]
        assert len(generated) == n_tokens and engine.decode(generated) == text
        entries = update.prompt_logprobs + update.logprobs
        assert [t for t, _, _ in entries] == prompt + generated
        assert entries[0][1] is None and entries[0][2] == ()  # the first prompt token has no log-prob
        t = 1.0 if temperature == 0 else temperature
        chosen, (top_values, top_ids) = _reference_logprobs(reference, prompt + generated, t, 3)
        assert [lp for _, lp, _ in entries[1:]] == pytest.approx(chosen.tolist(), abs=1e-4)
        for (_, _, top), values, ids in zip(entries[1:], top_values.tolist(), top_ids.tolist(), strict=True):
            assert [a for a, _ in top] == ids and [v for _, v in top] == pytest.approx(values, abs=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(engine, reference):
    """A running stream keeps getting tokens while a long prompt joins (16 tokens per step), and both
    answer exactly as each does alone, the joiner's echoed log-probs as a direct forward pass gives."""
    runner = Job([engine.encode_text("Once upon a time")], Sampling(60, temperature=0.0), stream=True)
    long_prompt = engine.encode_text("The weather today is sunny and warm. Tomorrow it will rain. " * 4)
    assert len(long_prompt) > 5 * engine.prefill_chunk
    joiner = Job([long_prompt], Sampling(3, temperature=0.0, logprobs=0, echo=True))
    runner_alone, joiner_alone = engine.generate([runner]).rows, engine.generate([joiner]).rows
    assert runner_alone[0][0][1] == 60  # long enough to still run when the joiner has joined

    steps: list[int] = []  # the runner's tokens so far, at each of its updates
    joined = threading.Event()
    joining: dict = {}

    def on_runner(updates):
        steps.append(updates[0][-1].completion_tokens)
        if len(steps) == 3:
            joined.set()

    def on_joiner(updates):
        joining.setdefault("first", len(steps))
        joining.setdefault("updates", []).extend(updates[0])

    run = engine.submit([runner], emit=on_runner)
    assert joined.wait(60)
    join = engine.submit([joiner], emit=on_joiner)
    joiner_result, runner_result = join.result(60), run.result(60)
    # the runner took a step after every chunk: the joiner's first token came >= 5 runner steps later
    assert joining["first"] - 3 >= len(long_prompt) // engine.prefill_chunk - 1
    assert runner_result.rows == runner_alone and joiner_result.rows == joiner_alone
    [update] = joining["updates"]
    chosen, _ = _reference_logprobs(reference, long_prompt, 1.0, 1)
    assert [lp for _, lp, _ in update.prompt_logprobs[1:]] == pytest.approx(chosen.tolist(), abs=1e-4)


def test_stop_token_ids_and_stop_strings_end_the_text_and_its_logprobs(engine):
    prompt = engine.encode_text("Good morning! How are you today?")
    free = Job([prompt], Sampling(12, temperature=0.0, logprobs=0))
    engine.generate([free])
    updates = []
    engine.generate([free], emit=updates.append)
    tokens = [t for t, _, _ in updates[-1][0][0].logprobs]
    stop_at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    updates.clear()
    result = engine.generate([Job([prompt], Sampling(12, temperature=0.0, logprobs=0, stop_token_ids=(tokens[stop_at],)))],
                             emit=updates.append)
    text, n, finish = result.rows[0][0]
    assert (finish, n) == ("stop", stop_at + 1) and text == engine.decode(tokens[:stop_at])
    assert [t for t, _, _ in updates[-1][0][0].logprobs] == tokens[:stop_at]  # the stop token is not reported
    # a stop string: the log-probs cover the tokens of the text that is left (the last one maybe in part)
    full = engine.decode(tokens)
    stop = full[len(engine.decode(tokens[:4])) - 1:][:2]
    updates.clear()
    result = engine.generate([Job([prompt], Sampling(12, temperature=0.0, logprobs=0, stop=(stop,)))],
                             emit=updates.append)
    text = result.rows[0][0][0]
    kept = [t for t, _, _ in updates[-1][0][0].logprobs]
    assert full.startswith(text) and stop not in text and kept == tokens[:len(kept)]
    assert len(engine.decode(kept)) >= len(text) > len(engine.decode(kept[:-1]))


# ---- the HTTP app ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from raylign.serving.api import create_api
    from raylign.serving.batching import LocalBackend
    from raylign.serving.settings import ServeSettings

    return TestClient(create_api(ServeSettings(model=MODEL), LocalBackend(engine)))


def test_completions_echo_logprobs_in_openais_shape_as_lm_eval_asks(client, engine, reference):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens 0 or 1."""
    ids = engine.encode_text("The sun rises in the east")
    chosen, (top_values, _) = _reference_logprobs(reference, ids, 1.0, 1)
    for max_tokens in (0, 1):
        r = client.post("/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1, "temperature": 0,
                                                 "max_tokens": max_tokens, "seed": 1234})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(len(t) == 1 for t in lp["top_logprobs"][1:])
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(chosen.tolist(), abs=1e-4)
        assert [max(t.values()) for t in lp["top_logprobs"][1:len(ids)]] == pytest.approx(top_values[:, 0].tolist(), abs=1e-4)
        assert choice["text"].startswith(engine.decode(ids)) and "".join(lp["tokens"]) == choice["text"]
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == max_tokens
    # streamed: the first chunk carries the echo; the chunks add up to the same text and log-probs
    import json

    body = {"prompt": [ids], "echo": True, "logprobs": 1, "temperature": 0, "max_tokens": 3}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = [json.loads(line[6:]) for line in client.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    chunks = [c for ev in events for c in ev["choices"]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key]
    # a text prompt echoes as given; without echo the log-probs are the completion's
    r = client.post("/v1/completions", json={"prompt": "Cats like to", "echo": True, "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["text"].startswith("Cats like to") and r.json()["choices"][0]["logprobs"] is None
    r = client.post("/v1/completions", json={"prompt": ["Cats like to", "Hello"], "logprobs": 0, "max_tokens": 3})
    for choice in r.json()["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 3 and choice["logprobs"]["text_offset"][0] == 0


def test_token_id_prompts_and_their_errors(client, engine):
    a, b = engine.encode_text("Hello there"), engine.encode_text("Water boils at")
    as_text = client.post("/v1/completions", json={"prompt": ["Hello there", "Water boils at"], "max_tokens": 4,
                                                   "temperature": 0}).json()
    as_ids = client.post("/v1/completions", json={"prompt": [a, b], "max_tokens": 4, "temperature": 0}).json()
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in as_text["choices"]]
    assert as_ids["usage"]["prompt_tokens"] == len(a) + len(b)
    one = client.post("/v1/completions", json={"prompt": a, "max_tokens": 4, "temperature": 0}).json()
    assert one["choices"][0]["text"] == as_text["choices"][0]["text"]

    def error(body, param):
        r = client.post("/v1/completions", json={"max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        return r.json()["error"]["message"]

    for bad in ([1, engine.vocab_size], [[]], [-1], [[1], [2, -3]]):  # the vocabulary's bound is in the schema
        assert "token ids" in error({"prompt": bad}, "prompt")
    error({"prompt": "Hi", "stop_token_ids": [engine.vocab_size]}, "stop_token_ids.0")
    nothing = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0}).json()["choices"][0]
    assert (nothing["text"], nothing["finish_reason"]) == ("", "length")
    # top_logprobs counts only with logprobs: true
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2,
                                                  "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_in_openais_shape_streamed_or_not(client):
    body = {"messages": [{"role": "user", "content": "Hello there"}], "logprobs": True, "top_logprobs": 2,
            "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] or choice["finish_reason"] == "stop"
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] <= 0 and entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the top token
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == choice["message"]["content"]
    import json

    events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    streamed = [e for ev in events for c in ev["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert streamed == content
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == choice["message"]
