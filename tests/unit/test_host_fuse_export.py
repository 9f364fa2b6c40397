"""The FUSE export of a block device (node_agent/host/fuse_export.py).

The device is ``FileBlockDevice`` — our own implementation of the same
``BlockDevice`` protocol ``SyncLun`` implements (the boundary the export is
written against); it rejects unaligned requests, so every test here also proves
the export widens unaligned ranges to whole blocks.  The first group drives
``BlockFile`` directly; the second mounts a real FUSE filesystem (root and
/dev/fuse needed, skipped otherwise) and uses it through system calls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
import threading

import pytest

from node_agent.host.fuse_export import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    BlockFile,
    ExportBusy,
    ExportSettings,
    FileBlockDevice,
    FuseExport,
    is_mountpoint,
)
from tests.conftest import require_tools

SIZE = 4 * 2**20


class RecordingDevice(FileBlockDevice):
    """A FileBlockDevice that records flushes, discards and FUA writes, and can be made to fail."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.fua_writes = 0
        self.fail: Exception | None = None
        self._lock = threading.Lock()

    def _maybe_fail(self):
        if self.fail is not None:
            raise self.fail

    def pread(self, offset, length):
        self._maybe_fail()
        data = super().pread(offset, length)
        # Any bytes-like answer must do (SyncLun may hand back a bytearray or a view of its buffer).
        kind = (offset // self.block_size) % 3
        return data if kind == 0 else bytearray(data) if kind == 1 else memoryview(data)

    def pwrite(self, offset, data, fua=False):
        self._maybe_fail()
        if fua:
            with self._lock:
                self.fua_writes += 1
        super().pwrite(offset, data, fua)

    def flush(self):
        self._maybe_fail()
        with self._lock:
            self.flushes += 1
        super().flush()

    def discard(self, offset, length):
        self._maybe_fail()
        with self._lock:
            self.discards.append((offset, length))
        super().discard(offset, length)


def make_device(tmp_path, block_size=512, size=SIZE, fill=True):
    path = tmp_path / f"backing-{block_size}.img"
    data = random.Random(block_size).randbytes(size) if fill else bytes(size)
    path.write_bytes(data)
    return RecordingDevice(str(path), block_size=block_size), bytearray(data)


# --------------------------------------------------------------------------- BlockFile, no FUSE

@pytest.mark.parametrize("block_size", [512, 4096])
def test_unaligned_reads_and_writes_match_a_model(tmp_path, block_size):
    device, model = make_device(tmp_path, block_size)
    bf = BlockFile(device, ExportSettings())
    rng = random.Random(7)
    for _ in range(400):
        offset = rng.randrange(SIZE)
        length = rng.choice([1, 7, 511, 512, 513, 4095, 4096, 4097, 70000])
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            written = bf.write(offset, data)
            assert written == min(length, SIZE - offset)
            model[offset:offset + written] = data[:written]
        else:
            assert bytes(bf.read(offset, length)) == bytes(model[offset:offset + length])
    assert bytes(bf.read(0, SIZE)) == bytes(model)
    device.close()


def test_reads_end_at_the_device_end_and_writes_beyond_it_fail(tmp_path):
    device, model = make_device(tmp_path)
    bf = BlockFile(device, ExportSettings())
    assert bf.read(SIZE - 10, 100) == bytes(model[-10:])
    assert bf.read(SIZE, 100) == b""
    assert bf.write(SIZE - 3, b"abcdef") == 3  # short, as on a block device
    with pytest.raises(Exception) as info:
        bf.write(SIZE, b"x")
    assert getattr(info.value, "code", None) == errno.ENOSPC
    device.close()


def test_concurrent_partial_writes_to_one_block_keep_every_byte(tmp_path):
    """Two read-modify-writes of one block must not lose each other's bytes (each holds its blocks exclusively)."""
    device, model = make_device(tmp_path, 4096, fill=False)
    bf = BlockFile(device, ExportSettings())

    def writer(start):
        for offset in range(start, 8192, 16):
            bf.write(offset, bytes([offset % 251 + 1]) * 3)

    threads = [threading.Thread(target=writer, args=(k * 4,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = bf.read(0, 8192)
    for offset in range(0, 8192, 4):  # every 4th offset was written by exactly one of the writers
        assert data[offset:offset + 4] == bytes([offset % 251 + 1]) * 3 + b"\0", offset
    device.close()


def test_punch_discards_whole_blocks_and_zeroes_the_edges(tmp_path):
    device, model = make_device(tmp_path, 512)
    bf = BlockFile(device, ExportSettings())
    bf.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 5000)
    assert device.discards == [(512, 4096)]  # [512, 4608) is whole blocks; 100-511 and 4608-5099 written
    model[100:5100] = bytes(5000)
    assert bf.read(0, 8192) == bytes(model[:8192])
    device.discards.clear()
    bf.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 8192, 4096)
    assert device.discards == []  # ZERO_RANGE (write-zeroes with NOUNMAP) keeps the blocks allocated
    model[8192:12288] = bytes(4096)
    assert bf.read(0, 16384) == bytes(model[:16384])
    with pytest.raises(Exception) as info:
        bf.fallocate(FALLOC_FL_PUNCH_HOLE, 0, 512)  # fallocate(2): punch needs KEEP_SIZE
    assert getattr(info.value, "code", None) == errno.EOPNOTSUPP
    device.close()


def test_punch_writes_zeros_when_discard_does_not_zero(tmp_path):
    device, model = make_device(tmp_path, 512)
    bf = BlockFile(device, ExportSettings(discard_zeroes=False))
    bf.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    assert device.discards == []
    assert bf.read(0, 4096) == bytes(4096)
    device.close()


# --------------------------------------------------------------------------- through a real FUSE mount

def require_fuse():
    if os.geteuid() != 0:
        pytest.skip("mounting FUSE without fusermount3 needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"mfusepy/libfuse3 unavailable: {exc}")


@pytest.fixture
def export(tmp_path):
    require_fuse()
    exports = []

    def start(block_size=512, **settings):
        device, model = make_device(tmp_path, block_size)
        ex = FuseExport(device, str(tmp_path / f"mnt-{len(exports)}"), ExportSettings(**settings))
        ex.start()
        exports.append(ex)
        return ex, device, model

    try:
        yield start
    finally:
        for ex in exports:
            ex.stop(lazy=True)
            ex.device.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.parametrize("block_size", [512, 4096])
def test_mounted_file_random_unaligned_io_matches_a_model(export, block_size):
    ex, device, model = export(block_size)
    assert is_mountpoint(ex.mountpoint)
    assert os.listdir(ex.mountpoint) == ["disk"]
    assert os.stat(ex.path).st_size == SIZE
    rng = random.Random(block_size + 1)
    fd = os.open(ex.path, os.O_RDWR)
    try:
        for _ in range(300):
            offset = rng.randrange(SIZE)
            length = rng.choice([1, 100, 511, 512, 4096, 5000, 65536, 200000])
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                written = os.pwrite(fd, data, offset)
                model[offset:offset + written] = data[:written]
            else:
                assert os.pread(fd, length, offset) == bytes(model[offset:offset + length])
        assert os.pread(fd, SIZE, 0) == bytes(model)
    finally:
        os.close(fd)
    with open(device.path, "rb") as fh:
        assert fh.read() == bytes(model)  # the bytes reached the device, not a cache


def test_concurrent_writers_through_fuse(export):
    ex, device, model = export(4096, max_threads=8)
    rng = random.Random(3)
    jobs = [(rng.randrange(SIZE - 70000), rng.randbytes(rng.choice([100, 4096, 70000]))) for _ in range(64)]
    # Disjoint ranges, so the final content is defined whatever the interleaving.
    jobs.sort()
    disjoint, end = [], -1
    for offset, data in jobs:
        if offset > end:
            disjoint.append((offset, data))
            end = offset + len(data)
    fd = os.open(ex.path, os.O_RDWR)
    try:
        threads = [threading.Thread(target=os.pwrite, args=(fd, data, offset)) for offset, data in disjoint]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for offset, data in disjoint:
            model[offset:offset + len(data)] = data
        assert os.pread(fd, SIZE, 0) == bytes(model)
    finally:
        os.close(fd)


def test_fsync_reaches_flush_and_dsync_writes_are_fua(export):
    ex, device, _ = export()
    fd = os.open(ex.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 512, 0)
        before = device.flushes
        os.fsync(fd)
        assert device.flushes == before + 1
        os.fdatasync(fd)
        assert device.flushes == before + 2
    finally:
        os.close(fd)
    fd = os.open(ex.path, os.O_RDWR | os.O_DSYNC)
    try:
        os.pwrite(fd, b"y" * 512, 512)
        assert device.fua_writes == 1
    finally:
        os.close(fd)


def test_punch_reaches_discard(export):
    ex, device, model = export()
    fd = os.open(ex.path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1024, 8192)
        assert device.discards == [(1024, 8192)]
        assert os.pread(fd, 8192, 1024) == bytes(8192)
        assert os.pread(fd, 1024, 0) == bytes(model[:1024])
    finally:
        os.close(fd)


def test_a_failing_device_gives_eio_and_the_export_survives(export):
    ex, device, model = export()
    fd = os.open(ex.path, os.O_RDWR)
    try:
        device.fail = ConnectionResetError("target went away")
        with pytest.raises(OSError) as info:
            os.pread(fd, 512, 0)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"z" * 512, 0)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.fsync(fd)
        assert info.value.errno == errno.EIO
        device.fail = RuntimeError("a bug in the device")
        with pytest.raises(OSError) as info:
            os.pread(fd, 512, 4096)
        assert info.value.errno == errno.EIO
        device.fail = None
        assert os.pread(fd, 512, 0) == bytes(model[:512])  # still serving
    finally:
        os.close(fd)


def test_the_file_cannot_be_truncated_or_created_beside(export):
    ex, _, _ = export()
    with pytest.raises(OSError) as info:
        os.open(ex.path, os.O_RDWR | os.O_TRUNC)
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError):
        os.truncate(ex.path, 0)
    with pytest.raises(OSError):
        open(os.path.join(ex.mountpoint, "other"), "wb")
    assert os.stat(ex.path).st_size == SIZE


def test_stop_refuses_while_open_unless_lazy_and_is_idempotent(export):
    ex, _, _ = export()
    fd = os.open(ex.path, os.O_RDONLY)
    try:
        with pytest.raises(ExportBusy):
            ex.stop()
        assert ex.running
    finally:
        os.close(fd)
    ex.stop()
    assert not ex.running and not is_mountpoint(ex.mountpoint)
    ex.stop()


def test_loop_device_flush_and_discard_reach_the_device(export):
    """A loop device with O_DIRECT on the export: its flushes and discards arrive as fsync and punch."""
    require_tools("losetup", "blkdiscard", "blockdev")
    ex, device, model = export(4096)
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", ex.path],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        info = subprocess.run(["losetup", "--list", "--noheadings", "--output", "DIO,LOG-SEC", loop],
                              capture_output=True, text=True, check=True).stdout.split()
        assert info == ["1", "4096"]
        with open(loop, "r+b", buffering=0) as fh:
            fh.seek(8192)
            fh.write(b"q" * 4096)
            before = device.flushes
            os.fsync(fh.fileno())
        assert device.flushes > before
        subprocess.run(["blkdiscard", "--offset", "65536", "--length", "65536", loop], check=True)
        assert (65536, 65536) in device.discards
        with open(device.path, "rb") as fh:
            fh.seek(8192)
            assert fh.read(4096) == b"q" * 4096
            fh.seek(65536)
            assert fh.read(65536) == bytes(65536)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)
