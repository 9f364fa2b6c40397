"""Copy offload: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18).

The logical unit that receives EXTENDED COPY is the copy manager.  Its copy
targets (CSCDs) are logical units of the same target, named by identification
descriptor target descriptors (type E4h) carrying a logical-unit designator
from VPD page 83h (NAA, T10 vendor id); the segments are block-to-block
(type 02h).  Data moves inside the target process, chunk by chunk through the
backing stores: nothing crosses the network.

The whole parameter list is validated before any block moves (a malformed list
changes nothing); a segment that cannot be processed (unknown or NUL copy
target, a range past the end of a medium) ends the command with COPY ABORTED,
leaving the earlier segments copied, as SPC-4 §6.4.3 allows.  What happened is
kept per (I_T nexus, list identifier) for RECEIVE COPY RESULTS when the LIST ID
USAGE says to hold it, and dropped when the nexus goes away.
"""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.scsi import sense as S
from node_agent.scsi.reservations import PR_READ, PR_WRITE, ReservationConflict
from node_agent.scsi.result import ScsiResult
from node_agent.scsi.sense import CheckCondition, build_sense
from node_agent.wire import Field, Layout

EXTENDED_COPY_OPCODE = 0x83  # THIRD-PARTY COPY OUT
RECEIVE_COPY_RESULTS_OPCODE = 0x84  # THIRD-PARTY COPY IN
SA_EXTENDED_COPY_LID1 = 0x00
SA_COPY_STATUS, SA_OPERATING_PARAMETERS, SA_FAILED_SEGMENT_DETAILS = 0x00, 0x03, 0x04

IDENTIFICATION_DESCRIPTOR = 0xE4  # target descriptor type: identification descriptor (SPC-4 §6.4.5.2)
BLOCK_TO_BLOCK = 0x02  # segment descriptor type: block device to block device (SPC-4 §6.4.6.5)
TARGET_DESCRIPTOR_SIZE = 32
BLOCK_TO_BLOCK_SIZE = 28

# Copy manager limits (OPERATING PARAMETERS, SPC-4 §6.18.4).
MAX_TARGET_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 32
MAX_DESCRIPTOR_LIST_LENGTH = 1024  # bytes of target + segment descriptor lists
MAX_SEGMENT_BYTES = 64 << 20  # one segment copies at most this much
CHUNK_BYTES = 1 << 20  # a segment moves in pieces of this size

LIST_ID_HOLD, LIST_ID_HOLD_ALT, LIST_ID_DISCARD, LIST_ID_NONE = 0b00, 0b01, 0b10, 0b11
COPY_IN_PROGRESS, COPY_COMPLETED, COPY_FAILED = 0x00, 0x01, 0x02

PARAMETER_LIST_HEADER = Layout("EXTENDED COPY(LID1) parameter list header", 16, (  # SPC-4 table 120
    Field("list_identifier", 0, 0xFF),
    Field("str", 1, 0x20),
    Field("list_id_usage", 1, 0x18),
    Field("priority", 1, 0x07),
    Field("target_descriptor_list_length", 2, 0xFFFF),
    Field("segment_descriptor_list_length", 8, 0xFFFFFFFF),
    Field("inline_data_length", 12, 0xFFFFFFFF),
))
IDENTIFICATION_TARGET_DESCRIPTOR = Layout("identification descriptor target descriptor", 32, (  # SPC-4 table 132
    Field("descriptor_type_code", 0, 0xFF),
    Field("lu_id_type", 1, 0xC0),  # obsolete in SPC-4
    Field("nul", 1, 0x20),  # obsolete in SPC-4; still honoured (a NUL target is unreachable)
    Field("peripheral_device_type", 1, 0x1F),
    Field("relative_initiator_port_identifier", 2, 0xFFFF),
    Field("code_set", 4, 0x0F),
    Field("association", 5, 0x30),
    Field("designator_type", 5, 0x0F),
    Field("designator_length", 7, 0xFF),
    Field("pad", 28, 0x04),
    Field("disk_block_length", 29, 0xFFFFFF),
))
BLOCK_TO_BLOCK_SEGMENT = Layout("block device to block device segment descriptor", 28, (  # SPC-4 table 143
    Field("descriptor_type_code", 0, 0xFF),
    Field("dc", 1, 0x02),
    Field("cat", 1, 0x01),
    Field("descriptor_length", 2, 0xFFFF),
    Field("source_index", 4, 0xFFFF),
    Field("destination_index", 6, 0xFFFF),
    Field("block_device_number_of_blocks", 10, 0xFFFF),
    Field("source_lba", 12, 0xFFFFFFFFFFFFFFFF),
    Field("destination_lba", 20, 0xFFFFFFFFFFFFFFFF),
))
OPERATING_PARAMETERS = Layout("RECEIVE COPY RESULTS operating parameters", 44, (  # SPC-4 table 224
    Field("available_data", 0, 0xFFFFFFFF),
    Field("snlid", 4, 0x01),
    Field("maximum_target_descriptor_count", 8, 0xFFFF),
    Field("maximum_segment_descriptor_count", 10, 0xFFFF),
    Field("maximum_descriptor_list_length", 12, 0xFFFFFFFF),
    Field("maximum_segment_length", 16, 0xFFFFFFFF),
    Field("maximum_inline_data_length", 20, 0xFFFFFFFF),
    Field("held_data_limit", 24, 0xFFFFFFFF),
    Field("maximum_stream_device_transfer_size", 28, 0xFFFFFFFF),
    Field("total_concurrent_copies", 34, 0xFFFF),
    Field("maximum_concurrent_copies", 36, 0xFF),
    Field("data_segment_granularity", 37, 0xFF),
    Field("inline_data_granularity", 38, 0xFF),
    Field("held_data_granularity", 39, 0xFF),
    Field("implemented_descriptor_list_length", 43, 0xFF),
))
COPY_STATUS = Layout("RECEIVE COPY RESULTS copy status", 12, (  # SPC-4 table 219
    Field("available_data", 0, 0xFFFFFFFF),
    Field("hdd", 4, 0x80),
    Field("copy_manager_status", 4, 0x7F),
    Field("segments_processed", 5, 0xFFFF),
    Field("transfer_count_units", 7, 0xFF),
    Field("transfer_count", 8, 0xFFFFFFFF),
))
FAILED_SEGMENT_DETAILS_HEADER = Layout("RECEIVE COPY RESULTS failed segment details", 62, (  # SPC-4 table 226
    Field("available_data", 0, 0xFFFFFFFF),
    Field("hdd", 56, 0x01),
    Field("copy_command_status", 57, 0xFF),
    Field("sense_data_length", 60, 0xFFFF),
))
TRANSFER_COUNT_KIB = 0x01  # TRANSFER COUNT UNITS: 2^10 bytes


@dataclass
class CopyOutcome:
    """What one EXTENDED COPY did, held for RECEIVE COPY RESULTS."""

    status: int  # COPY_IN_PROGRESS (on a worker still), COPY_COMPLETED or COPY_FAILED
    segments_processed: int
    bytes_copied: int
    sense_code: S.SenseCode | None = None  # why it stopped (COPY ABORTED), when it failed

    def sense(self) -> bytes:
        """Fixed-format sense of the failure; INFORMATION is the number of segments completed."""
        return build_sense(self.sense_code, info=self.segments_processed) if self.sense_code else b""


@dataclass(frozen=True)
class _Segment:
    source: int  # index into the target descriptor list
    destination: int
    blocks: int
    source_lba: int
    destination_lba: int
    dc: bool


class _AccessProbe:
    """What ``Reservations.conflicts`` needs to judge a copy target's access (a read or a write)."""

    opcode = EXTENDED_COPY_OPCODE
    spc2_allowed = False

    def __init__(self, pr: str):
        self.pr = pr


_READ_ACCESS, _WRITE_ACCESS = _AccessProbe(PR_READ), _AccessProbe(PR_WRITE)


# -- EXTENDED COPY ---------------------------------------------------------------------
def extended_copy(lu, nexus, cdb, data_out, edtl):
    """EXTENDED COPY(LID1) (SPC-4 §6.4): block-to-block segments between this target's logical units."""
    length = cdb.parameter_list_length
    if length == 0:
        return None  # SPC-4 §6.4.1: not an error; nothing is copied
    data = bytes(data_out[:length]) if data_out is not None else b""
    if len(data) < length or length < PARAMETER_LIST_HEADER.size:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    header = PARAMETER_LIST_HEADER.decode(data)
    targets_len, segments_len = header.target_descriptor_list_length, header.segment_descriptor_list_length
    if header.inline_data_length:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=12, in_cdb=False)
    if PARAMETER_LIST_HEADER.size + targets_len + segments_len > length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    if targets_len + segments_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    targets = _target_descriptors(lu, data, PARAMETER_LIST_HEADER.size, targets_len)
    segments = _segment_descriptors(data, PARAMETER_LIST_HEADER.size + targets_len, segments_len)
    key = (nexus, header.list_identifier)
    if header.list_id_usage != LIST_ID_NONE:
        held = lu.copy_results.get(key)
        if held is not None and held.status == COPY_IN_PROGRESS:  # SPC-4 §6.4.1: that list identifier is busy
            raise CheckCondition(S.OPERATION_IN_PROGRESS)
        _forget(lu, nexus, header.list_identifier)
    hold = header.list_id_usage in (LIST_ID_HOLD, LIST_ID_HOLD_ALT)
    if lu.write_nowait is None:  # a store without non-blocking I/O (memory): here, at once
        outcome = _run(lu, nexus, targets, segments)
        if hold:
            lu.copy_results[key] = outcome
        if outcome.status == COPY_FAILED:
            raise _Aborted(outcome)
        return None
    # Up to 32 segments of 64 MiB: a worker thread's job, so that the portal's other sessions are served
    # meanwhile (issue 7, "fair under a slow disk"); RECEIVE COPY STATUS says "in progress" until it ends.
    if hold:
        lu.copy_results[key] = CopyOutcome(COPY_IN_PROGRESS, 0, 0)

    def copy() -> ScsiResult:
        try:
            outcome = _run(lu, nexus, targets, segments)
        except BaseException:
            if hold:
                _forget(lu, nexus, header.list_identifier)
            raise
        if hold:
            lu.copy_results[key] = outcome
        if outcome.status == COPY_FAILED:
            return ScsiResult(S.CHECK_CONDITION, sense=_Aborted(outcome).sense(lu.mode.d_sense))
        return ScsiResult(S.GOOD)

    def answered() -> ScsiResult:  # what the dispatcher would make of the exceptions a segment raises
        try:
            return copy()
        except ReservationConflict:
            return ScsiResult(S.RESERVATION_CONFLICT)
        except CheckCondition as cc:
            return ScsiResult(S.CHECK_CONDITION, sense=cc.sense(lu.mode.d_sense))
    return lu.deferred(answered)


class _Aborted(CheckCondition):
    """The copy stopped at a segment: COPY ABORTED, INFORMATION = segments completed (SPC-4 §6.4.3.3)."""

    def __init__(self, outcome: CopyOutcome):
        super().__init__(outcome.sense_code, info=outcome.segments_processed)


def _target_descriptors(lu, data: bytes, start: int, length: int) -> list:
    """Resolve each target descriptor to a logical unit of this target (None: NUL or not found)."""
    if length % TARGET_DESCRIPTOR_SIZE:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    count = length // TARGET_DESCRIPTOR_SIZE
    if count > MAX_TARGET_DESCRIPTORS:
        raise CheckCondition(S.TOO_MANY_TARGET_DESCRIPTORS)
    units = []
    for i in range(count):
        pos = start + i * TARGET_DESCRIPTOR_SIZE
        if data[pos] != IDENTIFICATION_DESCRIPTOR:
            raise CheckCondition(S.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, field_pointer=pos, in_cdb=False)
        d = IDENTIFICATION_TARGET_DESCRIPTOR.decode(data, pos)
        # LU ID TYPE (SPC-3) is ignored: SPC-4 made it obsolete, and the designator names the unit.
        if d.peripheral_device_type != 0 or d.designator_length > 20:
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 1, in_cdb=False)
        if d.nul:
            units.append(None)
            continue
        designator = (d.code_set, d.designator_type, data[pos + 8: pos + 8 + d.designator_length])
        unit = None
        if d.association == 0:  # a logical unit designator
            unit = next((u for u in lu.copy_targets() if designator in _designators(u)), None)
        if unit is not None and d.disk_block_length != unit.block_size:
            unit = None  # a different medium than the one named: not reachable as described
        units.append(unit)
    return units


def _designators(unit) -> set:
    """The logical-unit designators (code set, type, value) of VPD page 83h an initiator may name."""
    from node_agent.scsi import vpd as V

    t10 = V.ascii_field(unit.identity.vendor, 8) + unit.identity.volume_id.encode("ascii", "replace")
    return {(V.CODE_SET_BINARY, V.DESIGNATOR_NAA, unit.identity.naa),
            (V.CODE_SET_ASCII, V.DESIGNATOR_T10_VENDOR_ID, t10[:252])}


def _segment_descriptors(data: bytes, start: int, length: int) -> list[_Segment]:
    segments: list[_Segment] = []
    pos, end = start, start + length
    while pos < end:
        if end - pos < 4:
            raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
        kind, size = data[pos], int.from_bytes(data[pos + 2: pos + 4], "big") + 4
        if kind != BLOCK_TO_BLOCK:
            raise CheckCondition(S.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, field_pointer=pos, in_cdb=False)
        if size != BLOCK_TO_BLOCK_SIZE:
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 2, in_cdb=False)
        if pos + size > end:
            raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
        if len(segments) == MAX_SEGMENT_DESCRIPTORS:
            raise CheckCondition(S.TOO_MANY_SEGMENT_DESCRIPTORS)
        d = BLOCK_TO_BLOCK_SEGMENT.decode(data, pos)
        if d.cat:
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 1, bit_pointer=0,
                                 in_cdb=False)
        segments.append(_Segment(d.source_index, d.destination_index, d.block_device_number_of_blocks,
                                 d.source_lba, d.destination_lba, bool(d.dc)))
        pos += size
    return segments


def _run(lu, nexus, targets: list, segments: list[_Segment]) -> CopyOutcome:
    done = copied = 0
    for seg in segments:
        try:
            copied += _copy_segment(nexus, targets, seg)
        except _SegmentFailed as failed:
            return CopyOutcome(COPY_FAILED, done, copied, failed.code)
        done += 1
    return CopyOutcome(COPY_COMPLETED, done, copied)


class _SegmentFailed(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _copy_segment(nexus, targets: list, seg: _Segment) -> int:
    if seg.source >= len(targets) or seg.destination >= len(targets):
        raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    src, dst = targets[seg.source], targets[seg.destination]
    if src is None or dst is None:
        raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    for unit, access in ((src, _READ_ACCESS), (dst, _WRITE_ACCESS)):
        if unit.reservations.engaged and unit.reservations.conflicts(access, nexus):
            raise ReservationConflict()
        # Its medium is out of reach as for a command sent to it: ejected, under a SANITIZE's pass, or left
        # by a failed one (SBC-4 §4.11: a half-erased medium is neither read nor written).
        if not unit.medium_present or unit.sanitizing or unit.sanitize_failed:
            raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    if dst.read_only:
        raise CheckCondition(S.WRITE_PROTECTED)
    bs = src.block_size
    blocks = seg.blocks  # DC selects whose blocks count; with one block size throughout both agree
    if blocks * bs > MAX_SEGMENT_BYTES:
        raise _SegmentFailed(S.COPY_ABORTED_NO_ADDITIONAL_SENSE)
    if seg.source_lba + blocks > src.num_blocks or seg.destination_lba + blocks > dst.num_blocks:
        raise _SegmentFailed(S.COPY_ABORTED_NO_ADDITIONAL_SENSE)
    total = blocks * bs
    src_off, dst_off = seg.source_lba * bs, seg.destination_lba * bs
    pieces = [(o, min(CHUNK_BYTES, total - o)) for o in range(0, total, CHUNK_BYTES)]
    if src is dst and src_off < dst_off < src_off + total:
        pieces.reverse()  # overlapping forward move on one medium: copy from the end
    fua = dst._fua_always
    for offset, n in pieces:
        dst.backing.write(dst_off + offset, src.backing.read(src_off + offset, n), fua)
    dst.write_commands += 1
    dst.write_bytes += total
    return total


def _forget(lu, nexus, list_id: int) -> None:
    lu.copy_results.pop((nexus, list_id), None)


# -- RECEIVE COPY RESULTS ----------------------------------------------------------------
def receive_copy_status(lu, nexus, cdb, data_out, edtl):
    """RECEIVE COPY RESULTS, COPY STATUS (SPC-4 §6.18.2): the held outcome of a finished copy."""
    outcome = lu.copy_results.get((nexus, cdb.list_identifier))
    if outcome is None:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    return bytes(COPY_STATUS.encode(
        available_data=COPY_STATUS.size - 4, copy_manager_status=outcome.status,
        segments_processed=outcome.segments_processed, transfer_count_units=TRANSFER_COUNT_KIB,
        transfer_count=min(outcome.bytes_copied >> 10, 0xFFFFFFFF)))


def receive_failed_segment_details(lu, nexus, cdb, data_out, edtl):
    """RECEIVE COPY RESULTS, FAILED SEGMENT DETAILS (SPC-4 §6.18.5): the sense data of a failed copy."""
    outcome = lu.copy_results.get((nexus, cdb.list_identifier))
    if outcome is None or outcome.status != COPY_FAILED:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    sense = outcome.sense()
    body = bytes(FAILED_SEGMENT_DETAILS_HEADER.encode(
        available_data=FAILED_SEGMENT_DETAILS_HEADER.size - 4 + len(sense),
        copy_command_status=S.CHECK_CONDITION, sense_data_length=len(sense)))
    return body + sense


def receive_operating_parameters(lu, nexus, cdb, data_out, edtl):
    """RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 §6.18.4): this copy manager's limits."""
    implemented = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR))
    head = OPERATING_PARAMETERS.encode(
        available_data=OPERATING_PARAMETERS.size - 4 + len(implemented),
        snlid=True,
        maximum_target_descriptor_count=MAX_TARGET_DESCRIPTORS,
        maximum_segment_descriptor_count=MAX_SEGMENT_DESCRIPTORS,
        maximum_descriptor_list_length=MAX_DESCRIPTOR_LIST_LENGTH,
        maximum_segment_length=MAX_SEGMENT_BYTES,
        total_concurrent_copies=1, maximum_concurrent_copies=1,
        implemented_descriptor_list_length=len(implemented))
    return bytes(head) + implemented


# -- Third-party Copy VPD page (SPC-4 §7.8.17) -------------------------------------------------
def _tpc_descriptor(kind: int, body: bytes) -> bytes:
    body += bytes(-(len(body) + 4) % 4)  # descriptors are a multiple of 4 bytes long
    return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def third_party_copy_vpd(lu, nexus) -> bytes:
    """The body of VPD page 8Fh: supported commands, parameter data, descriptors, CSCD ids."""
    commands = bytes((EXTENDED_COPY_OPCODE, 1, SA_EXTENDED_COPY_LID1,
                      RECEIVE_COPY_RESULTS_OPCODE, 3, SA_COPY_STATUS, SA_OPERATING_PARAMETERS,
                      SA_FAILED_SEGMENT_DETAILS))
    supported_commands = _tpc_descriptor(0x0001, bytes((len(commands),)) + commands)
    parameter_data = _tpc_descriptor(0x0004, bytes(4) + MAX_TARGET_DESCRIPTORS.to_bytes(2, "big")
                                     + MAX_SEGMENT_DESCRIPTORS.to_bytes(2, "big")
                                     + MAX_DESCRIPTOR_LIST_LENGTH.to_bytes(4, "big") + bytes(4))
    kinds = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR))
    supported_descriptors = _tpc_descriptor(0x0008, bytes((len(kinds),)) + kinds)
    cscd_ids = _tpc_descriptor(0x000C, bytes(2))  # no CSCD IDs beyond the descriptor list's indexes
    return supported_commands + parameter_data + supported_descriptors + cscd_ids
