"""Helpers of the annotation tests: a real `annotate serve` in a subprocess, tasks, annotator tokens."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["the weather", "my garden", "this book", "the city", "our team", "the music", "dinner", "the trip",
          "my job", "the movie", "the park", "breakfast"]
GOOD = ["great", "lovely", "wonderful", "happy", "excellent"]
BAD = ["awful", "sad", "terrible", "gloomy", "horrible"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vader_items(n: int, seed: int = 0) -> list[dict]:
    """Pairwise items whose better answer (for VADER) is cheerful, on a random side."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        good = f"I think {topic} is {rng.choice(GOOD)}."
        bad = f"I think {topic} is {rng.choice(BAD)}."
        a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
        rows.append({"item_id": f"p{i:04d}", "kind": "pairwise", "prompt": f"Tell me about {topic}.",
                     "response_a": a, "response_b": b})
    return rows


def write_task(path: Path, items: list[dict], **header) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"raylign_task": 1, **header}) + "\n")
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`raylign annotate ARGS` in a subprocess (through `python -m raylign.annotation.cli`)."""
    proc = subprocess.run([sys.executable, "-m", "raylign.annotation.cli", *args], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"annotate {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def add_annotator(db: Path, name: str, url: str) -> tuple[str, str]:
    """(link, token) printed by `annotate add-annotator`."""
    out = cli("add-annotator", name, "--db", str(db), "--url", url).stdout
    link = re.search(r"link (\S+)", out)
    assert link, out
    return link.group(1), link.group(1).rsplit("/a/", 1)[1]


class Server:
    """`annotate serve TASK --db DB` on a free port, until `stop()` (SIGTERM) or `kill()` (SIGKILL)."""

    def __init__(self, task: Path, db: Path, port: int | None = None):
        self.task, self.db = task, db
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(".serve.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "raylign.annotation.cli", "serve", str(self.task),
                                          "--db", str(self.db), "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"annotate serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"annotate serve did not answer within 60 s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
