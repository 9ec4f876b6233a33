"""lm-evaluation-harness as a real client of the serving endpoint: its `local-completions` model (the
OpenAI completions client lm-eval users point at a server) against the raylign app, and its own `hf`
model on the same model directory, over two small local tasks written here (a multiple-choice
`loglikelihood` task and a `generate_until` task). The two must agree: the same accuracy, the same
per-item log-likelihoods (1e-3) and greedy-flags, the same greedy generations.

The server is the app of `raylign.serving.api` (what `raylign serve` runs behind Serve's proxy) with a
`LocalBackend` (no Ray) under uvicorn on a free loopback port in a thread. Loglikelihood requests are
lm-eval's `echo=True, logprobs=1, max_tokens=1` completions of token-id prompts; generation requests
send token ids, `stop` strings and temperature 0. lm-eval runs in-process through `simple_evaluate`,
the function its `lm_eval --model ...` command calls.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

MODEL = "tiny:llama"
SERVED = "tiny-llama"

MC_ROWS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "the sea"], "answer": 0},
    {"question": "Water boils at", "choices": ["one hundred degrees", "ten degrees", "the west"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["west", "east"], "answer": 1},
    {"question": "Cats like to", "choices": ["sleep", "boil the water", "fly"], "answer": 0},
]
GEN_ROWS = [
    {"prompt": "The quick brown fox", "target": "jumps"},
    {"prompt": "What is the capital of Italy?", "target": "Rome"},
    {"prompt": "Good morning! How are you today?", "target": "I am fine"},
]


def _write_tasks(root: Path) -> None:
    """A multiple-choice and a generation task: YAML over JSONL, as a user defines a local task."""
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    data = lambda name: (  # noqa: E731
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}\n"
        f"  cache_dir: {root / 'datasets'}\ntest_split: test\n")
    (root / "mc.yaml").write_text(
        "task: raylign_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: raylign_gen\n" + data("gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 16\n  do_sample: false\n  temperature: 0.0\n'
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def server():
    """The raylign app on a free loopback port: (completions URL, model directory)."""
    import torch
    import uvicorn

    from raylign.models import resolve_model_path
    from raylign.serving.api import create_api
    from raylign.serving.batching import LocalBackend
    from raylign.serving.engine import Engine
    from raylign.serving.settings import ServeSettings

    # One thread: the model is tiny, and two threads on a shared two-core machine spend more time
    # waiting for each other than computing (a 1-token request: ~25 ms with one, up to 1 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(MODEL)  # its decode thread takes this setting
    app = create_api(ServeSettings(model=MODEL, served_model_name=SERVED), LocalBackend(engine))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/completions", resolve_model_path(MODEL)
    uv.should_exit = True
    thread.join(10)
    sock.close()
    torch.set_num_threads(threads)


def _evaluate(model: str, model_args: str, root: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["raylign_mc", "raylign_gen"],
                           task_manager=TaskManager(include_path=str(root), include_defaults=False), batch_size=1, device="cpu",
                           log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def _per_item(result: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_local_completions_agrees_with_its_hf_backend(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    url, model_dir = server
    _write_tasks(tmp_path)
    served = _evaluate("local-completions", f"model={SERVED},base_url={url},tokenizer={model_dir},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,max_length=512,max_retries=1",
                       tmp_path)
    reference = _evaluate("hf", f"pretrained={model_dir},dtype=float32", tmp_path)

    assert served["results"]["raylign_mc"]["acc,none"] == reference["results"]["raylign_mc"]["acc,none"]
    ours, theirs = _per_item(served, "raylign_mc"), _per_item(reference, "raylign_mc")
    assert len(ours) == len(MC_ROWS) and [len(r) for r in ours] == [len(r["choices"]) for r in MC_ROWS]
    for our_item, their_item in zip(ours, theirs, strict=True):
        for [(our_ll, our_greedy)], [(their_ll, their_greedy)] in zip(our_item, their_item, strict=True):
            assert float(our_ll) == pytest.approx(float(their_ll), abs=1e-3)
            assert our_greedy == their_greedy
    generated, expected = _per_item(served, "raylign_gen"), _per_item(reference, "raylign_gen")
    assert len(generated) == len(GEN_ROWS) and generated == expected
    assert any(text for [text] in generated)  # the comparison is not between empty answers
    assert served["results"]["raylign_gen"]["exact_match,none"] == reference["results"]["raylign_gen"]["exact_match,none"]
