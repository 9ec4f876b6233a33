"""Serving throughput: `raylign serve` (Ray Serve, continuous batching) against a plain one-request-at-a-time
`transformers` HTTP server, on the same model and the same concurrent requests.

Both servers run as their own process on this machine, one after the other (never together), each
with the same number of torch threads (`--threads`, default 2 = this machine's cores): raylign as
`raylign serve MODEL --cpus-per-replica THREADS` on its own local Ray; the plain server is written
below (`plain_server`): Python's `http.server` handling one request at a time, each with one
`model.generate` call (KV cache, greedy) on the same model directory, the same chat template and the
same stopping (EOS or `max_tokens`), answering the same OpenAI chat-completions JSON.

The load is the same for both: `--clients` concurrent clients (default 32), each sending `--requests`
chat requests one after another (default 8), greedy, `--max-tokens` tokens (default 32), prompts from
`builtin:everyday-prompts` in a fixed order. Each side gets `--warmup` requests first (not timed).
Reported per side: requests/s and completion tokens/s over the wall time from the first request to
the last answer, p50/p99 request latency; then the ratios raylign/plain. Every answer must be an
HTTP 200 with the requested number of tokens or an earlier EOS; the script fails otherwise.

    python bench/serve_throughput.py                          # SmolLM2-135M if cached, else tiny:llama
    RAYLIGN_HOME=/tmp/qs-home python bench/serve_throughput.py --model builtin:smollm2-135m-instruct
    python bench/serve_throughput.py --clients 32 --requests 8 --max-tokens 32 --json serve.json

On a machine shared with other work, check `uptime` first: another process holding a core slows the
side that happens to run meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "raylign" / "data" / "builtin" / "everyday_prompts.jsonl"
PREFERRED = "builtin:smollm2-135m-instruct"
FALLBACK = "tiny:llama"


# ---- the plain server ----------------------------------------------------------------------------


def plain_server(model_dir: str, port: int, threads: int) -> None:
    """A one-request-at-a-time transformers server answering POST /v1/chat/completions (subprocess)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self._reply(200, {"status": "ok"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            finish = "stop" if new and new[-1] == eos else "length"
            content = tokenizer.decode(new, skip_special_tokens=True)
            prompt_tokens = ids["input_ids"].shape[1]
            self._reply(200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new),
                          "total_tokens": prompt_tokens + len(new)}})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    class Server(HTTPServer):
        request_queue_size = 1024  # all clients connect at once; they wait in the backlog, one is served

    Server(("127.0.0.1", port), Handler).serve_forever()


# ---- load generation ------------------------------------------------------------------------------


@dataclass
class Result:
    side: str
    requests: int
    seconds: float
    completion_tokens: int
    p50_s: float
    p99_s: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def line(self) -> str:
        return (f"{self.side:8s} {self.requests:4d} requests in {self.seconds:7.2f} s: {self.requests_per_s:7.2f} req/s, "
                f"{self.tokens_per_s:8.1f} tokens/s, latency p50 {self.p50_s:6.2f} s, p99 {self.p99_s:6.2f} s")


def _prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]


async def _load(url: str, model: str, headers: dict, args: argparse.Namespace, side: str) -> Result:
    import httpx

    prompts = _prompts()
    latencies: list[float] = []
    tokens = 0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients + 4)) as client:
        async def ask(i: int) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": args.max_tokens, "temperature": 0}
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"{side}: HTTP {r.status_code}: {r.text[:300]}")
            out = r.json()
            used = out["usage"]["completion_tokens"]
            if not (used == args.max_tokens or (out["choices"][0]["finish_reason"] == "stop" and 0 < used)):
                raise SystemExit(f"{side}: an answer has {used} tokens for max_tokens={args.max_tokens}: {out}")
            return used

        await asyncio.gather(*(ask(i) for i in range(args.warmup)))

        async def client_loop(c: int) -> None:
            nonlocal tokens
            for r in range(args.requests):
                start = time.perf_counter()
                used = await ask(c * args.requests + r)  # not `tokens += await ...`: that reads tokens first
                tokens += used
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(args.clients)))
        seconds = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return Result(side, len(latencies), seconds, tokens, statistics.median(latencies), p99)


# ---- running the two sides --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_side(side: str, args: argparse.Namespace, model_dir: str) -> Result:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": ""}
    if side == "raylign":
        cmd = [sys.executable, "-m", "raylign.cli", "serve", model_dir, "--served-model-name", "bench",
               "--port", str(port), "--cpus-per-replica", str(args.threads), "--max-batch-size", str(args.max_batch_size),
               "--batch-wait-ms", str(args.batch_wait_ms), "--max-tokens-limit", str(max(args.max_tokens, 16))]
        log = open(Path(args.workdir) / "raylign-serve.log", "w")  # noqa: SIM115 - closed below
    else:
        cmd = [sys.executable, __file__, "--plain-server", model_dir, "--port", str(port), "--threads", str(args.threads)]
        log = open(Path(args.workdir) / "plain-server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(url, proc)
        return asyncio.run(_load(url, "bench", {}, args, side))
    finally:
        _stop(proc)
        log.close()


def _model_dir(name: str) -> str:
    from raylign.models import resolve_model_path

    return resolve_model_path(name)


def _default_model() -> str:
    from raylign.models import models_cache_dir

    return PREFERRED if (models_cache_dir() / "smollm2-135m-instruct" / "config.json").is_file() else FALLBACK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help=f"model on both sides (default: {PREFERRED} if cached, else {FALLBACK})")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4, help="untimed requests per side first")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--max-batch-size", type=int, default=32, help="raylign: rows per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="raylign: how long a batch waits to fill")
    p.add_argument("--only", choices=["raylign", "plain"], help="run one side")
    p.add_argument("--workdir", default="/tmp/raylign-bench-serve", help="server logs go here")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plain-server", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plain_server:
        plain_server(args.plain_server, args.port, args.threads)
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    model = args.model or _default_model()
    if model == FALLBACK and not args.model:
        print(f"note: {PREFERRED} is not cached (run `raylign models pull {PREFERRED}` or set RAYLIGN_HOME); "
              f"using {FALLBACK}, a random model far smaller than anything real, where batching matters less")
    model_dir = _model_dir(model)
    print(f"model {model} ({model_dir}); {args.clients} clients x {args.requests} chat requests, greedy, "
          f"max_tokens={args.max_tokens}; {args.threads} torch threads per server; raylign max batch "
          f"{args.max_batch_size} rows, wait {args.batch_wait_ms:g} ms", flush=True)
    results = {}
    for side in ["plain", "raylign"] if args.only is None else [args.only]:
        results[side] = run_side(side, args, model_dir)
        print(results[side].line(), flush=True)
    if len(results) == 2:
        ours, plain = results["raylign"], results["plain"]
        ratio = ours.requests_per_s / plain.requests_per_s
        print(f"raylign / plain: {ratio:.2f}x requests/s, {ours.tokens_per_s / plain.tokens_per_s:.2f}x tokens/s, "
              f"p50 latency {ours.p50_s / plain.p50_s:.2f}x, p99 latency {ours.p99_s / plain.p99_s:.2f}x "
              f"(target: >= 5x requests/s: {'met' if ratio >= 5 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model, "args": {k: v for k, v in vars(args).items() if k not in ("plain_server", "port")},
            "results": {k: {**asdict(v), "requests_per_s": v.requests_per_s, "tokens_per_s": v.tokens_per_s}
                        for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
