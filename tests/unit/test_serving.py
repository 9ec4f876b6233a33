"""Serving without Ray: per-row sampling math, the engine's batches (per-row settings, cancellation,
streaming), the HTTP app on a one-request-per-batch backend (timeouts, body limits, auth off by
default), the API-key policy, the CLI's early errors and cluster/serve.yaml."""

from __future__ import annotations

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
    assert [(f, n) for _, n, f in result.rows[0]] == [("cancelled", 1)] * 2
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
    client, backend = _client(engine, request_timeout_s=0.001, max_tokens_limit=64)
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 64})
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    assert backend.jobs[-1].cancelled.is_set()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                                                  "max_tokens": 64})
    assert r.status_code == 200 and '"code": "timeout"' in r.text  # a started stream reports it in-band
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


def test_api_key_policy(monkeypatch):
    from raylign.serving.settings import ServeError, api_key_policy, is_local_host

    monkeypatch.delenv("RAYLIGN_API_KEY", raising=False)
    assert is_local_host("127.0.0.1") and is_local_host("::1") and not is_local_host("0.0.0.0")
    assert api_key_policy("127.0.0.1", None, False) == (None, False)
    assert api_key_policy("127.0.0.1", "k", False) == ("k", True)
    with pytest.raises(ServeError, match="--api-key KEY .* or --no-api-key"):
        api_key_policy("0.0.0.0", None, False)
    assert api_key_policy("0.0.0.0", None, True) == (None, False)
    monkeypatch.setenv("RAYLIGN_API_KEY", "from-env")
    assert api_key_policy("10.0.0.5", None, False) == ("from-env", True)
    with pytest.raises(ServeError, match="contradict"):
        api_key_policy("0.0.0.0", "k", True)


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
    assert main(["serve", MODEL, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "requests need an API key" in err and "--no-api-key" in err and "Traceback" not in err
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
    assert app.deployments[0].max_ongoing_requests >= app.args["max_batch_size"]
    args = {**app.args, "model": MODEL}
    app_builder(args)  # builds (without Ray) from the file's args
    settings = ServeSettings.model_validate({"require_api_key": True, **args})
    assert settings.require_api_key and settings.api_key_env == "RAYLIGN_API_KEY"
    options = deployment_options(settings.model_copy(update={"min_replicas": 1, "max_replicas": 3, "num_cpus": 0.5}))
    assert options["autoscaling_config"]["max_replicas"] == 3 and options["ray_actor_options"]["num_cpus"] == 0.5


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
