"""Copy offload: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18).

The logical unit that receives EXTENDED COPY is the copy manager.  Its copy
targets (CSCDs) are logical units of the same target, named by identification
descriptor target descriptors (type E4h) carrying a logical-unit designator
from VPD page 83h (NAA, T10 vendor id); the segments are block-to-block
(type 02h).  Data moves inside the target process, chunk by chunk through the
backing stores: nothing crosses the network.

The whole parameter list is validated before any block moves (a malformed list
changes nothing), and so is every segment's access to its copy targets: a
write-protected destination (DATA PROTECT, WRITE PROTECTED) or one the
sender's reservations forbid (RESERVATION CONFLICT) ends the command before
any segment is processed (SPC-5 §5.17.7.3: errors of that time are not
COPY ABORTED).  A segment that cannot be processed (unknown or NUL copy target,
a range past the end of a medium, a byte count that is not whole blocks on
both sides, a target whose medium went out of reach or whose access changed
meanwhile) ends the command with COPY ABORTED, leaving the earlier segments
copied, as SPC-5 §5.17.7.4 allows.  Each side of a segment counts in its own
block size: BLOCK DEVICE NUMBER OF BLOCKS is the source's blocks (DC=0) or the
destination's (DC=1).

A copy runs as I/O of the unit that received it (``lu.deferred``: a worker
thread).  Each 1 MiB chunk that touches another unit runs inside that unit's
``foreign_io``, and checks inside it that the unit's medium is still in reach
(no SANITIZE begun since the copy was accepted) and the sender's access still
allowed: another unit's SANITIZE, PREEMPT AND ABORT, pause or removal waits
for the chunk in flight and stops the rest.  A unit whose I/O runs on the
event loop (``write_nowait`` is None: an ``atomic`` unit, whose WRITE ATOMIC
is atomic because all its I/O runs there, one command at a time) is reached
only by a copy that runs there too: its own copies, kept to one maximum
WRITE's worth of data per command (one segment of at most MAXIMUM TRANSFER
LENGTH: ``segment_limits``, reported in OPERATING PARAMETERS and the
Third-party Copy VPD page), and the copies of other such units.

What happened is kept per (I_T nexus, list identifier) for RECEIVE COPY
RESULTS when LIST ID USAGE is 00b, and dropped when the nexus goes away.  The
held ``CopyOutcome`` is the one object the running copy updates in place:
only the event loop adds to or removes from ``lu.copy_results``, so a copy
that outlives its nexus (or whose list identifier was reused after a new
login) changes nothing held.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from node_agent.scsi import sense as S
from node_agent.scsi.reservations import PR_READ, PR_WRITE, ReservationConflict
from node_agent.scsi.result import ScsiResult
from node_agent.scsi.sbc import fenced_write
from node_agent.scsi.sense import CheckCondition, SenseCode, build_sense
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
MAX_SEGMENT_DESCRIPTORS = 32  # a copy on a worker (one on the event loop: ``segment_limits``)
MAX_DESCRIPTOR_LIST_LENGTH = 1024  # bytes of target + segment descriptor lists
MAX_SEGMENT_BYTES = 64 << 20  # one segment copies at most this much (a copy on a worker)
CHUNK_BYTES = 1 << 20  # a segment moves in pieces of this size

# LIST ID USAGE (SPC-4 §6.4.3.2): 01b is reserved; 11b (nothing held) requires LIST IDENTIFIER 0.
LIST_ID_HOLD, LIST_ID_DISCARD, LIST_ID_NONE = 0b00, 0b10, 0b11
COPY_IN_PROGRESS, COPY_COMPLETED, COPY_FAILED = 0x00, 0x01, 0x02

# COPY ABORTED reasons sense.py has no name for (SPC-5 §5.17.7.2 table 116, §5.17.7.4).
UNEXPECTED_INEXACT_SEGMENT = SenseCode(S.COPY_ABORTED, 0x26, 0x0A)  # residual data, PAD=0 and CAT=0
THIRD_PARTY_DEVICE_FAILURE = SenseCode(S.COPY_ABORTED, 0x0D, 0x01)  # a copy target refused a read or write

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
GENERAL_COPY_OPERATIONS = Layout("General Copy Operations third-party copy descriptor body", 32, (  # SPC-5 §7.8.17.10
    Field("total_concurrent_copies", 0, 0xFFFFFFFF),
    Field("maximum_identified_concurrent_copies", 4, 0xFFFFFFFF),
    Field("maximum_segment_length", 8, 0xFFFFFFFF),
    Field("data_segment_granularity", 12, 0xFF),  # log2
    Field("inline_data_granularity", 13, 0xFF),  # log2
))
TRANSFER_COUNT_KIB = 0x01  # TRANSFER COUNT UNITS: 2^10 bytes


@dataclass
class CopyOutcome:
    """What one EXTENDED COPY did, held for RECEIVE COPY RESULTS.  The copy updates it in place as it goes
    (on its worker: ``status`` last, so a reader on the loop never sees an end without its counts)."""

    status: int  # COPY_IN_PROGRESS (on a worker still), COPY_COMPLETED or COPY_FAILED
    segments_processed: int
    bytes_copied: int
    sense_code: S.SenseCode | None = None  # why it stopped (COPY ABORTED), when it failed

    def sense(self) -> bytes:
        """Fixed-format sense of the failure; INFORMATION is the number of segments completed."""
        return build_sense(self.sense_code, info=self.segments_processed) if self.sense_code else b""

    def end(self, status: int, code: S.SenseCode | None = None) -> None:
        self.sense_code = code
        self.status = status


@dataclass(frozen=True)
class _Segment:
    source: int  # index into the target descriptor list
    destination: int
    blocks: int
    source_lba: int
    destination_lba: int
    dc: bool


@dataclass(frozen=True)
class _Copy:
    """One accepted EXTENDED COPY: what its segments need while they run (on a worker, or on the loop)."""

    lu: object  # the copy manager: the logical unit that received the command
    nexus: object
    targets: list  # a LogicalUnit per target descriptor (None: NUL, or none reachable by that name)
    segments: list
    sanitizes: dict  # id(unit) -> unit.sanitizes_begun when the copy was accepted


class _AccessProbe:
    """What ``Reservations.conflicts`` needs to judge a copy target's access (a read or a write)."""

    opcode = EXTENDED_COPY_OPCODE
    spc2_allowed = False
    exempt = False

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
    _check_list_id(header)
    if header.inline_data_length:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=12, in_cdb=False)
    if PARAMETER_LIST_HEADER.size + targets_len + segments_len > length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    if targets_len + segments_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    targets = _target_descriptors(lu, data, PARAMETER_LIST_HEADER.size, targets_len)
    segments = _segment_descriptors(data, PARAMETER_LIST_HEADER.size + targets_len, segments_len,
                                    segment_limits(lu)[0])
    _check_access(nexus, targets, segments)
    job = _Copy(lu, nexus, targets, segments, {id(u): u.sanitizes_begun for u in targets if u is not None})
    key = (nexus, header.list_identifier)
    if header.list_id_usage != LIST_ID_NONE:
        held = lu.copy_results.get(key)
        if held is not None and held.status == COPY_IN_PROGRESS:  # SPC-4 §6.4.1: that list identifier is busy
            raise CheckCondition(S.OPERATION_IN_PROGRESS)
        lu.copy_results.pop(key, None)
    outcome = CopyOutcome(COPY_IN_PROGRESS, 0, 0)
    if header.list_id_usage == LIST_ID_HOLD:
        lu.copy_results[key] = outcome  # RECEIVE COPY STATUS says "in progress" until the copy ends
    if lu.write_nowait is None:  # all this unit's I/O runs here, on the loop: so does its copy (kept small)
        _run(job, outcome)
        if outcome.status == COPY_FAILED:
            raise _Aborted(outcome)
        return None

    # Up to 32 segments of 64 MiB: a worker thread's job, so that the portal's other sessions are served
    # meanwhile (issue 7, "fair under a slow disk").
    def copy() -> ScsiResult:
        _run(job, outcome)
        if outcome.status == COPY_FAILED:
            return ScsiResult(S.CHECK_CONDITION, sense=_Aborted(outcome).sense(lu.mode.d_sense))
        return ScsiResult(S.GOOD)
    return lu.deferred(copy)


def _check_list_id(header) -> None:
    """LIST ID USAGE 01b is reserved, and 11b (no list identifier) takes LIST IDENTIFIER 0 (SPC-4 §6.4.3.2)."""
    if header.list_id_usage not in (LIST_ID_HOLD, LIST_ID_DISCARD, LIST_ID_NONE):
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=1, bit_pointer=4, in_cdb=False)
    if header.list_id_usage == LIST_ID_NONE and header.list_identifier:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=0, in_cdb=False)


def segment_limits(lu) -> tuple[int, int]:
    """(MAXIMUM SEGMENT DESCRIPTOR COUNT, MAXIMUM SEGMENT LENGTH) of ``lu``'s copy manager.  A copy that runs on
    the event loop (a unit whose I/O all runs there) moves at most what one WRITE may per command: one segment
    of MAXIMUM TRANSFER LENGTH, a stall of the portal no longer than that WRITE's."""
    if lu.write_nowait is not None:
        return MAX_SEGMENT_DESCRIPTORS, MAX_SEGMENT_BYTES
    return 1, lu.max_transfer_blocks * lu.block_size


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
            unit = next((u for u in _reachable(lu) if designator in _designators(u)), None)
        # DISK BLOCK LENGTH 0: the copy manager finds the block size out itself (SPC-4 §6.4.5.3).
        if unit is not None and d.disk_block_length not in (0, unit.block_size):
            unit = None  # a different medium than the one named: not reachable as described
        units.append(unit)
    return units


def _reachable(lu) -> list:
    """The units a copy of ``lu`` may read and write.  A copy on a worker thread must not reach a unit whose
    I/O all runs on the event loop: its WRITE ATOMIC would no longer be atomic against the copy's reads, and
    its SANITIZE and PREEMPT AND ABORT, run there at once, would not wait for a chunk in flight."""
    units = lu.copy_targets()
    if lu.write_nowait is None:
        return units
    return [u for u in units if u.write_nowait is not None]


def _designators(unit) -> set:
    """The logical-unit designators (code set, type, value) of VPD page 83h an initiator may name."""
    from node_agent.scsi import vpd as V

    t10 = V.ascii_field(unit.identity.vendor, 8) + unit.identity.volume_id.encode("ascii", "replace")
    return {(V.CODE_SET_BINARY, V.DESIGNATOR_NAA, unit.identity.naa),
            (V.CODE_SET_ASCII, V.DESIGNATOR_T10_VENDOR_ID, t10[:252])}


def _segment_descriptors(data: bytes, start: int, length: int, most: int) -> list[_Segment]:
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
        if len(segments) == most:
            raise CheckCondition(S.TOO_MANY_SEGMENT_DESCRIPTORS)
        d = BLOCK_TO_BLOCK_SEGMENT.decode(data, pos)
        if d.cat:
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 1, bit_pointer=0,
                                 in_cdb=False)
        segments.append(_Segment(d.source_index, d.destination_index, d.block_device_number_of_blocks,
                                 d.source_lba, d.destination_lba, bool(d.dc)))
        pos += size
    return segments


def _check_access(nexus, targets: list, segments: list[_Segment]) -> None:
    """Before any segment is processed: the sender may read every source and write every destination
    (RESERVATION CONFLICT, DATA PROTECT otherwise).  Unreachable targets are left to their segment."""
    for seg in segments:
        if max(seg.source, seg.destination) >= len(targets):
            continue
        src, dst = targets[seg.source], targets[seg.destination]
        for unit, access in ((src, _READ_ACCESS), (dst, _WRITE_ACCESS)):
            if unit is not None and unit.reservations.engaged and unit.reservations.conflicts(access, nexus):
                raise ReservationConflict()
        if dst is not None and dst.read_only:
            raise CheckCondition(S.WRITE_PROTECTED)


def _run(job: _Copy, outcome: CopyOutcome) -> None:
    """Process the segments in order, updating ``outcome`` (held for RECEIVE COPY RESULTS) as they end."""
    try:
        for seg in job.segments:
            try:
                outcome.bytes_copied += _copy_segment(job, seg)
            except _SegmentFailed as failed:
                outcome.end(COPY_FAILED, failed.code)
                return
            outcome.segments_processed += 1
    except BaseException as exc:  # an I/O error or a bug: the command says so; what is held must not stay
        outcome.end(COPY_FAILED, S.failure_code(exc))  # "in progress" (a full disk: out of space, not a failure)
        raise
    outcome.end(COPY_COMPLETED)


class _SegmentFailed(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _copy_segment(job: _Copy, seg: _Segment) -> int:
    targets = job.targets
    if seg.source >= len(targets) or seg.destination >= len(targets):
        raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    src, dst = targets[seg.source], targets[seg.destination]
    if src is None or dst is None:
        raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    # DC=0: the source's blocks; DC=1: the destination's (SPC-5 table 115).  Whole blocks on both sides, or the
    # residue would need PAD or CAT, which this copy manager does not offer (SPC-5 §5.17.7.2, table 116).
    total = seg.blocks * (dst.block_size if seg.dc else src.block_size)
    if total % src.block_size or total % dst.block_size:
        raise _SegmentFailed(UNEXPECTED_INEXACT_SEGMENT)
    if total > segment_limits(job.lu)[1]:
        raise _SegmentFailed(S.COPY_ABORTED_NO_ADDITIONAL_SENSE)
    if (seg.source_lba + total // src.block_size > src.num_blocks
            or seg.destination_lba + total // dst.block_size > dst.num_blocks):
        raise _SegmentFailed(S.COPY_ABORTED_NO_ADDITIONAL_SENSE)
    src_off, dst_off = seg.source_lba * src.block_size, seg.destination_lba * dst.block_size
    pieces = [(o, min(CHUNK_BYTES, total - o)) for o in range(0, total, CHUNK_BYTES)]
    if src is dst and src_off < dst_off < src_off + total:
        pieces.reverse()  # overlapping forward move on one medium: copy from the end
    for offset, n in pieces:
        with _reach(job, src, _READ_ACCESS), _reach(job, dst, _WRITE_ACCESS):
            def chunk(at=dst_off + offset, data_at=src_off + offset, n=n) -> None:
                dst.backing.write(at, src.backing.read(data_at, n), dst._fua_always)
            fenced_write(dst, chunk)()  # none comes between a COMPARE AND WRITE's read and write (SBC-3 §5.2)
    dst.write_commands += 1
    dst.write_bytes += total
    return total


@contextlib.contextmanager
def _reach(job: _Copy, unit, access: _AccessProbe):
    """One chunk's access to ``unit``: counted as its I/O when it is another unit than the copy manager (whose
    own I/O this copy is), and refused when the unit changed since the copy began: its medium out of reach as
    for a command sent to it (ejected, a SANITIZE begun since, or the failed state: SBC-4 §4.11), its
    reservations now forbidding the sender, or it became write-protected (a failed command to a copy
    target: THIRD PARTY DEVICE FAILURE, SPC-5 §5.17.7.4)."""
    with contextlib.nullcontext(True) if unit is job.lu else unit.foreign_io() as admitted:
        # Not admitted: closed (being removed) or paused (a snapshot's point in time): not now.
        if (not admitted or not unit.medium_present or unit.sanitizing or unit.sanitize_failed
                or unit.sanitizes_begun != job.sanitizes[id(unit)]):
            raise _SegmentFailed(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        if unit.reservations.engaged and unit.reservations.conflicts(access, job.nexus):
            raise _SegmentFailed(THIRD_PARTY_DEVICE_FAILURE)
        if access is _WRITE_ACCESS and unit.read_only:
            raise _SegmentFailed(THIRD_PARTY_DEVICE_FAILURE)
        yield


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
        maximum_segment_descriptor_count=segment_limits(lu)[0],
        maximum_descriptor_list_length=MAX_DESCRIPTOR_LIST_LENGTH,
        maximum_segment_length=segment_limits(lu)[1],
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
                                     + segment_limits(lu)[0].to_bytes(2, "big")
                                     + MAX_DESCRIPTOR_LIST_LENGTH.to_bytes(4, "big") + bytes(4))
    kinds = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR))
    supported_descriptors = _tpc_descriptor(0x0008, bytes((len(kinds),)) + kinds)
    cscd_ids = _tpc_descriptor(0x000C, bytes(2))  # no CSCD IDs beyond the descriptor list's indexes
    general = _tpc_descriptor(0x8001, bytes(GENERAL_COPY_OPERATIONS.encode(
        total_concurrent_copies=1, maximum_identified_concurrent_copies=1,
        maximum_segment_length=segment_limits(lu)[1])))
    return supported_commands + parameter_data + supported_descriptors + cscd_ids + general
