"""A real local Ray cluster made of `ray start` processes (head, optionally a second node), for
tests that submit jobs the way users do.

Token authentication is ON, with a random per-cluster token given to every node and client
through RAY_AUTH_MODE/RAY_AUTH_TOKEN (what KubeRay's `authOptions` does): nothing is written to
~/.ray. Teardown never runs `ray stop` (it kills every Ray process of the machine, other
people's too): each `ray start --block` runs in its own session, and stop() kills exactly the
processes of those sessions.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.interrupt import kill_session, session_pids

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    def __init__(self, with_dashboard: bool = True, two_nodes: bool = True):
        self.two_nodes = two_nodes
        # short path: Ray's unix sockets live under the temp dir (108-byte path limit)
        self.temp_dir = tempfile.mkdtemp(prefix="hmhn2n-", dir="/tmp")
        self.port, self.dash_port = free_port(), free_port()
        self.with_dashboard = with_dashboard
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}  # name -> its `ray start --block` process
        self._node_ids: dict[str, str] = {}  # name -> Ray node id (worker nodes)
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        PYTHONUNBUFFERED="1",
                        # A killed node is declared dead after ~3 s instead of Ray's default ~30 s.
                        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                        RAY_health_check_timeout_ms="1000")
        # `python` in a job's entrypoint is the project's interpreter, as in an activated venv.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env.pop("HMHN_SHARED_PATHS", None)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dash_port}"

    def _start(self, name: str, args, attempts: int = 3) -> None:
        """`ray start` one node. Ray gives a new raylet a fixed 30 s to register with the GCS; on
        a loaded 2-core machine that can pass, and the command exits: then try again. `args` is the
        argument list, or a function of the attempt number giving it (the head takes new ports for
        each attempt: a port another process took since free_port() would fail every attempt)."""
        for attempt in range(attempts):
            if self._start_once(name, args(attempt) if callable(args) else args):
                return
        raise RuntimeError(f"`ray start` ({name}) did not come up in {attempts} attempts:\n"
                           f"{self.log(name)[-4000:]}")

    def _start_once(self, name: str, args: list[str]) -> bool:
        path = Path(self.temp_dir) / f"{name}.log"
        start = path.stat().st_size if path.exists() else 0  # bytes; a node name can be started again later
        log = open(path, "a")  # every attempt's output, for the error
        # Fixed default ports (the dashboard agent's 52365, metrics) collide with any other Ray on
        # the machine, e.g. a parallel test session: every node gets free ones.
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
        proc = subprocess.Popen([RAY, "start", *args, *ports, "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)  # own session + process group
        self.procs.append(proc)
        deadline = time.time() + 120
        while time.time() < deadline:
            text = path.read_bytes()[start:].decode(errors="replace")
            if "Ray runtime started" in text:
                self.nodes[name] = proc
                return True
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        # Leave nothing of the failed attempt (a late raylet would join as an extra node).
        self._kill_session(proc)
        return False

    def _kill_session(self, proc: subprocess.Popen) -> None:
        """SIGKILL every process in the session of one `ray start` process, then forget it."""
        kill_session(proc, timeout=30)
        self.procs.remove(proc)

    def log(self, name: str) -> str:
        return (Path(self.temp_dir) / f"{name}.log").read_text()

    def _head_args(self, attempt: int) -> list[str]:
        if attempt:
            self.port, self.dash_port = free_port(), free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.dashboard_url = f"http://127.0.0.1:{self.dash_port}"
        return ["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--num-cpus", "1",
                "--resources", json.dumps({"head_node": 1}), "--temp-dir", self.temp_dir,
                "--include-dashboard", "true" if self.with_dashboard else "false",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port)]

    def start(self) -> None:
        self._start("head", self._head_args)
        if not self.two_nodes:
            return
        self.add_node("worker", {"second_node": 1})

    def node_ids_by_name(self) -> dict[str, str]:
        """{name: node id} of the worker nodes started by add_node and still running."""
        return dict(self._node_ids)

    def alive_node_ids(self) -> list[str]:
        return self.query("print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")

    def add_node(self, name: str, resources: dict[str, float], num_cpus: float = 1) -> str:
        """Start one more node (`ray start --address`) with these custom resources; its node id."""
        before = set(self.alive_node_ids())
        self._start(name, ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", f"{num_cpus:g}",
                           "--resources", json.dumps(resources)])
        deadline = time.time() + 60
        while time.time() < deadline:
            new = set(self.alive_node_ids()) - before
            if new:
                self._node_ids[name] = new.pop()
                return self._node_ids[name]
            time.sleep(1)
        raise RuntimeError(f"node {name} never joined")

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node (raylet, object store, workers, agents), as a lost
        machine; returns once the cluster has declared it dead."""
        proc = self.nodes.pop(name)
        self._node_ids.pop(name, None)
        before = len(self.alive_node_ids())
        self._kill_session(proc)
        deadline = time.time() + 60
        while len(self.alive_node_ids()) >= before:
            if time.time() > deadline:
                raise RuntimeError(f"the cluster still counts node {name} as alive")
            time.sleep(1)

    def _session_pids(self, sids: set[int] | None = None) -> list[int]:
        """Every live process in the sessions of our `ray start` processes."""
        return session_pids(sids if sids is not None else {p.pid for p in self.procs})

    def __enter__(self) -> "LocalRayCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its session's process group, nothing else
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pid in self._session_pids():  # workers / agents still draining, wherever their group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ---- clients -------------------------------------------------------------------------
    def query(self, code: str):
        """Run `code` in a fresh driver connected to the cluster; return the JSON of its last line."""
        prog = ("import json, logging, ray\n"
                f"ray.init(address={self.address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
                + code)
        out = subprocess.run([sys.executable, "-c", prog], env=self.env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # The last line that is JSON: Ray may print its own lines after ours (e.g. about a node just killed).
        for line in reversed(out.stdout.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        raise AssertionError("no JSON line in:\n" + out.stdout[-3000:] + out.stderr[-3000:])

    def node_ids(self) -> dict[str, str]:
        """{'head_node': id, 'second_node': id} from each node's custom resource."""
        return self.query(
            "nodes = [n for n in ray.nodes() if n['Alive']]\n"
            "print(json.dumps({r: n['NodeID'] for n in nodes for r in ('head_node', 'second_node')"
            " if r in n['Resources']}))")

    def task_events(self) -> list[list[str]]:
        """[job id, task name, node id] for every task / actor task that ran, from the GCS.

        (Uses Ray's internal GlobalState: the public state API needs the dashboard.)"""
        return self.query(
            "from ray._private import state\n"
            "me = ray.get_runtime_context().get_job_id()\n"
            "out = set()\n"
            "for ev in state.state._get_all_task_events():\n"
            "    if ev.HasField('state_updates') and ev.state_updates.node_id and ev.job_id.hex() != me:\n"
            "        out.add((ev.job_id.hex(), ev.task_info.name, ev.state_updates.node_id.hex()))\n"
            "print(json.dumps(sorted(out)))")

    def submit_in_background(self, entry: list[str], log_path: Path, env_vars: dict[str, str] | None = None,
                             setup_hook: str = "") -> subprocess.Popen:
        """`ray job submit` without waiting: its output streams into `log_path` (see wait_for_line).

        For jobs during which nodes join or die. No --working-dir: every node of this loopback
        cluster shares one session folder, and a node that joins cleans its runtime_resources, which
        deletes the running job's unpacked working dir (its cwd). On real machines each node has
        its own disk; here the checkout itself is the job's code (absolute script path, PYTHONPATH).
        """
        runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), **(env_vars or {})},
                       **({"worker_process_setup_hook": setup_hook} if setup_hook else {})}
        if entry[0] == "python" and not Path(entry[1]).is_absolute():
            entry = ["python", str(REPO / entry[1]), *entry[2:]]
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url,
               "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    EXCLUDES = (".venv/", ".git/", "data/", "mlruns/", "mlartifacts/", "*.db")

    def submit(self, entry: list[str], env_vars: dict[str, str] | None = None,
               timeout: int = 900, via_job_server: bool = True) -> subprocess.CompletedProcess:
        """Run a job to its end. `via_job_server=False`: a driver on this machine with RAY_ADDRESS
        (what `ray job submit` does, minus its few seconds of packaging and supervision)."""
        env_vars = dict(env_vars or {})
        if self.with_dashboard and via_job_server:  # the real thing: `ray job submit` to the job server
            runtime_env = {"env_vars": env_vars, "excludes": list(self.EXCLUDES)}
            cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO),
                   "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
            env = self.env
        else:
            cmd = list(entry)
            if cmd[0] == "python":
                cmd[0] = sys.executable
            env = {**self.env, **env_vars, "RAY_ADDRESS": self.address}
        deadline = time.time() + 120
        while True:
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            # The job server answers before a node's dashboard agent has registered; that is the
            # one error worth retrying.
            if "No available agent to submit job" not in out.stderr or time.time() > deadline:
                return out
            time.sleep(3)


def wait_for_line(log_path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    """Block until a line of `log_path` matches regex `pattern`; the line. Fails if `proc` ends first."""
    import re

    deadline = time.time() + timeout
    while time.time() < deadline:
        text = Path(log_path).read_text(errors="replace")
        match = re.search(pattern, text, re.M)
        if match:
            return match.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before printing {pattern!r}:\n{text[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no line matching {pattern!r} after {timeout:g} s:\n{Path(log_path).read_text()[-4000:]}")
