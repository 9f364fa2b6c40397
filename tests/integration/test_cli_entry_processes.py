"""The command-line entry points as processes: regressions of a review of them that need a real ``shoal target``
or ``shoal agent`` (the refusals that start nothing are in tests/unit/test_cli_entry_review.py).

What they start: ``shoal target`` and ``shoal agent`` (``python -m node_agent.cli``) on 127.0.0.1 or ::1 only,
each from an argument list, and ``shoal iscsi`` against them; every process is stopped by its PID (SIGTERM,
then SIGKILL; ``stop_process``), also when a test fails.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import closed_port
from tests.unit.test_cli_entry_review import busy_port  # noqa: F401 - the fixture, used by name
from tests.support.shoal_target import REPO, stop_process

IQN = "iqn.2026-11.io.shoal.test:entry"
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "node_agent.cli", *args]


@contextlib.contextmanager
def started(argv: list[str], log_path: Path, *, user: int | None = None):
    """``argv`` as a process (as uid/gid ``user`` when given); stopped by its PID on the way out."""
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    try:
        yield process
    finally:
        stop_process(process)


def wait_for(path: Path, process: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"not ready within {timeout}s:\n{log_path.read_text()}"
        time.sleep(0.02)
    return path.read_text()


def run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)




# -- F1: a read-only image served :ro by a user who cannot write it --------------------------------------------
def test_a_read_only_image_is_served_read_only_by_a_user_who_cannot_write_it():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the target as another user")
    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="shoal-ro-", dir="/tmp"))
    try:
        root.chmod(0o755)
        image = root / "ro.img"
        image.write_bytes(b"\xa5" * (1 << 20))
        image.chmod(0o444)  # root's, read-only: the target's user can only read it
        state = root / "state"
        state.mkdir()
        os.chown(state, nobody, nobody)
        port_file, log_path = state / "port", root / "target.log"
        with started(shoal("target", "--listen", "127.0.0.1:0", "--iqn", IQN, "--lun", f"{image}:ro",
                           "--port-file", str(port_file)), log_path, user=nobody) as target:
            portal = wait_for(port_file, target, log_path).split()[0]
            url = f"iscsi://{portal}/{IQN}/0"
            read = subprocess.run(shoal("iscsi", "read", url, "--lba", "0", "--blocks", "1"), capture_output=True,
                                  timeout=60, env=ENV, cwd=REPO)
            assert read.returncode == 0 and read.stdout == b"\xa5" * 512, read.stderr
            written = subprocess.run(shoal("iscsi", "write", url, "--lba", "0"), input=bytes(512),
                                     capture_output=True, timeout=60, env=ENV, cwd=REPO)
            assert written.returncode == 1 and b"DATA PROTECT" in written.stderr
        assert image.read_bytes() == b"\xa5" * (1 << 20) and image.stat().st_size == 1 << 20
    finally:
        shutil.rmtree(root)


# -- F11: IPv6 portals in the port file, usable as they are -----------------------------------------------------
def test_an_ipv6_port_file_line_is_what_shoal_iscsi_takes(tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    port_file, log_path = tmp_path / "port", tmp_path / "target.log"
    with started(shoal("target", "--listen", "[::1]:0", "--iqn", IQN, "--lun", f"{tmp_path / 'd.img'}:1M",
                       "--port-file", str(port_file)), log_path) as target:
        line = wait_for(port_file, target, log_path).split()[0]
        assert line.startswith("[::1]:")
        found = run(shoal("iscsi", "discover", line))
        assert found.returncode == 0 and IQN in found.stdout and line in found.stdout, found.stderr
        assert f"on {line}" in log_path.read_text()  # the log line names the portal the same way


# -- F12: no stale port file, before a start or after a stop ----------------------------------------------------
def test_a_stale_port_file_is_removed_at_start_and_after_a_clean_stop(tmp_path, busy_port):
    port_file = tmp_path / "port"
    port_file.write_text("127.0.0.1:11111\n")  # a previous run's
    failed = run(shoal("target", "--listen", f"127.0.0.1:{busy_port}", "--lun", f"{tmp_path / 'd.img'}:1M",
                       "--port-file", str(port_file)))
    assert failed.returncode == 1 and "Address already in use" in failed.stderr
    assert not port_file.exists()

    log_path = tmp_path / "target.log"
    with started(shoal("target", "--listen", "127.0.0.1:0", "--lun", f"{tmp_path / 'd.img'}:1M",
                       "--port-file", str(port_file)), log_path) as target:
        wait_for(port_file, target, log_path)
        os.kill(target.pid, signal.SIGTERM)
        assert target.wait(30) == 0
    assert not port_file.exists()


# -- F4: worker processes, a busy port: the LUN files they opened are undone ------------------------------------
def test_a_failed_start_with_workers_leaves_no_lun_file(tmp_path, busy_port):
    grown = tmp_path / "grown.img"
    grown.write_bytes(b"\x01" * (1 << 20))
    failed = run(shoal("target", "--listen", f"127.0.0.1:{busy_port}", "--workers", "2",
                       "--iqn", IQN, "--lun", f"{tmp_path / 'w1.img'}:1G",
                       "--iqn", IQN + "2", "--lun", f"{grown}:1G"))
    assert failed.returncode == 1 and "Address already in use" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grown.img"]
    assert grown.stat().st_size == 1 << 20


# -- F2 and F12 for the agent's --ready-file ----------------------------------------------------------------------
def test_agent_ready_file_is_written_privately_and_removed_when_stopped(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    ready = tmp_path / "ready.json"
    (tmp_path / "ready.json.tmp").symlink_to(victim)  # the fixed temporary name once used
    log_path = tmp_path / "agent.log"
    with started(shoal("agent", "--node-id", "entry", "--data-dir", str(tmp_path / "data"),
                       "--disk", f"data0={tmp_path / 'disk0'}", "--listen", "127.0.0.1:0",
                       "--portal", "127.0.0.1:0", "--controller", f"127.0.0.1:{closed_port()}",
                       "--ready-file", str(ready)), log_path) as agent:
        addresses = json.loads(wait_for(ready, agent, log_path))
        assert addresses["agent"].startswith("127.0.0.1:") and not ready.is_symlink()
        assert victim.read_text() == "precious\n"
        os.kill(agent.pid, signal.SIGTERM)
        assert agent.wait(30) == 0
    assert not ready.exists()


# -- F6/F7: an agent's bad address is a usage error before its data directory exists ------------------------------
@pytest.mark.parametrize("extra", [["--portal", "127.0.0.1"], ["--metrics-listen", "bogus"],
                                   ["--advertise-portal", "nope"]])
def test_agent_address_errors_exit_2_before_any_state_is_written(extra, tmp_path):
    result = run(shoal("agent", "--node-id", "entry", "--data-dir", str(tmp_path / "data"),
                       "--disk", f"data0={tmp_path / 'disk0'}", "--listen", "127.0.0.1:0",
                       "--controller", f"127.0.0.1:{closed_port()}", *extra))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"shoal agent: {extra[0]} ")
    assert list(tmp_path.iterdir()) == []


# -- F12 for the controller's --ready-file --------------------------------------------------------------------------
def test_controller_ready_file_is_replaced_at_start_and_removed_when_stopped(tmp_path):
    ready = tmp_path / "controller.ready"
    ready.write_text('{"controller": "127.0.0.1:11111"}')  # a previous run's
    log_path = tmp_path / "controller.log"
    with started(shoal("controller", "--db", str(tmp_path / "db"), "--listen", "127.0.0.1:0",
                       "--ready-file", str(ready)), log_path) as controller:
        deadline = time.monotonic() + 30
        while not (ready.exists() and json.loads(ready.read_text()).get("pid") == controller.pid):
            assert controller.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        os.kill(controller.pid, signal.SIGTERM)
        assert controller.wait(30) == 0
    assert not ready.exists()


# -- a closed terminal (SIGHUP) stops the target and the agent as SIGTERM does --------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_hang_up_stops_the_target_cleanly(tmp_path, workers):
    """SIGHUP (the terminal it ran in closed) used to end ``shoal target`` on the spot (status 129), its port
    file left behind; it stops as on SIGTERM now, its workers (which ignore a hang-up) stopped by it."""
    port_file, log_path = tmp_path / "port", tmp_path / "target.log"
    targets = ["--iqn", IQN, "--lun", f"{tmp_path / 'd.img'}:1M",
               "--iqn", IQN + "2", "--lun", f"{tmp_path / 'e.img'}:1M"]
    with started(shoal("target", "--listen", "127.0.0.1:0", "--workers", workers, *targets,
                       "--port-file", str(port_file)), log_path) as target:
        wait_for(port_file, target, log_path)
        os.kill(target.pid, signal.SIGHUP)
        assert target.wait(30) == 0, log_path.read_text()
    assert not port_file.exists()


def test_a_hang_up_stops_the_agent_cleanly(tmp_path):
    ready, log_path = tmp_path / "ready.json", tmp_path / "agent.log"
    with started(shoal("agent", "--node-id", "hup", "--data-dir", str(tmp_path / "data"),
                       "--disk", f"data0={tmp_path / 'disk0'}", "--listen", "127.0.0.1:0",
                       "--portal", "127.0.0.1:0", "--controller", f"127.0.0.1:{closed_port()}",
                       "--ready-file", str(ready)), log_path) as agent:
        wait_for(ready, agent, log_path)
        os.kill(agent.pid, signal.SIGHUP)
        assert agent.wait(30) == 0, log_path.read_text()
    assert not ready.exists()

