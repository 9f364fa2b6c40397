"""Receive buffer and write-buffer pool of a connection (no I/O).

The transport receives straight into memory the connection core hands out
(``ReceiveBuffer.writable``), in the manner of ``asyncio.BufferedProtocol``:
bytes are copied once, by the kernel.  Large Data-Out payloads and large
immediate data go one step further: the core points the transport at the
write task's own buffer, so a 1 MiB write lands where the SCSI layer reads it
without any copy in Python.

``BufferPool`` keeps write buffers between commands: allocating a fresh
1 MiB ``bytearray`` per write costs an mmap, page faults and zeroing, which
profiles showed as a fifth of the target's CPU on 1 MiB writes.

Memory returns after a burst: the pool drops its free buffers once a whole
tick passed without a write needing one (``BufferPool.tick``), a connection's
receive buffer shrinks back to its initial size while idle
(``ReceiveBuffer.shrink``), and ``release_memory`` then hands the freed heap
back to the kernel (glibc keeps freed 1 MiB blocks in its heap otherwise, and
the process's RSS would stay at its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_memory() -> None:
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim``; elsewhere a no-op)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class ReceiveBuffer:
    """Bytes received and not yet consumed, in one reusable ``bytearray``."""

    def __init__(self, size: int = 64 * 1024, grow_to: int = 0):
        """``size`` bytes to start with; with ``grow_to``, a receive that fills all the space offered
        doubles the space asked for next time, up to ``grow_to`` (a busy connection gets fewer,
        larger receives; an idle one goes back to ``size`` with ``shrink``)."""
        self.initial = size
        self.grow_to = grow_to
        self.want = 64 * 1024
        self.buf = bytearray(size)
        self.start = 0
        self.end = 0
        self._offered = 0

    def shrink(self) -> bool:
        """Back to the initial size if it grew and holds nothing (an idle connection); True if it did."""
        if self.start != self.end or len(self.buf) <= self.initial:
            return False
        self.buf = bytearray(self.initial)  # a new object: views of the old one stay valid
        self.start = self.end = 0
        self.want = 64 * 1024
        return True

    def __len__(self) -> int:
        return self.end - self.start

    def writable(self, want: int = 0) -> memoryview:
        """Free space after the data, at least ``want`` bytes (default: ``self.want``), compacting or
        growing as needed."""
        want = want or self.want
        if self.start == self.end:
            self.start = self.end = 0
        if len(self.buf) - self.end < want:
            size = self.end - self.start
            if size + want > len(self.buf):
                grown = bytearray(max(2 * len(self.buf), size + want))
                grown[:size] = self.buf[self.start:self.end]
                self.buf = grown  # a new object: views of the old one stay valid
            elif self.start:
                self.buf[:size] = self.buf[self.start:self.end]  # same length: allowed with views alive
            self.start, self.end = 0, size
        self._offered = len(self.buf) - self.end
        return memoryview(self.buf)[self.end:]

    def filled(self, count: int) -> None:
        """``count`` bytes were written at the start of the last ``writable()`` view."""
        self.end += count
        if count >= self._offered and self.want < self.grow_to:
            self.want *= 2

    def consume(self, count: int) -> None:
        self.start += count
        if self.start == self.end:
            self.start = self.end = 0


class BufferPool:
    """Reusable write buffers in power-of-two sizes from 64 KiB, bounded in total bytes."""

    MIN_SIZE = 64 * 1024

    def __init__(self, limit: int = 64 << 20):
        self.limit = limit
        self.pooled = 0
        self._free: dict[int, list[bytearray]] = {}
        self._last_acquire = 0.0

    def tick(self, idle: float = 1.0) -> bool:
        """Called about once a second: drop the free buffers if none was needed for ``idle`` seconds.

        True when buffers were dropped (the caller may then ``release_memory``)."""
        if not self.pooled or time.monotonic() - self._last_acquire < idle:
            return False
        self._free.clear()
        self.pooled = 0
        return True

    def acquire(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (exactly ``size`` when too small to pool); contents undefined."""
        if size < self.MIN_SIZE:
            return bytearray(size)
        self._last_acquire = time.monotonic()
        bucket = 1 << (size - 1).bit_length()
        free = self._free.get(bucket)
        if free:
            self.pooled -= bucket
            return free.pop()
        return bytearray(bucket)

    def release(self, buf: bytearray) -> None:
        size = len(buf)
        if size < self.MIN_SIZE or size & (size - 1) or self.pooled + size > self.limit:
            return
        self._free.setdefault(size, []).append(buf)
        self.pooled += size


def copy_in(data: bytes | bytearray | memoryview, get_buffer, buffer_updated, stopped) -> None:
    """Feed ``data`` through a BufferedProtocol-style pair (``get_buffer``/``buffer_updated``).

    Both connection cores take copied bytes this way (tests, and callers without
    their own socket), so they run exactly the code path the zero-copy transport runs.
    """
    data = memoryview(data)
    while data and not stopped():
        space = get_buffer()
        count = min(len(space), len(data))
        space[:count] = data[:count]
        data = data[count:]
        buffer_updated(count)
