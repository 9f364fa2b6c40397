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
"""

from __future__ import annotations

import itertools
import random
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from node_agent.iscsi import pdu as P
from node_agent.iscsi.buffers import ReceiveBuffer, copy_in
from node_agent.iscsi.chap import ChapInitiatorAuth
from node_agent.iscsi.keys import (InitiatorNegotiator, InitiatorSettings, NegotiationError, SessionParams,
                                   encode_text, parse_text)
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.serial import sn_add, sn_le

_U32 = struct.Struct(">I").unpack_from
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
_DIRECT_MIN = 16 * 1024  # Data-In payloads at least this large go straight into the command's buffer
ATTR_SIMPLE = 1


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


@dataclass
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
    itt: int
    response: int


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


@dataclass
class _Task:
    itt: int
    lun: bytes
    cdb: bytes
    data_out: memoryview | None
    read_length: int
    buffer: bytearray | None = None
    datasn: int = 0
    cmdsn: int = 0


PduHook = Callable[[int, bytearray, bytes], tuple[bytearray, bytes] | None]


def encode_lun(lun: int) -> bytes:
    """SAM-5 single-level LUN: peripheral addressing below 256, flat space above (§4.6.6)."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    if lun < 16384:
        return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)
    raise ValueError(f"LUN {lun} out of range")


def random_isid(qualifier: int = 0) -> int:
    """An ISID of the 'random' type (T=10b, RFC 7143 §11.12.5)."""
    return (0x80 << 40) | (random.getrandbits(24) << 16) | (qualifier & 0xFFFF)


class InitiatorConnection:
    """Initiator side of one TCP connection; see the module docstring."""

    def __init__(self, settings: InitiatorSettings, *, isid: int, tsih: int = 0, cid: int = 0,
                 chap: tuple[str, str] | None = None, mutual_chap: tuple[str, str] | None = None,
                 initial_cmdsn: int = 1, pdu_hook: PduHook | None = None):
        self.settings = settings
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
        self.logged_in = False
        self.closed = False
        self._rx = ReceiveBuffer(256 * 1024)
        self._sink: memoryview | None = None  # where a large Data-In payload is being received directly
        self._trailer: tuple | None = None  # a directly placed Data-In waiting for padding/digest
        self._out: list[Any] = []
        self._events: list[Any] = []
        self._itt = itertools.count(1)
        self._login_itt = 0
        self._login_text = bytearray()
        self._login_keys_sent = False
        self._tasks: dict[int, _Task] = {}
        self._waiting: deque[_Task] = deque()  # commands waiting for the CmdSN window to open
        self._text: dict[int, list[tuple[str, str]]] = {}
        self._text_partial: dict[int, bytearray] = {}

    # ------------------------------------------------------------------ I/O interface
    def receive(self, data: bytes | bytearray | memoryview) -> None:
        copy_in(data, self.get_buffer, self.buffer_updated, lambda: self.closed)

    def get_buffer(self) -> memoryview:
        """Memory to receive into next: a command's buffer during a large Data-In, else the receive buffer."""
        if self._sink is not None:
            return self._sink
        return self._rx.writable()

    def buffer_updated(self, count: int) -> None:
        if self._sink is not None:
            self._sink = self._sink[count:] if count < len(self._sink) else None
            if self._sink is not None:
                return
        else:
            self._rx.filled(count)
        self._process()

    def take_output(self) -> list[Any]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def next_itt(self) -> int:
        itt = next(self._itt) & 0xFFFFFFFF
        if itt == P.RESERVED_TAG:
            itt = next(self._itt) & 0xFFFFFFFF
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
        self._events.append(LoggedIn(params, header.tsih))
        self._flush_waiting()

    # ------------------------------------------------------------------ full feature requests
    def submit(self, cdb: bytes, lun: int = 0, *, data_out: bytes | bytearray | memoryview | None = None,
               read_length: int = 0, itt: int | None = None) -> int:
        """Queue a SCSI command; its end arrives as ``TaskDone`` (or ``TaskRejected``)."""
        if len(cdb) > 16:
            raise ValueError("CDBs longer than 16 bytes need an AHS, which is not supported")
        task = _Task(itt if itt is not None else self.next_itt(), encode_lun(lun), bytes(cdb),
                     memoryview(data_out).cast("B") if data_out is not None else None, read_length)
        if read_length:
            task.buffer = bytearray(read_length)
        self._tasks[task.itt] = task
        self._waiting.append(task)
        if self.logged_in:
            self._flush_waiting()
        return task.itt

    def resubmit_all(self) -> list[int]:
        """After a reconnect: queue again every command that had no status (same ITTs)."""
        pending = sorted(self._tasks.values(), key=lambda t: t.cmdsn)
        self._waiting = deque(pending)
        return [t.itt for t in pending]

    def adopt(self, other: "InitiatorConnection") -> None:
        """Take over the unfinished commands of a lost connection (session reinstatement, ERL 0)."""
        for task in sorted(other._tasks.values(), key=lambda t: t.cmdsn):
            task.datasn = 0
            if task.read_length:
                task.buffer = bytearray(task.read_length)
            self._tasks[task.itt] = task
            self._waiting.append(task)
        self._itt = other._itt
        if self.logged_in:
            self._flush_waiting()

    def outstanding(self) -> list[int]:
        return list(self._tasks)

    def nop_out(self, data: bytes = b"") -> int:
        itt = self.next_itt()
        header = P.encode_header(Opcode.NOP_OUT, immediate=True, final=True, lun=bytes(8), itt=itt,
                                 ttt=P.RESERVED_TAG, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
        self._queue(Opcode.NOP_OUT, header, data)
        return itt

    def task_management(self, function: int, lun: int = 0, referenced_itt: int = P.RESERVED_TAG) -> int:
        itt = self.next_itt()
        ref = self._tasks.get(referenced_itt)
        header = P.encode_header(Opcode.TASK_MGMT_REQUEST, immediate=True, final=True, function=function,
                                 lun=encode_lun(lun), itt=itt, referenced_task_tag=referenced_itt,
                                 cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                                 refcmdsn=ref.cmdsn if ref else self.cmdsn)
        self._queue(Opcode.TASK_MGMT_REQUEST, header, b"")
        return itt

    def text(self, pairs: list[tuple[str, str]]) -> int:
        itt = self.next_itt()
        self._text[itt] = []
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
        return itt

    def forget(self, itt: int) -> None:
        """Drop a command the caller gave up on (after ABORT TASK, or a timeout)."""
        task = self._tasks.pop(itt, None)
        if task is not None and task in self._waiting:
            self._waiting.remove(task)

    # ------------------------------------------------------------------ sending commands
    def _flush_waiting(self) -> None:
        while self._waiting and sn_le(self.cmdsn, self.maxcmdsn):
            task = self._waiting.popleft()
            if task.itt in self._tasks:
                self._send_command(task)

    def _send_command(self, task: _Task) -> None:
        params = self.params
        assert params is not None
        task.cmdsn = self.cmdsn
        self.cmdsn = sn_add(self.cmdsn, 1)
        data = task.data_out
        edtl = len(data) if data is not None else task.read_length
        immediate = b""
        unsolicited_end = 0
        if data is not None and len(data):
            first_burst = min(params.first_burst_length, len(data))
            if params.immediate_data:
                immediate = data[:min(first_burst, self.max_xmit)]
            unsolicited_end = len(immediate) if params.initial_r2t else first_burst
        final = unsolicited_end <= len(immediate)
        flags = (0x80 if final else 0) | (0x40 if task.read_length else 0) | \
            (0x20 if data is not None and len(data) else 0) | ATTR_SIMPLE
        header = P.pack_scsi_command(flags, 0, task.lun, task.itt, edtl, task.cmdsn, self.expstatsn,
                                     task.cdb.ljust(16, b"\0"))
        self._queue(Opcode.SCSI_COMMAND, header, immediate)
        if not final:
            self._send_data_out(task, len(immediate), unsolicited_end - len(immediate), P.RESERVED_TAG)

    def _send_data_out(self, task: _Task, offset: int, length: int, ttt: int) -> None:
        assert task.data_out is not None
        end = offset + length
        datasn = 0
        while offset < end:
            size = min(self.max_xmit, end - offset)
            header = P.encode_header(Opcode.DATA_OUT, final=offset + size == end, lun=task.lun, itt=task.itt,
                                     ttt=ttt, expstatsn=self.expstatsn, datasn=datasn, buffer_offset=offset)
            self._queue(Opcode.DATA_OUT, header, task.data_out[offset:offset + size])
            offset += size
            datasn += 1

    def _queue(self, opcode: int, header: bytearray, data, *, digests: bool = True) -> None:
        if self.pdu_hook is not None:
            changed = self.pdu_hook(opcode, header, data)
            if changed is not None:
                header, data = changed
        header[5:8] = len(data).to_bytes(3, "big")
        hd = self.header_digest and digests
        self._out += P.frame(header, data, header_digest=hd, data_digest=self.data_digest and digests)

    # ------------------------------------------------------------------ receiving
    def _process(self) -> None:
        rx = self._rx
        view = memoryview(rx.buf)
        try:
            while not self.closed and self._sink is None:
                if self._trailer is not None and not self._finish_trailer(view):
                    return
                pos, end = rx.start, rx.end
                if end - pos < P.BHS_LENGTH:
                    return
                lengths = _U32(rx.buf, pos + 4)[0]
                ahs, dsl = (lengths >> 24) * 4, lengths & 0xFFFFFF
                hd = self.header_digest and self.logged_in
                dd = self.data_digest and self.logged_in
                total = P.BHS_LENGTH + ahs + P.pad4(dsl) + (4 if hd else 0) + (4 if dd and dsl else 0)
                if end - pos < total:
                    if dsl >= _DIRECT_MIN and rx.buf[pos] & 0x3F == Opcode.DATA_IN and self.logged_in:
                        self._start_direct(view, pos, ahs, dsl, hd, dd)
                    return
                cursor = pos + P.BHS_LENGTH + ahs
                if hd:
                    if view[cursor:cursor + 4] != P.digest_bytes(view[pos:cursor]):
                        raise InitiatorError("header digest error from the target")
                    cursor += 4
                data = view[cursor:cursor + dsl]
                if dd and dsl:
                    padded = cursor + P.pad4(dsl)
                    if view[padded:padded + 4] != P.digest_bytes(view[cursor:padded]):
                        raise InitiatorError("data digest error from the target")
                opcode, header = P.decode_header(view[pos:pos + P.BHS_LENGTH])
                self._dispatch(opcode, header, data)
                rx.consume(total)
        except (P.PduError, NegotiationError) as exc:
            self.closed = True
            raise InitiatorError(str(exc)) from exc
        finally:
            view.release()

    def _start_direct(self, view: memoryview, pos: int, ahs: int, dsl: int, hd: bool, dd: bool) -> None:
        """Receive the rest of a large Data-In payload straight into its command's buffer."""
        rx = self._rx
        payload = pos + P.BHS_LENGTH + ahs + (4 if hd else 0)
        if rx.end < payload:
            return
        if hd and view[payload - 4:payload] != P.digest_bytes(view[pos:payload - 4]):
            raise InitiatorError("header digest error from the target")
        header = P.LAYOUTS[Opcode.DATA_IN].decode(view, pos)
        task = self._tasks.get(header.itt)
        offset = header.buffer_offset
        if task is None or task.buffer is None or header.datasn != task.datasn or offset + dsl > len(task.buffer):
            return  # not a transfer we can place: framed and handled the ordinary way
        have = min(rx.end - payload, dsl)
        task.buffer[offset:offset + have] = view[payload:payload + have]
        rx.consume(payload + have - pos)
        if have < dsl:
            self._sink = memoryview(task.buffer)[offset + have:offset + dsl]
        self._trailer = (header, task, dsl, P.pad4(dsl) - dsl, dd)

    def _finish_trailer(self, view: memoryview) -> bool:
        header, task, length, pad, dd = self._trailer  # type: ignore[misc]
        rx = self._rx
        need = pad + (4 if dd else 0)
        if len(rx) < need:
            return False
        start = rx.start
        if dd:
            offset = header.buffer_offset
            digest = P.digest_bytes(memoryview(task.buffer)[offset:offset + length], view[start:start + pad])
            if view[start + pad:start + need] != digest:
                raise InitiatorError("data digest error from the target")
        rx.consume(need)
        self._trailer = None
        self._dispatch(Opcode.DATA_IN, header, None)  # the payload is already in place
        return True

    def _dispatch(self, opcode: int, header: Any, data: memoryview | None) -> None:
        if opcode == Opcode.LOGIN_RESPONSE:
            if self.logged_in:
                raise InitiatorError("Login Response in full feature phase")
            self._login_response(header, bytes(data))
            return
        if not self.logged_in:
            raise InitiatorError(f"{Opcode(opcode).name} before login completed")
        if opcode != Opcode.DATA_IN or header.status_present:
            if opcode not in (Opcode.R2T,):
                self._advance(header)
        maxcmdsn = getattr(header, "maxcmdsn", None)
        if maxcmdsn is not None and sn_le(sn_add(header.expcmdsn, -1), maxcmdsn):
            self.maxcmdsn = maxcmdsn  # §4.2.2.1: ignored when MaxCmdSN < ExpCmdSN - 1
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

    def _data_in(self, header: Any, data: memoryview) -> None:
        task = self._tasks.get(header.itt)
        if task is None:
            return  # a command we gave up on
        if header.datasn != task.datasn:
            raise InitiatorError(f"Data-In DataSN {header.datasn}, expected {task.datasn}")
        task.datasn += 1
        if data is not None:  # None: placed directly by _start_direct
            offset, size = header.buffer_offset, len(data)
            if task.buffer is None or offset + size > len(task.buffer):
                raise InitiatorError("Data-In beyond the expected transfer length")
            task.buffer[offset:offset + size] = data
        if header.status_present:
            self._complete(task, header.status, b"", header.residual_count, header.overflow, header.underflow)

    def _scsi_response(self, header: Any, data: memoryview) -> None:
        task = self._tasks.get(header.itt)
        if task is None:
            return
        sense = b""
        if len(data) >= 2:
            length = int.from_bytes(data[:2], "big")
            sense = bytes(data[2:2 + length])
        status = header.status if header.response == 0 else 0xFF  # response != 0: target failure (§11.4.3)
        self._complete(task, status, sense, header.residual_count, header.overflow, header.underflow)

    def _complete(self, task: _Task, status: int, sense: bytes, residual: int, overflow: bool,
                  underflow: bool) -> None:
        del self._tasks[task.itt]
        data: Any = b""
        if task.buffer is not None:
            received = len(task.buffer) - residual if underflow else len(task.buffer)
            data = memoryview(task.buffer)[:received]
        self._events.append(TaskDone(task.itt, status, data, sense, residual, overflow, underflow))

    def _r2t(self, header: Any, data: memoryview) -> None:
        task = self._tasks.get(header.itt)
        if task is None or task.data_out is None:
            return
        if header.buffer_offset + header.desired_data_transfer_length > len(task.data_out):
            raise InitiatorError("R2T beyond the data to write")
        self._send_data_out(task, header.buffer_offset, header.desired_data_transfer_length, header.ttt)

    def _nop_in(self, header: Any, data: memoryview) -> None:
        if header.ttt != P.RESERVED_TAG:  # the target pings us: answer (§11.18)
            reply = P.encode_header(Opcode.NOP_OUT, immediate=True, final=True, lun=header.lun,
                                    itt=P.RESERVED_TAG, ttt=header.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
            self._queue(Opcode.NOP_OUT, reply, b"")
        elif header.itt != P.RESERVED_TAG:
            self._events.append(NopReply(header.itt, bytes(data)))

    def _reject(self, header: Any, data: memoryview) -> None:
        itt = int.from_bytes(data[16:20], "big") if len(data) >= 48 else P.RESERVED_TAG
        self._tasks.pop(itt, None)
        self._events.append(TaskRejected(itt, header.reason))

    def _tmf_response(self, header: Any, data: memoryview) -> None:
        self._events.append(TmfDone(header.itt, header.response))

    def _text_response(self, header: Any, data: memoryview) -> None:
        partial = self._text_partial.setdefault(header.itt, bytearray())
        partial += data
        if header.cont or not header.final:
            self._send_text(header.itt, b"", header.ttt)
            return
        del self._text_partial[header.itt]
        self._events.append(TextDone(header.itt, parse_text(bytes(partial))))

    def _logout_response(self, header: Any, data: memoryview) -> None:
        self._events.append(LoggedOut(header.itt, header.response))
        self.closed = True

    def _async(self, header: Any, data: memoryview) -> None:
        self._events.append(AsyncEvent(header.async_event, header.lun,
                                       (header.parameter1, header.parameter2, header.parameter3), bytes(data)))


_HANDLERS: dict[int, Callable[..., None]] = {
    Opcode.DATA_IN: InitiatorConnection._data_in,
    Opcode.SCSI_RESPONSE: InitiatorConnection._scsi_response,
    Opcode.R2T: InitiatorConnection._r2t,
    Opcode.NOP_IN: InitiatorConnection._nop_in,
    Opcode.REJECT: InitiatorConnection._reject,
    Opcode.TASK_MGMT_RESPONSE: InitiatorConnection._tmf_response,
    Opcode.TEXT_RESPONSE: InitiatorConnection._text_response,
    Opcode.LOGOUT_RESPONSE: InitiatorConnection._logout_response,
    Opcode.ASYNC_MESSAGE: InitiatorConnection._async,
}
