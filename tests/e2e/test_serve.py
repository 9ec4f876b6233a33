"""The Serve endpoint over HTTP, as clients see it: the official `openai` client for completions, chat,
streaming and n>1 with token counts; 200 concurrent requests batched together; every kind of bad
request; schemathesis fuzzing of the published OpenAPI schema.

One Serve application (tiny:llama, lexicon:vader as the /v1/score reward, an API key read by the replica
from a file) for the whole module, on the session's shared Ray; Serve is shut down at the end so later
tests are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

MODEL = "tiny:llama"
KEY = "test-key-0123"
MAX_TOKENS_LIMIT = 48
CONTEXT = 512  # tiny models' max_position_embeddings


@dataclass
class Server:
    url: str
    logs: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from raylign.serving import ServeSettings, build_app
    from raylign.serving.deployment import APP_NAME

    logs = tmp_path_factory.mktemp("serve-logs")
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(KEY + "\n")
    port = _free_port()
    settings = ServeSettings(
        model=MODEL, reward_model="lexicon:vader", max_batch_size=32, batch_wait_ms=50,
        max_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=12, max_n=4, max_prompts=4,
        max_body_bytes=20_000, request_timeout_s=60, api_key_file=str(key_file), require_api_key=True,
        max_queued_requests=200, num_cpus=1, logs_dir=str(logs),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", logs)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from raylign.models import load_tokenizer

    return load_tokenizer(MODEL)


def _chat_prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_usage(usage, prompt_tokens: int, choices, max_tokens: int) -> None:
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if all(c.finish_reason == "length" for c in choices):
        assert usage.completion_tokens == max_tokens * len(choices)
    else:
        assert 0 < usage.completion_tokens <= max_tokens * len(choices)


# ---- the openai client ----------------------------------------------------------------------------


def test_models_and_health(client, server):
    import httpx

    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {MODEL, "lexicon:vader"}
    health = httpx.get(server.url + "/health")  # no key needed: load balancers probe it
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": MODEL}


def test_completion_counts_tokens(client, tokenizer):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    _check_usage(out.usage, len(tokenizer(prompt)["input_ids"]), out.choices, 9)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_chat_completion_counts_tokens(client, tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How do I make a cup of tea?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0)
    assert out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    _check_usage(out.usage, _chat_prompt_tokens(tokenizer, messages), out.choices, 7)
    # max_completion_tokens (the newer name) works the same; a chat without either gets the server default (12)
    newer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=7, temperature=0)
    assert newer.choices[0].message.content == choice.message.content
    default = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert default.usage.completion_tokens <= 12


def test_n_choices_and_seed(client, tokenizer):
    prompt = "Please write a short poem about the sea."
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=11)
    out = client.completions.create(**kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    _check_usage(out.usage, len(tokenizer(prompt)["input_ids"]), out.choices, 6)
    assert [c.text for c in client.completions.create(**kwargs).choices] == [c.text for c in out.choices]
    assert len({c.text for c in out.choices}) > 1  # each choice samples on its own
    # several prompts x n: prompt-major indices, prompt tokens counted once per prompt
    two = client.completions.create(model=MODEL, prompt=["Good morning!", "Cats like to sleep."], max_tokens=4, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    expected = sum(len(tokenizer(p)["input_ids"]) for p in ["Good morning!", "Cats like to sleep."])
    _check_usage(two.usage, expected, two.choices, 4)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=5, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    _check_usage(chat.usage, _chat_prompt_tokens(tokenizer, [{"role": "user", "content": "Hi!"}]), chat.choices, 5)


def test_streaming_matches_non_streaming(client, tokenizer):
    messages = [{"role": "user", "content": "Tell me about the weather today."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == _chat_prompt_tokens(tokenizer, messages)

    # completions, n=2: each choice streams its own text, each ends once
    stream = client.completions.create(model=MODEL, prompt="Numbers: one, two,", max_tokens=8, n=2, seed=5,
                                       stream=True)
    texts, ends = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                assert ends[c.index] is None
                ends[c.index] = c.finish_reason
    assert all(ends)
    same = client.completions.create(model=MODEL, prompt="Numbers: one, two,", max_tokens=8, n=2, seed=5)
    assert texts == [c.text for c in same.choices]


def test_stop_sequence_cuts_text(client):
    prompt = "Learning takes time and practice."
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[: full.find(stop)]


def test_score_route(client, server):
    import httpx

    pairs = [{"prompt": "How was your day?", "completion": "Wonderful, I love it, thank you!"},
             {"prompt": [{"role": "user", "content": "How was your day?"}], "completion": "Awful. I hate it."},
             {"completion": "It was a day."}]
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.v1 + "/score", json={"model": "lexicon:vader", "pairs": pairs}, headers=headers)
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    r = httpx.post(server.v1 + "/score", json={"model": MODEL, "pairs": pairs}, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---- 200 concurrent requests ----------------------------------------------------------------------


def test_200_concurrent_requests_are_batched(server, tokenizer):
    import openai

    words = "the quick brown fox jumps over the lazy dog and the cat sleeps".split()
    requests = []
    for i in range(200):
        prompt = " ".join(words[: 1 + i % len(words)]) + f" {i}"
        requests.append({"prompt": prompt, "max_tokens": 1 + i % 7, "n": 1 + (i % 5 == 0),
                         "temperature": [0.0, 0.7, 1.3][i % 3], "top_p": [1.0, 0.9][i % 2],
                         **({"seed": i} if i % 4 == 0 else {}), **({"stop": ["."]} if i % 6 == 0 else {})})

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120) as aclient:
            async def one(req):
                if req["n"] == 1 and req["max_tokens"] % 2:  # some as chat, to mix both routes in batches
                    messages = [{"role": "user", "content": req["prompt"]}]
                    kw = {k: v for k, v in req.items() if k != "prompt"}
                    return await aclient.chat.completions.create(model=MODEL, messages=messages, **kw)
                return await aclient.completions.create(model=MODEL, **req)

            return await asyncio.gather(*(one(r) for r in requests))

    logged_before = len(_batch_sizes(server.logs))
    answers = asyncio.run(run_all())
    assert len(answers) == 200
    for req, out in zip(requests, answers, strict=True):
        # each answer is its own request's: its n, its max_tokens, the token count of its own prompt
        assert len(out.choices) == req["n"]
        if out.object == "chat.completion":
            prompt_tokens = _chat_prompt_tokens(tokenizer, [{"role": "user", "content": req["prompt"]}])
        else:
            prompt_tokens = len(tokenizer(req["prompt"])["input_ids"])
        _check_usage(out.usage, prompt_tokens, out.choices, req["max_tokens"])
        for choice in out.choices:
            text = choice.message.content if out.object == "chat.completion" else choice.text
            assert isinstance(text, str) and choice.finish_reason in ("stop", "length")
            if "stop" in req:
                assert "." not in text

    sizes = _batch_sizes(server.logs)[logged_before:]
    assert sum(sizes) == 200  # every request went through exactly one logged batch
    assert max(sizes) > 1 and len(sizes) <= 100, sizes  # concurrent requests shared forward passes


def _batch_sizes(logs: Path) -> list[int]:
    """Requests per batch, from the replica's Serve log lines `raylign batch: requests=N ...`."""
    sizes = []
    for path in logs.rglob("*.log"):
        sizes += [int(m) for m in re.findall(r"raylign batch: requests=(\d+)", path.read_text(errors="replace"))]
    return sizes


# ---- bad requests ---------------------------------------------------------------------------------


def test_each_bad_request_gets_its_4xx_then_a_good_one_works(server, client):
    import httpx
    import openai

    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}

    def post(body=None, route="/completions", headers=auth, content=None):
        return httpx.post(server.v1 + route, json=body, content=content, timeout=60,
                          headers={**headers, "Content-Type": "application/json"})

    cases = [
        ("bad JSON", post(content=b'{"prompt": "Hello", "max_tokens": '), 400, "invalid_json"),
        ("empty prompt", post({**good, "prompt": ""}), 400, None),
        ("empty prompt list", post({**good, "prompt": []}), 400, None),
        ("empty chat", post({"model": MODEL, "messages": []}, "/chat/completions"), 400, None),
        ("prompt longer than the context", post({**good, "prompt": "one two three " * 400}), 400,
         "context_length_exceeded"),
        ("body over the size limit", post({**good, "prompt": "x" * 30_000}), 413, "request_too_large"),
        ("max_tokens negative", post({**good, "max_tokens": -1}), 400, None),
        ("max_tokens over the limit", post({**good, "max_tokens": MAX_TOKENS_LIMIT + 1}), 400, None),
        ("negative temperature", post({**good, "temperature": -0.5}), 400, None),
        ("top_p 0", post({**good, "top_p": 0}), 400, None),
        ("n over the limit", post({**good, "n": 5}), 400, None),
        ("unknown parameter", post({**good, "max_tokenz": 3}), 400, None),
        ("unsupported parameter", post({**good, "suffix": "x"}), 400, None),
        ("unknown model", post({**good, "model": "gpt-4o"}), 404, "model_not_found"),
        ("no API key", post(good, headers={}), 401, "invalid_api_key"),
        ("bad JSON and no API key", post(content=b'{"prompt": ', headers={}), 401, "invalid_api_key"),
        ("wrong API key", post(good, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key"),
        ("unknown route", post(good, "/embeddings"), 404, None),
        ("wrong method", httpx.get(server.v1 + "/completions", headers=auth), 405, None),
    ]
    for what, response, status, code in cases:
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], what
        if code:
            assert error["code"] == code, (what, error)
    params = {c[0]: c[1].json()["error"]["param"] for c in cases}
    assert params["max_tokens negative"] == "max_tokens" and params["negative temperature"] == "temperature"
    assert "Did you mean 'max_tokens'" in cases[11][1].json()["error"]["message"]

    # the official client raises its typed errors with the server's message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").models.list()

    ok = post(good)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# ---- fuzzing the schema ---------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_or_schema_violation(server):
    """Every check of schemathesis on every route. One rule no JSON schema can state (prompt + max_tokens
    must fit the model's context, counted in tokens) may turn a schema-valid request into a documented
    400 `context_length_exceeded`; only for that answer is "valid data must be accepted" waived."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    auth = {"Authorization": f"Bearer {KEY}"}
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=int(os.environ.get("RAYLIGN_FUZZ_EXAMPLES", 25)), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        def fuzz(case):
            response = case.call(base_url=server.url, headers=auth, timeout=60)
            context = response.status_code == 400 and "context_length_exceeded" in response.text
            case.validate_response(response, headers=auth, excluded_checks=[positive_data_acceptance] * context,
                                   transport_kwargs={"base_url": server.url, "headers": auth, "timeout": 60})

        fuzz()
        tested.append(operation.label)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/score",
            "GET /v1/models", "GET /health"} <= set(tested)


def test_openapi_documents_limits_and_auth(server):
    import httpx

    spec = httpx.get(server.url + "/openapi.json").json()
    completion = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS_LIMIT
    assert "HTTPBearer" in json.dumps(spec["components"].get("securitySchemes", {}))
