"""Serving throughput: `raylign serve` (Ray Serve, continuous batching) against a peer server on the same
model and the same concurrent requests: a plain one-request-at-a-time `transformers` HTTP server
(`--peer plain`, the default) or Hugging Face's own OpenAI-compatible server,
`transformers serve --continuous-batching` (`--peer transformers-serve`).

Both servers run as their own process on this machine, one after the other (never together), each
with the same number of torch threads (`--threads`, default 2 = this machine's cores): raylign as
`raylign serve MODEL --cpus-per-replica THREADS` on its own local Ray; the plain server is written
below (`plain_server`): Python's `http.server` handling one request at a time, each with one
`model.generate` call (KV cache, greedy) on the same model directory, the same chat template and the
same stopping (EOS or `max_tokens`), answering the same OpenAI chat-completions JSON.

`transformers serve` runs as `transformers serve MODEL_DIR --continuous-batching --device cpu --dtype
float32` (the CLI next to this Python), pinned to the same local model directory, with
HF_HUB_OFFLINE=1 so it never reaches for the Hub, and OMP_NUM_THREADS=--threads (torch's default
thread count; transformers serve has no thread option). The servers run one at a time: one is started,
warmed up, given every `--clients` count in turn, and stopped before the other starts.

The load is the same for both: `--clients` concurrent clients (default 32; `1,8,32` runs each count in
turn), each sending `--requests` chat requests one after another (default 8), greedy, `--max-tokens`
tokens (default 32), streamed (`stream: true`, `stream_options.include_usage`), prompts from
`builtin:everyday-prompts` in a fixed order. Each request is one raw HTTP/1.1 connection over asyncio
streams (`stream_chat`; an httpx client holding dozens of connections costs seconds per burst on a
2-core machine by itself). Each server gets `--warmup` requests first (not timed). Reported per side
and client count: requests/s and completion tokens/s over the wall time from the first request to
the last answer, p50/p99 time to first token (the first non-empty content delta of the stream) and
p50/p99 request latency (to the end of the stream); then the ratios raylign/peer. Every answer must
be an HTTP 200 with the requested number of tokens (the stream's final `usage`) or an earlier EOS;
the script fails otherwise.

    python bench/serve_throughput.py                          # SmolLM2-135M if cached, else tiny:llama
    RAYLIGN_HOME=/tmp/qs-home python bench/serve_throughput.py --model builtin:smollm2-135m-instruct \
        --peer transformers-serve --clients 1,8,32 --requests 4 --max-tokens 32
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
    clients: int
    requests: int
    seconds: float
    completion_tokens: int
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    load: float  # 1-minute load average when the load ended

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def line(self) -> str:
        return (f"{self.side:18s} {self.clients:3d} clients {self.requests:4d} requests in {self.seconds:7.2f} s: "
                f"{self.requests_per_s:6.2f} req/s, {self.tokens_per_s:7.1f} tokens/s, time to first token p50 "
                f"{self.ttft_p50_s:6.2f} s p99 {self.ttft_p99_s:6.2f} s, latency p50 {self.p50_s:6.2f} s p99 "
                f"{self.p99_s:6.2f} s (load {self.load:.1f})")


def _prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `values` (q in [0, 1]): the sorted value at round(q·(n−1))."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def stream_chat(host: str, port: int, body: dict, side: str) -> tuple[float, float, int, str]:
    """POST a streaming chat request over one fresh HTTP/1.1 connection with asyncio streams (like
    `_common.raw_post`: an httpx client holding dozens of connections costs seconds per burst on a 2-core
    machine by itself) and read its server-sent events as they come: (seconds to the first non-empty
    content delta, seconds to the end, completion tokens from the final `usage`, finish reason)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            "Accept: text/event-stream", f"Content-Length: {len(data)}", "Connection: close"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    status_line = (await reader.readline()).decode("latin-1")
    fields = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        fields[k.strip().lower()] = v.strip()
    status = int(status_line.split(" ", 2)[1])
    if status != 200:
        rest = await reader.read()
        writer.close()
        raise SystemExit(f"{side}: HTTP {status}: {rest[:300]!r}")
    first = None
    tokens, finish, buffer = -1, "", b""
    async for piece in _body_pieces(reader, fields.get("transfer-encoding") == "chunked"):
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode().splitlines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    if first is None and (choice.get("delta") or {}).get("content"):
                        first = time.monotonic() - start
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    writer.close()
    if tokens < 0:
        raise SystemExit(f"{side}: the stream sent no usage (stream_options.include_usage was asked for)")
    end = time.monotonic() - start
    return (first if first is not None else end), end, tokens, finish


async def _body_pieces(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives, with HTTP/1.1 chunked transfer encoding undone."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


async def _load(port: int, model: str, args: argparse.Namespace, side: str, clients: int) -> Result:
    prompts = _prompts()
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0

    async def ask(i: int) -> tuple[float, float, int]:
        body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        ttft, seconds, used, finish = await stream_chat("127.0.0.1", port, body, side)
        if not (used == args.max_tokens or (finish == "stop" and 0 < used <= args.max_tokens)):
            raise SystemExit(f"{side}: an answer has {used} tokens (finish {finish!r}) for max_tokens={args.max_tokens}")
        return ttft, seconds, used

    async def client_loop(c: int) -> None:
        nonlocal tokens
        for r in range(args.requests):
            ttft, seconds, used = await ask(c * args.requests + r)
            tokens += used
            latencies.append(seconds)
            ttfts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    seconds = time.perf_counter() - start
    return Result(side, clients, len(latencies), seconds, tokens, percentile(latencies, 0.5),
                  percentile(latencies, 0.99), percentile(ttfts, 0.5), percentile(ttfts, 0.99), os.getloadavg()[0])


async def _warmup(port: int, model: str, args: argparse.Namespace, side: str) -> None:
    prompts = _prompts()
    await asyncio.gather(*(stream_chat("127.0.0.1", port, {
        "model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
        "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
        side) for i in range(args.warmup)))


# ---- running the sides ------------------------------------------------------------------------------


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


def server_command(side: str, args: argparse.Namespace, model_dir: str, port: int) -> tuple[list[str], str]:
    """(the command line that serves `model_dir` on `port` for `side`, the model name requests carry)."""
    if side == "raylign":
        return [sys.executable, "-m", "raylign.cli", "serve", model_dir, "--served-model-name", "bench",
                "--port", str(port), "--cpus-per-replica", str(args.threads), "--max-batch-size",
                str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms), "--max-tokens-limit",
                str(max(args.max_tokens, 16)), *args.raylign_arg], "bench"
    if side == "transformers-serve":
        # transformers' own CLI next to this interpreter; the model directory is local (HF_HUB_OFFLINE=1 in
        # its environment), pinned as the server's only model, so requests name that same directory.
        cli = str(Path(sys.executable).with_name("transformers"))
        return [cli, "serve", model_dir, "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], model_dir
    return [sys.executable, __file__, "--plain-server", model_dir, "--port", str(port), "--threads",
            str(args.threads)], "bench"


def run_side(side: str, args: argparse.Namespace, model_dir: str, clients: list[int]) -> list[Result]:
    """Start `side`'s server alone, warm it up, run every client count against it in turn, stop it."""
    port = _free_port()
    # Every server gets the same threads: raylign through --cpus-per-replica, the others through OpenMP's.
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd, model = server_command(side, args, model_dir, port)
    log = open(Path(args.workdir) / f"{side}-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    out = []
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        asyncio.run(_warmup(port, model, args, side))
        for c in clients:
            out.append(asyncio.run(_load(port, model, args, side, c)))
            print(out[-1].line(), flush=True)
        return out
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
    p.add_argument("--peer", choices=["plain", "transformers-serve"], default="plain",
                   help="the other server: plain = one request at a time (below); transformers-serve = "
                        "`transformers serve --continuous-batching` of the installed transformers")
    p.add_argument("--clients", default="32", help="concurrent clients; a comma list (1,8,32) runs each in turn")
    p.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4, help="untimed requests per server first")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--max-batch-size", type=int, default=32, help="raylign: rows per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="raylign: how long a batch waits to fill")
    p.add_argument("--raylign-arg", action="append", default=[], metavar="ARG",
                   help="an extra `raylign serve` argument (repeatable), e.g. --raylign-arg=--dtype=bfloat16")
    p.add_argument("--only", choices=["raylign", "peer"], help="run one side")
    p.add_argument("--workdir", default="/tmp/raylign-bench-serve", help="server logs go here")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plain-server", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in str(args.clients).split(",")]
    except ValueError:
        p.error(f"--clients: a number or a comma list of numbers, not {args.clients!r}")
    if any(c < 1 for c in args.client_counts) or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    return args


def ratio_lines(ours: Result, peer: Result, peer_name: str) -> tuple[str, dict[str, float]]:
    """The raylign/peer ratios at one client count, and whether the issue's target is met there."""
    ratios = {"requests_per_s": ours.requests_per_s / peer.requests_per_s,
              "tokens_per_s": ours.tokens_per_s / peer.tokens_per_s, "ttft_p50": ours.ttft_p50_s / peer.ttft_p50_s,
              "ttft_p99": ours.ttft_p99_s / peer.ttft_p99_s, "latency_p50": ours.p50_s / peer.p50_s,
              "latency_p99": ours.p99_s / peer.p99_s}
    if peer_name == "transformers-serve":  # issue 20: >= 2x at 32 clients with p99 no worse; >= 1x at 1 client
        need = 2.0 if ours.clients >= 32 else 1.0
        met = ratios["requests_per_s"] >= need and (ours.clients < 32 or ratios["latency_p99"] <= 1.0)
        target = f">= {need:g}x requests/s" + (" and p99 latency <= 1x" if ours.clients >= 32 else "")
    else:
        met, target = ratios["requests_per_s"] >= 5, ">= 5x requests/s"
    return (f"raylign / {peer_name} at {ours.clients} clients: {ratios['requests_per_s']:.2f}x requests/s, "
            f"{ratios['tokens_per_s']:.2f}x tokens/s, time to first token p50 {ratios['ttft_p50']:.2f}x p99 "
            f"{ratios['ttft_p99']:.2f}x, latency p50 {ratios['latency_p50']:.2f}x p99 {ratios['latency_p99']:.2f}x "
            f"(target {target}: {'met' if met else 'NOT met'})"), ratios


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
    print(f"model {model} ({model_dir}); {args.client_counts} clients x {args.requests} streamed chat requests, "
          f"greedy, max_tokens={args.max_tokens}; {args.threads} torch threads per server; raylign max batch "
          f"{args.max_batch_size} rows, wait {args.batch_wait_ms:g} ms; peer {args.peer}; load avg "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    sides = {"peer": args.peer, "raylign": "raylign"}
    results: dict[str, list[Result]] = {}
    for key in ["peer", "raylign"] if args.only is None else [args.only]:
        results[sides[key]] = run_side(sides[key], args, model_dir, args.client_counts)
    ratios = {}
    if len(results) == 2:
        for ours, peer in zip(results["raylign"], results[args.peer], strict=True):
            line, ratios[ours.clients] = ratio_lines(ours, peer, args.peer)
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model, "args": {k: v for k, v in vars(args).items() if k not in ("plain_server", "port")},
            "results": {k: [{**asdict(r), "requests_per_s": r.requests_per_s, "tokens_per_s": r.tokens_per_s}
                            for r in v] for k, v in results.items()},
            "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
