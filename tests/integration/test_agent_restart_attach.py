"""Userspace attachments across an agent restart, and devices changed behind the agent's back.

The agent's ``AttachmentManager`` over a real ``UserspaceConnector``: real FUSE
mounts and real loop devices.  The LUN is a ``FileBlockDevice`` over a file
(the connector's ``open_lun`` hook, our own wrapper boundary: no iSCSI here,
``test_agent_attach.py`` covers that).  The "previous agent" is a child
process that attaches, then stops as the agent does on SIGTERM
(``AttachmentManager.close``) with one device held, so its FUSE server really
dies under a loop device.  Checked: an attach, or a CSI login, never answers a
device path that is gone or bound to another file (the record's device is
checked, as ``Connector.foreign_device`` does); a loop device left on a dead
FUSE file stays dead (EIO) whatever is served at that path later, is never
handed out, and is removed by the logout or detach of its volume once it is
no longer in use.  Needs root, /dev/fuse, loop devices and libfuse 3 (skipped
otherwise).  Every loop device and FUSE mount a test makes is removed, also
when it fails; the child process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_agent.agent.attachments import USERSPACE, AttachmentManager
from node_agent.agent.exports import ExportInfo
from node_agent.host.connector import TemporaryConnectorError
from node_agent.host.fuse_export import FileBlockDevice, is_mountpoint, unmount
from node_agent.host.runner import SubprocessRunner
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings, _backing_file, _loops_backed_by
from tests.conftest import require_loop_and_fuse
from tests.support.shoal_target import REPO, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture(autouse=True)
def _requirements():
    require_loop_and_fuse("losetup", "blockdev")


def export_of(volume_id: str) -> ExportInfo:
    return ExportInfo(volume_id=volume_id, target_iqn=f"iqn.2026-11.io.shoal:target:test:{volume_id}",
                      portals=("127.0.0.1:3260",), lun=0, naa="", serial=volume_id, chap_user="")


def image(root: Path, volume_id: str, fill: bytes) -> Path:
    """The volume's bytes: a file of 8 MiB whose first block is ``fill`` repeated."""
    path = root / f"{volume_id}.img"
    if not path.exists():
        with open(path, "wb") as fh:
            fh.truncate(8 * MiB)
            fh.write(fill * BLOCK)
    return path


def held_exclusively(device: str) -> list[str]:
    """``in_use`` as a mount would make it: someone holds the device with O_EXCL."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError:
        return [f"{device} held exclusively"]
    os.close(fd)
    return []


def make_manager(root: Path) -> tuple[AttachmentManager, list[UserspaceConnector]]:
    """An agent's attachments under ``root/data``: the userspace connector with files for LUNs."""
    made: list[UserspaceConnector] = []

    def open_lun(target, settings):
        return FileBlockDevice(str(root / f"{target.volume_id}.img"), block_size=512, serial=target.volume_id)

    def userspace():
        connector = UserspaceConnector(UserspaceSettings(state_dir=str(root / "data" / "userspace")),
                                       runner=SubprocessRunner(timeout=30.0), open_lun=open_lun)
        made.append(connector)
        return connector

    return AttachmentManager(str(root / "data"), {USERSPACE: userspace}, in_use=held_exclusively), made


def first_block(device: str) -> bytes:
    """The device's first block, read with O_DIRECT (no page cache between the test and the device)."""
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    return bytes(buf)


def fuse_file(root: Path, volume_id: str) -> str:
    return os.path.realpath(root / "data" / "userspace" / "volumes" / volume_id / "mnt" / "disk")


@contextlib.contextmanager
def cleaned(root: Path):
    """Whatever the test leaves under ``root``: loop devices on its files, FUSE mounts under it."""
    try:
        yield
    finally:
        real = os.path.realpath(root)
        for name in sorted(os.listdir("/sys/block")):
            backing = _backing_file(f"/dev/{name}") if name.startswith("loop") else None
            if backing and backing.startswith(real + "/"):
                subprocess.run(["losetup", "--detach", f"/dev/{name}"], check=False)
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            mounts = [line.split()[4] for line in fh]
        for mount_point in reversed(mounts):
            if mount_point.startswith(real + "/"):
                with contextlib.suppress(OSError):
                    unmount(mount_point, lazy=True)


@pytest.mark.parametrize("how", ["attach", "csi-login"])
def test_a_repeat_never_answers_a_device_that_is_no_longer_the_volumes(tmp_path, how):
    """The recorded /dev/loopN was detached behind the agent's back and the number bound to another file
    (another volume's, by now): the repeated attach (or NodeStageVolume's login) used to answer the record's
    /dev/loopN as it was, so the caller got the other file's data.  Now the record's device is checked
    (bound to the FUSE file this process serves) and the volume is attached again."""
    image(tmp_path, "vol-a", b"A")
    other = image(tmp_path, "other", b"O")
    manager, _ = make_manager(tmp_path)
    with cleaned(tmp_path):
        try:
            if how == "attach":
                device = manager.attach(export_of("vol-a"))
            else:
                assert manager.attach(export_of("vol-a"), defer_login=True) == ""
                device = manager.login("vol-a")
            assert first_block(device) == b"A" * BLOCK

            subprocess.run(["losetup", "--detach", device], check=True)
            deadline = time.monotonic() + 10
            while _backing_file(device) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            bound = subprocess.run(["losetup", device, str(other)], capture_output=True, text=True)
            if bound.returncode != 0:  # someone else took the number meanwhile: as bad, and not ours to undo
                print(f"{device} could not be bound to {other}: {bound.stderr.strip()}")

            again = manager.attach(export_of("vol-a")) if how == "attach" else manager.login("vol-a")
            assert _backing_file(again) == fuse_file(tmp_path, "vol-a"), (again, _backing_file(again))
            assert first_block(again) == b"A" * BLOCK
            assert manager.get("vol-a").device_path == again
            assert manager.foreign_device("vol-a", again) == ""
            if bound.returncode == 0:
                assert again != device
                assert manager.foreign_device("vol-a", device) != ""
                assert first_block(device) == b"O" * BLOCK  # the other file was never touched
        finally:
            manager.detach("vol-a")
            if _backing_file(device) == str(other):
                subprocess.run(["losetup", "--detach", device], check=False)
        assert manager.list() == []
        assert _loops_backed_by(fuse_file(tmp_path, "vol-a")) == []
        assert not is_mountpoint(os.path.dirname(fuse_file(tmp_path, "vol-a")))


def previous_agent(root: Path) -> subprocess.Popen:
    """A child process that attaches vol-held and vol-free, prints their devices, and stops as the agent does
    (``AttachmentManager.close``) when its stdin closes."""
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from tests.integration.test_agent_restart_attach import export_of, make_manager\n"
            f"manager, _ = make_manager(Path({str(root)!r}))\n"
            "devices = {v: manager.attach(export_of(v)) for v in ('vol-held', 'vol-free')}\n"
            "print(json.dumps(devices), flush=True)\n"
            "sys.stdin.read()\n"
            "manager.close()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)


def test_a_restart_with_a_device_in_use_never_hands_out_its_dead_loop_device_and_cleans_it_later(tmp_path):
    """The agent stopped while vol-held's device was in use (mounted): its logout was refused, the process
    exited, and /dev/loopN stayed on a FUSE file nobody serves (EIO for good).  The restarted agent keeps the
    record as not logged in and never answers that device; attaching vol-held is refused (naming the stale
    device) while it is in use; a FUSE file served again at the same path does not revive it.  Once it is
    released, the detach of vol-held removes the dead loop device and the dead mount (they used to stay:
    the record said "not logged in", so the detach asked nothing of the connector)."""
    image(tmp_path, "vol-held", b"H")
    image(tmp_path, "vol-free", b"F")
    with cleaned(tmp_path):
        child = previous_agent(tmp_path)
        hold = -1
        try:
            devices = json.loads(child.stdout.readline())
            dead = devices["vol-held"]
            assert first_block(dead) == b"H" * BLOCK
            hold = os.open(dead, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)  # as a mounted filesystem would
            child.stdin.close()
            assert child.wait(60) == 0
        finally:
            stop_process(child)

        try:
            held_file = fuse_file(tmp_path, "vol-held")
            assert _loops_backed_by(held_file) == [dead]  # the previous run could not remove it
            assert _loops_backed_by(fuse_file(tmp_path, "vol-free")) == []  # logged out at its stop
            with pytest.raises(OSError):
                first_block(dead)  # its FUSE server is gone: EIO

            manager, _ = make_manager(tmp_path)
            manager.restore()
            assert {r.volume_id: r.device_path for r in manager.list()} == {"vol-held": "", "vol-free": ""}

            with pytest.raises(TemporaryConnectorError, match="in use"):
                manager.attach(export_of("vol-held"))
            with pytest.raises(TemporaryConnectorError, match="in use"):
                manager.login("vol-held")
            assert manager.get("vol-held").device_path == ""

            free = manager.attach(export_of("vol-free"))
            assert free != dead and first_block(free) == b"F" * BLOCK
            assert manager.attach(export_of("vol-free")) == free  # a repeat: the same, checked, device
        finally:
            if hold >= 0:
                os.close(hold)

        # Released: the detach of its record removes the dead device and the dead mount.
        assert manager.detach("vol-held") is True
        assert _loops_backed_by(held_file) == []
        assert not is_mountpoint(os.path.dirname(held_file))
        assert manager.detach("vol-free") is True
        assert manager.list() == []
        assert _loops_backed_by(fuse_file(tmp_path, "vol-free")) == []


def test_a_restart_with_a_device_in_use_then_released_attaches_the_volume_again(tmp_path):
    """As above, but the dead device is released (unmounted) before anything else: the next attach removes it
    and answers a new device that reads the volume; the old number is not answered while it is dead."""
    image(tmp_path, "vol-held", b"H")
    image(tmp_path, "vol-free", b"F")
    with cleaned(tmp_path):
        child = previous_agent(tmp_path)
        try:
            devices = json.loads(child.stdout.readline())
            dead = devices["vol-held"]
            hold = os.open(dead, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            try:
                child.stdin.close()
                assert child.wait(60) == 0
            finally:
                os.close(hold)
        finally:
            stop_process(child)
        manager, _ = make_manager(tmp_path)
        manager.restore()  # the leftover is not in use any more: cleaned at once
        assert _loops_backed_by(fuse_file(tmp_path, "vol-held")) == []
        try:
            device = manager.attach(export_of("vol-held"))
            assert first_block(device) == b"H" * BLOCK
            assert manager.foreign_device("vol-held", device) == ""
        finally:
            for volume_id in ("vol-held", "vol-free"):
                manager.detach(volume_id)
        assert manager.list() == []


def test_a_repeated_attach_shows_the_size_the_volume_grew_to(tmp_path):
    """``shoalctl volume expand`` grows the volume at its owner; a device attached with a plain attach kept its
    old size (only CSI's NodeExpandVolume rescanned): the repeated attach now refreshes it."""
    path = image(tmp_path, "vol-a", b"A")
    manager, _ = make_manager(tmp_path)
    with cleaned(tmp_path):
        try:
            device = manager.attach(export_of("vol-a"))
            size = lambda: int(subprocess.run(["blockdev", "--getsize64", device], capture_output=True,  # noqa: E731
                                              text=True, check=True).stdout)
            assert size() == 8 * MiB
            os.truncate(path, 16 * MiB)  # the owner grew the volume
            assert manager.attach(export_of("vol-a")) == device  # the same device ...
            assert size() == 16 * MiB  # ... at the new size
            assert first_block(device) == b"A" * BLOCK
        finally:
            manager.detach("vol-a")
        assert manager.list() == []
