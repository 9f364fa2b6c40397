"""One iSCSI connection, target side, without I/O (RFC 7143).

``TargetConnection`` consumes the bytes an initiator sends (``receive``) and
queues the bytes to send back (``take_output``); the asyncio transport in
``server.py`` only moves those bytes.  Inside: PDU framing with digests, the
login phase (delegated to ``login.TargetLogin``), and in full feature phase
the CmdSN window, SCSI commands with immediate, unsolicited and solicited
(R2T) Data-Out, Data-In with phase-collapsed status, NOP-Out/NOP-In both ways,
Text (SendTargets), task management and Logout.  SCSI commands run inline
through the target's ``LunMap`` as soon as their data is complete; one whose
I/O would block (``ScsiResult.blocking``) is handed to ``offload`` (the
transport's worker pool) and completed when that returns, so a slow disk
never stalls the event loop that serves the other sessions.  Such a command
keeps its slot in the CmdSN window until it completes, and task management
that aborts it answers only once its I/O has finished.

The hot path (issue 7): the common SCSI Command (the next CmdSN, not
immediate, a read or a write whose data all came as immediate data) runs from
one ``struct`` unpack of its header (``_scsi_command_fast``), and the common
answers (one Data-In with GOOD status, a plain SCSI Response) are packed
directly.  Anything else takes the full path, which makes every check; the
short one only skips work that cannot change the outcome.

Large writes (issue 7): the payload of a Data-Out PDU, and the immediate data
of a write command, of 16 KiB or more is received straight into the write
task's buffer (``_start_direct``, ``_start_direct_command``; the command's
buffer is adopted by its task), and after each such payload the transport is
offered just its trailer and the next header (``get_buffers``, one
``recvmsg_into``), so a 1 MiB write is copied once, by the kernel.  Digests,
DataSN, offsets, burst limits and CmdSN order are checked as for any PDU.

Gathered small writes (issue 7, 4 KiB writes): a fast-path WRITE whose data
continues the previous one's on the same LUN, within one receive, is not
written at once: its GOOD response is queued and its data (still in the
receive buffer) joins a gather that is written with one ``pwritev``
(``_gather_write``, ``_flush_gather``) before anything else runs: any other
PDU, a non-adjacent write, the end of the receive.  Nothing is sent before
that write (the transport takes the output only after ``buffer_updated``
returns), and if it fails each gathered command runs again the full way and
a failed one's queued response is replaced by the one the full path gives
(same StatSN).  Only where plain writes run inline anyway
(``LogicalUnit.gather_offset``).

Errors follow RFC 7143 §7 for ErrorRecoveryLevel 0: a PDU that can be framed
but is wrong gets a Reject (§11.17) and the connection goes on; one whose
header cannot be trusted (header digest error, a length past the negotiated
limit, a PDU in the wrong phase) ends the connection.

Writes (``WriteTask``): a Data-Out PDU is taken only where its sequence goes
on (DataPDUInOrder and DataSequenceInOrder are Yes), so a write runs only once
each of its bytes came, once.  One that cannot be taken (out of order, a data
digest error, unsolicited data where none may come, an R2T answered short)
is rejected and its write ends with CHECK CONDITION once its Data-Out has
stopped (§7.8), writing nothing.  Writes waiting for Data-Out keep their
CmdSN window slot and are bounded in bytes per session
(``ConnectionSettings.max_session_write_buffers``) and in time: one that gets
none of its Data-Out for ``data_out_timeout`` ends with CHECK CONDITION; one
held for CmdSN order takes its unsolicited Data-Out meanwhile.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Any, Callable

from node_agent.iscsi import pdu as P
from node_agent.iscsi.buffers import BufferPool, ReceiveBuffer, copy_in
from node_agent.iscsi.keys import SessionParams, TargetSettings, encode_text, format_target_address, parse_text
from node_agent.iscsi.login import LoginReply, LoginStatus, TargetLogin
from node_agent.iscsi.pdu import Opcode, RejectReason, TmfFunction, TmfResponse
from node_agent.iscsi.serial import in_window, sn_add, sn_lt
from node_agent.iscsi.names import check_iqn
from node_agent.iscsi.target import Session, TargetRegistry
from node_agent.scsi.device import FileRange, ScsiResult, decode_lun
from node_agent.scsi.sense import (ABORTED_COMMAND, DATA_PHASE_ERROR, INCORRECT_AMOUNT_OF_DATA, INVALID_FIELD_IN_CDB,
                                   PROTOCOL_SERVICE_CRC_ERROR, UNEXPECTED_UNSOLICITED_DATA, SenseCode, build_sense)

log = logging.getLogger("shoal.iscsi.connection")
# The gathered-write run in C (``_fastpath.c``, built by setup.py where a C compiler is): the same checks and
# answers as ``_scsi_command_fast`` and ``_gather_write``, without their bytecode per command.  Without it, or
# with SHOAL_FASTPATH=off in the environment (to compare), the Python path does all of it.
_GATHER_RUN: Callable[..., tuple] | None = None
if os.environ.get("SHOAL_FASTPATH", "on") != "off":
    try:
        from node_agent.iscsi._fastpath import gather_run as _GATHER_RUN
    except ImportError:
        pass
_U32 = struct.Struct(">I").unpack_from
# SCSI Command BHS (§11.3): byte 0 (I, opcode), byte 1 (F R W ATTR), LUN, ITT, EDTL, CmdSN, CDB.
_SCSI_COMMAND = struct.Struct(">BB6x8sIII4x16s").unpack_from
_crc = P.digest_value
_RESIDUE = P.DIGEST_RESIDUE
_digest = P.digest
_pack_digest = P.pack_digest
_pack_hot, _NO_LUN = P.pack_hot, bytes(8)
_OP_DATA_IN, _OP_SCSI_RESPONSE = int(Opcode.DATA_IN), int(Opcode.SCSI_RESPONSE)

GOOD = 0x00
CHECK_CONDITION = 0x02
TASK_SET_FULL = 0x28  # SAM-5 §5.3.1
TASK_ABORTED = 0x40
# SPC-4 (ASC 4Bh, ASCQ 06h): the data a command was waiting for from its initiator did not come in time.
INITIATOR_RESPONSE_TIMEOUT = SenseCode(ABORTED_COMMAND, 0x4B, 0x06)
try:
    _PORTAL_WRITE_BUFFERS = max(1 << 30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
except (ValueError, OSError):  # no such sysconf names here
    _PORTAL_WRITE_BUFFERS = 1 << 30
_DIRECT_MIN = 16 * 1024  # Data-Out payloads at least this large are received straight into the task buffer
_GATHER_MAX = 128  # writes per gathered ``pwritev`` (IOV_MAX is 1024)
_WRITE_OPCODES = frozenset((0x2A, 0x8A))  # WRITE(10), WRITE(16): the C run's
LOGIN_MAX_DATA = 65536  # bound on a login PDU's data segment before negotiation (RFC default is 8192)
TEXT_MAX_DATA = 65536  # bound on the text of a Text Request continued over several PDUs (C bit), as for a login's
_DEAD_ITTS_MAX = 256  # tags of ended writes whose late Data-Out is dropped silently (the oldest go first)


@dataclass
class ConnectionSettings:
    """Timers and limits of one connection."""

    nop_interval: float = 10.0
    """Seconds of silence after which the target pings the initiator with a NOP-In."""
    nop_timeout: float = 30.0
    """Seconds a ping may stay unanswered before the connection is dropped."""
    login_timeout: float = 15.0
    """Seconds a connection may spend in the login phase (an idle login holds no resources for long)."""
    max_logins_per_peer: int = 64
    """Connections from one address that may be in the login phase at once; one more is closed at once.
    Each holds its receive buffer (64 KiB) until it logs in or ``login_timeout`` ends it: one host opening
    thousands of them and never logging in cannot take the portal's memory, nor crowd out other hosts."""
    max_write_buffer: int = 64 * 1024 * 1024
    """Largest Expected Data Transfer Length accepted for one write (bounds memory per command)."""
    max_session_write_buffers: int = 128 * 1024 * 1024
    """Bytes of write buffers (their Expected Data Transfer Lengths) one session's writes waiting for their
    Data-Out may hold together.  Such a write is allocated its whole buffer when its command comes, so without
    this bound one initiator sending 48-byte commands with a large EDTL and never their data would take the
    portal's memory.  Those writes also keep their CmdSN window slot (``Session.running``) until they end, as
    in LIO and tgt, which bounds their number; this bounds their bytes: 128 MiB is 128 writes of 1 MiB (the
    whole default window) or 16 of the largest transfer a unit accepts (8 MiB).  A write that would go past it
    ends with TASK SET FULL (SAM-5 §5.3.1), which initiators retry (Linux, QEMU); one write always fits."""
    max_portal_write_buffers: int = field(default_factory=lambda: _PORTAL_WRITE_BUFFERS)
    """``max_session_write_buffers`` for all the sessions of a portal (of one process) together: each session
    keeping to its own bound, 24 of them held 3 GiB.  A write past it ends with TASK SET FULL as well.  By
    default a quarter of the machine's memory, at least 1 GiB (64 sessions with 32 writes of 1 MiB each in
    flight hold 2 GiB)."""
    io_workers: int = 32
    """Threads of the portal's pool for I/O that would block the event loop (cold reads, FUA writes,
    flushes, slow devices).  Each runs one command's I/O at a time."""
    io_workers_per_lun: int = 8
    """The most of those threads one logical unit's I/O may hold at once; its further I/O waits in its own
    queue, so a hung disk leaves the other LUNs' I/O threads to run on (``server.FairPool``)."""
    data_out_timeout: float = 60.0
    """Seconds a write waiting for its Data-Out (the unsolicited data its command announced with F=0, or the
    answer to an R2T) may go without any of it coming.  Such a write keeps its CmdSN window slot
    (``max_session_write_buffers``), and one whose data never comes, as an initiator that announced unsolicited
    data and sent none, kept it for as long as the session lived: enough of them closed the window.  Past this
    it ends with CHECK CONDITION, ABORTED COMMAND, INITIATOR RESPONSE TIMEOUT (which initiators retry), or with
    the error it already had; its slot and buffer are given back and Data-Out still coming for it is dropped
    silently.  Well past the 30 s after which the Linux initiator aborts a command itself; 0: no limit."""
    close_linger: float = 10.0
    """Seconds a connection the target closed (logout, a removed target, a fence, a protocol error) may
    spend sending what it had queued to a peer that takes none of it (a hung host); then its socket
    closes and the queued output, with the buffers it holds, is dropped."""


@dataclass
class WriteTask:
    """A write command collecting its Data-Out (RFC 7143 §4.2.5.2, §11.8).

    The target negotiates DataPDUInOrder=Yes and DataSequenceInOrder=Yes (it offers Yes and both keys are
    OR-ed, §13.18, §13.19), so each sequence has one place its next PDU may start: the unsolicited one right
    after what it got (the immediate data first), an R2T's at its offset plus what it got.  Only such a PDU
    is taken, and the sequences never overlap, so ``received`` counts each byte of [0, EDTL) at most once and
    reaches EDTL only when every one of them came: the buffer (pooled, holding an earlier write's bytes) is
    never written with a hole."""

    itt: int
    lun_field: bytes
    lun: int
    cdb: bytes
    edtl: int
    buffer: bytearray
    received: int = 0
    unsolicited_end: int = 0  # end offset of the unsolicited (first burst) data
    unsolicited_next: int = -1  # where the next unsolicited Data-Out starts; -1: none may come (any more)
    unsolicited_datasn: int = 0
    next_offset: int = 0  # first offset not yet covered by an R2T
    r2tsn: int = 0
    r2ts: dict[int, list[int]] = field(default_factory=dict)  # TTT -> [offset, length, next DataSN, got]
    gaps: list[tuple[int, int]] = field(default_factory=list)  # ranges to solicit before next_offset
    read: bool = False
    counted: bool = True  # non-immediate: holds a CmdSN window slot until it ends (``Session.running``)
    held: int = 0  # bytes it counts in ``Session.write_buffers``
    cmdsn: int = 0
    queued: bool = False  # held in ``Session.pending`` for CmdSN order; its unsolicited data is taken meanwhile
    error: tuple[int, bytes] | None = None  # (status, sense) it ends with once its Data-Out has stopped


class _Placed:
    """Immediate data of a SCSI Command received straight into a pooled write buffer (its first
    ``length`` bytes): ``_scsi_command`` adopts the buffer as the write task's instead of copying."""

    __slots__ = ("buffer", "length")

    def __init__(self, buffer: bytearray, length: int):
        self.buffer, self.length = buffer, length

    def __len__(self) -> int:
        return self.length

    def view(self) -> memoryview:
        return memoryview(self.buffer)[:self.length]


class _Running:
    """A command whose I/O runs on a worker thread (``ScsiResult.blocking``)."""

    __slots__ = ("lun_field", "lun", "edtl", "read", "counted", "data_out", "buffer", "aborted", "outlives_abort",
                 "preempted")

    def __init__(self, lun_field: bytes, lun: int, edtl: int, read: bool, counted: bool, data_out, buffer):
        self.lun_field, self.lun, self.edtl, self.read, self.counted = lun_field, lun, edtl, read, counted
        self.data_out, self.buffer = data_out, buffer  # kept alive (and out of the pool) until the I/O is done
        self.aborted = False
        self.outlives_abort = False  # ScsiResult.outlives_abort: an abort answers without waiting for it
        self.preempted = False  # aborted by another nexus's PREEMPT AND ABORT: answered TASK ABORTED when done


def _outlived_key(itt: int, entry: _Running) -> tuple:
    return ("outlived", itt, id(entry))


def _received(conn: "TargetConnection", header: Any, data: Any, raw: bytes) -> None:
    """What runs for a CmdSN that is received but has nothing left to do: an aborted command still held for
    CmdSN order, or one ABORT TASK says the target must consider received (RFC 7143 §11.5.1)."""


def _run_inline(io: Callable[[], Any], done: Callable[[Any], None], key: Any = None) -> None:
    """``offload`` without a transport (tests feeding bytes): run the blocking I/O right here."""
    done(io())


class TargetConnection:
    """Target side of one TCP connection; see the module docstring."""

    def __init__(self, registry: TargetRegistry, settings: TargetSettings, *,
                 local_address: tuple[str, int] = ("127.0.0.1", 3260), peer: str = "?",
                 config: ConnectionSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        self.registry = registry
        self.settings = settings
        self.config = config or ConnectionSettings()
        self.local_address = local_address
        self.peer = peer
        self.clock = clock
        self.cid = 0
        self.session: Session | None = None
        self.params: SessionParams | None = None
        self.login = TargetLogin(registry, settings, self)
        self.statsn = 0
        self.header_digest = False
        self.data_digest = False
        self.max_recv = LOGIN_MAX_DATA
        self.max_xmit = 8192
        self.closing = False
        self.close_reason = ""
        self.wakeup: Callable[[], None] = lambda: None
        # Runs blocking I/O off the event loop: offload(io, done) calls io() on a worker and done(result)
        # back on the loop (the transport flushes after it).
        # ``offload(io, done, key)``: run ``io`` where it may block, then ``done(result)`` on the loop; ``key``
        # is the logical unit whose share of the worker threads it takes (``server.FairPool``).
        self.offload: Callable[..., None] = _run_inline
        self._running: dict[int | tuple, _Running] = {}  # by task tag; an outlived abort by _outlived_key
        # Called once this closed connection has no command left on a worker (a reinstating login waits).
        self._drained_waiters: list[Callable[[], None]] = []
        # A login that reinstated connections whose commands still run: its response, sent once they ended.
        self._held_login: tuple[Any, LoginReply, list] | None = None
        self._aborting: set[int] = set()  # running ITTs the task management request being handled aborts
        self._tmf_waiting: list[tuple[set[int], Callable[[], None]]] = []
        self._rx = ReceiveBuffer(64 * 1024, grow_to=1 << 20)
        self._pool: BufferPool = registry.buffers
        self._sink: memoryview | None = None  # where a large Data-Out payload is being received directly
        self._trailer: tuple | None = None  # a directly placed payload waiting for its padding/digest
        # A payload was just received directly: offer the next receive only its trailer and the next
        # header, so that a following large payload is placed directly too (not copied out of ``_rx``).
        self._header_read = False
        self._out: list[Any] = []
        self._tasks: dict[int, WriteTask] = {}
        # Tags of writes ended before their Data-Out stopped (PREEMPT AND ABORT): that Data-Out is dropped
        # silently until its F=1.  Bounded: an initiator that never sends it cannot grow this (the oldest go).
        self._dead_itts: dict[int, None] = {}
        # Writes waiting for Data-Out as ``tick`` last saw them: ITT -> (task, its progress, since when unchanged).
        self._stalls: dict[int, tuple[WriteTask, tuple[int, int, int], float]] = {}
        self._ttt = 0
        # The Text exchange left open by our last Text Response with F=0 (see ``_text``): its ITT, the TTT of that
        # response, the rest of an answer too long for one PDU, the text of a request continued (C bit).
        self._text_exchange: tuple[int, int, bytes, bytearray] | None = None
        self._started = clock() if started is None else min(started, clock())  # whence login time counts
        self._last_rx = self._started
        self._ping: tuple[int, float] | None = None
        self._fast_commands = False  # full feature phase of a normal session: ``_scsi_command_fast`` applies
        self._immediate_limit = 0  # the most immediate data a command may carry (0: ImmediateData=No)
        # Adjacent fast-path writes of this receive not written yet: [unit, start offset, end offset,
        # data views (in the receive buffer), [(index in _out, pieces of the response, itt, edtl, cdb)]].
        self._gather: list | None = None
        self.gathered = 0  # writes gathered since the transport last looked (``server._Pacer``)

    # ------------------------------------------------------------------ I/O interface
    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the initiator, any amount at a time (copied in; see ``get_buffer`` for zero-copy)."""
        copy_in(data, self.get_buffer, self.buffer_updated, lambda: self.closing)

    def get_buffer(self) -> memoryview:
        """Memory the transport should receive into next (``asyncio.BufferedProtocol`` style)."""
        if self._sink is not None:
            return self._sink
        if self._header_read:
            trailer = self._trailer
            need = (trailer[4] + (4 if trailer[5] else 0) if trailer is not None else 0) \
                + P.BHS_LENGTH + (4 if self.header_digest else 0) - len(self._rx)
            if need > 0:
                return self._rx.writable()[:need]
        return self._rx.writable()

    def get_buffers(self) -> list[memoryview] | None:
        """For a scatter receive (``recvmsg_into``) while a payload is being placed directly: the rest
        of that payload, then room for its trailer and the next PDU header, so that one system call
        ends the payload and learns where the next one goes.  None otherwise: use ``get_buffer``."""
        sink = self._sink
        if sink is None:
            return None
        trailer = self._trailer
        need = trailer[4] + (4 if trailer[5] else 0) + P.BHS_LENGTH + (4 if self.header_digest else 0)  # type: ignore
        return [sink, self._rx.writable()[:need]]

    def buffer_updated(self, count: int) -> None:
        """``count`` bytes were received into the last ``get_buffer()`` (or, in order, the buffers of
        the last ``get_buffers()``)."""
        if self.closing:
            return
        self._last_rx = self.clock()
        if self._sink is not None:
            placed = len(self._sink)
            if count < placed:
                self._sink = self._sink[count:]
                return
            self._sink = None
            self._header_read = True
            if count > placed:
                self._rx.filled(count - placed)
        else:
            self._rx.filled(count)
        self._process()

    def take_output(self) -> list[Any]:
        """Queued output: bytes-like buffers and ``FileRange`` pieces, in order."""
        out, self._out = self._out, []
        return out

    def has_output(self) -> bool:
        return bool(self._out)

    def tick(self, now: float | None = None) -> bool:
        """Timers: login timeout, NOP-In pings to an idle initiator and their timeout.

        Returns True when an idle connection gave its grown receive buffer back (see buffers.py)."""
        now = self.clock() if now is None else now
        if self.closing:
            return False
        shrunk = self._sink is None and now - self._last_rx >= 1.0 and self._rx.shrink()
        if self.session is None:
            if now - self._started > self.config.login_timeout:
                self.close("login timed out")
            return shrunk
        if self._tasks and self.config.data_out_timeout:
            self._end_stalled_writes(now)
        if self._ping is not None:
            if now - self._ping[1] > self.config.nop_timeout:
                self.close("initiator did not answer NOP-In ping")
            return shrunk
        if self.config.nop_interval and now - self._last_rx > self.config.nop_interval:
            ttt = self._next_ttt()
            self._ping = (ttt, now)
            self._send(Opcode.NOP_IN, final=True, lun=bytes(8), itt=P.RESERVED_TAG, ttt=ttt,
                       statsn=self.statsn, **self._window())
            self.wakeup()
        return shrunk

    def connection_lost(self) -> None:
        """The transport's socket is gone: release the session (ErrorRecoveryLevel 0)."""
        if self.session is not None and not self.close_reason:
            log.info("connection closed by %s (%s, tsih %d) without logout", self.peer,
                     self.session.initiator_name, self.session.tsih)
        self.closing = True
        if self.session is not None:
            for task in list(self._tasks.values()):
                self._drop_task(task)  # its window slot and buffer bytes, for the session's other connections
            self.registry.detach_connection(self.session, self)
        self._tasks.clear()

    def close(self, reason: str) -> None:
        """End this connection (called by the core itself or by the registry)."""
        if not self.closing:
            (log.debug if reason == "logout" else log.info)("closing connection from %s: %s", self.peer, reason)
            self.closing = True
            self.close_reason = reason
            self.wakeup()

    # ------------------------------------------------------------------ framing
    def _process(self) -> None:
        rx = self._rx
        buf = rx.buf
        view = memoryview(buf)
        try:
            while not self.closing and self._sink is None:
                if self._trailer is not None and not self._finish_trailer(view):
                    break
                pos, end = rx.start, rx.end
                if end - pos < P.BHS_LENGTH:
                    break
                self._header_read = False
                # TotalAHSLength (words: the top byte) and DataSegmentLength (§11.2.1).  MaxRecvDataSegmentLength is
                # below 2**24, so one test finds both a data segment past it and any AHS (``_uncommon_pdu``); a PDU
                # with neither is taken as it is.
                dsl = _U32(buf, pos + 4)[0]
                hd, dd = self.header_digest, self.data_digest
                if dsl > self.max_recv:
                    total = self._uncommon_pdu(view, pos, dsl, hd, dd)
                    if not total:
                        break
                else:
                    total = 48 + ((dsl + 3) & ~3) + (4 if hd else 0) + (4 if dd and dsl else 0)  # 48: BHS
                    if end - pos < total:
                        if dsl >= _DIRECT_MIN and self.session is not None:
                            opcode = buf[pos] & 0x3F
                            if opcode == Opcode.DATA_OUT:
                                self._start_direct(view, pos, 0, dsl, hd, dd)
                            elif opcode == Opcode.SCSI_COMMAND:
                                self._start_direct_command(view, pos, dsl, hd, dd)
                        break
                    # The common SCSI Command without a data digest to check goes straight to the fast path (its
                    # header digest, if any, checked first; ``_one_pdu`` again when that declines it); everything
                    # else through ``_one_pdu``.  A WRITE(10/16) first to the
                    # C run (``_gather_run``), which takes it and the writes that follow it or leaves it.
                    if buf[pos] & 0x3F != 0x01 or not self._fast_commands or (dd and dsl):
                        self._one_pdu(view, pos, 0, dsl, hd, dd)
                    elif hd or dd:  # its header digest checked here (no data to check); never the C run, which
                        cursor = pos + 52 if hd else pos + 48  # checks no digests of the commands behind
                        if hd and _crc(view[pos:cursor]) != _RESIDUE or not self._scsi_command_fast(view, pos, cursor,
                                                                                                     dsl):
                            self._one_pdu(view, pos, 0, dsl, hd, dd)  # it checks the digest again: closes on error
                    elif buf[pos + 32] in _WRITE_OPCODES and _GATHER_RUN is not None and self._gather_run(buf, view):
                        total = 0  # it moved rx.start past what it took
                    elif not self._scsi_command_fast(view, pos, pos + 48, dsl):
                        self._one_pdu(view, pos, 0, dsl, hd, dd)
                rx.start += total  # rx.consume(total), inline: once per PDU
                if rx.start == rx.end:
                    rx.start = rx.end = 0
        finally:
            if self._gather is not None:  # before the transport may receive into the buffer again
                self._flush_gather()
            view.release()

    def _uncommon_pdu(self, view: memoryview, pos: int, lengths: int, hd: bool, dd: bool) -> int:
        """``_process``: a PDU whose header announces an AHS, or a data segment past MaxRecvDataSegmentLength.
        The bytes it takes once all of it came and was handled; 0 while it has not, or when the connection ends.

        A PDU with an AHS is never placed directly nor taken by the fast path: a SCSI Command's CDB may go on
        in it (``_command_with_ahs``).  Other PDUs define no AHS; theirs is skipped, as it always was."""
        ahs_len, dsl = (lengths >> 24) * 4, lengths & 0xFFFFFF
        if dsl > self.max_recv:
            self._reject_raw(bytes(view[pos:pos + P.BHS_LENGTH]), RejectReason.PROTOCOL_ERROR)
            self.close(f"data segment of {dsl} bytes exceeds MaxRecvDataSegmentLength {self.max_recv}")
            return 0
        total = 48 + ahs_len + ((dsl + 3) & ~3) + (4 if hd else 0) + (4 if dd and dsl else 0)
        if len(self._rx) < total:  # at most 1020 bytes of AHS more than an ordinary PDU: wait for all of it
            return 0
        if view[pos] & 0x3F == Opcode.SCSI_COMMAND and self.session is not None:
            self._command_with_ahs(view, pos, ahs_len, dsl, hd, dd)
        else:
            self._one_pdu(view, pos, ahs_len, dsl, hd, dd)
        return total

    def _command_with_ahs(self, view: memoryview, pos: int, ahs_len: int, dsl: int, hd: bool, dd: bool) -> None:
        """A SCSI Command with Additional Header Segments (RFC 7143 §11.2.2), checked as ``_one_pdu`` checks
        any PDU.  An Extended CDB AHS (§11.2.2.3) carries the bytes of a CDB longer than 16: the command runs
        with all of them (the logical unit answers a CDB it does not know as it does any, INVALID COMMAND
        OPERATION CODE), never with the first 16 alone.  A Bidirectional Read Expected Data Transfer Length
        AHS (§11.2.2.4) is taken on a command with R and W: the unit has no bidirectional command, so its read
        length bounds nothing.  Any other AHS type, a second AHS of one type, a bidirectional one without R
        and W, or an AHS whose length does not fit its type or TotalAHSLength is refused with a Reject, in
        the command's CmdSN order, as LIO does (Command not supported for an unknown type, Protocol Error
        otherwise): the command does not run, as its meaning is not known."""
        if self._gather is not None:
            self._flush_gather()
        cursor = pos + P.BHS_LENGTH + ahs_len
        if hd:
            if _crc(view[pos:cursor + 4]) != _RESIDUE:  # the digest covers the BHS and the AHS (§11.2.3)
                self.close("header digest error")
                return
            cursor += 4
        raw = bytes(view[pos:pos + P.BHS_LENGTH])
        if dd and dsl and _crc(view[cursor:cursor + ((dsl + 3) & ~3) + 4]) != _RESIDUE:
            self._reject_raw(raw, RejectReason.DATA_DIGEST_ERROR)
            return
        header = P.LAYOUTS[Opcode.SCSI_COMMAND].decode(view, pos)
        data = view[cursor:cursor + dsl] if dsl else b""
        ahs = view[pos + P.BHS_LENGTH:pos + P.BHS_LENGTH + ahs_len]
        cdb, refusal = bytes(header.cdb), None
        extended = bidirectional = False
        at = 0
        while at < ahs_len and refusal is None:
            length, kind = int.from_bytes(ahs[at:at + 2], "big"), ahs[at + 2]
            size = (3 + length + 3) & ~3  # AHSLength, AHSType, then AHSLength bytes, padded to 4 (§11.2.2.2)
            if at + size > ahs_len:
                refusal = RejectReason.PROTOCOL_ERROR
            elif kind == 1:  # AHSLength = CDB length - 15: a reserved byte, then the CDB's bytes past the 16th
                if extended or length < 2:  # "MUST NOT be used if the CDBLength is less than 17"
                    refusal = RejectReason.PROTOCOL_ERROR
                cdb, extended = cdb + bytes(ahs[at + 4:at + 3 + length]), True
            elif kind == 2:  # AHSLength 5: a reserved byte, then the 4-byte read length
                if bidirectional or length != 5 or not (header.read and header.write):
                    refusal = RejectReason.PROTOCOL_ERROR
                bidirectional = True
            else:  # reserved (3-59) or a vendor's (60-63): what it would change in the command is not known
                refusal = RejectReason.COMMAND_NOT_SUPPORTED
            at += size
        if refusal is not None:
            log.info("SCSI command ITT %#x from %s refused: its AHS %s", header.itt, self.peer, bytes(ahs).hex())
        ahs.release()
        if refusal is None:
            self._full_feature(Opcode.SCSI_COMMAND, header._replace(cdb=cdb), data, raw)
            return
        if not header.final:
            self._dead(header.itt)  # its unsolicited Data-Out: dropped silently
        self._in_order(header, b"", raw, lambda conn, _header, _data, raw: conn._reject_raw(raw, refusal))

    def _in_order(self, header: Any, data: Any, raw: bytes, handler: Callable[..., None]) -> None:
        """Run ``handler`` for a command in its CmdSN order: what ``_full_feature`` does (inline there, the hot
        path) for a handler of its own (``_command_with_ahs``)."""
        session = self.session
        assert session is not None
        if header.immediate:
            handler(self, header, data, raw)
            return
        cmdsn = header.cmdsn
        if cmdsn == session.expcmdsn and session.running < session.command_window:
            session.expcmdsn = sn_add(cmdsn, 1)
            handler(self, header, data, raw)
            if session.pending:
                self._drain_pending()
        elif in_window(cmdsn, session.expcmdsn, session.maxcmdsn) and cmdsn not in session.pending:
            session.pending[cmdsn] = (self, handler, header, data, raw)
        # else: outside the window, or a duplicate: silently ignored (§4.2.2.1)

    def _start_direct(self, view: memoryview, pos: int, ahs_len: int, dsl: int, hd: bool, dd: bool) -> None:
        """Receive the rest of a large Data-Out payload straight into its task's buffer."""
        rx = self._rx
        payload = pos + P.BHS_LENGTH + ahs_len + (4 if hd else 0)
        if rx.end < payload:
            return  # not even the header yet
        if hd and view[payload - 4:payload] != P.digest_bytes(view[pos:payload - 4]):
            self.close("header digest error")
            return
        header = P.LAYOUTS[Opcode.DATA_OUT].decode(view, pos)
        task = self._data_out_task(header, dsl)
        if task is None:
            return  # not for a task we know: framed and refused the ordinary way
        offset = header.buffer_offset
        have = min(rx.end - payload, dsl)
        task.buffer[offset:offset + have] = view[payload:payload + have]
        raw = bytes(view[pos:pos + P.BHS_LENGTH])
        rx.consume(payload + have - pos)
        if have < dsl:
            self._sink = memoryview(task.buffer)[offset + have:offset + dsl]
        self._trailer = (header, raw, task, dsl, P.pad4(dsl) - dsl, dd)

    def _start_direct_command(self, view: memoryview, pos: int, dsl: int, hd: bool, dd: bool) -> None:
        """Receive the rest of a write command's large immediate data straight into a pooled buffer
        that becomes its write task's (``_Placed``).  Only when the header asks for what the full
        path accepts (W, data within ExpectedDataTransferLength, FirstBurstLength and the write
        buffer limit, a normal session): anything else is framed and refused the ordinary way."""
        rx = self._rx
        payload = pos + P.BHS_LENGTH + (4 if hd else 0)
        if rx.end < payload or self.session.discovery:  # type: ignore[union-attr]
            return
        b0, flags, _, _, edtl, cmdsn, _ = _SCSI_COMMAND(view, pos)
        if not flags & 0x20 or dsl > edtl or dsl > self._immediate_limit or edtl > self.config.max_write_buffer:
            return
        session = self.session
        # Only a command that runs now (the next CmdSN in the window, or immediate) and whose buffer the
        # session's write budget has room for: one held behind a CmdSN gap, or dropped outside the window,
        # must not get an EDTL-sized buffer first (127 of them, 16 KiB sent each, held 8 GiB).  The others are
        # framed the ordinary way: their immediate data, at most FirstBurstLength, is copied as it is.
        held, portal = session.write_buffers, self.registry.write_buffers  # type: ignore[union-attr]
        if (not b0 & 0x40 and (cmdsn != session.expcmdsn or session.running >= session.command_window)  # type: ignore[union-attr]
                or held and held + edtl > self.config.max_session_write_buffers
                or portal and portal + edtl > self.config.max_portal_write_buffers):
            return
        if hd and view[payload - 4:payload] != P.digest_bytes(view[pos:payload - 4]):
            self.close("header digest error")
            return
        raw = bytes(view[pos:pos + P.BHS_LENGTH])
        header = P.LAYOUTS[Opcode.SCSI_COMMAND].decode(raw, 0)
        buffer = self._pool.acquire(edtl)
        have = min(rx.end - payload, dsl)
        buffer[:have] = view[payload:payload + have]
        rx.consume(payload + have - pos)
        if have < dsl:
            self._sink = memoryview(buffer)[have:dsl]
        self._trailer = (header, raw, None, dsl, P.pad4(dsl) - dsl, dd, _Placed(buffer, dsl))

    def _finish_trailer(self, view: memoryview) -> bool:
        """Padding and data digest of a directly received Data-Out; False while they are still missing."""
        if self._gather is not None:
            self._flush_gather()
        trailer = self._trailer
        header, raw, task, length, pad, dd = trailer[:6]  # type: ignore[index]
        rx = self._rx
        need = pad + (4 if dd else 0)
        if len(rx) < need:
            return False
        start = rx.start
        self._trailer = None
        placed = trailer[6] if task is None else None  # type: ignore[index]
        if dd:
            if placed is not None:
                received = placed.view()
            else:
                offset = header.buffer_offset
                received = memoryview(task.buffer)[offset:offset + length]
            digest = P.digest_bytes(received, view[start:start + pad])
            received.release()
            if view[start + pad:start + need] != digest:
                rx.consume(need)
                self._reject_raw(raw, RejectReason.DATA_DIGEST_ERROR)
                if placed is not None:
                    self._pool.release(placed.buffer)
                elif self._tasks.get(task.itt) is task:
                    # Its bytes are in the buffer, where the next expected ones go, but not counted: the task
                    # ends with CHECK CONDITION (never written) once its Data-Out has stopped (§7.8).
                    self._data_out_digest_error(header)
                return True
        rx.consume(need)
        if placed is not None:
            self._full_feature(Opcode.SCSI_COMMAND, header, placed, raw)
        elif self._tasks.get(task.itt) is task:  # not aborted meanwhile
            self._data_out_done(task, header, length)
        return True

    def _one_pdu(self, view: memoryview, pos: int, ahs_len: int, dsl: int, hd: bool, dd: bool) -> None:
        cursor = pos + P.BHS_LENGTH + ahs_len
        if hd:
            if _crc(view[pos:cursor + 4]) != _RESIDUE:  # the header and its digest: one call
                self.close("header digest error")  # RFC 7143 §7.8: the header cannot be trusted
                return
            cursor += 4
        if dd and dsl:
            padded_end = cursor + ((dsl + 3) & ~3)
            if _crc(view[cursor:padded_end + 4]) != _RESIDUE:
                self._reject_raw(bytes(view[pos:pos + P.BHS_LENGTH]), RejectReason.DATA_DIGEST_ERROR)
                if view[pos] & 0x3F == Opcode.DATA_OUT and self.session is not None:
                    try:
                        header = P.LAYOUTS[Opcode.DATA_OUT].decode(view, pos)
                    except P.PduError:
                        return
                    self._data_out_digest_error(header)
                return
        opcode = view[pos] & 0x3F
        if opcode == 0x01 and self._fast_commands and self._scsi_command_fast(view, pos, cursor, dsl):
            return
        if self._gather is not None:
            self._flush_gather()
        bhs = view[pos:pos + P.BHS_LENGTH]
        data = view[cursor:cursor + dsl]
        layout = P.LAYOUTS.get(opcode)  # type: ignore[call-overload]
        try:
            if layout is None:
                raise P.PduError(f"unknown opcode {opcode:#04x}")
            header = layout.decode(view, pos)
        except P.PduError:
            if self.session is None:
                self.close("unknown opcode during login")
            else:
                self._reject_raw(bytes(bhs), RejectReason.COMMAND_NOT_SUPPORTED)
            return
        if self.session is None:
            if opcode != Opcode.LOGIN_REQUEST or self._held_login is not None:
                self.close(f"{Opcode(opcode).name} before login completed")
                return
            self._login(header, bytes(data))
            return
        self._full_feature(opcode, header, data if dsl else b"", bytes(bhs))

    # ------------------------------------------------------------------ login phase
    def _login(self, header: Any, data: bytes) -> None:
        if not self.login.first and header.cid != self.cid:
            self.close("CID changed during login")
            return
        self.cid = header.cid
        reply = self.login.handle(header, data)
        if reply is None:  # continued request: an empty response asks for the rest (§6.5)
            reply = LoginReply(False, header.csg, 0, b"", header.tsih)
        if reply.session is not None and reply.status is LoginStatus.SUCCESS:
            busy = [old for old in reply.replaced if old is not self and old.io_running()]
            if busy:
                # RFC 7143 §6.3.4/§6.3.5: the reinstated connections' tasks end before this one goes on.  A
                # WRITE of theirs still on a worker must not land after the initiator's next writes.
                log.info("login from %s: waiting for %d command(s) of the connection(s) it reinstates",
                         self.peer, sum(old.io_running() for old in busy))
                self._held_login = (header, reply, busy)
                for old in busy:
                    old.when_drained(lambda old=old: self._reinstated_drained(old))
                return
        self._answer_login(header, reply)

    def _reinstated_drained(self, old: "TargetConnection") -> None:
        held = self._held_login
        if held is None:
            return
        if old in held[2]:
            held[2].remove(old)
        if not held[2]:
            self._held_login = None
            if not self.closing:
                self._answer_login(held[0], held[1])
                self.wakeup()

    def _answer_login(self, header: Any, reply: LoginReply) -> None:
        self._send_login_response(header, reply)
        if reply.status is not LoginStatus.SUCCESS:
            self.close(f"login refused {reply.status.name}")
        elif reply.session is not None:
            self._enter_full_feature(reply.session)

    def _send_login_response(self, header: Any, reply: LoginReply) -> None:
        session = reply.session
        expcmdsn = session.expcmdsn if session else header.cmdsn
        status_class, status_detail = reply.status.value
        if self.login.first and not self.statsn:
            self.statsn = header.expstatsn  # an initiator may start at any StatSN; follow it
        self._send(Opcode.LOGIN_RESPONSE, reply.text, transit=reply.transit, csg=reply.csg, nsg=reply.nsg,
                   version_max=0, version_active=0, isid=header.isid, tsih=reply.tsih, itt=header.itt,
                   statsn=self._advance_statsn(), expcmdsn=expcmdsn,
                   maxcmdsn=sn_add(expcmdsn, self.registry.command_window - 1),
                   status_class=status_class, status_detail=status_detail, digests=False)

    def _enter_full_feature(self, session: Session) -> None:
        self.session = session
        params = self.login.negotiator.params()  # type: ignore[union-attr]
        self.params = params
        self.header_digest = params.header_digest
        self.data_digest = params.data_digest
        # At most 2**24 - 1 (§13.12): ``_process`` finds an AHS by the top byte of its lengths word being past it.
        self.max_recv = min(params.max_recv_data_segment_length, 0xFFFFFF)
        self.max_xmit = params.max_xmit_data_segment_length
        self._fast_commands = not session.discovery
        self._immediate_limit = params.first_burst_length if params.immediate_data else 0

    # ------------------------------------------------------------------ full feature phase
    def _full_feature(self, opcode: int, header: Any, data: memoryview, raw: bytes) -> None:
        if opcode == Opcode.DATA_OUT:
            self._data_out(header, data, raw)
            return
        handler = _SEQUENCED.get(opcode)
        if data and data.__class__ is not _Placed:
            data = bytes(data)  # the receive buffer is reused; commands may be held for CmdSN order
        if handler is None:
            reason = RejectReason.PROTOCOL_ERROR if opcode in (Opcode.LOGIN_REQUEST, Opcode.SNACK_REQUEST) \
                else RejectReason.COMMAND_NOT_SUPPORTED
            self._reject_raw(raw, reason)
            return
        session = self.session
        assert session is not None
        if header.immediate:
            handler(self, header, data, raw)
            return
        cmdsn = header.cmdsn
        if cmdsn == session.expcmdsn and session.running < session.command_window:
            session.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
            handler(self, header, data, raw)
            if session.pending:
                self._drain_pending()
        elif in_window(cmdsn, session.expcmdsn, session.maxcmdsn) and cmdsn not in session.pending:
            session.pending[cmdsn] = (self, handler, header, data, raw)
            if opcode == Opcode.SCSI_COMMAND and header.write and not header.final:
                self._queue_write(header, data)
        else:
            # RFC 7143 §4.2.2.1: outside the window, or a duplicate: silently ignored.
            log.debug("dropping CmdSN %d outside [%d, %d]", cmdsn, session.expcmdsn, session.maxcmdsn)

    def _drain_pending(self) -> None:
        session = self.session
        assert session is not None
        if self._gather is not None:
            self._flush_gather()
        while session.pending:
            item = session.pending.pop(session.expcmdsn, None)
            if item is None:
                return
            conn, handler, header, data, raw = item
            session.expcmdsn = sn_add(session.expcmdsn, 1)
            handler(conn, header, data, raw)

    # -- SCSI commands -------------------------------------------------------------
    def _scsi_command_fast(self, view: memoryview, pos: int, cursor: int, dsl: int) -> bool:
        """The common SCSI Command (non-immediate, the next CmdSN, a read or one whose data all came
        as immediate data) from one ``struct`` unpack of its header, without the decoded record and
        the hops of ``_full_feature`` and ``_scsi_command``.  False when it is anything else: nothing
        was done, and the full path (which checks and answers the unusual cases) handles it."""
        b0, flags, lun_field, itt, edtl, cmdsn, cdb = _SCSI_COMMAND(view, pos)
        session = self.session
        if (b0 & 0x40 or cmdsn != session.expcmdsn or session.running >= session.command_window  # type: ignore
                or itt in self._tasks or itt in self._running):
            return False
        if flags & 0x20:  # W: all of its data must be here as immediate data
            if dsl != edtl or not dsl or dsl > self._immediate_limit:
                return False
            data = view[cursor:cursor + dsl]  # in the receive buffer: copied unless written right away
        elif dsl:
            return False  # immediate data without W: the full path rejects it
        else:
            data = None
        session.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF  # type: ignore[union-attr]
        lun = _LUN_CACHE.get(lun_field)
        if lun is None:
            lun = _lun_number(lun_field)
        read = flags & 0x40 != 0
        unit = session.target.luns.luns.get(lun)  # type: ignore[union-attr]
        if data is not None and unit is not None:
            offset = unit.gather_offset(cdb, data)
            if offset is not None:
                self._gather_write(unit, offset, data, itt, edtl, cdb, lun_field)
                if session.pending:  # type: ignore[union-attr]
                    self._drain_pending()
                return True
        if self._gather is not None:
            self._flush_gather()
        if unit is None:
            self._execute(itt, lun_field, lun, cdb, None if data is None else bytes(data), edtl, read)
        elif read and data is None and (block := unit.read_inline(cdb)) is not None:
            if len(block) == edtl and edtl <= self.max_xmit:
                self._collapsed_data_in(itt, lun_field, block)  # the common read, done
            else:  # the initiator expects another length: residuals, the long way
                self._complete(itt, lun_field, edtl, read, ScsiResult(GOOD, block))
        else:  # ``_execute``, one call shorter
            result = None if data is None else unit.execute_inline(cdb, data)
            if result is None:
                if data is not None:
                    data = bytes(data)  # the receive buffer is reused; a worker may write this later
                # Not again what read_inline or execute_inline just declined (for a write that would
                # block, that would be a second failed non-blocking attempt).
                result = unit.execute_deferrable(session.nexus, cdb, data, edtl,  # type: ignore[union-attr]
                                                 try_fast=not read and data is None)
            if result.blocking is None:
                self._complete(itt, lun_field, edtl, read, result)
            else:
                self._offload_command(itt, lun_field, lun, edtl, read, True, data, None, result)
        if session.pending:  # type: ignore[union-attr]
            self._drain_pending()
        return True

    def _gather_write(self, unit: Any, offset: int, data: memoryview, itt: int, edtl: int, cdb: bytes,
                      lun_field: bytes) -> None:
        """Answer a write ``gather_offset`` accepted now and write its data with its neighbours'."""
        gather = self._gather
        if gather is not None and (gather[2] != offset or gather[0] is not unit or len(gather[3]) >= _GATHER_MAX):
            self._flush_gather()
            gather = None
        if gather is None:
            gather = self._gather = [unit, offset, offset, [], [], lun_field]
        gather[2] = offset + len(data)
        gather[3].append(data)
        out = self._out
        mark = len(out)
        # ``_respond(itt, GOOD, b"", 0, edtl, edtl)``, inline: once per gathered write
        session = self.session
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        expcmdsn = session.expcmdsn  # type: ignore[union-attr]
        maxcmdsn = (expcmdsn + session.command_window - 1 - session.running) & 0xFFFFFFFF  # type: ignore[union-attr]
        header = _pack_hot(_OP_SCSI_RESPONSE, 0x80, 0, GOOD, 0, _NO_LUN, itt, 0, statsn, expcmdsn, maxcmdsn, 0, 0, 0)
        if self.header_digest:
            header += _pack_digest(_crc(header))  # one buffer: one iovec fewer for sendmsg
        out.append(header)
        gather[4].append((mark, len(out) - mark, itt, edtl, cdb))

    def _gather_run(self, buf: bytearray, view: memoryview) -> bool:
        """``_process``, at a WRITE(10/16) without digests: that SCSI Command and those that follow it, taken
        by ``_fastpath.gather_run`` (C) exactly as ``_scsi_command_fast`` and ``_gather_write`` would take
        each, into the open gather (or a new one) as long as they continue it.  True when it took any (rx.start
        is past them); False: nothing was done, the Python path takes the command.  Only for a logical unit
        that takes gathered writes now (``gather_limits``), with nothing held for CmdSN order and room in the
        command window (gathered commands are answered at once: they do not use it)."""
        session = self.session
        if session.pending or session.running >= session.command_window:  # type: ignore[union-attr]
            return False
        rx = self._rx
        start = rx.start
        lun_field = bytes(buf[start + 8:start + 16])
        gather = self._gather
        if gather is not None and gather[5] == lun_field:  # continue it
            unit, gather_end, pieces, commands = gather[0], gather[2], gather[3], gather[4]
        else:  # start one
            lun = _LUN_CACHE.get(lun_field)
            if lun is None:
                lun = _lun_number(lun_field)
            unit = session.target.luns.luns.get(lun)  # type: ignore[union-attr]
            if unit is None:
                return False
            gather_end, pieces, commands = -1, [], []
        limits = unit.gather_limits()
        if limits is None:
            return False
        if gather is not None and gather_end == -1:  # another LUN's is open: written first, as the Python path does
            self._flush_gather()
        pos, taken, statsn, expcmdsn, first, end = _GATHER_RUN(
            view, start, rx.end, min(self.max_recv, self._immediate_limit),
            session.expcmdsn, session.command_window - 1 - session.running,  # type: ignore[union-attr]
            self._tasks, self._running, lun_field, *limits, gather_end, _GATHER_MAX - len(pieces), self.statsn,
            pieces, self._out, commands)
        if not taken:
            return False
        rx.start = pos
        self.statsn = statsn
        session.expcmdsn = expcmdsn  # type: ignore[union-attr]
        if gather_end == -1:
            self._gather = [unit, first, end, pieces, commands, lun_field]
        else:
            gather[2] = end  # type: ignore[index]
        return True

    def _flush_gather(self) -> None:
        """Write the gathered data.  If that fails, run each of its commands again the full way and
        put the answer of any that fails in place of its queued GOOD response (same StatSN)."""
        unit, start, end, pieces, commands, _ = self._gather  # type: ignore[misc]
        self._gather = None
        self.gathered += len(commands)
        if unit.write_gathered(start, pieces, end - start, len(commands)):
            return
        session = self.session
        assert session is not None
        answers = []
        for (mark, count, itt, edtl, cdb), data in zip(commands, pieces):
            result = unit.execute_deferrable(session.nexus, cdb, data, edtl, try_fast=False)
            if result.blocking is not None:  # a store that writes inline: only a failing one gets here
                result = result.blocking()
            if result.status != GOOD or result.sense:
                answers.append((mark, count, itt, edtl, result))
        out = self._out
        for mark, count, itt, edtl, result in reversed(answers):  # from the end: earlier marks stay valid
            sns = struct.unpack_from(">III", out[mark], 24)  # the queued answer's StatSN, ExpCmdSN, MaxCmdSN
            datalen = edtl if result.data_out_length is None else result.data_out_length
            out[mark:mark + count] = self._response_frames(itt, result.status, result.sense, 0, edtl, datalen, *sns)

    def _scsi_command(self, header: Any, data: bytes, raw: bytes) -> None:
        session = self.session
        assert session is not None and self.params is not None
        if session.discovery:
            self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)
            return
        itt = header.itt
        task = self._tasks.get(itt)
        if task is not None and task.queued and task.cmdsn == header.cmdsn and not header.immediate:
            self._ordered(task)  # its CmdSN came up: the write made when it was held (``_queue_write``) goes on
            return
        if task is not None or itt in self._running:
            self._reject_raw(raw, RejectReason.TASK_IN_PROGRESS)
            return
        if header.immediate and sum(not entry.counted for entry in self._running.values()) >= session.command_window:
            # Immediate commands take no CmdSN window slot: without a bound, a flood of them on a LUN whose I/O
            # blocks queued without end (2000 writes of 256 KiB held 500 MiB).  As many may run as the window
            # lets ordinary ones; past that, "too many immediate commands" (§11.17.1), which the initiator retries.
            if data.__class__ is _Placed:
                self._pool.release(data.buffer)
            self._reject_raw(raw, RejectReason.IMMEDIATE_COMMAND_REJECT)
            return
        edtl = header.expected_data_transfer_length
        params = self.params
        if data and (not header.write or not params.immediate_data or len(data) > edtl
                     or len(data) > params.first_burst_length):
            self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)
            return
        lun = _lun_number(header.lun)
        placed = data if data.__class__ is _Placed else None
        if not header.write or len(data) == edtl:
            if placed is not None:
                self._execute(itt, header.lun, lun, header.cdb, placed.view(), edtl, header.read,
                              buffer=placed.buffer, counted=not header.immediate)
                return
            self._execute(itt, header.lun, lun, header.cdb, data if header.write else None, edtl, header.read,
                          counted=not header.immediate)
            return
        task = self._write_task(header, data, lun)
        if task.counted:
            session.running += 1  # its window slot until it ends: MaxCmdSN stays where it was (it came in order)
        if task.error is None:
            self._send_r2ts(task)
        else:
            self._end_now(task)

    def _queue_write(self, header: Any, data) -> None:
        """A write command held for CmdSN order whose unsolicited Data-Out follows it (InitialR2T=No, F=0):
        its task is made now, so that data, sent right behind the command whatever its CmdSN (RFC 7143
        §3.2.4.2: the initiator does not wait for the command to be delivered), is taken rather than refused
        and lost.  It solicits nothing and runs nothing before its CmdSN comes up (``_ordered``).  Anything
        the full check would refuse is left to it, when the command runs."""
        session, params = self.session, self.params
        assert session is not None and params is not None
        itt, edtl = header.itt, header.expected_data_transfer_length
        if (session.discovery or params.initial_r2t or itt in self._tasks or itt in self._running or len(data) >= edtl
                or (data and (not params.immediate_data or len(data) > params.first_burst_length))):
            return
        self._write_task(header, data, _lun_number(header.lun), queued=True)

    def _write_task(self, header: Any, data, lun: int, queued: bool = False) -> WriteTask:
        """The task of a write whose Data-Out is still to come, its immediate data in its buffer.

        A write past ``max_write_buffer`` (CHECK CONDITION) or past the session's ``max_session_write_buffers``
        (TASK SET FULL) gets no buffer and a status to end with: at once (``_end_now``), or, held for CmdSN
        order, when its CmdSN comes up, its data dropped meanwhile.  So does one past twice the
        command window of writes waiting on this connection: those in order hold a window slot each, those
        held for CmdSN order are within the window, and only immediate commands, which take no slot, could
        go past it (each a task of its own that a malicious initiator need never finish)."""
        session, params, config = self.session, self.params, self.config
        assert session is not None and params is not None
        itt, edtl = header.itt, header.expected_data_transfer_length
        placed = data if data.__class__ is _Placed else None
        task = WriteTask(itt, header.lun, lun, header.cdb, edtl, _NO_BUFFER, read=header.read,
                         counted=not header.immediate, cmdsn=header.cmdsn, queued=queued)
        task.received = len(data)
        # F=1 on the command: no unsolicited Data-Out follows (§11.3.1); otherwise up to FirstBurstLength does.
        if not params.initial_r2t and not header.final:
            task.unsolicited_end = min(params.first_burst_length, edtl)
            task.unsolicited_next = len(data)
        else:
            task.unsolicited_end = len(data)
        task.next_offset = task.unsolicited_end
        held, portal = session.write_buffers, self.registry.write_buffers
        if edtl > config.max_write_buffer:
            task.error = (CHECK_CONDITION, build_sense(INVALID_FIELD_IN_CDB))
        elif (held and held + edtl > config.max_session_write_buffers or len(self._tasks) >= 2 * session.command_window
              or portal and portal + edtl > config.max_portal_write_buffers):
            log.info("write of %d bytes from %s refused with TASK SET FULL: %d writes hold %d bytes of buffers "
                     "(the portal's sessions %d)", edtl, self.peer, len(self._tasks), held, portal)
            task.error = (TASK_SET_FULL, b"")
        elif placed is not None:  # the immediate data is already at the start of a buffer of edtl bytes
            task.buffer = placed.buffer
        else:
            task.buffer = self._pool.acquire(edtl)
            task.buffer[:len(data)] = data
        if task.error is None:
            task.held = edtl
            session.write_buffers = held + edtl
            self.registry.write_buffers = portal + edtl
        elif placed is not None:
            self._pool.release(placed.buffer)
        self._tasks[itt] = task
        return task

    def _ordered(self, task: WriteTask) -> None:
        """A write made while it was held for CmdSN order (``_queue_write``) is now the next command: it takes
        its window slot, and runs, solicits the rest of its data or ends as any write does."""
        task.queued = False
        if task.counted:
            self.session.running += 1  # type: ignore[union-attr]
        if task.error is not None:  # refused when it came, or its Data-Out went wrong meanwhile
            self._end_if_idle(task)
        elif task.received == task.edtl and not task.r2ts:
            self._run_write(task)
        else:
            self._send_r2ts(task)

    def _send_r2ts(self, task: WriteTask) -> None:
        if task.queued:
            return  # not before its CmdSN comes up (``_ordered``)
        params = self.params
        assert params is not None
        session = self.session
        assert session is not None
        while (task.gaps or task.next_offset < task.edtl) and len(task.r2ts) < params.max_outstanding_r2t:
            if task.gaps:
                offset, length = task.gaps.pop(0)
            else:
                offset, length = task.next_offset, min(params.max_burst_length, task.edtl - task.next_offset)
                task.next_offset += length
            ttt = self._next_ttt()
            task.r2ts[ttt] = [offset, length, 0, 0]
            header = P.pack_r2t(task.lun_field, task.itt, ttt, self.statsn, session.expcmdsn, session.maxcmdsn,
                                task.r2tsn, offset, length)
            self._out += P.frame(header, header_digest=self.header_digest, data_digest=False)
            task.r2tsn += 1

    def _data_out_task(self, header: Any, length: int) -> WriteTask | None:
        """The task a Data-Out PDU belongs to, if it is the next PDU of one of that task's sequences: its
        DataSN, and its buffer offset where that sequence goes on, within it (DataPDUInOrder=Yes and
        DataSequenceInOrder=Yes, §13.18, §13.19: increasing addresses, no gaps, no overlays).  No side effects."""
        task = self._tasks.get(header.itt)
        if task is None or task.error is not None:
            return None
        offset = header.buffer_offset
        if header.ttt == P.RESERVED_TAG:
            ok = (offset == task.unsolicited_next and offset + length <= task.unsolicited_end
                  and header.datasn == task.unsolicited_datasn)
        else:
            r2t = task.r2ts.get(header.ttt)
            ok = (r2t is not None and offset == r2t[0] + r2t[3] and offset + length <= r2t[0] + r2t[1]
                  and header.datasn == r2t[2])
        return task if ok else None

    def _data_out(self, header: Any, data: memoryview, raw: bytes) -> None:
        """A Data-Out PDU that arrived whole in the receive buffer."""
        task = self._data_out_task(header, len(data))
        if task is None:
            self._data_out_refused(header, raw)
            return
        offset = header.buffer_offset
        task.buffer[offset:offset + len(data)] = data
        self._data_out_done(task, header, len(data))

    def _data_out_done(self, task: WriteTask, header: Any, length: int) -> None:
        """Account for a received Data-Out; solicit more, or run the command once all data is in."""
        if header.ttt == P.RESERVED_TAG:
            task.unsolicited_datasn += 1
            end = header.buffer_offset + length
            if header.final:
                task.unsolicited_next = -1
                if end < task.unsolicited_end:
                    # The initiator ended its first burst early: solicit the rest of it too.
                    task.gaps.append((end, task.unsolicited_end - end))
                    task.unsolicited_end = end
            else:
                task.unsolicited_next = end
        else:
            r2t = task.r2ts[header.ttt]
            r2t[2] += 1
            r2t[3] += length
            if header.final:
                del task.r2ts[header.ttt]
                if r2t[3] != r2t[1]:
                    # F=1 before the R2T's length (§11.7.1): its data can never all come.
                    log.warning("R2T %d of ITT %#x answered with %d of %d bytes", header.ttt, task.itt,
                                r2t[3], r2t[1])
                    self._fail(task, INCORRECT_AMOUNT_OF_DATA)
                    self._end_if_idle(task)
                    return
        task.received += length
        if task.received == task.edtl and not task.r2ts:
            if not task.queued:
                self._run_write(task)
        elif header.final:
            self._send_r2ts(task)

    def _run_write(self, task: WriteTask) -> None:
        """All of a write's data is in: it leaves the tasks waiting for Data-Out and runs."""
        del self._tasks[task.itt]
        session = self.session
        session.write_buffers -= task.held  # type: ignore[union-attr]
        self.registry.write_buffers -= task.held
        if task.counted:
            session.running -= 1  # type: ignore[union-attr]  # ``_execute`` counts it again while it runs
        self._execute(task.itt, task.lun_field, task.lun, task.cdb, memoryview(task.buffer)[:task.edtl],
                      task.edtl, task.read, buffer=task.buffer, counted=task.counted)

    # -- Data-Out that cannot be taken ------------------------------------------------
    def _data_out_refused(self, header: Any, raw: bytes) -> None:
        """A Data-Out PDU that is not the next of any of its task's sequences, or of no task.

        For a live task it is rejected and nothing of it is written: Protocol Error for unsolicited data where
        none may come (InitialR2T=Yes, §13.10; F=1 on the command, §11.3.1), ending the task with "Unexpected
        unsolicited data" (§11.4.7.2); Invalid PDU Field for a TTT, buffer offset or DataSN that does not fit
        (§11.17.1: the reason for invalid fields describing a data transfer).  A DataSN out of order means an
        earlier PDU was lost to a digest error (§7.9): PROTOCOL SERVICE CRC ERROR as for one (§7.8); an offset
        out of order, DATA PHASE ERROR.  At ErrorRecoveryLevel 0 (no recovery R2T) the task cannot get all its
        data any more: it ends with CHECK CONDITION once its Data-Out has stopped (§7.3: a Reject does not end
        a live task).  Later PDUs of such a task are dropped silently (one Reject per task: libiscsi fails the
        task on the first and takes a Reject it cannot match for a protocol violation)."""
        itt = header.itt
        task = self._tasks.get(itt)
        if task is None:
            if itt in self._dead_itts:
                if header.final:
                    del self._dead_itts[itt]
                return
            self._reject_raw(raw, RejectReason.INVALID_PDU_FIELD)
            return
        if task.error is None:
            if header.ttt == P.RESERVED_TAG and task.unsolicited_next < 0:
                self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)
                self._fail(task, UNEXPECTED_UNSOLICITED_DATA)
            else:
                self._reject_raw(raw, RejectReason.INVALID_PDU_FIELD)
                r2t = task.r2ts.get(header.ttt)
                datasn = task.unsolicited_datasn if header.ttt == P.RESERVED_TAG else r2t[2] if r2t else None
                self._fail(task, PROTOCOL_SERVICE_CRC_ERROR if datasn not in (None, header.datasn)
                           else DATA_PHASE_ERROR)
        self._sequence_ends(task, header)

    def _data_out_digest_error(self, header: Any) -> None:
        """A Data-Out PDU discarded for its data digest (already rejected, §7.8).  At ErrorRecoveryLevel 0 the
        target cannot ask for it again (recovery R2T), so it takes §7.8's other choice: the task ends with CHECK
        CONDITION, PROTOCOL SERVICE CRC ERROR, once the PDU with F=1 of each of its sequences has come (the
        header, whose digest held, still counts for that)."""
        task = self._tasks.get(header.itt)
        if task is None:
            if header.final:
                self._dead_itts.pop(header.itt, None)
            return
        self._fail(task, PROTOCOL_SERVICE_CRC_ERROR)
        self._sequence_ends(task, header)

    def _fail(self, task: WriteTask, code: SenseCode) -> None:
        """``task`` will end with CHECK CONDITION and ``code`` (the first reason wins) instead of running.

        Its buffer goes back at once (no payload is being received into it now: this runs between PDUs): it
        is never written, and an initiator that drops the task on the Reject (libiscsi does, against §7.3)
        never sends the F=1 the response waits for, so the task may wait until ``data_out_timeout`` ends it;
        only its window slot stays taken meanwhile."""
        if task.error is None:
            log.info("write ITT %#x from %s fails: sense %02x/%02x/%02x", task.itt, self.peer, *code)
            task.error = (CHECK_CONDITION, build_sense(code))
            if task.held:
                self.session.write_buffers -= task.held  # type: ignore[union-attr]
                self.registry.write_buffers -= task.held
                task.held = 0
                self._pool.release(task.buffer)
                task.buffer = _NO_BUFFER

    def _sequence_ends(self, task: WriteTask, header: Any) -> None:
        """A failed task's Data-Out PDU (dropped): F=1 ends its sequence; with none left, the task ends."""
        if header.final:
            if header.ttt == P.RESERVED_TAG:
                task.unsolicited_next = -1
            else:
                task.r2ts.pop(header.ttt, None)
        self._end_if_idle(task)

    def _end_now(self, task: WriteTask) -> None:
        """End a write refused when its command came (``_write_task``) at once, as LIO does: nothing of it was
        received, and a task kept for the unsolicited data it announced could be made without end by immediate
        commands.  That data, should it come, is dropped silently (``_dead_itts``)."""
        if task.unsolicited_next >= 0:
            task.unsolicited_next = -1
            self._dead(task.itt)
        self._end_if_idle(task)

    def _dead(self, itt: int) -> None:
        dead = self._dead_itts
        dead[itt] = None
        if len(dead) > _DEAD_ITTS_MAX:
            del dead[next(iter(dead))]

    def _end_if_idle(self, task: WriteTask) -> None:
        """End a failed task with its status once no Data-Out is owed for it: no R2T outstanding and no
        unsolicited data announced (§7.8: the response waits for the F=1 of every outstanding R2T).  R2Ts
        not sent yet never will be.  A task still held for CmdSN order ends when its CmdSN comes up."""
        if task.unsolicited_next >= 0 or task.r2ts or task.queued:
            return
        self._drop_task(task)
        status, sense = task.error  # type: ignore[misc]
        self._respond(task.itt, status, sense, 0, task.edtl, 0)

    def _end_stalled_writes(self, now: float) -> None:
        """``tick``: end the writes that waited ``data_out_timeout`` for Data-Out without any coming.

        RFC 7143 has no timer for this at ErrorRecoveryLevel 0 (the initiator is expected to send what it
        announced, or abort the task); LIO ends such a connection when its Data-Out timer runs out.  Ending
        the task alone, as §7.8 does for Data-Out that can no longer all come, leaves the session and its other
        tasks alone.  Only here, once a second, is anything measured: the Data-Out path adds nothing.  A write
        still held for CmdSN order is left alone: it waits for a command, not for its data."""
        stalls: dict[int, tuple[WriteTask, tuple[int, int, int], float]] = {}
        timeout, ended = self.config.data_out_timeout, False
        placing = self._trailer[2] if self._trailer is not None else None
        for itt, task in list(self._tasks.items()):
            if task.queued or task is placing:  # a payload being received straight into its buffer: data comes
                continue
            progress = (task.received, task.r2tsn, task.unsolicited_datasn)
            last = self._stalls.get(itt)
            if last is None or last[0] is not task or last[1] != progress:
                stalls[itt] = (task, progress, now)
            elif now - last[2] < timeout:
                stalls[itt] = last
            else:
                log.warning("write ITT %#x from %s got no Data-Out for %.0f s (%d of %d bytes): ended", itt,
                            self.peer, now - last[2], task.received, task.edtl)
                self._fail(task, INITIATOR_RESPONSE_TIMEOUT)  # a task that failed already keeps its error
                status, sense = task.error  # type: ignore[misc]
                self._drop_task(task, owed=True)  # Data-Out that still comes: dropped silently
                self._respond(itt, status, sense, 0, task.edtl, 0)
                ended = True
        self._stalls = stalls
        if ended:
            self.wakeup()

    def _drop_task(self, task: WriteTask, owed: bool = False) -> None:
        """``task`` stops waiting for Data-Out without running: its window slot and its buffer's bytes are
        given back; one still held for CmdSN order leaves its CmdSN received, with nothing to run (its pending
        entry would otherwise run the command again, or, deleted, leave a CmdSN gap for ever).  ``owed`` (an
        abort): Data-Out the initiator still sends for it (an outstanding R2T, announced unsolicited data,
        which it answers after the abort, §11.5.1) is dropped silently, not rejected."""
        if owed and (task.r2ts or task.unsolicited_next >= 0):
            self._dead(task.itt)
        del self._tasks[task.itt]
        session = self.session
        assert session is not None
        session.write_buffers -= task.held
        self.registry.write_buffers -= task.held
        if task.queued:
            item = session.pending.get(task.cmdsn)
            if item is not None and item[0] is self and item[2] is not None and item[2].itt == task.itt:
                session.pending[task.cmdsn] = (self, _received, None, b"", b"")
        elif task.counted:
            session.running -= 1

    def _execute(self, itt: int, lun_field: bytes, lun: int, cdb: bytes, data_out, edtl: int, read: bool, *,
                 buffer: bytearray | None = None, counted: bool = True) -> None:
        """Run one command; ``buffer`` (the pooled memory ``data_out`` views) goes back to the pool after."""
        session = self.session
        assert session is not None and session.target is not None
        luns = session.target.luns
        unit = luns.luns.get(lun)
        if unit is not None:
            result = unit.execute_deferrable(session.nexus, cdb, data_out, edtl)
        else:
            result = luns.execute(session.nexus, lun, cdb, data_out, edtl)
        if result.blocking is not None:
            self._offload_command(itt, lun_field, lun, edtl, read, counted, data_out, buffer, result)
            return
        if buffer is not None:
            data_out.release()
            self._pool.release(buffer)
        self._complete(itt, lun_field, edtl, read, result)

    def _offload_command(self, itt: int, lun_field: bytes, lun: int, edtl: int, read: bool, counted: bool,
                         data_out, buffer: bytearray | None, result) -> None:
        """Hand a command whose I/O would block to the worker pool; ``_deferred_done`` completes it."""
        entry = _Running(lun_field, lun, edtl, read, counted, data_out, buffer)
        entry.outlives_abort = result.outlives_abort
        answer = result.answer_now
        if answer is not None:  # answered now (IMMED); the I/O goes on like an aborted SANITIZE's: no answer
            entry.aborted, entry.counted = True, False  # of its own, its tag free, a fence still waiting for it
            self._running[_outlived_key(itt, entry)] = entry
            self._complete(itt, lun_field, edtl, read, answer)
        else:
            self._running[itt] = entry
            if counted:
                self.session.running += 1  # type: ignore[union-attr]
        unit = self.session.target.luns.luns.get(lun)  # type: ignore[union-attr]
        self.offload(result.blocking, lambda done: self._deferred_done(itt, entry, done), unit)

    def _deferred_done(self, itt: int, entry: _Running, result) -> None:
        """The worker finished a command's I/O: answer it, unless it was aborted or the connection went."""
        if self._running.get(itt) is entry:
            del self._running[itt]
        elif entry.aborted:
            self._running.pop(_outlived_key(itt, entry), None)
        if entry.counted and self.session is not None:
            self.session.running -= 1
        if entry.buffer is not None:
            entry.data_out.release()
            self._pool.release(entry.buffer)
            entry.data_out = entry.buffer = None
        if not (self.closing or entry.aborted):
            if entry.preempted:  # its I/O ran (and ended before the PREEMPT AND ABORT's GOOD): not GOOD
                self._respond(itt, TASK_ABORTED, b"", 0, entry.edtl, 0)
            else:
                self._complete(itt, entry.lun_field, entry.edtl, entry.read, result)
        if self._drained_waiters and not self.io_running():
            waiters, self._drained_waiters = self._drained_waiters, []
            for waiter in waiters:
                waiter()
        # An aborted SANITIZE that went on (``outlives_abort``) was waited for by no TMF, and its tag may name a
        # newer command by now: a TMF waiting for that one must go on waiting.
        if self._tmf_waiting and not (entry.aborted and entry.outlives_abort):
            self._tmf_released(itt)

    def _tmf_released(self, key: Any) -> None:
        """What a task management answer waited for (an aborted command's task tag, or a unit's drain job) has
        ended: answer those that now wait for nothing."""
        for waiting in list(self._tmf_waiting):
            waiting[0].discard(key)
            if not waiting[0]:
                self._tmf_waiting.remove(waiting)
                if not self.closing:
                    waiting[1]()

    def _complete(self, itt: int, lun_field: bytes, edtl: int, read: bool, result) -> None:
        data = result.data
        if read:
            if data is None:
                datalen = 0
            elif data.__class__ is FileRange:
                datalen = data.length
            else:
                datalen = len(data)
                if (datalen == edtl and datalen <= self.max_xmit and not datalen & 3 and datalen
                        and not result.status and not result.sense):
                    self._collapsed_data_in(itt, lun_field, data)
                    return
            if datalen and edtl:
                self._data_in(itt, lun_field, data, result.status, result.sense, edtl, datalen)
                return
        elif result.data_out_length is not None:
            datalen = result.data_out_length  # what the CDB asked to transfer (residuals, §11.4.5.1)
        else:
            datalen = edtl
        self._respond(itt, result.status, result.sense, 0, edtl, datalen)

    def _collapsed_data_in(self, itt: int, lun_field: bytes, data) -> None:
        """The common read's answer: all of ``data`` (EDTL bytes, at most MaxXmitDataSegmentLength, a
        multiple of 4) in one Data-In PDU that carries GOOD status (phase collapse, §11.7.4), no
        residual, no padding; ``_data_in`` does the same the long way."""
        session = self.session
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        header = _pack_hot(_OP_DATA_IN, 0x81, 0, GOOD, len(data), lun_field, itt, 0xFFFFFFFF,  # pack_data_in
                           statsn, session.expcmdsn, session.maxcmdsn, 0, 0, 0)  # type: ignore[union-attr]
        if self.data_digest:
            if self.header_digest:
                self._out += (header + _pack_digest(_crc(header)), data, _pack_digest(_crc(data)))
            else:
                self._out += (header, data, _pack_digest(_crc(data)))
        elif self.header_digest:
            self._out += (header + _pack_digest(_crc(header)), data)
        else:
            self._out += (header, data)

    def _data_in(self, itt: int, lun_field: bytes, data, status: int, sense: bytes, edtl: int,
                 total: int) -> None:
        """Data-In PDUs (§11.7): segments of the peer's MaxRecvDataSegmentLength, F at each burst's end;
        ``total`` is ``data``'s length."""
        params = self.params
        session = self.session
        assert params is not None and session is not None
        send = min(total, edtl)
        is_file = isinstance(data, FileRange)
        if is_file and self.data_digest:
            data = os.pread(data.fd, send, data.offset)
            is_file = False
        collapse = status == GOOD and not sense
        if send <= self.max_xmit and collapse and not is_file and not self.data_digest and send & 3 == 0:
            # The common case of one Data-In PDU carrying the status (phase collapse, §11.7.4).
            statsn = self.statsn
            self.statsn = (statsn + 1) & 0xFFFFFFFF
            header = P.pack_data_in(0x81 | _residual_flags(total, edtl), status, send, lun_field, itt,
                                    P.RESERVED_TAG, statsn, session.expcmdsn, session.maxcmdsn, 0, 0,
                                    abs(total - edtl))
            if self.header_digest:
                self._out += (header, _digest(header), data if send == total else memoryview(data)[:send])
            else:
                self._out += (header, data if send == total else memoryview(data)[:send])
            return
        view = data if is_file else memoryview(data)
        expcmdsn, maxcmdsn = session.expcmdsn, session.maxcmdsn
        out = self._out
        hd, dd = self.header_digest, self.data_digest
        max_burst = params.max_burst_length
        segment = min(self.max_xmit, max_burst)
        datasn = offset = 0
        while offset < send:
            burst_end = min(send, (offset // max_burst + 1) * max_burst)
            length = min(segment, burst_end - offset)
            end = offset + length
            flags = 0x80 if end == burst_end else 0
            statsn = residual = 0
            if end == send and collapse:
                flags |= 0x01 | _residual_flags(total, edtl)
                residual = abs(total - edtl)
                statsn = self.statsn
                self.statsn = (statsn + 1) & 0xFFFFFFFF
            header = P.pack_data_in(flags, status if flags & 0x01 else 0, length, lun_field, itt, P.RESERVED_TAG,
                                    statsn, expcmdsn, maxcmdsn, datasn, offset, residual)
            out.append(header)
            if hd:
                out.append(_digest(header))
            if is_file:
                out.append(FileRange(data.fd, data.offset + offset, length, data.source))
            else:
                piece = view[offset:end]
                out.append(piece)
            pad = -length & 3
            if pad:
                out.append(bytes(pad))
            if dd:
                out.append(P.digest_bytes(piece, bytes(pad)) if pad else P.digest_bytes(piece))
            offset = end
            datasn += 1
        if not collapse:
            self._respond(itt, status, sense, datasn, edtl, total)

    def _respond(self, itt: int, status: int, sense: bytes, expdatasn: int, edtl: int, datalen: int) -> None:
        """SCSI Response (§11.4), sense data prefixed with its length (§11.4.7)."""
        session = self.session
        assert session is not None
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        if not sense and datalen == edtl:  # the common answer: no sense data, no residual
            header = _pack_hot(_OP_SCSI_RESPONSE, 0x80, 0, status, 0, _NO_LUN, itt, 0, statsn,  # pack_scsi_response
                               session.expcmdsn, session.maxcmdsn, expdatasn, 0, 0)
            if self.header_digest:
                header += _pack_digest(_crc(header))
            self._out.append(header)
            return
        self._out += self._response_frames(itt, status, sense, expdatasn, edtl, datalen, statsn, session.expcmdsn,
                                           session.maxcmdsn)

    def _response_frames(self, itt: int, status: int, sense: bytes, expdatasn: int, edtl: int, datalen: int,
                         statsn: int, expcmdsn: int, maxcmdsn: int) -> list:
        """A SCSI Response with sense data (prefixed with its length, §11.4.7) or a residual, framed."""
        payload = len(sense).to_bytes(2, "big") + sense if sense else b""
        header = P.pack_scsi_response(0x80 | _residual_flags(datalen, edtl), 0, status, len(payload), itt, statsn,
                                      expcmdsn, maxcmdsn, expdatasn, abs(datalen - edtl))
        return P.frame(header, payload, header_digest=self.header_digest, data_digest=self.data_digest)

    # -- other requests --------------------------------------------------------------
    def _nop_out(self, header: Any, data: bytes, raw: bytes) -> None:
        if header.itt == P.RESERVED_TAG:
            if header.ttt != P.RESERVED_TAG:
                if self._ping is not None and self._ping[0] == header.ttt:
                    self._ping = None
                # else: an answer to a ping we no longer wait for; nothing to do
            return
        if header.ttt != P.RESERVED_TAG:
            self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)  # §11.18.2: TTT must be reserved with a valid ITT
            return
        # the ping data echoed, up to what the initiator takes in one PDU (§11.18.5, §13.12)
        self._send(Opcode.NOP_IN, data[:self.max_xmit], final=True, lun=header.lun, itt=header.itt,
                   ttt=P.RESERVED_TAG, statsn=self._advance_statsn(), **self._window())

    def _text(self, header: Any, data: bytes, raw: bytes) -> None:
        """Text Request (RFC 7143 §11.10), one request of a Text exchange.

        The target answers every request; a response with F=0 carries a Target Transfer Tag (§11.11.4)
        and leaves the exchange open: the initiator's next request carries that tag back, with the same
        Initiator Task Tag (§11.10.3).  Three things leave it open:

        * a request whose text does not fit one PDU comes in pieces with C=1 (§11.10.2), each answered
          with an empty response (§6: the receiver of C=1 answers with no data); the joined text is
          answered once the piece with C=0 has come.  What is held is bounded (``TEXT_MAX_DATA``): a
          piece past that is rejected with Long Operation Reject (§11.17.1: no resources to go on) and
          the pieces go;
        * an answer too long for one PDU goes in pieces with C=1 (§11.11.2), the next one for each
          (empty) request that continues the exchange;
        * a request with F=0: the initiator has more to say, and a response with F=1 to it would be a
          protocol error (§11.11.1), so its answer has F=0 too, and the exchange ends only with the
          answer to a request with F=1.

        An initiator has at most one Text Request outstanding on a connection (§11.10), and one with the
        reserved Target Transfer Tag starts a new exchange (§11.10.4): it drops the open one, whatever its
        Initiator Task Tag.  A request with another Target Transfer Tag than the open exchange's, or with
        another Initiator Task Tag, is rejected (Invalid PDU Field); the exchange stays open."""
        if header.cont and header.final:
            self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)  # §11.10.2: C=1 requires F=0
            return
        if header.ttt == P.RESERVED_TAG:
            self._text_exchange = None
            text = bytearray()
        else:
            held = self._text_exchange
            if held is None or held[0] != header.itt or held[1] != header.ttt:
                self._reject_raw(raw, RejectReason.INVALID_PDU_FIELD)
                return
            self._text_exchange = None
            _, _, rest, text = held
            if rest:
                self._send_text(header, rest)
                return
        text += data
        if len(text) > TEXT_MAX_DATA:
            self._reject_raw(raw, RejectReason.LONG_OPERATION_REJECT)
            return
        if header.cont:
            ttt = self._next_ttt()
            self._text_exchange = (header.itt, ttt, b"", text)
            self._send(Opcode.TEXT_RESPONSE, final=False, lun=header.lun, itt=header.itt, ttt=ttt,
                       statsn=self._advance_statsn(), **self._window())
            return
        self._answer_text(header, bytes(text), raw)

    def _answer_text(self, header: Any, data: bytes, raw: bytes) -> None:
        """The answer to the whole text of a Text Request: SendTargets (§13.3) and the keys that may be
        negotiated in full feature phase (§13)."""
        try:
            pairs = parse_text(data)
        except ValueError:
            self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value)
        negotiator = self.login.negotiator
        if negotiator is not None and any(key != "SendTargets" for key, _ in pairs):
            try:
                answer += negotiator.full_feature_text(pairs)
            except ValueError:
                self._reject_raw(raw, RejectReason.PROTOCOL_ERROR)
                return
            # A declarative key (MaxRecvDataSegmentLength) may change what we may send (§13.12).
            self.max_xmit = negotiator.params().max_xmit_data_segment_length
        self._send_text(header, encode_text(answer))

    def _send_text(self, header: Any, text: bytes) -> None:
        """The (next piece of the) answer to ``header``'s request: F=1 only when it is the last piece and
        the request had F=1 (§11.11.1); otherwise the exchange stays open under a new TTT (``_text``)."""
        chunk, rest = text[: self.max_xmit], text[self.max_xmit:]
        final = header.final and not rest
        ttt = P.RESERVED_TAG
        if not final:
            ttt = self._next_ttt()
            self._text_exchange = (header.itt, ttt, rest, bytearray())
        self._send(Opcode.TEXT_RESPONSE, chunk, final=final, cont=bool(rest), lun=header.lun, itt=header.itt,
                   ttt=ttt, statsn=self._advance_statsn(), **self._window())

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        session = self.session
        assert session is not None
        if value == "All":
            if not session.discovery:  # RFC 7143 Appendix C: "MUST NOT be supported on an operational session"
                return [("SendTargets", "Reject")]
            targets = self.registry.visible_targets(session)
        elif value == "" and session.target is not None:
            targets = [session.target]  # §12.3? an empty value names the session's own target
        elif (target := self.registry.find_target(value)) is not None:  # a name in any case (RFC 7143 §4.2.7.2)
            targets = [target] if target.shown_to(session) else []
        else:
            try:
                check_iqn(value)
            except ValueError:
                return [("SendTargets", "Reject")]  # neither All nor an iSCSI name
            targets = []
        portals = self.registry.portal_addresses(self.local_address)  # Appendix C: every portal of the group
        answer: list[tuple[str, str]] = []
        for target in targets:
            answer.append(("TargetName", target.iqn))
            answer += [("TargetAddress", format_target_address(host, port, target.portal_group_tag))
                       for host, port in portals]
        return answer

    def _logout(self, header: Any, data: bytes, raw: bytes) -> None:
        session = self.session
        assert session is not None
        response = 0
        if header.reason == 0:
            targets = [c for c in session.connections.values() if c is not self]
            for conn in targets:
                conn.close("session logout")
        elif header.reason == 1:
            other = session.connections.get(header.cid)
            if other is None:
                response = 1  # CID not found
            elif other is not self:
                other.close("connection logout")
        else:
            response = 2  # connection recovery is not supported (ErrorRecoveryLevel 0)
        self._send(Opcode.LOGOUT_RESPONSE, final=True, response=response, itt=header.itt,
                   statsn=self._advance_statsn(), **self._window(), time2wait=0, time2retain=0)
        if response == 0 and (header.reason == 0 or header.cid == self.cid):
            log.info("logout: %s tsih %d", session.initiator_name, session.tsih)
            if header.reason == 0:
                self.registry.close_session(session, "logout")
            self.close("logout")

    def _task_management(self, header: Any, data: bytes, raw: bytes) -> None:
        """Task Management Function Request (RFC 7143 §11.5).

        The resets reach as far as the target the session logged in to, never further: a portal
        serves one target per volume, each with its own ACL, and an initiator admitted to one must not
        touch another's.  TARGET WARM RESET aborts this connection's tasks and resets that target's
        logical units (a unit attention for each of their I_T nexuses, SAM-5 §6.3); TARGET COLD RESET
        does the same and then, after its response, ends every session to that target, the issuing
        one included (§11.5.1: the target drops its connections to all initiators), while sessions to
        the portal's other targets, and discovery sessions, go on."""
        session = self.session
        assert session is not None
        function = header.function
        response = TmfResponse.FUNCTION_COMPLETE
        self._aborting = set()
        drain: list = []  # units where other sessions' commands were aborted: the answer waits for their I/O
        luns = session.target.luns if session.target else None
        lun = _lun_number(header.lun)
        if luns is None:
            response = TmfResponse.REJECTED
        elif function == TmfFunction.ABORT_TASK:
            if not self._abort_task(header):
                response = TmfResponse.TASK_DOES_NOT_EXIST
        elif function in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            unit = luns.luns.get(lun)
            if unit is None:
                response = TmfResponse.LUN_DOES_NOT_EXIST  # §11.6.1 response 2
            else:
                self._abort_where(lambda t: t.lun == lun, before=header.cmdsn)
                # ABORT TASK SET ends this I_T nexus's tasks; CLEAR TASK SET the whole task set, every
                # initiator's (the control mode page's TST is 000b: one task set for all), as LOGICAL UNIT
                # RESET does (SAM-5 §7.4, §7.6): a WRITE another session left waiting for its Data-Out must
                # not land after the answer, nor one already running on a worker
                if function != TmfFunction.ABORT_TASK_SET and self._abort_other_nexuses(session, [lun])[0]:
                    drain.append(unit)
                if function == TmfFunction.LOGICAL_UNIT_RESET:
                    unit.reset("lun")
        elif function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            self._abort_where(lambda t: True, before=header.cmdsn)
            numbers = list(luns.luns)
            drain += [luns.luns[number] for number, aborted in zip(numbers, self._abort_other_nexuses(session, numbers))
                      if aborted]
            for unit in luns.luns.values():
                unit.reset("target")
        elif function == TmfFunction.TASK_REASSIGN:
            response = TmfResponse.REASSIGNMENT_NOT_SUPPORTED
        else:
            response = TmfResponse.NOT_SUPPORTED

        def answer() -> None:
            self._send(Opcode.TASK_MGMT_RESPONSE, final=True, response=int(response), itt=header.itt,
                       statsn=self._advance_statsn(), **self._window())
            if function == TmfFunction.TARGET_COLD_RESET and response == TmfResponse.FUNCTION_COMPLETE:
                target = session.target
                for other in list(self.registry.sessions.values()):
                    if other.target is target:
                        self.registry.close_session(other, "target cold reset")

        # Other sessions' aborted commands whose I/O runs (or waits) on a worker cannot be called back; they end
        # TASK ABORTED once it has, and the answer waits for them (as PREEMPT AND ABORT's GOOD does): a job per
        # unit behind them in the unit's worker order, ``wait_for_earlier_io``, marks when they have ended.
        keys = [object() for _ in drain]
        self._aborting.update(keys)
        if self._aborting:  # aborted commands whose I/O is still running: answer once it has ended
            self._tmf_waiting.append((self._aborting, answer))
            self._aborting = set()
        else:
            answer()
        for unit, key in zip(drain, keys):
            job = unit.deferred(unit.wait_for_earlier_io)
            self.offload(job.blocking, lambda _result, key=key: self._tmf_released(key), unit)
        if session.pending:  # ABORT TASK may have filled a CmdSN gap (``_abort_task``): what waited behind it runs
            self._drain_pending()

    def _abort_task(self, header: Any) -> bool:
        """ABORT TASK (RFC 7143 §11.5.1): True when the task is gone or may be considered received."""
        session = self.session
        assert session is not None
        task = self._tasks.get(header.referenced_task_tag)
        if task is not None:
            self._drop_task(task, owed=True)
            return True
        running = self._running.get(header.referenced_task_tag)
        if running is not None:
            running.aborted = True
            if running.outlives_abort:
                self._outlive(header.referenced_task_tag, running)
            else:
                self._aborting.add(header.referenced_task_tag)
            return True
        for cmdsn, item in list(session.pending.items()):
            if item[0] is self and item[2] is not None and item[2].itt == header.referenced_task_tag:
                # Held behind a CmdSN gap: it will never run, but its CmdSN was received and must still be
                # passed in order (deleted, the gap behind it would never close).
                session.pending[cmdsn] = (self, _received, None, b"", b"")
                return True
        # §11.5.1 b): not received yet (lost, e.g. discarded for a digest error), its RefCmdSN in the window and
        # before the request's CmdSN: the target considers that CmdSN received (and the task aborted), so the
        # commands held behind it run (``_task_management`` drains them after its answer).  A task that
        # already completed has a RefCmdSN below ExpCmdSN: "task does not exist".
        refcmdsn = header.refcmdsn
        if not (in_window(refcmdsn, session.expcmdsn, session.maxcmdsn) and sn_lt(refcmdsn, header.cmdsn)):
            return False
        if refcmdsn == session.expcmdsn:
            session.expcmdsn = sn_add(refcmdsn, 1)
        elif refcmdsn not in session.pending:
            session.pending[refcmdsn] = (self, _received, None, b"", b"")
        return True

    def in_flight(self) -> int:
        """Commands whose I/O still runs on a worker (also after ``close``): a fence waits for none left."""
        return len(self._running)

    def io_running(self) -> int:
        """``in_flight`` but a SANITIZE's pass that outlived its command (its unit refuses every command
        meanwhile, so nothing it writes can pass a newer write): what a reinstating login waits for."""
        return sum(not entry.outlives_abort for entry in self._running.values())

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop, under the registry's lock) once ``io_running`` is 0."""
        if not self.io_running():
            callback()
        else:
            self._drained_waiters.append(callback)

    def _abort_other_nexuses(self, session: Any, lun_numbers: list[int]) -> list[int]:
        """A reset or CLEAR TASK SET: end the tasks of every session to this target on ``lun_numbers`` (each
        connection answers them TASK ABORTED, as for PREEMPT AND ABORT); this connection's were ended already.
        Commands of other sessions already running on a worker answer TASK ABORTED once their I/O ends.  How
        many were aborted, per number."""
        target = session.target
        nexuses = [other.nexus for other in list(self.registry.sessions.values()) if other.target is target]
        return [self.registry.abort_tasks(target, number, nexuses) for number in lun_numbers]

    def abort_tasks(self, lun: int) -> int:
        """End this connection's commands to ``lun`` with TASK ABORTED: those still collecting Data-Out at
        once, those whose I/O runs on a worker when it ends (it cannot be called back; the PREEMPT AND ABORT
        answers GOOD only after it, ``persistent_reserve._saved``).

        Called when another I_T nexus's PREEMPT AND ABORT preempted this one (SPC-4 §5.13.11.5;
        TAS=1 in the control mode page, so the status is reported: SAM-5 §5.6).  Data-Out still
        on its way for them is dropped.  The rare path: the READ/WRITE path does not look here."""
        aborted = [task for task in self._tasks.values() if task.lun == lun and not task.queued]
        for task in aborted:
            self._drop_task(task)
            self._dead(task.itt)
            self._respond(task.itt, TASK_ABORTED, b"", 0, task.edtl, 0)
        running = [entry for entry in self._running.values()
                   if entry.lun == lun and not entry.aborted and not entry.outlives_abort]
        for entry in running:
            entry.preempted = True
        if aborted:
            self.wakeup()
        return len(aborted) + len(running)

    def _abort_where(self, predicate: Callable[[Any], bool], before: int | None = None) -> None:
        """Abort this connection's tasks that ``predicate`` takes (their Data-Out still owed is dropped
        silently, ``_drop_task(owed=True)``), and, with ``before`` (the CmdSN of a task management request),
        this session's SCSI commands held behind a CmdSN gap that came before it (RFC 7143 §11.5.1: the
        function acts on every task with a lower CmdSN): held, they would run once the gap closes, after the
        answer said they were aborted.  Their CmdSNs stay received (the gap behind them must still close)."""
        for task in list(self._tasks.values()):
            if predicate(task):
                self._drop_task(task, owed=True)
        session = self.session
        if before is None or session is None:
            return
        for cmdsn, item in list(session.pending.items()):
            header = item[2]
            if (item[1] is _SEQUENCED[Opcode.SCSI_COMMAND] and sn_lt(cmdsn, before)
                    and predicate(SimpleNamespace(lun=_lun_number(header.lun)))):
                session.pending[cmdsn] = (item[0], _received, None, b"", b"")
        for itt, running in list(self._running.items()):
            if not running.aborted and predicate(running):
                running.aborted = True
                if running.outlives_abort:
                    self._outlive(itt, running)
                else:
                    self._aborting.add(itt)

    def _outlive(self, itt: int, running: _Running) -> None:
        """An aborted command whose I/O goes on (a SANITIZE): its task tag is free for the initiator to use
        again at once, while the I/O stays counted in ``in_flight`` (a fence still waits for it)."""
        del self._running[itt]
        self._running[_outlived_key(itt, running)] = running

    # ------------------------------------------------------------------ output helpers
    def _window(self) -> dict[str, int]:
        session = self.session
        if session is None:
            return {"expcmdsn": 0, "maxcmdsn": 0}
        return {"expcmdsn": session.expcmdsn, "maxcmdsn": session.maxcmdsn}

    def _advance_statsn(self) -> int:
        statsn = self.statsn
        self.statsn = sn_add(statsn, 1)
        return statsn

    def _next_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        return self._ttt

    def _send(self, opcode: Opcode, data=b"", *, digests: bool = True, **fields: Any) -> None:
        header = P.encode_header(opcode, data_segment_length=len(data), **fields)
        self._out += P.frame(header, data, header_digest=self.header_digest and digests,
                             data_digest=self.data_digest and digests)

    def _send_file(self, opcode: Opcode, piece: FileRange, fields: dict[str, Any]) -> None:
        header = P.encode_header(opcode, data_segment_length=piece.length, **fields)
        self._out.append(header)
        if self.header_digest:
            self._out.append(P.digest_bytes(header))
        self._out.append(piece)
        padding = P.pad4(piece.length) - piece.length
        if padding:
            self._out.append(bytes(padding))

    def _reject_raw(self, raw_bhs: bytes, reason: RejectReason) -> None:
        log.info("reject (%s) %s from %s", reason.name, _opcode_name(raw_bhs[0] & 0x3F), self.peer)
        self._send(Opcode.REJECT, raw_bhs, final=True, reason=int(reason), itt=P.RESERVED_TAG,
                   statsn=self._advance_statsn(), **self._window(), datasn=0,
                   digests=self.session is not None)


_SEQUENCED: dict[int, Callable[..., None]] = {
    Opcode.NOP_OUT: TargetConnection._nop_out,
    Opcode.SCSI_COMMAND: TargetConnection._scsi_command,
    Opcode.TASK_MGMT_REQUEST: TargetConnection._task_management,
    Opcode.TEXT_REQUEST: TargetConnection._text,
    Opcode.LOGOUT_REQUEST: TargetConnection._logout,
}


_LUN_CACHE: dict[bytes, int] = {}
_NO_BUFFER = bytearray()  # the buffer of a write that got none (it fails without receiving anything)


def _lun_number(lun_field: bytes) -> int:
    """SAM-5 LUN field to a number (cached: a session uses few LUNs); -1 for unsupported addressing."""
    lun = _LUN_CACHE.get(lun_field)
    if lun is None:
        try:
            lun = decode_lun(lun_field)
        except ValueError:
            lun = -1  # an addressing method we do not support: treated as an absent LUN
        if len(_LUN_CACHE) < 4096:
            _LUN_CACHE[lun_field] = lun
    return lun


def _residual_flags(datalen: int, edtl: int) -> int:
    """The O (0x04, overflow) or U (0x02, underflow) bit of RFC 7143 §11.4.5.1; the count is the difference."""
    if datalen > edtl:
        return 0x04
    if datalen < edtl:
        return 0x02
    return 0


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#04x}"
