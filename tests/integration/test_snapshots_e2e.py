"""Snapshots and clones end to end: one real ``shoal controller`` and one real ``shoal agent`` on 127.0.0.1.

A volume is attached (userspace connector: Shoal's initiator, FUSE, a loop
device) and written through the device; a snapshot is taken *while it is
attached* (the agent holds the LUN still, flushes it, then reflinks or starts
a background copy guarded against the LUN's writes); more is written; a clone
of the snapshot is attached and must read the data as of the snapshot, the
later writes not in it.  On ext4 or tmpfs (no FICLONE) this is the background
copy path; on btrfs/XFS the reflink path.  Then the refusals (deleting a
volume with snapshots) and the deletes, through shoalctl with ``-o json``.

Real peers: the kernel's loop driver and FUSE.  Every process is stopped by
PID in ``finally``.  Mocks: none.
"""

from __future__ import annotations

import os

import pytest

from tests.integration.test_pool_e2e import Ctl, _requirements, wait_for  # noqa: F401 (autouse fixture)
from tests.support.controller_process import running, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MiB = 1 << 20
BEFORE = os.urandom(MiB)          # written before the snapshot, at 4 MiB
AFTER = os.urandom(MiB)           # written after it, over the same place
LATE = b"written after the snapshot" * 100  # and somewhere the snapshot saw nothing (a hole)


def pwrite_sync(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)  # through the loop device and FUSE to the target: acknowledged writes
    finally:
        os.close(fd)


def pread(device: str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_snapshot_of_an_attached_volume_and_a_clone_of_it(tmp_path):
    controller = start_controller(tmp_path / "controller")
    with running(controller), running(start_agent(tmp_path / "a", "node-a", controller.address)) as agent:
        ctl = Ctl(controller.address)
        wait_for(lambda: [n["health"] for n in ctl.json("node", "list")["nodes"]] == ["healthy"], 20,
                 "a healthy node")
        ctl.json("volume", "create", "vol1", "--size", "64MiB")
        device = ctl.json("volume", "attach", "vol1", "--node", "node-a")["device_path"]
        pwrite_sync(device, 4 * MiB, BEFORE)

        snap = ctl.json("volume", "snapshot", "vol1", "--snapshot", "snap1")
        assert (snap["volume"], snap["state"], snap["size_bytes"], snap["owner_node"]) == (
            "vol1", "ready", 64 * MiB, "node-a")
        assert ctl.json("volume", "snapshot", "vol1", "--snapshot", "snap1")["state"] == "ready"  # a repeat
        pwrite_sync(device, 4 * MiB, AFTER)
        pwrite_sync(device, 40 * MiB, LATE)

        clone = ctl.json("volume", "clone", "vol2", "--from", "snap1")
        assert (clone["state"], clone["source"], clone["owner_node"], clone["size_bytes"]) == (
            "available", "snapshot/snap1", "node-a", 64 * MiB)
        clone_device = ctl.json("volume", "attach", "vol2", "--node", "node-a")["device_path"]
        assert pread(clone_device, 4 * MiB, MiB) == BEFORE
        assert pread(clone_device, 40 * MiB, len(LATE)) == bytes(len(LATE))
        assert pread(device, 4 * MiB, MiB) == AFTER  # the volume itself moved on

        # A clone of the volume (attached, written meanwhile) has what was acknowledged before it.
        copy = ctl.json("volume", "clone", "vol3", "--from", "volume/vol1")
        assert copy["source"] == "volume/vol1"
        listed = ctl.json("snapshot", "list", "--volume", "vol1")["snapshots"]
        assert [(s["name"], s["state"], s["progress"]) for s in listed] == [("snap1", "ready", 1.0)]

        for name, node in (("vol2", "node-a"), ("vol1", "node-a")):
            ctl("volume", "detach", name, "--node", node)
        assert "has snapshots (snap1)" in ctl.error("volume", "delete", "vol1")
        device3 = ctl.json("volume", "attach", "vol3", "--node", "node-a")["device_path"]
        assert pread(device3, 4 * MiB, MiB) == AFTER and pread(device3, 40 * MiB, len(LATE)) == LATE
        ctl("volume", "detach", "vol3", "--node", "node-a")

        ctl("snapshot", "delete", "snap1")
        ctl("snapshot", "delete", "snap1")  # a repeat: OK
        for name in ("vol3", "vol2", "vol1"):
            ctl("volume", "delete", name)
        assert ctl.json("volume", "list")["volumes"] == [] and ctl.json("snapshot", "list")["snapshots"] == []
        log = agent.log()
        assert "in the background (no reflink" in log or ": reflinked" in log  # which path this filesystem took
