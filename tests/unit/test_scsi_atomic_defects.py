"""WRITE ATOMIC(16) (SBC-4 §5.48, Block Limits atomic fields) and READ DEFECT DATA(10/12) (SBC-3 §5.13-5.14)."""

from __future__ import annotations

import pytest

from node_agent.scsi import sense as S

from test_scsi_support import BS, SIZE, make_lu, run, sense_of

NBLOCKS = SIZE // BS


def atomic16(lba: int, count: int, *, byte1: int = 0, boundary: int = 0) -> bytes:
    return (bytes([0x9C, byte1]) + lba.to_bytes(8, "big") + boundary.to_bytes(2, "big")
            + count.to_bytes(2, "big") + b"\0\0")


@pytest.fixture(params=["memory", "file"])
def lu(request, tmp_path):
    unit = make_lu(request.param, tmp_path, max_atomic_transfer_bytes=1 << 20)  # opt-in, see LunSettings
    yield unit
    unit.close()


def test_block_limits_atomic_fields(lu):
    page = run(lu, bytes([0x12, 1, 0xB0, 0, 255, 0])).data
    assert len(page) == 64 and int.from_bytes(page[2:4], "big") == 0x3C
    max_atomic = int.from_bytes(page[44:48], "big")
    assert max_atomic == (1 << 20) // BS and max_atomic <= int.from_bytes(page[8:12], "big")
    assert page[48:64] == bytes(16)  # no alignment, granularity or boundary


def test_write_atomic_writes_everything(lu):
    data = bytes(range(256)) * 2 * 8
    r = run(lu, atomic16(NBLOCKS - 8, 8, byte1=0x18), data)  # DPO and FUA accepted (DPOFUA=1)
    assert r.status == S.GOOD and r.data_out_length == len(data)
    assert lu.backing.read((NBLOCKS - 8) * BS, len(data)) == data
    assert run(lu, atomic16(0, 0)).status == S.GOOD


def test_write_atomic_refusals_write_nothing(lu):
    before = lu.backing.read(0, 16 * BS)
    assert sense_of(run(lu, atomic16(NBLOCKS - 1, 2), bytes(2 * BS))) == S.LBA_OUT_OF_RANGE
    assert sense_of(run(lu, atomic16(NBLOCKS + 1, 0))) == S.LBA_OUT_OF_RANGE
    assert sense_of(run(lu, atomic16(2 ** 64 - 1, 1), bytes(BS))) == S.LBA_OUT_OF_RANGE
    too_many = lu.max_atomic_blocks + 1
    assert sense_of(run(lu, atomic16(0, too_many), bytes(too_many * BS))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, atomic16(0, 1, boundary=1), b"\xff" * BS)) == S.INVALID_FIELD_IN_CDB
    for wrprotect in range(1, 8):
        assert sense_of(run(lu, atomic16(0, 1, byte1=wrprotect << 5), b"\xff" * BS)) == S.INVALID_FIELD_IN_CDB
    r = run(lu, atomic16(0, 16), b"\xff" * (15 * BS))  # short Data-Out: no partial atomic write
    assert sense_of(r) == S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    assert lu.backing.read(0, 16 * BS) == before


def test_write_atomic_withdrawn():
    lu = make_lu("memory")  # the default: not offered
    assert sense_of(run(lu, atomic16(0, 1), bytes(BS))) == S.INVALID_COMMAND_OPERATION_CODE
    assert run(lu, bytes([0x12, 1, 0xB0, 0, 255, 0])).data[44:48] == bytes(4)


@pytest.mark.parametrize("plist,glist,fmt,out_fmt", [
    (0, 0, 0b000, 0b000), (1, 1, 0b101, 0b101), (1, 0, 0b100, 0b100), (0, 1, 0b110, 0b101), (0, 0, 0b111, 0b101),
])
def test_read_defect_data_golden_bytes(lu, plist, glist, fmt, out_fmt):
    """SBC-3 tables 60/62: the lists asked for, valid and empty, in the requested format or our default."""
    flags = plist << 4 | glist << 3 | fmt
    r10 = run(lu, bytes([0x37, 0, flags, 0, 0, 0, 0, 0, 32, 0]))
    assert r10.data == bytes([0, plist << 4 | glist << 3 | out_fmt, 0, 0])
    r12 = run(lu, bytes([0xB7, flags]) + bytes(4) + (32).to_bytes(4, "big") + b"\0\0")
    assert r12.data == bytes([0, plist << 4 | glist << 3 | out_fmt]) + bytes(6)
    assert run(lu, bytes([0x37, 0, flags, 0, 0, 0, 0, 0, 2, 0])).data == r10.data[:2]
