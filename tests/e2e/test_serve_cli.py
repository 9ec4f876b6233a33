"""`raylign serve` as a user runs it: it starts its own Ray and Serve, prints the URL and a curl command
that works as printed, serves until Ctrl-C, then shuts Serve and Ray down and exits 0. The API key,
given in the environment, reaches the replicas without appearing in any process's command line."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

KEY = "cli-test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _line_reader(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read by a thread (selecting on the pipe would miss lines that
    Python's buffered reader already pulled in with an earlier one); None marks the end."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(lines: queue.Queue, marker: str, timeout_s: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} from raylign serve; output:\n" + "\n".join(seen))


def _command_lines_with(text: str) -> list[str]:
    """Command lines of this machine's processes that contain `text` (what `ps` shows every user)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in args:
            found.append(args)
    return found


def _drain(lines: queue.Queue) -> list[str]:
    """Every line left, up to the end marker (the process has exited)."""
    out = []
    while (line := lines.get(timeout=30)) is not None:
        out.append(line)
    return out


def test_raylign_serve_prints_a_working_curl_and_stops_on_ctrl_c():
    port = _free_port()
    env = {**os.environ, "RAYLIGN_API_KEY": KEY, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylign.cli", "serve", "tiny:llama", "--port", str(port), "--cpus-per-replica", "0.5",
         "--max-batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output = _line_reader(proc)
        lines = _read_until(output, "Ctrl-C to stop.", timeout_s=240)
        text = "\n".join(lines)
        assert f"raylign: serving tiny:llama at http://127.0.0.1:{port}/v1" in text
        assert "requests need 'Authorization: Bearer <key>'" in text  # the key came from $RAYLIGN_API_KEY
        assert "queued per replica (more get 429)" in text
        assert _command_lines_with(KEY) == []  # not in `ps`: not on Ray's, Serve's or a replica's command line
        (curl,) = [line.removeprefix("try:").strip() for line in lines if line.startswith("try:")]
        assert curl.startswith("curl ") and "$RAYLIGN_API_KEY" in curl and KEY not in curl
        answer = subprocess.run(["bash", "-c", curl + " --silent --show-error --fail-with-body"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert '"object":"chat.completion"' in answer.stdout and '"completion_tokens"' in answer.stdout
        denied = subprocess.run(["bash", "-c", curl.replace(' -H "Authorization: Bearer $RAYLIGN_API_KEY"', "")
                                 + " --silent --write-out ' %{http_code}'"], capture_output=True, text=True, timeout=60)
        assert denied.stdout.endswith(" 401"), denied.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("raylign serve did not stop within 90 s of Ctrl-C")
        rest = "\n".join(_drain(output))
    assert proc.returncode == 0, rest
    assert "raylign: shutting down" in rest and "raylign: stopped." in rest
    with socket.socket() as sock:  # the proxy is gone: the port is free again
        sock.bind(("127.0.0.1", port))
