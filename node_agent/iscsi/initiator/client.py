"""The asyncio adapter of Shoal's initiator: one session over one TCP connection.

``IscsiClient`` connects, logs in and runs SCSI commands (``execute``) with
many in flight inside the target's CmdSN window.  When the connection drops,
or the target stops answering NOP-Out pings, it reconnects with exponential
backoff (tenacity), reinstates the session (same ISID, ErrorRecoveryLevel 0)
and issues again every command that had no status, so a caller sees a delay
rather than an error while the target comes back within ``reconnect_timeout``;
after that every waiting command fails with ``SessionLost``.  A NOP-Out, task
management or Text request whose connection is lost fails at once with
``ConnectionLost`` (only a SendTargets query is asked again after the
reconnect; ``InitiatorConnection.lost`` gives the reasons per kind).

A command ends, one way or another: one the target answers against the
protocol fails alone (``TaskFailed``), one outstanding through repeated
protocol-error drops fails rather than loop, one without status after
``command_timeout`` is aborted (ABORT TASK; the connection is dropped only
when that fails) and fails with ``CommandTimedOut`` while the others carry
on, and one whose caller stops waiting (cancellation) is forgotten and
aborted, never issued again.
An Asynchronous Message asking for a logout is obeyed (log out, log in again).

Per command, ``execute`` does only what a command needs: take a slot (a
counter; a queue only when full), hand the CDB to the core, await one future.
The core's output is sent once per event-loop pass (``writelines``: uvloop
sends the batch and any large payload with one ``writev``), and received
``TaskDone`` events complete their futures directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.keys import InitiatorSettings
from node_agent.iscsi.pdu import Opcode
from node_agent.scsi.sense import describe

log = logging.getLogger("shoal.iscsi.initiator")

CHECK_CONDITION = 0x02
BUSY = 0x08
TASK_SET_FULL = 0x28
UNIT_ATTENTION = 0x06


class SessionLost(ConnectionError):
    """The target did not come back within the reconnect timeout."""


class ConnectionLost(ConnectionError):
    """The connection a NOP-Out, Task Management Function or Text request went out on was lost before its
    answer came; it is not sent again (``InitiatorConnection.lost`` says why per kind).  The session
    reconnects meanwhile: a request made again waits for it."""


_REQUEST_NAMES = {Opcode.NOP_OUT: "NOP-Out", Opcode.TASK_MGMT_REQUEST: "Task Management Function Request",
                  Opcode.TEXT_REQUEST: "Text Request", Opcode.LOGOUT_REQUEST: "Logout Request"}


class CommandFailed(IOError):
    """A command ended with a status other than GOOD; ``sense`` holds the sense data."""

    def __init__(self, done: C.TaskDone):
        key, asc, ascq = sense_code(done.sense)
        super().__init__(f"SCSI status {describe(done.status, key, asc, ascq)}")
        self.done = done
        self.sense_key, self.asc, self.ascq = key, asc, ascq


class CommandTimedOut(TimeoutError):
    """A command had no status within ``ClientSettings.command_timeout``.  The target ended it before this
    was raised, by ABORT TASK (RFC 7143 §11.5.1) or, when that was not answered within ``abort_timeout``,
    by the reinstatement that follows dropping the connection (§6.3.5): it will not run later, and none of
    its Data-In lands in the caller's buffer after this.  ``possibly_applied``: it went out to the target, so
    it may have run, in whole or in part (a WRITE's blocks may hold the new data, the old, or a mix of
    both): the caller must not take it as not done.  False only for a command that never left the
    initiator (it waited for the CmdSN window all along)."""

    def __init__(self, message: str, possibly_applied: bool = True):
        super().__init__(message)
        self.possibly_applied = possibly_applied


class CommandAborted(IOError):
    """Task management ended the command (ABORT TASK, ABORT TASK SET, a LUN or target reset): it has no
    status, and may or may not have run (RFC 7143 §4.2.3.3, §11.6.1)."""


def sense_code(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed (70h/71h) or descriptor (72h/73h) sense data (SPC-4 §4.5)."""
    if len(sense) < 3:
        return 0, 0, 0
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2] if len(sense) > 2 else 0, sense[3] if len(sense) > 3 else 0
    return sense[2] & 0x0F, sense[12] if len(sense) > 12 else 0, sense[13] if len(sense) > 13 else 0


@dataclass
class ClientSettings:
    """How an ``IscsiClient`` behaves; every field has a reason."""

    initiator_iqn: str = "iqn.2026-11.io.shoal:initiator"
    """Our iSCSI name; targets' ACLs admit by it."""
    queue_depth: int = 32
    """Commands in flight at once (also bounded by the target's CmdSN window)."""
    header_digest: tuple[str, ...] = ("None",)
    data_digest: tuple[str, ...] = ("None",)
    """Digest preferences, offered in this order (RFC 7143 §13.1)."""
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    login_timeout: float = 15.0
    """Seconds one login may take."""
    reconnect_timeout: float = 30.0
    """How long a lost session is retried before waiting commands fail."""
    nop_interval: float = 5.0
    """Idle seconds before we ping the target with a NOP-Out."""
    nop_timeout: float = 10.0
    """Seconds a ping may go unanswered before the connection counts as dead."""
    command_timeout: float | None = 120.0
    """Seconds a SCSI command may wait for its status (from ``execute`` handing it over, a reconnect
    included) before it is given up on; 0 or None: no limit.  Checked four times per timeout, so this
    happens between 1 and 1.25 timeouts after it was issued.  Task management comes first (RFC 7143 §7.1,
    as Linux's SCSI error handling does): ABORT TASK (§11.5.1) for that command alone, the other commands
    carrying on; when the target answers that it ended it, the command fails with ``CommandTimedOut`` (an
    ``OSError``: EIO through FUSE).  Only when the abort is refused, unanswered for ``abort_timeout``, or
    answered "Task does not exist" while the command had no status (the target never got it) is the
    connection dropped: the reinstatement ends the command on the target (§6.3.5), it fails, and the
    other commands are issued again as after any connection loss.  Never LOGICAL UNIT RESET: on a shared
    volume it would end other hosts' commands too.  A command still waiting for the CmdSN window has
    nothing to abort: it fails at once.  The pings only tell that the target answers at all; this bounds a
    command it never answers (Linux's SCSI layer times out a command after 30 s; this is longer, as an
    UNMAP or SYNCHRONIZE CACHE on a busy backend may be slow)."""
    abort_timeout: float = 15.0
    """Seconds the ABORT TASK for a timed-out command may go unanswered before the connection is dropped
    instead (open-iscsi's default abort timeout).  Its caller waits meanwhile: a command is reported failed
    only once the target has ended it, so that nothing issued after that runs before it."""
    unit_attention_retries: int = 5
    """Times a command is retried after UNIT ATTENTION (e.g. the reset a reinstatement causes)."""
    busy_retries: int = 50
    """Times a command is sent again after BUSY or TASK SET FULL (a target out of room for it for now), with
    a pause from 5 ms doubling up to 0.5 s (about 20 s in all); then the status is the caller's."""
    completions_per_pass: int | None = None
    """Commands completed per event-loop pass before the new commands they let in are sent (None: a third
    of the queue depth; 0: all that one receive holds).  A receive often holds the whole queue's responses:
    completing all of them before sending anything made client and target take turns, each idle a third of
    the time (4 KiB reads at depth 32: ~67k IOPS where qemu-img did ~104k); sending after every third keeps
    both busy (~95k; after every half ~87k, every quarter ~80k) at no more CPU per I/O.  libiscsi gets the
    same overlap by handling one PDU at a time."""


class _Slots:
    """Commands in flight at once: a counter while there is room, a FIFO of waiters when full.

    ``asyncio.Semaphore`` costs two coroutines per command even when free; here taking a free
    slot is one comparison.  A released slot goes straight to the first live waiter."""

    def __init__(self, count: int):
        self.free = count
        self._waiters: deque[asyncio.Future] = deque()

    async def wait(self) -> None:
        """Wait for a slot (call only when ``free`` is 0); the slot is then the caller's."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: "IscsiClient", conn: C.InitiatorConnection):
        self.client = client
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.conn.buffer_updated(nbytes)
        except C.InitiatorError as exc:
            self.client._failed(self, exc)
            return
        self.client._after_io(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, exc)



def _worth_another_login(exc: BaseException) -> bool:
    """Whether a reconnect tries again after ``exc``: a lost or refused connection, a target error (class 3:
    restarting, out of resources) and the like may pass; a login the target refused as not authenticated or
    not authorized (RFC 7143 §11.13.5, 0201h/0202h: a wrong secret, an ACL without this initiator, as after a
    fence) will not, and retrying it for ``reconnect_timeout`` only held every caller that long.  "Not found"
    (0203h) is tried again: a restarting target listens before it has served its targets again."""
    if isinstance(exc, C.LoginError) and exc.permanent and exc.status_detail in (0x01, 0x02):
        return False
    return isinstance(exc, (OSError, asyncio.TimeoutError, C.InitiatorError))


class IscsiClient:
    """One iSCSI session to one target, with reconnection; see the module docstring."""

    def __init__(self, host: str, port: int, target_iqn: str, *, settings: ClientSettings | None = None,
                 chap: tuple[str, str] | None = None, mutual_chap: tuple[str, str] | None = None,
                 session_type: str = "Normal", pdu_hook: C.PduHook | None = None):
        self.host, self.port, self.target_iqn = host, port, target_iqn
        self.settings = settings or ClientSettings()
        self.chap, self.mutual_chap = chap, mutual_chap
        self.session_type = session_type
        self.pdu_hook = pdu_hook
        self.isid = C.random_isid()
        self.conn: C.InitiatorConnection | None = None
        self.params = None
        self.unit_attentions: list[tuple[int, int, int]] = []
        self._proto: _Protocol | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._login: asyncio.Future | None = None
        self._slots = _Slots(self.settings.queue_depth)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the session runs on (set by connect)
        self._closing = False
        self._flush_scheduled = False
        self._resume_scheduled = False
        self._reconnecting: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._expirer: asyncio.Task | None = None
        self._expiring: dict[int, bool] = {}  # timed-out command -> possibly applied, while its ABORT TASK is out
        self._aborts: set[asyncio.Task] = set()  # the waits for those answers (references keep them)
        self._logout: asyncio.Task | None = None  # the logout an Async Message asked for (a reference keeps it)
        self._time2wait = 0.0  # seconds to wait before the next reconnect (an Async Message said so)
        self._received = False  # bytes arrived since the pinger last looked (no clock read per receive)

    def __repr__(self) -> str:
        return f"<IscsiClient {self.host}:{self.port} {self.target_iqn}>"

    @property
    def state(self) -> str:
        """"up"; "reconnecting" (the connection was lost, commands wait for the reinstatement); or "down"
        (closed, or the target did not come back within ``reconnect_timeout``)."""
        if self._closing:
            return "down"
        return "reconnecting" if self._reconnecting is not None else "up"

    # ------------------------------------------------------------------ connect / close
    async def connect(self) -> "IscsiClient":
        self._loop = asyncio.get_running_loop()
        await self._login_once(None)
        self._pinger = asyncio.get_running_loop().create_task(self._ping_loop())
        if self.settings.command_timeout:
            self._expirer = asyncio.get_running_loop().create_task(self._expire_loop(self.settings.command_timeout))
        return self

    async def __aenter__(self) -> "IscsiClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _initiator_settings(self) -> InitiatorSettings:
        s = self.settings
        return InitiatorSettings(
            initiator_name=s.initiator_iqn, target_name=self.target_iqn if self.session_type == "Normal" else None,
            session_type=self.session_type, max_recv_data_segment_length=s.max_recv_data_segment_length,
            max_burst_length=s.max_burst_length, first_burst_length=s.first_burst_length,
            immediate_data=s.immediate_data, initial_r2t=s.initial_r2t, header_digest=s.header_digest,
            data_digest=s.data_digest)

    def _completions_per_pass(self) -> int:
        count = self.settings.completions_per_pass
        return max(1, self.settings.queue_depth // 3) if count is None else count

    async def _login_once(self, previous: C.InitiatorConnection | None) -> None:
        loop = asyncio.get_running_loop()
        conn = C.InitiatorConnection(self._initiator_settings(), isid=self.isid, chap=self.chap,
                                     mutual_chap=self.mutual_chap, pdu_hook=self.pdu_hook,
                                     initial_cmdsn=previous.cmdsn if previous else 1,
                                     completions_per_pass=self._completions_per_pass())
        self._login = loop.create_future()
        # Awaited through a shield: after a login timeout nobody awaits it, and the connection's loss sets
        # its exception later; reading it here keeps asyncio from reporting it as never retrieved.
        self._login.add_done_callback(lambda f: f.cancelled() or f.exception())
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self, conn), self.host, self.port),
            self.settings.login_timeout)
        conn.start_login()
        self._flush(proto)
        try:
            await asyncio.wait_for(asyncio.shield(self._login), self.settings.login_timeout)
        except BaseException:
            transport.close()
            raise
        if transport.is_closing():
            # Lost after the final Login Response arrived but before this resumed: ``_lost`` saw a
            # connection that was not the session's yet and left it alone; taken as the session's, it
            # would be "up" on a dead socket, its commands never sent and its pings' aborts no-ops.
            raise ConnectionResetError(f"connection to {self.host}:{self.port} lost right after the login")
        self.conn, self._proto = conn, proto  # only a logged-in connection is reconnected when lost
        self._received = True
        if previous is not None:
            conn.adopt(previous)
            self._flush(proto)

    async def close(self) -> None:
        """Log out (best effort) and close; waiting commands fail with ``SessionLost``."""
        self._closing = True
        for task in (self._pinger, self._expirer, self._logout, self._reconnecting, *self._aborts):
            if task is not None:
                task.cancel()
        conn, proto = self.conn, self._proto
        alive = proto is not None and proto.transport is not None and not proto.transport.is_closing()
        if conn is not None and alive and not conn.closed and conn.logged_in and self._reconnecting is None:
            itt = conn.logout(0)
            fut = self._future(itt)
            self._flush(proto)
            try:
                await asyncio.wait_for(fut, 5)
            except (asyncio.TimeoutError, ConnectionError, C.InitiatorError):
                pass
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        self._fail_all(SessionLost("session closed"))

    # ------------------------------------------------------------------ commands
    async def execute(self, cdb: bytes, lun: int = 0, *, data_out: bytes | bytearray | memoryview | None = None,
                      read_length: int = 0, buffer: bytearray | memoryview | None = None,
                      check: bool = True, exact: bool = False) -> C.TaskDone:
        """Run one SCSI command; raises ``CommandFailed`` unless GOOD (with ``check``).

        Data-In lands in ``buffer`` when given (see ``InitiatorConnection.submit``).  With ``exact`` a GOOD
        read that transferred less than asked (an underflow residual, §11.4.5.1) raises ``IOError``
        instead of returning the shorter data: what a block read into a caller's buffer needs, whose
        bytes past the transfer would otherwise pass for data."""
        slots = self._slots
        attempt = busy = 0
        while True:
            if slots.free > 0:
                slots.free -= 1
            else:
                await slots.wait()
            try:
                if self._reconnecting is not None or self._closing or self.conn is None:
                    conn, proto = await self._ready()
                else:
                    conn, proto = self.conn, self._proto
                itt = conn.submit(cdb, lun, data_out=data_out, read_length=read_length, buffer=buffer)
                fut = self._loop.create_future()
                self._futures[itt] = fut
                if not self._flush_scheduled:
                    self._flush(proto)
                try:
                    done = await fut
                except BaseException:  # cancelled (a caller's timeout), or failed: it must not run later
                    self._give_up(conn, itt)
                    raise
            finally:
                if slots._waiters:
                    slots.release()
                else:  # release(), inlined for the common case: nobody waits for a slot
                    slots.free += 1
            if done.status == 0:
                if exact and done.underflow and done.residual:
                    raise IOError(f"command {cdb[0]:#04x} transferred {len(done.data)} bytes, "
                                  f"{len(done.data) + done.residual} expected (underflow, RFC 7143 §11.4.5.1)")
                return done
            if done.status == CHECK_CONDITION and attempt < self.settings.unit_attention_retries \
                    and sense_code(done.sense)[0] == UNIT_ATTENTION:
                self.unit_attentions.append(sense_code(done.sense))
                attempt += 1
                continue
            if done.status in (BUSY, TASK_SET_FULL) and busy < self.settings.busy_retries:
                # The target has no room for the command now (its write buffers are taken, SAM-5 §5.3.1): it
                # ran nothing, so it is sent again after a pause that doubles, as Linux's SCSI layer does.
                await asyncio.sleep(min(0.005 * 2 ** busy, 0.5))
                busy += 1
                continue
            if check:
                raise CommandFailed(done)
            return done

    def _give_up(self, conn: C.InitiatorConnection, itt: int) -> None:
        """The caller of command ``itt`` stopped waiting for it (cancelled, or its future failed).

        Forgotten by the core of the connection it went out on and by the session's current one (the
        same ITT, after a reconnect adopted it): else a reconnect would issue it again, long after its
        caller went on (a cancelled WRITE landing after a later one to the same blocks), and its Data-In
        would still be written into the caller's buffer.  If it is out on the live connection, ABORT
        TASK (§11.5.1) asks the target to drop it too; its answer is not waited for.  A no-op for a
        command the core ended already (its failure is what raised)."""
        self._futures.pop(itt, None)
        current, proto = self.conn, self._proto
        if current is not None:
            live = proto is not None and proto.conn is current and proto.transport is not None \
                and not proto.transport.is_closing() and self._reconnecting is None and not self._closing
            if not live:
                current.forget(itt)
            elif current.cancel(itt) is not None:  # it had gone out: ABORT TASK queued
                self._flush(proto)
        conn.forget(itt)

    async def nop(self, data: bytes = b"") -> bytes:
        conn, proto = await self._ready()
        fut = self._future(conn.nop_out(data))
        self._flush(proto)
        return (await fut).data

    async def task_management(self, function: int, lun: int = 0, referenced_itt: int = 0xFFFFFFFF) -> int:
        conn, proto = await self._ready()
        fut = self._future(conn.task_management(function, lun, referenced_itt))
        self._flush(proto)
        return (await fut).response

    async def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        conn, proto = await self._ready()
        fut = self._future(conn.text(pairs))
        self._flush(proto)
        return (await fut).pairs

    async def _ready(self) -> tuple[C.InitiatorConnection, _Protocol]:
        while True:
            if self._closing:
                raise SessionLost("session closed")
            if self._reconnecting is not None:
                # Not through asyncio.shield: close() cancels the reconnect, and shield would pass that
                # cancellation on to this caller as its own; here it sees the session closed instead.
                await asyncio.wait((self._reconnecting,))
                continue
            assert self.conn is not None and self._proto is not None
            return self.conn, self._proto

    def _future(self, itt: int) -> asyncio.Future:
        fut = self._loop.create_future()
        self._futures[itt] = fut
        return fut

    # ------------------------------------------------------------------ I/O plumbing
    def _flush(self, proto: _Protocol) -> None:
        """Send what the core queued, once per event-loop pass: commands submitted together share one send."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now, proto)

    def _flush_now(self, proto: _Protocol) -> None:
        self._flush_scheduled = False
        out = proto.conn.take_output()
        transport = proto.transport
        if out and transport is not None and not transport.is_closing():
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)  # uvloop: one writev, large payloads not copied

    def _after_io(self, proto: _Protocol) -> None:
        self._received = True
        self._deliver(proto.conn.take_events())
        if not self._flush_scheduled:
            self._flush(proto)
        if proto.conn.held and not self._resume_scheduled:  # after the flush: the woken commands go out first
            self._resume_scheduled = True
            self._loop.call_soon(self._resume, proto)

    def _resume(self, proto: _Protocol) -> None:
        """Process the rest of a receive that ``completions_per_pass`` held back."""
        self._resume_scheduled = False
        if proto.transport is None or proto.transport.is_closing():
            return
        try:
            proto.conn.resume()
        except C.InitiatorError as exc:
            self._failed(proto, exc)
            return
        self._after_io(proto)

    def _deliver(self, events: list[Any]) -> None:
        if events:
            futures, task_done = self._futures, C.TaskDone
            for event in events:
                if event.__class__ is task_done:  # the per-I/O event, first and without isinstance chains
                    fut = futures.pop(event.itt, None)
                    if fut is not None and not fut.done():
                        fut.set_result(event)
                else:
                    self._event(event)

    def _event(self, event: Any) -> None:
        if isinstance(event, C.LoggedIn):
            self.params = event.params
            if self._login is not None and not self._login.done():
                self._login.set_result(event)
            return
        if isinstance(event, C.Redirected):
            if self._login is not None and not self._login.done():
                self._login.set_exception(C.LoginError(f"redirected to {event.target_address}", 0x01, 0x01))
            return
        if isinstance(event, C.AsyncEvent):
            self._async_event(event)
            return
        itt = getattr(event, "itt", None)
        fut = self._futures.pop(itt, None) if itt is not None else None
        if fut is None or fut.done():
            return
        if isinstance(event, C.RequestLost):
            self._abort(event.aborted, "the connection was lost while a task management function for it was "
                                       "outstanding; reinstating the session ends it on the target (RFC 7143 "
                                       "§6.3.5), and it is not issued again")
            fut.set_exception(ConnectionLost(
                f"connection to {self.host}:{self.port} lost before the answer to a "
                f"{_REQUEST_NAMES.get(event.opcode, 'request')} (ITT {event.itt:#x}); it is not sent again"))
        elif isinstance(event, C.TaskRejected):
            fut.set_exception(C.InitiatorError(f"target rejected the command (reason {event.reason:#04x})"))
        elif isinstance(event, C.TaskFailed):
            log.warning("command %#x to %s failed: %s", event.itt, self.target_iqn, event.reason)
            fut.set_exception(C.InitiatorError(event.reason))
        else:
            if isinstance(event, C.TmfDone):  # no SCSI Response will come for these (§11.6.1)
                self._abort(event.aborted, f"aborted by task management function (response {event.response})")
            fut.set_result(event)

    def _async_event(self, event: C.AsyncEvent) -> None:
        """An Asynchronous Message (RFC 7143 §11.9.1).

        AsyncEvent 1, the target requests a Logout: we must send one within Parameter3 seconds.  The
        session logs out at once and logs in again (``_logout_requested``); commands without status are
        issued again, as after a connection loss.  AsyncEvent 2 and 3, the target will drop the connection
        (or all of them): Parameter2 is the Time2Wait the next login waits for (at most our reconnect
        timeout).  Other events are only logged."""
        _, time2wait, time2retain = event.parameters
        proto = self._proto
        if event.event == 1:
            log.warning("target %s requests a logout within %ds: logging out and in again", self.target_iqn,
                        time2retain)
            if proto is not None and not self._closing and self._reconnecting is None \
                    and (self._logout is None or self._logout.done()):
                self._logout = self._loop.create_task(self._logout_requested(proto, time2retain))
        elif event.event in (2, 3):
            self._time2wait = min(float(time2wait), self.settings.reconnect_timeout)
            log.warning("target %s will drop the connection (asynchronous event %d): reconnecting after %ds "
                        "(Time2Wait)", self.target_iqn, event.event, self._time2wait)
        else:
            log.info("asynchronous event %d from %s", event.event, self.target_iqn)

    async def _logout_requested(self, proto: _Protocol, within: int) -> None:
        """Log the connection out (reason "close the session", §11.14.1), then close it: ``_lost``
        reconnects and issues again the commands that had no status."""
        conn = proto.conn
        if proto is not self._proto or conn.closed or proto.transport is None or proto.transport.is_closing():
            return
        itt = conn.logout(0)
        fut = self._future(itt)
        self._flush(proto)
        try:  # the target closes the connection after the answer, or after Parameter3 seconds without one
            await asyncio.wait_for(fut, max(1, min(within, self.settings.login_timeout)))
        except (asyncio.TimeoutError, ConnectionError, C.InitiatorError):
            pass
        finally:
            self._futures.pop(itt, None)
        if proto.transport is not None:
            proto.transport.close()

    def _abort(self, itts: tuple[int, ...], why: str) -> None:
        """Fail the callers of commands a task management function ended with ``CommandAborted`` (not those
        that timed out: ``_await_abort`` ends them, from the answer to their ABORT TASK)."""
        for itt in itts:
            if itt in self._expiring:
                continue
            waiting = self._futures.pop(itt, None)
            if waiting is not None and not waiting.done():
                waiting.set_exception(CommandAborted(f"command {itt:#x} {why}"))

    def _failed(self, proto: _Protocol, exc: Exception) -> None:
        """The core found a protocol error: drop the connection (ERL 0; ``_lost`` reconnects).

        What it decoded before the error is delivered first: a command whose SCSI Response came in the
        same receive as the bad PDU is done, and is no longer among the commands a reconnect issues
        again, so its completion would otherwise be lost and its caller wait forever."""
        self._deliver(proto.conn.take_events())
        if self._login is not None and not self._login.done():
            self._login.set_exception(exc)
        elif proto is self._proto:
            log.warning("protocol error from %s:%d (%s): dropping the connection", self.host, self.port, exc)
            # A command outstanding through several such drops fails rather than loop (MAX_PROTOCOL_ERROR_DROPS).
            proto.conn.protocol_error(str(exc))
            self._deliver(proto.conn.take_events())
        if proto.transport is not None:
            proto.transport.close()

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if self._login is not None and not self._login.done():
            self._login.set_exception(exc or ConnectionResetError("connection closed during login"))
            return
        if proto is not self._proto or self._closing or self._reconnecting is not None:
            return
        log.warning("connection to %s:%d lost (%s); reconnecting", self.host, self.port, exc or "closed")
        proto.conn.lost()  # its pings, task management and negotiations end now (their answers are gone)
        self._deliver(proto.conn.take_events())
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(proto.conn))

    async def _reconnect(self, previous: C.InitiatorConnection) -> None:
        try:
            wait, self._time2wait = self._time2wait, 0.0
            if wait > 0:  # the target's Async Message gave a Time2Wait (RFC 7143 §11.9.1)
                await asyncio.sleep(wait)
            async for attempt in AsyncRetrying(
                    stop=stop_after_delay(self.settings.reconnect_timeout),
                    wait=wait_exponential(multiplier=0.1, max=2.0),
                    retry=retry_if_exception(_worth_another_login),
                    reraise=True):
                with attempt:
                    if self._closing:
                        return
                    await self._login_once(previous)
            log.info("session to %s reinstated; %d command(s) issued again", self.target_iqn,
                     len(self.conn.outstanding()) if self.conn else 0)
        except Exception as exc:  # noqa: BLE001 - every failure ends the same way
            log.error("could not reconnect to %s:%d: %s", self.host, self.port, exc)
            self._closing = True
            self._fail_all(SessionLost(f"target {self.target_iqn} unreachable for "
                                       f"{self.settings.reconnect_timeout:.0f}s: {exc}"))
        finally:
            self._reconnecting = None

    def _fail_all(self, exc: Exception) -> None:
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _expire_loop(self, timeout: float) -> None:
        """Give up on the commands outstanding for ``command_timeout`` (see ``ClientSettings.command_timeout``).

        Nothing is timed per command (a timer per I/O would cost the fast path): every quarter of the
        timeout this notes the commands outstanding, and one noted five times in a row has waited at
        least the timeout: ``_time_out`` ends it."""
        steps = 4
        seen: dict[int, int] = {}
        while not self._closing:
            await asyncio.sleep(timeout / steps)
            conn, futures, expiring = self.conn, self._futures, self._expiring
            if conn is None:
                continue
            seen = {itt: seen.get(itt, 0) + 1 for itt in conn.outstanding() if itt in futures and itt not in expiring}
            expired = [itt for itt, count in seen.items() if count > steps]
            if not expired:
                continue
            log.warning("%d command(s) to %s without status for %gs: aborting them", len(expired),
                        self.target_iqn, timeout)
            for itt in expired:
                del seen[itt]
                self._time_out(conn, itt)

    def _time_out(self, conn: C.InitiatorConnection, itt: int) -> None:
        """End command ``itt`` of ``conn``, outstanding for ``command_timeout``, and fail its caller.

        One that went out on the live connection gets ABORT TASK, and its caller waits for the answer
        (``_await_abort``): failed before the target ended it, it could be followed by a command of its
        caller's that the target runs first (a WRITE of the same blocks, undone by the late one).  One that
        did not (it waits for the CmdSN window, or for a reconnect, whose reinstatement ends on the target
        whatever went out before, §6.3.5) is forgotten and fails at once."""
        fut = self._futures.get(itt)
        if fut is None or fut.done():
            return
        possibly_applied = conn.issued(itt)
        proto = self._proto
        live = proto is not None and proto.conn is conn and proto.transport is not None \
            and not proto.transport.is_closing() and self._reconnecting is None and not self._closing
        tmf = conn.abort(itt) if live else None
        if tmf is None:
            conn.forget(itt)
            del self._futures[itt]
            fut.set_exception(self._timed_out(itt, possibly_applied, "it was waiting for the CmdSN window" if live
                                              else "the session was being reinstated, which ends it on the target"))
            return
        self._expiring[itt] = possibly_applied
        answer = self._future(tmf)
        self._flush(proto)
        task = self._loop.create_task(self._await_abort(conn, proto, itt, tmf, answer))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _await_abort(self, conn: C.InitiatorConnection, proto: _Protocol, itt: int, tmf: int,
                           answer: asyncio.Future) -> None:
        """Wait ``abort_timeout`` for the answer to the ABORT TASK of timed-out command ``itt``, then fail it.

        Ended on the target: "Function complete" for it, or the connection's loss (the reinstatement ends
        it, §6.3.5); its own status may also come first (then its caller has it).  Anything else, the
        target may still run it: refused, rejected, unanswered, and "Task does not exist" for a command we
        have outstanding (the target never got it, or holds it behind a CmdSN it never got, which
        §11.5.1 b would have it take as received: tgtd answers so and keeps the gap, every later command
        stuck behind it).  Then the connection is dropped before its caller hears (what the caller issues
        next waits for the reinstatement, which ends it on the target), and the others are issued again."""
        try:
            done: Any = await asyncio.wait_for(answer, self.settings.abort_timeout)
        except asyncio.TimeoutError:
            done = None
        except (ConnectionError, C.InitiatorError) as exc:
            done = exc
        finally:
            self._futures.pop(tmf, None)
        possibly_applied = self._expiring.pop(itt, True)
        fut = self._futures.get(itt)
        if fut is None or fut.done():
            return  # ended: its own status came first, or its caller gave up on it
        if isinstance(done, C.TmfDone) and itt not in conn.outstanding() \
                and (done.response == C.TMF_COMPLETE or itt not in done.aborted):
            how = "ended by ABORT TASK"  # (or by another task management function before its answer)
        elif isinstance(done, ConnectionLost):
            how = "the connection was lost; reinstating the session ends it on the target"
        else:
            if done is None:
                what = f"unanswered for {self.settings.abort_timeout:g}s"
            elif isinstance(done, C.TmfDone):
                what = f"answered {done.response}"
            else:
                what = f"failed ({done})"
            log.warning("ABORT TASK of command %#x to %s %s: dropping the connection", itt, self.target_iqn, what)
            how = f"ABORT TASK {what}: the connection was dropped"
            if proto is self._proto and self._reconnecting is None and proto.transport is not None:
                proto.transport.abort()
        self._give_up(conn, itt)  # forgotten here, and by a connection that adopted it meanwhile
        fut.set_exception(self._timed_out(itt, possibly_applied, how))

    def _timed_out(self, itt: int, possibly_applied: bool, how: str) -> CommandTimedOut:
        timeout = self.settings.command_timeout or 0
        outcome = "it may have been applied, in whole or in part" if possibly_applied else "it was not applied"
        return CommandTimedOut(f"command {itt:#x} to {self.target_iqn} had no status within {timeout:g}s ({how}); "
                               f"{outcome}", possibly_applied)

    async def _ping_loop(self) -> None:
        """NOP-Out pings on an idle connection detect a dead target (RFC 7143 §11.18)."""
        settings = self.settings
        last_rx = time.monotonic()
        while not self._closing:
            await asyncio.sleep(settings.nop_interval / 2)
            now = time.monotonic()
            if self._received:
                self._received, last_rx = False, now
            if self._reconnecting is not None or self.conn is None or self._proto is None:
                continue
            if now - last_rx < settings.nop_interval:
                continue
            try:
                await asyncio.wait_for(self.nop(), settings.nop_timeout)
            except asyncio.TimeoutError:
                log.warning("target %s did not answer a NOP-Out for %.0fs", self.target_iqn, settings.nop_timeout)
                if self._proto is not None and self._proto.transport is not None:
                    self._proto.transport.abort()
            except (ConnectionError, C.InitiatorError):
                continue


async def discover(host: str, port: int = 3260, *, settings: ClientSettings | None = None,
                   chap: tuple[str, str] | None = None,
                   mutual_chap: tuple[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """SendTargets discovery (RFC 7143 §13.3): [(target name, [addresses])]."""
    settings = replace(settings or ClientSettings(), nop_interval=3600)
    client = IscsiClient(host, port, "", settings=settings, chap=chap, mutual_chap=mutual_chap,
                         session_type="Discovery")
    await client.connect()
    try:
        pairs = await client.text([("SendTargets", "All")])
    finally:
        await client.close()
    targets: list[tuple[str, list[str]]] = []
    for key, value in pairs:
        if key == "TargetName":
            targets.append((value, []))
        elif key == "TargetAddress" and targets:
            targets[-1][1].append(value)
    return targets
