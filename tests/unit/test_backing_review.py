"""Defects a review of the storage layer reproduced, one test (or more) each.

Short transfers (a partial read or zeroing never answered GOOD), a backing file truncated under the unit,
growth of a block-device LUN, a failed flush that a later SYNCHRONIZE CACHE must not hide, and COMPARE AND
WRITE against the writes of other sessions (SBC-3 §5.2: read, compare and write uninterrupted).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.device import LogicalUnit, LunSettings
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage import backing as B
from node_agent.storage.backing import FileBackingStore

from test_scsi_support import BS, NEXUS, OTHER, cdb10, data_of, make_lu, run, sense_of

MiB = 1 << 20


@pytest.fixture
def lu(tmp_path):
    unit = make_lu("file", tmp_path, persist_reservations=False)
    yield unit
    unit.close()


# -- short transfers and a truncated file ----------------------------------------------------
@pytest.mark.parametrize("blocks", [1, 256], ids=["inline read", "sendfile-sized read"])
def test_read_past_the_end_of_a_truncated_file_fails(lu, tmp_path, blocks):
    """The file cut short under the running unit: the lost blocks were answered as zeros with GOOD."""
    assert run(lu, cdb10(0x2A, 0, 1), b"x" * BS).status == S.GOOD
    os.truncate(tmp_path / "lun.img", 0)
    r = run(lu, cdb10(0x28, 0, blocks))
    assert r.status == S.CHECK_CONDITION, data_of(lu, r)[:8]
    assert sense_of(r) == S.INTERNAL_TARGET_FAILURE


def test_a_short_pread_is_finished(tmp_path, monkeypatch):
    """A file system may return less than asked before the end (FUSE, NFS): the rest is read, not zeros."""
    store = FileBackingStore(tmp_path / "a.img", MiB)
    store.write(0, b"y" * 8192)
    real = os.pread
    monkeypatch.setattr(B.os, "pread", lambda fd, n, off: real(fd, min(n, 4096), off))
    assert store.read(0, 8192) == b"y" * 8192
    monkeypatch.undo()
    store.close()


def test_zeroing_without_punch_finishes_short_writes(tmp_path, monkeypatch):
    """UNMAP's fallback (no hole punching: a block device without WRITE ZEROES) ignored a short pwrite."""
    store = FileBackingStore(tmp_path / "a.img", MiB)
    store.write(0, b"q" * 8192)
    store._punch_supported = False
    real = os.pwrite
    monkeypatch.setattr(B.os, "pwrite", lambda fd, data, off: real(fd, bytes(data)[: max(1, len(data) // 2)], off))
    store.punch(0, 8192)
    monkeypatch.undo()
    assert store.read(0, 8192) == bytes(8192)
    store.close()


# -- flush ------------------------------------------------------------------------------------
def test_a_failed_flush_fails_every_later_one(lu, monkeypatch):
    """fdatasync reports a lost write-back once (the next returns 0): a second SYNCHRONIZE CACHE, maybe of
    the session whose writes were lost, must not end GOOD."""
    assert run(lu, cdb10(0x2A, 0, 1), b"x" * BS).status == S.GOOD
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "write-back failed")
    monkeypatch.setattr(B.os, "fdatasync", fdatasync)
    first = run(lu, cdb10(0x35))
    second = run(lu, cdb10(0x35), nexus=OTHER)
    assert first.status == second.status == S.CHECK_CONDITION
    assert sense_of(second) == S.INTERNAL_TARGET_FAILURE
    monkeypatch.undo()


def test_a_flush_refused_as_a_misuse_does_not_stick(tmp_path, monkeypatch):
    store = FileBackingStore(tmp_path / "a.img", MiB)

    def fdatasync(fd):
        raise OSError(errno.EINVAL, "not syncable")
    monkeypatch.setattr(B.os, "fdatasync", fdatasync)
    with pytest.raises(OSError):
        store.flush()
    monkeypatch.undo()
    store.flush()
    store.close()


# -- a block device ---------------------------------------------------------------------------
needs_loop = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                                reason="needs root and losetup")


@needs_loop
def test_block_device_lun_grows_to_its_device(tmp_path):
    """A block device cannot be ftruncate()d: growing its LUN after the device grew failed with EINVAL."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    unit = None
    try:
        unit = LogicalUnit(FileBackingStore(loop, None, create=False), LunIdentity("vol-blk"),
                           target_name="iqn.2026-01.io.shoal:t", settings=LunSettings(persist_reservations=False))
        with pytest.raises(B.StorageError):
            unit.resize(8 * MiB)  # the device has not grown yet
        with open(img, "r+b") as f:
            f.truncate(8 * MiB)
        subprocess.run(["losetup", "--set-capacity", loop], check=True, capture_output=True)
        unit.resize(8 * MiB)
        assert unit.num_blocks == 8 * MiB // BS
        last = 8 * MiB // BS - 1
        assert run(unit, cdb10(0x2A, last, 1), b"g" * BS).status == S.GOOD
        assert data_of(unit, run(unit, cdb10(0x28, last, 1))) == b"g" * BS
    finally:
        if unit is not None:
            unit.close()
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


# -- COMPARE AND WRITE against other writes -----------------------------------------------------
CAW_FUA = bytes([0x89, 0x08]) + bytes(8) + bytes([0, 0, 0, 1, 0, 0])  # one block at LBA 0, FUA: on a worker
CAW = bytes([0x89, 0]) + bytes(8) + bytes([0, 0, 0, 1, 0, 0])


class _Gate:
    """Holds ``store.<name>`` at its next call until ``go`` is set (``entered`` says it got there)."""

    def __init__(self, store, name: str):
        self.entered, self.go = threading.Event(), threading.Event()
        real = getattr(store, name)

        def held(*args):
            self.entered.set()
            assert self.go.wait(10)
            return real(*args)
        setattr(store, name, held)
        self.undo = lambda: setattr(store, name, real)


def _other_write(lu, data: bytes):
    """A WRITE(10) of LBA 0 from another session the way the transport runs it: inline, else handed off."""
    result = lu.execute_inline(cdb10(0x2A, 0, 1), data)
    if result is None:
        result = lu.execute_deferrable(OTHER, cdb10(0x2A, 0, 1), data, BS, try_fast=False)
    return result


def _caw_held_at_its_read(unit, out: dict):
    """Start a COMPARE AND WRITE (FUA) of LBA 0, A to C, on a worker thread and hold it once it is inside its read
    of the block: (the gate that lets it go on, the thread).  Its result goes to ``out["caw"]``."""
    caw = unit.execute_deferrable(NEXUS, CAW_FUA, b"A" * BS + b"C" * BS, 2 * BS)
    assert caw.blocking is not None
    gate = _Gate(unit.backing, "read")
    worker = threading.Thread(target=lambda: out.setdefault("caw", caw.blocking()))
    worker.start()
    assert gate.entered.wait(10)
    gate.undo()
    return gate, worker


def _still_waiting(out: dict, key: str, blocking, seconds: float = 0.2) -> threading.Thread:
    """Run ``blocking`` on a thread (its result to ``out[key]``) and check it has not ended after ``seconds``."""
    landed = threading.Event()
    thread = threading.Thread(target=lambda: (out.setdefault(key, blocking()), landed.set()))
    thread.start()
    assert not landed.wait(seconds)
    return thread


def test_write_from_another_session_waits_for_a_compare_and_write_on_a_worker(lu):
    """The COMPARE AND WRITE read LBA 0 (matching), a WRITE from another session landed GOOD, then the COMPARE
    AND WRITE wrote over it: GOOD for both with its data left, which no order of the two gives."""
    run(lu, cdb10(0x2A, 0, 1), b"A" * BS)
    out = {}
    gate, worker = _caw_held_at_its_read(lu, out)
    write = _other_write(lu, b"B" * BS)
    assert write.blocking is not None  # not written on the loop while the COMPARE AND WRITE holds the block
    writer = _still_waiting(out, "write", write.blocking)  # waits for the COMPARE AND WRITE
    gate.go.set()
    worker.join(10)
    writer.join(10)
    assert out["caw"].status == S.GOOD and out["write"].status == S.GOOD
    assert lu.backing.read(0, BS) == b"B" * BS  # the WRITE came after the COMPARE AND WRITE, as it ended last
    # Once it is over, plain writes are inline again (nothing left on the fast path)
    assert lu.execute_inline(cdb10(0x2A, 1, 1), b"D" * BS) is not None
    assert lu.gather_offset(cdb10(0x2A, 2, 1), b"E" * BS) is not None or not lu.backing.inline_writes


def test_gathered_writes_stop_while_a_compare_and_write_is_on_a_worker(lu):
    run(lu, cdb10(0x2A, 0, 1), b"A" * BS)
    run(lu, cdb10(0x2A, 1, 1), b"A" * BS)  # ext4 and tmpfs: the store has learned it writes inline
    if not lu.backing.inline_writes:
        pytest.skip("this file system takes RWF_NOWAIT writes: nothing is gathered anyway")
    assert lu.gather_offset(cdb10(0x2A, 4, 1), b"E" * BS) is not None
    caw = lu.execute_deferrable(NEXUS, CAW_FUA, b"A" * BS + b"C" * BS, 2 * BS)
    assert lu.gather_offset(cdb10(0x2A, 4, 1), b"E" * BS) is None
    caw.blocking()
    assert lu.gather_offset(cdb10(0x2A, 4, 1), b"E" * BS) is not None


def test_compare_and_write_waits_for_a_write_running_on_a_worker(lu):
    """The other way round: a FUA WRITE from another session is on a worker; a cached COMPARE AND WRITE must not
    read and write the block on the loop meanwhile (it could read half of that write): it goes to a worker,
    which starts once the WRITE is done."""
    run(lu, cdb10(0x2A, 0, 1), b"A" * BS)
    write = lu.execute_deferrable(OTHER, cdb10(0x2A, 0, 1, byte1=0x08), b"B" * BS, BS)
    assert write.blocking is not None
    gate = _Gate(lu.backing, "write")
    out = {}
    writer = threading.Thread(target=lambda: out.setdefault("write", write.blocking()))
    writer.start()
    assert gate.entered.wait(10)
    gate.undo()
    caw = lu.execute_deferrable(NEXUS, CAW, b"A" * BS + b"C" * BS, 2 * BS)  # compares with the A stored now
    assert caw.blocking is not None
    worker = _still_waiting(out, "caw", caw.blocking)
    gate.go.set()
    writer.join(10)
    worker.join(10)
    assert out["write"].status == S.GOOD
    assert sense_of(out["caw"]) == S.MISCOMPARE_DURING_VERIFY  # it compared after the WRITE: B, not A
    assert lu.backing.read(0, BS) == b"B" * BS


@pytest.mark.parametrize("command", ["unmap", "write same"])
def test_unmap_and_write_same_on_workers_wait_for_a_compare_and_write(lu, command):
    run(lu, cdb10(0x2A, 0, 8), b"A" * 8 * BS)
    out = {}
    gate, worker = _caw_held_at_its_read(lu, out)
    if command == "unmap":
        params = bytes([0, 22, 0, 16]) + bytes(4) + bytes(8) + (8).to_bytes(4, "big") + bytes(4)
        other = lu.execute_deferrable(OTHER, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), params, 24)
    else:
        other = lu.execute_deferrable(OTHER, bytes([0x93, 0]) + bytes(8) + (8).to_bytes(4, "big") + bytes(2),
                                      b"W" * BS, BS)
    thread = _still_waiting(out, "other", other.blocking)
    gate.go.set()
    worker.join(10)
    thread.join(10)
    assert out["caw"].status == S.GOOD and out["other"].status == S.GOOD
    assert lu.backing.read(0, BS) == (bytes(BS) if command == "unmap" else b"W" * BS)


def test_an_extended_copy_into_the_unit_waits_for_a_compare_and_write(tmp_path):
    """An EXTENDED COPY's chunk written into a unit is a write of that unit like any other: it must not land
    between a COMPARE AND WRITE's read and its write (it did: both GOOD, the copied block overwritten)."""
    from node_agent.scsi.device import LunMap
    from test_scsi_copy_sanitize import parameter_list, segment, target_descriptor
    from test_xcopy_review import file_unit, ready, xcopy_cdb
    from node_agent.scsi import xcopy as X

    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b"))
    try:
        LunMap({0: a, 1: b})
        a.backing.write(0, b"X" * BS)
        b.backing.write(0, b"A" * BS)
        out = {}
        gate, worker = _caw_held_at_its_read(b, out)
        params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 1, 0, 0)],
                                usage=X.LIST_ID_DISCARD)
        copy = a.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
        assert copy.blocking is not None  # a file unit's copy runs on a worker
        copier = _still_waiting(out, "copy", copy.blocking, 0.3)  # its chunk waits for the COMPARE AND WRITE
        gate.go.set()
        worker.join(10)
        copier.join(10)
        assert out["caw"].status == S.GOOD and out["copy"].status == S.GOOD
        assert b.backing.read(0, BS) == b"X" * BS  # the copy ended last: its block is there
    finally:
        a.close(), b.close()
