"""Behaviour of each command on the in-memory and the file backing store (SPC-4 §6, SBC-3 §5)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.device import FileRange, LogicalUnit, LunMap, LunSettings
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore

from test_scsi_support import BS, NEXUS, OTHER, SIZE, cdb10, cdb12, cdb16, data_of, make_lu, run, sense_of

NBLOCKS = SIZE // BS


@pytest.fixture(params=["memory", "file"])
def lu(request, tmp_path):
    unit = make_lu(request.param, tmp_path)
    yield unit
    unit.close()


def test_unit_attention_on_new_nexus_then_cleared(lu):
    """SPC-4 §5.14: the first command after login sees 29h/00h; INQUIRY does not clear it."""
    lu.add_nexus(NEXUS)
    assert run(lu, bytes([0x12, 0, 0, 0, 36, 0])).status == S.GOOD
    r = run(lu, bytes(6))
    assert r.status == S.CHECK_CONDITION and sense_of(r) == S.POWER_ON_RESET
    assert run(lu, bytes(6)).status == S.GOOD


def test_request_sense_reports_and_clears_ua(lu):
    lu.add_nexus(NEXUS)
    r = run(lu, bytes([0x03, 0, 0, 0, 252, 0]))
    assert r.status == S.GOOD and S.parse_sense(r.data) == S.POWER_ON_RESET
    r = run(lu, bytes([0x03, 1, 0, 0, 252, 0]))
    assert r.data[0] == 0x72 and S.parse_sense(r.data) == S.NO_ADDITIONAL_SENSE


def test_resets_and_capacity_change_reach_every_nexus(lu):
    lu.add_nexus(NEXUS), lu.add_nexus(OTHER)
    for n in (NEXUS, OTHER):
        run(lu, bytes(6), nexus=n)
    lu.reset("lun")
    assert sense_of(run(lu, bytes(6))) == S.BUS_DEVICE_RESET_FUNCTION_OCCURRED
    lu.resize(SIZE * 2)
    assert sense_of(run(lu, bytes(6), nexus=OTHER)) == S.BUS_DEVICE_RESET_FUNCTION_OCCURRED
    assert sense_of(run(lu, bytes(6), nexus=OTHER)) == S.CAPACITY_DATA_HAS_CHANGED
    assert sense_of(run(lu, bytes([0x25]) + bytes(9))) == S.CAPACITY_DATA_HAS_CHANGED
    r = run(lu, bytes([0x25]) + bytes(9))
    assert int.from_bytes(r.data[:4], "big") == 2 * SIZE // BS - 1
    lu.remove_nexus(NEXUS)
    assert lu._ua_pending == 0


def test_inquiry_standard_and_vpd_pages(lu):
    r = run(lu, bytes([0x12, 0, 0, 0, 255, 0]))
    assert r.data[2] == 6 and r.data[4] == len(r.data) - 5 and r.data[8:13] == b"SHOAL"
    pages = run(lu, bytes([0x12, 1, 0, 0, 255, 0])).data
    assert list(pages[4:]) == [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2]
    for code in pages[4:]:
        page = run(lu, bytes([0x12, 1, code, 0, 255, 0])).data
        assert page[1] == code and int.from_bytes(page[2:4], "big") == len(page) - 4
    serial = run(lu, bytes([0x12, 1, 0x80, 0, 255, 0])).data
    assert serial[4:] == b"vol-0001"
    ident = run(lu, bytes([0x12, 1, 0x83, 0, 255, 0])).data
    assert b"SHOAL   vol-0001" in ident and b"iqn.2026-01.io.shoal:t,t,0x0001\0" in ident
    bl = run(lu, bytes([0x12, 1, 0xB0, 0, 64, 0])).data
    assert bl[3] == 0x3C and bl[4] & 1  # SBC-3 length, WSNZ
    lbp = run(lu, bytes([0x12, 1, 0xB2, 0, 64, 0])).data
    assert lbp[5] & 0xE4 == 0xE4 and lbp[6] & 7 == 2


def test_inquiry_errors_and_allocation_length(lu):
    assert sense_of(run(lu, bytes([0x12, 0, 0x80, 0, 255, 0]))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, bytes([0x12, 1, 0x42, 0, 255, 0]))) == S.INVALID_FIELD_IN_CDB
    assert len(run(lu, bytes([0x12, 0, 0, 0, 5, 0])).data) == 5


def test_inquiry_takes_the_scsi2_lun_field_linux_sends_while_probing(lu):
    """Linux fills byte 1 bits 7-5 with the LUN (SCSI-2) until one INQUIRY of the target has answered, so its
    first scan of LUN 1 sends 0x20 there: answered as if it were 0 (standard and VPD data); the other reserved
    bits of byte 1, and CMDDT, still end with INVALID FIELD IN CDB naming the bit."""
    plain = run(lu, bytes([0x12, 0, 0, 0, 36, 0]))
    for byte1 in (0x20, 0xE0):
        scanned = run(lu, bytes([0x12, byte1, 0, 0, 36, 0]))
        assert scanned.status == S.GOOD and scanned.data == plain.data, byte1
    pages = run(lu, bytes([0x12, 0x21, 0x83, 0, 255, 0]))
    assert pages.status == S.GOOD and pages.data == run(lu, bytes([0x12, 1, 0x83, 0, 255, 0])).data
    for byte1, bit in ((0x04, 2), (0x08, 3), (0x10, 4), (0x02, 1)):
        refused = run(lu, bytes([0x12, byte1, 0, 0, 36, 0]))
        assert refused.status == S.CHECK_CONDITION and sense_of(refused) == S.INVALID_FIELD_IN_CDB, byte1
        assert refused.sense[15:18] == bytes([0xC8 | bit, 0, 1]), refused.sense.hex()  # C/D, BPV, byte 1


def test_absent_lun_inquiry_takes_the_scsi2_lun_field_too():
    """A LUN the target does not have answers peripheral qualifier 011b whatever that field holds."""
    answer = LunMap({}).execute(NEXUS, 3, bytes([0x12, 0x60, 0, 0, 36, 0]), None, 36)
    assert answer.status == S.GOOD and answer.data[0] == 0x7F


def test_read_write_round_trip_all_sizes(lu):
    payload = bytes(range(256)) * 8  # 4 blocks
    for cdb in (bytes([0x0A, 0, 0, 8, 4, 0]), cdb10(0x2A, 8, 4), cdb12(0xAA, 8, 4), cdb16(0x8A, 8, 4)):
        r = run(lu, cdb, payload)
        assert r.status == S.GOOD and r.data_out_length == len(payload)
    for cdb in (bytes([0x08, 0, 0, 8, 4, 0]), cdb10(0x28, 8, 4), cdb12(0xA8, 8, 4), cdb16(0x88, 8, 4)):
        assert data_of(lu, run(lu, cdb)) == payload


def test_large_read_is_a_file_range_on_files(lu):
    r = run(lu, cdb10(0x28, 0, 256))
    if lu.backing.fd is None:
        assert isinstance(r.data, bytes) and len(r.data) == 256 * BS
    else:
        assert r.data == FileRange(lu.backing.fd, 0, 256 * BS, lu.backing)


def test_fua_write_is_durable_path(lu):
    run(lu, cdb10(0x2A, 0, 1, byte1=0x08), b"x" * BS)
    assert lu.backing.fua_writes == 1
    run(lu, cdb10(0x2A, 0, 1), b"y" * BS)
    assert lu.backing.fua_writes == 1


def test_write_cache_disabled_makes_every_write_fua(lu):
    page = bytes.fromhex("0812") + bytes(18)  # WCE=0
    r = run(lu, bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page)
    assert r.status == S.GOOD
    run(lu, cdb10(0x2A, 0, 1), b"y" * BS)
    assert lu.backing.fua_writes == 1


def test_lba_out_of_range_and_zero_length(lu):
    for cdb in (cdb10(0x28, NBLOCKS, 1), cdb10(0x28, NBLOCKS + 1, 0), cdb16(0x88, 2**64 - 1, 1),
                cdb16(0x8A, NBLOCKS - 1, 2)):
        assert sense_of(run(lu, cdb, b"z" * 2 * BS)) == S.LBA_OUT_OF_RANGE
    assert run(lu, cdb10(0x28, NBLOCKS, 0)).status == S.GOOD
    assert run(lu, cdb10(0x2A, NBLOCKS - 1, 1), b"e" * BS).status == S.GOOD


def test_transfer_length_over_block_limits(lu):
    r = run(lu, cdb16(0x88, 0, lu.max_transfer_blocks + 1))
    assert sense_of(r) in (S.INVALID_FIELD_IN_CDB, S.LBA_OUT_OF_RANGE)
    small = make_lu("memory", size=64 << 20, max_transfer_bytes=BS * 8)
    assert sense_of(run(small, cdb10(0x28, 0, 9))) == S.INVALID_FIELD_IN_CDB


def test_reserved_bits_naca_and_protect_fields(lu):
    r = run(lu, cdb10(0x28, 0, 1, byte1=0x01))
    assert sense_of(r) == S.INVALID_FIELD_IN_CDB and r.sense[15] == 0xC8 and r.sense[17] == 1
    assert sense_of(run(lu, cdb10(0x28, 0, 1, control=0x04))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, cdb10(0x28, 0, 1, byte1=0x20))) == S.INVALID_FIELD_IN_CDB  # RDPROTECT
    assert run(lu, cdb10(0x28, 0, 1, byte1=0x1A)).status == S.GOOD  # DPO FUA FUA_NV


def test_unknown_opcode_and_service_action(lu):
    assert sense_of(run(lu, bytes([0xC7]) + bytes(15))) == S.INVALID_COMMAND_OPERATION_CODE
    assert sense_of(run(lu, bytes([0x9E, 0x1F]) + bytes(14))) == S.INVALID_FIELD_IN_CDB


def test_write_residuals_follow_libiscsi(lu):
    """EDTL < CDB length writes only whole received blocks; EDTL > CDB length writes the CDB's."""
    run(lu, cdb10(0x2A, 0, 2), b"a" * 2 * BS)
    r = run(lu, cdb10(0x2A, 0, 2), b"b" * BS)
    assert r.status == S.GOOD and r.data_out_length == 2 * BS
    assert data_of(lu, run(lu, cdb10(0x28, 0, 2))) == b"b" * BS + b"a" * BS
    r = run(lu, cdb10(0x2A, 0, 1), b"c" * 2 * BS)
    assert data_of(lu, run(lu, cdb10(0x28, 0, 2))) == b"c" * BS + b"a" * BS
    r = run(lu, cdb10(0x2A, 0, 1), b"d" * 200)
    assert r.status == S.GOOD and data_of(lu, run(lu, cdb10(0x28, 0, 1))) == b"c" * BS
    assert run(lu, cdb10(0x2A, 0, 1), None, 0).status == S.GOOD


def test_verify_compare_and_miscompare(lu):
    run(lu, cdb10(0x2A, 4, 2), b"q" * 2 * BS)
    assert run(lu, cdb10(0x2F, 4, 2, byte1=0x02), b"q" * 2 * BS).status == S.GOOD
    bad = b"q" * (BS + 3) + b"X" + b"q" * (BS - 4)
    r = run(lu, cdb10(0x2F, 4, 2, byte1=0x02), bad)
    assert sense_of(r) == S.MISCOMPARE_DURING_VERIFY and int.from_bytes(r.sense[3:7], "big") == BS + 3
    assert run(lu, cdb10(0x2F, 4, 2, byte1=0x06), b"q" * BS).status == S.GOOD  # BYTCHK=11b
    assert run(lu, cdb10(0x2F, 4, 2), None).status == S.GOOD  # BYTCHK=0
    assert sense_of(run(lu, cdb16(0x8F, NBLOCKS, 1))) == S.LBA_OUT_OF_RANGE


def test_write_and_verify_and_orwrite(lu):
    assert run(lu, cdb10(0x2E, 0, 1, byte1=0x02), b"\x0f" * BS).status == S.GOOD
    assert run(lu, cdb16(0x8B, 0, 1), b"\xf0" * BS).status == S.GOOD
    assert data_of(lu, run(lu, cdb10(0x28, 0, 1))) == b"\xff" * BS


def test_compare_and_write(lu):
    run(lu, cdb10(0x2A, 0, 1), b"A" * BS)
    cdb = bytearray(16); cdb[0] = 0x89; cdb[13] = 1
    assert run(lu, cdb, b"A" * BS + b"B" * BS).status == S.GOOD
    r = run(lu, cdb, b"A" * BS + b"C" * BS)
    assert sense_of(r) == S.MISCOMPARE_DURING_VERIFY
    assert data_of(lu, run(lu, cdb10(0x28, 0, 1))) == b"B" * BS


def test_synchronize_cache(lu):
    assert run(lu, cdb10(0x35, 0, 0)).status == S.GOOD
    assert run(lu, cdb16(0x91, 0, NBLOCKS)).status == S.GOOD
    assert lu.backing.flushes == 2
    assert sense_of(run(lu, cdb10(0x35, NBLOCKS, 1))) == S.LBA_OUT_OF_RANGE


def _unmap_list(*ranges, declared=None):
    body = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    bddl = len(body) if declared is None else declared
    return (bddl + 6).to_bytes(2, "big") + bddl.to_bytes(2, "big") + bytes(4) + body


def test_unmap_punches_and_validates_first(lu):
    run(lu, cdb10(0x2A, 0, 16), b"u" * 16 * BS)
    plist = _unmap_list((0, 8), (9, 1))
    assert run(lu, cdb10(0x42, 0, len(plist)), plist).status == S.GOOD
    data = data_of(lu, run(lu, cdb10(0x28, 0, 16)))
    assert data[: 8 * BS] == bytes(8 * BS) and data[8 * BS: 9 * BS] == b"u" * BS and data[9 * BS: 10 * BS] == bytes(BS)
    status = run(lu, bytes([0x9E, 0x12]) + (0).to_bytes(8, "big") + (64).to_bytes(4, "big") + b"\0\0").data
    assert status[8 + 12] & 0x0F == 1  # LBA 0 deallocated
    run(lu, cdb10(0x2A, 0, 16), b"u" * 16 * BS)
    bad = _unmap_list((0, 8), (NBLOCKS, 1))
    assert sense_of(run(lu, cdb10(0x42, 0, len(bad)), bad)) == S.LBA_OUT_OF_RANGE
    assert data_of(lu, run(lu, cdb10(0x28, 0, 1))) == b"u" * BS  # nothing unmapped
    assert sense_of(run(lu, cdb10(0x42, 0, 4), b"\0" * 4)) == S.PARAMETER_LIST_LENGTH_ERROR
    assert run(lu, cdb10(0x42, 0, 0)).status == S.GOOD
    assert sense_of(run(lu, cdb10(0x42, 0, len(plist), byte1=1), plist)) == S.INVALID_FIELD_IN_CDB


def test_write_same(lu):
    assert run(lu, cdb10(0x41, 2, 3), b"w" * BS).status == S.GOOD
    assert data_of(lu, run(lu, cdb10(0x28, 2, 3))) == b"w" * 3 * BS
    assert run(lu, cdb10(0x41, 2, 3, byte1=0x08), bytes(BS)).status == S.GOOD  # UNMAP
    assert data_of(lu, run(lu, cdb10(0x28, 2, 3))) == bytes(3 * BS)
    assert run(lu, cdb16(0x93, 2, 2, byte1=0x09), None, 0).status == S.GOOD  # NDOB
    assert sense_of(run(lu, cdb10(0x41, 2, 0), b"w" * BS)) == S.INVALID_FIELD_IN_CDB  # WSNZ
    assert sense_of(run(lu, cdb10(0x41, NBLOCKS, 1), b"w" * BS)) == S.LBA_OUT_OF_RANGE
    assert run(lu, cdb10(0x41, 2, 1), b"w" * 2 * BS).status == S.CHECK_CONDITION
    assert sense_of(run(lu, cdb10(0x41, 2, 1, byte1=0x10), b"w" * BS)) == S.INVALID_FIELD_IN_CDB  # ANCHOR


def test_read_capacity(lu):
    d = run(lu, bytes([0x25]) + bytes(9)).data
    assert int.from_bytes(d[:4], "big") == NBLOCKS - 1 and int.from_bytes(d[4:], "big") == BS
    d = run(lu, bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0").data
    assert int.from_bytes(d[:8], "big") == NBLOCKS - 1 and d[14] & 0xC0 == 0xC0
    assert len(run(lu, bytes([0x9E, 0x10]) + bytes(8) + (12).to_bytes(4, "big") + b"\0\0").data) == 12
    assert sense_of(run(lu, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]))) == S.INVALID_FIELD_IN_CDB


def test_mode_sense_pages_and_controls(lu):
    d = run(lu, bytes([0x1A, 0, 0x3F, 0, 255, 0])).data
    assert d[0] == len(d) - 1 and d[2] & 0x10 and d[3] == 8
    codes, pos = [], 4 + d[3]
    while pos < len(d):
        codes.append(d[pos] & 0x3F); pos += 2 + d[pos + 1]
    assert codes == [0x08, 0x0A, 0x1C]
    d10 = run(lu, bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0])).data
    assert d10[4] & 1 and int.from_bytes(d10[6:8], "big") == 16
    assert len(run(lu, bytes([0x1A, 0x08, 0x3F, 0, 4, 0])).data) == 4
    assert sense_of(run(lu, bytes([0x1A, 0, 0xC8, 0, 255, 0]))) == S.SAVING_PARAMETERS_NOT_SUPPORTED
    assert sense_of(run(lu, bytes([0x1A, 0, 0x19, 0, 255, 0]))) == S.INVALID_FIELD_IN_CDB
    changeable = run(lu, bytes([0x1A, 0x08, 0x4A, 0, 255, 0])).data
    assert changeable[4 + 2] == 0x04


def test_mode_select_d_sense_switches_sense_format(lu):
    lu.add_nexus(OTHER)
    page = bytes.fromhex("0a0a 04 10 00 40") + bytes(6)  # D_SENSE=1, other fields as they are
    r = run(lu, bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 8 + len(page), 0]), bytes(8) + page)
    assert r.status == S.GOOD
    r = run(lu, cdb16(0x88, 2**64 - 1, 1))
    assert r.sense[0] == 0x72 and sense_of(r) == S.LBA_OUT_OF_RANGE
    run(lu, bytes(6), nexus=OTHER)  # power-on UA
    assert sense_of(run(lu, bytes(6), nexus=OTHER)) == S.MODE_PARAMETERS_CHANGED


def test_mode_select_rejects_unchangeable_fields_without_partial_state(lu):
    good = bytes.fromhex("0812") + bytes(18)
    bad = bytes.fromhex("0a0a 04 01") + bytes(8)  # QERR changed
    r = run(lu, bytes([0x15, 0x10, 0, 0, 4 + len(good) + len(bad), 0]), bytes(4) + good + bad)
    assert sense_of(r) == S.INVALID_FIELD_IN_PARAMETER_LIST and r.sense[15] & 0x40 == 0
    assert lu.mode.wce  # the caching page was not applied
    assert sense_of(run(lu, bytes([0x15, 0x11, 0, 0, 24, 0]), bytes(4) + good)) == S.INVALID_FIELD_IN_CDB


def test_rsoc_all_and_one(lu):
    d = run(lu, bytes([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])).data
    n = int.from_bytes(d[:4], "big") // 8
    ops = {(d[4 + 8 * i], int.from_bytes(d[6 + 8 * i: 8 + 8 * i], "big")) for i in range(n)}
    assert (0x28, 0) in ops and (0x9E, 0x10) in ops
    one = run(lu, bytes([0xA3, 0x0C, 1, 0x28, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])).data
    assert one[1] & 7 == 3 and int.from_bytes(one[2:4], "big") == 10 and one[4] == 0x28
    assert sense_of(run(lu, bytes([0xA3, 0x0C, 1, 0x9E, 0, 0x10, 0, 0, 0xFF, 0xFF, 0, 0]))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, bytes([0xA3, 0x0C, 2, 0x28, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0]))) == S.INVALID_FIELD_IN_CDB
    sa = run(lu, bytes([0xA3, 0x0C, 0x82, 0x9E, 0, 0x10, 0, 0, 0xFF, 0xFF, 0, 0])).data
    assert sa[1] & 0x80 and sa[5] == 0x10 and len(sa) == 4 + 16 + 12
    assert run(lu, bytes([0xA3, 0x0C, 1, 0xC7, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])).data[1] & 7 == 1
    timeouts = run(lu, bytes([0xA3, 0x0C, 0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])).data
    assert timeouts[4 + 5] & 0x02 and int.from_bytes(timeouts[12:14], "big") == 0x0A


def test_start_stop_and_prevent_allow(lu):
    assert run(lu, bytes([0x1B, 1, 0, 0, 0x01, 0])).status == S.GOOD
    assert sense_of(run(lu, bytes([0x1B, 1, 0, 0, 0x02, 0]))) == S.INVALID_FIELD_IN_CDB  # LOEJ
    assert run(lu, bytes([0x1E, 0, 0, 0, 1, 0])).status == S.GOOD
    assert run(lu, bytes([0x1E, 0, 0, 0, 0, 0])).status == S.GOOD


def test_read_only_unit():
    lu = make_lu("memory", read_only=True)
    r = run(lu, cdb10(0x2A, 0, 1), b"x" * BS)
    assert sense_of(r) == S.WRITE_PROTECTED
    assert run(lu, bytes([0x1A, 0, 0x3F, 0, 255, 0])).data[2] & 0x80


def test_lun_map_absent_luns():
    lu = make_lu("memory")
    luns = LunMap({3: lu})
    r = luns.execute(NEXUS, 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), None, 256)
    assert r.data == bytes.fromhex("00000008 00000000 0003000000000000")
    r = luns.execute(NEXUS, 0, bytes([0x12, 0, 0, 0, 36, 0]), None, 36)
    assert r.data[0] == 0x7F and len(r.data) == 36
    r = luns.execute(NEXUS, 0, bytes([0x03, 0, 0, 0, 18, 0]), None, 18)
    assert r.status == S.GOOD and S.parse_sense(r.data) == S.LOGICAL_UNIT_NOT_SUPPORTED
    r = luns.execute(NEXUS, 0, bytes(6), None, 0)
    assert sense_of(r) == S.LOGICAL_UNIT_NOT_SUPPORTED
    r = luns.execute(NEXUS, 3, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0]), None, 256)
    # allocation length < 16: SPC-4 only says it "should" be 16; the data is truncated (LUN LIST LENGTH kept)
    assert r.status == S.GOOD and r.data == bytes.fromhex("00000008")
    luns.add_nexus(NEXUS)
    assert sense_of(luns.execute(NEXUS, 3, bytes(6), None, 0)) == S.POWER_ON_RESET


def test_internal_error_becomes_hardware_error(caplog):
    class Broken(MemoryBackingStore):
        def read(self, offset, length):
            raise OSError(5, "EIO")

    lu = LogicalUnit(Broken(SIZE), LunIdentity("v"), target_name="t", settings=LunSettings())
    r = run(lu, cdb10(0x28, 0, 1))
    assert sense_of(r) == S.INTERNAL_TARGET_FAILURE


class ColdFile:
    """A file store whose page cache is always cold (``read_nowait`` None, ``write_nowait`` False) and whose
    reads take 50 ms: COMPARE AND WRITE and ORWRITE go to a worker, where two of them overlap in time."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_nowait(self, offset, length):
        return None

    def write_nowait(self, offset, data, fua=False):
        return False

    def read(self, offset, length):
        time.sleep(0.05)
        return self.inner.read(offset, length)


def test_compare_and_writes_on_workers_exclude_each_other(tmp_path):
    """Two COMPARE AND WRITEs of one block, both expecting what is stored, both on workers at once: the
    read-modify-write lock lets one of them write; the other then miscompares (VMware ATS's lock)."""
    unit = LogicalUnit(ColdFile(FileBackingStore(tmp_path / "f.img", SIZE, block_size=BS)), LunIdentity("vol-c"),
                       target_name="iqn.x:t")
    unit.add_nexus(NEXUS)
    run(unit, bytes(6))
    unit.backing.write(0, b"A" * BS, False)
    cdb = bytearray(16); cdb[0] = 0x89; cdb[13] = 1
    pending = [unit.execute_deferrable(NEXUS, bytes(cdb), b"A" * BS + b"A" * 10 + new * (BS - 10), 2 * BS)
               for new in (b"B", b"C")]
    assert all(p.blocking is not None for p in pending)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: p.blocking(), pending))
    outcomes = sorted((r.status, sense_of(r) if r.sense else None) for r in results)
    assert outcomes == [(S.GOOD, None), (S.CHECK_CONDITION, S.MISCOMPARE_DURING_VERIFY)]
    winner = b"B" if results[0].status == S.GOOD else b"C"
    assert unit.backing.inner.read(0, BS) == b"A" * 10 + winner * (BS - 10)
    loser = results[1] if results[0].status == S.GOOD else results[0]
    assert loser.sense[0] & 0x80 and int.from_bytes(loser.sense[3:7], "big") == 10  # VALID, the first difference
    unit.close()
