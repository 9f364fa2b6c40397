"""A pool end to end: one real ``shoal controller`` and three real ``shoal agent`` processes on 127.0.0.1.

Issue 4's walk: shoalctl creates a pool on agent A's disk and a 1 GiB volume
there; the volume is attached to agent B (userspace connector: Shoal's
initiator, FUSE, a loop device), formatted with ``mkfs.ext4``, mounted and
filled; detached, attached to agent C, which reads the same files.  Deleting
an attached volume is refused; attaching to a node whose agent stopped fails
with a clear error; bad input gets a clear error and changes nothing; the
per-volume CHAP secret appears in no log and no shoalctl output.

Real peers: the kernel's loop driver, FUSE, e2fsprogs, mount.  Every process
and mount is removed in ``finally``.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_loop_and_fuse
from tests.support.controller_process import running, shoalctl, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

GiB = 1 << 30


@pytest.fixture(autouse=True)
def _requirements():
    require_loop_and_fuse("losetup", "mkfs.ext4", "mount", "umount")


class Ctl:
    """shoalctl against one controller; keeps every output to check for secrets at the end."""

    def __init__(self, address: str):
        self.address = address
        self.outputs: list[str] = []

    def __call__(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
        result = shoalctl(self.address, *args)
        self.outputs += [result.stdout, result.stderr]
        assert result.returncode == rc, f"shoalctl {' '.join(args)}: rc {result.returncode}\n{result.stderr}"
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "-o", "json").stdout)

    def error(self, *args: str, rc: int = 1) -> str:
        result = self(*args, rc=rc)
        assert result.stderr.startswith(("shoalctl: ", "usage: shoalctl")), result.stderr
        return result.stderr


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def mounted(device: str, where: Path):
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", device, str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_pool_end_to_end(tmp_path):
    files = {f"file-{i}.bin": os.urandom(256 * 1024 + i) for i in range(5)}
    controller = start_controller(tmp_path / "controller")
    with running(controller), \
            running(start_agent(tmp_path / "a", "node-a", controller.address)) as agent_a, \
            running(start_agent(tmp_path / "b", "node-b", controller.address)) as agent_b, \
            running(start_agent(tmp_path / "c", "node-c", controller.address)) as agent_c:
        ctl = Ctl(controller.address)
        wait_for(lambda: sum(n["health"] == "healthy" for n in ctl.json("node", "list")["nodes"]) == 3, 20,
                 "three healthy nodes")

        # A pool of agent A's disk, a 1 GiB volume placed there.
        pool = ctl.json("pool", "create", "e2e", "--member", "node-a/data0")
        assert pool["members"] == [{"node_id": "node-a", "disk": "data0"}]
        volume = ctl.json("volume", "create", "vol1", "--size", "1GiB", "--pool", "e2e")
        assert (volume["owner_node"], volume["size_bytes"], volume["state"]) == ("node-a", GiB, "available")
        assert ctl.json("volume", "create", "vol1", "--size", "1G", "--pool", "e2e")["id"] == volume["id"]

        check_bad_input_changes_nothing(ctl, volume)

        # Attach to B, format, mount, write.
        attached = ctl.json("volume", "attach", "vol1", "--node", "node-b", "--mode", "userspace")
        device_b = attached["device_path"]
        assert attached["state"] == "attached" and device_b.startswith("/dev/")
        subprocess.run(["mkfs.ext4", "-q", "-F", device_b], check=True, capture_output=True)
        with mounted(device_b, tmp_path / "mnt-b") as mnt:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            os.sync()

        # Deleting an attached volume is refused, and changes nothing.
        assert "attached to node-b" in ctl.error("volume", "delete", "vol1")
        assert ctl.json("volume", "show", "vol1")["attached_nodes"] == ["node-b"]

        # Move it: detach from B, attach to C, read the same files.
        ctl("volume", "detach", "vol1", "--node", "node-b")
        ctl("volume", "detach", "vol1", "--node", "node-b")  # a repeat: OK
        device_c = ctl.json("volume", "attach", "vol1", "--node", "node-c")["device_path"]
        with mounted(device_c, tmp_path / "mnt-c") as mnt:
            assert {p.name: p.read_bytes() for p in mnt.glob("file-*")} == files
        assert ctl.json("volume", "show", "vol1")["attached_nodes"] == ["node-c"]
        ctl("volume", "detach", "vol1", "--node", "node-c")

        # The volume's data never left A's disk: A holds the only 1 GiB file, and the files are in it.
        def volume_files(root):
            return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size == GiB]
        [backing] = volume_files(tmp_path / "a")
        assert volume_files(tmp_path / "b") == [] and volume_files(tmp_path / "c") == []
        name, data = next(iter(files.items()))
        shown = subprocess.run(["debugfs", "-R", f"cat /{name}", str(backing)], capture_output=True, check=True)
        assert shown.stdout == data

        # The CHAP secret the controller made for vol1: in its store, nowhere else we can see.
        # The running controller holds the file (one store per file): read it, read-only, beside it.
        db_path = str(tmp_path / "controller" / "controller.db")
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            [(secret,)] = db.execute("SELECT secret FROM chap_secrets WHERE volume = ?", ("vol1",)).fetchall()
        assert len(secret) >= 16

        # An unhealthy node: B's agent stops; after the heartbeat timeout, attaching there fails clearly.
        agent_b.stop()
        wait_for(lambda: {n["id"]: n["health"] for n in ctl.json("node", "list")["nodes"]}["node-b"] == "unhealthy",
                 10, "node-b unhealthy")
        message = ctl.error("volume", "attach", "vol1", "--node", "node-b")
        assert "node node-b is unhealthy" in message and "FAILED_PRECONDITION" in message
        assert ctl.json("volume", "show", "vol1")["attached_nodes"] == []

        ctl("volume", "delete", "vol1")
        ctl("volume", "delete", "vol1")  # deleting what is gone: OK
        assert ctl.json("volume", "list")["volumes"] == []
        ctl("pool", "delete", "e2e")

        logs = [d.log() for d in (controller, agent_a, agent_b, agent_c)]
        assert all(logs) and not any(secret in text for text in logs + ctl.outputs)


def check_bad_input_changes_nothing(ctl: Ctl, volume: dict) -> None:
    usage = [("volume", "create", "x", "--size", "1GB"), ("volume", "create", "x", "--size", "-5"),
             ("volume", "create", "x", "--size", "0"), ("volume", "create", "x", "--size", "lots"),
             ("volume", "create", "x", "--size", "99999999999999999999999"),
             ("volume", "attach", "vol1", "--node", "node-b", "--mode", "telepathy")]
    for args in usage:
        assert ctl.error(*args, rc=2)
    refused = {
        ("volume", "create", "x", "--size", "1GiB", "--pool", "nope"): "pool nope does not exist",
        ("volume", "create", "vol1", "--size", "2GiB", "--pool", "e2e"): "already exists with other parameters",
        ("volume", "create", "x", "--size", "2PiB", "--pool", "e2e"): "larger than the largest volume",
        ("volume", "create", "x", "--size", "1000", "--pool", "e2e"): "not a multiple of 512",
        ("volume", "create", "x", "--size", "900TiB", "--pool", "e2e"): "RESOURCE_EXHAUSTED",
        ("volume", "create", "Bad_Name", "--size", "1GiB", "--pool", "e2e"): "is not valid",
        ("volume", "expand", "vol1", "--size", "512MiB"): "only grow",
        ("volume", "attach", "vol1", "--node", "node-z"): "node-z is not registered",
        ("pool", "create", "e2e", "--member", "node-b/data0"): "already exists",
    }
    for args, expected in refused.items():
        assert expected in ctl.error(*args), args
    volumes = ctl.json("volume", "list")["volumes"]
    assert [(v["name"], v["size_bytes"], v["state"]) for v in volumes] == [("vol1", GiB, "available")]
    assert ctl.json("volume", "show", "vol1")["id"] == volume["id"]
    assert [p["name"] for p in ctl.json("pool", "list")["pools"]] == ["default", "e2e"]
