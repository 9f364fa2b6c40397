"""The asyncio transport of the target: a portal that accepts TCP connections.

The only code of the target that touches sockets.  Each accepted socket gets a
``TargetConnection`` (the sans-I/O core) and a ``_Channel`` that moves bytes:
it receives straight into the memory the core hands out (its receive buffer,
or a write task's buffer for large Data-Out and immediate data, with the
trailer and next header in the same ``recvmsg_into``), tells the core, then sends everything
the core queued with as few system calls as possible — one ``sendmsg`` for a
run of buffers (headers and data together, never concatenated) and
``os.sendfile`` for Data-In that the SCSI layer left in the backing file.
A channel whose peer does not read stops reading from it too (backpressure),
so a slow initiator cannot make the target queue unbounded output.

Several event loops (``LoopPool``, ``shoal target --loops N``): the portal
accepts on its own loop and pins each new connection to the loop serving the
fewest connections, where it stays.  Sessions share per-target state
(reservations, unit attentions, task management, reinstatement), so every
call into a connection core or the registry holds the registry's lock; the
system calls (receive, send, sendfile) run outside it, and that is all the
extra loops can overlap: with the GIL, Python work never runs on two cores.

I/O that would block (the SCSI layer says so with ``ScsiResult.blocking``:
data not in the page cache, FUA, a flush, a slow device) runs on a small
thread pool shared by the portals of a service; its completion comes back to
the connection's own loop with ``call_soon_threadsafe``.  Commands that
cannot block never leave the loop: a thread hop per command costs several
times the whole inline command.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import errno
import gc
import logging
import os
import socket
import stat
import threading
import time
from typing import Any, Callable, Protocol

from node_agent.iscsi.buffers import release_memory
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.target import TargetRegistry
from node_agent.scsi.device import FileRange

log = logging.getLogger("shoal.iscsi.server")

_MAX_IOV = 512
_PLACED_READS = 8  # receives of directly placed payloads (up to 2 MiB) before the replies are sent
_CHANNELS_ON_LOOP: collections.Counter = collections.Counter()  # open channels per event loop (``_Pacer``)
_CHANNELS_MUTEX = threading.Lock()
_SLACK = threading.local()  # the loop threads whose timer slack ``_pace`` has set


class _Pacer:
    """Whether a connection alone on its event loop waits a little before receiving again (issue 7).

    A pipelined stream of sequential writes from one busy initiator arrives a few commands at a time, and
    each receive costs a ``recv``, a ``pwritev``, a ``sendmsg`` and an ``epoll_wait`` whatever it carries;
    on loopback the initiator also pays to wake the target for each.  Waiting ``WAIT`` after such a
    receive lets more commands gather: at depth 16-64 that took the target's CPU per 4 KiB write from
    ~10-13 to ~8-9 µs and raised IOPS 5-14 %, but at depth 4-8, where the initiator waits for our answers,
    it cost 9-20 % of IOPS.  Which it is depends on the initiator, so the pacer measures: every ``PERIOD``
    of a stream it runs two ``TRIAL`` windows, one waiting and one not (order alternating), counts the
    gathered writes of each, and waits from then on only if waiting carried ``GAIN`` more.  It only ever
    waits after a receive that gathered two writes or more (never for a lone command: queue depth 1 is
    untouched), and only while the connection is the only one on its loop (with others, serving them
    batches this one's commands anyway, and a wait would hold them up).  ``wait`` is given the writes the
    receive gathered and the time; it returns the seconds to wait."""

    WAIT = 15e-6
    TRIAL = 0.1
    PERIOD = 5.0
    GAIN = 1.05
    IDLE = 0.1  # a pause this long ends a stream: the next one starts with trials

    def __init__(self) -> None:
        self.on = False  # the decision of the last trials
        self.phase = 0  # 0: decided; 1, 2: the first and second trial window
        self.trial_on = False  # whether the current trial window waits
        self.first_on = False  # whether the next trials begin with the waiting window
        self.next_trial = 0.0
        self.start = 0.0
        self.count = 0
        self.first_rate = 0.0
        self.last = -1e9

    def wait(self, gathered: int, now: float) -> float:
        if not gathered:
            return 0.0
        if now - self.last > self.IDLE:
            self.on, self.phase, self.next_trial = False, 0, now
        self.last = now
        if self.phase == 0:
            if now >= self.next_trial:
                self.phase, self.trial_on, self.start, self.count = 1, self.first_on, now, 0
        else:
            self.count += gathered
            elapsed = now - self.start
            if elapsed >= self.TRIAL:
                rate = self.count / elapsed
                if self.phase == 1:
                    self.first_rate = rate
                    self.phase, self.trial_on, self.start, self.count = 2, not self.trial_on, now, 0
                else:
                    waiting, not_waiting = (rate, self.first_rate) if self.trial_on else (self.first_rate, rate)
                    self.on = waiting > not_waiting * self.GAIN
                    log.debug("receive pacing %s: %.0f writes/s waiting, %.0f not", "on" if self.on else "off",
                              waiting, not_waiting)
                    self.phase, self.next_trial, self.first_on = 0, now + self.PERIOD, not self.first_on
        pacing = self.trial_on if self.phase else self.on
        return self.WAIT if pacing and gathered >= 2 else 0.0


def _pace(seconds: float) -> None:
    """Sleep ``seconds`` on a loop thread, its timer slack set to 1 µs once (the default
    50 µs would stretch each wait fourfold)."""
    if not getattr(_SLACK, "set", False):
        _SLACK.set = True
        try:
            ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
        except (OSError, AttributeError):  # not Linux: the wait is longer, nothing else changes
            pass
    time.sleep(seconds)


_TICK = 1.0


class Router(Protocol):
    """Decides which process serves a newly accepted connection (``shoal target --workers N``)."""

    def route(self, conn: socket.socket, peer: Any, here: Callable[[socket.socket, Any], None]) -> None:
        """Hand ``conn`` to the process serving it, or call ``here(conn, peer)`` to serve it in this one."""


class FairPool:
    """The portal's worker threads, shared so that no logical unit can take them all.

    Blocking I/O (a cold read, a FUA write, a flush, a slow device) runs on a pool of threads.  A plain
    pool runs jobs first come, first served: a volume whose disk hangs, with its queue full, would hold
    every thread and queue its next jobs ahead of everyone else's, so a cold read of any other volume
    would wait seconds (``tests/unit/test_portal_admin_fairness.py``: 1.6 s with 32 reads of a 0.4 s
    device in flight).  Here each key (a logical unit) has at most ``per_key`` jobs handed to the pool;
    the rest wait in that key's own queue, and each job that ends hands the pool the key's next one.
    """

    def __init__(self, executor: concurrent.futures.Executor, per_key: int):
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.executor = executor
        self.per_key = per_key
        self._mutex = threading.Lock()
        self._running: dict[Any, int] = {}  # key -> its jobs handed to the pool
        self._waiting: dict[Any, collections.deque] = {}  # key -> (fn, future) not handed yet

    def submit(self, fn: Callable[[], Any], key: Any = None) -> concurrent.futures.Future:
        """Run ``fn`` on the pool as soon as ``key`` has fewer than ``per_key`` jobs there."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._mutex:
            running = self._running.get(key, 0)
            if running >= self.per_key:
                self._waiting.setdefault(key, collections.deque()).append((fn, future))
                return future
            self._running[key] = running + 1
        self._hand(key, fn, future)
        return future

    def _hand(self, key: Any, fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        def job() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn()
                    except BaseException as exc:  # handed to whoever waits for the future
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                self._next(key)
        try:
            self.executor.submit(job)
        except RuntimeError:  # the pool is shut down: this job, and the key's others, will not run
            self._next(key)
            future.cancel()
            raise

    def _next(self, key: Any) -> None:
        with self._mutex:
            waiting = self._waiting.get(key)
            if not waiting:
                if self._running.get(key, 0) <= 1:
                    self._running.pop(key, None)
                else:
                    self._running[key] -= 1
                return
            fn, future = waiting.popleft()
            if not waiting:
                del self._waiting[key]
        try:
            self._hand(key, fn, future)
        except RuntimeError:
            pass

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the pool down; ``cancel_futures``: jobs not handed to it yet are cancelled too."""
        if cancel_futures:
            with self._mutex:
                waiting, self._waiting = self._waiting, {}
            for queue in waiting.values():
                for _, future in queue:
                    future.cancel()
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)


def worker_pool(settings: ConnectionSettings) -> FairPool:
    """The pool of ``settings.io_workers`` threads for blocking I/O, at most ``io_workers_per_lun`` per LUN."""
    return FairPool(concurrent.futures.ThreadPoolExecutor(settings.io_workers, thread_name_prefix="shoal-io"),
                    settings.io_workers_per_lun)


class LoopPool:
    """Event loops for connections: the caller's loop and ``count - 1`` more, each on its own thread."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError("at least one event loop")
        self.count = count
        self.loops: list[asyncio.AbstractEventLoop] = []
        self._load: dict[asyncio.AbstractEventLoop, int] = {}
        self._threads: list[threading.Thread] = []
        self._mutex = threading.Lock()

    def start(self, main: asyncio.AbstractEventLoop) -> None:
        """Start the extra loops, of the main loop's kind (uvloop when the main loop is one)."""
        self.loops = [main]
        for index in range(1, self.count):
            loop = type(main)()
            ready = threading.Event()
            thread = threading.Thread(target=self._run, args=(loop, ready), name=f"shoal-loop-{index}", daemon=True)
            thread.start()
            ready.wait()
            self.loops.append(loop)
            self._threads.append(thread)
        self._load = {loop: 0 for loop in self.loops}
        log.info("%d event loops serve connections", self.count)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def pick(self) -> asyncio.AbstractEventLoop:
        """The loop with the fewest connections (counted until ``release``)."""
        with self._mutex:
            loop = min(self.loops, key=self._load.__getitem__)
            self._load[loop] += 1
            return loop

    def release(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._mutex:
            if loop in self._load:
                self._load[loop] -= 1

    def stop(self) -> None:
        """Stop the extra loops (after the portals closed their connections)."""
        for loop in self.loops[1:]:
            loop.call_soon_threadsafe(loop.stop)
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        self.loops = self.loops[:1]


class PortalServer:
    """One listening portal serving the targets of a ``TargetRegistry``."""

    def __init__(self, registry: TargetRegistry, settings: TargetSettings, host: str = "127.0.0.1",
                 port: int = 3260, connection_settings: ConnectionSettings | None = None,
                 executor: FairPool | None = None, loops: LoopPool | None = None,
                 router: "Router | None" = None):
        self.registry = registry
        self.settings = settings
        self.host = host
        self.port = port
        self.connection_settings = connection_settings or ConnectionSettings()
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None  # the address listened on, in ``registry.portals`` meanwhile
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: set[_Channel] = set()
        self._refused_logins: dict[str, int] = {}  # address -> connections refused since the last tick
        self._ticker: asyncio.TimerHandle | None = None
        self._freed = False  # a receive buffer shrank or a connection ended since the last tick
        self.loops = loops  # None: every connection on the portal's own loop
        self.router = router  # None: every accepted connection is served here
        self.lock = registry.lock
        self._own_executor = executor is None
        self.executor = executor or worker_pool(self.connection_settings)

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]

    async def start(self, *, listen: bool = True) -> None:
        """Listen on ``host:port``; ``listen=False``: serve only the sockets handed to ``adopt`` (a worker
        process of ``shoal target --workers N``, whose connections its parent accepts)."""
        self._loop = asyncio.get_running_loop()
        self._ticker = self._loop.call_later(_TICK, self._tick)
        if not listen:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:  # "Address already in use" alone does not say which: another target on it?
            sock.close()
            shown = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise OSError(exc.errno, f"cannot listen on {shown}: {exc.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._bound = self.address
        with self.lock:
            self.registry.portals.append(self._bound)  # SendTargets reports every portal of the group
        self._loop.add_reader(sock.fileno(), self._accept)
        log.info("portal listening on %s:%d", *self.address)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.router is not None:
                self.router.route(conn, peer, self.adopt)
            else:
                self.adopt(conn, peer)

    def adopt(self, conn: socket.socket, peer: Any, *, accepted: float | None = None) -> None:
        """Serve a connected, non-blocking socket (accepted here, or handed over by a parent process, which
        says when it accepted it: ``time.monotonic``, whence the login time limit counts)."""
        assert self._loop is not None
        loop = self.loops.pick() if self.loops is not None else self._loop
        if loop is self._loop:
            self._adopt(conn, peer, loop, accepted)
        else:
            loop.call_soon_threadsafe(self._adopt, conn, peer, loop, accepted)

    def _adopt(self, conn: socket.socket, peer: Any, loop: asyncio.AbstractEventLoop,
               accepted: float | None = None) -> None:
        """Serve an accepted socket on ``loop`` (run on that loop's thread)."""
        try:
            local = conn.getsockname()[:2]
        except OSError:  # the peer is already gone
            conn.close()
            if self.loops is not None:
                self.loops.release(loop)
            return
        with self.lock:
            limit = self.connection_settings.max_logins_per_peer
            logging_in = sum(1 for c in self._channels
                             if c.peer_host == peer[0] and c.core.session is None and not c.closed)
            if logging_in >= limit:
                if not self._refused_logins.get(peer[0]):
                    log.warning("connections from %s refused: %d already in the login phase (the most one "
                                "address may have)", peer[0], logging_in)
                self._refused_logins[peer[0]] = self._refused_logins.get(peer[0], 0) + 1
                conn.close()
                if self.loops is not None:
                    self.loops.release(loop)
                return
            core = TargetConnection(self.registry, self.settings, local_address=local,
                                    peer=f"{peer[0]}:{peer[1]}", config=self.connection_settings, started=accepted)
            channel = _Channel(self, conn, core, loop)
            channel.peer_host = peer[0]
            self._channels.add(channel)

    def _tick(self) -> None:
        with self.lock:
            self._refused_logins.clear()  # the next refusal of an address is logged again
            channels = list(self._channels)
            trimmed = self.registry.buffers.tick()
            check_backing_files(self.registry)
        for channel in channels:
            channel.call(channel.tick)
        if trimmed or self._freed:  # after a burst: give the freed memory back to the kernel
            if self._freed:
                gc.collect()  # a connection's core and channel refer to each other: only the GC frees them
            self._freed = False
            release_memory()
        assert self._loop is not None
        self._ticker = self._loop.call_later(_TICK, self._tick)

    def _forget(self, channel: "_Channel") -> None:
        with self.lock:
            self._channels.discard(channel)
            self._freed = True
        if self.loops is not None:
            self.loops.release(channel.loop)

    async def close(self) -> None:
        """Stop accepting, end every session, and wait briefly for their last bytes to leave."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with self.lock:
                self.registry.portals.remove(self._bound)
        if self._ticker is not None:
            self._ticker.cancel()
        with self.lock:
            self.registry.close_all("target shutting down")
            for channel in list(self._channels):
                channel.core.close("target shutting down")
        for _ in range(50):
            if not self._channels:
                break
            await asyncio.sleep(0.02)
        with self.lock:
            channels = list(self._channels)
        for channel in channels:
            channel.call(channel.shutdown)
        for _ in range(50):  # shutdowns on other loops
            if not self._channels:
                break
            await asyncio.sleep(0.02)
        if self._own_executor:  # running I/O finishes (the backing stores close after); queued I/O is dropped
            self.executor.shutdown(wait=True, cancel_futures=True)


def check_backing_files(registry: TargetRegistry) -> list[Any]:
    """Log once, as an ERROR, each LUN whose backing file was deleted while it is served; return those newly found.

    A LUN serves the file it opened: deleted (``rm``, a cleanup gone wrong), it is still read and written, but
    it has no name any more, and everything in it, written before or since, is gone when the LUN closes (a
    stop, a removal).  No target notices on its own (tgtd and LIO serve on as well); this says so while the
    data can still be copied out of the open file (``/proc/PID/fd/N``).  Regular files only: a device node
    removed leaves its device.  One ``fstat`` per LUN per tick."""
    found = []
    for target in list(registry.targets.values()):
        for number, lu in list(target.luns.luns.items()):
            fd = getattr(lu.backing, "fd", None)
            if fd is None or lu.__dict__.get("backing_deleted"):
                continue
            try:
                st = os.fstat(fd)
            except OSError:  # closed meanwhile (a removal): nothing to say
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
                lu.backing_deleted = True
                found.append(lu)
                log.error("LUN %d of %s: its backing file %s was deleted while served; it is still served from the "
                          "open file, and all of its data is lost when the LUN closes: copy it out from /proc/%d/fd/%d "
                          "before this LUN is stopped", number,
                          target.iqn, getattr(lu.backing, "path", "?"), os.getpid(), fd)
    return found


class _Channel:
    """Moves bytes between one socket and its ``TargetConnection``."""

    def __init__(self, server: PortalServer, sock: socket.socket, core: TargetConnection,
                 loop: asyncio.AbstractEventLoop):
        self.server = server
        self.loop = loop
        self.thread = threading.get_ident()  # the loop's thread: created there, runs only there
        self.lock = server.lock
        self.sock = sock
        self.fd = sock.fileno()
        self.core = core
        self.peer_host = ""  # the peer's address (``max_logins_per_peer``)
        self.pending: list[Any] = []
        self.reading = False
        self.writing = False
        self.closed = False
        self._flush_scheduled = False
        self._closing_since: float | None = None  # when a tick first saw the core closed, output still queued
        core.wakeup = self._wakeup
        core.offload = self._offload
        self.pacer = _Pacer()
        with _CHANNELS_MUTEX:
            _CHANNELS_ON_LOOP[loop] += 1
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading and not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def call(self, fn) -> None:
        """Run ``fn`` on this channel's loop: now when called there, else soon."""
        if threading.get_ident() == self.thread:
            fn()
        else:
            try:
                self.loop.call_soon_threadsafe(fn)
            except RuntimeError:  # that loop is closed
                pass

    def _wakeup(self) -> None:
        if threading.get_ident() != self.thread:  # the core was changed from another loop (under the lock)
            self.call(self._wakeup)
            return
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _offload(self, io, done, key: Any = None) -> None:
        """Run ``io`` on the worker pool (``key``: the LUN whose share it takes); ``done(result)`` then runs
        on this loop, and output is flushed."""
        try:
            future = self.server.executor.submit(io, key)
        except RuntimeError:  # the pool is shut down: the portal is closing, the command dies with it
            return
        loop = self.loop

        def back_to_loop(f: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(self._io_done, done, f)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                pass

        future.add_done_callback(back_to_loop)

    def _io_done(self, done, future: concurrent.futures.Future) -> None:
        if future.cancelled():
            return
        with self.lock:
            try:
                done(future.result())
            except Exception:
                log.exception("connection from %s: completing a command failed", self.core.peer)
                self.core.close("internal error")
        self.flush()

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def tick(self) -> None:
        with self.lock:
            try:
                if self.core.tick():
                    self.server._freed = True
            except Exception:
                log.exception("timer of connection from %s failed", self.core.peer)
                self.core.close("internal error")
        if self.core.closing and self.writing and not self.closed:  # closed, its last output still queued
            now = time.monotonic()
            if self._closing_since is None:
                self._closing_since = now
            elif now - self._closing_since >= self.server.connection_settings.close_linger:
                log.info("connection from %s: closed (%s); the peer did not take its last output within %g s: "
                         "dropped", self.core.peer, self.core.close_reason or "connection lost",
                         self.server.connection_settings.close_linger)
                self.shutdown()
                return
        self.flush()

    def _on_readable(self) -> None:
        core = self.core
        for _ in range(_PLACED_READS):
            try:
                buffers = core.get_buffers()
                if buffers is None:
                    n = self.sock.recv_into(core.get_buffer())
                else:  # the end of a directly placed payload, and its trailer and the next header behind it
                    n = self.sock.recvmsg_into(buffers)[0]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("connection from %s: %s", core.peer, exc)
                self.shutdown()
                return
            if n == 0:
                self.shutdown()
                return
            with self.lock:
                try:
                    core.buffer_updated(n)
                except Exception:
                    log.exception("connection from %s: internal error; dropping it", core.peer)
                    core.close("internal error")
            if buffers is None or core.closing:
                break
            # A large write is streaming in, one payload per receive: read on (its PDUs are most likely
            # queued already) and send the R2Ts and responses of several PDUs with one ``sendmsg``.
        self.flush()
        gathered, core.gathered = core.gathered, 0
        if gathered and _CHANNELS_ON_LOOP[self.loop] == 1 and not self.closed:
            wait = self.pacer.wait(gathered, time.monotonic())
            if wait:
                _pace(wait)

    def flush(self) -> None:
        """Send what the core queued; stop reading while the peer cannot take more."""
        if self.closed:
            return
        with self.lock:
            self.pending += self.core.take_output()
            closing = self.core.closing
        try:
            done = self._send_pending()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.info("connection from %s: send failed: %s", self.core.peer, exc)
            self.shutdown()
            return
        if done:
            if self.writing:
                self.loop.remove_writer(self.fd)
                self.writing = False
            if closing:
                self.shutdown()
                return
            self._read_on()
        else:
            self._read_off()
            if not self.writing:
                self.loop.add_writer(self.fd, self.flush)
                self.writing = True

    def _send_pending(self) -> bool:
        pending = self.pending
        while pending:
            item = pending[0]
            if isinstance(item, FileRange):
                if item.source is not None and item.source.fd != item.fd:
                    # Its LUN was closed while this waited (the target removed, an initiator fenced, with this
                    # peer not reading): the number may name another volume's file now.  Nothing more goes.
                    raise OSError(errno.EBADF, "a LUN closed while its data waited to be sent")
                try:
                    sent = os.sendfile(self.fd, item.fd, item.offset, item.length) if item.length else 0
                except (BlockingIOError, InterruptedError):
                    return False
                if sent == 0 and item.length:
                    raise OSError(errno.EIO, "sendfile sent nothing (file shorter than expected?)")
                if sent < item.length:
                    pending[0] = FileRange(item.fd, item.offset + sent, item.length - sent, item.source)
                    return False  # the socket buffer is full: wait until it is writable
                pending.pop(0)
                continue
            batch = pending[:_MAX_IOV]
            kinds = list(map(type, batch))  # buffers up to the first FileRange (C loops: one per item counts)
            if FileRange in kinds:
                batch = batch[:kinds.index(FileRange)]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return False
            if sent == sum(map(len, batch)):
                del pending[:len(batch)]
            else:
                self._consume(sent, len(batch))
        return True

    def _consume(self, sent: int, count: int) -> None:
        """Drop what a partial send took: whole buffers, and the front of the one it stopped in."""
        pending = self.pending
        index = 0
        while index < count:
            size = len(pending[index])
            if sent >= size:
                sent -= size
                index += 1
            else:
                pending[index] = memoryview(pending[index])[sent:]
                break
        del pending[:index]

    def shutdown(self) -> None:
        if self.closed:
            return
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        self.closed = True
        with _CHANNELS_MUTEX:
            _CHANNELS_ON_LOOP[self.loop] -= 1
            if _CHANNELS_ON_LOOP[self.loop] <= 0:
                del _CHANNELS_ON_LOOP[self.loop]
        try:
            self.sock.close()
        finally:
            self.server._forget(self)
            with self.lock:
                self.core.connection_lost()
            if self.core.session is None and not self.core.close_reason:
                log.debug("connection from %s closed before login", self.core.peer)
