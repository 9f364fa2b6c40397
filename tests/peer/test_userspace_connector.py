"""The userspace connector (node_agent/host/userspace.py) against ``shoal target``.

Issue 3, "the userspace connector": a volume served by ``shoal target`` is
attached through Shoal's initiator, FUSE and a loop device, formatted with
``mkfs.ext4``, mounted, filled with files, unmounted, detached, attached again
and verified; a second attach while attached reuses the device and the
session (reference count); a LUN whose VPD 83h designator / 80h serial (SPC-4
§7.8.6, §7.8.15) is not the expected volume's is refused before any device
exists; what a killed agent left behind is cleaned up by the next attach.

Real peers: the kernel's loop driver, FUSE, e2fsprogs, mount; the target is a
real ``shoal target`` process on 127.0.0.1.  Every loop device, mount and
process a test makes is removed in ``finally`` (also on failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from node_agent.host.connector import IdentityMismatch, TemporaryConnectorError, VolumeTarget
from node_agent.host.fuse_export import is_mountpoint, unmount
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings
from node_agent.scsi.vpd import naa_for
from node_agent.target_service import _LUN_NAMESPACE
from tests.conftest import require_loop_and_fuse, require_tools
from tests.support.shoal_target import REPO, running_shoal_target, stop_process

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(300)]

LUN_SIZE = 128 << 20
INITIATOR = "iqn.2026-11.io.shoal.test:userspace-host"


@pytest.fixture(autouse=True)
def _requirements():
    require_loop_and_fuse("losetup", "mkfs.ext4", "mount", "umount", "blockdev", "e2fsck")


def volume_id_of(lun_path: Path) -> str:
    """The identity ``shoal target`` gives a LUN file it was not told a volume id for."""
    return str(uuid.uuid5(_LUN_NAMESPACE, os.path.realpath(lun_path)))


def volume_target(target, lun: int = 0, *, identity_of: int | None = None, name: str | None = None) -> VolumeTarget:
    volume = volume_id_of(target.lun_paths[lun if identity_of is None else identity_of])
    return VolumeTarget(portals=(target.portal,), target_iqn=target.iqn, lun=lun,
                        volume_id=name or volume, expected_naa=naa_for(volume).hex(), expected_serial=volume[:64])


def loop_devices() -> dict[str, str]:
    """Every bound loop device and its backing file (from sysfs)."""
    found = {}
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            found[f"/dev/{name}"] = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    return found


def losetup_all() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def host_cleanup(tmp_path: Path):
    """Whatever happens, leave no mount, loop device or FUSE export under ``tmp_path`` behind."""
    root = os.path.realpath(tmp_path)
    try:
        yield
    finally:
        for mount_point in reversed(_mounts_under(root)):
            if not mount_point.endswith("/mnt"):  # filesystems on loop devices first
                subprocess.run(["umount", "-l", mount_point], check=False)
        for loop, backing in loop_devices().items():
            if backing.startswith(root + "/"):
                subprocess.run(["losetup", "--detach", loop], check=False)
        for mount_point in reversed(_mounts_under(root)):
            with contextlib.suppress(OSError):
                unmount(mount_point, lazy=True)


def _mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if p.startswith(root + "/")]


@pytest.fixture
def connector(tmp_path):
    with host_cleanup(tmp_path):
        conn = UserspaceConnector(UserspaceSettings(state_dir=str(tmp_path / "state"), initiator_iqn=INITIATOR))
        yield conn


def fill(mount_point: Path, count: int = 200, seed: int = 1) -> dict[str, str]:
    rng = random.Random(seed)
    sums = {}
    for i in range(count):
        data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 65536, 200_000]))
        name = f"dir{i % 7}/file{i:03d}.bin"
        (mount_point / name).parent.mkdir(exist_ok=True)
        (mount_point / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def checksums(mount_point: Path, names) -> dict[str, str]:
    return {name: hashlib.sha256((mount_point / name).read_bytes()).hexdigest() for name in names}


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True)


def test_attach_format_fill_detach_reattach_verify(tmp_path, connector):
    with running_shoal_target(tmp_path, luns=(("vol", LUN_SIZE),)) as target:
        vt = volume_target(target)
        fs = tmp_path / "fs"
        fs.mkdir()
        started = time.monotonic()
        device = connector.attach(vt)
        assert device.path.startswith("/dev/loop") and device.naa == vt.expected_naa
        assert loop_devices()[device.path] == device.handle
        run("mkfs.ext4", "-q", "-F", device.path)
        run("mount", device.path, str(fs))
        try:
            sums = fill(fs)
        finally:
            run("umount", str(fs))
        connector.detach(vt)
        first_round = time.monotonic() - started
        assert device.path not in loop_devices() or loop_devices()[device.path] != device.handle
        assert not is_mountpoint(os.path.dirname(device.handle))
        assert connector.users(vt.volume_id) == 0
        # The target's file holds a clean filesystem: everything reached it before logout.
        run("e2fsck", "-fn", str(target.lun_paths[0]))

        device = connector.attach(vt)
        run("mount", device.path, str(fs))
        try:
            assert checksums(fs, sums) == sums
        finally:
            run("umount", str(fs))
        connector.detach(vt)
        connector.detach(vt)  # detaching what is gone succeeds
        print(f"\nattach+mkfs+200 files+detach: {first_round:.1f}s; total {time.monotonic() - started:.1f}s")


def test_second_attach_reuses_device_and_session(tmp_path, connector):
    with running_shoal_target(tmp_path, luns=(("vol", 32 << 20),)) as target:
        vt = volume_target(target)
        first = connector.attach(vt)
        second = connector.attach(vt)
        assert second.path == first.path and connector.users(vt.volume_id) == 2
        assert target.log().count(f"login: {INITIATOR}") == 1  # one session for both
        connector.detach(vt)
        assert connector.users(vt.volume_id) == 1
        assert loop_devices().get(first.path) == first.handle  # still attached for the other user
        with open(first.path, "rb") as fh:
            assert len(fh.read(4096)) == 4096
        connector.detach(vt)
        assert connector.users(vt.volume_id) == 0
        assert loop_devices().get(first.path) != first.handle


def test_the_connector_knows_its_own_loop_device(tmp_path, connector):
    """A loop device has no VPD pages for the CSI node's identity check: the connector answers by the
    kernel's backing file whether a path is the device it made for the volume."""
    with running_shoal_target(tmp_path, luns=(("vol", 32 << 20),)) as target:
        vt = volume_target(target)
        other = tmp_path / "other.img"
        other.write_bytes(b"\0" * (1 << 20))
        foreign = run("losetup", "-f", "--show", str(other)).stdout.strip()
        try:
            device = connector.attach(vt)
            assert connector.foreign_device(vt, device.path) == ""
            assert f"{foreign} is backed by {other}, not by the FUSE file of {vt.volume_id}" \
                in connector.foreign_device(vt, foreign)
            connector.detach(vt)
            assert "is not attached" in connector.foreign_device(vt, device.path)
        finally:
            run("losetup", "-d", foreign)


def test_discarding_the_whole_loop_device_of_a_large_volume_works(tmp_path, connector):
    """blkdiscard of all of a 2 GiB volume's loop device (as mkfs does): the FUSE file is punched in ranges
    larger than one UNMAP descriptor takes (shoal target: 2^20 blocks), which the initiator splits within
    the LUN's Block Limits page.  It used to end in EIO, and the volume's condition turned abnormal."""
    with running_shoal_target(tmp_path, luns=(("vol", 2048 << 20),)) as target:
        vt = volume_target(target)
        device = connector.attach(vt)
        try:
            with open(device.path, "r+b") as disk:
                disk.write(b"\x5a" * 8192)
                os.fsync(disk.fileno())
            run("blkdiscard", device.path)
            run("blkdiscard", "-z", "-o", "0", "-l", str(1 << 30), device.path)  # write zeroes: punched too
            with open(device.path, "rb") as disk:
                assert disk.read(8192) == bytes(8192)
            assert connector.condition(vt) == ""
        finally:
            connector.detach(vt)


def test_mounted_device_is_not_detached(tmp_path, connector):
    with running_shoal_target(tmp_path, luns=(("vol", 32 << 20),)) as target:
        vt = volume_target(target)
        fs = tmp_path / "fs"
        fs.mkdir()
        device = connector.attach(vt)
        run("mkfs.ext4", "-q", "-F", device.path)
        run("mount", device.path, str(fs))
        try:
            with pytest.raises(TemporaryConnectorError):
                connector.detach(vt)
            assert connector.users(vt.volume_id) == 1
            (fs / "still-here").write_text("yes")
        finally:
            run("umount", str(fs))
        connector.detach(vt)


def test_wrong_designator_is_refused_before_any_device_exists(tmp_path, connector):
    """LUN 1 claimed as LUN 0's volume: IdentityMismatch, no loop device, no mount (OSSA-2023-003)."""
    with running_shoal_target(tmp_path, luns=(("vol0", 16 << 20), ("vol1", 16 << 20))) as target:
        wrong = volume_target(target, lun=1, identity_of=0)
        before = losetup_all()
        with pytest.raises(IdentityMismatch):
            connector.attach(wrong)
        assert losetup_all() == before
        assert connector.users(wrong.volume_id) == 0
        assert not _mounts_under(os.path.realpath(tmp_path))
        # The right identity for LUN 1 attaches.
        right = volume_target(target, lun=1)
        device = connector.attach(right)
        try:
            assert device.serial == right.expected_serial
        finally:
            connector.detach(right)


AGENT = """
import sys, time
from node_agent.host.connector import VolumeTarget
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings
portal, iqn, volume, naa, serial, state, initiator = sys.argv[1:]
conn = UserspaceConnector(UserspaceSettings(state_dir=state, initiator_iqn=initiator))
device = conn.attach(VolumeTarget(portals=(portal,), target_iqn=iqn, lun=0, volume_id=volume,
                                  expected_naa=naa, expected_serial=serial))
print(device.path, flush=True)
time.sleep(600)
"""


def test_state_left_by_a_killed_agent_is_cleaned_up(tmp_path, connector):
    """An agent killed while attached leaves a loop device on a dead FUSE file; the next attach clears it."""
    with running_shoal_target(tmp_path, luns=(("vol", 32 << 20),)) as target:
        vt = volume_target(target)
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT, target.portal, target.iqn, vt.volume_id, vt.expected_naa,
             vt.expected_serial, str(tmp_path / "state"), INITIATOR],
            stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            stale = agent.stdout.readline().strip()
            assert stale.startswith("/dev/loop"), "the agent did not attach"
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)
        finally:
            stop_process(agent)
        state = os.path.join(os.path.realpath(tmp_path), "state", "volumes", vt.volume_id, "mnt")
        assert is_mountpoint(state) and loop_devices().get(stale) == os.path.join(state, "disk")

        device = connector.attach(vt)
        try:
            assert loop_devices().get(device.path) == os.path.join(state, "disk")
            if device.path != stale:
                assert loop_devices().get(stale) != os.path.join(state, "disk")
            with open(device.path, "rb") as fh:
                assert len(fh.read(65536)) == 65536
        finally:
            connector.detach(vt)
        assert os.path.join(state, "disk") not in loop_devices().values()
        assert not is_mountpoint(state)


def short_reconnect(target: VolumeTarget, settings: UserspaceSettings):
    """``open_sync_lun`` with a one-second reconnect timeout: a killed target ends the session quickly."""
    from node_agent.iscsi.initiator.blockdev import SyncLun
    from node_agent.iscsi.initiator.client import ClientSettings

    return SyncLun.open(target, initiator_iqn=settings.initiator_iqn, settings=ClientSettings(reconnect_timeout=1))


class FlushFailsOnce:
    """A ``SyncLun`` whose first SYNCHRONIZE CACHE from the detach fails while the session
    stays up (a target answering CHECK CONDITION to it, which ``shoal target`` cannot be made to do): the
    LUN is our own ``BlockDevice`` boundary, every other call goes to the real session."""

    def __init__(self, lun):
        self._lun, self.failed = lun, False

    def __getattr__(self, name):
        return getattr(self._lun, name)

    def flush(self) -> None:
        # The detach's own flush (the test's thread), not the FUSE file's fsync when the loop lets go of it.
        if not self.failed and threading.current_thread() is threading.main_thread():
            self.failed = True
            raise OSError("SYNCHRONIZE CACHE failed (scripted)")
        self._lun.flush()


@pytest.mark.parametrize("failure", ["target-killed", "flush-fails-once"])
def test_a_retried_detach_never_detaches_another_volumes_loop_device(tmp_path, failure):
    """The detach ran ``losetup --detach``, then SYNCHRONIZE CACHE failed.  The loop number is free at once
    and the next attach of another volume gets it; retrying the first detach must leave that device alone.
    Killed target: the session ends (reconnect timeout), the detach finishes without the flush and says so,
    the retry finds nothing attached.  Flush failing with the session up: the retry flushes again and goes on."""
    opened = []

    def open_lun(target, settings):
        lun = short_reconnect(target, settings)
        if failure == "flush-fails-once" and not opened:
            lun = FlushFailsOnce(lun)
        opened.append(lun)
        return lun

    with host_cleanup(tmp_path), running_shoal_target(tmp_path / "a", luns=(("vol", 32 << 20),)) as target_a, \
            running_shoal_target(tmp_path / "b", luns=(("vol", 32 << 20),)) as target_b:
        connector = UserspaceConnector(UserspaceSettings(state_dir=str(tmp_path / "state"), initiator_iqn=INITIATOR),
                                       open_lun=open_lun)
        a, b = volume_target(target_a, name="vol-a"), volume_target(target_b, name="vol-b")
        device_a = connector.attach(a)
        if failure == "target-killed":
            os.kill(target_a.process.pid, signal.SIGKILL)
            target_a.process.wait(10)
        with pytest.raises(TemporaryConnectorError, match="SYNCHRONIZE CACHE"):
            connector.detach(a)
        assert loop_devices().get(device_a.path) != device_a.handle  # released before the flush
        device_b = connector.attach(b)
        try:
            assert device_b.path == device_a.path  # losetup --find took the freed number
            connector.detach(a)  # the retry
            assert loop_devices().get(device_b.path) == device_b.handle
            assert connector.condition(b) == ""
            assert connector.users(a.volume_id) == 0
            assert not is_mountpoint(os.path.dirname(device_a.handle))
        finally:
            connector.detach(b)


def test_a_tgtd_lun_is_recognised_by_its_second_naa_designator(tmp_path, connector):
    """tgtd's VPD page 83h lists an NAA 3 and then an NAA 6 designator for one LU (SPC-4 §7.8.6.6); a volume
    known by its NAA 6 (its ``wwn-0x6...`` name) is that LUN, and the userspace identity check must say so as
    the kernel connector's does, instead of comparing only the first designator."""
    require_tools("tgtd", "tgtadm")
    from node_agent.host.connector import parse_vpd_identity
    from node_agent.iscsi.initiator.blockdev import SyncLun
    from tests.support.tgtd import running_tgtd

    with running_tgtd(tmp_path / "tgtd", luns=(("d", 16 << 20),)) as t:
        probe = SyncLun(t.host, t.port, t.iqn, 1)
        try:
            pages = probe._call(probe.device.inquiry(0x83)), probe._call(probe.device.inquiry(0x80))
        finally:
            probe.close()
        reported = parse_vpd_identity(*pages)
        assert len(reported.naas) >= 2 and reported.naas[0][0] == "3", reported  # the order the bug missed
        naa6 = next(naa for naa in reported.naas if naa[0] == "6")
        vt = VolumeTarget(portals=(t.portal,), target_iqn=t.iqn, lun=1, volume_id="tgtd-vol",
                          expected_naa=naa6, expected_serial=reported.serial)
        device = connector.attach(vt)
        try:
            assert device.naa == naa6 and device.serial == reported.serial
        finally:
            connector.detach(vt)
