"""`raylign cluster down` stops exactly the processes its state file records (by pid and start time),
and nothing else; the state file round-trips. No Ray is started: stand-in processes play the nodes."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import psutil

from raylign import localcluster


def _spawn_node_like() -> subprocess.Popen:
    """A stand-in `ray start --block`: a process with a child of its own (its 'raylet')."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _node(proc: subprocess.Popen, name: str, tmp) -> localcluster.Node:
    p = psutil.Process(proc.pid)
    node = localcluster.Node(name=name, head=name == "node_a", cpus=1.0, pid=proc.pid, create_time=p.create_time(),
                             temp_dir=tempfile.mkdtemp(dir=tmp), home=str(tmp / name), tmp=str(tmp / name / "t"),
                             log=str(tmp / f"{name}.log"), ports={"--node-manager-port": 1})
    for _ in range(100):  # until the child exists
        if p.children():
            break
        psutil.wait_procs([], timeout=0.05)
    localcluster._record_processes(node)
    return node


def test_down_stops_the_recorded_processes_and_leaves_every_other_one(tmp_path):
    mine = [_spawn_node_like(), _spawn_node_like()]
    other = _spawn_node_like()  # another engineer's Ray, say
    try:
        nodes = [_node(p, localcluster.node_name(i), tmp_path) for i, p in enumerate(mine)]
        assert all(n.processes for n in nodes)
        children = [psutil.Process(c.pid) for n in nodes for c in n.processes]
        state = localcluster.ClusterState(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", str(tmp_path / "tok"),
                                          nodes)
        state.save()
        loaded = localcluster.ClusterState.load(tmp_path)
        assert loaded == state and loaded.env()["RAY_AUTH_MODE"] == "token"
        assert loaded.env()["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
        assert localcluster.down(tmp_path, grace=1.0) is not None  # the stand-ins ignore their parent's end
        for p in mine:
            assert p.wait(timeout=30) is not None
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive
        assert other.poll() is None and psutil.Process(other.pid).children()  # untouched
        assert not (tmp_path / localcluster.STATE_FILE).exists()
        assert localcluster.down(tmp_path) is None  # nothing recorded any more: nothing to do
    finally:
        for p in [*mine, other]:
            for q in (psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []):
                q.kill()
            p.kill()
            p.wait()


def test_a_recorded_pid_now_held_by_another_process_is_not_touched(tmp_path):
    """pid reuse: a record whose start time does not match the live process is not ours any more."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = psutil.Process(stranger.pid).create_time()
        assert localcluster._alive(localcluster.Proc(stranger.pid, started))
        assert not localcluster._alive(localcluster.Proc(stranger.pid, started - 100))
        node = localcluster.Node(name="node_a", head=True, cpus=1.0, pid=stranger.pid, create_time=started - 100,
                                 temp_dir=str(tmp_path / "never-named"), home="", tmp="", log="", ports={})
        localcluster.stop_node(node, grace=0.5)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
