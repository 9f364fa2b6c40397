"""The command table: one row per (operation code, service action) (SPC-4 §4.2.5, SBC-3 §5).

Each row names the CDB layout, the handler, the data direction, the field
that bounds Data-In (allocation length), whether it writes the medium, how
persistent reservations treat it (``pr``: SPC-4 §5.13.1 table 66, SBC-3 §4.16
table 13), whether it runs while another I_T nexus holds an SPC-2
reservation (``spc2_allowed``: SPC-2 §5.5.1 and annex B), and the CDB field
values with which it runs under every reservation of either kind (``exempt``:
START STOP UNIT with START=1 and POWER CONDITION 0, SBC-3 table 13, SPC-2
table B.1); ``reservations.py`` enforces them.  Reserved CDB bits are derived from the layout:
every bit no field claims must be zero.  A row whose command a unit may not offer (UNMAP on a
fully provisioned unit, WRITE ATOMIC(16) where it was not opted in) names an ``available(lu)``
predicate: where it says no, the dispatcher answers as for an unknown operation code, and
REPORT SUPPORTED OPERATION CODES (§6.35), which answers from this same table, leaves the
command out of its list and reports it not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from node_agent.scsi import cdb as C
from node_agent.scsi import persistent_reserve as P
from node_agent.scsi import reservations as R
from node_agent.scsi import sbc, spc
from node_agent.scsi import xcopy as X
from node_agent.scsi import sense as S
from node_agent.scsi.sense import CheckCondition
from node_agent.wire import Field, Layout

from node_agent.scsi.reservations import PR_ALLOWED, PR_READ, PR_WRITE  # noqa: F401  (the ``pr`` column)

NONE, IN, OUT = "none", "in", "out"

CONTROL_RESERVED = 0x3D  # NACA, LINK and reserved bits 5-3 of the CONTROL byte (SAM-5 §5.2)


@dataclass(frozen=True)
class Command:
    """One supported command."""

    opcode: int
    service_action: int | None
    layout: Layout
    handler: Callable
    direction: str
    pr: str
    alloc_field: str | None = None
    writes: bool = False
    timeout_s: int = 30  # nominal command timeout reported with RCTD=1
    spc2_allowed: bool = False  # runs despite another I_T nexus's RESERVE(6)/(10)
    exempt: tuple[tuple[str, int], ...] = ()  # (CDB field, value) pairs: then it runs under every reservation
    available: Callable[[Any], bool] | None = None  # available(lu): the unit offers it; None: every unit does
    reserved: tuple[tuple[int, int], ...] = field(init=False, repr=False)
    _exempt_bits: tuple[tuple[int, int, int, int], ...] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "reserved", reserved_bits(self.layout))
        fields = {f.name: f for f in self.layout.fields}
        object.__setattr__(self, "_exempt_bits", tuple(
            (fields[name].offset, fields[name].width, fields[name].mask, value << fields[name].shift)
            for name, value in self.exempt))

    def runs_reserved(self, cdb) -> bool:
        """Whether ``cdb`` (raw bytes) has every ``exempt`` field value: no reservation stops it."""
        for offset, width, mask, value in self._exempt_bits:
            if len(cdb) < offset + width or int.from_bytes(cdb[offset:offset + width], "big") & mask != value:
                return False
        return True

    @property
    def name(self) -> str:
        return self.layout.name

    def offered_by(self, lu) -> bool:
        """Whether logical unit ``lu`` supports this command (its ``available`` predicate, if any)."""
        return self.available is None or self.available(lu)

    def usage_data(self) -> bytes:
        """CDB USAGE DATA (SPC-4 §6.35.3): opcode, then a map of the bits this device server looks at."""
        size = self.layout.size
        usage = bytearray(size)
        usage[0] = self.opcode
        for f in self.layout.fields:
            if f.name in ("opcode", "control"):
                continue
            span = f.mask.to_bytes(f.width, "big")
            if f.name == "service_action":
                span = (self.service_action << f.shift).to_bytes(f.width, "big")
            for i, b in enumerate(span):
                usage[f.offset + i] |= b
        return bytes(usage)


def reserved_bits(layout: Layout) -> tuple[tuple[int, int], ...]:
    """(byte index, mask of reserved bits) for every CDB byte with a reserved bit."""
    used = bytearray(layout.size)
    for f in layout.fields:
        if f.name == "control":
            continue
        for i, b in enumerate(f.mask.to_bytes(f.width, "big")):
            used[f.offset + i] |= b
    out = [(i, ~used[i] & 0xFF) for i in range(1, layout.size - 1) if used[i] != 0xFF]
    out.append((layout.size - 1, CONTROL_RESERVED))
    return tuple(out)


def _c(opcode, layout, handler, direction, pr, *, sa=None, alloc=None, writes=False, timeout=30, spc2=False,
       exempt=(), available=None):
    return Command(opcode, sa, layout, handler, direction, pr, alloc, writes, timeout, spc2, tuple(exempt),
                   available)


def report_supported_operation_codes(lu, nexus, cdb, data_out, edtl):
    """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35), from the command table: a command this unit does not
    offer (``Command.available``) is absent from the list and reported with SUPPORT 001b (not supported)."""
    option = cdb.reporting_options
    if option == 0b000:
        return _all_commands(lu, cdb.rctd)
    if option not in (0b001, 0b010, 0b011):
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)
    entry = COMMANDS_BY_OPCODE.get(cdb.requested_operation_code)
    has_sa = entry.__class__ is dict
    if option == 0b001 and has_sa:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)
    if option == 0b010 and entry is not None and not has_sa:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)
    if has_sa:
        entry = entry.get(cdb.requested_service_action)
    elif option != 0b001 and cdb.requested_service_action:
        entry = None
    if entry is None or not entry.offered_by(lu):
        return bytes(ONE_COMMAND_HEADER.encode(support=0b001))
    usage = entry.usage_data()
    out = bytes(ONE_COMMAND_HEADER.encode(ctdp=cdb.rctd, support=0b011, cdb_size=len(usage))) + usage
    return out + (_timeouts(entry) if cdb.rctd else b"")


def _all_commands(lu, rctd: bool) -> bytes:
    body = bytearray()
    for cmd in ALL_COMMANDS:
        if not cmd.offered_by(lu):
            continue
        body += COMMAND_DESCRIPTOR.encode(
            operation_code=cmd.opcode, service_action=cmd.service_action or 0, ctdp=rctd,
            servactv=cmd.service_action is not None, cdb_length=cmd.layout.size)
        if rctd:
            body += _timeouts(cmd)
    return bytes(ALL_COMMANDS_HEADER.encode(command_data_length=len(body))) + bytes(body)


def _timeouts(cmd: Command) -> bytes:
    return bytes(TIMEOUTS_DESCRIPTOR.encode(descriptor_length=0x0A, nominal_command_processing_timeout=cmd.timeout_s,
                                            recommended_command_timeout=cmd.timeout_s * 2))


ALL_COMMANDS_HEADER = Layout("all_commands parameter data header", 4, (  # SPC-4 table 304
    Field("command_data_length", 0, 0xFFFFFFFF),
))
COMMAND_DESCRIPTOR = Layout("command descriptor", 8, (  # SPC-4 table 305
    Field("operation_code", 0, 0xFF),
    Field("service_action", 2, 0xFFFF),
    Field("ctdp", 5, 0x02),
    Field("servactv", 5, 0x01),
    Field("cdb_length", 6, 0xFFFF),
))
ONE_COMMAND_HEADER = Layout("one_command parameter data header", 4, (  # SPC-4 table 306
    Field("ctdp", 1, 0x80),
    Field("support", 1, 0x07),
    Field("cdb_size", 2, 0xFFFF),
))
TIMEOUTS_DESCRIPTOR = Layout("command timeouts descriptor", 12, (  # SPC-4 table 308
    Field("descriptor_length", 0, 0xFFFF),
    Field("command_specific", 3, 0xFF),
    Field("nominal_command_processing_timeout", 4, 0xFFFFFFFF),
    Field("recommended_command_timeout", 8, 0xFFFFFFFF),
))

SERVICE_ACTION_IN_16 = 0x9E
MAINTENANCE_IN = 0xA3

ALL_COMMANDS: tuple[Command, ...] = (
    # SPC-4
    _c(0x00, C.TEST_UNIT_READY, spc.test_unit_ready, NONE, PR_ALLOWED),
    _c(0x03, C.REQUEST_SENSE, spc.request_sense, IN, PR_ALLOWED, alloc="allocation_length", spc2=True),
    _c(0x12, C.INQUIRY, spc.inquiry, IN, PR_ALLOWED, alloc="allocation_length", spc2=True),
    _c(0x15, C.MODE_SELECT_6, spc.mode_select_6, OUT, PR_WRITE),
    _c(0x16, C.RESERVE_6, R.spc2_reserve, NONE, PR_ALLOWED),
    _c(0x17, C.RELEASE_6, R.spc2_release, NONE, PR_ALLOWED, spc2=True),
    _c(0x1A, C.MODE_SENSE_6, spc.mode_sense_6, IN, PR_READ, alloc="allocation_length"),
    _c(0x1E, C.PREVENT_ALLOW_MEDIUM_REMOVAL, spc.prevent_allow_medium_removal, NONE, PR_READ),
    _c(0x48, C.SANITIZE, sbc.sanitize_overwrite, OUT, PR_WRITE, sa=0x01, writes=True, timeout=600),
    _c(0x48, C.SANITIZE, sbc.sanitize_block_erase, NONE, PR_WRITE, sa=0x02, writes=True, timeout=600,
       available=sbc.offers_thin_provisioning),
    _c(0x48, C.SANITIZE, sbc.sanitize_exit_failure_mode, NONE, PR_WRITE, sa=0x1F, writes=True),
    _c(0x55, C.MODE_SELECT_10, spc.mode_select_10, OUT, PR_WRITE),
    _c(0x56, C.RESERVE_10, R.spc2_reserve, NONE, PR_ALLOWED),
    _c(0x57, C.RELEASE_10, R.spc2_release, NONE, PR_ALLOWED, spc2=True),
    _c(0x5A, C.MODE_SENSE_10, spc.mode_sense_10, IN, PR_READ, alloc="allocation_length"),
    _c(0x5E, C.PERSISTENT_RESERVE_IN, P.read_keys, IN, PR_ALLOWED, sa=0x00, alloc="allocation_length"),
    _c(0x5E, C.PERSISTENT_RESERVE_IN, P.read_reservation, IN, PR_ALLOWED, sa=0x01, alloc="allocation_length"),
    _c(0x5E, C.PERSISTENT_RESERVE_IN, P.report_capabilities, IN, PR_ALLOWED, sa=0x02, alloc="allocation_length"),
    _c(0x5E, C.PERSISTENT_RESERVE_IN, P.read_full_status, IN, PR_ALLOWED, sa=0x03, alloc="allocation_length"),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.register, OUT, PR_ALLOWED, sa=0x00),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.reserve, OUT, PR_ALLOWED, sa=0x01),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.release, OUT, PR_ALLOWED, sa=0x02),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.clear, OUT, PR_ALLOWED, sa=0x03),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.preempt, OUT, PR_ALLOWED, sa=0x04),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.preempt_and_abort, OUT, PR_ALLOWED, sa=0x05),
    _c(0x5F, C.PERSISTENT_RESERVE_OUT, P.register_and_ignore_existing_key, OUT, PR_ALLOWED, sa=0x06),
    _c(0xA0, C.REPORT_LUNS, spc.report_luns, IN, PR_ALLOWED, alloc="allocation_length", spc2=True),
    _c(X.EXTENDED_COPY_OPCODE, C.EXTENDED_COPY, X.extended_copy, OUT, PR_WRITE, sa=X.SA_EXTENDED_COPY_LID1),
    _c(X.RECEIVE_COPY_RESULTS_OPCODE, C.RECEIVE_COPY_RESULTS, X.receive_copy_status, IN, PR_ALLOWED,
       sa=X.SA_COPY_STATUS, alloc="allocation_length"),
    _c(X.RECEIVE_COPY_RESULTS_OPCODE, C.RECEIVE_COPY_RESULTS, X.receive_operating_parameters, IN, PR_ALLOWED,
       sa=X.SA_OPERATING_PARAMETERS, alloc="allocation_length"),
    _c(X.RECEIVE_COPY_RESULTS_OPCODE, C.RECEIVE_COPY_RESULTS, X.receive_failed_segment_details, IN, PR_ALLOWED,
       sa=X.SA_FAILED_SEGMENT_DETAILS, alloc="allocation_length"),
    _c(MAINTENANCE_IN, C.REPORT_SUPPORTED_OPERATION_CODES, report_supported_operation_codes, IN, PR_READ,
       sa=0x0C, alloc="allocation_length"),
    _c(MAINTENANCE_IN, C.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS, spc.report_supported_task_management_functions,
       IN, PR_ALLOWED, sa=0x0D, alloc="allocation_length"),
    # SBC-3
    _c(0x08, C.READ_6, sbc.read_6, IN, PR_READ),
    _c(0x0A, C.WRITE_6, sbc.write_6, OUT, PR_WRITE, writes=True),
    # SBC-3 table 13 and SPC-2 table B.1: START=1 with POWER CONDITION 0 runs under every reservation;
    # every other form (a stop, an eject, a power condition) as a write.  READ CAPACITY under either kind.
    _c(0x1B, C.START_STOP_UNIT, sbc.start_stop_unit, NONE, PR_WRITE, exempt=(("start", 1), ("power_condition", 0))),
    _c(0x25, C.READ_CAPACITY_10, sbc.read_capacity_10, IN, PR_ALLOWED, spc2=True),
    _c(0x28, C.READ_10, sbc.read, IN, PR_READ),
    _c(0x2A, C.WRITE_10, sbc.write, OUT, PR_WRITE, writes=True),
    _c(0x2E, C.WRITE_AND_VERIFY_10, sbc.write_and_verify, OUT, PR_WRITE, writes=True),
    _c(0x2F, C.VERIFY_10, sbc.verify, OUT, PR_READ),
    _c(0x34, C.PRE_FETCH_10, sbc.pre_fetch, NONE, PR_READ),
    _c(0x35, C.SYNCHRONIZE_CACHE_10, sbc.synchronize_cache, NONE, PR_WRITE),
    # READ DEFECT DATA conflicts with Write Exclusive too (SBC-3 table 13): it is no read of the medium's data.
    _c(0x37, C.READ_DEFECT_DATA_10, sbc.read_defect_data_10, IN, PR_WRITE, alloc="allocation_length"),
    _c(0x41, C.WRITE_SAME_10, sbc.write_same, OUT, PR_WRITE, writes=True),
    _c(0x42, C.UNMAP, sbc.unmap, OUT, PR_WRITE, writes=True, available=sbc.offers_thin_provisioning),
    _c(0x88, C.READ_16, sbc.read, IN, PR_READ),
    _c(0x89, C.COMPARE_AND_WRITE, sbc.compare_and_write, OUT, PR_WRITE, writes=True),
    _c(0x8A, C.WRITE_16, sbc.write, OUT, PR_WRITE, writes=True),
    _c(0x8B, C.ORWRITE_16, sbc.orwrite, OUT, PR_WRITE, writes=True),
    _c(0x8E, C.WRITE_AND_VERIFY_16, sbc.write_and_verify, OUT, PR_WRITE, writes=True),
    _c(0x8F, C.VERIFY_16, sbc.verify, OUT, PR_READ),
    _c(0x90, C.PRE_FETCH_16, sbc.pre_fetch, NONE, PR_READ),
    _c(0x91, C.SYNCHRONIZE_CACHE_16, sbc.synchronize_cache, NONE, PR_WRITE),
    _c(0x93, C.WRITE_SAME_16, sbc.write_same, OUT, PR_WRITE, writes=True),
    _c(0x9C, C.WRITE_ATOMIC_16, sbc.write_atomic_16, OUT, PR_WRITE, writes=True, available=sbc.offers_write_atomic),
    _c(SERVICE_ACTION_IN_16, C.READ_CAPACITY_16, sbc.read_capacity_16, IN, PR_ALLOWED, sa=0x10,
       alloc="allocation_length", spc2=True),
    _c(SERVICE_ACTION_IN_16, C.GET_LBA_STATUS, sbc.get_lba_status, IN, PR_READ, sa=0x12,
       alloc="allocation_length", available=sbc.offers_thin_provisioning),
    _c(0xA8, C.READ_12, sbc.read, IN, PR_READ),
    _c(0xAA, C.WRITE_12, sbc.write, OUT, PR_WRITE, writes=True),
    _c(0xAE, C.WRITE_AND_VERIFY_12, sbc.write_and_verify, OUT, PR_WRITE, writes=True),
    _c(0xAF, C.VERIFY_12, sbc.verify, OUT, PR_READ),
    _c(0xB7, C.READ_DEFECT_DATA_12, sbc.read_defect_data_12, IN, PR_WRITE, alloc="allocation_length"),
)


def _index(commands) -> dict:
    table: dict = {}
    for cmd in sorted(commands, key=lambda c: (c.opcode, c.service_action or 0)):
        if cmd.service_action is None:
            if cmd.opcode in table:
                raise ValueError(f"opcode {cmd.opcode:#04x} listed twice")
            table[cmd.opcode] = cmd
        else:
            table.setdefault(cmd.opcode, {})[cmd.service_action] = cmd
    return table


#: opcode -> Command, or opcode -> {service action -> Command}
COMMANDS_BY_OPCODE = _index(ALL_COMMANDS)
ALL_COMMANDS = tuple(sorted(ALL_COMMANDS, key=lambda c: (c.opcode, c.service_action or 0)))
