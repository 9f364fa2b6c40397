"""The userspace connector takes an ``InitiatorError`` from its LUN as the I/O failure it is.

Shoal's initiator fails a command the target answered against the protocol (a Reject, an impossible
residual) with ``InitiatorError``, not an ``OSError``.  A detach whose final SYNCHRONIZE CACHE failed that
way used to raise it raw (no ``ConnectorError``), and a rescan likewise; the connector must report a
``TemporaryConnectorError`` (a retry may find the target sane again), as it does for ``OSError``.  The LUN
and the FUSE export are stand-ins: the steps tested fail before either is otherwise touched.

What the FUSE file answers when its device fails: ENOSPC when the storage has no room for a write (the
target's SPACE ALLOCATION FAILED WRITE PROTECT; it used to be EIO, counted as a failing device), EIO for a
medium error and anything else; EOPNOTSUPP for a punch the LUN cannot unmap to zeros, under the connector's
settings.  ``tests/peer/test_fuse_export_review.py`` shows each through a loop device and a real target.
"""

from __future__ import annotations

import errno

import pytest

from node_agent.host.connector import AttachedDevice, TemporaryConnectorError, VolumeTarget
from node_agent.host.fuse_export import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    BlockFile,
    ExportSettings,
    FileBlockDevice,
    _guarded,
)
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings, _Attachment
from node_agent.iscsi.initiator.client import CommandFailed
from node_agent.iscsi.initiator.core import InitiatorError, TaskDone
from node_agent.scsi import sense as S

TARGET = VolumeTarget(portals=("127.0.0.1:3260",), target_iqn="iqn.2026-11.io.shoal.test:t", lun=0,
                      volume_id="vol1", expected_naa="6" + "0" * 31, expected_serial="s")


class FailingLun:
    """A LUN whose commands the target answers against the protocol; the session itself is up."""

    session_state = "up"

    def flush(self) -> None:
        raise InitiatorError("the target reported a residual of 8 bytes, more than the 0 expected")

    def refresh_capacity(self) -> int:
        raise InitiatorError("target rejected the command (reason 0x04)")


class UnusedExport:
    path = "/nonexistent/fuse-file"
    running = True


@pytest.fixture
def connector(tmp_path):
    connector = UserspaceConnector(UserspaceSettings(state_dir=str(tmp_path)))
    device = AttachedDevice(path="/dev/loop999", volume_id="vol1", target=TARGET, handle=UnusedExport.path)
    connector._attached["vol1"] = _Attachment(device, FailingLun(), UnusedExport(), loop_released=True)
    return connector


def test_detach_whose_synchronize_cache_fails_with_an_initiator_error_is_a_temporary_error(connector):
    for _ in range(2):  # the attachment stays for the retry, which fails the same way
        with pytest.raises(TemporaryConnectorError, match="SYNCHRONIZE CACHE of vol1 failed: the target reported"):
            connector.detach(TARGET)
        assert "vol1" in connector._attached


def test_rescan_whose_read_capacity_fails_with_an_initiator_error_is_a_temporary_error(connector):
    with pytest.raises(TemporaryConnectorError, match="cannot read the capacity of vol1: target rejected"):
        connector.rescan(TARGET)


# --------------------------------------------------------------------------- what the FUSE file answers

def failed(code, *, descriptor: bool = False) -> CommandFailed:
    """What ``SyncLun`` raises for a command the target ended with CHECK CONDITION and ``code``."""
    return CommandFailed(TaskDone(itt=1, status=S.CHECK_CONDITION, sense=S.build_sense(code, descriptor=descriptor)))


@pytest.mark.parametrize("exc, answer, counted", [
    # The target's file is full (SBC-3 §4.7.3.7), in either sense format: a full disk, as sd makes it.
    (failed(S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT), errno.ENOSPC, False),
    (failed(S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT, descriptor=True), errno.ENOSPC, False),
    # A local file on a full disk or over quota (EDQUOT: the loop device would make it EIO).
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC, False),
    (OSError(errno.EDQUOT, "quota"), errno.ENOSPC, False),
    # Anything else fails the device: EIO, counted.
    (failed(S.UNRECOVERED_READ_ERROR), errno.EIO, True),
    (failed(S.WRITE_ERROR), errno.EIO, True),
    (failed(S.INTERNAL_TARGET_FAILURE), errno.EIO, True),
    (failed(S.WRITE_PROTECTED), errno.EIO, True),
    (ConnectionError("session closed"), errno.EIO, True),
    (TimeoutError("command timed out"), errno.EIO, True),
])
def test_a_device_failure_is_answered_enospc_when_there_is_no_room_else_eio(exc, answer, counted):
    counts = []

    def handler(*args):
        raise exc

    assert _guarded("write", handler, lambda: counts.append(1))() == -answer
    assert counts == ([1] if counted else [])


class PunchDevice:
    """A device that must not be touched: the punch is refused before any I/O."""

    size, block_size = 1 << 20, 512

    def __getattr__(self, name):
        raise AssertionError(f"the device was asked to {name}")


def test_a_punch_is_refused_on_a_device_whose_discard_leaves_no_zeros_when_told_not_to_write_zeros():
    """``zero_punched_ranges=False`` (the userspace connector's setting): EOPNOTSUPP, so the loop device above
    stops offering discard, instead of the whole range written with zeros."""
    bf = BlockFile(PunchDevice(), ExportSettings(discard_zeroes=False, zero_punched_ranges=False))
    with pytest.raises(Exception) as info:
        bf.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
    assert getattr(info.value, "code", None) == errno.EOPNOTSUPP
    assert _guarded("fallocate", bf.fallocate)(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == \
        -errno.EOPNOTSUPP


def test_the_userspace_connector_refuses_punches_it_cannot_unmap_and_zeroing_still_writes_zeros(tmp_path):
    assert UserspaceSettings(state_dir=str(tmp_path)).export.zero_punched_ranges is False
    path = tmp_path / "disk"
    path.write_bytes(b"\x5a" * 8192)
    device = FileBlockDevice(str(path))
    try:
        bf = BlockFile(device, ExportSettings(discard_zeroes=False, zero_punched_ranges=False))
        bf.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 100, 4000)  # write-zeroes (NOUNMAP): zeros
        assert bytes(bf.read(0, 8192)) == b"\x5a" * 100 + bytes(4000) + b"\x5a" * 4092
    finally:
        device.close()


def test_the_reconnect_timeout_reaches_the_initiator(monkeypatch):
    """``UserspaceSettings.reconnect_timeout`` is what ``SyncLun`` is opened with (it was the initiator's fixed
    default, 30 s: how long I/O on the loop device waits for a target that went away)."""
    from node_agent.host import userspace
    from node_agent.iscsi.initiator.blockdev import SyncLun

    seen = {}
    monkeypatch.setattr(SyncLun, "open", classmethod(lambda cls, target, *, initiator_iqn, settings:
                                                     seen.setdefault("settings", settings)))
    userspace.open_sync_lun(TARGET, UserspaceSettings(state_dir="/nonexistent", reconnect_timeout=7.5))
    assert seen["settings"].reconnect_timeout == 7.5


def test_one_failure_repeated_logs_one_traceback_a_minute(caplog):
    """A session gone fails every I/O of a busy file system the same way: one ERROR with its traceback, the
    repeats at debug level (the EIO answered, and counted, each time); another failure is logged at once."""
    import logging

    from node_agent.host import fuse_export

    fuse_export._eio_logged.clear()
    counts = []

    def gone(*args):
        raise ConnectionError("session to iqn.x closed")

    def other(*args):
        raise TimeoutError("command timed out")

    with caplog.at_level(logging.DEBUG, logger="node_agent.host.fuse_export"):
        for _ in range(50):
            assert _guarded("write", gone, lambda: counts.append(1))() == -errno.EIO
        assert _guarded("read", other, lambda: counts.append(1))() == -errno.EIO
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(counts) == 51
    assert [(r.args[0], r.exc_info[0]) for r in errors] == [("write", ConnectionError), ("read", TimeoutError)]
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG and "failed" in r.getMessage()) == 49
