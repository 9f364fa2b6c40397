"""Deviations a review reproduced in the SCSI command set, one test (or more) each.

REPORT SUPPORTED OPERATION CODES against what the unit offers (SPC-4 §6.35), REPORT LUNS's
allocation length and unit attention (SPC-4 §6.33, §4.2.5.6; SAM-5 §5.14), MODE SENSE subpage FFh
(SPC-4 §6.11), PRE-FETCH against MAXIMUM PREFETCH LENGTH (SBC-4 §6.6.4), VERIFY's field pointer
(SPC-4 §4.5.2.4.2) and VBULS (SBC-4 Block Device Characteristics VPD page, VERIFY).
"""

from __future__ import annotations

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.device import LunMap
from node_agent.scsi.modepages import MODE_PAGES

from test_scsi_support import BS, NEXUS, OTHER, cdb10, cdb12, cdb16, make_lu, run, sense_of

MAINTENANCE_IN, RSOC = 0xA3, 0x0C


def _field_pointer(result) -> int:
    """The sense-key-specific FIELD POINTER of fixed-format sense data (SPC-4 §4.5.2.4.2)."""
    assert result.sense[15] & 0xC0 == 0xC0, result.sense.hex()  # SKSV and C/D: a field of the CDB
    return int.from_bytes(result.sense[16:18], "big")


# -- REPORT SUPPORTED OPERATION CODES --------------------------------------------------------
def _rsoc_one(lu, opcode: int, sa: int | None) -> bytes:
    if sa is None:
        cdb = bytes([MAINTENANCE_IN, RSOC, 0b001, opcode, 0, 0]) + (64).to_bytes(4, "big") + b"\0\0"
    else:
        cdb = bytes([MAINTENANCE_IN, RSOC, 0b010, opcode]) + sa.to_bytes(2, "big") + (64).to_bytes(4, "big") + b"\0\0"
    r = run(lu, cdb)
    assert r.status == S.GOOD
    return bytes(r.data)


def _rsoc_all(lu) -> set[tuple[int, int | None]]:
    data = bytes(run(lu, bytes([MAINTENANCE_IN, RSOC, 0, 0, 0, 0]) + (8192).to_bytes(4, "big") + b"\0\0").data)
    length = int.from_bytes(data[:4], "big")
    listed = set()
    for pos in range(4, 4 + length, 8):
        servactv = data[pos + 5] & 0x01
        listed.add((data[pos], int.from_bytes(data[pos + 2:pos + 4], "big") if servactv else None))
    return listed


GET_LBA_STATUS = bytes([0x9E, 0x12]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
WITHDRAWN = [  # (unit settings, opcode, service action, a CDB of the command)
    pytest.param({}, 0x9C, None, bytes([0x9C]) + bytes(15), id="WRITE ATOMIC(16), not opted in"),
    pytest.param({"thin_provisioning": False}, 0x42, None, bytes([0x42]) + bytes(9), id="UNMAP, thick"),
    pytest.param({"thin_provisioning": False}, 0x9E, 0x12, GET_LBA_STATUS, id="GET LBA STATUS, thick"),
    pytest.param({"thin_provisioning": False}, 0x48, 0x02, bytes([0x48, 0x02]) + bytes(8),
                 id="SANITIZE BLOCK ERASE, thick"),
]


@pytest.mark.parametrize("settings,opcode,sa,cdb", WITHDRAWN)
def test_rsoc_reports_not_supported_what_the_unit_refuses(settings, opcode, sa, cdb):
    """SPC-4 §6.35: a command the device server refuses as unsupported is SUPPORT 001b in the one-command
    form and absent from the all-commands list, not SUPPORT 011b."""
    lu = make_lu("memory", **settings)
    assert sense_of(run(lu, cdb, edtl=0)) == S.INVALID_COMMAND_OPERATION_CODE
    assert _rsoc_one(lu, opcode, sa)[1] & 0x07 == 0b001
    assert (opcode, sa) not in _rsoc_all(lu)


@pytest.mark.parametrize("settings,opcode,sa", [
    ({"max_atomic_transfer_bytes": 1 << 20}, 0x9C, None),
    ({}, 0x42, None), ({}, 0x9E, 0x12), ({}, 0x48, 0x02),
])
def test_rsoc_still_reports_what_the_unit_offers(settings, opcode, sa):
    lu = make_lu("memory", **settings)
    assert _rsoc_one(lu, opcode, sa)[1] & 0x07 == 0b011
    assert (opcode, sa) in _rsoc_all(lu)


def test_withdrawn_command_is_unknown_even_on_a_read_only_unit():
    """The table's availability decides before the write-protect check: as an unknown operation code."""
    lu = make_lu("memory", thin_provisioning=False, read_only=True)
    assert sense_of(run(lu, bytes([0x42]) + bytes(9), edtl=0)) == S.INVALID_COMMAND_OPERATION_CODE


# -- REPORT LUNS -------------------------------------------------------------------------------
def _report_luns(alloc: int) -> bytes:
    return bytes([0xA0, 0, 0, 0, 0, 0]) + alloc.to_bytes(4, "big") + b"\0\0"


def _lun_map() -> LunMap:
    luns = LunMap({0: make_lu("memory"), 1: make_lu("memory")})
    luns.add_nexus(NEXUS)
    luns.add_nexus(OTHER)
    for lun in (0, 1):
        for nexus in (NEXUS, OTHER):  # each sees POWER ON, RESET once
            assert sense_of(luns.execute(nexus, lun, bytes(6), None, 0)) == S.POWER_ON_RESET
    return luns


@pytest.mark.parametrize("lun", [0, 5], ids=["present LUN", "absent LUN"])
def test_report_luns_short_allocation_length_truncates(lun):
    """SPC-4 §6.33: the allocation length "should be at least 16"; less truncates (§4.2.5.6), no error."""
    luns = _lun_map()
    whole = bytes(luns.execute(NEXUS, lun, _report_luns(64), None, 64).data)
    assert len(whole) == 8 + 2 * 8
    for alloc in range(16):
        r = luns.execute(NEXUS, lun, _report_luns(alloc), None, alloc)
        assert r.status == S.GOOD and bytes(r.data or b"") == whole[:alloc], alloc


@pytest.mark.parametrize("lun", [0, 5], ids=["present LUN", "absent LUN"])
def test_report_luns_clears_reported_luns_data_has_changed(lun):
    """SAM-5 §5.14: REPORT LUNS is not failed by a pending unit attention, and it clears a pending
    REPORTED LUNS DATA HAS CHANGED for its I_T nexus (UA_INTLCK_CTRL 00b) on every unit that nexus
    reaches; other nexuses and other conditions keep theirs."""
    luns = _lun_map()
    luns.add(2, make_lu("memory"))  # the inventory changed: 3F/0E on LUNs 0 and 1, for both nexuses
    lu0 = luns.luns[0]
    lu0.unit_attention(NEXUS, S.MODE_PARAMETERS_CHANGED)  # a second condition, queued behind it
    r = luns.execute(NEXUS, lun, _report_luns(64), None, 64)
    assert r.status == S.GOOD and int.from_bytes(r.data[:4], "big") == 3 * 8
    assert sense_of(luns.execute(NEXUS, 0, bytes(6), None, 0)) == S.MODE_PARAMETERS_CHANGED
    assert luns.execute(NEXUS, 0, bytes(6), None, 0).status == S.GOOD
    assert luns.execute(NEXUS, 1, bytes(6), None, 0).status == S.GOOD
    for unit in (0, 1):  # the other I_T nexus still has it
        assert sense_of(luns.execute(OTHER, unit, bytes(6), None, 0)) == S.REPORTED_LUNS_DATA_HAS_CHANGED
    for unit in luns.units():  # the bookkeeping the dispatcher's fast path trusts
        assert unit._ua_pending == 0 and not unit._gate


def test_report_luns_that_fails_clears_nothing():
    luns = _lun_map()
    luns.add(2, make_lu("memory"))
    bad = bytes([0xA0, 0, 0x07, 0, 0, 0]) + (64).to_bytes(4, "big") + b"\0\0"  # SELECT REPORT 07h: refused
    assert sense_of(luns.execute(NEXUS, 0, bad, None, 64)) == S.INVALID_FIELD_IN_CDB
    assert sense_of(luns.execute(NEXUS, 0, bytes(6), None, 0)) == S.REPORTED_LUNS_DATA_HAS_CHANGED


# -- MODE SENSE subpage FFh ------------------------------------------------------------------------
@pytest.mark.parametrize("page", [p.code for p in MODE_PAGES])
def test_mode_sense_subpage_ff_returns_the_page(page):
    """SPC-4 §6.11: page nn, subpage FFh is that page (page_0 format) and all its subpages; ours have none."""
    lu = make_lu("memory")
    for cdb in (lambda sub: bytes([0x1A, 0x08, page, sub, 255, 0]),
                lambda sub: bytes([0x5A, 0x08, page, sub, 0, 0, 0, 1, 0, 0])):
        plain, every = run(lu, cdb(0x00)), run(lu, cdb(0xFF))
        assert every.status == S.GOOD and bytes(every.data) == bytes(plain.data)
        other = run(lu, cdb(0x01))  # a subpage that does not exist is still refused, at the SUBPAGE CODE
        assert sense_of(other) == S.INVALID_FIELD_IN_CDB and _field_pointer(other) == 3


# -- PRE-FETCH and MAXIMUM PREFETCH LENGTH ---------------------------------------------------------
LIMIT = 64  # blocks: max_transfer_bytes below, and so MAXIMUM PREFETCH LENGTH


@pytest.mark.parametrize("build,pointer", [(cdb10, 7), (cdb16, 10)], ids=["PRE-FETCH(10)", "PRE-FETCH(16)"])
def test_pre_fetch_longer_than_maximum_prefetch_length_is_refused(build, pointer):
    """SBC-4 §6.6.4: the Block Limits VPD page's MAXIMUM PREFETCH LENGTH bounds PREFETCH LENGTH; more is
    INVALID FIELD IN CDB pointing at the PREFETCH LENGTH field."""
    lu = make_lu("memory", max_transfer_bytes=LIMIT * BS)
    limits = bytes(run(lu, bytes([0x12, 1, 0xB0, 0, 64, 0])).data)
    assert int.from_bytes(limits[16:20], "big") == LIMIT
    opcode = 0x34 if build is cdb10 else 0x90
    assert run(lu, build(opcode, 0, LIMIT)).status == S.GOOD
    assert run(lu, build(opcode, 0, 0)).status == S.GOOD  # 0: up to the last block, no length named
    r = run(lu, build(opcode, 0, LIMIT + 1))
    assert sense_of(r) == S.INVALID_FIELD_IN_CDB and _field_pointer(r) == pointer


# -- VERIFY ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,opcode,pointer", [(cdb10, 0x2F, 7), (cdb12, 0xAF, 6), (cdb16, 0x8F, 10)],
                         ids=["VERIFY(10)", "VERIFY(12)", "VERIFY(16)"])
def test_verify_length_error_points_at_the_verification_length(build, opcode, pointer):
    """SPC-4 §4.5.2.4.2: the field pointer names the first byte of the field in error: VERIFICATION
    LENGTH is byte 7 of VERIFY(10), 6 of VERIFY(12) and 10 of VERIFY(16) (SBC-3 §5.24-5.26)."""
    lu = make_lu("memory", max_transfer_bytes=LIMIT * BS)
    r = run(lu, build(opcode, 0, LIMIT + 1))
    assert sense_of(r) == S.INVALID_FIELD_IN_CDB and _field_pointer(r) == pointer


def test_vbuls_set_since_verify_compares_deallocated_blocks():
    """SBC-4: with VBULS=0 a VERIFY with BYTCHK 01b over an unmapped LBA must end in MISCOMPARE VERIFY OF
    UNMAPPED LBA; this unit compares it as the zeros it reads as, so it reports VBULS=1 (byte 8 bit 0)."""
    lu = make_lu("memory")
    characteristics = bytes(run(lu, bytes([0x12, 1, 0xB1, 0, 64, 0])).data)
    assert characteristics[8] & 0x01 == 0x01
    status = bytes(run(lu, GET_LBA_STATUS[:2] + (1000).to_bytes(8, "big") + GET_LBA_STATUS[10:]).data)
    assert status[8 + 12] & 0x0F == 0x1  # LBA 1000 is deallocated
    assert run(lu, cdb10(0x2F, 1000, 1, byte1=0x02), bytes(BS)).status == S.GOOD
    assert sense_of(run(lu, cdb10(0x2F, 1000, 1, byte1=0x02), b"\x01" * BS)) == S.MISCOMPARE_DURING_VERIFY


def test_write_same_without_data_on_a_fully_provisioned_unit_writes_zeros_and_keeps_the_blocks(tmp_path):
    """WRITE SAME(16) with NDOB (no Data-Out: zeros) on a unit that is not thin (LBPME=0, a thick volume) used to
    punch holes like an UNMAP: the data read back as zeros, but the volume lost the space it was given."""
    import os

    lu = make_lu("file", tmp_path, thin_provisioning=False)
    payload = bytes(range(256)) * (8 * BS // 256)
    assert run(lu, cdb16(0x8A, 0, 8), payload).status == S.GOOD  # WRITE(16) of 8 blocks
    lu.backing.flush()
    allocated = os.stat(tmp_path / "lun.img").st_blocks
    assert run(lu, cdb16(0x93, 0, 8, byte1=0x01), None, 0).status == S.GOOD  # WRITE SAME(16), NDOB
    assert lu.backing.read(0, 8 * BS) == bytes(8 * BS)
    lu.backing.flush()
    assert os.stat(tmp_path / "lun.img").st_blocks >= allocated


# ---- out of space, and holes finer than an LBA ---------------------------------------------------------------


def test_a_write_the_backing_store_has_no_room_for_is_space_allocation_failed(monkeypatch):
    """SBC-3 §4.7.3.7: a thin unit whose disk is full answers DATA PROTECT, SPACE ALLOCATION FAILED WRITE
    PROTECT (27h/07h), which Linux turns into ENOSPC and VMware into a paused VM, not HARDWARE ERROR (EIO):
    inline (WRITE(10)), on the full path (WRITE(12)) and deferred to a worker (WRITE SAME(16))."""
    import errno

    lu = make_lu("memory")
    run(lu, bytes(6))  # TEST UNIT READY: the unit attention

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lu.backing, "write", full)
    monkeypatch.setattr(lu.backing, "writev", full, raising=False)
    for cdb, data in ((cdb10(0x2A, 0, 8), b"\x5a" * 8 * BS), (cdb12(0xAA, 8, 8), b"\x5a" * 8 * BS),
                      (cdb16(0x93, 16, 8), b"\x01" * BS)):
        result = run(lu, cdb, data)
        assert sense_of(result) == S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT, cdb.hex()
    monkeypatch.setattr(lu.backing, "write", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    assert sense_of(run(lu, cdb10(0x2A, 0, 8), b"\x5a" * 8 * BS)) == S.INTERNAL_TARGET_FAILURE


def test_a_write_to_a_file_system_gone_read_only_is_write_protected(monkeypatch):
    """EROFS (ext4 remounted read-only after an error) is DATA PROTECT, WRITE PROTECTED (27h/00h): the medium
    takes no writes now, which is not a failure of the target's hardware."""
    import errno

    lu = make_lu("memory")
    run(lu, bytes(6))  # TEST UNIT READY: the unit attention
    monkeypatch.setattr(lu.backing, "write", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    monkeypatch.setattr(lu.backing, "writev", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")),
                        raising=False)
    assert sense_of(run(lu, cdb10(0x2A, 0, 8), b"\x5a" * 8 * BS)) == S.WRITE_PROTECTED


def test_get_lba_status_calls_no_lba_with_data_in_it_deallocated(monkeypatch):
    """SBC-3 §5.5: with LBPRZ=1 "deallocated" promises zeros, so sparse-aware copiers skip such LBAs. A backing
    file's holes can be finer than an LBA (a 1 KiB-block filesystem under 4 KiB LBAs, here bytes under 512-byte
    LBAs): an LBA is deallocated only when all of it is a hole."""
    lu = make_lu("memory")
    size = lu.num_blocks * BS
    layout = [(False, 0, 300), (True, 300, 512), (False, 512, 2148), (True, 2148, 2198), (False, 2198, size)]

    def extent(offset, limit):
        end = min(offset + limit, size)
        mapped, _, stop = next(part for part in layout if part[1] <= offset < part[2])
        return mapped, min(stop, end) - offset

    monkeypatch.setattr(lu.backing, "extent", extent)
    data = bytes(run(lu, bytes([0x9E, 0x12]) + bytes(8) + (128).to_bytes(4, "big") + b"\0\0", edtl=128).data)
    descriptors = [(int.from_bytes(data[o:o + 8], "big"), int.from_bytes(data[o + 8:o + 12], "big"), data[o + 12])
                   for o in range(8, len(data), 16)]
    # LBA 0 and LBA 4 each hold some data: mapped; LBAs 1-3 and 5 on are holes through and through.
    assert descriptors == [(0, 1, 0), (1, 3, 1), (4, 1, 0), (5, lu.num_blocks - 5, 1)]


@pytest.mark.parametrize("opcode", [0x35, 0x34], ids=["SYNCHRONIZE CACHE(10)", "PRE-FETCH(10)"])
def test_an_lba_past_the_last_is_out_of_range_even_with_no_length(opcode):
    """SBC-3 §5.22/§5.3: the LBA names a block that must exist; a length of 0 means "to the last block"."""
    lu = make_lu("memory")
    run(lu, bytes(6))
    assert sense_of(run(lu, cdb10(opcode, lu.num_blocks, 0))) == S.LBA_OUT_OF_RANGE
    assert run(lu, cdb10(opcode, lu.num_blocks - 1, 0)).status == S.GOOD


# ---- PREEMPT AND ABORT's and a reset's wait: for the I/O before it, not after ----------------------------------


def test_waiting_for_earlier_io_waits_for_queued_jobs_and_not_for_later_ones():
    """SPC-4 §5.13.11.5: PREEMPT AND ABORT's GOOD (and a reset's answer) waits for the I/O handed to workers
    before it (``wait_for_earlier_io``). That includes a job still waiting for its worker thread: counted only
    once it ran, its WRITE could land after the GOOD. And it excludes I/O handed out after it: counted, a
    steady stream of a surviving initiator's slow writes held the GOOD back for many seconds (fence_scsi and
    cluster arbitration time out)."""
    import threading

    lu = make_lu("memory")
    log: list[str] = []
    later_may_end = threading.Event()
    earlier = lu.deferred(lambda: log.append("earlier I/O"))       # handed out first, not started yet
    barrier = lu.deferred(lambda: lu.wait_for_earlier_io() or log.append("answer"))
    later = lu.deferred(lambda: later_may_end.wait(10))            # handed out after: runs all along
    threads = [threading.Thread(target=job.blocking) for job in (later, barrier)]
    for thread in threads:
        thread.start()
    threads[1].join(0.3)
    assert threads[1].is_alive() and log == []   # the earlier job, not yet on a worker, is waited for
    earlier.blocking()
    threads[1].join(5)
    assert not threads[1].is_alive() and log == ["earlier I/O", "answer"]  # while the later job still runs
    later_may_end.set()
    threads[0].join(5)
    assert lu._unfinished == set()
