"""Golden bytes and round trips for every SCSI layout; the opcode table against the standards."""

from __future__ import annotations

import pytest

from node_agent.scsi import cdb as C
from node_agent.scsi import commands, modepages, sense, vpd
from node_agent.scsi.commands import ALL_COMMANDS, COMMANDS_BY_OPCODE
from node_agent.scsi.lun import NO_LUN, decode_lun, encode_lun
from node_agent.wire import Layout


def _layouts():
    seen = {}
    for module in (C, commands, modepages, sense, vpd):
        for name, value in vars(module).items():
            if isinstance(value, Layout):
                seen[value.name] = value
    return sorted(seen.values(), key=lambda l: l.name)


LAYOUTS = _layouts()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_round_trip_every_layout(layout):
    """decode(encode(x)) == x with every field at its maximum, and with alternating values."""
    for pick in (lambda f: f.mask >> f.shift, lambda f: (f.mask >> f.shift) // 3):
        values = {}
        for f in layout.fields:
            if f.raw:
                values[f.name] = bytes((i * 37 + 1) & 0xFF for i in range(f.width))
            elif f.is_flag:
                values[f.name] = bool(pick(f))
            else:
                values[f.name] = pick(f)
        record = layout.make(**values)
        assert layout.decode(layout.encode(record)) == record


# Opcodes from SPC-4 Annex D.3.1 / SBC-3 table 19 (name -> opcode or (opcode, service action)).
STANDARD_OPCODES = {
    "TEST UNIT READY": 0x00, "REQUEST SENSE": 0x03, "READ(6)": 0x08, "WRITE(6)": 0x0A, "INQUIRY": 0x12,
    "MODE SELECT(6)": 0x15, "MODE SENSE(6)": 0x1A, "START STOP UNIT": 0x1B,
    "PREVENT ALLOW MEDIUM REMOVAL": 0x1E, "READ CAPACITY(10)": 0x25, "READ(10)": 0x28, "WRITE(10)": 0x2A,
    "WRITE AND VERIFY(10)": 0x2E, "VERIFY(10)": 0x2F, "PRE-FETCH(10)": 0x34, "SYNCHRONIZE CACHE(10)": 0x35,
    "WRITE SAME(10)": 0x41, "UNMAP": 0x42, "MODE SELECT(10)": 0x55, "MODE SENSE(10)": 0x5A,
    "READ(16)": 0x88, "COMPARE AND WRITE": 0x89, "WRITE(16)": 0x8A, "ORWRITE(16)": 0x8B,
    "WRITE AND VERIFY(16)": 0x8E, "VERIFY(16)": 0x8F, "PRE-FETCH(16)": 0x90, "SYNCHRONIZE CACHE(16)": 0x91,
    "WRITE SAME(16)": 0x93, "READ CAPACITY(16)": (0x9E, 0x10), "GET LBA STATUS": (0x9E, 0x12),
    "REPORT LUNS": 0xA0, "REPORT SUPPORTED OPERATION CODES": (0xA3, 0x0C), "READ(12)": 0xA8,
    "WRITE(12)": 0xAA, "WRITE AND VERIFY(12)": 0xAE, "VERIFY(12)": 0xAF,
    "RESERVE(6)": 0x16, "RELEASE(6)": 0x17, "RESERVE(10)": 0x56, "RELEASE(10)": 0x57,  # SPC-2 table D.1
    "READ DEFECT DATA(10)": 0x37, "READ DEFECT DATA(12)": 0xB7, "WRITE ATOMIC(16)": 0x9C,  # SBC-4 table 35
}
# Service actions of PERSISTENT RESERVE IN (SPC-4 table 170) and OUT (table 200).
STANDARD_SERVICE_ACTIONS = {
    "PERSISTENT RESERVE IN": (0x5E, {0x00, 0x01, 0x02, 0x03}),
    "PERSISTENT RESERVE OUT": (0x5F, {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06}),
    "SANITIZE": (0x48, {0x01, 0x02, 0x1F}),  # SBC-4 table 33: OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE
    "EXTENDED COPY(LID1)": (0x83, {0x00}),
    "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS": (0xA3, {0x0D}),  # SPC-4 table 343 (MAINTENANCE IN)  # SPC-4 table 122 (THIRD-PARTY COPY OUT)
    "RECEIVE COPY RESULTS": (0x84, {0x00, 0x03, 0x04}),  # SPC-4 table 218 (THIRD-PARTY COPY IN)
}


def test_opcode_table_matches_the_standard():
    table = {c.name: (c.opcode if c.service_action is None else (c.opcode, c.service_action)) for c in ALL_COMMANDS
             if c.name not in STANDARD_SERVICE_ACTIONS}
    assert table == STANDARD_OPCODES
    for name, (opcode, actions) in STANDARD_SERVICE_ACTIONS.items():
        rows = [c for c in ALL_COMMANDS if c.name == name]
        assert {c.opcode for c in rows} == {opcode} and {c.service_action for c in rows} == actions


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=lambda c: c.name)
def test_cdb_length_matches_the_group_code(cmd):
    """SPC-4 §4.2.5.1: the group code (top 3 bits of the opcode) fixes the CDB length."""
    expected = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[cmd.opcode >> 5]
    assert cmd.layout.size == expected
    assert cmd.layout.fields[0].name == "opcode" and cmd.layout.fields[-1].name == "control"


def test_service_action_opcodes_are_indexed_by_service_action():
    assert set(COMMANDS_BY_OPCODE[0x9E]) == {0x10, 0x12}
    assert set(COMMANDS_BY_OPCODE[0xA3]) == {0x0C, 0x0D}


def test_golden_read10():
    """SBC-3 §5.8 table 47: READ(10) with FUA, LBA 12345678h, 256 blocks."""
    raw = bytes.fromhex("28 08 12345678 00 0100 00")
    rec = C.READ_10.decode(raw)
    assert (rec.opcode, rec.fua, rec.dpo, rec.lba, rec.transfer_length) == (0x28, True, False, 0x12345678, 256)
    assert C.READ_10.encode(rec) == raw


def test_golden_write16_and_read6():
    raw = bytes.fromhex("8a 18 0000000123456789 00000010 00 00")
    rec = C.WRITE_16.decode(raw)
    assert (rec.dpo, rec.fua, rec.lba, rec.transfer_length) == (True, True, 0x123456789, 16)
    assert C.READ_6.decode(bytes.fromhex("08 1f ffff 00 00")).lba == 0x1FFFFF


def test_golden_fixed_sense_with_field_pointer():
    """SPC-4 §4.5.3 + §4.5.2.4.2: ILLEGAL REQUEST 24/00, C/D=1, BPV=1 bit 4, byte 1."""
    data = sense.build_sense(sense.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
    assert data == bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 cc 0001")


def test_golden_descriptor_sense_with_information():
    data = sense.build_sense(sense.MISCOMPARE_DURING_VERIFY, descriptor=True, info=0x1234)
    assert data == bytes.fromhex("72 0e 1d 00 000000 0c" "00 0a 80 00 0000000000001234")
    assert sense.parse_sense(data) == sense.MISCOMPARE_DURING_VERIFY


def test_golden_fixed_sense_information_valid():
    data = sense.build_sense(sense.MISCOMPARE_DURING_VERIFY, info=7)
    assert data[0] == 0xF0 and data[3:7] == bytes.fromhex("00000007")


def test_golden_read_capacity16_data():
    raw = C.READ_CAPACITY_16_DATA.encode(returned_lba=0x1FFFF, block_length=512, lbpme=True, lbprz=True)
    assert raw == bytes.fromhex("000000000001ffff 00000200 00 00 c000") + bytes(16)


def test_golden_caching_page_defaults():
    page = modepages.PAGES_BY_CODE[0x08]
    assert modepages.ModeState().page_bytes(page, modepages.PC_CURRENT) == bytes.fromhex("0812 04") + bytes(17)
    assert page.changeable_bytes() == bytes.fromhex("0812 04") + bytes(17)


def test_golden_control_page_changeable_is_d_sense_and_swp():
    page = modepages.PAGES_BY_CODE[0x0A]
    assert page.changeable_bytes() == bytes.fromhex("0a0a 04 00 08") + bytes(7)


def test_golden_designation_descriptor_naa():
    ident = vpd.LunIdentity("vol-1")
    body = vpd.device_identification(ident, "iqn.t", "iqn.t,t,0x0001", 1)
    assert body[:4] == bytes.fromhex("01 03 00 10") and body[4] >> 4 == 0x6
    assert body[4:20] == ident.naa


def test_naa_is_stable_and_distinct():
    assert vpd.naa_for("a") == vpd.naa_for("a") != vpd.naa_for("b")
    assert vpd.naa_for("a")[0] >> 4 == 6


@pytest.mark.parametrize("lun, field", [
    (0, "0000000000000000"), (5, "0005000000000000"), (255, "00ff000000000000"),
    (256, "4100000000000000"), (16383, "7fff000000000000"),
])
def test_lun_encoding(lun, field):
    """SAM-5 §4.7.7: peripheral device addressing below 256, flat space addressing above."""
    assert encode_lun(lun).hex() == field
    assert decode_lun(bytes.fromhex(field)) == lun


def test_lun_decoding_rejects_other_methods():
    assert decode_lun(bytes.fromhex("0100000000000000")) == NO_LUN  # bus identifier 1
    assert decode_lun(bytes.fromhex("0001000100000000")) == NO_LUN  # second level
    assert decode_lun(bytes.fromhex("c000000000000000")) == NO_LUN  # extended addressing
    with pytest.raises(ValueError):
        encode_lun(16384)


def test_reserved_bits_derived_from_layout():
    read10 = COMMANDS_BY_OPCODE[0x28]
    assert dict(read10.reserved) == {1: 0x01, 6: 0xE0, 9: commands.CONTROL_RESERVED}


def test_usage_data_for_service_action_command():
    rc16 = COMMANDS_BY_OPCODE[0x9E][0x10]
    usage = rc16.usage_data()
    assert usage[0] == 0x9E and usage[1] == 0x10 and usage[14] == 0x01 and len(usage) == 16
