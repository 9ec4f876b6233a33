"""`raylign train` as a Ray job: `ray job submit` against a separately started head, token auth on.

The head belongs to this test alone: free ports, its own short `--temp-dir`, and a fresh token given to
the `ray` subprocesses through RAY_AUTH_MODE/RAY_AUTH_TOKEN, so the developer's `~/.ray/auth_token` is
neither read, written nor removed. It is stopped by signalling its `ray start --block` process and that
process's descendants only: `ray stop` would stop every Ray on the machine, the test session's included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from raylign.localcluster import free_ports
from tests.conftest import synthetic_pairs, write_jsonl

# The job's entrypoint: a tiny GRPO run. It runs in the job's working dir, which holds only pairs.jsonl
# ({prompt, chosen, rejected} rows; data.kind=prompts reads their prompts); the test appends
# output.dir=<tmp> output.name=job.
JOB = ("raylign train grpo model.path=tiny:llama model.lora=null data.train=pairs.jsonl data.kind=prompts "
       "'reward.sources=[{source: length}]' rollout.prompts_per_step=4 rollout.n_samples=2 rollout.max_new_tokens=8 "
       "train.batch_size=8 train.micro_batch_size=8 train.max_steps=2 rl.eval_prompts=4 "
       "resources.cpus_per_learner=0.5 resources.cpus_per_rollout_worker=0.5 progress=false")

BIN = Path(sys.executable).parent  # the `ray` and `raylign` scripts of this environment
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")

NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def home_token_state() -> str | None:
    path = Path.home() / ".ray" / "auth_token"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


class Head:
    """One `ray start --head --block` on free ports with token authentication, and its processes."""

    def __init__(self):
        # Unix socket paths live under the temp dir and are limited to ~107 bytes: keep it short.
        self.temp_dir = tempfile.mkdtemp(prefix="rlj-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.token = secrets.token_hex(32)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.url = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        # No inherited RAY_* (RAY_ADDRESS, RAY_AUTH_TOKEN_PATH, the session's RAY_AUTH_MODE, ...): the
        # head, the job client and, through the head, the job's driver see only this head's settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                   NO_PROXY=",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY")])))
        self.env = env
        self.log = Path(self.temp_dir) / "ray-start.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--min-worker-port", "0", "--max-worker-port", "0",
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        agent = ("127.0.0.1", self.ports["--dashboard-agent-listen-port"])
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if (self.get("/api/version")[0] == 200 and "Ray runtime started" in self.log.read_text()
                    and port_open(*agent)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head was not ready in {timeout:.0f} s:\n{self.log.read_text()}")
            time.sleep(0.5)

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        """GET from the dashboard (the job server); (status, body), status 0 when nothing answers."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        try:
            with NO_PROXY_OPENER.open(urllib.request.Request(self.url + path, headers=headers), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""

    def state(self, kind: str) -> list[dict]:
        """Rows of Ray's state API (`nodes`, `actors`, ...) for this head."""
        status, body = self.get(f"/api/v0/{kind}?detail=1&limit=10000")
        assert status == 200, body
        return json.loads(body)["data"]["result"]["result"]

    def processes(self) -> list[psutil.Process]:
        """`ray start` and its descendants (GCS, raylet, dashboard, workers, job drivers), plus anything
        still naming this head's temp dir; nothing of any other Ray on the machine."""
        procs: dict[int, psutil.Process] = {}
        if self.proc is not None:
            try:
                head = psutil.Process(self.proc.pid)
                procs.update({p.pid: p for p in [head, *head.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and self.temp_dir in " ".join(p.info["cmdline"] or ()):
                procs.setdefault(p.pid, p)
        return list(procs.values())

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its own processes), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive + [p for p in self.processes() if p not in alive]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.proc = None


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def ray_head(ray_session):
    """A head of our own; the test session's Ray (ray_session) runs beside it the whole time."""
    token_before = home_token_state()
    heads = []
    try:
        for attempt in range(2):  # `ray start` gives the raylet 30 s to register: a busy machine can miss it
            heads.append(Head())
            try:
                heads[-1].start()
                break
            except RuntimeError:
                heads[-1].stop()
                if attempt == 1:
                    raise
        yield heads[-1]
    finally:
        for head in heads:
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert home_token_state() == token_before, "~/.ray/auth_token changed"


def test_train_as_ray_job_attaches_to_running_cluster(ray_head, ray_session, tmp_path):
    head = ray_head
    # Token authentication is on: the job server refuses a request without the token.
    assert json.loads(head.get("/api/authentication_mode", auth=False)[1])["authentication_mode"] == "token"
    assert head.get("/api/jobs/", auth=False)[0] == 401

    workdir = tmp_path / "job"  # the upload: the data file only
    workdir.mkdir()
    write_jsonl(workdir / "pairs.jsonl", synthetic_pairs(16))
    out = tmp_path / "runs"
    submission_id = f"raylign-test-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.url, "--working-dir", str(workdir),
         "--submission-id", submission_id, "--", *shlex.split(JOB), f"output.dir={out}", "output.name=job"],
        env=head.env, capture_output=True, text=True, timeout=300,
    )
    logs = submit.stdout + submit.stderr
    status, body = head.get(f"/api/jobs/{submission_id}")
    assert status == 200, f"job server answered {status}: {body}\n{logs}"
    job = json.loads(body)
    assert job["status"] == "SUCCEEDED", logs
    assert submit.returncode == 0 and f"Job '{submission_id}' succeeded" in logs, logs
    assert "Running entrypoint for job" in logs
    assert "raylign: attached to the Ray cluster at" in logs, logs

    # It attached: its driver registered with this head's GCS, the driver's own Ray log is in this
    # head's session, and its actors ran on this head's node (a private local Ray would have none).
    driver = job["driver_info"]
    assert driver is not None, job
    session_logs = Path(head.temp_dir) / "session_latest" / "logs"
    assert list(session_logs.glob(f"python-core-driver-{driver['id']}*_{driver['pid']}.log")), \
        sorted(p.name for p in session_logs.iterdir())
    (node,) = head.state("nodes")  # the head is the cluster's only node
    actors = [a for a in head.state("actors") if a["job_id"] == driver["id"]]
    assert actors and {a["node_id"] for a in actors} == {node["node_id"]}, actors

    # The run directory the job wrote.
    run = out / "job"
    assert (run / "final" / "config.json").exists()
    steps = {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    max_steps = int(re.search(r"train\.max_steps=(\d+)", JOB).group(1))
    assert set(range(1, max_steps + 1)) <= steps and max(steps) == max_steps, steps

    # Stopping this head leaves every other Ray alone: the session's Ray still runs tasks.
    procs = head.processes()
    assert len(procs) > 5, procs  # GCS, raylet, dashboard, agents, ...
    head.stop()
    assert not [p for p in procs + head.processes() if alive(p)], "processes of the head survived"
    assert ray_session.is_initialized()
    assert ray_session.get(ray_session.remote(num_cpus=0)(lambda: 41 + 1).remote(), timeout=60) == 42
