"""The userspace connector's data path under failure, against real targets (FUSE file, loop device, errors).

- A target whose file is full answers SPACE ALLOCATION FAILED WRITE PROTECT: the write on the loop device
  fails with ENOSPC (a full disk), as the kernel's sd makes it, not EIO (a broken one), and the volume's
  condition stays normal.  It used to be EIO, counted as a device failure.
- A LUN that takes no UNMAP (tgtd's: READ CAPACITY LBPME 0): a discard on the loop device is refused and the
  loop device stops offering discard, as sd offers none there; write-zeroes still zero.  Each discard used to
  be answered by writing its whole range with zeros (mkfs discards the whole device: the volume written).
- The target away for a few seconds and back on its portal: I/O waits and goes on, no error.  Away past
  ``UserspaceSettings.reconnect_timeout`` (which could not be set): EIO, and the volume still detaches.

Real peers: ``shoal target`` and tgtd processes on 127.0.0.1, FUSE, the loop driver, tmpfs.  Every process
is stopped by its PID, every mount unmounted and loop device detached in ``finally`` (``host_cleanup``).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node_agent.host.connector import TemporaryConnectorError, VolumeTarget
from node_agent.host.fuse_export import is_mountpoint
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings
from tests.conftest import require_loop_and_fuse, require_tools
from tests.peer.test_userspace_connector import INITIATOR, host_cleanup, loop_devices, run, volume_target
from tests.support.shoal_target import running_shoal_target

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _requirements():
    require_loop_and_fuse("losetup", "mount", "umount", "blkdiscard")


def connector_for(tmp_path: Path, **settings) -> UserspaceConnector:
    return UserspaceConnector(UserspaceSettings(state_dir=str(tmp_path / "state"), initiator_iqn=INITIATOR,
                                                **settings))


def direct_write(path: str, offset: int, data: bytes) -> None:
    """One O_DIRECT write (an aligned buffer): the loop device's answer, not the page cache's."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)


def test_a_full_target_file_is_enospc_on_the_loop_device_not_eio(tmp_path):
    """The LUN's sparse file on a 4 MiB tmpfs: writing its 16 MiB runs the target out of space."""
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))
    try:
        with host_cleanup(tmp_path), \
                running_shoal_target(tmp_path / "t", luns=((str(small / "vol.img"), 16 * MiB),)) as target:
            connector = connector_for(tmp_path)
            vt = volume_target(target)
            device = connector.attach(vt)
            try:
                with pytest.raises(OSError) as full:
                    for mib in range(16):
                        direct_write(device.path, mib * MiB, os.urandom(MiB))
                assert full.value.errno == errno.ENOSPC, full.value
                assert "the backing store is out of space" in target.log()  # the target did say "no room"
                # Writing straight to the FUSE file (O_DSYNC: FUA) says the same.
                fd = os.open(device.handle, os.O_WRONLY | os.O_DSYNC)
                try:
                    with pytest.raises(OSError) as direct:
                        os.pwrite(fd, b"x" * 4096, 15 * MiB)
                finally:
                    os.close(fd)
                assert direct.value.errno == errno.ENOSPC
                assert connector.condition(vt) == ""  # a full disk, not a failing device
            finally:
                connector.detach(vt)
    finally:
        if is_mountpoint(str(small)):  # host_cleanup unmounted it already unless the target stopped late
            run("umount", "-l", str(small))


def test_a_lun_without_unmap_offers_no_discard_instead_of_writing_zeros(tmp_path):
    """tgtd's LUN takes no UNMAP: blkdiscard of the loop device must not write the volume's 64 MiB."""
    require_tools("tgtd", "tgtadm")
    from node_agent.host.connector import parse_vpd_identity
    from node_agent.iscsi.initiator.blockdev import SyncLun
    from tests.support.tgtd import running_tgtd

    with host_cleanup(tmp_path), running_tgtd(tmp_path / "tgtd", luns=(("d", 64 * MiB),)) as t:
        probe = SyncLun(t.host, t.port, t.iqn, 1)
        try:
            reported = parse_vpd_identity(probe._call(probe.device.inquiry(0x83)),
                                          probe._call(probe.device.inquiry(0x80)))
            assert not probe.discard_zeroes  # the premise: no UNMAP that zeros on this LUN
        finally:
            probe.close()
        vt = VolumeTarget(portals=(t.portal,), target_iqn=t.iqn, lun=1, volume_id="tgtd-thick",
                          expected_naa=reported.naas[0], expected_serial=reported.serial)
        connector = connector_for(tmp_path)
        device = connector.attach(vt)
        try:
            direct_write(device.path, 0, b"\x5a" * MiB)
            allocated = os.stat(t.lun_paths[0]).st_blocks * 512
            # The kernel takes a refused discard as done (it is only advice): the answer is in what was written.
            discard = subprocess.run(["blkdiscard", device.path], capture_output=True, text=True)
            grown = os.stat(t.lun_paths[0]).st_blocks * 512 - allocated
            assert grown < MiB, f"blkdiscard wrote {grown} bytes to the target ({discard.stderr})"
            queue = Path("/sys/block", os.path.basename(device.path), "queue")
            assert (queue / "discard_max_bytes").read_text().strip() == "0"  # the loop device offers none now
            # Write-zeroes still zero (BLKZEROOUT: the block layer writes zeros when the punch is refused).
            run("blkdiscard", "-z", "-o", "0", "-l", str(MiB), device.path)
            assert direct_read(device.path, 0, MiB) == bytes(MiB)
            assert connector.condition(vt) == ""
        finally:
            connector.detach(vt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_target_away_and_back_waits_then_gone_for_good_is_eio_after_the_reconnect_timeout(tmp_path):
    """Killed and started again on the same portal within ``reconnect_timeout``: a write on the loop device
    waits and succeeds.  Killed for good: EIO once the timeout passed; the volume detaches (its final
    SYNCHRONIZE CACHE is reported failed once), leaving no loop device and no FUSE mount."""
    timeout = 10.0
    port, lun = free_port(), tmp_path / "vol.img"

    def target(name: str):
        return running_shoal_target(tmp_path / name, luns=((str(lun), 32 * MiB),), listen=f"127.0.0.1:{port}")

    with host_cleanup(tmp_path):
        first = target("t1")
        served = first.__enter__()
        try:
            connector = connector_for(tmp_path, reconnect_timeout=timeout)
            vt = volume_target(served)
            device = connector.attach(vt)
            os.kill(served.pid, signal.SIGKILL)
        finally:
            first.__exit__(None, None, None)  # stopped by its PID (SIGKILLed already)
        outcome: list = []

        def write() -> None:
            try:
                direct_write(device.path, 2 * MiB, b"B" * 65536)
                outcome.append("ok")
            except OSError as exc:
                outcome.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(3)
        assert writer.is_alive() and not outcome, outcome  # waiting for the target, not failed
        assert "reconnecting" in connector.condition(vt)
        with target("t2") as again:
            writer.join(30)
            assert outcome == ["ok"]
            assert direct_read(device.path, 2 * MiB, 65536) == b"B" * 65536
            with open(lun, "rb") as fh:  # on the target's medium (the write was fsynced)
                fh.seek(2 * MiB)
                assert fh.read(65536) == b"B" * 65536
            assert connector.condition(vt) == ""
            os.kill(again.pid, signal.SIGKILL)
            again.process.wait(10)
        started = time.monotonic()
        with pytest.raises(OSError) as gone:
            direct_read(device.path, 4 * MiB, 4096)
        waited = time.monotonic() - started
        assert gone.value.errno == errno.EIO
        assert timeout - 2 < waited < timeout + 15, waited  # the configured timeout, not the default 30 s
        assert "down" in connector.condition(vt)
        with pytest.raises(TemporaryConnectorError, match="SYNCHRONIZE CACHE"):
            connector.detach(vt)
        connector.detach(vt)  # nothing left to detach
        assert device.handle not in loop_devices().values()
        assert not is_mountpoint(os.path.dirname(device.handle))
        assert connector.users(vt.volume_id) == 0
