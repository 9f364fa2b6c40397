"""EXTENDED COPY (SPC-4 §6.4, SPC-5 §5.17.7) and UNMAP (SBC-3 §5.28) findings of the copy review.

A copy that reaches another logical unit of the target counts each chunk as that unit's I/O
(``LogicalUnit.foreign_io``): the unit's SANITIZE and PREEMPT AND ABORT wait for the chunk in flight and
the copy stops after it; block sizes, held results, list identifiers, write protection and the limits of
a copy that runs on the event loop follow the standard.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi import xcopy as X
from node_agent.scsi.device import LogicalUnit, LunMap, LunSettings
from node_agent.scsi.sense import FIXED_SENSE
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore
from node_agent.target_service import ATOMIC_OPT_IN_BYTES

from test_scsi_copy_sanitize import copy_results, parameter_list, segment, target_descriptor, xcopy
from test_scsi_support import BS, NEXUS, OTHER, run, sense_of

TARGET = "iqn.2026-01.io.shoal:t"
SANITIZE_BLOCK_ERASE = bytes([0x48, 0x02]) + bytes(8)


class GatedFile(FileBackingStore):
    """A file store whose first write once ``gate`` is set waits for ``release`` (a slow disk under one chunk
    of a copy), and which says when a hole is first punched (a BLOCK ERASE's pass began) or it is flushed."""

    gate = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()
        self.punched, self.flushed = threading.Event(), threading.Event()

    def write(self, offset, data, fua=False):
        if self.gate:
            self.gate = False  # only the first write waits (the copy's chunk in flight)
            self.entered.set()
            assert self.release.wait(10)
        super().write(offset, data, fua)

    def punch(self, offset, length):
        self.punched.set()
        super().punch(offset, length)

    def flush(self):
        self.flushed.set()
        super().flush()


def ready(*units):
    LunMap({number: unit for number, unit in enumerate(units)})
    for unit in units:
        unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
        run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)  # clear POWER ON
    return units


def file_unit(tmp_path, name: str, size: int = 8 << 20, block_size: int = BS, store=FileBackingStore, **settings):
    return LogicalUnit(store(tmp_path / f"{name}.img", size, block_size=block_size), LunIdentity(name),
                       target_name=TARGET, settings=LunSettings(**settings))


def memory_unit(name: str, size: int = 1 << 20, block_size: int = BS, **settings):
    return LogicalUnit(MemoryBackingStore(size, block_size), LunIdentity(name), target_name=TARGET,
                       settings=LunSettings(**settings))


def xcopy_cdb(params: bytes) -> bytes:
    return bytes([0x83, 0]) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2)


def fixed_sense(result):
    """(INFORMATION or None, field pointer or None, bit pointer or None) of fixed-format sense data."""
    rec = FIXED_SENSE.decode(result.sense)
    sks = rec.sense_key_specific if rec.sksv else None
    return (rec.information if rec.valid else None, None if sks is None else sks & 0xFFFF,
            None if sks is None or not sks & 0x080000 else (sks >> 16) & 0x07)


def prout(unit, sa: int, key=0, sark=0, pr_type=0, nexus=NEXUS, defer=False):
    cdb = bytes([0x5F, sa, pr_type, 0, 0]) + (24).to_bytes(4, "big") + b"\0"
    return unit.execute(nexus, cdb, key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(8), 24, defer)


class Worker:
    """A deferred command's I/O on a thread of its own, as the portal's pool runs it."""

    def __init__(self, blocking):
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self.future = self._pool.submit(blocking)

    def result(self, timeout=10):
        try:
            return self.future.result(timeout)
        finally:
            self._pool.shutdown(wait=False)


# -- finding 1: another unit's SANITIZE / PREEMPT AND ABORT / pause vs. a running copy into it ---------------
def start_copy_into_gated_unit(tmp_path):
    """LUN 0 copies 2 MiB (two chunks) into LUN 1, whose first chunk's write is held on the disk."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b", store=GatedFile))
    a.backing.write(0, b"X" * (2 << 20))
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 4096, 0, 0)],
                            usage=X.LIST_ID_DISCARD)
    pending = a.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
    assert pending.blocking is not None  # a file unit's copy runs on a worker
    b.backing.gate = True
    copy = Worker(pending.blocking)
    assert b.backing.entered.wait(5)  # the copy's first chunk is being written to LUN 1
    return a, b, copy


def test_sanitize_of_another_unit_waits_for_the_copy_chunk_in_flight_and_stops_the_copy(tmp_path):
    """SBC-4 §4.11: once SANITIZE answers GOOD no data written before it may be on the medium.  The copy into
    LUN 1 is I/O of LUN 0, so LUN 1's SANITIZE must wait for its chunk in flight (``foreign_io``), and the
    copy must stop there: COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE (SPC-5 §5.17.7.4)."""
    a, b, copy = start_copy_into_gated_unit(tmp_path)
    pending = b.execute(OTHER, SANITIZE_BLOCK_ERASE, None, 0, defer=True)
    assert pending.blocking is not None
    sanitize = Worker(pending.blocking)
    assert not b.backing.punched.wait(0.5), "the pass began under the copy's chunk in flight"
    b.backing.release.set()
    assert sanitize.result().status == S.GOOD
    result = copy.result()
    assert result.status == S.CHECK_CONDITION and sense_of(result) == S.COPY_TARGET_DEVICE_NOT_REACHABLE
    assert not any(b.backing.read(0, 2 << 20)), "data of the copy landed after the SANITIZE's GOOD"
    a.close(), b.close()


def test_a_sanitize_that_ended_between_two_chunks_still_stops_the_copy(tmp_path):
    """The copy's next chunk must not land even when the whole SANITIZE (begun and ended) fell between two of
    its chunks: ``sanitizing`` is False again by then, ``sanitizes_begun`` has moved on."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b"))
    a.backing.write(0, b"X" * (2 << 20))
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 4096, 0, 0)],
                            usage=X.LIST_ID_DISCARD)
    pending = a.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
    chunks, counted = [], b.foreign_io

    def foreign_io():  # before the second chunk enters LUN 1, a whole SANITIZE of it begins and ends
        if chunks:
            done = b.execute(OTHER, SANITIZE_BLOCK_ERASE, None, 0)
            assert done.status == S.GOOD and not b.sanitizing
        chunks.append(True)
        return counted()
    b.foreign_io = foreign_io
    result = pending.blocking()
    assert sense_of(result) == S.COPY_TARGET_DEVICE_NOT_REACHABLE
    assert not any(b.backing.read(0, 2 << 20))
    a.close(), b.close()


def test_preempt_and_abort_of_another_unit_waits_for_the_chunk_in_flight_and_stops_the_copy(tmp_path):
    """SPC-4 §5.13.11.5: after PREEMPT AND ABORT's GOOD nothing of the preempted nexus lands.  The copy
    into LUN 1 by the preempted NEXUS finishes its chunk in flight before the GOOD, then stops (COPY ABORTED,
    THIRD PARTY DEVICE FAILURE: the copy target refused the write, SPC-5 §5.17.7.4)."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b", store=GatedFile))
    a.backing.write(0, b"X" * (2 << 20))
    assert prout(b, 0x00, sark=0xA).status == S.GOOD  # NEXUS registers on LUN 1
    assert prout(b, 0x01, key=0xA, pr_type=1).status == S.GOOD  # and holds WRITE EXCLUSIVE
    assert prout(b, 0x00, sark=0xB, nexus=OTHER).status == S.GOOD  # OTHER registers
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 4096, 0, 0)],
                            usage=X.LIST_ID_DISCARD)
    pending = a.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
    b.backing.gate = True
    copy = Worker(pending.blocking)
    assert b.backing.entered.wait(5)
    preempt = prout(b, 0x05, key=0xB, sark=0xA, pr_type=1, nexus=OTHER, defer=True)
    assert preempt.blocking is not None
    answered = Worker(preempt.blocking)
    with pytest.raises(concurrent.futures.TimeoutError):
        answered.future.result(0.5)  # GOOD waits for the chunk in flight
    b.backing.release.set()
    assert answered.result().status == S.GOOD
    b.backing.write(0, b"N" * (2 << 20))  # the new holder writes its data
    result = copy.result()
    assert result.status == S.CHECK_CONDITION and sense_of(result) == X.THIRD_PARTY_DEVICE_FAILURE
    assert fixed_sense(result)[0] == 0  # INFORMATION: no segment completed
    assert b.backing.read(0, 2 << 20).count(b"X") == 0, "the preempted initiator's copy landed after GOOD"
    a.close(), b.close()


@pytest.mark.parametrize("how", ["paused", "closed"])
def test_a_copy_does_not_touch_a_unit_whose_io_is_paused_or_that_is_closed(tmp_path, how):
    """``io_paused`` (a snapshot's point in time) and ``retire``/``close`` (a removal) see no write of a copy
    of another unit; the copy does not wait for them either (a ``call_quiesced`` pausing the target's units
    one after another would wait for it): COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b"))
    a.backing.write(0, b"X" * BS)
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 1, 0, 0)],
                            usage=X.LIST_ID_DISCARD)
    pending = a.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
    if how == "paused":
        with b.io_paused():
            result = pending.blocking()
    else:
        b.retire()
        result = pending.blocking()
    assert sense_of(result) == S.COPY_TARGET_DEVICE_NOT_REACHABLE
    assert not any((tmp_path / "vol-b.img").read_bytes()[:BS])
    a.close(), b.close()


def test_retire_waits_for_a_copy_chunk_in_flight(tmp_path):
    """A unit being removed flushes and closes only once the chunk a copy of another unit writes to it ended."""
    a, b, copy = start_copy_into_gated_unit(tmp_path)
    retired = Worker(b.retire)
    assert not b.backing.flushed.wait(0.5), "the unit was flushed (to be closed) under a chunk in flight"
    b.backing.release.set()
    retired.result()
    assert sense_of(copy.result()) == S.COPY_TARGET_DEVICE_NOT_REACHABLE  # the second chunk: closed
    a.close(), b.close()


# -- finding 2: block sizes ------------------------------------------------------------------------------
def test_each_side_of_a_segment_counts_in_its_own_block_size():
    """SPC-5 table 115: DC=0, BLOCK DEVICE NUMBER OF BLOCKS counts source blocks; the destination LBA is in the
    destination's blocks: one 4096-byte block lands at LBA 16 of a 512-byte unit (byte 8192)."""
    a, b = ready(memory_unit("vol-a", block_size=4096), memory_unit("vol-b"))
    a.backing.write(0, b"S" * 4096)
    params = parameter_list([target_descriptor(a, block_length=4096), target_descriptor(b, block_length=512)],
                            [segment(0, 1, 1, 0, 16)], usage=X.LIST_ID_DISCARD)
    assert xcopy(a, params).status == S.GOOD
    assert b.backing.read(16 * 512, 4096) == b"S" * 4096 and not any(b.backing.read(16 * 4096, 4096))


def test_a_copy_past_the_end_of_a_smaller_block_destination_is_aborted_and_does_not_grow_it(tmp_path):
    a, b = ready(file_unit(tmp_path, "vol-a", 1 << 20, 4096), file_unit(tmp_path, "vol-b", 1 << 20, 512))
    params = parameter_list([target_descriptor(a, block_length=4096), target_descriptor(b, block_length=512)],
                            [segment(0, 1, 8, 0, b.num_blocks - 8)], usage=X.LIST_ID_DISCARD)  # 64 b-blocks
    result = xcopy(a, params)
    assert result.status == S.CHECK_CONDITION and sense_of(result).key == S.COPY_ABORTED
    assert os.stat(tmp_path / "vol-b.img").st_size == 1 << 20
    a.close(), b.close()


def test_a_segment_that_is_not_whole_blocks_on_both_sides_is_an_unexpected_inexact_segment():
    """DC=1: one 512-byte destination block is an eighth of a 4096-byte source block; without PAD or CAT the
    residue is COPY ABORTED, UNEXPECTED INEXACT SEGMENT (SPC-5 §5.17.7.2 table 116).  Nothing is written."""
    a, b = ready(memory_unit("vol-a", block_size=4096), memory_unit("vol-b"))
    a.backing.write(0, b"S" * 4096)
    seg = bytearray(segment(0, 1, 1, 0, 0))
    seg[1] |= 0x02  # DC
    params = parameter_list([target_descriptor(a, block_length=4096), target_descriptor(b, block_length=512)],
                            [bytes(seg)], usage=X.LIST_ID_DISCARD)
    assert sense_of(xcopy(a, params)) == X.UNEXPECTED_INEXACT_SEGMENT
    assert not any(b.backing.read(0, 4096))


# -- finding 3: held results belong to their copy and nexus ------------------------------------------------
def test_the_held_result_of_a_copy_does_not_outlive_its_nexus(tmp_path):
    """I_T nexus loss discards what is held for it; a copy still on its worker must not hold it again."""
    (lu,) = ready(file_unit(tmp_path, "vol-a", 4 << 20))
    params = parameter_list([target_descriptor(lu)], [segment(0, 0, 8, 0, 100)], list_id=7)
    pending = lu.execute(NEXUS, xcopy_cdb(params), params, len(params), defer=True)
    assert pending.blocking is not None and (NEXUS, 7) in lu.copy_results
    lu.remove_nexus(NEXUS)  # the session drops while the copy is on its worker
    assert pending.blocking().status == S.GOOD
    assert not [key for key in lu.copy_results if key[0] == NEXUS], lu.copy_results
    lu.close()


def test_an_old_copy_of_a_lost_nexus_does_not_overwrite_the_status_of_a_new_copy_with_its_list_id(tmp_path):
    """The same initiator port logs in again and reuses list identifier 7 while its old copy still runs: RECEIVE
    COPY STATUS must tell the new copy's progress, not the old copy's end."""
    (lu,) = ready(file_unit(tmp_path, "vol-a", 4 << 20))
    lu.backing.write(0, b"N" * BS)
    old = parameter_list([target_descriptor(lu)], [segment(0, 0, 8, 0, 100)], list_id=7)
    old_pending = lu.execute(NEXUS, xcopy_cdb(old), old, len(old), defer=True)
    lu.remove_nexus(NEXUS), lu.add_nexus(NEXUS), run(lu, bytes(6))
    new = parameter_list([target_descriptor(lu)], [segment(0, 0, 1, 0, 500)], list_id=7)
    new_pending = lu.execute(NEXUS, xcopy_cdb(new), new, len(new), defer=True)
    assert new_pending.blocking is not None
    assert old_pending.blocking().status == S.GOOD  # the old copy ends on its worker
    status = X.COPY_STATUS.decode(copy_results(lu, X.SA_COPY_STATUS, list_id=7).data)
    assert (status.copy_manager_status, status.segments_processed) == (X.COPY_IN_PROGRESS, 0)
    assert new_pending.blocking().status == S.GOOD
    status = X.COPY_STATUS.decode(copy_results(lu, X.SA_COPY_STATUS, list_id=7).data)
    assert (status.copy_manager_status, status.segments_processed, status.transfer_count) == (X.COPY_COMPLETED, 1, 0)
    lu.close()


# -- finding 4: access is checked before any block moves; a change meanwhile is COPY ABORTED ---------------
@pytest.mark.parametrize("why", ["write protected", "reservation conflict"])
def test_a_destination_refused_in_a_later_segment_ends_the_copy_before_any_segment_is_processed(why, tmp_path):
    """SPC-5 §5.17.7.3: errors found before segment processing use their own sense key (not COPY ABORTED) and
    leave nothing done: segment 0 (to LUN 0) is not copied when segment 1's destination may not be written."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b", read_only=why == "write protected"))
    if why == "reservation conflict":
        b.reservations.spc2_reserve(OTHER)
    a.backing.write(0, b"Q" * BS)
    params = parameter_list([target_descriptor(a), target_descriptor(b)],
                            [segment(0, 0, 1, 0, 50), segment(0, 1, 1, 0, 0)], list_id=3)
    result = xcopy(a, params)
    if why == "write protected":
        assert result.status == S.CHECK_CONDITION and sense_of(result) == S.WRITE_PROTECTED
        assert fixed_sense(result)[0] is None  # INFORMATION not valid
    else:
        assert result.status == S.RESERVATION_CONFLICT
    assert not any(a.backing.read(50 * BS, BS)) and not a.copy_results
    a.close(), b.close()


def test_a_destination_write_protected_while_the_copy_runs_aborts_it_with_the_segments_done(tmp_path):
    """Access that changes once segments are being processed (here SWP-like: LUN 1 becomes write-protected
    after segment 0): COPY ABORTED, THIRD PARTY DEVICE FAILURE, INFORMATION = segments completed, and the
    outcome held for RECEIVE COPY RESULTS (LIST ID USAGE 00b)."""
    a, b = ready(file_unit(tmp_path, "vol-a"), file_unit(tmp_path, "vol-b"))
    a.backing.write(0, b"Q" * BS)
    real_write = a.backing.write

    def write(offset, data, fua=False):  # segment 0 writes LUN 0; then LUN 1 turns write-protected
        real_write(offset, data, fua)
        b.read_only = True
    a.backing.write = write
    params = parameter_list([target_descriptor(a), target_descriptor(b)],
                            [segment(0, 0, 1, 0, 50), segment(0, 1, 1, 0, 0)], list_id=3)
    result = xcopy(a, params)
    assert sense_of(result) == X.THIRD_PARTY_DEVICE_FAILURE and fixed_sense(result)[0] == 1
    assert a.backing.read(50 * BS, BS) == b"Q" * BS and not any(b.backing.read(0, BS))
    status = X.COPY_STATUS.decode(copy_results(a, X.SA_COPY_STATUS, list_id=3).data)
    assert (status.copy_manager_status, status.segments_processed) == (X.COPY_FAILED, 1)
    details = copy_results(a, X.SA_FAILED_SEGMENT_DETAILS, list_id=3).data
    assert S.parse_sense(details[X.FAILED_SEGMENT_DETAILS_HEADER.size:]) == X.THIRD_PARTY_DEVICE_FAILURE
    a.close(), b.close()


# -- finding 5: DISK BLOCK LENGTH 0 ------------------------------------------------------------------------
def test_disk_block_length_zero_lets_the_copy_manager_find_the_block_size():
    """SPC-4 §6.4.5.3 (SPC-5 CSCD descriptor parameters for block devices): DISK BLOCK LENGTH 0 with
    peripheral device type 00h means the copy manager determines the logical block length itself."""
    (a,) = ready(memory_unit("vol-a"))
    a.backing.write(0, b"Z" * BS)
    params = parameter_list([target_descriptor(a, block_length=0)], [segment(0, 0, 1, 0, 9)],
                            usage=X.LIST_ID_DISCARD)
    assert xcopy(a, params).status == S.GOOD
    assert a.backing.read(9 * BS, BS) == b"Z" * BS


# -- finding 6: LIST ID USAGE ------------------------------------------------------------------------------
@pytest.mark.parametrize("usage,list_id,pointer", [(0b01, 1, (1, 4)), (X.LIST_ID_NONE, 5, (0, None))])
def test_reserved_list_id_usage_and_a_list_identifier_with_none_are_invalid(usage, list_id, pointer):
    """SPC-5 table 129: LIST ID USAGE 01b is reserved; with 11b a LIST IDENTIFIER other than zero is INVALID
    FIELD IN PARAMETER LIST.  The field pointer names LIST ID USAGE (byte 1, bit 4) or LIST IDENTIFIER."""
    (a,) = ready(memory_unit("vol-a"))
    a.backing.write(0, b"Z" * BS)
    params = parameter_list([target_descriptor(a)], [segment(0, 0, 1, 0, 9)], list_id=list_id, usage=usage)
    result = xcopy(a, params)
    assert result.status == S.CHECK_CONDITION and sense_of(result) == S.INVALID_FIELD_IN_PARAMETER_LIST
    assert fixed_sense(result)[1:] == pointer
    assert not a.copy_results and not any(a.backing.read(9 * BS, BS))
    none = parameter_list([target_descriptor(a)], [segment(0, 0, 1, 0, 9)], list_id=0, usage=X.LIST_ID_NONE)
    assert xcopy(a, none).status == S.GOOD and not a.copy_results  # 11b with identifier 0: nothing held


# -- finding 7: a copy on the event loop stays small; a worker copy does not reach such a unit --------------
def test_an_atomic_units_copy_runs_on_the_loop_bounded_by_the_limits_it_reports(tmp_path):
    """An ``atomic`` unit runs all its I/O on the event loop, one command at a time (that makes WRITE ATOMIC
    atomic), so its EXTENDED COPY does too, moving no more per command than one WRITE may: it reports one
    segment of MAXIMUM TRANSFER LENGTH (OPERATING PARAMETERS; the Parameter Data and General Copy Operations
    descriptors of the Third-party Copy VPD page, SPC-5 §7.8.17).  A second segment is TOO MANY SEGMENT
    DESCRIPTORS and a longer one COPY ABORTED, both before a block moves; one within the limits is copied."""
    (a,) = ready(file_unit(tmp_path, "vol-a", 32 << 20, max_atomic_transfer_bytes=ATOMIC_OPT_IN_BYTES))
    limit = a.settings.max_transfer_bytes
    params = X.OPERATING_PARAMETERS.decode(copy_results(a, X.SA_OPERATING_PARAMETERS).data)
    assert (params.maximum_segment_descriptor_count, params.maximum_segment_length) == (1, limit)
    page = run(a, bytes([0x12, 1, 0x8F, 4, 0, 0])).data
    parameter_data = page.index(b"\x00\x04\x00\x10")
    assert int.from_bytes(page[parameter_data + 10: parameter_data + 12], "big") == 1
    general = page.index(b"\x80\x01\x00\x20")
    assert X.GENERAL_COPY_OPERATIONS.decode(page, general + 4).maximum_segment_length == limit
    a.backing.write(0, b"W" * (limit + BS))
    blocks = limit // BS
    two = parameter_list([target_descriptor(a)], [segment(0, 0, 8, 0, 40000)] * 2, usage=X.LIST_ID_DISCARD)
    assert sense_of(a.execute(NEXUS, xcopy_cdb(two), two, len(two), defer=True)) == S.TOO_MANY_SEGMENT_DESCRIPTORS
    big = parameter_list([target_descriptor(a)], [segment(0, 0, blocks + 1, 0, 40000)], usage=X.LIST_ID_DISCARD)
    result = a.execute(NEXUS, xcopy_cdb(big), big, len(big), defer=True)
    assert result.status == S.CHECK_CONDITION and sense_of(result).key == S.COPY_ABORTED
    assert not any(a.backing.read(40000 * BS, limit + BS)), "copied on the caller's (event loop) thread"
    ok = parameter_list([target_descriptor(a)], [segment(0, 0, blocks, 0, 40000)], usage=X.LIST_ID_DISCARD)
    assert a.execute(NEXUS, xcopy_cdb(ok), ok, len(ok), defer=True).status == S.GOOD
    assert a.backing.read(40000 * BS, limit) == b"W" * limit
    a.close()


def test_a_copy_on_a_worker_does_not_reach_an_atomic_unit_and_an_atomic_units_copy_reaches_any(tmp_path):
    """A worker's copy into or out of an atomic unit would run beside that unit's loop I/O (WRITE ATOMIC no
    longer atomic against it; its SANITIZE and PREEMPT AND ABORT not waiting for it): COPY TARGET DEVICE NOT
    REACHABLE.  The atomic unit's own copy runs on the loop and may reach any unit of the target."""
    plain, atomic = ready(file_unit(tmp_path, "vol-a"),
                          file_unit(tmp_path, "vol-b", max_atomic_transfer_bytes=ATOMIC_OPT_IN_BYTES))
    plain.backing.write(0, b"P" * BS), atomic.backing.write(0, b"T" * BS)
    into_atomic = parameter_list([target_descriptor(plain), target_descriptor(atomic)], [segment(0, 1, 1, 0, 5)],
                                 usage=X.LIST_ID_DISCARD)
    assert sense_of(xcopy(plain, into_atomic)) == S.COPY_TARGET_DEVICE_NOT_REACHABLE
    assert not any(atomic.backing.read(5 * BS, BS))
    assert xcopy(atomic, into_atomic).status == S.GOOD  # the same list, managed by the atomic unit
    assert atomic.backing.read(5 * BS, BS) == b"P" * BS
    plain.close(), atomic.close()


def test_a_worker_copy_manager_reports_its_own_limits(tmp_path):
    """A unit whose copies run on a worker keeps 32 segments of 64 MiB; the General Copy Operations descriptor
    (8001h, 32 bytes: SPC-5 table 658) is golden-byte checked."""
    (a,) = ready(file_unit(tmp_path, "vol-a"))
    params = X.OPERATING_PARAMETERS.decode(copy_results(a, X.SA_OPERATING_PARAMETERS).data)
    assert (params.maximum_segment_descriptor_count, params.maximum_segment_length) == (32, 64 << 20)
    page = run(a, bytes([0x12, 1, 0x8F, 4, 0, 0])).data
    general = page.index(b"\x80\x01\x00\x20")
    assert page[general:] == bytes.fromhex("80010020" "00000001" "00000001" "04000000") + bytes(20)
    a.close()


# -- finding 8: UNMAP's MAXIMUM UNMAP LBA COUNT bounds the whole command ------------------------------------
def unmap_command(descriptors):
    descs = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in descriptors)
    params = (6 + len(descs)).to_bytes(2, "big") + len(descs).to_bytes(2, "big") + bytes(4) + descs
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(params).to_bytes(2, "big") + b"\0", params


def test_unmap_total_above_maximum_unmap_lba_count_is_invalid_field_in_parameter_list():
    """SBC-3 §5.28.2: the TOTAL number of blocks of the descriptors above MAXIMUM UNMAP LBA COUNT ends UNMAP with
    INVALID FIELD IN PARAMETER LIST (pointing at the count that went past it), and nothing is unmapped."""
    (lu,) = ready(memory_unit("vol-a", 64 << 20, max_unmap_lba_count=1024))
    lu.backing.write(0, b"D" * (4096 * BS))
    cdb, params = unmap_command([(i * 1024, 1024) for i in range(4)])
    result = run(lu, cdb, params)
    assert result.status == S.CHECK_CONDITION and sense_of(result) == S.INVALID_FIELD_IN_PARAMETER_LIST
    assert fixed_sense(result)[1] == 8 + 16 + 8  # descriptor 1's NUMBER OF LOGICAL BLOCKS
    assert lu.backing.read(0, 4096 * BS) == b"D" * (4096 * BS)
    cdb, params = unmap_command([(0, 512), (2048, 512)])  # 1024 in all: at the limit
    assert run(lu, cdb, params).status == S.GOOD
    assert not any(lu.backing.read(0, 512 * BS)) and not any(lu.backing.read(2048 * BS, 512 * BS))
