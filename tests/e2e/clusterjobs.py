"""A real local Ray cluster for the e2e tests (`raylign.localcluster`: several raylets on this machine,
token auth) and `ray job submit` against it. Each cluster is its caller's alone: its own ports, temp
dirs and token, brought down by pid whatever happens; every other Ray on the machine is left running."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from raylign import localcluster

BIN = Path(sys.executable).parent


def other_rays() -> dict[int, float]:
    """Raylets of every other Ray on the machine (the test session's, other engineers'), by pid."""
    out = {}
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["name"] == "raylet":
            out[p.pid] = p.info["create_time"]
    return out


@contextmanager
def local_cluster(nodes: int, state_dir: Path) -> Iterator[localcluster.ClusterState]:
    """`nodes` raylets (node_a = the head, node_b, ...), one CPU each; down afterwards, and asserted
    that nobody else's Ray was touched."""
    before = other_rays()
    try:
        # Each node is retried up to 4 times: `ray start` gives a raylet 30 s to register, which a loaded
        # machine can miss.
        yield localcluster.up(nodes, cpus_per_node=1.0, state_dir=state_dir, tries=4)
    finally:
        localcluster.down(state_dir)
        for pid, started in before.items():
            if psutil.pid_exists(pid):
                assert psutil.Process(pid).create_time() == started


def node_names(state: localcluster.ClusterState) -> dict[str, str]:
    """Node id -> its `node_*` resource."""
    return {n["node_id"]: next(k for k in n["resources_total"] if k.startswith("node_"))
            for n in localcluster.alive_nodes(state)}


def submit(state: localcluster.ClusterState, workdir: Path, args: list[str], wait: bool) -> tuple[str, str]:
    """`ray job submit` (the CLI, token from the cluster's token file); (submission id, CLI output)."""
    job_id = f"raylign-cluster-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | state.env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", state.dashboard, "--working-dir", str(workdir),
           "--submission-id", job_id, *([] if wait else ["--no-wait"]), "--", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return job_id, done.stdout + done.stderr


def job(state: localcluster.ClusterState, job_id: str) -> dict:
    status, body = state.get(f"/api/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def job_logs(state: localcluster.ClusterState, job_id: str) -> str:
    status, body = state.get(f"/api/jobs/{job_id}/logs")
    return json.loads(body)["logs"] if status == 200 else ""


def wait_job(state: localcluster.ClusterState, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (info := job(state, job_id))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {info['status']}:\n{job_logs(state, job_id)}"
        time.sleep(1)
    return info


def run_job(state: localcluster.ClusterState, workdir: Path, args: list[str]) -> str:
    """Submit, wait, and return the job's logs; the job must succeed."""
    job_id, cli = submit(state, workdir, args, wait=True)
    logs = job_logs(state, job_id)
    assert job(state, job_id)["status"] == "SUCCEEDED", cli + logs
    return logs
