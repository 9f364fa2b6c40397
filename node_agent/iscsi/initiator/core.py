"""One iSCSI connection, initiator side, without I/O (RFC 7143).

``InitiatorConnection`` is the mirror of the target's ``TargetConnection``:
feed it received bytes (``receive``), send what ``take_output`` returns, and
read ``take_events`` for what happened.  It logs in (security stage with CHAP
through ``ChapInitiatorAuth``, operational keys through
``InitiatorNegotiator``), then carries SCSI commands within the CmdSN window:
immediate data, unsolicited Data-Out up to FirstBurstLength, solicited Data-Out
for each R2T, Data-In reassembly with phase-collapsed status and residuals; it
answers the target's NOP-In pings and sends its own NOP-Outs, task management,
Text (SendTargets) and Logout.

``pdu_hook`` may rewrite every outgoing PDU (header bytes and data) before
digests are computed: negative tests of a target use it the way libiscsi's
``local_iscsi_queue_pdu`` is used.

The per-I/O path is kept lean because it is Python work on every command
(profiled with ``shoal iscsi bench``, tests/perf/bench_initiator.py): SCSI
Command and Data-Out headers are packed with one precompiled struct into the
output batch (one ``bytearray`` per send, large payloads left as their
own buffers so the transport can ``writev`` them uncopied); Data-In and SCSI
Response headers are read with one ``unpack_from`` and handled without
building a header record; a command the CmdSN window admits is sent at once.  With
``completions_per_pass`` the core stops after that many completions (``held``) so the
caller can send the commands they let in before it ``resume()``s: client and target then
work at the same time instead of taking turns over one large receive.
``LAYOUTS`` in ``pdu.py`` stay the definition of every field: the unit tests
check these structs against it.  Everything else (login, NOP, Text, TMF,
Logout, Reject, R2T, asynchronous messages) takes the generic decoder.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from node_agent.iscsi import pdu as P
from node_agent.iscsi.buffers import ReceiveBuffer, copy_in
from node_agent.iscsi.chap import ChapInitiatorAuth
from node_agent.iscsi.keys import (InitiatorNegotiator, InitiatorSettings, NegotiationError, SessionParams,
                                   encode_text, parse_text)
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.serial import sn_add, sn_le

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
_DIRECT_MIN = 16 * 1024  # Data-In payloads at least this large go straight into the command's buffer
_SEPARATE = 64 * 1024  # outgoing payloads at least this large are sent as their own buffer (not copied)
ATTR_SIMPLE = 1
_SN_MASK, _SN_HALF = 0xFFFFFFFF, 1 << 31  # serial arithmetic (RFC 1982): a <= b  <=>  (b - a) & MASK < HALF
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
_ZERO_BHS = bytes(P.BHS_LENGTH)

# Per-I/O BHS layouts as precompiled structs (RFC 7143 §11.7, §11.4; the SCSI Command is
# pdu.pack_scsi_command); LAYOUTS stays their definition and tests/unit/test_initiator_fastpath.py
# checks each field against it.
# SCSI Data-Out: opcode, F, reserved, lengths, LUN, ITT, TTT, reserved, ExpStatSN, reserved, DataSN,
# Buffer Offset, reserved.
_DATA_OUT = struct.Struct(">BBHI8sIIIIIIII")
# What the target sends per I/O (Data-In, SCSI Response) shares one shape: opcode, flags, byte 2
# (Response), byte 3 (Status), lengths, LUN, ITT, word 20, StatSN, ExpCmdSN, MaxCmdSN, words 36, 40, 44
# (Data-In: DataSN, Buffer Offset, Residual Count; SCSI Response: ExpDataSN, Bidi Residual, Residual).
_TARGET_BHS = struct.Struct(">BBBBI8sIIIIIIII")
# SCSI Command (§11.3): opcode, flags, reserved, lengths, LUN, ITT, EDTL, CmdSN, ExpStatSN, CDB; as
# pdu.pack_scsi_command, packed here without its bytearray (the PDU hook's mutable header) per command.
_COMMAND = struct.Struct(">BBHI8sIIII16s")
_OP_COMMAND = int(Opcode.SCSI_COMMAND)
_OP_DATA_OUT = int(Opcode.DATA_OUT)
_pack_digest = P.pack_digest
_crc, _RESIDUE = P.digest_value, P.DIGEST_RESIDUE
_DATA_IN, _SCSI_RESPONSE = int(Opcode.DATA_IN), int(Opcode.SCSI_RESPONSE)
# Task management (§11.5.1 functions, §11.6.1 responses): the functions that end commands without
# a SCSI Response, and those of them that act on one LU.
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET = 1, 2, 4, 5
TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET = 6, 7
_TMF_PER_LUN = frozenset({TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET})
_TMF_ABORTING = _TMF_PER_LUN | {TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET}
TMF_COMPLETE, TMF_NO_TASK = 0, 1


LOGIN_STATUS_TEXT = {  # RFC 7143 §11.13.5
    (0x02, 0x00): "initiator error", (0x02, 0x01): "authentication failed",
    (0x02, 0x02): "not authorized (initiator not in the target's ACL)", (0x02, 0x03): "target not found",
    (0x02, 0x04): "target removed", (0x02, 0x05): "unsupported iSCSI version",
    (0x02, 0x06): "too many connections", (0x02, 0x07): "missing parameter",
    (0x02, 0x08): "cannot include in session", (0x02, 0x09): "session type not supported",
    (0x02, 0x0A): "session does not exist", (0x02, 0x0B): "invalid request during login",
    (0x03, 0x00): "target error", (0x03, 0x01): "service unavailable", (0x03, 0x02): "out of resources",
}


class InitiatorError(Exception):
    """A protocol failure of the connection (the session must be recovered)."""


# A command still outstanding when the connection is dropped for a protocol error this many times fails
# instead of being issued again: a target that answers it with the same broken PDU every time (or breaks
# the framing whenever it runs) would otherwise keep the session in a loop of reconnects, its caller
# waiting forever (each login starts a fresh reconnect timeout).
MAX_PROTOCOL_ERROR_DROPS = 3


class LoginError(InitiatorError):
    """The target refused the login (RFC 7143 §11.13.5 status class and detail)."""

    def __init__(self, message: str, status_class: int = 0x02, status_detail: int = 0x00):
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail

    @property
    def permanent(self) -> bool:
        """Initiator errors (class 2) do not go away by retrying; target errors (class 3) may."""
        return self.status_class == 0x02


# -- events ---------------------------------------------------------------------------------
@dataclass
class LoggedIn:
    params: SessionParams
    tsih: int


@dataclass
class Redirected:
    target_address: str
    permanent: bool


@dataclass(slots=True)
class TaskDone:
    """A SCSI command ended: status, Data-In received, sense data, residual (§11.4)."""

    itt: int
    status: int
    data: bytes | bytearray | memoryview = b""
    sense: bytes = b""
    residual: int = 0
    overflow: bool = False
    underflow: bool = False


@dataclass
class TaskRejected:
    itt: int
    reason: int


@dataclass
class TmfDone:
    """A Task Management Function Response (§11.6); ``aborted``: the ITTs of our commands it ended.

    After ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET or a target reset answered
    "Function complete" (and ABORT TASK answered "Task does not exist"), no SCSI Response comes for the
    tasks it covered (§4.2.3.3, §11.6.1): the core has forgotten them, and they are named here so
    their callers can be failed instead of waiting forever (or being re-issued after a reconnect)."""

    itt: int
    response: int
    aborted: tuple[int, ...] = ()


@dataclass
class TaskFailed:
    """A command the target answered in a way that breaks the protocol (e.g. a residual larger than
    the transfer, GOOD status with Data-In missing or with data to write not taken, a wrong DataSN, an
    R2T the command cannot answer): the command fails, the connection stays (its PDUs were well
    framed; issuing the command again would get the same answer).  Also a command outstanding through
    ``MAX_PROTOCOL_ERROR_DROPS`` connection drops (``protocol_error``)."""

    itt: int
    reason: str


@dataclass
class RequestLost:
    """A NOP-Out, Task Management Function, Text or Logout request whose connection was lost before its
    answer came (``InitiatorConnection.lost``): the answer belonged to that connection (ERL 0, §7.1.1),
    and the request is not sent again.  ``aborted``: for a TMF, the commands it was ending, forgotten as
    ``TmfDone.aborted`` ones are: the session's reinstatement ends them on the target (§6.3.5)."""

    itt: int
    opcode: int
    aborted: tuple[int, ...] = ()


@dataclass
class NopReply:
    itt: int
    data: bytes


@dataclass
class TextDone:
    itt: int
    pairs: list[tuple[str, str]]


@dataclass
class LoggedOut:
    itt: int
    response: int


@dataclass
class AsyncEvent:
    event: int
    lun: bytes
    parameters: tuple[int, int, int]
    data: bytes


@dataclass(slots=True)
class _Task:
    itt: int
    lun: bytes
    cdb: bytes  # padded to 16 bytes
    data_out: memoryview | None
    read_length: int
    buffer: bytearray | memoryview | None = None
    datasn: int = 0
    cmdsn: int = -1  # -1 until it goes out (``issued``); kept across a reconnect
    own_buffer: bool = True  # False: the caller's buffer (``submit(buffer=...)``), kept across a reconnect
    received: int = 0  # Data-In bytes received: GOOD must come with EDTL - residual of them (§11.7.5)
    sent: int = 0  # Data-Out bytes sent (immediate, unsolicited, solicited): GOOD must come after all of them
    drops: int = 0  # connections dropped for a protocol error while it was outstanding (``protocol_error``)


PduHook = Callable[[int, bytearray, bytes], tuple[bytearray, bytes] | None]


def encode_lun(lun: int) -> bytes:
    """SAM-5 single-level LUN: peripheral addressing below 256, flat space above (§4.6.6)."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    if lun < 16384:
        return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)
    raise ValueError(f"LUN {lun} out of range")


def aligned_buffer(size: int, alignment: int = 4096) -> memoryview:
    """A zeroed, writable ``size``-byte buffer starting on an ``alignment`` boundary.

    Where a large Data-In payload is received in place, the kernel's copy to user memory runs
    2-3x slower on this machine when the destination is not cache-line aligned (a ``bytearray``'s
    data starts 16 bytes into its heap block): measured with ``perf`` on 1 MiB reads, 16-byte
    offset ~450 µs of copy per MiB, page-aligned ~150 µs.  qemu-img's buffers are aligned too."""
    raw = bytearray(size + alignment)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % alignment
    return memoryview(raw)[start:start + size]


def random_isid(qualifier: int = 0) -> int:
    """An ISID of the 'random' type (T=10b, RFC 7143 §11.12.5)."""
    return (0x80 << 40) | (random.getrandbits(24) << 16) | (qualifier & 0xFFFF)


class InitiatorConnection:
    """Initiator side of one TCP connection; see the module docstring."""

    def __init__(self, settings: InitiatorSettings, *, isid: int, tsih: int = 0, cid: int = 0,
                 chap: tuple[str, str] | None = None, mutual_chap: tuple[str, str] | None = None,
                 initial_cmdsn: int = 1, pdu_hook: PduHook | None = None, completions_per_pass: int = 0):
        self.settings = settings
        self.completions_per_pass = completions_per_pass  # stop processing at this many events (0: never)
        self.held = False  # stopped there with received bytes left: deliver the events, send, ``resume()``
        self.isid = isid
        self.tsih = tsih
        self.cid = cid
        self.pdu_hook = pdu_hook
        self.negotiator = InitiatorNegotiator(settings, leading=tsih == 0)
        self.auth = ChapInitiatorAuth(chap, mutual_chap) if chap else None
        self.params: SessionParams | None = None
        self.stage = SECURITY
        self.cmdsn = initial_cmdsn
        self.expstatsn = 0
        self.maxcmdsn = initial_cmdsn
        self.header_digest = self.data_digest = False
        self.max_xmit = 8192  # the target's MaxRecvDataSegmentLength: 8192 until declared (§13.12)
        # DataPDUInOrder and DataSequenceInOrder (Yes until negotiated, §13.18, §13.19): each Data-In of a
        # command must then start where the last one ended (with either No, only the byte count is checked).
        self._in_order = True
        self.logged_in = False
        self.closed = False
        self._rx = ReceiveBuffer(256 * 1024)
        self._sink: memoryview | None = None  # where a large Data-In payload is being received directly
        self._trailer: tuple | None = None  # a directly placed Data-In waiting for padding/digest
        self._headers_only = False  # next receive: just a header's worth (the next payload may go direct)
        self._out: list[Any] = []  # finished send buffers, in order
        self._batch = bytearray()  # small PDUs of the current send, packed back to back
        self._luns: dict[int, bytes] = {}  # encoded LUN fields
        self._events: list[Any] = []
        self._itt = itertools.count(1)
        self._login_itt = 0
        self._login_text = bytearray()
        self._login_keys_sent = False
        self._tasks: dict[int, _Task] = {}
        self._waiting: deque[_Task] = deque()  # commands waiting for the CmdSN window to open
        self._requests: dict[int, int] = {}  # ITT -> opcode of each NOP-Out, TMF, Text, Logout not answered yet
        self._text: dict[int, list[tuple[str, str]]] = {}  # Text Request ITT -> its keys (asked again: ``adopt``)
        self._text_partial: dict[int, bytearray] = {}
        self._tmf: dict[int, tuple[int, tuple[int, ...]]] = {}  # TMF ITT -> (function, commands it covers)

    # ------------------------------------------------------------------ I/O interface
    def receive(self, data: bytes | bytearray | memoryview) -> None:
        copy_in(data, self.get_buffer, self.buffer_updated, lambda: self.closed)

    def get_buffer(self) -> memoryview:
        """Memory to receive into next: a command's buffer during a large Data-In, else the receive buffer.

        Right after a payload received in place, only a header's worth is offered: when the next
        PDU is another large Data-In, its whole payload then lands in place too, instead of the
        receive buffer's worth of it being copied there (one more small receive instead of a copy)."""
        if self._sink is not None:
            return self._sink
        if self._headers_only:
            self._headers_only = False
            # Exactly the last payload's padding and digest and the next BHS (and its digest), so
            # that the next payload, when placed, starts at its aligned offset in the buffer.
            size = P.BHS_LENGTH + (4 if self.header_digest else 0)
            if self._trailer is not None:
                size += self._trailer[3] + (4 if self._trailer[4] else 0)
            return self._rx.writable()[:size]
        return self._rx.writable()

    def buffer_updated(self, count: int) -> None:
        if self._sink is not None:
            self._sink = self._sink[count:] if count < len(self._sink) else None
            if self._sink is not None:
                return
        else:
            self._rx.filled(count)
        self._process()

    def resume(self) -> None:
        """Go on processing what was received after ``held`` stopped it (a no-op when nothing waits)."""
        if self.held:
            self._process()

    def take_output(self) -> list[Any]:
        """Buffers to send, in order: usually one ``bytearray``; large payloads are separate buffers."""
        out = self._out
        if self._batch:
            out.append(self._batch)
            self._batch = bytearray()  # handed over: the transport may keep it until sent
        if out:
            self._out = []
        return out

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def next_itt(self) -> int:
        itt = next(self._itt) & _SN_MASK
        if itt == _SN_MASK:  # 0xFFFFFFFF is the reserved tag (§11.2.1.8)
            itt = next(self._itt) & _SN_MASK
        return itt

    # ------------------------------------------------------------------ login
    def start_login(self) -> None:
        """Queue the first Login Request (security stage; AuthMethod=None when no CHAP is set)."""
        self._login_itt = self.next_itt()
        keys = self.negotiator.login_keys() + (self.auth.start() if self.auth else [("AuthMethod", "None")])
        self._login_keys_sent = True
        self._send_login(keys, csg=SECURITY, transit=self.auth is None, nsg=OPERATIONAL)

    def _send_login(self, keys: list[tuple[str, str]], *, csg: int, transit: bool, nsg: int) -> None:
        header = P.encode_header(Opcode.LOGIN_REQUEST, immediate=True, transit=transit, csg=csg,
                                 nsg=nsg if transit else 0, version_max=0, version_min=0, isid=self.isid,
                                 tsih=self.tsih, itt=self._login_itt, cid=self.cid, cmdsn=self.cmdsn,
                                 expstatsn=self.expstatsn, data_segment_length=0)
        self._queue(Opcode.LOGIN_REQUEST, header, encode_text(keys), digests=False)

    def _login_response(self, header: Any, data: bytes) -> None:
        if header.status_class != 0:
            if header.status_class == 0x01:
                keys = dict(parse_text(data))
                self._events.append(Redirected(keys.get("TargetAddress", ""), header.status_detail == 0x02))
                self.closed = True
                return
            self.closed = True
            status = (header.status_class, header.status_detail)
            reason = LOGIN_STATUS_TEXT.get(status, "refused")
            if status == (0x02, 0x00):  # the usual cause, which the status cannot name: a digest not offered
                digests = [f"{name}={value}" for name in ("HeaderDigest", "DataDigest")
                           if (value := self.negotiator.offered(name)) is not None]
                if digests:
                    reason += (f": the target refused a key of this login (its log names it), most often a digest "
                               f"it requires that was not offered; this login offered {', '.join(digests)}")
            raise LoginError(f"login failed: {reason} (status {status[0]:#04x}/{status[1]:#04x})", *status)
        self.expstatsn = sn_add(header.statsn, 1)
        self.maxcmdsn = header.maxcmdsn
        self._login_text += data
        if header.cont:  # the target has more text: ask for it with an empty request (§6.5)
            self._send_login([], csg=self.stage, transit=False, nsg=0)
            return
        pairs = parse_text(bytes(self._login_text))
        self._login_text.clear()
        if header.tsih:
            self.tsih = header.tsih
        if self.stage == SECURITY:
            self._security_response(header, pairs)
        else:
            self._operational_response(header, pairs)

    def _security_response(self, header: Any, pairs: list[tuple[str, str]]) -> None:
        security = {k: v for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")}
        other = [(k, v) for k, v in pairs if k not in security]
        answers = self.negotiator.response(other) if other else []
        may_transit = True
        if self.auth is not None:
            keys, may_transit = self.auth.step(security)
            answers = keys + answers
        elif security.get("AuthMethod", "None") != "None":
            raise LoginError("target demands authentication and no CHAP credentials are set", 0x02, 0x01)
        if header.transit:
            if self.auth is not None and not self.auth.complete:
                raise LoginError("target left the security stage before authenticating itself", 0x02, 0x01)
            self.stage = header.nsg
            if self.stage == FULL_FEATURE:
                self._finish_login(header)
                return
            self._send_login(answers + self.negotiator.offers(), csg=OPERATIONAL, transit=True, nsg=FULL_FEATURE)
            return
        self._send_login(answers, csg=SECURITY, transit=may_transit, nsg=OPERATIONAL)

    def _operational_response(self, header: Any, pairs: list[tuple[str, str]]) -> None:
        answers = self.negotiator.response([(k, v) for k, v in pairs if k != "TargetPortalGroupTag"])
        if header.transit and header.nsg == FULL_FEATURE:
            if answers:
                raise LoginError("target transited while it still had keys to negotiate", 0x02, 0x00)
            self._finish_login(header)
            return
        self._send_login(answers + self.negotiator.offers(), csg=OPERATIONAL, transit=True, nsg=FULL_FEATURE)

    def _finish_login(self, header: Any) -> None:
        params = self.negotiator.params()
        self.params = params
        self.tsih = header.tsih
        self.stage = FULL_FEATURE
        self.logged_in = True
        self.header_digest = params.header_digest
        self.data_digest = params.data_digest
        self.max_xmit = params.max_xmit_data_segment_length
        self._in_order = params.data_pdu_in_order and params.data_sequence_in_order
        self._events.append(LoggedIn(params, header.tsih))
        self._flush_waiting()

    # ------------------------------------------------------------------ full feature requests
    def submit(self, cdb: bytes, lun: int = 0, *, data_out: bytes | bytearray | memoryview | None = None,
               read_length: int = 0, itt: int | None = None,
               buffer: bytearray | memoryview | None = None) -> int:
        """Queue a SCSI command; its end arrives as ``TaskDone`` (or ``TaskRejected``).

        Data-In goes into ``buffer`` when given (the caller's writable memory, ``read_length``
        defaulting to its size; ``TaskDone.data`` is then that memory itself, or a view of its
        first bytes after an underflow), else into a new buffer."""
        if cdb.__class__ is not bytes or len(cdb) != 16:
            if len(cdb) > 16:
                raise ValueError("CDBs longer than 16 bytes need an AHS, which is not supported")
            cdb = bytes(cdb).ljust(16, b"\0")
        lun_field = self._luns.get(lun)
        if lun_field is None:
            lun_field = self._luns[lun] = encode_lun(lun)
        if itt is None:
            itt = next(self._itt) & _SN_MASK  # next_itt(), inlined: once per command
            if itt == _SN_MASK:
                itt = next(self._itt) & _SN_MASK
        if data_out is not None:
            data_out = memoryview(data_out).cast("B")
        own = True
        if buffer is not None:
            if buffer.__class__ is not bytearray:
                if buffer.__class__ is not memoryview or buffer.format != "B" or buffer.ndim != 1 \
                        or not buffer.c_contiguous:
                    buffer = memoryview(buffer).cast("B")
                if buffer.readonly:
                    raise ValueError("the read buffer must be writable")
            size = len(buffer)
            if read_length > size:
                raise ValueError(f"read_length {read_length} exceeds the {size}-byte buffer")
            if read_length and read_length < size:
                buffer = memoryview(buffer)[:read_length]
            else:
                read_length = size
            own = False
        elif read_length:
            buffer = bytearray(read_length) if read_length < _DIRECT_MIN else aligned_buffer(read_length)
        task = _Task(itt, lun_field, cdb, data_out, read_length, buffer, 0, -1, own)
        self._tasks[itt] = task
        if self.logged_in and not self._waiting and (self.maxcmdsn - self.cmdsn) & _SN_MASK < _SN_HALF:
            self._send_command(task)  # the window is open and nothing queues before it
        else:
            self._waiting.append(task)
            if self.logged_in:
                self._flush_waiting()
        return itt

    def resubmit_all(self) -> list[int]:
        """After a reconnect: queue again every command that had no status (same ITTs)."""
        pending = sorted(self._tasks.values(), key=lambda t: t.cmdsn)
        self._waiting = deque(pending)
        return [t.itt for t in pending]

    def adopt(self, other: "InitiatorConnection") -> None:
        """Take over the unfinished commands of a lost connection (session reinstatement, ERL 0)."""
        for task in sorted(other._tasks.values(), key=lambda t: t.cmdsn):
            task.datasn = task.received = task.sent = 0
            if task.read_length and task.own_buffer:
                task.buffer = bytearray(task.read_length) if task.read_length < _DIRECT_MIN \
                    else aligned_buffer(task.read_length)
            self._tasks[task.itt] = task
            self._waiting.append(task)
        self._itt = other._itt
        if self.logged_in:
            self._flush_waiting()
            for itt, pairs in other._text.items():  # the SendTargets queries ``lost`` kept: asked again
                self._text[itt] = pairs
                self._requests[itt] = Opcode.TEXT_REQUEST
                self._send_text(itt, encode_text(pairs), P.RESERVED_TAG)

    def lost(self) -> None:
        """The connection is gone: end its NOP-Out, Task Management, Text and Logout requests without an
        answer, each as ``RequestLost`` (their answers would have come on this connection only, §7.1.1).

        Whether to send a request again on the next connection is decided per kind.  A ping tested this
        connection: no.  A TMF acted on a task set that reinstating the session ends anyway (§6.3.5): not
        repeated, and the commands it was ending are forgotten (not issued again: their caller asked for
        them to end).  A Text Request with any key but SendTargets negotiates (§6.2), and may or may not
        have taken effect: no.  A Text Request of SendTargets alone only reads the target's configuration
        (§13.3): it stays, and ``adopt`` asks it again, as it issues again the SCSI commands left here."""
        for itt, opcode in list(self._requests.items()):
            if opcode == Opcode.TEXT_REQUEST and all(key == "SendTargets" for key, _ in self._text[itt]):
                continue
            del self._requests[itt]
            self._text.pop(itt, None)
            aborted: tuple[int, ...] = ()
            if opcode == Opcode.TASK_MGMT_REQUEST:
                aborted = tuple(task for task in self._tmf.pop(itt)[1] if task in self._tasks)
                for task in aborted:
                    self.forget(task)
            self._events.append(RequestLost(itt, opcode, aborted))
        self._text_partial.clear()  # a query asked again starts over

    def outstanding(self) -> list[int]:
        return list(self._tasks)

    def nop_out(self, data: bytes = b"") -> int:
        itt = self.next_itt()
        header = P.encode_header(Opcode.NOP_OUT, immediate=True, final=True, lun=bytes(8), itt=itt,
                                 ttt=P.RESERVED_TAG, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
        self._queue(Opcode.NOP_OUT, header, data)
        self._requests[itt] = Opcode.NOP_OUT
        return itt

    def task_management(self, function: int, lun: int = 0, referenced_itt: int = P.RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5); its answer arrives as ``TmfDone``.

        The commands it covers are noted now: ABORT TASK the referenced one; ABORT TASK SET, CLEAR
        TASK SET and LOGICAL UNIT RESET those of ``lun`` already sent, target resets every one already
        sent.  Sent ones are those with a CmdSN below the TMF's (§4.2.3.3): one still waiting for the
        CmdSN window goes out after it and is not affected."""
        itt = self.next_itt()
        ref = self._tasks.get(referenced_itt)
        if function == TMF_ABORT_TASK:
            covered: tuple[int, ...] = (referenced_itt,) if ref is not None else ()
        elif function in _TMF_ABORTING:
            lun_field = encode_lun(lun) if function in _TMF_PER_LUN else None
            waiting = {task.itt for task in self._waiting}
            covered = tuple(t.itt for t in self._tasks.values()
                            if t.itt not in waiting and (lun_field is None or t.lun == lun_field))
        else:
            covered = ()
        self._tmf[itt] = (function, covered)
        self._requests[itt] = Opcode.TASK_MGMT_REQUEST
        header = P.encode_header(Opcode.TASK_MGMT_REQUEST, immediate=True, final=True, function=function,
                                 lun=encode_lun(lun), itt=itt, referenced_task_tag=referenced_itt,
                                 cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                                 refcmdsn=ref.cmdsn if ref is not None and ref.cmdsn >= 0 else self.cmdsn)
        self._queue(Opcode.TASK_MGMT_REQUEST, header, b"")
        return itt

    def text(self, pairs: list[tuple[str, str]]) -> int:
        itt = self.next_itt()
        self._text[itt] = list(pairs)
        self._requests[itt] = Opcode.TEXT_REQUEST
        self._send_text(itt, encode_text(pairs), P.RESERVED_TAG)
        return itt

    def _send_text(self, itt: int, data: bytes, ttt: int) -> None:
        header = P.encode_header(Opcode.TEXT_REQUEST, immediate=True, final=True, lun=bytes(8), itt=itt, ttt=ttt,
                                 cmdsn=self.cmdsn, expstatsn=self.expstatsn)
        self._queue(Opcode.TEXT_REQUEST, header, data)

    def logout(self, reason: int = 0) -> int:
        itt = self.next_itt()
        header = P.encode_header(Opcode.LOGOUT_REQUEST, immediate=True, final=True, reason=reason, itt=itt,
                                 cid=self.cid, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
        self._queue(Opcode.LOGOUT_REQUEST, header, b"")
        self._requests[itt] = Opcode.LOGOUT_REQUEST
        return itt

    def forget(self, itt: int) -> None:
        """Drop a command the caller gave up on (after ABORT TASK, a cancellation or a timeout).

        Its later PDUs are ignored, and its read buffer is never written again: a Data-In payload being
        received straight into it (``_start_direct``) goes on into a private copy instead, which its
        data digest is checked against (the caller may reuse its buffer as soon as this returns)."""
        task = self._tasks.pop(itt, None)
        if task is None:
            return
        if task in self._waiting:
            self._waiting.remove(task)
        if self._trailer is not None and self._trailer[1] is task:
            bhs, _, length, pad, dd = self._trailer
            offset = bhs[12]
            placed = length - (len(self._sink) if self._sink is not None else 0)
            copy = bytearray(offset + length)
            copy[offset:offset + placed] = memoryview(task.buffer)[offset:offset + placed]  # type: ignore[arg-type]
            if self._sink is not None:
                self._sink = memoryview(copy)[offset + placed:offset + length]
            stand_in = _Task(itt, task.lun, task.cdb, None, task.read_length, copy)
            self._trailer = (bhs, stand_in, length, pad, dd)

    def cancel(self, itt: int) -> int | None:
        """The caller gave up on a command: ``forget`` it and, when it went out on this connection, send
        ABORT TASK (§11.5.1) so that the target does not run it later either (a cancelled WRITE landing
        after a later one would undo it).  The abort's answer is not waited for; its ITT is returned."""
        task = self._tasks.get(itt)
        if task is None:
            return None
        sent = self.logged_in and not self.closed and task not in self._waiting
        tmf = self._abort_task(task) if sent else None
        self.forget(itt)
        return tmf

    def abort(self, itt: int) -> int | None:
        """Send ABORT TASK (§11.5.1) for a command that went out on this connection, and keep it outstanding
        until the answer, unlike ``cancel``: a SCSI Response that comes first still ends it as usual.  The
        answer is a ``TmfDone``, naming it in ``aborted`` after "Function complete" or "Task does not exist"
        (the core has forgotten it then: none of its later Data-In lands in its buffer); after any other
        answer it stays outstanding.  The caller can so report the command ended only once the target has
        ended it, and nothing issued after that runs before it.  None when it is not outstanding, or has not
        gone out on this connection (it waits for the CmdSN window: there is nothing to abort, ``forget`` it)."""
        task = self._tasks.get(itt)
        if task is None or not self.logged_in or self.closed or task in self._waiting:
            return None
        return self._abort_task(task)

    def issued(self, itt: int) -> bool:
        """Whether command ``itt`` went out to the target, on this connection or on one it was adopted from:
        if so it may have run (in part), whatever becomes of it."""
        task = self._tasks.get(itt)
        return task is not None and task.cmdsn >= 0

    def _abort_task(self, task: _Task) -> int:
        """Queue ABORT TASK for ``task`` (§11.5.1); nobody waits for its answer (the caller forgets the task)."""
        itt = self.next_itt()
        self._tmf[itt] = (TMF_ABORT_TASK, (task.itt,))
        self._requests[itt] = Opcode.TASK_MGMT_REQUEST
        header = P.encode_header(Opcode.TASK_MGMT_REQUEST, immediate=True, final=True, function=TMF_ABORT_TASK,
                                 lun=task.lun, itt=itt, referenced_task_tag=task.itt, cmdsn=self.cmdsn,
                                 expstatsn=self.expstatsn, refcmdsn=task.cmdsn)
        self._queue(Opcode.TASK_MGMT_REQUEST, header, b"")
        return itt

    def protocol_error(self, reason: str, limit: int = MAX_PROTOCOL_ERROR_DROPS) -> list[int]:
        """The connection is being dropped for a protocol error (ERL 0, §7.1.1): count it against every
        outstanding command, and fail (``TaskFailed``) those it happened to ``limit`` times instead of
        leaving them to be issued again after the reconnect.  Their ITTs are returned."""
        failed = []
        for task in list(self._tasks.values()):
            task.drops += 1
            if task.drops >= limit:
                self.forget(task.itt)
                self._events.append(TaskFailed(task.itt, f"the connection was dropped {task.drops} times for a "
                                                         f"protocol error while this command was outstanding "
                                                         f"(last: {reason}); it is not issued again"))
                failed.append(task.itt)
        return failed

    # ------------------------------------------------------------------ sending commands
    def _flush_waiting(self) -> None:
        while self._waiting and sn_le(self.cmdsn, self.maxcmdsn):
            task = self._waiting.popleft()
            if task.itt in self._tasks:
                self._send_command(task)

    def _send_command(self, task: _Task) -> None:
        cmdsn = task.cmdsn = self.cmdsn
        self.cmdsn = (cmdsn + 1) & _SN_MASK
        data = task.data_out
        immediate: Any = b""
        final = True
        if data is not None and len(data):
            params = self.params
            assert params is not None
            edtl = len(data)
            first_burst = min(params.first_burst_length, edtl)
            if params.immediate_data:
                immediate = data[:min(first_burst, self.max_xmit)]
            task.sent = len(immediate)
            unsolicited_end = len(immediate) if params.initial_r2t else first_burst
            final = unsolicited_end <= len(immediate)
            flags = (0x80 if final else 0) | (0x40 if task.read_length else 0) | 0x20 | ATTR_SIMPLE
        else:
            edtl = task.read_length if data is None else 0
            flags = (0xC0 if task.read_length else 0x80) | ATTR_SIMPLE
        if self.pdu_hook is None:  # straight into the send batch
            header = _COMMAND.pack(_OP_COMMAND, flags, 0, len(immediate), task.lun, task.itt, edtl, cmdsn,
                                   self.expstatsn, task.cdb)
            self._batch += header
            if self.header_digest:
                self._batch += _pack_digest(_crc(header))
            if immediate:
                self._put(immediate, self.data_digest)
        else:
            header = P.pack_scsi_command(flags, len(immediate), task.lun, task.itt, edtl, cmdsn, self.expstatsn,
                                         task.cdb)
            self._queue(Opcode.SCSI_COMMAND, header, immediate)
        if not final:
            self._send_data_out(task, len(immediate), unsolicited_end - len(immediate), P.RESERVED_TAG)

    def _send_data_out(self, task: _Task, offset: int, length: int, ttt: int) -> None:
        assert task.data_out is not None
        task.sent += length
        end = offset + length
        datasn = 0
        while offset < end:
            size = min(self.max_xmit, end - offset)
            final = 0x80 if offset + size == end else 0
            piece = task.data_out[offset:offset + size]
            if self.pdu_hook is None:
                self._pack(_DATA_OUT, _OP_DATA_OUT, final, 0, size, task.lun, task.itt, ttt, 0, self.expstatsn,
                           0, datasn, offset, 0)
                self._put(piece, self.data_digest)
            else:
                header = bytearray(_DATA_OUT.pack(_OP_DATA_OUT, final, 0, 0, task.lun, task.itt, ttt, 0,
                                                  self.expstatsn, 0, datasn, offset, 0))
                self._queue(Opcode.DATA_OUT, header, piece)
            offset += size
            datasn += 1

    def _pack(self, layout: struct.Struct, *values: Any) -> None:
        """Pack a BHS (DataSegmentLength included) straight into the send batch, plus its header digest."""
        batch = self._batch
        start = len(batch)
        batch += _ZERO_BHS
        layout.pack_into(batch, start, *values)
        if self.header_digest:
            batch += _pack_digest(_crc(batch[start:]))

    def _put(self, data: Any, data_digest: bool) -> None:
        """A data segment after its header: padded to 4 bytes, with its digest (RFC 7143 §11.2.3)."""
        size = len(data)
        if size >= _SEPARATE:  # its own buffer: sent with writev, never copied here
            if self._batch:
                self._out.append(self._batch)
            self._out.append(data)
            self._batch = bytearray()
        else:
            self._batch += data
        pad = _PAD[-size & 3]
        if pad:
            self._batch += pad
            if data_digest:
                self._batch += _pack_digest(_crc(pad, _crc(data)))
        elif data_digest:
            self._batch += _pack_digest(_crc(data))

    def _queue(self, opcode: int, header: bytearray, data, *, digests: bool = True) -> None:
        if self.pdu_hook is not None:
            changed = self.pdu_hook(opcode, header, data)
            if changed is not None:
                header, data = changed
        header[5:8] = len(data).to_bytes(3, "big")
        self._batch += header
        if self.header_digest and digests:
            self._batch += _pack_digest(_crc(header))
        if len(data):
            self._put(data, self.data_digest and digests)

    # ------------------------------------------------------------------ receiving
    def _process(self) -> None:
        rx = self._rx
        buf = rx.buf
        view = memoryview(buf)
        unpack = _TARGET_BHS.unpack_from
        # Only a Login Response (the generic path below) changes these: read again after it.
        logged_in, hd, dd_on = self.logged_in, self.header_digest, self.data_digest
        max_recv = self.params.max_recv_data_segment_length if self.params is not None else 8192
        limit = self.completions_per_pass
        self.held = False
        try:
            while not self.closed and self._sink is None:
                if self._trailer is not None and not self._finish_trailer(view):
                    return
                pos = rx.start
                have = rx.end - pos
                if have < P.BHS_LENGTH:
                    return
                if limit and len(self._events) >= limit:
                    self.held = True  # the caller delivers these, sends what they cause, then resume()s
                    return
                bhs = unpack(buf, pos)  # the BHS, read once
                lengths = bhs[4]
                ahs, dsl = (lengths >> 24) * 4, lengths & 0xFFFFFF
                if dsl > max_recv and logged_in:  # §13.12: more than we declared we take in one PDU
                    self.closed = True  # not framed the way we can trust: the connection ends
                    raise InitiatorError(f"a PDU with a {dsl}-byte data segment, more than our "
                                         f"MaxRecvDataSegmentLength of {max_recv} (RFC 7143 §13.12)")
                dd = dd_on and dsl  # digests start with full feature phase (set by _finish_login)
                cursor = pos + P.BHS_LENGTH + ahs
                total = cursor - pos + ((dsl + 3) & ~3) + (4 if hd else 0) + (4 if dd else 0)
                if have < total:
                    if dsl >= _DIRECT_MIN and bhs[0] & 0x3F == _DATA_IN and logged_in:
                        self._start_direct(view, bhs, pos, cursor, dsl)
                    return
                if hd:  # digests compared as integers: no bytes made per PDU
                    if _crc(view[pos:cursor + 4]) != _RESIDUE:  # the header and its digest: one call
                        raise InitiatorError("header digest error from the target")
                    cursor += 4
                data = view[cursor:cursor + dsl]
                if dd:
                    padded = cursor + ((dsl + 3) & ~3)
                    if _crc(view[cursor:padded + 4]) != _RESIDUE:
                        raise InitiatorError("data digest error from the target")
                opcode = bhs[0] & 0x3F
                if opcode == _DATA_IN and logged_in:
                    self._data_in(bhs, data)
                elif opcode == _SCSI_RESPONSE and logged_in:
                    self._scsi_response(bhs, data)
                else:
                    opcode, header = P.decode_header(view[pos:pos + P.BHS_LENGTH])
                    self._dispatch(opcode, header, data)
                    logged_in, hd, dd_on = self.logged_in, self.header_digest, self.data_digest
                    if self.params is not None:
                        max_recv = self.params.max_recv_data_segment_length
                rx.start = pos + total  # rx.consume(total), inlined (writable() rewinds an empty buffer)
        except (P.PduError, NegotiationError) as exc:
            self.closed = True
            raise InitiatorError(str(exc)) from exc
        finally:
            view.release()

    def _start_direct(self, view: memoryview, bhs: tuple, pos: int, cursor: int, dsl: int) -> None:
        """Receive the rest of a large Data-In payload straight into its command's buffer."""
        rx = self._rx
        hd = self.header_digest
        payload = cursor + (4 if hd else 0)
        if rx.end < payload:
            return
        if hd and view[cursor:payload] != P.digest_bytes(view[pos:cursor]):
            raise InitiatorError("header digest error from the target")
        task = self._tasks.get(bhs[6])  # ITT
        offset = bhs[12]  # Buffer Offset; bhs[11] is the DataSN
        if task is None or task.buffer is None or bhs[11] != task.datasn or offset != task.received \
                or offset + dsl > len(task.buffer):
            return  # not a transfer we can place (or not in order): framed and handled the ordinary way
        have = min(rx.end - payload, dsl)
        task.buffer[offset:offset + have] = view[payload:payload + have]
        rx.consume(payload + have - pos)
        if have < dsl:
            self._sink = memoryview(task.buffer)[offset + have:offset + dsl]
            self._headers_only = True  # after this payload, receive the next header alone (see get_buffer)
        self._trailer = (bhs, task, dsl, -dsl & 3, self.data_digest)

    def _finish_trailer(self, view: memoryview) -> bool:
        bhs, task, length, pad, dd = self._trailer  # type: ignore[misc]
        rx = self._rx
        need = pad + (4 if dd else 0)
        if len(rx) < need:
            return False
        start = rx.start
        if dd:
            offset = bhs[12]
            digest = P.digest_bytes(memoryview(task.buffer)[offset:offset + length], view[start:start + pad])
            if view[start + pad:start + need] != digest:
                raise InitiatorError("data digest error from the target")
        rx.consume(need)
        self._trailer = None
        self._data_in(bhs, None)  # the payload is already in place
        return True

    def _dispatch(self, opcode: int, header: Any, data: memoryview | None) -> None:
        if opcode == Opcode.LOGIN_RESPONSE:
            if self.logged_in:
                raise InitiatorError("Login Response in full feature phase")
            self._login_response(header, bytes(data))
            return
        if not self.logged_in:
            raise InitiatorError(f"{Opcode(opcode).name} before login completed")
        if opcode != Opcode.R2T:
            self._advance(header)
        maxcmdsn = getattr(header, "maxcmdsn", None)
        if maxcmdsn is not None and sn_le(sn_add(header.expcmdsn, -1), maxcmdsn) and sn_le(self.maxcmdsn, maxcmdsn):
            self.maxcmdsn = maxcmdsn  # §4.2.2.1: ignored when MaxCmdSN < ExpCmdSN - 1, or older than ours
        handler = _HANDLERS.get(opcode)
        if handler is None:
            raise InitiatorError(f"unexpected {Opcode(opcode).name} from the target")
        handler(self, header, data)
        if self._waiting:
            self._flush_waiting()

    def _advance(self, header: Any) -> None:
        statsn = getattr(header, "statsn", None)
        if statsn is not None and (header.opcode != Opcode.NOP_IN or header.itt != P.RESERVED_TAG):
            self.expstatsn = sn_add(statsn, 1)

    def _data_in(self, bhs: tuple, data: memoryview | None) -> None:
        """SCSI Data-In (§11.7), from its unpacked BHS; ``data`` None: already placed by _start_direct."""
        _, flags, _, status, _, _, itt, _, statsn, expcmdsn, maxcmdsn, datasn, offset, residual = bhs
        if flags & 0x01:  # S: the status is in this PDU, and so is a StatSN (§11.7.4)
            self.expstatsn = (statsn + 1) & _SN_MASK
        # §4.2.2.1: ignored when MaxCmdSN < ExpCmdSN - 1, or when older than ours (an out-of-date value must not
        # take back room the target granted: the commands let in would wait for a NOP-Out to ask again).
        if (maxcmdsn - expcmdsn + 1) & _SN_MASK < _SN_HALF and (maxcmdsn - self.maxcmdsn) & _SN_MASK < _SN_HALF:
            self.maxcmdsn = maxcmdsn
        task = self._tasks.get(itt)
        if task is not None:  # None: a command we gave up on
            size = bhs[4] & 0xFFFFFF  # DataSegmentLength
            if datasn != task.datasn:
                self._fail_task(task, f"Data-In DataSN {datasn}, {task.datasn} expected (RFC 7143 §11.7)",
                                not flags & 0x01)
            elif size and offset != task.received and self._in_order:
                self._misplaced(task, offset)
            elif data is not None and (task.buffer is None or offset + size > len(task.buffer)):
                self._fail_task(task, f"Data-In for bytes {offset}-{offset + size} of a command that reads "
                                      f"{task.read_length} (beyond its expected transfer length)", not flags & 0x01)
            else:
                task.datasn += 1
                if data is not None:
                    task.buffer[offset:offset + size] = data  # type: ignore[index]
                task.received += size
                if flags & 0x01:
                    if flags & 0x06 or task.received < task.read_length:  # O or U, or data missing (§11.7.5)
                        self._complete(task, status, b"", residual, bool(flags & 0x04), bool(flags & 0x02))
                    else:  # _complete, inlined for the common case
                        del self._tasks[itt]
                        self._events.append(TaskDone(itt, status, task.buffer, b"", residual, False, False))
        if self._waiting:
            self._flush_waiting()

    def _fail_task(self, task: _Task, reason: str, abort: bool) -> None:
        """End one command with ``TaskFailed`` for a PDU of the target's that breaks the protocol for it
        alone (a wrong DataSN, Data-In past its transfer, an R2T it cannot answer).

        The PDU was well framed, so the connection and the other commands carry on: dropping the
        connection would only issue the command again, to get the same answer, in a loop (ERL 0 allows
        the drop, §7.1.1, but nothing in it bounds the retries).  With ``abort`` (the target has not
        ended the command: no status came with the PDU) ABORT TASK tells the target to end it as well,
        rather than wait for Data-Out or send more Data-In; later PDUs for it are ignored either way."""
        if abort and self.logged_in and not self.closed:
            self._abort_task(task)
        self.forget(task.itt)
        self._events.append(TaskFailed(task.itt, reason))

    def _misplaced(self, task: _Task, offset: int) -> None:
        """Fail a read whose Data-In left a gap or overlapped (the target's later PDUs for it are ignored).

        With DataPDUInOrder and DataSequenceInOrder Yes, a command's Data-In comes at continuously
        increasing offsets, without gaps or overlays (§13.18, §13.19), so each PDU must start where the
        bytes received so far end.  Counting bytes alone would take two PDUs at one offset for the whole
        transfer, and hand over as data the part of the buffer that neither of them wrote."""
        del self._tasks[task.itt]
        self._events.append(TaskFailed(task.itt, f"Data-In at buffer offset {offset}, {task.received} expected (a "
                                                 f"gap or an overlap; RFC 7143 §13.18, §13.19)"))

    def _scsi_response(self, bhs: tuple, data: memoryview) -> None:
        """SCSI Response (§11.4), from its unpacked BHS."""
        _, flags, response, status, _, _, itt, _, statsn, expcmdsn, maxcmdsn, _, _, residual = bhs
        self.expstatsn = (statsn + 1) & _SN_MASK
        if (maxcmdsn - expcmdsn + 1) & _SN_MASK < _SN_HALF and (maxcmdsn - self.maxcmdsn) & _SN_MASK < _SN_HALF:
            self.maxcmdsn = maxcmdsn  # §4.2.2.1, as in _data_in
        task = self._tasks.get(itt)
        if task is not None:
            sense = b""
            if len(data) >= 2:
                length = int.from_bytes(data[:2], "big")
                if 2 + length > len(data):  # SenseLength, then the sense data, in the segment (§11.4.7.1)
                    self._fail_task(task, f"SCSI Response with a SenseLength of {length} bytes in a data segment "
                                          f"of {len(data)} (RFC 7143 §11.4.7)", False)
                    if self._waiting:
                        self._flush_waiting()
                    return
                sense = bytes(data[2:2 + length])
            if response != 0:  # a target failure, not a SCSI status (§11.4.3)
                status = 0xFF
            self._complete(task, status, sense, residual, bool(flags & 0x04), bool(flags & 0x02))
        if self._waiting:
            self._flush_waiting()

    def _complete(self, task: _Task, status: int, sense: bytes, residual: int, overflow: bool,
                  underflow: bool) -> None:
        """End a command with its status; ``TaskFailed`` instead when the answer cannot be right.

        An underflow residual counts bytes of the expected transfer that were not sent (§11.4.5.1),
        so it is at most the Expected Data Transfer Length; and GOOD status ends a read whose
        EDTL less that residual arrived as Data-In (§11.7.5): a buffer with unreceived bytes is
        never handed to the caller as data."""
        del self._tasks[task.itt]
        out = task.data_out
        edtl = len(out) if out is not None and len(out) else task.read_length
        if underflow and residual > edtl:
            self._events.append(TaskFailed(task.itt, f"the target reported a residual of {residual} bytes, "
                                                     f"more than the {edtl} expected (RFC 7143 §11.4.5.1)"))
            return
        if status == 0 and out is not None and len(out):
            # A write is done only when the target took every byte: an underflow residual counts bytes
            # "not transferred" (§11.4.5.1), and bytes it neither took unsolicited nor asked for with an
            # R2T (§11.8) never reached it.  GOOD then still means data not written (Linux's sd takes it
            # as a partial completion): never a success for the caller.
            if underflow and residual:
                self._events.append(TaskFailed(task.itt, f"the target reported {residual} of the {edtl} bytes "
                                                         f"to write as not transferred (underflow, RFC 7143 "
                                                         f"§11.4.5.1): the write is incomplete"))
                return
            if task.sent < edtl:
                self._events.append(TaskFailed(task.itt, f"GOOD status after {task.sent} of the {edtl} bytes to "
                                                         f"write were sent (RFC 7143 §11.8): the write is "
                                                         f"incomplete"))
                return
        if status == 0 and out is None and task.read_length:
            expected = task.read_length - (residual if underflow else 0)
            if task.received < expected:
                self._events.append(TaskFailed(task.itt, f"GOOD status after {task.received} bytes of Data-In, "
                                                         f"{expected} expected (RFC 7143 §11.7.5)"))
                return
        data: Any = task.buffer
        if data is None:
            data = b""
        elif underflow:  # U: the target sent ``residual`` bytes less than expected (§11.4.5.1)
            data = memoryview(data)[:len(data) - residual]
        self._events.append(TaskDone(task.itt, status, data, sense, residual, overflow, underflow))

    def _r2t(self, header: Any, data: memoryview) -> None:
        """Send the Data-Out an R2T asks for (§11.8); one we cannot answer fails its command."""
        task = self._tasks.get(header.itt)
        if task is None:
            return  # a command we gave up on
        offset, length = header.buffer_offset, header.desired_data_transfer_length
        params = self.params
        problem = ""
        if task.data_out is None or not len(task.data_out):
            problem = "an R2T for a command with no data to write"
        elif length == 0:  # §11.8: the Desired Data Transfer Length MUST NOT be 0
            problem = "an R2T for 0 bytes (RFC 7143 §11.8)"
        elif offset + length > len(task.data_out):
            problem = f"an R2T for bytes {offset}-{offset + length} of a {len(task.data_out)}-byte write"
        elif params is not None and length > params.max_burst_length:  # §13.13
            problem = f"an R2T for {length} bytes, more than the MaxBurstLength of {params.max_burst_length}"
        if problem:
            self._fail_task(task, f"the target sent {problem}", True)
            return
        self._send_data_out(task, offset, length, header.ttt)

    def _nop_in(self, header: Any, data: memoryview) -> None:
        if header.ttt != P.RESERVED_TAG:  # the target pings us: answer (§11.18)
            reply = P.encode_header(Opcode.NOP_OUT, immediate=True, final=True, lun=header.lun,
                                    itt=P.RESERVED_TAG, ttt=header.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
            self._queue(Opcode.NOP_OUT, reply, b"")
        elif header.itt != P.RESERVED_TAG:
            self._requests.pop(header.itt, None)
            self._events.append(NopReply(header.itt, bytes(data)))

    def _reject(self, header: Any, data: memoryview) -> None:
        itt = int.from_bytes(data[16:20], "big") if len(data) >= 48 else P.RESERVED_TAG
        self._tasks.pop(itt, None)
        if self._requests.pop(itt, None) is not None:
            self._tmf.pop(itt, None)
            self._text.pop(itt, None)
            self._text_partial.pop(itt, None)
        self._events.append(TaskRejected(itt, header.reason))

    def _tmf_response(self, header: Any, data: memoryview) -> None:
        """Forget the commands the function ended: no SCSI Response follows for them (§11.6.1)."""
        function, covered = self._tmf.pop(header.itt, (0, ()))
        self._requests.pop(header.itt, None)
        aborted: list[int] = []
        if header.response == TMF_COMPLETE or (function == TMF_ABORT_TASK and header.response == TMF_NO_TASK):
            for itt in covered:
                if itt in self._tasks:  # not those whose SCSI Response came before this answer
                    self.forget(itt)
                    aborted.append(itt)
        self._events.append(TmfDone(header.itt, header.response, tuple(aborted)))

    def _text_response(self, header: Any, data: memoryview) -> None:
        partial = self._text_partial.setdefault(header.itt, bytearray())
        partial += data
        if header.cont or not header.final:
            self._send_text(header.itt, b"", header.ttt)
            return
        del self._text_partial[header.itt]
        self._text.pop(header.itt, None)
        self._requests.pop(header.itt, None)
        self._events.append(TextDone(header.itt, parse_text(bytes(partial))))

    def _logout_response(self, header: Any, data: memoryview) -> None:
        self._requests.pop(header.itt, None)
        self._events.append(LoggedOut(header.itt, header.response))
        self.closed = True

    def _async(self, header: Any, data: memoryview) -> None:
        self._events.append(AsyncEvent(header.async_event, header.lun,
                                       (header.parameter1, header.parameter2, header.parameter3), bytes(data)))


# Data-In and SCSI Response are handled by _process from their unpacked BHS (the per-I/O path).
_HANDLERS: dict[int, Callable[..., None]] = {
    Opcode.R2T: InitiatorConnection._r2t,
    Opcode.NOP_IN: InitiatorConnection._nop_in,
    Opcode.REJECT: InitiatorConnection._reject,
    Opcode.TASK_MGMT_RESPONSE: InitiatorConnection._tmf_response,
    Opcode.TEXT_RESPONSE: InitiatorConnection._text_response,
    Opcode.LOGOUT_RESPONSE: InitiatorConnection._logout_response,
    Opcode.ASYNC_MESSAGE: InitiatorConnection._async,
}
