"""``shoal target --workers N``: the sessions of several targets served by N processes.

With the GIL, one process runs Python on one core however many threads it
has.  To use more cores the target runs worker processes, and shards by
*target*: every target belongs to one worker, which opens its LUNs and serves
all of its sessions.  Everything initiators share on a target — persistent
reservations, unit attentions, task management, session reinstatement, the
TSIHs of its sessions — then lives in one process, exactly as with one
process; nothing is shared between processes but the listening sockets'
connections.  (Spreading the sessions of ONE target over processes would need
that state shared between them; ``shoal target`` does not do that.)

The process started (the parent) listens on every portal and accepts.  For
each new connection it peeks (``MSG_PEEK``: nothing is consumed) at the first
PDU, a Login Request whose text names the target (``TargetName``, RFC 7143
§13.4: sent in the first Login Request of a normal session), and hands the
socket to the worker owning that target over a Unix socket (``SCM_RIGHTS``);
the worker serves it from its first byte, as if it had accepted it.  The
parent serves what names no worker's target itself: discovery sessions (it
knows every target, their ACLs and CHAP, but opens no LUN), logins to
unknown targets (answered "not found") and first PDUs that are not a login
(rejected) — the same answers as one process gives.

Workers are ``python -m node_agent.target_workers`` processes started with
their part of the configuration (pickled on stdin: only between our own
processes).  They stop, closing their sessions and flushing their LUNs, when
the parent closes their control socket (or dies), or on SIGTERM (one sent
while they start is held back until their handler is in place); they run in
their own session, so a Ctrl-C or a signal to the parent's group reaches the
parent only, and it stops them.  The parent waits for each by PID.  A worker that dies while serving stops the whole target
with exit status 1: its sessions are gone either way, and a supervisor's
restart is clearer than a target that half serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import signal
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from node_agent import eventloop
from node_agent.iscsi.names import normalize_name
from node_agent.iscsi.target import Credentials
from node_agent.target_service import PortalConfig, TargetConfig, TargetService, TargetSpec

log = logging.getLogger("shoal.target.workers")

_BHS = 48
#: The largest first PDU the parent peeks at (header, AHS and text); a bigger one is served (refused) here.
FIRST_PDU_LIMIT = _BHS + 255 * 4 + 64 * 1024
_PEEK_RETRY = 0.002  # seconds between peeks while the first PDU is still arriving
_PEEK_RETRY_MAX = 0.2  # ... doubled while nothing new arrives, up to this: a stalled sender costs ~5 peeks/s
_LOGIN_REQUEST = 0x03
_READY = b"ready"
_PORTALS = b"portals "  # from the parent: the JSON list of [host, port] it listens on
_STOP_WAIT = 30.0
_DROP_WARN_EVERY = 60.0  # seconds between two warnings of connections one worker could not take


# -- the first PDU ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FirstLogin:
    """What the parent needs from a connection's first PDU: None when it is not a Normal-session login
    naming a target (served by the parent)."""

    target: str | None


def first_login(peeked: bytes) -> FirstLogin | int:
    """Parse the start of a connection's byte stream.  An int: how many bytes are needed to decide."""
    if len(peeked) < _BHS:
        return _BHS
    if peeked[0] & 0x3F != _LOGIN_REQUEST:
        return FirstLogin(None)
    start = _BHS + peeked[4] * 4  # TotalAHSLength, in words; no header digest before login ends
    end = start + int.from_bytes(peeked[5:8], "big")
    if end > FIRST_PDU_LIMIT:
        return FirstLogin(None)
    if len(peeked) < end:
        return end
    keys: dict[bytes, bytes] = {}
    items = peeked[start:end].split(b"\0")
    if peeked[1] & 0x40:  # C: the text goes on in the next PDU, and its last pair may be cut short here
        items = items[:-1]
    for item in items:
        key, sep, value = item.partition(b"=")
        if sep:
            keys.setdefault(key, value)
    if keys.get(b"SessionType", b"Normal") != b"Normal" or b"TargetName" not in keys:
        return FirstLogin(None)
    try:
        return FirstLogin(keys[b"TargetName"].decode("utf-8"))
    except UnicodeDecodeError:
        return FirstLogin(None)


# -- the parent ----------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """A worker's part of the configuration (pickled to its stdin)."""

    index: int
    targets: list[TargetSpec]
    portal: PortalConfig
    chap: Credentials | None
    mutual_chap: Credentials | None
    allowed_initiators: list[str] | None
    verbose: bool = False


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    control: socket.socket
    targets: list[str] = field(default_factory=list)
    reported: bool = False  # its death was logged (as an ERROR) already: stop() does not log it again


class WorkerPool:
    """The worker processes of a parent, and the routing of new connections to them."""

    def __init__(self, config: TargetConfig):
        self.config = config
        self.workers: list[_Worker] = []
        self.owner: dict[str, _Worker] = {}  # by the configured spelling of each target's name
        self.owner_by_key: dict[str, _Worker] = {}  # by its normalize_name: a TargetName in another case
        self.failed = asyncio.Event()  # a worker died while serving
        self.ended = asyncio.Event()  # a worker stopped cleanly on its own (SIGTERM to it): the target stops
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.peeking: dict[str, int] = {}  # peer address -> connections waiting for their first PDU here
        self._refused: set[str] = set()  # addresses whose refusal was logged (cleared when they drain)
        self._peeks: set[_Peek] = set()  # connections waiting here for their first PDU (closed at the stop)
        self._drops: dict[int, tuple[float, int]] = {}  # worker index -> (its last drop warning, drops since)

    def specs(self) -> list[WorkerSpec]:
        config = self.config
        portal = config.portal()
        shares: list[list[TargetSpec]] = [[] for _ in range(config.workers)]
        for position, target in enumerate(config.targets):
            shares[position % config.workers].append(target)
        verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
        return [WorkerSpec(index, share, portal, config.chap, config.mutual_chap, config.allowed_initiators,
                           verbose) for index, share in enumerate(shares)]

    async def start(self) -> None:
        """Start every worker and wait until each has opened its LUNs (``RuntimeError`` naming the first
        that could not; the others are stopped)."""
        self._loop = asyncio.get_running_loop()
        try:
            for spec in self.specs():
                self.workers.append(self._spawn(spec))
            for worker in self.workers:
                await self._wait_ready(worker)
        except BaseException:
            await self.stop()
            raise
        for worker in self.workers:
            self._loop.add_reader(worker.control.fileno(), self._control_readable, worker)
            for iqn in worker.targets:
                self.owner[iqn] = worker
                self.owner_by_key.setdefault(normalize_name(iqn), worker)
            log.info("worker %d (pid %d) serves %s", worker.index, worker.process.pid, ", ".join(worker.targets))

    def owner_of(self, target: str) -> _Worker | None:
        """The worker serving the target a TargetName names, compared as iSCSI names are (RFC 7143 §4.2.7.2,
        as ``TargetRegistry.find_target``): in another case than configured it reached the parent, whose
        copy of the target serves no session, and got "service unavailable" at every retry."""
        worker = self.owner.get(target)
        return worker if worker is not None else self.owner_by_key.get(normalize_name(target))

    @staticmethod
    def _spawn(spec: WorkerSpec) -> _Worker:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The worker starts with SIGTERM blocked (a thread's signal mask goes through fork and exec) and
        # unblocks it once its handler is in place: a SIGTERM sent while it starts (systemd's control group
        # on a stop soon after the start) then stops it cleanly once it can, where the default action killed
        # it (-15) and failed the start with exit status 1.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "node_agent.target_workers", str(child_end.fileno())],
                stdin=subprocess.PIPE, pass_fds=[child_end.fileno()], close_fds=True,
                start_new_session=True)  # a Ctrl-C or group signal reaches the parent only: it stops them
        except BaseException:
            parent_end.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            child_end.close()
        assert process.stdin is not None
        try:
            process.stdin.write(pickle.dumps(spec))
            process.stdin.close()
        except BrokenPipeError:  # it died at once: _wait_ready reports it
            pass
        parent_end.setblocking(False)
        return _Worker(spec.index, process, parent_end, [t.iqn for t in spec.targets])

    async def _wait_ready(self, worker: _Worker, timeout: float = 60.0) -> None:
        assert self._loop is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = worker.control.recv(4096)
            except BlockingIOError:
                message = None
            if message == _READY:
                return
            if message is not None:  # an error text, or b"" (the worker is gone without a word)
                text = message.decode("utf-8", "replace") or f"exited with status {worker.process.wait()}"
                raise RuntimeError(f"worker {worker.index} ({', '.join(worker.targets)}): {text}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.index} did not start within {timeout:g} s")
            await asyncio.sleep(0.01)

    def _control_readable(self, worker: _Worker) -> None:
        try:
            message = worker.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if message:
            return  # nothing more is expected from a running worker
        assert self._loop is not None
        self._loop.remove_reader(worker.control.fileno())
        if self.stopping:
            return
        try:  # its control socket closes a moment before it exits
            status = worker.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            status = None
        if status == 0:
            # It stopped on its own SIGTERM: systemd's KillMode=control-group signals the workers too, often
            # before this process has begun its own stop.  A stop, then, not a failure.
            log.info("worker %d (pid %d, %s) stopped: stopping the target", worker.index, worker.process.pid,
                     ", ".join(worker.targets))
            self.ended.set()
        else:
            log.error("worker %d (pid %d, %s) exited while serving (status %s): stopping the target",
                      worker.index, worker.process.pid, ", ".join(worker.targets),
                      "unknown" if status is None else status)
            worker.reported = status is not None
            self.failed.set()

    # Router
    def route(self, conn: socket.socket, peer: Any, here: Callable[[socket.socket, Any], None]) -> None:
        """Peek at a new connection's first PDU, then hand it on.  As in one process
        (``ConnectionSettings.max_logins_per_peer``), one address may have only so many connections
        waiting here at once, and each waits at most ``login_timeout`` for it, whether it sends or not: a
        host that opens connections and sends nothing cannot use up the parent's file descriptors."""
        assert self._loop is not None
        if self.stopping:  # a portal not closed yet (they close one after the other): nothing is routed now
            conn.close()
            return
        host = peer[0]
        waiting = self.peeking.get(host, 0)
        limit = self.config.connection.max_logins_per_peer
        if waiting >= limit:
            if host not in self._refused:
                self._refused.add(host)
                log.warning("connections from %s refused: %d already wait to send their first PDU (the most "
                            "one address may have)", host, waiting)
            conn.close()
            return
        self.peeking[host] = waiting + 1
        peek = _Peek(self, conn, peer, here, self._loop)
        self._peeks.add(peek)
        peek.start()

    def drop_peeks(self) -> None:
        """Close the connections still waiting for their first PDU: at the stop, one whose PDU came later was
        handed to a worker whose control socket was closed already (EBADF), or to the closed front portal."""
        for peek in list(self._peeks):
            peek.drop()

    def peek_ended(self, peek: "_Peek", host: str) -> None:
        self._peeks.discard(peek)
        left = self.peeking.get(host, 0) - 1
        if left > 0:
            self.peeking[host] = left
        else:
            self.peeking.pop(host, None)
            self._refused.discard(host)

    def announce_portals(self, addresses: list[tuple[str, int]]) -> None:
        """Tell each worker the portals this process listens on: its own sessions' SendTargets lists every
        portal of the group (RFC 7143 Appendix C), as one process does; a worker listens on none itself."""
        message = _PORTALS + json.dumps([[host, port] for host, port in addresses]).encode()
        for worker in self.workers:
            try:
                worker.control.send(message)
            except OSError as exc:  # gone: its end is noticed (and reported) on its control socket
                log.debug("worker %d: portals not sent: %s", worker.index, exc)

    def hand_over(self, conn: socket.socket, peer: Any, worker: _Worker, accepted: float) -> None:
        """Pass ``conn`` to ``worker``, with when it was accepted (``time.monotonic``, the same clock in every
        process): its login time limit counts from then, not again from the hand-over."""
        try:
            socket.send_fds(worker.control, [b"c" + struct.pack("<d", accepted)], [conn.fileno()])
        except OSError as exc:  # the worker is not taking connections (gone, or a flood): the initiator retries
            self._dropped(peer, worker, exc)
        else:
            log.debug("connection from %s:%s served by worker %d", peer[0], peer[1], worker.index)
        finally:
            conn.close()

    def _dropped(self, peer: Any, worker: _Worker, exc: OSError) -> None:
        """A warning for the first connection ``worker`` could not take, then at most one every
        ``_DROP_WARN_EVERY`` seconds saying how many more went meanwhile (debug for each): a worker that
        stopped taking connections under a flood of initiators retrying would flood the log too."""
        now = time.monotonic()
        last, since = self._drops.get(worker.index, (None, 0))
        if last is not None and now - last < _DROP_WARN_EVERY:
            self._drops[worker.index] = (last, since + 1)
            log.debug("connection from %s:%s to worker %d dropped: %s", peer[0], peer[1], worker.index, exc)
            return
        self._drops[worker.index] = (now, 0)
        more = f" ({since} more since the last warning)" if since else ""
        log.warning("connection from %s:%s to worker %d dropped: %s%s", peer[0], peer[1], worker.index, exc, more)

    async def stop(self) -> None:
        """Close the workers' control sockets (each then stops: sessions closed, LUNs flushed) and wait for
        each by PID; one that has not exited after 30 s is killed."""
        self.stopping = True
        self.drop_peeks()
        for worker in self.workers:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(worker.control.fileno())
                except (ValueError, OSError):
                    pass
            worker.control.close()
        deadline = time.monotonic() + _STOP_WAIT
        for worker in self.workers:
            while worker.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.process.poll() is None:
                log.error("worker %d (pid %d) did not stop within %g s: killing it", worker.index,
                          worker.process.pid, _STOP_WAIT)
                worker.process.kill()
                worker.process.wait()
            elif worker.process.returncode and not worker.reported:
                log.error("worker %d (pid %d) exited with status %d", worker.index, worker.process.pid,
                          worker.process.returncode)
        self.workers.clear()


def _peer_closed(fd: int) -> bool:
    """Whether the peer has shut down its side (POLLRDHUP), though bytes of it still wait to be read."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class _Peek:
    """Waits for a new connection's first PDU without consuming it, then routes the connection; closes it
    if no whole first PDU has come by its deadline (a timer: a peer that sends nothing is dropped too)."""

    def __init__(self, pool: WorkerPool, conn: socket.socket, peer: Any,
                 here: Callable[[socket.socket, Any], None], loop: asyncio.AbstractEventLoop):
        self.pool, self.conn, self.peer, self.here, self.loop = pool, conn, peer, here, loop
        self.accepted = time.monotonic()
        self.need = _BHS
        self.seen = 0  # bytes the last peek saw
        self.delay = _PEEK_RETRY
        self.fd = conn.fileno()
        self.retry: asyncio.TimerHandle | None = None
        self.timeout = pool.config.connection.login_timeout
        self.expiry = loop.call_later(self.timeout, self._expire)
        self.done = False

    def start(self) -> None:
        self.retry = None
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            peeked = self.conn.recv(self.need, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peeked = b""
        if not peeked:  # closed before its first PDU
            self._end()
            self.conn.close()
            return
        decision = first_login(peeked)
        if isinstance(decision, int):
            if decision > self.need or len(peeked) > self.seen:  # progress: look again soon
                self.delay = _PEEK_RETRY
            elif _peer_closed(self.fd):  # a peek sees no end behind the bytes waiting: poll does
                self._end()
                self.conn.close()
                return
            else:  # nothing new since the last look: less and less often (a slow or stalled sender)
                self.delay = min(self.delay * 2, _PEEK_RETRY_MAX)
            self.need, self.seen = decision, len(peeked)
            self.loop.remove_reader(self.fd)  # the socket stays readable: look again a little later
            self.retry = self.loop.call_later(self.delay, self.start)
            return
        self._end()
        worker = self.pool.owner_of(decision.target) if decision.target is not None else None
        if worker is None:
            self.here(self.conn, self.peer)
        else:
            self.pool.hand_over(self.conn, self.peer, worker, self.accepted)

    def _expire(self) -> None:
        log.info("connection from %s:%s sent no whole first PDU in %g s", self.peer[0], self.peer[1],
                 self.timeout)
        self.drop()

    def drop(self) -> None:
        self._end()
        self.conn.close()

    def _end(self) -> None:
        """Stop watching the socket (exactly once); the caller then closes or hands on the connection."""
        if self.done:
            return
        self.done = True
        self.expiry.cancel()
        if self.retry is not None:
            self.retry.cancel()
        self.loop.remove_reader(self.fd)
        self.pool.peek_ended(self, self.peer[0])


async def serve_sharded(config: TargetConfig, ready: Callable[[list[tuple[str, int]]], None] | None,
                        stop: asyncio.Event) -> None:
    """The parent: start the workers, listen, route, until ``stop`` (or a worker's death: RuntimeError)."""
    pool = WorkerPool(config)
    await pool.start()
    front = TargetService(portal=replace(config.portal(), loops=1))  # discovery only: one loop is plenty
    try:
        for target in config.targets:
            front.add_routed_target(target.iqn, chap=config.chap, mutual_chap=config.mutual_chap,
                                    allowed_initiators=config.allowed_initiators)
        await front.start_portals(router=pool)
        pool.announce_portals(front.addresses)
        if ready is not None:
            ready(front.addresses)
        waits = [asyncio.ensure_future(event.wait()) for event in (stop, pool.failed, pool.ended)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
    finally:
        pool.stopping = True  # the workers' ends from here on are this stop's (they may have had SIGTERM too)
        pool.drop_peeks()  # before the front portal closes: none is routed to it (or a worker) from here on
        await front.stop()
        await pool.stop()
    if pool.failed.is_set():
        raise RuntimeError("a worker process exited while serving (see the log)")


# -- a worker ----------------------------------------------------------------------------------
async def _serve_worker(spec: WorkerSpec, control: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Held back since the start (WorkerPool._spawn): one that came meanwhile is delivered now, to the handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    service = TargetService(portal=spec.portal)
    try:
        for target in spec.targets:
            service.add_target(target.iqn, target.luns, chap=spec.chap, mutual_chap=spec.mutual_chap,
                               allowed_initiators=spec.allowed_initiators)
        await service.start_portals(listen=False)
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):  # the parent may be gone (it stops the others when one fails)
            control.send(str(exc).encode("utf-8", "replace")[:4000])
        await service.stop()
        return 1
    portal = service.portal
    assert portal is not None
    eventloop.freeze_startup_objects()

    def control_readable() -> None:
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(control, 65536, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if message.startswith(_PORTALS) and not fds:
                try:
                    portals = [(str(host), int(port)) for host, port in json.loads(message[len(_PORTALS):])]
                except (ValueError, TypeError):
                    log.warning("portals from the parent not understood: %r", message[:200])
                else:
                    assert service.registry is not None
                    service.registry.portals[:] = portals
                continue
            accepted = struct.unpack_from("<d", message, 1)[0] if len(message) == 9 else None
            for fd in fds:
                conn = socket.socket(fileno=fd)
                try:
                    conn.setblocking(False)
                    peer = conn.getpeername()
                except OSError:  # gone already
                    conn.close()
                    continue
                portal.adopt(conn, peer, accepted=accepted)
            if not message and not fds:  # the parent closed it: stop
                loop.remove_reader(control.fileno())
                stop.set()
                return

    control.setblocking(False)
    try:
        control.send(_READY)
    except OSError:  # the parent closed its end while this started (another worker failed): a stop
        await service.stop()
        return 0
    loop.add_reader(control.fileno(), control_readable)
    try:
        await stop.wait()
    finally:
        try:
            loop.remove_reader(control.fileno())
        except (ValueError, OSError):
            pass
        await service.stop()
    log.info("worker %d stopped: sessions closed, data synced", spec.index)
    return 0


def worker_main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)  # from our own parent (never from the network)
    logging.basicConfig(level=logging.DEBUG if spec.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {spec.index}]: %(message)s")
    for signum in (signal.SIGINT, signal.SIGHUP):  # a terminal's Ctrl-C or hang-up: the parent stops its workers
        signal.signal(signum, signal.SIG_IGN)
    return eventloop.run(_serve_worker(spec, control))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
