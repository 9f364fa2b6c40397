"""The SCSI logical unit (SAM-5 §4.6) seen by the iSCSI target: one dispatcher, no sockets.

``LogicalUnit.execute(nexus, cdb, data_out, expected_length)`` runs one
command against a ``BackingStore`` and returns a ``ScsiResult``; it never
raises.  The command table (``commands.py``) says which handler runs, how the
CDB is laid out and which of its bits are reserved; handlers raise
``CheckCondition`` and this module turns that into status and sense data.
Unit attention conditions are kept per I_T nexus (SPC-4 §5.14).  Reservations
(``reservations.py``) are checked after unit attentions: a command the
reservation holder's rules forbid ends with RESERVATION CONFLICT status.

Transfer lengths versus the iSCSI Expected Data Transfer Length (EDTL): a
Data-In result carries what the command would transfer (already cut to the
CDB's allocation length); the transport sends at most EDTL of it and sets the
residual from the difference (RFC 7143 §11.4.5).  A Data-Out command writes
only whole blocks it actually received (libiscsi's iSCSIResiduals tests: EDTL
smaller than the CDB's transfer length writes EDTL's worth, larger writes the
CDB's), and reports the bytes its CDB asked for in ``data_out_length`` so the
transport can set the residual.

READ/WRITE(10/16) with nothing unusual about them (``_read_write``: no unit
attention, reservation, reserved/protection/FUA bit, range or length error,
read-only medium, large read or blocking I/O) skip the command table and the
decoded CDB record; whatever it declines runs the full way, which is the
definition (``tests/unit/test_scsi_fast_path.py`` compares the two).
``gather_offset`` accepts the same common WRITEs without writing them, for
the transport to write adjacent ones together (``write_gathered``: one
``writev``); ``tests/unit/test_scsi_gather.py`` checks it accepts only what
the full path answers GOOD.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from node_agent.iscsi.names import normalize_name
from node_agent.scsi import sense as S
from node_agent.scsi.commands import COMMANDS_BY_OPCODE, CONTROL_RESERVED, Command
from node_agent.scsi.lun import decode_lun, encode_lun  # noqa: F401  (re-exported)
from node_agent.scsi.modepages import ModeState
from node_agent.scsi.ptpl import PtplStore
from node_agent.scsi.sidecar import SanitizeMark
from node_agent.scsi.reservations import ReservationConflict, Reservations
from node_agent.scsi.result import FileRange, Nexus, ScsiResult  # noqa: F401  (re-exported)
from node_agent.scsi.sense import CheckCondition, SenseCode, build_sense
from node_agent.scsi.vpd import LunIdentity  # noqa: F401  (re-exported)
from node_agent.storage.backing import ALLOCATION_UNIT, BackingStore

log = logging.getLogger("shoal.scsi")

GOOD = S.GOOD
CHECK_CONDITION = S.CHECK_CONDITION
RESERVATION_CONFLICT = S.RESERVATION_CONFLICT


@dataclass(frozen=True)
class LunSettings:
    """Limits and behaviour of one logical unit (reported in the Block Limits VPD page, SBC-3 §6.6.4)."""

    max_transfer_bytes: int = 8 << 20
    """Largest READ/WRITE: bigger ones get INVALID FIELD IN CDB.  8 MiB is far above
    the 1 MiB that Linux and QEMU send, and bounds the memory one command can pin."""
    optimal_transfer_bytes: int = 1 << 20
    """What initiators should send for streaming I/O (Linux uses it for max_sectors hints)."""
    max_unmap_lba_count: int = 1 << 20
    """Blocks one UNMAP may deallocate; libiscsi considers more than 2^20 insane."""
    max_unmap_descriptors: int = 256
    """UNMAP block descriptors per command."""
    max_write_same_bytes: int = 8 << 20
    """Largest WRITE SAME range.  libiscsi writes MAXIMUM WRITE SAME LENGTH blocks with one
    WRITE(16) before unmapping them, so it must not exceed ``max_transfer_bytes``."""
    max_compare_and_write_blocks: int = 16
    """COMPARE AND WRITE limit (its data is buffered whole)."""
    max_atomic_transfer_bytes: int = 0
    """Largest WRITE ATOMIC(16) (SBC-4 §4.29); 0 (the default) withdraws the command.  One
    ``pwrite`` per command and one command at a time per logical unit make it atomic against
    every other command and against a crash of the target process, but NOT against a power
    loss or kernel crash of this host: the page cache writes back (and the disk persists) in
    pages, so a range that was not yet stable may come back torn.  Databases that see atomic
    write limits may turn off their own torn-page protection, so the command is offered only
    where an operator opts in knowing that (e.g. a backing store on a battery-backed cache)."""
    file_range_threshold: int = 64 << 10
    """Reads of at least this size come back as a ``FileRange`` for sendfile."""
    thin_provisioning: bool = True
    """Report LBPME and support UNMAP / WRITE SAME unmap (SBC-3 §4.7)."""
    read_only: bool = False
    """Write-protect the medium: writes end with DATA PROTECT / WRITE PROTECTED."""
    max_unit_attentions: int = 8
    """Pending unit attentions kept per I_T nexus; older ones are dropped first."""
    persist_reservations: bool = True
    """Offer APTPL (SPC-4 §5.13.5): keep persistent reservations in ``<backing file>.pr``."""
    removable: bool = False
    """A removable medium (RMB=1, SBC-3 §4.13): START STOP UNIT with LOEJ ejects and loads it,
    PREVENT ALLOW MEDIUM REMOVAL holds it in, and while it is out every medium access ends with
    NOT READY, MEDIUM NOT PRESENT.  The backing file stays open either way."""


class LogicalUnit:
    """A direct-access block device (SBC-3) over a backing store."""

    def __init__(self, backing: BackingStore, identity: LunIdentity, *, target_name: str,
                 settings: LunSettings = LunSettings()):
        self.backing = backing
        self.identity = identity
        self.target_name = target_name
        self.settings = settings
        self.block_size = backing.block_size
        self.num_blocks = backing.size // backing.block_size
        self.read_only = settings.read_only or getattr(backing, "read_only", False)
        self._medium_read_only = self.read_only  # without SWP (control mode page), which adds to it
        self.mode = ModeState()
        self.reservations = Reservations(PtplStore.beside(backing) if settings.persist_reservations else None)
        # One logical block per physical block (LBPPBE=0): libiscsi's GetLBAStatus.UnmapSingle
        # only holds for that.  The allocation unit shows up as the optimal granularities instead.
        self.lbppbe = 0
        self.granularity = max(1, ALLOCATION_UNIT // self.block_size)
        self.max_transfer_blocks = max(1, settings.max_transfer_bytes // self.block_size)
        self.max_write_same_blocks = max(1, settings.max_write_same_bytes // self.block_size)
        self.max_atomic_blocks = min(settings.max_atomic_transfer_bytes // self.block_size, self.max_transfer_blocks)
        # MAXIMUM PREFETCH LENGTH (Block Limits VPD), which PRE-FETCH enforces: SBC-4 §6.6.4 asks for no more
        # than the MAXIMUM TRANSFER LENGTH, and a prefetch is only a page-cache hint here.
        self.max_prefetch_blocks = self.max_transfer_blocks
        self.report_luns = lambda: [0]  # replaced by LunMap with the target's inventory
        # REPORT LUNS went to this unit from an I_T nexus: its REPORTED LUNS DATA HAS CHANGED goes (SAM-5
        # §5.14); LunMap replaces it to clear that unit attention on every unit the nexus reaches.
        self.luns_reported = self.clear_reported_luns_changed
        # PREEMPT AND ABORT: end these I_T nexuses' outstanding commands to this unit; LunMap routes it
        # to the transport (``LunMap.on_abort``).  Returns how many were aborted.
        self.abort_tasks = lambda nexuses: 0
        self.copy_targets = lambda: [self]  # EXTENDED COPY's reachable logical units; LunMap: the target's
        self.copy_results: dict = {}  # (nexus, list identifier) -> xcopy.CopyOutcome held for RECEIVE COPY RESULTS
        self._ua: dict[Nexus, list[SenseCode]] = {}
        self._ua_pending = 0  # how many nexuses have a unit attention queued
        self.medium_present = True  # False once a removable medium is ejected
        self.prevent_removal: set[Nexus] = set()  # I_T nexuses with PREVENT=01b (SPC-4 §6.13)
        self._gate = False  # a unit attention is queued, the medium is out or a SANITIZE runs: the one fast-path test
        # A SANITIZE running on a worker thread: [finished] (the worker sets it; the loop then clears this).
        self._sanitize: list[bool] | None = None
        self._sanitize_failed = False  # the last sanitize did not finish: media access ends (SBC-4 §4.11)
        self._sanitize_ause = False  # the last sanitize had AUSE: EXIT FAILURE MODE may end its failed state
        # ``<backing file>.sanitize`` while a pass runs or the unit is in the failed state: a unit opened on a
        # file whose sanitize died with the process serving it (a crash, a kill) starts in the failed state.
        self._sanitize_mark = SanitizeMark.beside(backing)
        if self._sanitize_mark is not None and self._sanitize_mark.present():
            log.warning("%s: %s did not finish (the medium may be partly erased): media access ends with "
                        "SANITIZE COMMAND FAILED until a SANITIZE completes or EXIT FAILURE MODE", target_name,
                        self._sanitize_mark.describe())
            self._sanitize_failed = self._gate = True
            self._sanitize_ause = self._sanitize_mark.allows_exit()
        self._sanitize_by: Nexus | None = None  # who started the running one
        # Set to stop the running pass at its next chunk (a fence, a removal; ``sbc._replicate`` looks); one
        # left set after its pass ended stops nothing (``sanitizing`` is False) and the next SANITIZE clears it.
        self.sanitize_stopping = False
        # SANITIZE commands that began a pass on this unit, counted on the event loop: an EXTENDED COPY of
        # another unit that reaches this one stops once it changed since the copy began (``xcopy._reach``),
        # however quickly that sanitize then ended.
        self.sanitizes_begun = 0
        self._fua_always = False  # WCE=0 in the caching mode page
        self._range_threshold = settings.file_range_threshold
        # I/O counters (read by the agent's metrics at scrape time): READ and WRITE commands that
        # reached the medium and the bytes they moved; plain ints bumped on the portal's loop thread.
        self.read_commands = self.read_bytes = self.write_commands = self.write_bytes = 0
        # Non-blocking I/O of the backing store (``FileBackingStore.read_nowait``/``write_nowait``):
        # READ and WRITE try these inline and hand the I/O to a worker (``deferred``) when they would
        # block.  Only methods the store's own class defines count: a wrapper that forwards unknown
        # attributes to the store it wraps must not have its ``write`` bypassed (the agent's
        # copy-before-write guard defines guarded versions: ``agent.copies.guarded``).  An ``atomic``
        # unit is inline too: its WRITE ATOMIC is atomic because all its I/O runs one command at a time
        # on the loop.
        inline = self.max_atomic_blocks > 0
        self.read_nowait = None if inline else _own_method(backing, "read_nowait")
        self.write_nowait = None if inline else _own_method(backing, "write_nowait")
        # Gathered writes (``gather_offset``/``write_gathered``): the store's own ``writev``, used only
        # while its plain writes run inline anyway (``inline_writes``: ext4 refuses RWF_NOWAIT writes).
        self._writev = None if inline else _own_method(backing, "writev")
        self._io_lock = threading.Condition()
        self.rmw_lock = threading.Lock()  # COMPARE AND WRITE, ORWRITE: read to write (``sbc._read_modify_write``)
        self._io_running = 0  # deferred I/O running on worker threads
        self._io_paused = 0  # ``io_paused`` holders: deferred I/O waits before it starts
        # Deferred I/O in order: a ticket per job from when the event loop hands it out (``deferred``) until it
        # has run (and per ``foreign_io`` section while it runs), so that ``wait_for_earlier_io`` waits for the
        # jobs before its own, whether running or still queued for a worker, and for none after it.
        self._tickets = 0
        self._unfinished: set[int] = set()
        self._worker = threading.local()  # .ticket: the job this worker thread runs
        self._closed = False

    # -- the dispatcher --------------------------------------------------------
    def execute(self, nexus: Nexus, cdb, data_out, expected_length: int, defer: bool = False) -> ScsiResult:
        """Run one command.  ``defer=True``: the caller (the transport) accepts a result whose I/O
        still has to run (``ScsiResult.blocking``); otherwise such I/O runs here, blocking."""
        if defer:
            return self.execute_deferrable(nexus, cdb, data_out, expected_length)
        result = self.execute_deferrable(nexus, cdb, data_out, expected_length)
        return result if result.blocking is None else result.blocking()

    def execute_deferrable(self, nexus: Nexus, cdb, data_out, expected_length: int, *,
                           try_fast: bool = True) -> ScsiResult:
        """``execute(..., defer=True)`` without the indirection (the transport's hot path).

        ``try_fast=False``: ``execute_inline`` has just declined this command, so ``_read_write`` is not
        tried again (for a write that would block, that would be a second failed non-blocking attempt)."""
        try:
            fast = _FAST_RW.get(cdb[0]) if try_fast else None
            if fast is not None and not self._gate and not self.reservations.engaged:
                result = self._read_write(fast, cdb, data_out)
                if result is not None:
                    return result
            if self.reservations.pending:  # reservation saves that ended: undone or announced before all else
                self.reservations.settle_saves()
            if self._gate:
                early = self._gated(nexus, cdb[0])
                if early is not None:
                    return early
            cmd = COMMANDS_BY_OPCODE.get(cdb[0])
            if cmd is None or cmd.__class__ is dict:  # unknown, or chosen by service action: the full lookup
                cmd = _lookup(cdb)
            if self.reservations.engaged and self.reservations.conflicts(cmd, nexus, cdb):
                return ScsiResult(RESERVATION_CONFLICT)
            rec = _validate(cmd, cdb)
            # A command this unit does not offer (UNMAP when thick, WRITE ATOMIC unless opted in) ends as an
            # unknown one, once the checks every row gets have passed (a set reserved bit is still named).
            if cmd.available is not None and not cmd.available(self):
                raise CheckCondition(S.INVALID_COMMAND_OPERATION_CODE, field_pointer=0)
            if cmd.writes and self.read_only:
                raise CheckCondition(S.WRITE_PROTECTED)
            out = cmd.handler(self, nexus, rec, data_out, expected_length)
            if out is None:
                return ScsiResult(GOOD)
            if out.__class__ is ScsiResult:
                return out
            if cmd.alloc_field is not None:
                alloc = getattr(rec, cmd.alloc_field)
                if len(out) > alloc:
                    out = out[:alloc]
            return ScsiResult(GOOD, out)
        except CheckCondition as cc:
            return ScsiResult(CHECK_CONDITION, sense=cc.sense(self.mode.d_sense))
        except ReservationConflict:
            return ScsiResult(RESERVATION_CONFLICT)
        except Exception as exc:  # a bug or an I/O error: never leak it to the transport
            return self._failed(exc, f"SCSI command {bytes(cdb[:16]).hex()}")

    def execute_inline(self, cdb, data_out) -> ScsiResult | None:
        """A common READ/WRITE(10/16) (see ``_read_write``) done now, or None (nothing done): then
        ``execute_deferrable`` decides.  Never keeps ``data_out`` once it returns, so the transport may
        pass a view of its receive buffer; an error (a failing store) also answers None, and the full
        path, running the command again, reports it."""
        fast = _FAST_RW.get(cdb[0])
        if fast is None or self._gate or self.reservations.engaged:
            return None
        try:
            return self._read_write(fast, cdb, data_out)
        except Exception:  # noqa: BLE001 - the full path repeats the command and reports what failed
            return None

    def read_inline(self, cdb) -> bytes | bytearray | None:
        """The data of a common READ(10/16) (see ``_read_write``) read now, or None (nothing done):
        then ``execute_deferrable`` decides.  ``execute_inline`` for reads, answering the data itself
        (no ``ScsiResult``): the transport's hot path.  An error (a failing store) also answers None,
        and the full path, running the command again, reports it."""
        fast = _FAST_RW.get(cdb[0])
        if fast is None or fast[2] or self._gate or self.reservations.engaged:
            return None
        try:
            plain = self._plain_range(fast, cdb, None)
            return None if plain is None else self._read_now(plain[0], plain[1])
        except Exception:  # noqa: BLE001 - the full path repeats the command and reports what failed
            return None

    def gather_offset(self, cdb, data_out) -> int | None:
        """For a WRITE(10/16) that ``execute_inline`` would write right away, to a store whose writes
        run inline and which offers ``writev``: the byte offset ``data_out`` goes to, and nothing
        done yet; the caller writes it together with its neighbours (``write_gathered``), keeping
        ``data_out`` unchanged until then.  None: not such a write (``execute_inline`` decides)."""
        if data_out is None or self.gather_limits() is None:
            return None
        fast = _FAST_RW.get(cdb[0])
        if fast is None or not fast[2]:
            return None
        plain = self._plain_range(fast, cdb, data_out)  # the same tests as ``_read_write``'s write
        return None if plain is None else plain[0] * self.block_size

    def gather_limits(self) -> tuple[int, int, int] | None:
        """The unit's half of ``gather_offset``, also for the target's C run (``iscsi/_fastpath.c``), which does
        the CDB's half itself: (blocks, block size, most blocks per command) while this unit takes gathered writes
        (a store that writes inline and offers ``writev``; no unit attention, reservation, read-only medium
        or forced FUA), else None.  Valid until anything else runs on the unit (one receive)."""
        if (self._writev is None or self._gate or self.reservations.engaged or self.read_only or self._fua_always
                # a store that can say "would block": each write asks it on its own
                or self.write_nowait is not None and not self.backing.inline_writes):
            return None
        return self.num_blocks, self.block_size, self.max_transfer_blocks

    def write_gathered(self, offset: int, pieces: list, length: int, commands: int) -> bool:
        """Write the data of ``commands`` WRITEs accepted by ``gather_offset`` (adjacent, in order:
        ``length`` bytes from ``offset``) with one ``writev``.  False if that failed (nothing counted;
        the caller runs each command again the full way, which reports what fails)."""
        try:
            self._writev(offset, pieces, length)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - the full path repeats each command and reports the error
            log.debug("gathered write of %d bytes at %d failed", length, offset, exc_info=True)
            return False
        self.write_commands += commands
        self.write_bytes += length
        return True

    def _plain_range(self, fast: tuple, cdb, data_out) -> tuple[int, int] | None:
        """(LBA, blocks) of a READ/WRITE(10/16) with nothing unusual: no reserved, protection or FUA
        bit, a range and length the handler would take, and for a write a writable medium, write
        caching on and exactly the data the CDB asks for.  None otherwise."""
        unpack, size, writes, refused = fast
        if len(cdb) < size:
            return None
        if size == 10:
            _, flags, lba, group, count, control = unpack(cdb)
        else:
            _, flags, lba, count, group, control = unpack(cdb)
        if (flags & refused or group & 0xE0 or control & _CONTROL_RESERVED or not count
                or lba + count > self.num_blocks or count > self.max_transfer_blocks):
            return None
        if writes and (self.read_only or self._fua_always or data_out is None
                       or len(data_out) != count * self.block_size):
            return None
        return lba, count

    def _read_write(self, fast: tuple, cdb, data_out) -> ScsiResult | None:
        """READ/WRITE(10/16) the common way, from one ``struct`` unpack of the CDB; None when anything
        is unusual (a reserved or protection bit, FUA, a range or length the handler would refuse,
        a read-only medium, a large read sent with ``sendfile``, I/O that would block): nothing was
        done then, and the full path (``_validate`` and the ``sbc`` handler) decides.

        The caller has already checked what comes first there: no unit attention or absent
        medium (``_gate``) and no reservation (``engaged``)."""
        plain = self._plain_range(fast, cdb, data_out)
        if plain is None:
            return None
        lba, count = plain
        bs = self.block_size
        length = count * bs
        if fast[2]:
            write_nowait = self.write_nowait
            if write_nowait is None:
                self.backing.write(lba * bs, data_out, False)
            elif not write_nowait(lba * bs, data_out, False):
                return None  # would block: the full path hands it to a worker
            self.write_commands += 1
            self.write_bytes += length
            return ScsiResult(GOOD, None, b"", length)
        data = self._read_now(lba, count)
        return None if data is None else ScsiResult(GOOD, data)

    def _read_now(self, lba: int, count: int) -> bytes | bytearray | None:
        """``count`` blocks from ``lba`` (a range ``_plain_range`` accepted) if they can be read without
        waiting for the disk and are not sent with ``sendfile``; None otherwise, nothing done."""
        bs = self.block_size
        length = count * bs
        if length >= self._range_threshold:
            return None
        read_nowait = self.read_nowait
        data = self.backing.read(lba * bs, length) if read_nowait is None else read_nowait(lba * bs, length)
        if data is None:
            return None  # not in the page cache: the full path reads it on a worker
        self.read_commands += 1
        self.read_bytes += length
        return data

    def _gated(self, nexus: Nexus, opcode: int) -> ScsiResult | None:
        """A pending unit attention (SPC-4 §5.14), then an absent medium (SBC-3 §4.13), end the command."""
        if self._ua_pending and opcode not in _UA_EXEMPT:
            ua = self._take_ua(nexus)
            if ua is not None:
                return ScsiResult(CHECK_CONDITION, sense=build_sense(ua, descriptor=self.mode.d_sense))
        run = self._sanitize
        if run is not None:
            if run[0]:  # finished on its worker: cleared here, on the loop, which alone changes the gate
                self._sanitize = None
                self._regate()
            elif opcode not in _UA_EXEMPT:  # SBC-4 §4.11: all else ends with SANITIZE IN PROGRESS
                return ScsiResult(CHECK_CONDITION, sense=build_sense(S.SANITIZE_IN_PROGRESS,
                                                                     descriptor=self.mode.d_sense))
        if self._sanitize_failed and opcode not in _SANITIZE_FAILED_EXEMPT:
            return ScsiResult(CHECK_CONDITION, sense=build_sense(S.SANITIZE_COMMAND_FAILED,
                                                                 descriptor=self.mode.d_sense))
        if not self.medium_present and opcode not in _NO_MEDIUM_EXEMPT:
            return ScsiResult(CHECK_CONDITION, sense=build_sense(S.MEDIUM_NOT_PRESENT, descriptor=self.mode.d_sense))
        return None

    def _regate(self) -> None:
        self._gate = (self._ua_pending > 0 or not self.medium_present or self._sanitize is not None
                      or self._sanitize_failed)

    @property
    def sanitize_failed(self) -> bool:
        """The last sanitize failed, and no EXIT FAILURE MODE since (REQUEST SENSE says so)."""
        return self._sanitize_failed and not self.sanitizing

    def exit_sanitize_failure(self) -> None:
        """SANITIZE EXIT FAILURE MODE: the medium is usable again after a sanitize that failed (its data
        as the failed pass left it).  Only if that sanitize had AUSE set (SBC-4 §5.30.1); otherwise only a
        sanitize that completes ends the state, and this is refused with INVALID FIELD IN CDB."""
        if self._sanitize_failed and not self._sanitize_ause:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
        if self._sanitize_failed:
            log.warning("%s: leaving the failed-sanitize state; the medium holds what the failed pass left",
                        self.target_name)
            if self._sanitize_mark is not None:
                self._sanitize_mark.clear()  # an error here leaves the unit failed: as it would be after a restart
        self._sanitize_failed = False
        self._regate()

    def _sanitize_pass(self, io: Callable[[], Any], kind: str, by: Nexus | None, ause: bool) -> None:
        """Run a sanitize's pass over the medium; one that fails (an I/O error part way) leaves the unit in
        the failed state, ending media access with MEDIUM ERROR, SANITIZE COMMAND FAILED until a sanitize
        succeeds or EXIT FAILURE MODE (SBC-4 §4.11): never a half-erased medium served as if all were well.
        The state outlives the process: the mark beside the backing file is on disk before the first block
        changes and goes only once ``io`` has made the medium stable (both handlers end with a flush).
        On a worker the flag is only read on the loop once the pass is over (``_gated`` regates then)."""
        mark = self._sanitize_mark
        if mark is not None:  # failing here (a full or read-only directory), nothing is erased: no state changes
            mark.set(kind, None if by is None else by.initiator_port, ause)
        try:
            io()
            if mark is not None:
                mark.clear()
        except BaseException:
            self._sanitize_failed = True
            raise
        self._sanitize_failed = False

    def stop_sanitize(self, initiator_name: str | None = None) -> bool:
        """Stop the running sanitize at its next chunk (of ``initiator_name``'s, when given), leaving the
        unit in the failed-sanitize state: for a fence, after which none of that initiator's writes may
        land, and for removing the unit.  True if one was running."""
        by = self._sanitize_by
        if not self.sanitizing or (initiator_name is not None and by is not None
                                   and normalize_name(by.initiator_port.rpartition(",i,")[0])
                                   != normalize_name(initiator_name)):  # names compare case-blind (RFC 3722)
            return False
        self.sanitize_stopping = True
        log.warning("%s: stopping the running sanitize; the unit stays in the failed-sanitize state",
                    self.target_name)
        return True

    @property
    def sanitizing(self) -> bool:
        """A SANITIZE is still running (REQUEST SENSE says so)."""
        run = self._sanitize
        return run is not None and not run[0]

    def sanitize(self, io: Callable[[], Any], done: ScsiResult | None, nexus: Nexus | None = None,
                 kind: str = "SANITIZE", ause: bool = False, immed: bool = False) -> ScsiResult | None:
        """Run a SANITIZE's ``io`` (a pass over the whole medium: minutes for a large one) on a worker thread
        when the transport can, meanwhile ending every other command to this unit but INQUIRY, REPORT LUNS
        and REQUEST SENSE with NOT READY, SANITIZE IN PROGRESS (SBC-4 §4.11); the command completes with
        ``done`` (None: GOOD) when it is over.  Here, at once, otherwise.  ``nexus`` started it (a fence of
        its initiator stops it: ``stop_sanitize``); ``kind`` names it in the mark (``_sanitize_pass``); ``ause``:
        its AUSE bit (EXIT FAILURE MODE allowed should it fail); ``immed``: its IMMED bit, the command answered
        as soon as the pass is on its worker, the pass going on (its outcome then only in the unit's state:
        SANITIZE IN PROGRESS, then the failed state or none)."""
        self._sanitize_by = nexus
        self._sanitize_ause = ause
        self.sanitize_stopping = False
        self.sanitizes_begun += 1
        # On a worker for a store that can block (an atomic unit's too: the gate keeps all other I/O of the
        # unit out meanwhile, so its one-command-at-a-time atomicity holds, and the loop serves the others).
        if _own_method(self.backing, "write_nowait") is None:
            try:
                self._sanitize_pass(io, kind, nexus, ause)
            finally:
                self._regate()
            return done
        run = [False]

        def whole() -> None:
            try:
                self._after_earlier_io()
                self._sanitize_pass(io, kind, nexus, ause)
            finally:
                run[0] = True
        self._sanitize = run
        self._gate = True
        result = self.deferred(whole, done)
        result.outlives_abort = True  # task management does not stop a sanitize, nor wait for it
        if immed:
            result.answer_now = done or ScsiResult(GOOD)
        return result

    def load_or_eject(self, load: bool) -> None:
        """START STOP UNIT with LOEJ on a removable medium; refused while an I_T nexus prevents removal."""
        if self.prevent_removal:
            raise CheckCondition(S.MEDIUM_REMOVAL_PREVENTED)
        if not load and self.medium_present:
            self.backing.flush()
        self.medium_present = load
        self._regate()

    def io_counters(self) -> tuple[int, int, int, int]:
        """(read commands, read bytes, write commands, write bytes) since the unit was opened."""
        return self.read_commands, self.read_bytes, self.write_commands, self.write_bytes

    # -- I/O off the event loop ----------------------------------------------------
    def deferred(self, io: Callable[[], Any], done: ScsiResult | None = None) -> ScsiResult:
        """A command whose I/O would block: the transport runs ``io`` on a worker thread, then
        completes the command with ``done`` (None: GOOD with the data ``io`` returned, or the
        ``ScsiResult`` it returned).

        Every check of the command has already passed on the event loop; only the I/O moves."""
        ticket = self._take_ticket()
        return ScsiResult(GOOD, blocking=lambda: self._run_blocking(io, done, ticket))

    def _take_ticket(self) -> int:
        with self._io_lock:
            self._tickets += 1
            self._unfinished.add(self._tickets)
            return self._tickets

    def _return_ticket(self, ticket: int) -> None:  # under ``_io_lock``
        self._unfinished.discard(ticket)
        if not self._unfinished or min(self._unfinished) > ticket:  # the oldest ended: a waiter may go on
            self._io_lock.notify_all()

    @contextlib.contextmanager
    def io_paused(self) -> Iterator[None]:
        """Inside, no deferred I/O of this unit runs: entering waits for what runs, and what a worker
        picks up meanwhile waits until the block is left.  For the event loop that executes this unit's
        commands (which then runs none either): a point in time of the medium (a snapshot's start)."""
        with self._io_lock:
            self._io_paused += 1
            while self._io_running:
                self._io_lock.wait()
        try:
            yield
        finally:
            with self._io_lock:
                self._io_paused -= 1
                self._io_lock.notify_all()

    @contextlib.contextmanager
    def foreign_io(self) -> Iterator[bool]:
        """Count I/O that a command of another unit does to this one (EXTENDED COPY into or out of it, chunk
        by chunk on that command's worker) as this unit's own while it runs: a SANITIZE's pass and PREEMPT
        AND ABORT's GOOD (``_after_earlier_io``, ``wait_for_earlier_io``), ``io_paused`` and ``retire`` wait
        for it.  The caller checks the unit's state (sanitize, reservations) inside, so a change made before
        such a waiter started is seen, and one made after is waited for.  Yields True inside the counted
        section; never waits: yields False, counting nothing, while the unit is closed or its I/O is paused
        (``call_quiesced`` pauses a target's units one after another, waiting for the copy on one while the
        copy would wait for the next)."""
        with self._io_lock:
            admitted = not (self._closed or self._io_paused)
            self._io_running += admitted
            if admitted:
                self._tickets += 1
                ticket = self._tickets
                self._unfinished.add(ticket)
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            with self._io_lock:
                self._io_running -= 1
                self._return_ticket(ticket)
                if self._io_running <= 1:  # as ``_run_blocking``: io_paused waits for 0
                    self._io_lock.notify_all()

    def wait_for_earlier_io(self) -> None:
        """On a worker, inside ``_run_blocking``: wait until this unit's deferred I/O handed out before this job
        (running, or still queued for a worker) has ended; what was handed out after it is not waited for, so
        a steady stream of later I/O cannot hold it back.  PREEMPT AND ABORT's GOOD, and a reset's answer,
        wait so: no WRITE of a preempted or aborted nexus lands after them."""
        mine = getattr(self._worker, "ticket", None)
        with self._io_lock:
            while not self._closed and self._unfinished and (mine is None or min(self._unfinished) < mine):
                self._io_lock.wait()

    def _after_earlier_io(self) -> None:
        """On a worker, inside ``_run_blocking``: wait until this unit's other I/O on workers has ended.  A
        SANITIZE's pass must not be overwritten by a WRITE (or UNMAP, WRITE SAME, EXTENDED COPY) accepted
        before it and still running: that data would outlive a sanitize that answers GOOD.  The portal's
        pool starts one unit's jobs in the order they came (``FairPool``), so what came before is running
        or done by now; commands that come after are refused (SANITIZE IN PROGRESS) and add none."""
        self.wait_for_earlier_io()
        if self._closed or self.sanitize_stopping:  # a removal or a fence came first: nothing was erased
            raise InterruptedError("the sanitize was stopped before its pass began")

    def _failed(self, exc: Exception, what: str) -> ScsiResult:
        """CHECK CONDITION for a command that raised ``exc``: out of space says so (``S.failure_code``) and is
        logged in one line (a full disk fails every write until it is freed); anything else with its trace."""
        code = S.failure_code(exc)
        if code is S.INTERNAL_TARGET_FAILURE:
            log.error("%s failed", what, exc_info=exc)
        else:
            log.warning("%s failed: %s: the backing store is out of space", what, exc)
        return ScsiResult(CHECK_CONDITION, sense=build_sense(code, descriptor=self.mode.d_sense))

    def _run_blocking(self, io: Callable[[], Any], done: ScsiResult | None, ticket: int) -> ScsiResult:
        with self._io_lock:
            while self._io_paused and not self._closed:
                self._io_lock.wait()
            if self._closed:  # the unit was closed while the command waited for a worker
                self._return_ticket(ticket)
                return ScsiResult(CHECK_CONDITION, sense=build_sense(S.INTERNAL_TARGET_FAILURE,
                                                                     descriptor=self.mode.d_sense))
            self._io_running += 1
        self._worker.ticket = ticket
        try:
            data = io()
        except Exception as exc:
            return self._failed(exc, f"deferred I/O of {self.target_name}")
        finally:
            self._worker.ticket = None
            with self._io_lock:
                self._io_running -= 1
                self._return_ticket(ticket)
                if self._io_running <= 1:  # io_paused waits for 0
                    self._io_lock.notify_all()
        if done is not None:
            return done
        return data if data.__class__ is ScsiResult else ScsiResult(GOOD, data)

    # -- helpers for handlers ----------------------------------------------------
    def check_range(self, lba: int, count: int) -> None:
        """LOGICAL BLOCK ADDRESS OUT OF RANGE unless ``[lba, lba+count)`` is on the medium (SBC-3 §4.5)."""
        if lba + count > self.num_blocks:
            raise CheckCondition(S.LBA_OUT_OF_RANGE)

    def write_is_fua(self, fua: bool) -> bool:
        return fua or self._fua_always

    def mode_changed(self, by: Nexus) -> None:
        self._fua_always = not self.mode.wce
        self.read_only = self._medium_read_only or self.mode.swp  # SWP: software write protect (SPC-4 §7.5.8)
        self.establish_ua(S.MODE_PARAMETERS_CHANGED, except_nexus=by)

    # -- unit attentions (SPC-4 §5.14) ---------------------------------------------
    def add_nexus(self, nexus: Nexus) -> None:
        """A new I_T nexus sees POWER ON, RESET, OR BUS DEVICE RESET OCCURRED first."""
        self._ua[nexus] = []
        self._queue_ua(nexus, S.POWER_ON_RESET)

    def remove_nexus(self, nexus: Nexus) -> None:
        """I_T nexus loss: its unit attentions go, and its SPC-2 reservation (SPC-2 §5.5.1)."""
        queue = self._ua.pop(nexus, None)
        if queue:
            self._ua_pending -= 1
            self._regate()
        self.prevent_removal.discard(nexus)
        if self.copy_results:
            for key in [k for k in self.copy_results if k[0] == nexus]:
                del self.copy_results[key]
        if self.reservations.spc2_holder == nexus:
            self.reservations.spc2_reserve(None)

    def reset(self, kind: str) -> None:
        """LOGICAL UNIT RESET ("lun": 29h/03h) or a target reset ("target": 29h/00h), SAM-5 §6.3.

        Either releases an SPC-2 reservation; persistent reservations survive (SPC-4 §5.13.1)."""
        code = S.BUS_DEVICE_RESET_FUNCTION_OCCURRED if kind == "lun" else S.POWER_ON_RESET
        self.reservations.spc2_reserve(None)
        self.prevent_removal.clear()  # SPC-4 §6.13: a reset ends every prevention
        self.establish_ua(code)

    def capacity_changed(self) -> None:
        self.num_blocks = self.backing.size // self.block_size
        self.establish_ua(S.CAPACITY_DATA_HAS_CHANGED)

    def resize(self, new_bytes: int) -> None:
        self.backing.resize(new_bytes)
        self.capacity_changed()

    def reported_luns_changed(self) -> None:
        self.establish_ua(S.REPORTED_LUNS_DATA_HAS_CHANGED)

    def establish_ua(self, code: SenseCode, except_nexus: Nexus | None = None) -> None:
        for nexus in self._ua:
            if nexus != except_nexus:
                self._queue_ua(nexus, code)

    def unit_attention(self, nexus: Nexus, code: SenseCode) -> None:
        """Queue ``code`` for one I_T nexus, if it is logged in (reservation changes, SPC-4 §5.13)."""
        if nexus in self._ua:
            self._queue_ua(nexus, code)

    def pending_unit_attention(self, nexus: Nexus) -> SenseCode | None:
        queue = self._ua.get(nexus)
        return queue[0] if queue else None

    def _queue_ua(self, nexus: Nexus, code: SenseCode) -> None:
        queue = self._ua.setdefault(nexus, [])
        if code in queue:
            return
        if code.asc == 0x29:  # a reset supersedes every older condition (SPC-4 §5.14)
            if queue:
                self._ua_pending -= 1
            queue.clear()
        if not queue:
            self._ua_pending += 1
            self._gate = True
        queue.append(code)
        del queue[: -self.settings.max_unit_attentions]

    def _take_ua(self, nexus: Nexus) -> SenseCode | None:
        queue = self._ua.get(nexus)
        if not queue:
            return None
        code = queue.pop(0)
        if not queue:
            self._ua_pending -= 1
            self._regate()
        return code

    def take_unit_attention(self, nexus: Nexus) -> SenseCode | None:
        """REQUEST SENSE reports and clears the oldest unit attention."""
        return self._take_ua(nexus)

    def clear_unit_attention(self, nexus: Nexus, code: SenseCode) -> None:
        """Drop ``code`` from ``nexus``'s pending unit attentions, if it is there (unreported)."""
        queue = self._ua.get(nexus)
        if not queue or code not in queue:
            return
        queue.remove(code)
        if not queue:
            self._ua_pending -= 1
            self._regate()

    def clear_reported_luns_changed(self, nexus: Nexus) -> None:
        """REPORT LUNS clears a pending REPORTED LUNS DATA HAS CHANGED for its I_T nexus (SAM-5 §5.14, SPC-4
        §6.33; UA_INTLCK_CTRL is always 00b here: the control mode page does not let it change)."""
        self.clear_unit_attention(nexus, S.REPORTED_LUNS_DATA_HAS_CHANGED)

    def retire(self) -> None:
        """The slow half of ``close``, for a thread other than the event loop once no session can send
        this unit another command: no deferred I/O starts after this, what runs finishes, and the
        medium is flushed (fdatasync, seconds for a volume with much unwritten data).  ``close``,
        then, has little left to do.  A flush that fails is logged; ``close`` tries again."""
        self.stop_sanitize()  # a pass over the whole medium would hold the removal for minutes
        with self._io_lock:
            self._closed = True
            self._io_lock.notify_all()  # a job waiting for earlier I/O gives up (``wait_for_earlier_io``)
            while self._io_running:
                self._io_lock.wait()
        if not self.read_only:
            try:
                self.backing.flush()
            except OSError as exc:
                log.error("flushing LUN of %s before closing it failed: %s", self.target_name, exc)

    def close(self) -> None:
        """Close the backing store once no deferred I/O uses it (none starts after this)."""
        with self._io_lock:
            self._closed = True
            self._io_lock.notify_all()
            while self._io_running:
                self._io_lock.wait()
        self.backing.close()


def _own_method(obj, name: str):
    """``obj.name`` if ``obj``'s class defines it (not reached through ``__getattr__``), else None."""
    return getattr(obj, name) if hasattr(type(obj), name) else None


# READ/WRITE(10/16) on ``LogicalUnit._read_write``: opcode -> (CDB unpacker, CDB size, writes, byte-1 bits
# that send it the full way).  The unpackers give opcode, byte 1, LBA, then group number byte and transfer
# length (10) or transfer length and group number byte (16), then CONTROL.  Byte 1 (SBC-3 §5.8, §5.33):
# RDPROTECT/WRPROTECT 0xE0 (no protection information here), DPO 0x10, FUA 0x08, RARC 0x04 (reads),
# FUA_NV 0x02; the rest is reserved.  A FUA write waits for the disk: a worker's job.
_RW10 = struct.Struct(">BBIBHB").unpack_from
_RW16 = struct.Struct(">BBQIBB").unpack_from
_FAST_RW: dict[int, tuple] = {0x28: (_RW10, 10, False, 0xE1), 0x88: (_RW16, 16, False, 0xE1),
                              0x2A: (_RW10, 10, True, 0xED), 0x8A: (_RW16, 16, True, 0xED)}
_CONTROL_RESERVED = CONTROL_RESERVED

_UA_EXEMPT = frozenset((0x12, 0xA0, 0x03))  # INQUIRY, REPORT LUNS, REQUEST SENSE (SPC-4 §5.14)
# And SANITIZE (another try, or EXIT FAILURE MODE) and the reservation commands, which touch no medium: the
# initiator left to recover must be able to PREEMPT a reservation its failed owner still holds.
_SANITIZE_FAILED_EXEMPT = _UA_EXEMPT | {0x48, 0x5E, 0x5F, 0x16, 0x17, 0x56, 0x57}
# What runs without a medium: the exempt three, START STOP UNIT and PREVENT ALLOW (to load it),
# mode pages, reservations, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS.
_NO_MEDIUM_EXEMPT = _UA_EXEMPT | frozenset((0x1B, 0x1E, 0x15, 0x1A, 0x55, 0x5A, 0x5E, 0x5F, 0x16, 0x17, 0x56,
                                            0x57, 0xA3))


def _lookup(cdb) -> Command:
    cmd = COMMANDS_BY_OPCODE.get(cdb[0])
    if cmd is None:
        raise CheckCondition(S.INVALID_COMMAND_OPERATION_CODE, field_pointer=0)
    if cmd.__class__ is dict:
        sa = cdb[1] & 0x1F if len(cdb) > 1 else 0
        found = cmd.get(sa)
        if found is None:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
        return found
    return cmd


def _validate(cmd: Command, cdb):
    """Decode the CDB; reserved bits or NACA/LINK set → INVALID FIELD IN CDB with a field pointer."""
    if len(cdb) < cmd.layout.size:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=len(cdb))
    for index, mask in cmd.reserved:
        bad = cdb[index] & mask
        if bad:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=index, bit_pointer=bad.bit_length() - 1)
    return cmd.layout.decode(cdb)


def sense_for_absent_lun(descriptor: bool = False) -> bytes:
    return build_sense(S.LOGICAL_UNIT_NOT_SUPPORTED, descriptor=descriptor)




class LunMap:
    """The target's logical units as one I_T nexus addresses them (SAM-5 §4.7, SPC-4 §6.33).

    REPORT LUNS is answered here for any LUN (including an absent LUN 0);
    INQUIRY to an absent LUN returns peripheral qualifier 011b; REQUEST SENSE
    to it returns LOGICAL UNIT NOT SUPPORTED as sense data; anything else to
    it ends with CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED.
    """

    def __init__(self, luns: dict[int, LogicalUnit]):
        self.luns = dict(luns)
        # The transport's hook for PREEMPT AND ABORT: (LUN, I_T nexuses) -> commands aborted.
        self.on_abort: Callable[[int, list[Nexus]], int] | None = None
        for number, lu in self.luns.items():
            self._attach(number, lu)

    def lun_numbers(self) -> list[int]:
        return sorted(self.luns)

    def units(self) -> list[LogicalUnit]:
        return list(self.luns.values())

    def _attach(self, number: int, unit: LogicalUnit) -> None:
        unit.report_luns = self.lun_numbers
        unit.luns_reported = self.luns_reported
        unit.copy_targets = self.units
        unit.abort_tasks = lambda nexuses: self.on_abort(number, nexuses) if self.on_abort is not None else 0

    def add(self, lun: int, unit: LogicalUnit) -> None:
        self.luns[lun] = unit
        self._attach(lun, unit)
        for other in self.luns.values():
            other.reported_luns_changed()

    def remove(self, lun: int) -> LogicalUnit | None:
        unit = self.luns.pop(lun, None)
        for other in self.luns.values():
            other.reported_luns_changed()
        return unit

    def execute(self, nexus: Nexus, lun: int, cdb, data_out, expected_length: int,
                defer: bool = False) -> ScsiResult:
        unit = self.luns.get(lun)
        if unit is not None:
            return unit.execute(nexus, cdb, data_out, expected_length, defer)
        return self._absent(nexus, cdb)

    def luns_reported(self, nexus: Nexus) -> None:
        """REPORT LUNS from ``nexus`` (to any LUN, present or not) has returned the inventory: a pending
        REPORTED LUNS DATA HAS CHANGED goes on every unit the nexus reaches, the inventory being the
        target's, not one unit's (SAM-5 §5.14)."""
        for unit in self.luns.values():
            unit.clear_reported_luns_changed(nexus)

    def add_nexus(self, nexus: Nexus) -> None:
        for unit in self.luns.values():
            unit.add_nexus(nexus)

    def remove_nexus(self, nexus: Nexus) -> None:
        for unit in self.luns.values():
            unit.remove_nexus(nexus)

    def _absent(self, nexus: Nexus, cdb) -> ScsiResult:
        from node_agent.scsi import spc

        try:
            op = cdb[0] if len(cdb) else None
            if op == 0xA0:
                cmd = _lookup(cdb)
                rec = _validate(cmd, cdb)
                data = spc.report_luns_data(self.lun_numbers(), rec)
                self.luns_reported(nexus)
                return ScsiResult(GOOD, data[: rec.allocation_length])
            if op == 0x12:
                cmd = _lookup(cdb)
                rec = _validate(cmd, cdb)
                return ScsiResult(GOOD, spc.absent_lun_inquiry(rec)[: rec.allocation_length])
            if op == 0x03:
                cmd = _lookup(cdb)
                rec = _validate(cmd, cdb)
                data = sense_for_absent_lun(descriptor=rec.desc)
                return ScsiResult(GOOD, data[: rec.allocation_length])
            raise CheckCondition(S.LOGICAL_UNIT_NOT_SUPPORTED)
        except CheckCondition as cc:
            return ScsiResult(CHECK_CONDITION, sense=cc.sense())
        except Exception:
            log.exception("SCSI command to an absent LUN failed")
            return ScsiResult(CHECK_CONDITION, sense=build_sense(S.INTERNAL_TARGET_FAILURE))
