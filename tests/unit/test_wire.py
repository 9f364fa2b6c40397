"""The generic field codec behind every wire layout (node_agent.wire)."""

import pytest
from hypothesis import given, strategies as st

from node_agent.wire import Field, Layout, WireError, ascii_field

READ_10 = Layout("READ(10)", 10, (
    Field("opcode", 0, 0xFF), Field("dpo", 1, 0x10), Field("fua", 1, 0x08), Field("lba", 2, 0xFFFFFFFF),
    Field("group", 6, 0x1F), Field("transfer_length", 7, 0xFFFF), Field("control", 9, 0xFF),
))


def test_golden_read10():
    """SBC-3 §5.11 READ(10): opcode 28h, FUA bit 3 of byte 1, LBA bytes 2-5, length bytes 7-8."""
    data = READ_10.encode(opcode=0x28, fua=True, lba=0x12345678, transfer_length=8)
    assert bytes(data) == bytes.fromhex("28081234567800000800")
    record = READ_10.decode(data)
    assert record.fua is True and record.dpo is False and record.lba == 0x12345678
    assert READ_10.encode(record) == data


def test_short_buffer_and_overflow_are_errors():
    with pytest.raises(WireError):
        READ_10.decode(b"\x28\x00")
    with pytest.raises(WireError):
        READ_10.encode(opcode=0x28, group=0x20)


def test_overlapping_fields_are_refused():
    with pytest.raises(ValueError):
        Layout("bad", 2, (Field("a", 0, 0xFF), Field("b", 0, 0x01)))


def test_raw_fields_and_offsets():
    layout = Layout("x", 8, (Field("tag", 0, 0xFFFF), Field("name", 2, 0xFFFFFFFFFFFF, raw=True)))
    data = layout.encode(tag=7, name=b"SHOAL!")
    assert layout.decode(b"\xff" + bytes(data), 1).name == b"SHOAL!"


def test_ascii_field_pads_with_spaces():
    assert ascii_field("SHOAL", 8) == b"SHOAL   "


@given(st.binary(min_size=10, max_size=10))
def test_decode_encode_round_trip(data):
    record = READ_10.decode(data)
    assert READ_10.decode(READ_10.encode(record)) == record
