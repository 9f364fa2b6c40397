"""Faults in a running pool: processes killed with SIGKILL and started again (issue 4).

1. The agent that owns a volume dies while another node writes to the volume
   through ext4 on Shoal's userspace connector (initiator, FUSE, loop device).
   It is started again on the same ports and data directory: the consumer's
   initiator reconnects within its ``reconnect_timeout`` and issues the waiting
   commands again (RFC 7143 §6.3.5, session reinstatement at ErrorRecoveryLevel
   0), so the writer only stalls; afterwards every file whose ``fsync`` returned
   reads back with its checksum after unmount and mount, and ``e2fsck -fn``
   finds the filesystem clean.
2. The controller dies while creates are in flight (their rows "creating",
   their agent made slow by SIGSTOP, so the kill lands between "creating" and
   "available" every time) and during a burst of creates.  Started again on
   the same SQLite file and port: what it had said before is still there,
   reconcile finishes every half-made volume, the owner holds exactly the
   volumes the controller knows, and a repeat of each create converges on the
   same volume.

(Attach to an unhealthy node and deleting an attached volume are checked in
``test_pool_e2e.py``.)

Real peers: the kernel's loop driver, FUSE, ext4 and e2fsprogs, SQLite's WAL
recovery.  Every process is stopped by PID and every mount and loop device
under the test's directory removed in ``finally``.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos.shoal.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import require_tools
from tests.support.controller_process import Daemon, running, shoalctl, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20


@pytest.fixture
def needs_attach():
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse and /dev/loop-control")
    require_tools("losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"mfusepy/libfuse3 unavailable: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ctl(address: str, *args: str) -> str:
    result = shoalctl(address, *args)
    assert result.returncode == 0, f"shoalctl {' '.join(args)}: rc {result.returncode}\n{result.stderr}"
    return result.stdout


def ctl_json(address: str, *args: str):
    return json.loads(ctl(address, *args, "-o", "json"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(address: str, *nodes: str) -> bool:
    health = {n["id"]: n["health"] for n in ctl_json(address, "node", "list")["nodes"]}
    return all(health.get(node) == "healthy" for node in nodes)


def agent_volumes(agent: Daemon) -> dict[str, int]:
    """What the agent itself holds: volume id -> size (its GetState)."""
    with grpc.insecure_channel(agent.address) as channel:
        state = agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=10)
    return {v.volume_id: v.size_bytes for v in state.volumes}


@contextlib.contextmanager
def cleanup_mounts_and_loops(root: Path):
    """Whatever a failed test leaves under ``root`` (a loop device on a FUSE file, a mount) goes.

    Loop devices first: once the FUSE mount under them is gone their backing file reads ``/disk``."""
    try:
        yield
    finally:
        root = os.path.realpath(root)
        for name in os.listdir("/sys/block"):
            with contextlib.suppress(OSError):
                backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
                if backing.startswith(root + os.sep):
                    subprocess.run(["losetup", "-d", f"/dev/{name}"], capture_output=True)
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(root + os.sep)]
        for point in sorted(points, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


# ---------------------------------------------------------------------------------------------- 1


class Writer(threading.Thread):
    """Writes files of random bytes into ``directory``, each with fsync; remembers what was acknowledged."""

    def __init__(self, directory: Path, size: int = 256 * 1024):
        super().__init__(name="fault-writer", daemon=True)
        self.directory, self.size = directory, size
        self.done: dict[str, tuple[str, float]] = {}  # name -> (sha256, when fsync returned)
        self.error: BaseException | None = None
        self.longest_stall = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        index = 0
        try:
            while not self.stop.is_set():
                name, data = f"f-{index:05d}.bin", os.urandom(self.size)
                started = time.monotonic()
                fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                now = time.monotonic()
                self.longest_stall = max(self.longest_stall, now - started)
                self.done[name] = (hashlib.sha256(data).hexdigest(), now)
                index += 1
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def acknowledged_after(self, moment: float) -> int:
        return sum(when > moment for _, when in self.done.values())


def test_owner_killed_while_a_consumer_writes(tmp_path, needs_attach):
    """SIGKILL of the owning agent mid-write; restarted on the same ports: the writes resume, none is lost."""
    controller = start_controller(tmp_path / "controller")
    owner: list[Daemon] = []  # every incarnation of agent A, each stopped at the end
    with cleanup_mounts_and_loops(tmp_path), running(controller):
        try:
            owner.append(start_agent(tmp_path / "a", "node-a", controller.address,
                                     listen=f"127.0.0.1:{free_port()}", portal=f"127.0.0.1:{free_port()}"))
            with running(start_agent(tmp_path / "b", "node-b", controller.address)) as agent_b:
                owner_crash_while_writing(tmp_path, controller, owner, agent_b)
        finally:
            for agent in owner:
                agent.stop()


def owner_crash_while_writing(tmp_path: Path, controller: Daemon, owner: list[Daemon], agent_b: Daemon) -> None:
    address, agent_a = controller.address, owner[0]
    wait_for(lambda: healthy(address, "node-a", "node-b"), 20, "two healthy nodes")
    ctl_json(address, "pool", "create", "faults", "--member", "node-a/data0")
    ctl_json(address, "volume", "create", "vol1", "--size", "256MiB", "--pool", "faults")
    device = ctl_json(address, "volume", "attach", "vol1", "--node", "node-b")["device_path"]
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    mnt = tmp_path / "mnt-b"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True, capture_output=True)
    writer = Writer(mnt)
    try:
        writer.start()
        wait_for(lambda: len(writer.done) >= 10 or writer.error, 30, "ten files written before the crash")
        agent_a.kill()
        killed = time.monotonic()
        time.sleep(2.0)  # the writer is stuck on the dead owner meanwhile
        owner.append(start_agent(tmp_path / "a", "node-a", address, listen=agent_a.address,
                                 portal=agent_a.extra["portal"]))
        restarted = time.monotonic()
        wait_for(lambda: writer.acknowledged_after(restarted) >= 10 or writer.error, 60,
                 "ten files written after the restart")
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, f"a write failed across the owner's restart: {writer.error!r}"
    assert not writer.is_alive()
    assert writer.longest_stall >= 1.5, "the writer never noticed the owner was gone"
    assert writer.acknowledged_after(killed) >= 10
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True)

    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck -fn: rc {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    subprocess.run(["mount", device, str(mnt)], check=True, capture_output=True)
    try:
        read_back = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.glob("f-*.bin")}
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
    expected = {name: digest for name, (digest, _) in writer.done.items()}
    assert {name: read_back.get(name) for name in expected} == expected

    # The controller saw nothing worth changing: still attached to B, and it detaches cleanly.
    assert ctl_json(address, "volume", "show", "vol1")["attached_nodes"] == ["node-b"]
    ctl(address, "volume", "detach", "vol1", "--node", "node-b")
    ctl(address, "volume", "delete", "vol1")
    assert "reinstated" in agent_b.log()


# ---------------------------------------------------------------------------------------------- 2


def store_states(db: Path) -> dict[str, str]:
    """Volume name -> state, read straight from the controller's SQLite file (WAL: readers do not block)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return dict(conn.execute("SELECT name, state FROM volumes"))


def volume_list(address: str) -> list[dict]:
    return ctl_json(address, "volume", "list")["volumes"]


def test_controller_killed_mid_create(tmp_path):
    """SIGKILL of the controller between "creating" and "available", and during a burst of creates."""
    listen = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "controller"
    db = workdir / "controller.db"
    controller = start_controller(workdir, listen=listen)
    agent = start_agent(tmp_path / "a", "node-a", listen)
    frozen = False
    try:
        wait_for(lambda: healthy(listen, "node-a"), 20, "a healthy node")
        ctl_json(listen, "pool", "create", "faults", "--member", "node-a/data0")
        ctl_json(listen, "volume", "create", "before", "--size", "64MiB", "--pool", "faults")
        said_before = volume_list(listen)

        # In flight for sure: the owner is frozen, so each create waits on it with its row "creating".
        os.kill(agent.process.pid, signal.SIGSTOP)
        frozen = True
        slow = [f"slow-{i}" for i in range(3)]
        with ThreadPoolExecutor(len(slow)) as pool:
            calls = [pool.submit(shoalctl, listen, "volume", "create", name, "--size", "32MiB", "--pool", "faults")
                     for name in slow]
            # three shoalctl processes start and call; generous for a loaded 2-core machine
            wait_for(lambda: all(store_states(db).get(n) == "creating" for n in slow), 60, "rows in creating")
            controller.kill()
            assert all(call.result().returncode != 0 for call in calls)
        os.kill(agent.process.pid, signal.SIGCONT)
        frozen = False

        controller = start_controller(workdir, listen=listen)
        by_name = {v["name"]: v for v in volume_list(listen)}
        assert by_name["before"] == said_before[0]
        # Kept, none failed: still "creating", or already finished by the new controller's first reconcile, which
        # may run before this list on a loaded machine (CI saw all three "available" here).
        assert all(by_name[n]["state"] in ("creating", "available") for n in slow), by_name
        wait_for(lambda: all(v["state"] == "available" for v in volume_list(listen)), 30,
                 "reconcile to finish the creates")

        # A burst, and the controller dies somewhere in it.
        burst = [f"burst-{i}" for i in range(8)]
        with ThreadPoolExecutor(len(burst)) as pool:
            calls = [pool.submit(shoalctl, listen, "volume", "create", name, "--size", "16MiB", "--pool", "faults")
                     for name in burst]
            deadline = time.monotonic() + 20
            while len(store_states(db)) <= 1 + len(slow) and time.monotonic() < deadline:
                time.sleep(0.002)  # kill as soon as the first row of the burst is written
            controller.kill()
            [call.result() for call in calls]
        controller = start_controller(workdir, listen=listen)
        wait_for(lambda: all(v["state"] == "available" for v in volume_list(listen)), 30,
                 "reconcile to finish the burst")

        # Every create repeated converges on what exists (and creates what never got a row).
        ids = {v["name"]: v["id"] for v in volume_list(listen)}
        for name, size in [("before", "64MiB"), *[(n, "32MiB") for n in slow], *[(n, "16MiB") for n in burst]]:
            again = ctl_json(listen, "volume", "create", name, "--size", size, "--pool", "faults")
            assert again["state"] == "available"
            assert again["id"] == ids.get(name, again["id"])
        final = volume_list(listen)
        assert sorted(v["name"] for v in final) == sorted(["before", *slow, *burst])
        # No half-made volume anywhere: the owner holds exactly the volumes the controller knows.
        assert agent_volumes(agent) == {v["id"]: v["size_bytes"] for v in final}
    finally:
        if frozen:
            os.kill(agent.process.pid, signal.SIGCONT)
        agent.stop()
        controller.stop()
