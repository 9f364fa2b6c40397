"""Receive buffer and write-buffer pool of a connection (no I/O).

The transport receives straight into memory the connection core hands out
(``ReceiveBuffer.writable``), in the manner of ``asyncio.BufferedProtocol``:
bytes are copied once, by the kernel.  Large Data-Out payloads go one step
further: the core points the transport at the write task's own buffer, so a
1 MiB write lands where the SCSI layer reads it without any copy in Python.

``BufferPool`` keeps write buffers between commands: allocating a fresh
1 MiB ``bytearray`` per write costs an mmap, page faults and zeroing, which
profiles showed as a fifth of the target's CPU on 1 MiB writes.
"""

from __future__ import annotations


class ReceiveBuffer:
    """Bytes received and not yet consumed, in one reusable ``bytearray``."""

    def __init__(self, size: int = 1 << 20):
        self.buf = bytearray(size)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def writable(self, want: int = 64 * 1024) -> memoryview:
        """Free space after the data, at least ``want`` bytes (compacting or growing as needed)."""
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
        return memoryview(self.buf)[self.end:]

    def filled(self, count: int) -> None:
        """``count`` bytes were written at the start of the last ``writable()`` view."""
        self.end += count

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

    def acquire(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (exactly ``size`` when too small to pool); contents undefined."""
        if size < self.MIN_SIZE:
            return bytearray(size)
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
