"""Integration tests: real Shoal processes talking gRPC and iSCSI over 127.0.0.1.

What they start: ``shoal agent`` (``python -m node_agent.cli agent``) as a
separate process with its own data directory, AgentService and iSCSI portal
on loopback ports; its controller address points at a closed loopback port,
so registration keeps retrying in the background and no controller is needed.
Peers: libiscsi's ``iscsi-inq`` (skipped when not installed) and Shoal's own
initiator (``node_agent.iscsi.initiator``) log in to the agent's exports.
Every process is started from an argument list and stopped by its PID
(SIGTERM, then SIGKILL), also when a test fails.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from protos.shoal.v1 import agent_pb2_grpc
from tests.support.shoal_target import REPO, stop_process


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_agent(tmp_path: Path, *, node_id: str = "int-node", listen: str = "127.0.0.1:0",
                  portal: str = "127.0.0.1:0", timeout: float = 20.0, extra_args: list[str] | None = None):
    """Start ``shoal agent`` with its state under ``tmp_path`` (and ``extra_args``); yield (process,
    AgentService address, portal address); stop it by PID."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
    log_path = ready.with_suffix(".log")
    args = [sys.executable, "-m", "node_agent.cli", "agent", "--node-id", node_id,
            "--data-dir", str(tmp_path / "data"), "--disk", f"data0={tmp_path / 'disk0'}",
            "--listen", listen, "--portal", portal, "--controller", f"127.0.0.1:{closed_port()}",
            "--ready-file", str(ready), *(extra_args or [])]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"shoal agent exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"shoal agent not ready within {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.02)
        addresses = json.loads(ready.read_text())
        process.log_path = log_path  # type: ignore[attr-defined]
        yield process, addresses["agent"], addresses["portal"]
    finally:
        stop_process(process)


def stub_for(address: str):
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel, agent_pb2_grpc.AgentServiceStub(channel)
