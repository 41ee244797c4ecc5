"""A driver interrupted the hard way: SIGKILL of its process and of every process it started in its
session - the local Ray it brought up (GCS, raylet, workers) - as a lost machine or the OOM killer
would, so nothing gets to clean up.

    proc = start_driver([sys.executable, "jobs/train_ddp.py", ...], tmp / "driver.log", cwd=tmp)
    seen = kill_when(proc, lambda: something_in_mlflow(), tmp / "driver.log")

The driver runs in its own session (start_new_session) and without RAY_ADDRESS, so it starts its
own Ray instead of joining the test session's; killing by session id touches nothing else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def start_driver(cmd: list[str], log_path: Path, cwd: Path, **env_vars: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_vars, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready: Callable[[], T], log_path: Path, timeout: float = 600,
              every: float = 1.0) -> T:
    """Poll `ready()` every `every` seconds while the driver runs; SIGKILL its session as soon as it
    returns something truthy, and return that. Fails if the driver ends first or `timeout` passes."""
    deadline = time.time() + timeout
    try:
        while True:
            assert proc.poll() is None, "the driver ended before it was interrupted:\n" + _tail(log_path)
            assert time.time() < deadline, "never ready to interrupt:\n" + _tail(log_path)
            value = ready()
            if value:
                return value
            time.sleep(every)
    finally:
        kill_session(proc)


def session_pids(sids: set[int]) -> list[int]:
    """Every live process in these sessions (a Ray worker may move to its own process group, but it
    keeps the session)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in sids:
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def kill_session(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL every process in the session `proc` leads, then reap it."""
    for pid in session_pids({proc.pid}):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)


def _tail(log_path: Path) -> str:
    return Path(log_path).read_text(errors="replace")[-3000:]
