"""iSCSI PDU layouts and framing (RFC 7143 §11).

Each opcode's 48-byte Basic Header Segment is one ``Layout`` (a table of
fields, see ``node_agent.wire``).  ``Pdu`` is a decoded PDU: the opcode's
header record, its AHS bytes and its data segment.  ``frame_length`` tells how
many bytes a whole PDU occupies on the wire given the negotiated digests, so
the connection core can wait for complete PDUs while being fed any number of
bytes at a time.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from node_agent.wire import Field, Layout, WireError

BHS_LENGTH = 48
DIGEST_LENGTH = 4
RESERVED_TAG = 0xFFFFFFFF
MAX_DATA_SEGMENT = 0xFFFFFF  # 24-bit DataSegmentLength


class Opcode(enum.IntEnum):
    """RFC 7143 §11.2.1.2."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(op for op in Opcode if op < 0x20)


class RejectReason(enum.IntEnum):
    """RFC 7143 §11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(enum.IntEnum):
    """RFC 7143 §11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """RFC 7143 §11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


# Fields every BHS shares (RFC 7143 §11.2.1).
def _common(*, immediate: bool = True) -> tuple[Field, ...]:
    fields = [Field("opcode", 0, 0x3F), Field("total_ahs_length", 4, 0xFF), Field("data_segment_length", 5, 0xFFFFFF)]
    if immediate:
        fields.append(Field("immediate", 0, 0x40))
    return tuple(fields)


def _bhs(name: str, *fields: Field, immediate: bool = True) -> Layout:
    return Layout(name, BHS_LENGTH, _common(immediate=immediate) + fields)


_F = Field("final", 1, 0x80)
_LUN = Field("lun", 8, 0xFFFFFFFFFFFFFFFF, raw=True)
_ITT = Field("itt", 16, 0xFFFFFFFF)
_TTT = Field("ttt", 20, 0xFFFFFFFF)
_STAT_SN = Field("statsn", 24, 0xFFFFFFFF)
_EXP_CMD_SN = Field("expcmdsn", 28, 0xFFFFFFFF)
_MAX_CMD_SN = Field("maxcmdsn", 32, 0xFFFFFFFF)
_CMD_SN = Field("cmdsn", 24, 0xFFFFFFFF)
_EXP_STAT_SN = Field("expstatsn", 28, 0xFFFFFFFF)

LAYOUTS: dict[Opcode, Layout] = {
    # §11.18
    Opcode.NOP_OUT: _bhs("NOP-Out", _F, _LUN, _ITT, _TTT, _CMD_SN, _EXP_STAT_SN),
    # §11.3
    Opcode.SCSI_COMMAND: _bhs(
        "SCSI Command", _F, Field("read", 1, 0x40), Field("write", 1, 0x20), Field("attr", 1, 0x07),
        _LUN, _ITT, Field("expected_data_transfer_length", 20, 0xFFFFFFFF), _CMD_SN, _EXP_STAT_SN,
        Field("cdb", 32, (1 << 128) - 1, raw=True),
    ),
    # §11.5
    Opcode.TASK_MGMT_REQUEST: _bhs(
        "Task Management Function Request", _F, Field("function", 1, 0x7F), _LUN, _ITT,
        Field("referenced_task_tag", 20, 0xFFFFFFFF), _CMD_SN, _EXP_STAT_SN,
        Field("refcmdsn", 32, 0xFFFFFFFF), Field("expdatasn", 36, 0xFFFFFFFF),
    ),
    # §11.12
    Opcode.LOGIN_REQUEST: _bhs(
        "Login Request", Field("transit", 1, 0x80), Field("cont", 1, 0x40), Field("csg", 1, 0x0C),
        Field("nsg", 1, 0x03), Field("version_max", 2, 0xFF), Field("version_min", 3, 0xFF),
        Field("isid", 8, 0xFFFFFFFFFFFF), Field("tsih", 14, 0xFFFF), _ITT, Field("cid", 20, 0xFFFF),
        _CMD_SN, _EXP_STAT_SN,
    ),
    # §11.10
    Opcode.TEXT_REQUEST: _bhs("Text Request", _F, Field("cont", 1, 0x40), _LUN, _ITT, _TTT, _CMD_SN, _EXP_STAT_SN),
    # §11.7
    Opcode.DATA_OUT: _bhs(
        "SCSI Data-Out", _F, _LUN, _ITT, _TTT, _EXP_STAT_SN, Field("datasn", 36, 0xFFFFFFFF),
        Field("buffer_offset", 40, 0xFFFFFFFF), immediate=False,
    ),
    # §11.14
    Opcode.LOGOUT_REQUEST: _bhs(
        "Logout Request", _F, Field("reason", 1, 0x7F), _ITT, Field("cid", 20, 0xFFFF), _CMD_SN, _EXP_STAT_SN,
    ),
    # §11.16
    Opcode.SNACK_REQUEST: _bhs(
        "SNACK Request", _F, Field("type", 1, 0x0F), _LUN, _ITT, _TTT, _EXP_STAT_SN,
        Field("begrun", 40, 0xFFFFFFFF), Field("runlength", 44, 0xFFFFFFFF), immediate=False,
    ),
    # §11.19
    Opcode.NOP_IN: _bhs("NOP-In", _F, _LUN, _ITT, _TTT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN, immediate=False),
    # §11.4
    Opcode.SCSI_RESPONSE: _bhs(
        "SCSI Response", _F, Field("bidi_overflow", 1, 0x10), Field("bidi_underflow", 1, 0x08),
        Field("overflow", 1, 0x04), Field("underflow", 1, 0x02), Field("response", 2, 0xFF),
        Field("status", 3, 0xFF), _ITT, Field("snack_tag", 20, 0xFFFFFFFF), _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("expdatasn", 36, 0xFFFFFFFF), Field("bidi_residual_count", 40, 0xFFFFFFFF),
        Field("residual_count", 44, 0xFFFFFFFF), immediate=False,
    ),
    # §11.6
    Opcode.TASK_MGMT_RESPONSE: _bhs(
        "Task Management Function Response", _F, Field("response", 2, 0xFF), _ITT, _STAT_SN, _EXP_CMD_SN,
        _MAX_CMD_SN, immediate=False,
    ),
    # §11.13
    Opcode.LOGIN_RESPONSE: _bhs(
        "Login Response", Field("transit", 1, 0x80), Field("cont", 1, 0x40), Field("csg", 1, 0x0C),
        Field("nsg", 1, 0x03), Field("version_max", 2, 0xFF), Field("version_active", 3, 0xFF),
        Field("isid", 8, 0xFFFFFFFFFFFF), Field("tsih", 14, 0xFFFF), _ITT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("status_class", 36, 0xFF), Field("status_detail", 37, 0xFF), immediate=False,
    ),
    # §11.11
    Opcode.TEXT_RESPONSE: _bhs(
        "Text Response", _F, Field("cont", 1, 0x40), _LUN, _ITT, _TTT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        immediate=False,
    ),
    # §11.7
    Opcode.DATA_IN: _bhs(
        "SCSI Data-In", _F, Field("ack", 1, 0x40), Field("overflow", 1, 0x04), Field("underflow", 1, 0x02),
        Field("status_present", 1, 0x01), Field("status", 3, 0xFF), _LUN, _ITT, _TTT, _STAT_SN, _EXP_CMD_SN,
        _MAX_CMD_SN, Field("datasn", 36, 0xFFFFFFFF), Field("buffer_offset", 40, 0xFFFFFFFF),
        Field("residual_count", 44, 0xFFFFFFFF), immediate=False,
    ),
    # §11.15
    Opcode.LOGOUT_RESPONSE: _bhs(
        "Logout Response", _F, Field("response", 2, 0xFF), _ITT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("time2wait", 40, 0xFFFF), Field("time2retain", 42, 0xFFFF), immediate=False,
    ),
    # §11.8
    Opcode.R2T: _bhs(
        "Ready To Transfer", _F, _LUN, _ITT, _TTT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("r2tsn", 36, 0xFFFFFFFF), Field("buffer_offset", 40, 0xFFFFFFFF),
        Field("desired_data_transfer_length", 44, 0xFFFFFFFF), immediate=False,
    ),
    # §11.9
    Opcode.ASYNC_MESSAGE: _bhs(
        "Asynchronous Message", _F, _LUN, _ITT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("async_event", 36, 0xFF), Field("async_vcode", 37, 0xFF), Field("parameter1", 38, 0xFFFF),
        Field("parameter2", 40, 0xFFFF), Field("parameter3", 42, 0xFFFF), immediate=False,
    ),
    # §11.17
    Opcode.REJECT: _bhs(
        "Reject", _F, Field("reason", 2, 0xFF), _ITT, _STAT_SN, _EXP_CMD_SN, _MAX_CMD_SN,
        Field("datasn", 36, 0xFFFFFFFF), immediate=False,
    ),
}


class PduError(ValueError):
    """A PDU that cannot be framed or decoded."""


@dataclass(slots=True)
class Pdu:
    """One decoded PDU: ``header`` is the opcode's layout record."""

    opcode: int
    header: Any
    ahs: bytes = b""
    data: bytes | bytearray | memoryview = b""
    raw_bhs: bytes = b""  # the 48 header bytes as received (Reject quotes them)


def pad4(n: int) -> int:
    return (n + 3) & ~3


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C as iSCSI digests use it (RFC 7143 §12.1; RFC 3720 Appendix B.4 vectors)."""
    return _crc32c.crc32c(data)


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The 4 digest bytes as sent on the wire (least significant byte first)."""
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value.to_bytes(4, "little")


_LE32 = struct.Struct("<I")
digest_value = _crc32c.crc32c
"""CRC32C of one buffer as an int (hot path): ``pack_digest`` makes it the bytes sent; a received digest is
checked against ``DIGEST_RESIDUE``."""
pack_digest = _LE32.pack
"""``pack_digest(value)``: the 4 digest bytes of a ``digest_value`` as sent (least significant byte first)."""
DIGEST_RESIDUE = 0x48674BC7
"""``digest_value`` of bytes followed by their own digest as sent: checking a received digest takes one
call, ``digest_value(view[start:digest_end]) == DIGEST_RESIDUE`` (the CRC residue of CRC32C)."""


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """``digest_bytes`` of one buffer, without the loop (the hot path: one per PDU header)."""
    return _LE32.pack(_crc32c.crc32c(data))


def bhs_lengths(bhs: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(AHS bytes, DataSegmentLength) of a raw BHS."""
    return bhs[4] * 4, int.from_bytes(bhs[5:8], "big")


def frame_length(bhs, header_digest: bool, data_digest: bool) -> int:
    """Bytes the whole PDU whose BHS is ``bhs`` occupies on the wire."""
    ahs, dsl = bhs_lengths(bhs)
    total = BHS_LENGTH + ahs + pad4(dsl)
    if header_digest:
        total += DIGEST_LENGTH
    if data_digest and dsl:
        total += DIGEST_LENGTH
    return total


def decode_header(bhs) -> tuple[int, Any]:
    """Decode a BHS with its opcode's layout; unknown opcodes raise ``PduError``."""
    opcode = bhs[0] & 0x3F
    layout = LAYOUTS.get(opcode)  # type: ignore[call-overload]
    if layout is None:
        raise PduError(f"unknown opcode {opcode:#04x}")
    try:
        return opcode, layout.decode(bhs)
    except WireError as exc:
        raise PduError(str(exc)) from exc


def encode_header(opcode: Opcode, **values: Any) -> bytearray:
    """The 48 header bytes of ``opcode`` with the given field values."""
    return LAYOUTS[opcode].encode(opcode=int(opcode), **values)


def encode_pdu(
    opcode: Opcode,
    data: bytes | bytearray | memoryview = b"",
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    **values: Any,
) -> list[bytes | bytearray | memoryview]:
    """A complete PDU as a list of buffers (header, digest, data, padding, digest).

    Returned as pieces so the transport can send them with one ``sendmsg``
    without joining a large data segment into a new buffer.
    """
    header = encode_header(opcode, data_segment_length=len(data), **values)
    return frame(header, data, header_digest=header_digest, data_digest=data_digest)


def frame(header, data=b"", *, header_digest: bool, data_digest: bool) -> list:
    """Buffers of a PDU whose header is already encoded."""
    pieces: list = [header]
    if header_digest:
        pieces.append(digest_bytes(header))
    if data:
        pieces.append(data)
        padding = pad4(len(data)) - len(data)
        if padding:
            pieces.append(bytes(padding))
        if data_digest:
            pieces.append(digest_bytes(data, bytes(padding)) if padding else digest_bytes(data))
    return pieces


# -- Fast encoders for the per-I/O target PDUs ---------------------------------------------
# Data-In, SCSI Response and R2T are built once per I/O, so they are packed with
# one precompiled struct instead of the generic field encoder.  They share one
# shape: four single bytes, TotalAHSLength+DataSegmentLength, an 8-byte LUN (or
# reserved) field and eight 32-bit words.  tests/unit/test_iscsi_pdu.py checks
# each against its LAYOUTS entry, which stays the definition.
_HOT = struct.Struct(">BBBBI8sIIIIIIII")
_ZERO8 = bytes(8)
_DATA_IN, _SCSI_RESPONSE, _R2T = int(Opcode.DATA_IN), int(Opcode.SCSI_RESPONSE), int(Opcode.R2T)


pack_hot = _HOT.pack
"""``pack_hot(opcode, flags, byte 2, byte 3, DataSegmentLength, LUN, ITT, eight 32-bit words)``: what the
three functions below fill in, for a hot path that saves their call (the target's answer to a write)."""


def pack_data_in(flags: int, status: int, dsl: int, lun: bytes, itt: int, ttt: int, statsn: int,
                 expcmdsn: int, maxcmdsn: int, datasn: int, buffer_offset: int, residual: int) -> bytes:
    """SCSI Data-In BHS (§11.7); ``flags`` = F 0x80, O 0x04, U 0x02, S 0x01."""
    return _HOT.pack(_DATA_IN, flags, 0, status, dsl, lun, itt, ttt, statsn, expcmdsn, maxcmdsn,
                     datasn, buffer_offset, residual)


def pack_scsi_response(flags: int, response: int, status: int, dsl: int, itt: int, statsn: int,
                       expcmdsn: int, maxcmdsn: int, expdatasn: int, residual: int) -> bytes:
    """SCSI Response BHS (§11.4); ``flags`` = 0x80 | o 0x10 | u 0x08 | O 0x04 | U 0x02."""
    return _HOT.pack(_SCSI_RESPONSE, flags, response, status, dsl, _ZERO8, itt, 0, statsn, expcmdsn,
                     maxcmdsn, expdatasn, 0, residual)


def pack_r2t(lun: bytes, itt: int, ttt: int, statsn: int, expcmdsn: int, maxcmdsn: int, r2tsn: int,
             buffer_offset: int, length: int) -> bytes:
    """Ready To Transfer BHS (§11.8)."""
    return _HOT.pack(_R2T, 0x80, 0, 0, 0, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn,
                     buffer_offset, length)


_COMMAND = struct.Struct(">BBHI8sIIII16s")


def pack_scsi_command(flags: int, dsl: int, lun: bytes, itt: int, edtl: int, cmdsn: int, expstatsn: int,
                      cdb: bytes) -> bytearray:
    """SCSI Command BHS (§11.3); ``flags`` = F 0x80, R 0x40, W 0x20, ATTR 0x07 (mutable: the PDU hook may edit)."""
    return bytearray(_COMMAND.pack(Opcode.SCSI_COMMAND, flags, 0, dsl, lun, itt, edtl, cmdsn, expstatsn, cdb))
