"""Run ``shoal controller``, ``shoal agent`` and ``shoalctl`` as real processes for integration tests.

Every process is started from an argument list (never a shell string), waited
for through its ``--ready-file``, and stopped by PID (SIGTERM, then SIGKILL)
on exit, also when the test fails.  Logs go to files under the test's
directory, so a test can read them (e.g. to check no CHAP secret was logged).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.shoal_target import REPO, stop_process

SHOAL = [sys.executable, "-m", "node_agent.cli"]
SHOALCTL = [sys.executable, "-m", "controller.cli"]


@dataclass
class Daemon:
    address: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash: nothing of the process's own shutdown runs."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start(name: str, args: list[str], ready: Path, log_path: Path, timeout: float) -> tuple[subprocess.Popen, dict]:
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(args + ["--ready-file", str(ready)], stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=_env(), cwd=REPO)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            stop_process(process)
            raise TimeoutError(f"{name} not ready within {timeout}s:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.02)
    return process, json.loads(ready.read_text())


def start_controller(workdir: Path, *, listen: str = "127.0.0.1:0", heartbeat_interval: float = 0.5,
                     heartbeat_timeout: float = 2.0, loop_interval: float = 0.5, extra_args: list[str] = (),
                     timeout: float = 20.0) -> Daemon:
    """``shoal controller`` with its SQLite file at ``workdir/controller.db``; short heartbeats for tests."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = SHOAL + ["-v", "controller", "--db", str(workdir / "controller.db"), "--listen", listen,
                    "--heartbeat-interval", str(heartbeat_interval), "--heartbeat-timeout", str(heartbeat_timeout),
                    "--loop-interval", str(loop_interval), *extra_args]
    log_path = workdir / "controller.log"
    process, ready = _start("shoal controller", args, workdir / "controller.ready", log_path, timeout)
    return Daemon(ready["controller"], process, log_path, {"metrics": ready.get("metrics", "")})


def start_agent(workdir: Path, node_id: str, controller: str, *, listen: str = "127.0.0.1:0",
                portal: str = "127.0.0.1:0", extra_args: list[str] = (), timeout: float = 20.0) -> Daemon:
    """``shoal agent`` with its own data directory, disk, AgentService port and iSCSI portal on 127.0.0.1.

    Fixed ``listen``/``portal`` ports let a test restart an agent where its consumers and the controller
    expect it (the same ``workdir`` keeps its data directory and disk)."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = SHOAL + ["-v", "agent", "--node-id", node_id, "--data-dir", str(workdir / "data"),
                    "--disk", f"data0={workdir / 'disk0'}", "--listen", listen, "--portal", portal,
                    "--controller", controller, *extra_args]
    log_path = workdir / "agent.log"
    process, ready = _start(f"shoal agent {node_id}", args, workdir / "agent.ready", log_path, timeout)
    return Daemon(ready["agent"], process, log_path, {"portal": ready["portal"], "node_id": node_id,
                                                      "metrics": ready.get("metrics", "")})


@contextlib.contextmanager
def running(daemon: Daemon):
    try:
        yield daemon
    finally:
        daemon.stop()


def shoalctl(controller: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run shoalctl against ``controller``; the result has text ``stdout``/``stderr`` and ``returncode``."""
    env = _env()
    env.pop("SHOAL_CONTROLLER", None)
    env["SHOAL_CONTEXT"] = os.devnull
    return subprocess.run(SHOALCTL + ["--controller", controller, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
