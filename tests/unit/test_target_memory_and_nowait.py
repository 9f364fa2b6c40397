"""Non-blocking backing-store I/O and the buffers that give memory back (issue 7).

A real ``FileBackingStore`` on a file in tmp_path (its data sits in the page
cache, so the non-blocking calls must succeed); ``BufferPool`` and
``ReceiveBuffer`` are plain objects.  No timing assertions: the pool's idle
rule is driven through its ``idle`` argument.
"""

from __future__ import annotations

import os

from node_agent.iscsi.buffers import BufferPool, ReceiveBuffer, release_memory
from node_agent.storage.backing import FileBackingStore


def test_nowait_io_on_cached_data_succeeds_inline(tmp_path):
    store = FileBackingStore(tmp_path / "disk.img", size=1 << 20)
    try:
        payload = os.urandom(8192)
        assert store.write_nowait(4096, payload) is True  # written (inline where RWF_NOWAIT writes are refused)
        assert bytes(store.read_nowait(4096, 8192)) == payload
        assert store.cached(0, 1 << 20)  # just written: in the page cache
        assert bytes(store.read_nowait((1 << 20) - 512, 512)) == bytes(512)
        assert store.write_nowait(0, payload, fua=True) is False  # FUA waits for the disk: always a worker's
        assert bytes(store.read(0, 8192)) != payload  # and nothing was written by the refusal
    finally:
        store.close()


def test_buffer_pool_drops_its_free_buffers_when_idle():
    pool = BufferPool()
    buffers = [pool.acquire(1 << 20) for _ in range(4)]
    for buf in buffers:
        pool.release(buf)
    assert pool.pooled == 4 << 20
    assert pool.tick(idle=3600) is False and pool.pooled == 4 << 20  # used within the idle time: kept
    assert pool.tick(idle=0) is True and pool.pooled == 0
    assert pool.tick(idle=0) is False  # nothing left to drop
    assert len(pool.acquire(1 << 20)) == 1 << 20
    release_memory()  # harmless whenever called


def test_receive_buffer_shrinks_back_when_empty():
    rx = ReceiveBuffer(64 * 1024)
    view = rx.writable(300 * 1024)  # a large PDU makes it grow
    assert len(rx.buf) >= 300 * 1024
    view[:10] = b"0123456789"
    rx.filled(10)
    assert rx.shrink() is False  # holds data: stays
    rx.consume(10)
    assert rx.shrink() is True and len(rx.buf) == 64 * 1024
    assert rx.shrink() is False


class ForwardingWrapper:
    """A store wrapper in the style of the agent's copy-before-write guard: it overrides ``write`` and
    forwards every other attribute to the store it wraps."""

    def __init__(self, inner):
        self._inner = inner
        self.writes = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write(self, offset, data, fua=False):
        self.writes += 1
        self._inner.write(offset, data, fua)


def test_a_forwarding_wrapper_keeps_its_write_on_the_path(tmp_path):
    """The non-blocking methods of the wrapped store must not be used: they would bypass ``write``."""
    from node_agent.scsi.device import LogicalUnit, LunIdentity

    wrapper = ForwardingWrapper(FileBackingStore(tmp_path / "disk.img", size=1 << 20))
    unit = LogicalUnit(wrapper, LunIdentity(volume_id="vol-wrapped"), target_name="iqn.2026-11.io.shoal.test:t")
    assert unit.read_nowait is None and unit.write_nowait is None
    cdb = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0])  # WRITE(10) 8 blocks at LBA 8
    result = unit.execute_deferrable(None, cdb, bytes(4096), 4096)
    assert result.status == 0 and result.blocking is None
    assert wrapper.writes == 1
    unit.close()
