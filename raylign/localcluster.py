"""A real multi-node Ray on one machine: `raylign cluster up --nodes N` / `raylign cluster down`
(also `cluster/local.sh up N` / `down`).

`up` starts a head and N-1 worker nodes, each a separate `ray start --block` with its own free ports,
its own Ray temp dir (short, under /tmp: Unix socket paths are limited to ~107 bytes), its own
`RAYLIGN_HOME` and `TMPDIR` (so a node never finds another node's model cache or scratch files), a CPU
share and a node resource named `node_a`, `node_b`, ... (`resources.learner_placement=node_b` pins a
group there). Token authentication is on: a fresh token is written to `<state dir>/auth_token` (mode
0600) and every Ray process reads it through `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH`, so the
user's `~/.ray/auth_token` is neither read nor written. `up` writes `<state dir>/cluster.json` (the
processes by pid and start time, the ports, the addresses, the token path) and `<state dir>/env.sh`
(`source` it, then `ray job submit -- raylign train ...` reaches the cluster).

`down` stops exactly the processes of that state file: SIGTERM to each node's `ray start --block`
(which stops its own raylet, GCS, dashboard and workers), then SIGKILL to whatever of that node is
still alive (its recorded processes, their descendants, anything naming its temp dir), each checked
by pid and start time. Never `ray stop`: that stops every Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from raylign.errors import UserError

STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "auth_token"
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterError(UserError, RuntimeError):
    """The local cluster could not be started or stopped; the message says why and what to do."""


def default_state_dir() -> Path:
    from raylign.models.cache import raylign_home

    return raylign_home() / "cluster"


def node_name(index: int) -> str:
    """node_a, node_b, ..., node_z, node_aa, ..."""
    letters = string.ascii_lowercase
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = letters[rem] + name
    return f"node_{name}"


def free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on, held open together while picked."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Proc:
    pid: int
    create_time: float
    name: str = ""


@dataclass
class Node:
    name: str
    head: bool
    cpus: float
    pid: int  # the `ray start --block` process
    create_time: float
    temp_dir: str  # Ray's --temp-dir (sockets, session logs)
    home: str  # RAYLIGN_HOME of every raylign process on this node
    tmp: str  # TMPDIR of the node's processes (inside temp_dir)
    log: str
    ports: dict[str, int]
    processes: list[Proc] = field(default_factory=list)  # raylet, GCS, dashboard, agents (at `up`)

    @property
    def raylet_pid(self) -> int | None:
        return next((p.pid for p in self.processes if p.name == "raylet"), None)


@dataclass
class ClusterState:
    state_dir: str
    address: str  # GCS address: ray.init(address=...), RAY_ADDRESS for drivers
    dashboard: str  # the job server: ray job submit --address ..., RAY_API_SERVER_ADDRESS
    token_path: str
    nodes: list[Node]

    def env(self) -> dict[str, str]:
        """What a client (the `ray` CLI, a driver) needs to reach this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    def token(self) -> str:
        return Path(self.token_path).read_text().strip()

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        """GET from the head's dashboard (job server, state API): (status, body); 0 when nothing answers."""
        return http_get(self.dashboard + path, self.token() if auth else None)

    def state_api(self, kind: str) -> list[dict[str, Any]]:
        """Rows of Ray's state API (`nodes`, `actors`, ...) for this cluster."""
        status, body = self.get(f"/api/v0/{kind}?detail=1&limit=10000")
        if status != 200:
            raise ClusterError(f"the state API answered {status}: {body[:300]}")
        return json.loads(body)["data"]["result"]["result"]

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: str | Path) -> ClusterState:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no local cluster state at {path}: nothing was started there (raylign cluster up)")
        data = json.loads(path.read_text())
        nodes = [Node(**{**n, "processes": [Proc(**p) for p in n["processes"]]}) for n in data.pop("nodes")]
        return cls(nodes=nodes, **data)


def _client_env(token_path: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node's processes: no inherited RAY_* (another cluster's address or token),
    token auth from our token file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0",
               # A loaded machine starts the dashboard agent slowly; the raylet's default wait (30 s) aborts it.
               RAY_agent_register_timeout_ms=env.get("RAY_agent_register_timeout_ms", "120000"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               NO_PROXY=",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY")])))
    env.update(extra or {})
    return env


def http_get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _NO_PROXY.open(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def alive_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """The ALIVE nodes the head's state API knows (each with node_id and resources_total)."""
    try:
        rows = state.state_api("nodes")
    except ClusterError:
        return []
    return [r for r in rows if r.get("state") == "ALIVE"]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _start_node(state_dir: Path, name: str, head: bool, cpus: float, object_store_mb: int, token_path: str,
                gcs: str | None) -> Node:
    node_dir = state_dir / "nodes" / name
    temp_dir = tempfile.mkdtemp(prefix="rlc-", dir="/tmp" if os.path.isdir("/tmp") else None)
    # TMPDIR short as well: Python's forkserver (Ray's dashboard) puts a Unix socket there.
    home, tmp = node_dir / "home", Path(temp_dir) / "tmp"
    for d in (home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    flags = (HEAD_PORTS if head else ()) + NODE_PORTS
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", f"{cpus:g}", "--resources", json.dumps({name: 1}),
           "--object-store-memory", str(object_store_mb * 1024 * 1024), "--temp-dir", temp_dir,
           "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
    if head:
        cmd += ["--head", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    else:
        assert gcs is not None
        cmd += ["--address", gcs]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    log = node_dir / "ray-start.log"
    env = _client_env(token_path, {"RAYLIGN_HOME": str(home), "TMPDIR": str(tmp)})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Node(name=name, head=head, cpus=cpus, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
                temp_dir=temp_dir, home=str(home), tmp=str(tmp), log=str(log), ports=ports)


def _head_ready(state: ClusterState, agent_port: int) -> bool:
    """The job server answers and the head's dashboard agent listens (jobs can be submitted)."""
    return http_get(f"{state.dashboard}/api/version", state.token())[0] == 200 and _port_open(agent_port)


def _wait_started(node: Node, timeout: float, ready: Any = None) -> None:
    """Until `ray start` printed its success line (and `ready()` holds); its exit or the timeout raise."""
    deadline = time.monotonic() + timeout
    log = Path(node.log)
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if not _alive(Proc(node.pid, node.create_time)):
            raise ClusterError(f"`ray start` of {node.name} exited:\n{text[-3000:]}")
        if "Ray runtime started" in text and (ready is None or ready()):
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"{node.name} was not ready within {timeout:.0f}s (see {node.log}):\n{text[-3000:]}")
        time.sleep(0.5)


def _record_processes(node: Node) -> None:
    try:
        root = psutil.Process(node.pid)
        procs = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            node.processes.append(Proc(p.pid, p.create_time(), p.name()))
        except psutil.NoSuchProcess:
            continue


def up(nodes: int, cpus_per_node: float = 1.0, state_dir: str | Path | None = None, object_store_mb: int = 100,
       timeout: float = 180.0, tries: int = 3) -> ClusterState:
    """Start a head and `nodes - 1` workers (module docstring), each node tried up to `tries` times;
    returns the state also saved to disk."""
    if nodes < 1:
        raise ClusterError("--nodes must be at least 1")
    state_path = Path(state_dir) if state_dir else default_state_dir()
    state_path.mkdir(parents=True, exist_ok=True)
    if (state_path / STATE_FILE).exists():
        old = ClusterState.load(state_path)
        if any(_alive(Proc(n.pid, n.create_time)) for n in old.nodes):
            raise ClusterError(f"a local cluster from {state_path} is running ({old.address}); "
                               f"`raylign cluster down --state-dir {state_path}` first")
        (state_path / STATE_FILE).unlink()
    token_path = state_path / TOKEN_FILE
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    started: list[Node] = []
    state = ClusterState(str(state_path.resolve()), "", "", str(token_path.resolve()), started)
    def start(i: int) -> None:
        """Start node i, retried: `ray start` gives a raylet 30 s to register (a hard-coded wait), which
        the dashboard agent's start can exceed on a loaded machine; the failed node's processes go first."""
        for attempt in range(tries):
            node = _start_node(state_path, node_name(i), i == 0, cpus_per_node, object_store_mb, state.token_path,
                               state.address or None)
            started.append(node)
            if i == 0:
                state.address = f"127.0.0.1:{node.ports['--port']}"
                state.dashboard = f"http://127.0.0.1:{node.ports['--dashboard-port']}"
            state.save()  # from here on `down` can find what was started, even if `up` fails later
            ready = partial(_head_ready, state, node.ports["--dashboard-agent-listen-port"]) if i == 0 else None
            try:
                _wait_started(node, timeout, ready)
                _record_processes(node)
                return
            except ClusterError as exc:
                stop_node(node, grace=5.0)
                shutil.rmtree(node.temp_dir, ignore_errors=True)
                started.remove(node)
                state.address, state.dashboard = (state.address, state.dashboard) if i else ("", "")
                state.save()
                if attempt == tries - 1:
                    raise ClusterError(f"{node.name} did not start in {tries} tries; the last one: {exc}") from None
                print(f"raylign: {node.name} did not start (try {attempt + 1} of {tries}); trying again", flush=True)

    try:
        for i in range(nodes):
            start(i)
        deadline = time.monotonic() + timeout
        while len(alive_nodes(state)) < nodes:
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(alive_nodes(state))} of {nodes} nodes registered within {timeout:.0f}s")
            time.sleep(0.5)
        state.save()
        _write_env(state)
        return state
    except BaseException:
        down(state_path)
        raise


def _write_env(state: ClusterState) -> None:
    lines = [f"export {k}={v}" for k, v in state.env().items()]
    (Path(state.state_dir) / ENV_FILE).write_text("\n".join(lines) + "\n")


def _alive(proc: Proc) -> bool:
    """Whether `proc` is still the process we started (same pid and start time), not a zombie."""
    try:
        p = psutil.Process(proc.pid)
        return abs(p.create_time() - proc.create_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def node_processes(node: Node) -> list[psutil.Process]:
    """Every live process of `node`: its `ray start`, the processes recorded at `up` (checked by start
    time), their descendants, and any process naming the node's temp dir."""
    found: dict[int, psutil.Process] = {}
    roots = [Proc(node.pid, node.create_time), *node.processes]
    for rec in roots:
        if not _alive(rec):
            continue
        try:
            p = psutil.Process(rec.pid)
            found.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and node.temp_dir in " ".join(p.info["cmdline"] or ()):
            found.setdefault(p.pid, p)
    return list(found.values())


def stop_node(node: Node, grace: float = 20.0) -> None:
    """Stop one node's processes (module docstring)."""
    procs = node_processes(node)
    if _alive(Proc(node.pid, node.create_time)):
        try:
            os.kill(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left + [p for p in node_processes(node) if p not in left]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


def down(state_dir: str | Path | None = None, grace: float = 20.0) -> ClusterState | None:
    """Stop the cluster recorded in `state_dir` (workers first, the head last; each node's processes get
    `grace` seconds after SIGTERM before SIGKILL) and remove its Ray temp dirs; the logs and node homes
    stay. Nothing recorded: None."""
    state_path = Path(state_dir) if state_dir else default_state_dir()
    if not (state_path / STATE_FILE).exists():
        return None
    state = ClusterState.load(state_path)
    for node in sorted(state.nodes, key=lambda n: n.head):
        stop_node(node, grace)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    (state_path / STATE_FILE).unlink(missing_ok=True)
    (state_path / ENV_FILE).unlink(missing_ok=True)
    return state


# ---- the command ----------------------------------------------------------------------------------


def add_cluster_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`raylign cluster up|down|status`; returns the `cluster` parser."""
    p = subparsers.add_parser(
        "cluster", help="a multi-node Ray on this machine, to rehearse a cluster: up --nodes N | down | status",
        description="`up` starts a head and N-1 worker nodes (separate raylets, own ports, temp dirs and "
        "RAYLIGN_HOME, node resources node_a, node_b, ..., token auth), writes STATE_DIR/cluster.json and "
        "STATE_DIR/env.sh (`source` it to reach the cluster with `ray job submit`); `down` stops exactly those "
        "processes.")
    sub = p.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")
    q = sub.add_parser("up", help="start the cluster")
    q.add_argument("--nodes", type=int, default=3, help="nodes including the head (default 3)")
    q.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs each node offers (default 1)")
    q.add_argument("--object-store-mb", type=int, default=100, help="object store per node in MiB (default 100)")
    q.add_argument("--state-dir", help="where state, token, logs and node homes go (default $RAYLIGN_HOME/cluster)")
    q.set_defaults(func=cmd_cluster)
    q = sub.add_parser("down", help="stop the cluster started from --state-dir")
    q.add_argument("--state-dir", help="default $RAYLIGN_HOME/cluster")
    q.set_defaults(func=cmd_cluster)
    q = sub.add_parser("status", help="the nodes of the cluster started from --state-dir")
    q.add_argument("--state-dir", help="default $RAYLIGN_HOME/cluster")
    q.set_defaults(func=cmd_cluster)
    return p


def cmd_cluster(args: argparse.Namespace) -> None:
    from raylign.config import ConfigError

    try:
        if args.cluster_action == "up":
            state = up(args.nodes, args.cpus_per_node, args.state_dir, args.object_store_mb)
            print(f"started {len(state.nodes)} node(s): " + ", ".join(
                f"{n.name}{' (head)' if n.head else ''} raylet pid {n.raylet_pid}" for n in state.nodes))
            print(f"address {state.address}, jobs at {state.dashboard}, token in {state.token_path}")
            print(f"reach it with:  source {Path(state.state_dir) / ENV_FILE}  &&  ray job submit -- raylign train ...")
        elif args.cluster_action == "down":
            stopped = down(args.state_dir)
            print(f"stopped {len(stopped.nodes)} node(s)" if stopped else "no local cluster was running there")
        else:
            state = ClusterState.load(args.state_dir or default_state_dir())
            live = {name for n in alive_nodes(state) for name in n.get("resources_total", {}) if name.startswith("node_")}
            for node in state.nodes:
                up_now = node.name in live
                print(f"{node.name}{' (head)' if node.head else ''}: {'alive' if up_now else 'down'}, {node.cpus:g} CPU, "
                      f"raylet pid {node.raylet_pid}, RAYLIGN_HOME {node.home}")
    except ClusterError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m raylign.localcluster up N | down | status` (what cluster/local.sh runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "up" and argv[1].isdigit():
        argv = ["up", "--nodes", argv[1], *argv[2:]]  # `local.sh up 3`
    parser = argparse.ArgumentParser(prog="cluster/local.sh")
    add_cluster_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cluster", *argv])
    try:
        cmd_cluster(args)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        from raylign.config import ConfigError

        if isinstance(exc, ConfigError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
