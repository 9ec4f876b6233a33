"""Serving without Ray: per-row sampling math, the engine's batches (per-row settings, cancellation,
streaming, deadlines, a dead decode thread), the HTTP app on a one-request-per-batch backend (timeouts,
body limits, auth before the body, the Host guard, the admission bound, the token budget, tokenizing off
the event loop, scoring that stops at its deadline, 5xx bodies that leak nothing), the auth policy,
the CLI's early errors and cluster/serve.yaml."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from raylign.serving.engine import Job, RowProgress, RowSampler, Sampling, _Row, nucleus_probs, row_seed

MODEL = "tiny:llama"
REPO = Path(__file__).resolve().parents[2]


# ---- sampling math --------------------------------------------------------------------------------


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    probs = nucleus_probs(logits, torch.tensor([1.0, 1.0]), torch.tensor([0.7, 1e-30]))
    assert torch.allclose(probs[0], torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert torch.allclose(probs[1], torch.tensor([0.5, 0.0, 0.0, 0.0]))  # the top token always stays


def test_each_row_samples_with_its_own_settings_and_generator():
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    temps, top_ps = [0.0, 1.0, 0.7, 1.3], [1.0, 1.0, 1e-40, 0.9]

    def generators():
        return [None] + [torch.Generator().manual_seed(row_seed(7, r)) for r in (1, 2, 3)]

    batch = RowSampler(temps, top_ps, generators()).choose(scores.clone())
    assert batch[0] == scores[0].argmax() and batch[2] == scores[2].argmax()  # greedy; top_p ~ 0
    # a row's draw depends on its own logits, settings and generator only, not on the other rows
    alone = RowSampler([1.3], [0.9], [torch.Generator().manual_seed(row_seed(7, 3))]).choose(scores[3:].clone())
    assert alone[0] == batch[3]
    one_hot = RowSampler(temps, top_ps, generators())(None, scores.clone())
    assert torch.equal(one_hot.argmax(-1), batch) and torch.isinf(one_hot).sum() == 4 * 49


def test_streamed_text_holds_back_possible_stop_starts_and_broken_characters():
    row = _Row(0, 0, 10, ("world",), True)
    row.text = "Hello wor"
    assert RowProgress._settled(row) == "Hello "
    row.text = "Hello wax"
    assert RowProgress._settled(row) == "Hello wax"
    row.text = "caf\ufffd"
    assert RowProgress._settled(row) == "caf"


# ---- the engine (tiny model, no Ray) --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from raylign.serving.engine import Engine

    return Engine(MODEL)


def test_one_batch_serves_rows_with_different_settings(engine):
    prompt = engine.encode_text("The quick brown fox")
    chat = engine.encode_chat([{"role": "user", "content": "Hello there"}])
    jobs = [Job([prompt], Sampling(5, temperature=0.0)),
            Job([chat], Sampling(7, temperature=1.0, top_p=0.9, seed=3), n=3, stream=True),
            Job([prompt, chat], Sampling(12, temperature=0.8, stop=("e", "a"))),
            Job([chat], Sampling(3, temperature=1.2, seed=9), n=2)]
    updates = []
    result = engine.generate(jobs, emit=updates.append)
    assert [len(rows) for rows in result.rows] == [1, 3, 2, 2]
    for job, rows in zip(jobs, result.rows, strict=True):
        for text, tokens, finish in rows:
            assert finish in ("stop", "length")
            assert tokens == job.sampling.max_tokens if finish == "length" else 1 <= tokens <= job.sampling.max_tokens
            assert not any(s in text for s in job.sampling.stop)
    # streamed rows: the deltas add up to the final text, and every row of every job reported its end
    streamed = ["", "", ""]
    ends = {}
    for step in updates:
        for j, ups in step.items():
            for u in ups:
                if j == 1:
                    streamed[u.row] += u.text
                if u.finish_reason:
                    ends[(j, u.row)] = (u.finish_reason, u.completion_tokens)
    assert streamed == [t for t, _, _ in result.rows[1]]
    assert ends == {(j, r): (f, n) for j, rows in enumerate(result.rows) for r, (_, n, f) in enumerate(rows)}
    # seeded rows repeat exactly; the n choices of one request differ
    again = engine.generate(jobs)
    assert again.rows[1] == result.rows[1] and again.rows[3] == result.rows[3]
    assert len({t for t, _, _ in result.rows[1]}) > 1


def test_a_cancelled_request_stops_without_touching_its_batch_mates(engine):
    prompt = engine.encode_text("Good morning! How are you today?")
    gone = Job([prompt], Sampling(40, temperature=0.0), n=2)
    gone.cancel()
    kept = Job([prompt], Sampling(20, temperature=0.0))
    alone = engine.generate([Job([prompt], Sampling(20, temperature=0.0))]).rows[0]
    result = engine.generate([gone, kept])
    assert [(f, n) for _, n, f in result.rows[0]] == [("cancelled", 0)] * 2  # dropped before its prefill
    assert result.rows[1] == alone
    assert result.steps == 20  # the batch ran for the live request only


def test_a_request_joins_the_running_batch_and_neither_changes_the_other(engine):
    """Continuous batching: B is submitted while A decodes, joins A's batch (peak_rows counts both),
    finishes first, and both answers are what each request gets alone (greedy). B's prompt is longer
    than A's row, so A's cache is padded on the left to join, and trimmed again once B has left."""
    import threading

    a = Job([engine.encode_text("Once upon a time")], Sampling(48, temperature=0.0), stream=True)
    b = Job([engine.encode_text("In the beginning there was a long prompt that went on and on, " * 3)],
            Sampling(4, temperature=0.0), n=2)
    a_alone, b_alone = engine.generate([a]).rows, engine.generate([b]).rows
    assert a_alone[0][0][1] > 12  # A decodes long enough for B to arrive meanwhile
    started = threading.Event()
    a_run = engine.submit([a], emit=lambda updates: started.set())
    assert started.wait(60)
    b_result = engine.submit([b]).result(60)
    assert not a_run.done()  # B did not wait for A
    a_result = a_run.result(60)
    assert b_result.peak_rows == 3 and b_result.steps == 4
    assert b_result.rows == b_alone and a_result.rows == a_alone


def test_prompts_sharing_a_head_prefill_it_once_and_answer_as_if_alone(engine):
    from raylign.serving.engine import MIN_SHARED_PREFIX, common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2 and common_prefix([[7], [8]]) == 0
    head = "You are a careful assistant who answers in one short sentence. Question: "
    prompts = [engine.encode_text(head + q) for q in ("Why is the sky blue?", "What is rain?", "Name a fruit.")]
    shared = common_prefix(prompts)
    assert shared >= MIN_SHARED_PREFIX
    engine._prefix = None
    alone = [engine.generate([Job([p], Sampling(10, temperature=0.0))]).rows[0] for p in prompts]
    together = engine.generate([Job([p], Sampling(10, temperature=0.0)) for p in prompts]).rows
    assert engine._prefix is not None and engine._prefix[0] == prompts[0][:shared]
    assert together == alone
    # a later request with the same head reuses it, and still answers as alone
    again = engine.generate([Job([prompts[1]], Sampling(10, temperature=0.0))]).rows[0]
    assert again == alone[1]


# ---- the HTTP app on a local backend ---------------------------------------------------------------


class OneJobBackend:
    """Each request its own batch: the app's code path without Serve's batching."""

    reward_name = None

    def __init__(self, engine):
        self.engine = engine
        self.jobs = []

    async def generate(self, job):
        from raylign.serving.batching import stream_batch

        self.jobs.append(job)
        async for (item,) in stream_batch(self.engine, [job]):
            if item is StopIteration:
                return
            yield item


def _client(engine, **overrides):
    from fastapi.testclient import TestClient

    from raylign.serving.api import create_api
    from raylign.serving.settings import ServeSettings

    backend = OneJobBackend(engine)
    settings = ServeSettings(model=MODEL, **overrides)
    return TestClient(create_api(settings, backend)), backend


def test_no_key_needed_by_default_and_timeouts_are_408_and_cancel_the_job(engine):
    client, backend = _client(engine, request_timeout_s=0.3, max_tokens_limit=400)
    # The random tiny model may sample EOS before the deadline (a 200 ending in "stop"): seeded tries
    # until a request outlives it.
    for seed in range(8):
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 400, "seed": seed})
        if r.status_code != 200:
            break
        assert r.json()["choices"][0]["finish_reason"] == "stop", r.text[-300:]
    else:
        pytest.fail("every seeded request ended by EOS before the 0.3 s deadline")
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    assert backend.jobs[-1].cancelled.is_set()
    # A started stream that outlives its deadline reports the timeout in-band (seeded tries, as above).
    for seed in range(8):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "stream": True, "max_tokens": 400, "seed": seed})
        assert r.status_code == 200
        if '"code": "timeout"' in r.text:
            break
        assert '"finish_reason": "stop"' in r.text, r.text[-500:]
    else:
        pytest.fail("every seeded stream ended by EOS before the 0.3 s deadline")
    assert backend.jobs[-1].cancelled.is_set()


def test_body_limit_holds_without_content_length(engine):
    client, _ = _client(engine, max_body_bytes=2048)

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_lone_surrogates_and_unsupported_parameters_are_400(engine):
    client, _ = _client(engine)
    r = client.post("/v1/completions", content=b'{"prompt": "a\\ud800b"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "'tools' is not supported by this server; leave it out"


# ---- settings, API-key policy, CLI errors, the Serve config file ----------------------------------


def test_auth_policy(monkeypatch, tmp_path):
    """Keys come from a file or the environment and the settings name only where; a keyless server may
    run only on loopback of its own Ray, answering loopback Host names only; attaching to an existing
    Ray needs a key (its proxy may listen on every interface) unless --no-api-key."""
    from raylign.serving.settings import (
        LOOPBACK_NAMES,
        ServeError,
        ServeSettings,
        auth_settings,
        is_local_host,
    )

    monkeypatch.delenv("RAYLIGN_API_KEY", raising=False)
    assert is_local_host("127.0.0.1") and is_local_host("::1") and not is_local_host("0.0.0.0")
    assert auth_settings("127.0.0.1") == {"require_api_key": False, "allowed_hosts": LOOPBACK_NAMES}
    with pytest.raises(ServeError, match="--api-key-file PATH .* or --no-api-key"):
        auth_settings("0.0.0.0")
    with pytest.raises(ServeError, match="existing Ray .* every interface.*--no-api-key"):
        auth_settings("127.0.0.1", attach=True)
    assert auth_settings("0.0.0.0", no_api_key=True) == {"require_api_key": False, "allowed_hosts": None}
    assert auth_settings("127.0.0.1", attach=True, no_api_key=True)["allowed_hosts"] is None
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    auth = auth_settings("0.0.0.0", api_key_file=str(key_file), attach=True)
    assert auth == {"api_key_file": str(key_file.resolve()), "require_api_key": True}
    assert ServeSettings(model=MODEL, **auth).resolved_api_key() == "s3cret-key"
    (tmp_path / "empty").write_text("\n")
    for bad, message in ((tmp_path / "missing", "cannot read the API key file"), (tmp_path / "empty", "is empty")):
        with pytest.raises(ServeError, match=message):
            auth_settings("0.0.0.0", api_key_file=str(bad))
    with pytest.raises(ServeError, match="contradict"):
        auth_settings("0.0.0.0", api_key_file=str(key_file), no_api_key=True)
    monkeypatch.setenv("RAYLIGN_API_KEY", "from-env")
    auth = auth_settings("10.0.0.5")
    assert auth == {"api_key_env": "RAYLIGN_API_KEY", "require_api_key": True}
    assert ServeSettings(model=MODEL, **auth).resolved_api_key() == "from-env"


def test_settings_keep_requests_within_one_batch_and_check_serve_limits(monkeypatch):
    from raylign.serving.settings import ServeError, ServeSettings, settings_from

    s = ServeSettings(model=MODEL, max_batch_size=6, max_n=8, max_prompts=4)
    assert (s.max_n, s.max_prompts) == (6, 1) and s.ongoing_requests() >= 6
    with pytest.raises(ServeError, match="max_ongoing_requests .* at least max_batch_size"):
        settings_from({"model": MODEL, "max_batch_size": 32, "max_ongoing_requests": 8})
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ServeError, match="NO_SUCH_KEY_VAR"):
        ServeSettings(model=MODEL, api_key_env="NO_SUCH_KEY_VAR", require_api_key=True).resolved_api_key()


def test_cli_serve_refuses_before_starting_anything(capsys, monkeypatch):
    from raylign.cli import main

    monkeypatch.delenv("RAYLIGN_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", MODEL, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "requests need an API key" in err and "--no-api-key" in err and "Traceback" not in err
    # an existing Ray: its proxy may listen on every interface, so a key is needed there too
    assert main(["serve", MODEL, "--ray-address", "127.0.0.1:1"]) == 2
    assert "existing Ray" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert main(["serve", MODEL]) == 2
    assert "existing Ray" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    # --api-key still works but warns: the key is in the process list (it travels as $RAYLIGN_API_KEY)
    assert main(["serve", MODEL, "--api-key", "k", "--max-batch-size", "16", "--max-ongoing-requests", "4"]) == 2
    err = capsys.readouterr().err
    assert "deprecated" in err and "(ps)" in err and "max_ongoing_requests" in err
    assert main(["serve", "no-such-org/no-such-model-xyz"]) == 2
    assert "builtin:" in capsys.readouterr().err
    assert main(["serve", MODEL, "--max-batch-size", "16", "--max-ongoing-requests", "4"]) == 2
    assert "max_ongoing_requests" in capsys.readouterr().err


def test_cluster_serve_yaml_is_a_valid_serve_config_for_app_builder():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from raylign.serving.deployment import DEPLOYMENT_NAME, app_builder, deployment_options
    from raylign.serving.settings import ServeSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "cluster/serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "raylign.serving:app_builder"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    # raylign derives Serve's queue options from args; the file must not override them
    assert "max_ongoing_requests" not in app.deployments[0].model_fields_set
    assert app.args["max_ongoing_requests"] >= app.args["max_batch_size"]
    assert config.http_options.request_timeout_s > app.args["request_timeout_s"]
    args = {**app.args, "model": MODEL}
    app_builder(args)  # builds (without Ray) from the file's args
    settings = ServeSettings.model_validate({"require_api_key": True, **args})
    assert settings.require_api_key and settings.api_key_env == "RAYLIGN_API_KEY"
    options = deployment_options(settings.model_copy(update={"min_replicas": 1, "max_replicas": 3, "num_cpus": 0.5}))
    assert options["autoscaling_config"]["max_replicas"] == 3 and options["ray_actor_options"]["num_cpus"] == 0.5
    # Serve hands a replica more than it serves and queues, so that the replica answers the excess itself
    # (an OpenAI 429); what waits at the proxy beyond that is bounded too, answered 429 with Retry-After
    assert options["max_ongoing_requests"] > settings.ongoing_requests() + settings.queued_requests()
    assert options["max_queued_requests"] >= settings.queued_requests() == 64
    assert (options["backpressure_config"].status_code, options["backpressure_config"].retry_after_s) == (429, 1)


def test_a_failing_batch_raises_to_its_requests_and_the_engine_serves_the_next(engine):
    import asyncio

    from raylign.serving.batching import stream_batch

    async def run(jobs):
        return [item async for item in stream_batch(engine, jobs)]

    broken = Job([[10**6]], Sampling(4, temperature=0.0))  # a token id outside the vocabulary
    with pytest.raises(IndexError):
        asyncio.run(run([broken, Job([engine.encode_text("Hi")], Sampling(4))]))
    steps = asyncio.run(run([Job([engine.encode_text("Hi")], Sampling(4, temperature=0.0))]))
    assert sum(u.finish_reason == "length" for step in steps for ups in step for u in ups) == 1


def test_a_lora_adapter_dir_is_served_merged_or_applied_alike(tmp_path, engine):
    from raylign.config import LoraConfig
    from raylign.models import apply_lora, load_causal_lm, save_model
    from raylign.serving.engine import Engine

    base, tokenizer = load_causal_lm(MODEL)
    adapted = apply_lora(base, LoraConfig(r=4, alpha=8), "CAUSAL_LM")
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # B starts at zero (an identity adapter); make it change the model
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter_dir = save_model(adapted, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").exists()

    prompt = engine.encode_text("The weather today is")
    job = [Job([prompt], Sampling(12, temperature=0.0))]
    merged, applied = Engine(str(adapter_dir), merge_lora=True), Engine(str(adapter_dir), merge_lora=False)
    assert type(merged.model).__name__ == "LlamaForCausalLM" and type(applied.model).__name__ == "PeftModelForCausalLM"
    assert merged.generate(job).rows == applied.generate(job).rows != engine.generate(job).rows


# ---- issue 15, items 9-12: overload, auth, stalls, error bodies -------------------------------------


def _asgi(app):
    """An async client on the app itself (one event loop for concurrent requests), loopback Host."""
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000", timeout=30)


class HeldBackend:
    """Generation that answers only once `release` is set (in the test's event loop); records its jobs."""

    reward_name = None

    def __init__(self, engine):
        self.engine = engine
        self.jobs = []
        self.release: asyncio.Event | None = None

    async def generate(self, job):
        from raylign.serving.engine import RowUpdate

        self.jobs.append(job)
        await self.release.wait()
        yield [RowUpdate(r, "ok", "stop", 1) for r in range(job.rows)]


def _app(backend, **overrides):
    from raylign.serving.api import create_api
    from raylign.serving.settings import ServeSettings

    return create_api(ServeSettings(model=MODEL, **overrides), backend)


def _error(response, status, code):
    from raylign.serving.protocol import ErrorResponse

    assert response.status_code == status, (response.status_code, response.text)
    error = ErrorResponse.model_validate(response.json()).error
    assert error.code == code and error.message, error
    return error


def test_a_full_replica_refuses_with_429_and_queued_time_counts_toward_the_timeout(engine):
    """Item 9: 1 request at work + 1 queued; the rest get 429 with Retry-After at once; the queued one
    is answered 408 one timeout after its arrival (its wait for a place counted), not one timeout after
    it got a place."""
    backend = HeldBackend(engine)
    app = _app(backend, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1, request_timeout_s=0.6)

    async def run():
        backend.release = asyncio.Event()
        async with _asgi(app) as client:
            async def post(prompt):
                start = time.monotonic()
                r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
                return r, time.monotonic() - start

            first = asyncio.create_task(post("one"))
            while not backend.jobs:  # the first holds the place
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(post("two"))
            await asyncio.sleep(0.05)
            refused = await asyncio.gather(*(post(f"more {i}") for i in range(3)))
            (r1, _), (r2, t2) = await first, await queued
            backend.release.set()
            after = await client.post("/v1/completions", json={"prompt": "later", "max_tokens": 2})
            return refused, r1, r2, t2, after

    refused, r1, r2, t2, after = asyncio.run(run())
    for r, seconds in refused:
        _error(r, 429, "server_busy")
        assert r.headers["retry-after"] == "1" and seconds < 0.6
        assert r.headers["server-timing"].startswith("replica;dur=")  # how long the replica held it
    _error(r1, 408, "timeout")
    _error(r2, 408, "timeout")
    assert 0.5 < t2 < 0.9  # it got the place only after ~0.55 s of its 0.6 s
    assert all(j.cancelled.is_set() for j in backend.jobs[:2])
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == "ok"


def test_admission_bounds_work_and_queue_and_drops_a_waiter_at_its_deadline():
    """Item 9: a request still waiting for a place at its deadline is answered 408 and never runs."""
    from raylign.serving.api import Admission, Refused

    async def run():
        admission = Admission(ongoing=1, queued=1)
        ran = []

        async def request(name, seconds):
            try:
                async with admission.place(time.monotonic() + seconds, seconds):
                    ran.append(name)
                    await asyncio.sleep(0.3)
                return name, 200
            except Refused as refused:
                return name, refused.error.status

        holder = asyncio.create_task(request("holder", 10))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(request("waiter", 0.1))
        await asyncio.sleep(0.01)
        refused = await request("refused", 10)
        return [refused, await waiter, await holder], ran, admission.waiting

    answers, ran, waiting = asyncio.run(run())
    assert answers == [("refused", 429), ("waiter", 408), ("holder", 200)]
    assert ran == ["holder"] and waiting == 0


def test_a_request_without_the_key_gets_401_before_its_body_is_read(engine):
    """Item 10: bad JSON, an over-large body, an unknown route: all 401 without the key."""
    from fastapi.testclient import TestClient

    client = TestClient(_app(OneJobBackend(engine), api_key="k3y", max_body_bytes=2048))
    bad_json = {"content": b'{"prompt": ', "headers": {"Content-Type": "application/json"}}
    _error(client.post("/v1/completions", **bad_json), 401, "invalid_api_key")
    _error(client.post("/v1/completions", content=b"x" * 5000), 401, "invalid_api_key")
    _error(client.post("/v1/chat/completions", **bad_json), 401, "invalid_api_key")
    _error(client.post("/v1/completions", content=bad_json["content"],
                       headers={**bad_json["headers"], "Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    authed = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    _error(client.post("/v1/completions", content=bad_json["content"], headers=authed), 400, "invalid_json")
    assert client.get("/health").status_code == 200  # probes need no key


def test_a_keyless_local_server_answers_only_loopback_host_names(engine):
    """Item 10: DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    from fastapi.testclient import TestClient

    from raylign.serving.settings import LOOPBACK_NAMES, host_allowed

    assert host_allowed("LOCALHOST:8000", LOOPBACK_NAMES) and host_allowed("[::1]:8000", LOOPBACK_NAMES)
    assert host_allowed("127.0.0.1", LOOPBACK_NAMES) and not host_allowed(None, LOOPBACK_NAMES)
    assert not host_allowed("127.0.0.1.evil.example", LOOPBACK_NAMES)
    client = TestClient(_app(OneJobBackend(engine), allowed_hosts=LOOPBACK_NAMES), base_url="http://127.0.0.1:8000")
    for host in ("evil.example", "evil.example:8000", "10.0.0.5:8000"):
        _error(client.get("/v1/models", headers={"Host": host}), 403, "host_not_allowed")
        _error(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"Host": host}),
               403, "host_not_allowed")
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200


def test_the_api_key_never_enters_serves_app_config(tmp_path, monkeypatch):
    """Item 10: the deployment's arguments name where the replica reads the key, never the key."""
    import json

    from raylign.serving.deployment import build_app
    from raylign.serving.settings import ServeError, ServeSettings

    key_file = tmp_path / "key"
    key_file.write_text("very-secret-value")
    monkeypatch.setenv("RAYLIGN_API_KEY", "also-secret-value")
    for source in ({"api_key_file": str(key_file)}, {"api_key_env": "RAYLIGN_API_KEY"}):
        app = build_app(ServeSettings(model=MODEL, require_api_key=True, **source))
        bound = json.dumps([app._bound_deployment.init_args, app._bound_deployment.init_kwargs], default=str)
        assert "secret-value" not in bound and next(iter(source.values())) in bound
    with pytest.raises(ServeError, match="api_key_file .* or api_key_env"):
        build_app(ServeSettings(model=MODEL, api_key="very-secret-value"))
    assert "secret" not in repr(ServeSettings(model=MODEL, api_key="very-secret-value"))


def test_prompts_are_tokenized_off_the_event_loop_within_a_token_budget(engine, monkeypatch):
    """Item 11: tokenizing runs on its own thread; prompt x n + max_tokens x n over the budget is a 400
    before anything is generated."""

    threads = []
    for name in ("encode_text", "encode_chat"):
        original = getattr(engine, name)

        def spy(*args, _original=original):
            threads.append(threading.current_thread().name)
            return _original(*args)

        monkeypatch.setattr(engine, name, spy)
    client, backend = _client(engine, max_request_tokens=100, max_tokens_limit=64)
    assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 2}).status_code == 200
    assert len(threads) == 2 and all(t.startswith("raylign-tokenize") for t in threads), threads
    generated = len(backend.jobs)
    prompt = "one two three four five six seven eight nine ten"  # >= 10 tokens
    error = _error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, "n": 2}),
                   400, "token_budget_exceeded")
    assert "limit per request is 100" in error.message
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                     "max_tokens": 10, "n": 8}), 400, "token_budget_exceeded")
    assert len(backend.jobs) == generated  # refused before generation


def test_score_jobs_skip_requests_gone_between_chunks():
    from raylign.serving.batching import ScoreJob, score_jobs

    calls = []

    def score(prompts, completions):
        calls.append(list(completions))
        if len(calls) == 2:
            gone.cancel()  # it times out while its second chunk is scored
        return [float(len(c)) for c in completions]

    kept = ScoreJob([None] * 3, ["a", "bb", "ccc"])
    gone = ScoreJob([None] * 6, ["x"] * 6)
    late = ScoreJob([None], ["dddd"], deadline=time.monotonic() - 1)
    assert score_jobs(score, [kept, gone, late], chunk=2) == [[1.0, 2.0, 3.0], None, None]
    assert calls == [["a", "bb"], ["ccc", "x"]]  # the rest of `gone`, and `late`, never scored


def test_a_timed_out_score_request_stops_its_work(engine):
    """Item 11: /v1/score past its deadline answers 408 and its remaining pairs are never scored."""
    from fastapi.testclient import TestClient

    from raylign.serving.batching import score_jobs

    calls = []

    class SlowScorer:
        reward_name = "slow"

        def __init__(self):
            self.engine = engine

        async def score(self, job):
            def slow(prompts, completions):
                calls.append(len(completions))
                time.sleep(0.1)
                return [0.0] * len(completions)

            loop = asyncio.get_running_loop()
            (scores,) = await loop.run_in_executor(None, lambda: score_jobs(slow, [job], chunk=2))
            return scores

    client = TestClient(_app(SlowScorer(), request_timeout_s=0.25))
    pairs = [{"prompt": "Q", "completion": f"answer {i}"} for i in range(32)]
    _error(client.post("/v1/score", json={"pairs": pairs}), 408, "timeout")
    time.sleep(0.4)
    assert 1 <= len(calls) <= 4, calls  # 16 chunks if it had run on


def test_requests_gone_while_waiting_for_admission_are_never_prefilled(engine, monkeypatch):
    """Item 11: a cancelled request, one past its deadline, and one whose deadline passes while it waits
    behind a full batch are finished without a prefill; their batch mates are served as usual."""
    from raylign.serving.engine import Engine

    prefilled = []
    original = Engine._prefill

    def spy(self, prompts, *args, **kwargs):
        prefilled.append([list(p) for p in prompts])
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "_prefill", spy)
    live_prompt, gone_prompt = engine.encode_text("Still here"), engine.encode_text("Long gone")
    cancelled = Job([gone_prompt], Sampling(4, temperature=0.0), n=2)
    cancelled.cancel()
    expired = Job([gone_prompt], Sampling(4, temperature=0.0), deadline=time.monotonic() - 1)
    live = Job([live_prompt], Sampling(4, temperature=0.0))
    updates = []
    result = engine.generate([cancelled, live, expired], emit=updates.append)
    assert [f for _, _, f in result.rows[0]] == ["cancelled"] * 2 and result.rows[2][0][2] == "cancelled"
    assert result.rows[1][0][2] in ("stop", "length")
    assert all(gone_prompt not in rows for rows in prefilled) and [live_prompt] in prefilled
    ended = {(j, u.row): u.finish_reason for step in updates for j, ups in step.items() for u in ups if u.finish_reason}
    assert ended[(0, 0)] == ended[(0, 1)] == ended[(2, 0)] == "cancelled"

    # waiting behind a full running batch: its deadline passes before there is room for it
    prefilled.clear()
    full = Job([live_prompt], Sampling(30, temperature=0.0), n=engine.max_rows)
    running = engine.submit([full])
    waiting = engine.submit([Job([gone_prompt], Sampling(4, temperature=0.0), deadline=time.monotonic() + 0.05)])
    assert waiting.result(60).rows[0][0][2] == "cancelled" and running.result(60).steps == 30
    assert all(gone_prompt not in rows for rows in prefilled)


class Fatal(BaseException):
    """Not an Exception: escapes the decode loop's per-request handlers, as a bug there would."""


def test_a_dead_decode_thread_fails_health_so_serve_replaces_the_replica(monkeypatch):
    """Item 11: requests it held fail at once (not at their timeout); /health and Serve's check_health
    fail; new requests get 503."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from raylign.serving.deployment import RaylignServer
    from raylign.serving.engine import Engine, EngineDead

    dying = Engine(MODEL)
    client = TestClient(_app(OneJobBackend(dying), request_timeout_s=60))
    assert client.get("/health").status_code == 200

    def step():
        raise Fatal("decode loop bug")

    monkeypatch.setattr(dying, "_step", step)
    start = time.monotonic()
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    assert time.monotonic() - start < 30
    _error(r, 503, "replica_unavailable")
    with pytest.raises(EngineDead):
        dying.check_alive()
    _error(client.get("/health"), 503, "replica_unavailable")
    _error(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}), 503, "replica_unavailable")
    with pytest.raises(EngineDead):  # Serve's health check of the replica
        RaylignServer.func_or_class.check_health(SimpleNamespace(engine=dying))


class FailingBackend(OneJobBackend):
    async def generate(self, job):
        yield []
        raise RuntimeError("cannot open /home/alice/secret-model/weights.bin")


def test_5xx_bodies_carry_a_request_id_and_leave_the_detail_to_the_log(engine, caplog):
    """Item 12: the exception text and paths go to the replica log under the request id, never to the client."""
    from fastapi.testclient import TestClient

    server_log = logging.getLogger("ray.serve")
    server_log.addHandler(caplog.handler)
    try:
        client = TestClient(_app(FailingBackend(engine)), raise_server_exceptions=False)
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
        error = _error(r, 500, "internal_error")
        rid = r.headers["x-request-id"]
        assert rid in error.message and "secret" not in r.text and "alice" not in r.text
        stream = client.post("/v1/chat/completions", headers={"X-Request-Id": "client-id-7"},
                             json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True})
        assert stream.status_code == 200 and "client-id-7" in stream.text and '"code": "internal_error"' in stream.text
        assert "secret" not in stream.text
    finally:
        server_log.removeHandler(caplog.handler)
    logged = [rec for rec in caplog.records if rec.exc_info and "secret-model" in str(rec.exc_info[1])]
    assert {rid, "client-id-7"} <= {arg for rec in logged for arg in rec.args}, [rec.getMessage() for rec in logged]
