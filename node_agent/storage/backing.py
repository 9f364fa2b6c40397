"""Backing stores: where a logical unit's blocks live.

The SCSI device model (``node_agent.scsi``) sees storage only through the
``BackingStore`` protocol below, so it stays free of I/O policy.  Two
implementations: ``FileBackingStore`` (a sparse file or a block device, with
``os.pread``/``os.pwrite`` on the page cache, ``RWF_DSYNC`` for FUA, hole
punching for UNMAP) and ``MemoryBackingStore`` for fast unit tests.

Durability contract (SBC-3 §4.12 write caching): ``write(..., fua=True)``
returns only once the data is on stable storage; ``flush()`` makes every
earlier write stable.

Non-blocking I/O (optional, ``read_nowait``/``write_nowait``): the target runs
READ and WRITE inline on its event loop, which is fast only while they cannot
block.  ``FileBackingStore`` tries ``preadv(..., RWF_NOWAIT)``: data in the page
cache comes back at once, anything else says "would block" and the target
hands that command to a worker thread.  Large reads, which the target sends
with ``sendfile`` straight from the page cache, ask ``cached`` first: a
one-byte ``RWF_NOWAIT`` probe of the range's first and last page (``mincore``
over a whole 1 MiB range cost ~27 µs here, ten times the probe).  A range that
fails the probe is read on a worker; one cold only in its middle can still
hold ``sendfile`` (readahead rarely leaves such gaps).  Buffered ``RWF_NOWAIT`` writes are
refused (EOPNOTSUPP) by ext4 on the kernels here, so plain writes stay inline
(they land in the page cache; only dirty-page throttling can hold them) and
FUA writes, which wait for the disk by definition, always go to a worker.

Gathered writes (optional, ``writev``): where plain writes run inline anyway
(``inline_writes``), the target writes the adjacent 4 KiB WRITEs of one
receive with one ``pwritev`` (a sequential stream of small writes: one system
call instead of one per command; the per-call cost of a buffered ext4 write is
~3 µs, the per-page cost ~0.35 µs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from typing import Protocol, runtime_checkable

#: Granularity at which filesystems allocate and punch (page size on tmpfs,
#: block size on ext4/xfs): the "physical block" we report (READ CAPACITY(16)
#: LBPPBE) so that UNMAP of aligned physical blocks really deallocates.
ALLOCATION_UNIT = 4096

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class StorageError(OSError):
    """A backing store that cannot be opened or used as asked (permanent)."""


@runtime_checkable
class BackingStore(Protocol):
    """What a logical unit needs from its storage (offsets and lengths in bytes)."""

    size: int
    block_size: int
    fd: int | None  # a file descriptor the transport may sendfile() from, or None

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def punch(self, offset: int, length: int) -> None: ...
    def extent(self, offset: int, limit: int) -> tuple[bool, int]: ...
    def resize(self, new_size: int) -> None: ...
    def close(self) -> None: ...


def _load_fallocate():
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()
_FALLOC_FL_UNSHARE_RANGE = 0x40


def unshare(fd: int, offset: int, length: int) -> bool:
    """Give the file its own blocks for a range it shares with another file (a reflink), so that a fully
    allocated ("thick") image cannot run out of space when it is written later.  False where the filesystem
    has no such operation (nothing can be shared there); an error (ENOSPC) raises."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_UNSHARE_RANGE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))



class FileBackingStore:
    """A sparse regular file (or a block device) used as a logical unit's medium.

    ``size=None`` takes the existing file's size.  A missing file is created
    sparse at ``size`` when ``create`` is true.  An existing file larger than
    ``size`` is refused (shrinking would silently lose data); a smaller one is
    extended.
    """

    def __init__(self, path: str | os.PathLike, size: int | None = None, *, create: bool = True,
                 block_size: int = 512, read_only: bool = False):
        if block_size not in (512, 1024, 2048, 4096):
            raise StorageError(errno.EINVAL, f"unsupported block size {block_size}")
        self.path = os.fspath(path)
        self.block_size = block_size
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        created = False
        if create and not read_only:
            try:  # made here (O_EXCL), so removed again if it cannot be used: a refusal leaves no stray file
                self.fd: int | None = os.open(self.path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
            except FileExistsError:
                pass
        if not created:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        try:
            self.size = self._settle_size(size)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise
        self.fua_writes = 0  # writes done with RWF_DSYNC (observable by tests)
        self.flushes = 0
        self._nowait_reads = _RWF_NOWAIT != 0
        self._nowait_writes = _RWF_NOWAIT != 0
        self._probe = bytearray(1)
        self._punch_supported = _fallocate is not None
        self._flush_failed: OSError | None = None  # the fdatasync error every later flush repeats (``flush``)

    def cached(self, offset: int, length: int) -> bool:
        """Whether the first and last page of ``[offset, offset+length)`` are in the page cache.

        True when it cannot tell (no ``RWF_NOWAIT``) or the range is past the end."""
        if not self._nowait_reads or length <= 0:
            return True
        last = min(offset + length, self.size) - 1
        try:
            for where in (offset, last) if last - offset >= 4096 else (offset,):
                if where >= self.size:
                    break
                if os.preadv(self.fd, [self._probe], where, _RWF_NOWAIT) != 1:
                    return False
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_reads = False
        return True

    def _settle_size(self, size: int | None) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            current = os.lseek(self.fd, 0, os.SEEK_END)
            if size is not None and size != current:
                raise StorageError(errno.EINVAL, f"{self.path}: block device is {current} bytes, not {size}")
            return current - current % self.block_size
        current = st.st_size
        if size is None:
            if current == 0:
                raise StorageError(errno.EINVAL, f"{self.path}: empty file and no size given")
            size = current
        if size % self.block_size:
            raise StorageError(errno.EINVAL, f"{self.path}: size {size} is not a multiple of {self.block_size}")
        if current > size:
            raise StorageError(errno.EEXIST, f"{self.path}: existing file is {current} bytes, larger than {size}")
        if current < size:
            if self.read_only:
                raise StorageError(errno.EROFS, f"{self.path}: read-only file smaller than {size}")
            os.ftruncate(self.fd, size)
        return size

    # -- data path -----------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # rare: the rest is read, or the read fails (never GOOD with made-up data)
            data = self._read_rest(offset, length, data)
        return data

    def _read_rest(self, offset: int, length: int, data: bytes) -> bytes:
        """Finish a short read.  A file system may return less than asked (FUSE, NFS); the end of the file
        before the medium's (``size``) means the file was truncated, or the device shrunk, under the unit:
        the blocks there are lost, and padding them with zeros would answer GOOD with data the initiator
        never wrote.  EIO then: the READ ends with CHECK CONDITION, never GOOD for a transfer that did not
        happen."""
        parts, done = [data], len(data)
        while done < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:
                raise OSError(errno.EIO, f"{self.path} ends at byte {offset + done}, inside the medium of "
                                         f"{self.size} bytes (truncated or shrunk under the unit?)")
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def readinto(self, offset: int, buf) -> int:
        return os.preadv(self.fd, [buf], offset)

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """The data if the page cache holds all of it; None if reading it would wait for the disk."""
        if not self._nowait_reads:
            return self.read(offset, length)
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_reads = False  # a file system without RWF_NOWAIT: plain reads from now on
            return self.read(offset, length)
        if n != length:  # partly cached (the rest would block), or the file ends early: ``read`` decides
            return None
        return buf

    def write_nowait(self, offset: int, data, fua: bool = False) -> bool:
        """Write ``data`` if that cannot wait for the disk; False (nothing or part written) otherwise.

        A FUA write always waits for the disk.  Where buffered ``RWF_NOWAIT`` writes are not
        supported the write is done inline (page-cache writes block only under dirty throttling)."""
        if fua:
            return False
        if self._nowait_writes:
            try:
                done = os.pwritev(self.fd, [data], offset, _RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait_writes = False
            else:
                return done == len(data)  # a short write: the rest would block (redone whole)
        done = os.pwrite(self.fd, data, offset)  # as ``write``, without its frame: this is the hot path
        if done != len(data):
            self._write_rest(offset, memoryview(data), done, False)
        return True

    @property
    def inline_writes(self) -> bool:
        """True once a write found buffered ``RWF_NOWAIT`` writes unsupported (ext4 here): from then on
        ``write_nowait`` writes every non-FUA write inline, as ``write`` would."""
        return not self._nowait_writes

    def writev(self, offset: int, buffers: list, length: int) -> None:
        """Write ``buffers`` (``length`` bytes together) one after another from ``offset``: one
        ``pwritev`` into the page cache, like ``write`` without FUA."""
        done = os.pwritev(self.fd, buffers, offset)
        if done != length:  # rare (signals, full disk): finish the write
            self._write_rest(offset, memoryview(b"".join(buffers)), done, False)

    def write(self, offset: int, data, fua: bool = False) -> None:
        if fua:
            done = os.pwritev(self.fd, [data], offset, os.RWF_DSYNC)
            self.fua_writes += 1
        else:
            done = os.pwrite(self.fd, data, offset)
        if done != len(data):  # rare (signals, full disk): finish the write
            self._write_rest(offset, memoryview(data), done, fua)

    def _write_rest(self, offset: int, view: memoryview, done: int, fua: bool) -> None:
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        """Make every earlier write stable (SYNCHRONIZE CACHE, SBC-3 §5.22).  A failed write-back is reported
        by one fdatasync only (the kernel's per-file error sequence): the next would succeed although the
        pages it lost were never written, and a SYNCHRONIZE CACHE of another session, whose writes were
        among them, would end GOOD.  So a failure sticks: every later flush fails the same way, until the
        store is opened again (the data is gone; the initiator must learn it, not the first asker alone)."""
        if self._flush_failed is not None:
            raise OSError(self._flush_failed.errno, f"an earlier flush of {self.path} failed, writes were lost: "
                                                    f"{self._flush_failed.strerror}")
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.EINVAL):  # a lost write-back, not a misuse of the call
                self._flush_failed = exc
            raise
        self.flushes += 1

    def punch(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset+length)``; it reads back as zeros afterwards."""
        if length <= 0:
            return
        if self._punch_supported:
            rc = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise OSError(err, os.strerror(err))
            self._punch_supported = False
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            done = os.pwrite(self.fd, chunk[:n], offset)
            if done != n:  # a short write left the rest of the range unzeroed: finish it, or fail
                self._write_rest(offset, chunk[:n], done, False)
            offset += n

    def extent(self, offset: int, limit: int) -> tuple[bool, int]:
        """Whether ``offset`` is mapped, and how many bytes from it (at most ``limit``) share that state.

        Uses ``SEEK_DATA``/``SEEK_HOLE`` (for GET LBA STATUS, SBC-3 §5.6).
        Without them every byte counts as mapped.
        """
        end = min(offset + limit, self.size)
        if offset >= end:
            return True, 0
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole up to EOF
                return False, end - offset
            return True, end - offset
        if data > offset:
            return False, min(data, end) - offset
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(hole, end) - offset

    def is_mapped(self, offset: int, length: int) -> bool:
        mapped, run = self.extent(offset, length)
        return mapped or run < length

    def resize(self, new_size: int) -> None:
        """Grow the medium to ``new_size``: a file is extended; a block device cannot be (ftruncate fails
        with EINVAL), its owner grows it (lvextend, ``losetup --set-capacity``) and this takes up to what
        it has become (its size as ``BLKGETSIZE64`` gives it: the end ``lseek`` finds)."""
        if new_size % self.block_size or new_size < self.size:
            raise StorageError(errno.EINVAL, f"cannot resize {self.size} -> {new_size}")
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            device = os.lseek(self.fd, 0, os.SEEK_END)
            if device < new_size:
                raise StorageError(errno.EINVAL, f"{self.path}: block device is {device} bytes, less than "
                                                 f"{new_size}: grow the device first")
        else:
            os.ftruncate(self.fd, new_size)
        self.size = new_size

    def close(self) -> None:
        if self.fd is not None:
            try:
                if not self.read_only:
                    os.fdatasync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None


class MemoryBackingStore:
    """An in-memory medium for unit tests; tracks mapping per ``ALLOCATION_UNIT``."""

    fd = None

    def __init__(self, size: int, block_size: int = 512, *, read_only: bool = False):
        if size % block_size:
            raise StorageError(errno.EINVAL, "size is not a multiple of the block size")
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.buf = bytearray(size)
        self.mapped = bytearray((size + ALLOCATION_UNIT - 1) // ALLOCATION_UNIT)
        self.fua_writes = 0
        self.flushes = 0
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data, fua: bool = False) -> None:
        n = len(data)
        if offset + n > self.size:
            raise OSError(errno.ENOSPC, "write past the end")
        self.buf[offset : offset + n] = data
        first, last = offset // ALLOCATION_UNIT, (offset + n - 1) // ALLOCATION_UNIT
        if n:
            self.mapped[first : last + 1] = b"\x01" * (last - first + 1)
        if fua:
            self.fua_writes += 1

    def flush(self) -> None:
        self.flushes += 1

    def punch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self.buf[offset : offset + length] = bytes(length)
        first = -(-offset // ALLOCATION_UNIT)
        last = (offset + length) // ALLOCATION_UNIT  # exclusive: only whole units are freed
        if last > first:
            self.mapped[first:last] = bytes(last - first)

    def extent(self, offset: int, limit: int) -> tuple[bool, int]:
        end = min(offset + limit, self.size)
        if offset >= end:
            return True, 0
        unit = offset // ALLOCATION_UNIT
        state = self.mapped[unit]
        pos = (unit + 1) * ALLOCATION_UNIT
        while pos < end and self.mapped[pos // ALLOCATION_UNIT] == state:
            pos += ALLOCATION_UNIT
        return bool(state), min(pos, end) - offset

    def is_mapped(self, offset: int, length: int) -> bool:
        mapped, run = self.extent(offset, length)
        return mapped or run < length

    def resize(self, new_size: int) -> None:
        if new_size % self.block_size or new_size < self.size:
            raise StorageError(errno.EINVAL, f"cannot resize {self.size} -> {new_size}")
        self.buf.extend(bytes(new_size - self.size))
        self.mapped.extend(bytes((new_size + ALLOCATION_UNIT - 1) // ALLOCATION_UNIT - len(self.mapped)))
        self.size = new_size

    def close(self) -> None:
        self.closed = True
