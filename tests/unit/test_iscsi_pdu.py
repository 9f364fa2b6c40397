"""iSCSI PDU layouts and digests (RFC 7143 §11, §12.1; RFC 3720 Appendix B.4)."""

import pytest
from hypothesis import given, strategies as st

from node_agent.iscsi import pdu as P
from node_agent.iscsi.pdu import Opcode

# RFC 3720 Appendix B.4: "An iSCSI - SCSI Read (10) Command PDU" and its CRC32C.
READ10_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)


@pytest.mark.parametrize("data, digest", [
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
    (bytes(range(31, -1, -1)), "5cdb3f11"),
    (READ10_PDU, "563a96d9"),
])
def test_crc32c_vectors(data, digest):
    """RFC 3720 B.4 vectors, bytes in wire order (RFC 7143 §12.1 keeps the same digest)."""
    assert P.digest_bytes(data).hex() == digest


@given(st.binary(max_size=9000), st.integers(0, 31), st.integers(0, 7))
def test_digest_residue_accepts_exactly_the_right_digest(data, bit, byte):
    """Checking a received digest by the CRC of data + digest (``DIGEST_RESIDUE``, as the target and
    the initiator do) accepts the digest ``digest_bytes`` sends and refuses it with any bit flipped."""
    good = P.digest_bytes(data)
    assert P.digest_value(data + good) == P.DIGEST_RESIDUE
    bad = (int.from_bytes(good, "little") ^ (1 << bit)).to_bytes(4, "little")
    assert P.digest_value(data + bad) != P.DIGEST_RESIDUE
    if data:  # a changed data byte is caught too
        changed = bytearray(data)
        changed[byte % len(data)] ^= 1 << (bit % 8)
        assert P.digest_value(bytes(changed) + good) != P.DIGEST_RESIDUE


def test_decode_rfc_read10_command():
    opcode, header = P.decode_header(READ10_PDU)
    assert opcode == Opcode.SCSI_COMMAND
    assert header.immediate is False and header.final and header.read and not header.write
    assert header.itt == 0x14000000
    assert header.expected_data_transfer_length == 0x400
    assert header.cmdsn == 0x14 and header.expstatsn == 0x18
    assert header.cdb[:10] == bytes.fromhex("28000000000000000200")
    assert P.LAYOUTS[Opcode.SCSI_COMMAND].encode(header) == READ10_PDU


def test_every_opcode_has_a_48_byte_layout():
    assert set(P.LAYOUTS) == set(Opcode)
    for opcode, layout in P.LAYOUTS.items():
        assert layout.size == P.BHS_LENGTH
        blank = layout.encode(opcode=int(opcode))
        assert blank[0] & 0x3F == opcode


def test_login_response_golden():
    """RFC 7143 §11.13: T bit, CSG/NSG, ISID at bytes 8-13, status at 36-37."""
    header = P.encode_header(Opcode.LOGIN_RESPONSE, transit=True, csg=1, nsg=3, isid=0x400001370000, tsih=5,
                             itt=0x10, statsn=1, expcmdsn=2, maxcmdsn=33, status_class=2, status_detail=1)
    assert header[0] == 0x23 and header[1] == 0x87
    assert header[8:14] == bytes.fromhex("400001370000") and header[14:16] == b"\x00\x05"
    assert header[36:38] == b"\x02\x01"


def test_frame_length_counts_padding_and_digests():
    header = P.encode_header(Opcode.NOP_OUT, data_segment_length=5)
    assert P.frame_length(header, False, False) == 48 + 8
    assert P.frame_length(header, True, True) == 48 + 4 + 8 + 4
    pieces = P.encode_pdu(Opcode.NOP_OUT, b"hello", header_digest=True, data_digest=True, itt=1)
    assert sum(len(p) for p in pieces) == 64


def test_unknown_opcode_is_a_pdu_error():
    with pytest.raises(P.PduError):
        P.decode_header(bytes([0x1C]) + bytes(47))


@given(st.binary(min_size=48, max_size=48))
def test_fuzz_decode_header(bhs):
    """Any 48 bytes either decode to a record that re-encodes identically in its fields, or raise PduError."""
    try:
        opcode, header = P.decode_header(bhs)
    except P.PduError:
        return
    again = P.LAYOUTS[opcode].decode(P.LAYOUTS[opcode].encode(header))
    assert again == header


def test_fast_encoders_agree_with_the_layouts():
    """The struct-packed hot-path headers are byte-identical to the field-table encoding."""
    lun = bytes([0, 3]) + bytes(6)
    assert P.pack_data_in(0x80 | 0x02 | 0x01, 0, 4096, lun, 7, 0xFFFFFFFF, 9, 10, 41, 2, 8192, 512) == bytes(
        P.encode_header(Opcode.DATA_IN, final=True, underflow=True, status_present=True, status=0,
                        data_segment_length=4096, lun=lun, itt=7, ttt=0xFFFFFFFF, statsn=9, expcmdsn=10,
                        maxcmdsn=41, datasn=2, buffer_offset=8192, residual_count=512))
    assert P.pack_scsi_response(0x80 | 0x04, 0, 2, 20, 7, 9, 10, 41, 3, 100) == bytes(
        P.encode_header(Opcode.SCSI_RESPONSE, final=True, overflow=True, response=0, status=2,
                        data_segment_length=20, itt=7, statsn=9, expcmdsn=10, maxcmdsn=41, expdatasn=3,
                        residual_count=100))
    assert P.pack_r2t(lun, 7, 5, 9, 10, 41, 1, 262144, 65536) == bytes(
        P.encode_header(Opcode.R2T, final=True, lun=lun, itt=7, ttt=5, statsn=9, expcmdsn=10, maxcmdsn=41,
                        r2tsn=1, buffer_offset=262144, desired_data_transfer_length=65536))


def test_fast_scsi_command_encoder_agrees_with_the_layout():
    lun = bytes([0, 2]) + bytes(6)
    cdb = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]).ljust(16, b"\0")
    assert P.pack_scsi_command(0x80 | 0x40 | 1, 0, lun, 9, 4096, 77, 78, cdb) == P.encode_header(
        Opcode.SCSI_COMMAND, final=True, read=True, attr=1, lun=lun, itt=9,
        expected_data_transfer_length=4096, cmdsn=77, expstatsn=78, cdb=cdb)
