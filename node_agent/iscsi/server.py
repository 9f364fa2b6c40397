"""The asyncio transport of the target: a portal that accepts TCP connections.

The only code of the target that touches sockets.  Each accepted socket gets a
``TargetConnection`` (the sans-I/O core) and a ``_Channel`` that moves bytes:
it receives straight into the memory the core hands out (its receive buffer,
or a write task's buffer for large Data-Out), tells the core, then sends everything
the core queued with as few system calls as possible — one ``sendmsg`` for a
run of buffers (headers and data together, never concatenated) and
``os.sendfile`` for Data-In that the SCSI layer left in the backing file.
A channel whose peer does not read stops reading from it too (backpressure),
so a slow initiator cannot make the target queue unbounded output.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any

from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.target import TargetRegistry
from node_agent.scsi.device import FileRange

log = logging.getLogger("shoal.iscsi.server")

_MAX_IOV = 512
_TICK = 1.0


class PortalServer:
    """One listening portal serving the targets of a ``TargetRegistry``."""

    def __init__(self, registry: TargetRegistry, settings: TargetSettings, host: str = "127.0.0.1",
                 port: int = 3260, connection_settings: ConnectionSettings | None = None):
        self.registry = registry
        self.settings = settings
        self.host = host
        self.port = port
        self.connection_settings = connection_settings or ConnectionSettings()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: set[_Channel] = set()
        self._ticker: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        self._ticker = self._loop.call_later(_TICK, self._tick)
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
            local = conn.getsockname()[:2]
            core = TargetConnection(self.registry, self.settings, local_address=local,
                                    peer=f"{peer[0]}:{peer[1]}", config=self.connection_settings)
            self._channels.add(_Channel(self, conn, core))

    def _tick(self) -> None:
        for channel in list(self._channels):
            channel.tick()
        assert self._loop is not None
        self._ticker = self._loop.call_later(_TICK, self._tick)

    def _forget(self, channel: "_Channel") -> None:
        self._channels.discard(channel)

    async def close(self) -> None:
        """Stop accepting, end every session, and wait briefly for their last bytes to leave."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._ticker is not None:
            self._ticker.cancel()
        self.registry.close_all("target shutting down")
        for channel in list(self._channels):
            channel.core.close("target shutting down")
        for _ in range(50):
            if not self._channels:
                break
            await asyncio.sleep(0.02)
        for channel in list(self._channels):
            channel.shutdown()


class _Channel:
    """Moves bytes between one socket and its ``TargetConnection``."""

    def __init__(self, server: PortalServer, sock: socket.socket, core: TargetConnection):
        self.server = server
        self.loop = server._loop
        assert self.loop is not None
        self.sock = sock
        self.fd = sock.fileno()
        self.core = core
        self.pending: list[Any] = []
        self.reading = False
        self.writing = False
        self.closed = False
        self._flush_scheduled = False
        core.wakeup = self._wakeup
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading and not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _wakeup(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def tick(self) -> None:
        try:
            self.core.tick()
        except Exception:
            log.exception("timer of connection from %s failed", self.core.peer)
            self.core.close("internal error")
        self.flush()

    def _on_readable(self) -> None:
        try:
            n = self.sock.recv_into(self.core.get_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("connection from %s: %s", self.core.peer, exc)
            self.shutdown()
            return
        if n == 0:
            self.shutdown()
            return
        try:
            self.core.buffer_updated(n)
        except Exception:
            log.exception("connection from %s: internal error; dropping it", self.core.peer)
            self.core.close("internal error")
        self.flush()

    def flush(self) -> None:
        """Send what the core queued; stop reading while the peer cannot take more."""
        if self.closed:
            return
        self.pending += self.core.take_output()
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
            if self.core.closing:
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
                try:
                    sent = os.sendfile(self.fd, item.fd, item.offset, item.length) if item.length else 0
                except (BlockingIOError, InterruptedError):
                    return False
                if sent == 0 and item.length:
                    raise OSError(errno.EIO, "sendfile sent nothing (file shorter than expected?)")
                if sent < item.length:
                    pending[0] = FileRange(item.fd, item.offset + sent, item.length - sent)
                    return False  # the socket buffer is full: wait until it is writable
                pending.pop(0)
                continue
            count = 0
            while count < len(pending) and count < _MAX_IOV and not isinstance(pending[count], FileRange):
                count += 1
            try:
                sent = self.sock.sendmsg(pending[:count])
            except (BlockingIOError, InterruptedError):
                return False
            self._consume(sent, count)
        return True

    def _consume(self, sent: int, count: int) -> None:
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
        try:
            self.sock.close()
        finally:
            self.server._forget(self)
            self.core.connection_lost()
            if self.core.session is None and not self.core.close_reason:
                log.debug("connection from %s closed before login", self.core.peer)
