"""Sense data (SPC-4 §4.5): named sense codes, ``CheckCondition`` and the two formats.

Handlers raise ``CheckCondition(INVALID_FIELD_IN_CDB, field_pointer=2)``; the
dispatcher in ``device.py`` turns it into CHECK CONDITION status and sense
bytes, fixed format (response code 70h, §4.5.3) or descriptor format (72h,
§4.5.2) as the control mode page's D_SENSE bit says.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from node_agent.wire import Field, Layout

# -- status codes (SAM-5 §5.3.1) ---------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
ACA_ACTIVE = 0x30
TASK_ABORTED = 0x40

# -- sense keys (SPC-4 table 45) ---------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
COPY_ABORTED = 0xA
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE


class SenseCode(NamedTuple):
    """A sense key with its additional sense code and qualifier (SPC-4 table 47)."""

    key: int
    asc: int
    ascq: int


NO_ADDITIONAL_SENSE = SenseCode(NO_SENSE, 0x00, 0x00)
LOGICAL_UNIT_NOT_READY_INIT_REQUIRED = SenseCode(NOT_READY, 0x04, 0x02)
MEDIUM_NOT_PRESENT = SenseCode(NOT_READY, 0x3A, 0x00)
SANITIZE_IN_PROGRESS = SenseCode(NOT_READY, 0x04, 0x1B)
SANITIZE_COMMAND_FAILED = SenseCode(MEDIUM_ERROR, 0x31, 0x03)  # the medium after a failed sanitize (SBC-4)
WRITE_ERROR = SenseCode(MEDIUM_ERROR, 0x0C, 0x00)
UNRECOVERED_READ_ERROR = SenseCode(MEDIUM_ERROR, 0x11, 0x00)
INTERNAL_TARGET_FAILURE = SenseCode(HARDWARE_ERROR, 0x44, 0x00)
OPERATION_IN_PROGRESS = SenseCode(ILLEGAL_REQUEST, 0x00, 0x16)
PARAMETER_LIST_LENGTH_ERROR = SenseCode(ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = SenseCode(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = SenseCode(ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = SenseCode(ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = SenseCode(ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = SenseCode(ILLEGAL_REQUEST, 0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = SenseCode(ILLEGAL_REQUEST, 0x26, 0x04)
TOO_MANY_TARGET_DESCRIPTORS = SenseCode(ILLEGAL_REQUEST, 0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = SenseCode(ILLEGAL_REQUEST, 0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = SenseCode(ILLEGAL_REQUEST, 0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = SenseCode(ILLEGAL_REQUEST, 0x26, 0x09)
SAVING_PARAMETERS_NOT_SUPPORTED = SenseCode(ILLEGAL_REQUEST, 0x39, 0x00)
INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = SenseCode(ILLEGAL_REQUEST, 0x0E, 0x03)
MEDIUM_REMOVAL_PREVENTED = SenseCode(ILLEGAL_REQUEST, 0x53, 0x02)
POWER_ON_RESET = SenseCode(UNIT_ATTENTION, 0x29, 0x00)
POWER_ON_OCCURRED = SenseCode(UNIT_ATTENTION, 0x29, 0x01)
BUS_DEVICE_RESET_FUNCTION_OCCURRED = SenseCode(UNIT_ATTENTION, 0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED = SenseCode(UNIT_ATTENTION, 0x29, 0x07)
MODE_PARAMETERS_CHANGED = SenseCode(UNIT_ATTENTION, 0x2A, 0x01)
RESERVATIONS_PREEMPTED = SenseCode(UNIT_ATTENTION, 0x2A, 0x03)
RESERVATIONS_RELEASED = SenseCode(UNIT_ATTENTION, 0x2A, 0x04)
REGISTRATIONS_PREEMPTED = SenseCode(UNIT_ATTENTION, 0x2A, 0x05)
CAPACITY_DATA_HAS_CHANGED = SenseCode(UNIT_ATTENTION, 0x2A, 0x09)
REPORTED_LUNS_DATA_HAS_CHANGED = SenseCode(UNIT_ATTENTION, 0x3F, 0x0E)
WRITE_PROTECTED = SenseCode(DATA_PROTECT, 0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = SenseCode(DATA_PROTECT, 0x27, 0x02)
# SBC-3 §4.7.3.7: a write the logical unit has no room for. Linux's scsi_check_sense turns it into ENOSPC (a
# full filesystem to the guest, not EIO) and VMware pauses the VM until space is freed.
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = SenseCode(DATA_PROTECT, 0x27, 0x07)
# iSCSI conditions that end a write whose Data-Out went wrong (RFC 7143 §11.4.7.2; ASC/ASCQ names from SPC-4)
UNEXPECTED_UNSOLICITED_DATA = SenseCode(ABORTED_COMMAND, 0x0C, 0x0C)  # WRITE ERROR - UNEXPECTED UNSOLICITED DATA
INCORRECT_AMOUNT_OF_DATA = SenseCode(ABORTED_COMMAND, 0x0C, 0x0D)  # WRITE ERROR - NOT ENOUGH UNSOLICITED DATA
PROTOCOL_SERVICE_CRC_ERROR = SenseCode(ABORTED_COMMAND, 0x47, 0x05)
DATA_PHASE_ERROR = SenseCode(ABORTED_COMMAND, 0x4B, 0x00)  # a Data-Out PDU out of its sequence (§13.18, §13.19)
COPY_TARGET_DEVICE_NOT_REACHABLE = SenseCode(COPY_ABORTED, 0x0D, 0x02)
COPY_ABORTED_NO_ADDITIONAL_SENSE = SenseCode(COPY_ABORTED, 0x00, 0x00)
MISCOMPARE_DURING_VERIFY = SenseCode(MISCOMPARE, 0x1D, 0x00)


class CheckCondition(Exception):
    """Raised by a handler: the command ends with CHECK CONDITION and this sense.

    ``CheckCondition(INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=1)`` or
    ``CheckCondition(key, asc, ascq)``.  ``field_pointer`` fills the
    sense-key specific field (SPC-4 §4.5.2.4.2): the byte of the CDB
    (``in_cdb=True``, C/D=1) or of the parameter list (C/D=0) that is wrong.
    ``info`` fills the INFORMATION field (e.g. the miscompare offset).
    """

    def __init__(self, key, asc: int | None = None, ascq: int | None = None, *, info: int | None = None,
                 field_pointer: int | None = None, bit_pointer: int | None = None, in_cdb: bool = True):
        if isinstance(key, SenseCode):
            code = key
        else:
            code = SenseCode(key, asc or 0, ascq or 0)
        super().__init__(code)
        self.code = code
        self.info = info
        self.field_pointer = field_pointer
        self.bit_pointer = bit_pointer
        self.in_cdb = in_cdb

    def sense(self, descriptor: bool = False) -> bytes:
        return build_sense(self.code, descriptor=descriptor, info=self.info, field_pointer=self.field_pointer,
                           bit_pointer=self.bit_pointer, in_cdb=self.in_cdb)


# -- layouts --------------------------------------------------------------------
FIXED_SENSE = Layout("fixed format sense data", 18, (  # SPC-4 §4.5.3 table 48
    Field("valid", 0, 0x80),
    Field("response_code", 0, 0x7F),
    Field("filemark", 2, 0x80),
    Field("eom", 2, 0x40),
    Field("ili", 2, 0x20),
    Field("sense_key", 2, 0x0F),
    Field("information", 3, 0xFFFFFFFF),
    Field("additional_sense_length", 7, 0xFF),
    Field("command_specific_information", 8, 0xFFFFFFFF),
    Field("asc", 12, 0xFF),
    Field("ascq", 13, 0xFF),
    Field("fru_code", 14, 0xFF),
    Field("sksv", 15, 0x80),
    Field("sense_key_specific", 15, 0x7FFFFF),
))

DESCRIPTOR_SENSE = Layout("descriptor format sense data", 8, (  # SPC-4 §4.5.2.1 table 25
    Field("response_code", 0, 0x7F),
    Field("sense_key", 1, 0x0F),
    Field("asc", 2, 0xFF),
    Field("ascq", 3, 0xFF),
    Field("sdat_ovfl", 4, 0x80),
    Field("additional_sense_length", 7, 0xFF),
))

INFORMATION_DESCRIPTOR = Layout("information sense data descriptor", 12, (  # SPC-4 §4.5.2.2
    Field("descriptor_type", 0, 0xFF),
    Field("additional_length", 1, 0xFF),
    Field("valid", 2, 0x80),
    Field("information", 4, 0xFFFFFFFFFFFFFFFF),
))

SENSE_KEY_SPECIFIC_DESCRIPTOR = Layout("sense key specific sense data descriptor", 8, (  # SPC-4 §4.5.2.3
    Field("descriptor_type", 0, 0xFF),
    Field("additional_length", 1, 0xFF),
    Field("sksv", 4, 0x80),
    Field("sense_key_specific", 4, 0x7FFFFF),
))

FIELD_POINTER = Layout("field pointer sense key specific data", 3, (  # SPC-4 §4.5.2.4.2 table 31
    Field("sksv", 0, 0x80),
    Field("cd", 0, 0x40),
    Field("bpv", 0, 0x08),
    Field("bit_pointer", 0, 0x07),
    Field("field_pointer", 1, 0xFFFF),
))

FIXED_CURRENT = 0x70
DESCRIPTOR_CURRENT = 0x72


def _sense_key_specific(field_pointer, bit_pointer, in_cdb) -> int | None:
    if field_pointer is None:
        return None
    raw = FIELD_POINTER.encode(sksv=True, cd=in_cdb, bpv=bit_pointer is not None,
                               bit_pointer=bit_pointer or 0, field_pointer=field_pointer & 0xFFFF)
    return int.from_bytes(raw, "big") & 0x7FFFFF


def build_sense(code: SenseCode, *, descriptor: bool = False, info: int | None = None,
                field_pointer: int | None = None, bit_pointer: int | None = None, in_cdb: bool = True) -> bytes:
    """Sense data bytes for ``code``, fixed (70h) or descriptor (72h) format."""
    sks = _sense_key_specific(field_pointer, bit_pointer, in_cdb)
    if not descriptor:
        return bytes(FIXED_SENSE.encode(
            valid=info is not None and info <= 0xFFFFFFFF, response_code=FIXED_CURRENT, sense_key=code.key,
            information=(info or 0) & 0xFFFFFFFF, additional_sense_length=10, asc=code.asc, ascq=code.ascq,
            sksv=sks is not None, sense_key_specific=sks or 0))
    tail = bytearray()
    if info is not None:
        tail += INFORMATION_DESCRIPTOR.encode(descriptor_type=0x00, additional_length=0x0A, valid=True,
                                              information=info & 0xFFFFFFFFFFFFFFFF)
    if sks is not None:
        tail += SENSE_KEY_SPECIFIC_DESCRIPTOR.encode(descriptor_type=0x02, additional_length=0x06, sksv=True,
                                                     sense_key_specific=sks)
    head = DESCRIPTOR_SENSE.encode(response_code=DESCRIPTOR_CURRENT, sense_key=code.key, asc=code.asc,
                                   ascq=code.ascq, additional_sense_length=len(tail))
    return bytes(head + tail)


def parse_sense(data: bytes) -> SenseCode:
    """The sense key/ASC/ASCQ of fixed or descriptor sense data (for tests and logs)."""
    if len(data) < 4:
        raise ValueError("sense data too short")
    if data[0] & 0x7F in (0x72, 0x73):
        r = DESCRIPTOR_SENSE.decode(data)
        return SenseCode(r.sense_key, r.asc, r.ascq)
    r = FIXED_SENSE.decode(data.ljust(18, b"\0"))
    return SenseCode(r.sense_key, r.asc, r.ascq)


# -- names, for messages ----------------------------------------------------------
STATUS_NAMES = {GOOD: "GOOD", CHECK_CONDITION: "CHECK CONDITION", CONDITION_MET: "CONDITION MET", BUSY: "BUSY",
                RESERVATION_CONFLICT: "RESERVATION CONFLICT", TASK_SET_FULL: "TASK SET FULL",
                ACA_ACTIVE: "ACA ACTIVE", TASK_ABORTED: "TASK ABORTED"}  # SAM-5 table 37
SENSE_KEY_NAMES = ("NO SENSE", "RECOVERED ERROR", "NOT READY", "MEDIUM ERROR", "HARDWARE ERROR",
                   "ILLEGAL REQUEST", "UNIT ATTENTION", "DATA PROTECT", "BLANK CHECK", "VENDOR SPECIFIC",
                   "COPY ABORTED", "ABORTED COMMAND", "RESERVED", "VOLUME OVERFLOW", "MISCOMPARE",
                   "COMPLETED")  # SPC-4 table 45, by value
_CODE_NAMES: dict[SenseCode, str] = {}
for _name, _value in list(globals().items()):
    if isinstance(_value, SenseCode):
        _CODE_NAMES.setdefault(_value, _name.replace("LBA_", "LOGICAL_BLOCK_ADDRESS_").replace("_", " "))
_ASC_NAMES = {(code.asc, code.ascq): name for code, name in reversed(list(_CODE_NAMES.items()))}


def describe(status: int, key: int = 0, asc: int = 0, ascq: int = 0) -> str:
    """A SCSI status and its sense code for a message, names first and numbers after, e.g.
    ``CHECK CONDITION (0x02): ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (sense key 0x5, ASC/ASCQ
    0x21/0x00)``; the names are those of this module's constants (an unknown ASC/ASCQ: numbers only)."""
    text = f"{STATUS_NAMES.get(status, 'unknown status')} ({status:#04x})"
    if status != CHECK_CONDITION and not (key or asc or ascq):
        return text
    what = _CODE_NAMES.get(SenseCode(key, asc, ascq)) or _ASC_NAMES.get((asc, ascq))
    return (f"{text}: {SENSE_KEY_NAMES[key & 0xF]}{', ' + what if what and (asc or ascq) else ''} "
            f"(sense key {key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x})")


def failure_code(exc: BaseException) -> SenseCode:
    """The sense of a command that ``exc`` ended: the backing store out of space (ENOSPC, EDQUOT: a thin volume
    whose disk filled up) is SPACE ALLOCATION FAILED WRITE PROTECT; a file system that went read-only under it
    (EROFS: ext4 after an error with errors=remount-ro) WRITE PROTECTED, which says the medium takes no writes
    now (QEMU reports EACCES, not an I/O error); anything else INTERNAL TARGET FAILURE."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SPACE_ALLOCATION_FAILED_WRITE_PROTECT
        if exc.errno == errno.EROFS:
            return WRITE_PROTECTED
    return INTERNAL_TARGET_FAILURE
