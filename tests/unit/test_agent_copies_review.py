"""Snapshots, clones and copies: bugs a review found (2026-12-06), each test failing before its fix.

Real filesystems where the bug needs one: two tmpfs mounts (a clone onto a disk on another filesystem,
where ``copy_file_range`` answers EXDEV) and XFS with reflinks on a loop device (a thick clone made by
reflink shares its source's blocks).  Mounted in a temporary directory and unmounted after; root only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time

import pytest

from node_agent.agent.errors import Unavailable, grpc_status
from node_agent.agent.settings import DiskSpec
from node_agent.agent.snapshots import SnapshotManager
from node_agent.agent.volumes import VolumeManager
from tests.conftest import require_tools

MiB = 1 << 20


@contextlib.contextmanager
def _mounted(args: list[str], path: str):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", *args, path], check=True, capture_output=True, timeout=60)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True, capture_output=True, timeout=60)


@pytest.fixture
def two_filesystems(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    with _mounted(["-t", "tmpfs", "-o", "size=64m", "tmpfs"], str(tmp_path / "m0")) as m0, \
            _mounted(["-t", "tmpfs", "-o", "size=64m", "tmpfs"], str(tmp_path / "m1")) as m1:
        yield m0, m1


@pytest.fixture
def xfs_with_reflinks(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("a loop-mounted XFS needs root and loop devices")
    require_tools("mkfs.xfs", "losetup")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as handle:
        handle.truncate(400 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True, timeout=120)
    with _mounted(["-o", "loop", str(image)], str(tmp_path / "mx")) as path:
        yield path


def _write(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ready(manager: VolumeManager, volume_id: str):
    deadline = time.monotonic() + 30
    while (info := manager.lookup(volume_id)).state == "copying" and time.monotonic() < deadline:
        time.sleep(0.01)
    return info


@pytest.mark.parametrize("background", [False, True])
def test_a_clone_onto_a_disk_on_another_filesystem_is_copied(two_filesystems, background):
    """FICLONE and copy_file_range both refuse two filesystems (EXDEV); the copy used to fail for good, so a
    clone to another disk (or with no disk named, to the one with most room) always ended in "error"."""
    m0, m1 = two_filesystems
    volumes = VolumeManager([DiskSpec("data0", m0 + "/d"), DiskSpec("data1", m1 + "/d")],
                            background_copies=background)
    source = volumes.create("src", 4 * MiB + 512, disk="data0")
    payload = os.urandom(2 * MiB)
    _write(source.path, payload, MiB)
    _write(source.path, b"tail", 4 * MiB + 508)
    volumes.create("cl", 0, disk="data1", thin=True, source="src")
    clone = _ready(volumes, "cl")
    assert (clone.state, clone.disk) == ("ready", "data1"), clone.message
    with open(clone.path, "rb") as handle:
        data = handle.read()
    assert len(data) == 4 * MiB + 512 and data[MiB:3 * MiB] == payload and data[-4:] == b"tail"
    assert data[:MiB] == bytes(MiB)
    snapshots = SnapshotManager(volumes)
    snapshots.create("s1", "src")
    deadline = time.monotonic() + 30
    while snapshots.get("s1").state == "copying" and time.monotonic() < deadline:
        time.sleep(0.01)
    volumes.create("cl2", 0, disk="data1", thin=True, source=snapshots.source("s1"))
    assert _ready(volumes, "cl2").state == "ready"


def test_a_thick_clone_made_by_reflink_owns_its_blocks(xfs_with_reflinks):
    """posix_fallocate counts a reflinked clone's shared blocks as allocated: the "thick" clone could then
    fail writes with ENOSPC once the filesystem filled.  Its blocks are unshared first now."""
    volumes = VolumeManager([DiskSpec("data0", xfs_with_reflinks + "/d")])
    source = volumes.create("src", 64 * MiB)
    _write(source.path, b"\xab" * (48 * MiB))
    free_before = _free(xfs_with_reflinks)
    clone = volumes.create("thick", 0, thin=False, source="src")
    assert _ready(volumes, "thick").state == "ready"
    assert free_before - _free(xfs_with_reflinks) >= 64 * MiB  # all of it its own, not only the 16 MiB tail
    with _filled(xfs_with_reflinks):
        _write(clone.path, b"\x11" * (48 * MiB))  # ENOSPC before the fix
    with open(clone.path, "rb") as handle:
        assert handle.read(MiB) == b"\x11" * MiB


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def _filled(path: str):
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, _free(path))
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(MiB))
        yield
    finally:
        os.close(fd)
        os.unlink(filler)


def test_a_snapshot_is_readable_by_root_only(tmp_path):
    """Volumes are 0600; a snapshot was made 0444, so any local user could read a guest's disk through it."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d"))])
    volumes.create("v", MiB)
    snapshot = SnapshotManager(volumes).create("s1", "v")
    assert stat.S_IMODE(os.stat(snapshot.path).st_mode) == 0o400


def test_a_snapshot_an_older_agent_left_readable_by_all_is_made_private_at_start(tmp_path):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d"))])
    volumes.create("v", MiB)
    snapshot = SnapshotManager(volumes).create("s1", "v")
    os.chmod(snapshot.path, 0o444)
    SnapshotManager(volumes)  # the next start
    assert stat.S_IMODE(os.stat(snapshot.path).st_mode) == 0o400


def test_a_copy_start_the_busy_portal_did_not_reach_is_unavailable_not_internal(tmp_path):
    """``PortalThread.call_within`` gives up with a bare TimeoutError when the portal's loop is busy: that
    answered INTERNAL ("a bug, see the log"), which the controller does not retry.  Nothing is left."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d"))], use_reflink=False)
    snapshots = SnapshotManager(volumes)
    volumes.create("v", MiB)

    def busy(volume_id, fn):  # as call_within when the loop did not get to ``fn`` in time
        raise TimeoutError()

    volumes.quiesce = busy
    with pytest.raises(Unavailable, match="retry") as raised:
        snapshots.create("s1", "v")
    assert grpc_status(raised.value)[0].name == "UNAVAILABLE"
    assert os.listdir(tmp_path / "d" / "snapshots") == []
    with pytest.raises(Unavailable):
        volumes.create("c", 0, source="v")
