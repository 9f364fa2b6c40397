"""One block device exported as one regular file through FUSE, for a loop device to sit on.

``FuseExport(device, mountpoint).start()`` mounts a filesystem holding a single
file, ``<mountpoint>/disk``, whose bytes are the device's bytes; ``stop()``
unmounts it and joins the thread that served it.  The userspace connector puts
``losetup --direct-io=on`` on that file, so the kernel's block layer talks to a
remote LUN through Shoal's own initiator.

How file operations reach the device (``BlockDevice``, the protocol
``SyncLun`` implements):

- read/write -> ``pread``/``pwrite`` of whole blocks; unaligned ranges are
  widened to block boundaries (read-modify-write for writes).  A
  read-modify-write holds its blocks exclusively from its read to the end of
  its write, and every other write (aligned writes, discards, written zeros)
  holds its blocks shared, so nothing written to those blocks meanwhile is
  overwritten by the stale copy; aligned writes still run side by side
  (``_RangeLock``);
- a write on a file opened ``O_DSYNC``/``O_SYNC`` -> ``pwrite(fua=True)``;
- fsync/fdatasync and close (FUSE ``flush``) -> ``flush()`` (SYNCHRONIZE
  CACHE): the loop device turns REQ_PREFLUSH/REQ_FUA into ``vfs_fsync`` on its
  backing file, so a filesystem barrier on ``/dev/loopN`` reaches the LUN;
- fallocate ``PUNCH_HOLE`` (the loop device's discard and write-zeroes) ->
  ``discard()`` of whole blocks, zeros written to partial blocks (on a device
  whose discard leaves no zeros: zeros written, or ``EOPNOTSUPP`` with
  ``ExportSettings.zero_punched_ranges`` off);
  ``ZERO_RANGE`` (write-zeroes with NOUNMAP) -> zeros written.

Any exception a device raises becomes an errno for the caller, never a crash of
the FUSE thread (a Python exception escaping a ctypes callback would be
printed and reported to the kernel as success): ``ENOSPC`` when the storage
has no room for a write (``_errno_for``), ``EIO`` for anything else.

The FUSE session is driven with libfuse3's low-level lifecycle calls
(``fuse_new``/``fuse_mount``/``fuse_loop_mt``/``fuse_unmount``/``fuse_destroy``)
rather than ``fuse_main``: ``fuse_main`` would fork unless told not to, parse
a command line, and take over the process's SIGTERM/SIGHUP handlers for the
lifetime of the mount — wrong for an agent that serves many volumes from one
process.  The ABI structures (``fuse_operations``, ``stat``, ``fuse_file_info``)
come from ``mfusepy``, a maintained ctypes binding of libfuse 3.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from node_agent.scsi.sense import SPACE_ALLOCATION_FAILED_WRITE_PROTECT

if TYPE_CHECKING:
    from node_agent.host.connector import ReportedIdentity

log = logging.getLogger(__name__)

DISK_NAME = "disk"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MNT_DETACH = 2
ZERO_CHUNK = 1 << 20  # zeros are written in pieces of this size


class FuseUnavailable(RuntimeError):
    """libfuse 3 (Debian ``libfuse3-3``/``fuse3``) or ``/dev/fuse`` is missing."""


class ExportBusy(RuntimeError):
    """The export cannot be unmounted: its file is still open (a loop device on it?)."""


def _load_libraries():
    """libfuse3 and mfusepy's ABI types, loaded on first use (importing this module needs neither)."""
    path = ctypes.util.find_library("fuse3")
    if path is None:
        raise FuseUnavailable("libfuse3 not found (install Debian's fuse3)")
    # mfusepy prefers libfuse 2 when both are installed; its struct layouts must
    # match the library we call, so point it at libfuse 3 unless told otherwise.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (ImportError, OSError) as exc:
        raise FuseUnavailable(f"mfusepy cannot be loaded: {exc}") from exc
    if mfusepy.fuse_version_major != 3 or mfusepy.fuse_version_minor < 12:
        raise FuseUnavailable(f"mfusepy loaded libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor};"
                              " libfuse >= 3.12 is required (set FUSE_LIBRARY_NAME=fuse3)")
    lib = ctypes.CDLL(path, use_errno=True)
    lib.fuse_new.restype = ctypes.c_void_p  # default symbol version: fuse_new_31
    lib.fuse_new.argtypes = [ctypes.POINTER(_FuseArgs), ctypes.POINTER(mfusepy.fuse_operations),
                             ctypes.c_size_t, ctypes.c_void_p]
    lib.fuse_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_loop_cfg_create.restype = ctypes.c_void_p
    lib.fuse_loop_cfg_set_max_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.fuse_loop_cfg_set_idle_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.fuse_loop_cfg_destroy.argtypes = [ctypes.c_void_p]
    lib.fuse_loop_mt_312.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for name in ("fuse_unmount", "fuse_destroy", "fuse_exit"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = None
    lib.fuse_opt_free_args.argtypes = [ctypes.POINTER(_FuseArgs)]
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_invalidate_path.restype = ctypes.c_int
    return lib, mfusepy


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def unmount(path: str, *, lazy: bool = False) -> bool:
    """umount2(2) ``path``; True if something was unmounted, False if nothing was mounted there.

    Raises ``ExportBusy`` on EBUSY (without ``lazy``) and ``OSError`` otherwise.
    """
    if _libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # not a mount point
        return False
    if err == errno.ENOENT:
        return False
    if err == errno.EBUSY:
        raise ExportBusy(f"{path} is busy")
    raise OSError(err, os.strerror(err), path)


_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(text: str) -> str:
    """A mountinfo field as the path it is: the kernel escapes only space, tab, newline and backslash, as
    ``\\NNN`` octal, and writes every other byte as it is (UTF-8 names stay UTF-8).  ``node_agent.csi.mounts``
    reads mountinfo with it too."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def is_mountpoint(path: str) -> bool:
    """True if ``path`` is a mount point in /proc/self/mountinfo (works for a dead FUSE mount too)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            if unescape_mountinfo(fields[4]) == real:
                return True
    return False


# --------------------------------------------------------------------------- devices

@runtime_checkable
class BlockDevice(Protocol):
    """What the export needs of a device; ``node_agent.iscsi.initiator.blockdev.SyncLun`` is one.

    Offsets and lengths the export passes are whole blocks.  Every method may
    be called from many threads at once.
    """

    size: int
    """Capacity in bytes."""
    block_size: int
    """Logical block size in bytes."""

    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def identity(self) -> tuple[str, str]: ...
    def reported_identity(self) -> "ReportedIdentity":
        """Every NAA designator the device reports and its serial: what the identity check compares."""
        ...
    def close(self) -> None: ...
    def refresh_capacity(self) -> int:
        """Read the capacity again (the volume grew), update ``size``, return it."""
        ...
    session_state: str
    """"up", or why the device cannot serve now ("reconnecting", "down"): the volume's condition."""


class FileBlockDevice:
    """A ``BlockDevice`` over a local file: for tests of the export and for local volumes.

    It insists on block-aligned requests (``ValueError`` otherwise), so a test
    through it also proves the export widens unaligned ranges.
    """

    def __init__(self, path: str, *, block_size: int = 512, naa: str = "", serial: str = ""):
        self.path = path
        self.block_size = block_size
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size // block_size * block_size
        self._identity = (naa, serial)

    def _check(self, offset: int, length: int) -> None:
        if offset % self.block_size or length % self.block_size:
            raise ValueError(f"unaligned request: offset {offset}, length {length}, block {self.block_size}")
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"request beyond the end: offset {offset}, length {length}, size {self.size}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return os.pread(self._fd, length, offset)

    def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fsync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        zeros = bytes(min(length, ZERO_CHUNK))
        for start in range(offset, offset + length, ZERO_CHUNK):
            os.pwrite(self._fd, zeros[:min(ZERO_CHUNK, offset + length - start)], start)

    def identity(self) -> tuple[str, str]:
        return self._identity

    def reported_identity(self) -> "ReportedIdentity":
        from node_agent.host.connector import ReportedIdentity

        naa, serial = self._identity
        return ReportedIdentity((naa.lower(),) if naa else (), serial or None)

    session_state = "up"  # a local file has no session

    def refresh_capacity(self) -> int:
        self.size = os.fstat(self._fd).st_size // self.block_size * self.block_size
        return self.size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------- the file's semantics

class _FsError(Exception):
    """A filesystem answer of our own (ENOENT, EPERM...), returned as is; anything else is EIO."""

    def __init__(self, code: int):
        super().__init__(os.strerror(code))
        self.code = code


@dataclass(frozen=True)
class ExportSettings:
    """How an export behaves."""

    max_threads: int = 8
    """FUSE worker threads: requests served at once (the loop device queues up to its depth)."""
    direct_io: bool = True
    """FUSE ``direct_io``: no page cache for the file, every read/write reaches the device.  The
    loop device above already caches (or uses O_DIRECT); a second cache would only double memory
    and delay writes past the loop device's flushes."""
    discard_zeroes: bool = True
    """The device's discard leaves zeros (SBC-3 LBPRZ; Shoal's thin LUNs do).  When False a punched
    range is written with zeros instead, since a punched file range must read back as zeros."""
    zero_punched_ranges: bool = True
    """With ``discard_zeroes`` False: write zeros over a punched range (True), or refuse the punch with
    EOPNOTSUPP (False), as a filesystem without hole punching does.  The userspace connector refuses: the
    loop device above takes EOPNOTSUPP from fallocate as "no discard here" and stops offering it (as the
    kernel's sd offers none for a LUN without LBPME), where zeros written instead turn every discard into a
    write of that much over the network (mkfs discards the whole device: the whole volume written).  A
    write-zeroes request still zeroes: as ZERO_RANGE, or, its punch refused, by the block layer writing
    zeros itself."""
    fsname: str = "shoal"
    """Mount source shown in /proc/mounts; the connector puts the volume id in it."""


class _Hold:
    """One request's claim on the byte range [start, end) of the device."""

    __slots__ = ("start", "end", "exclusive", "released")

    def __init__(self, start: int, end: int, exclusive: bool):
        self.start, self.end, self.exclusive, self.released = start, end, exclusive, False

    def conflicts(self, other: "_Hold") -> bool:
        return (self.exclusive or other.exclusive) and self.start < other.end and other.start < self.end


class _RangeLock:
    """Shared and exclusive holds on ranges of the device, granted in arrival order among conflicting holds.

    A read-modify-write holds its covering blocks exclusively, from the read of its edge blocks
    to the end of its write: a write landing on those blocks in between would be overwritten by
    the stale copy (a lost write).  Every other write holds its blocks shared, so aligned writes
    and discards run side by side and in whatever order the device completes them, as on a disk
    (the kernel orders overlapping writes of its own).  Reads hold nothing: a read-modify-write
    writes back the bytes it did not change as they were, so a read sees the old or the new
    block, as with any write.

    Each request takes one hold for its whole range (never one lock per block or stripe, so there
    is no order of taking to get wrong), and never asks for another while it has one.  A hold
    waits only for conflicting holds asked for before it, so the waits can form no cycle (no
    deadlock, however many blocks a request spans), and a read-modify-write waiting for aligned
    writes is not overtaken by newer ones (no starvation).  The bookkeeping
    is one short critical section per acquire and per release over the holds outstanding — at
    most one per FUSE thread — and the I/O runs outside it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holds: list[_Hold] = []  # granted or waiting, in arrival order
        self._waiting = 0

    def acquire(self, start: int, end: int, *, exclusive: bool) -> _Hold:
        hold = _Hold(start, end, exclusive)
        with self._cond:
            ahead = [h for h in self._holds if h.conflicts(hold)]
            self._holds.append(hold)
            if ahead:
                self._waiting += 1
                try:
                    while not all(h.released for h in ahead):
                        self._cond.wait()
                except BaseException:
                    self._release_locked(hold)
                    raise
                finally:
                    self._waiting -= 1
        return hold

    def release(self, hold: _Hold) -> None:
        with self._cond:
            self._release_locked(hold)

    def _release_locked(self, hold: _Hold) -> None:
        hold.released = True
        self._holds.remove(hold)
        if self._waiting:
            self._cond.notify_all()


class BlockFile:
    """The operations on ``/disk`` in terms of a ``BlockDevice`` (no FUSE here: unit-testable)."""

    def __init__(self, device: BlockDevice, settings: ExportSettings):
        self.device = device
        self.settings = settings
        self.size = int(device.size)
        self.block = int(device.block_size)
        self._ranges = _RangeLock()

    def read(self, offset: int, length: int) -> memoryview:
        if offset >= self.size or length <= 0:
            return memoryview(b"")
        length = min(length, self.size - offset)
        first = offset - offset % self.block
        end = -(-(offset + length) // self.block) * self.block
        data = memoryview(self.device.pread(first, end - first)).cast("B")  # any bytes-like answer
        if len(data) != end - first:
            raise OSError(errno.EIO, f"device returned {len(data)} of {end - first} bytes")
        return data[offset - first: offset - first + length]

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> int:
        if offset >= self.size:
            raise _FsError(errno.ENOSPC)
        data = data[:self.size - offset]  # a write across the end is short, as on a block device
        end = offset + len(data)
        first = offset - offset % self.block
        last = -(-end // self.block) * self.block
        if first == offset and last == end:
            hold = self._ranges.acquire(offset, end, exclusive=False)
            try:
                self.device.pwrite(offset, data, fua)
            finally:
                self._ranges.release(hold)
            return len(data)
        hold = self._ranges.acquire(first, last, exclusive=True)
        try:
            merged = bytearray(last - first)
            if offset != first:
                merged[:self.block] = self._block_at(first)
            tail = last - self.block
            if end != last and not (offset != first and tail == first):
                merged[tail - first:] = self._block_at(tail)
            merged[offset - first:end - first] = data
            self.device.pwrite(first, bytes(merged), fua)
        finally:
            self._ranges.release(hold)
        return len(data)

    def _block_at(self, offset: int) -> bytes:
        block = self.device.pread(offset, self.block)
        if len(block) != self.block:
            raise OSError(errno.EIO, "short block read")
        return block

    def flush(self) -> None:
        self.device.flush()

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise _FsError(errno.EINVAL)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0:
            # Plain allocation: every byte of the device exists already; growing is impossible.
            if mode & ~FALLOC_FL_KEEP_SIZE:
                raise _FsError(errno.EOPNOTSUPP)
            if offset + length > self.size and not mode & FALLOC_FL_KEEP_SIZE:
                raise _FsError(errno.ENOSPC)
            return
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise _FsError(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise _FsError(errno.EOPNOTSUPP)  # fallocate(2): PUNCH_HOLE must be ORed with KEEP_SIZE
        if mode & FALLOC_FL_PUNCH_HOLE and not (self.settings.discard_zeroes or self.settings.zero_punched_ranges):
            raise _FsError(errno.EOPNOTSUPP)  # no discard that zeros, and no zeros written instead
        if offset >= self.size:
            return
        end = min(offset + length, self.size)
        inner_first = -(-offset // self.block) * self.block
        inner_end = end - end % self.block
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE) and self.settings.discard_zeroes
        if punch and inner_end > inner_first:
            hold = self._ranges.acquire(inner_first, inner_end, exclusive=False)  # a write, as for pwrite
            try:
                self.device.discard(inner_first, inner_end - inner_first)
            finally:
                self._ranges.release(hold)
            self._zero(offset, min(inner_first, end))
            self._zero(max(inner_end, offset), end)
        else:
            self._zero(offset, end)

    def _zero(self, start: int, end: int) -> None:
        """Write zeros over [start, end); partial blocks by read-modify-write."""
        while start < end:
            n = min(end - start, ZERO_CHUNK)
            self.write(start, bytes(n))
            start += n


# --------------------------------------------------------------------------- the FUSE session

class FuseExport:
    """Serve ``device`` as ``<mountpoint>/disk`` from a thread of this process.

    ``start()`` returns once the filesystem is mounted; ``stop()`` unmounts
    (raising ``ExportBusy`` while the file is open, unless ``lazy``) and joins.
    """

    def __init__(self, device: BlockDevice, mountpoint: str, settings: ExportSettings | None = None):
        self.device = device
        self.mountpoint = os.path.abspath(mountpoint)
        self.settings = settings or ExportSettings()
        self.file = BlockFile(device, self.settings)
        self._fuse = None
        self._thread: threading.Thread | None = None
        self._loop_result: int | None = None
        self._callbacks: list = []  # ctypes callbacks must outlive the session
        self._started_at = time.time()
        self.io_errors = 0
        """Requests answered EIO since the start (the device failed them): the volume's condition."""

    def _count_error(self) -> None:
        self.io_errors += 1

    @property
    def path(self) -> str:
        """The exported file."""
        return os.path.join(self.mountpoint, DISK_NAME)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "FuseExport":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(lazy=True)

    def start(self) -> None:
        if self._fuse is not None:
            raise RuntimeError("export already started")
        lib, mf = _load_libraries()
        if not os.path.exists("/dev/fuse"):
            raise FuseUnavailable("/dev/fuse is missing")
        os.makedirs(self.mountpoint, exist_ok=True)
        ops = self._operations(mf)
        options = [f"fsname={_option_value(self.settings.fsname)}", "subtype=shoal",
                   "attr_timeout=3600", "entry_timeout=3600"]
        argv = [b"shoal-fuse", b"-o", ",".join(options).encode()]
        args = _FuseArgs(len(argv), (ctypes.c_char_p * (len(argv) + 1))(*argv, None), 0)
        fuse = lib.fuse_new(ctypes.byref(args), ctypes.byref(ops), ctypes.sizeof(ops), None)
        lib.fuse_opt_free_args(ctypes.byref(args))
        if not fuse:
            raise FuseUnavailable(f"fuse_new failed for {self.mountpoint} (options {options})")
        if lib.fuse_mount(fuse, os.fsencode(self.mountpoint)) != 0:
            lib.fuse_destroy(fuse)
            raise OSError(errno.EIO, f"cannot mount FUSE at {self.mountpoint} (see stderr)")
        self._lib, self._fuse, self._ops = lib, fuse, ops
        self._thread = threading.Thread(target=self._serve, name=f"fuse-{os.path.basename(self.mountpoint)}",
                                        daemon=True)
        self._thread.start()
        log.info("FUSE export of %d bytes at %s", self.file.size, self.path)

    def _serve(self) -> None:
        lib = self._lib
        cfg = lib.fuse_loop_cfg_create()
        try:
            lib.fuse_loop_cfg_set_max_threads(cfg, self.settings.max_threads)
            lib.fuse_loop_cfg_set_idle_threads(cfg, min(4, self.settings.max_threads))
            self._loop_result = lib.fuse_loop_mt_312(self._fuse, cfg)
        finally:
            lib.fuse_loop_cfg_destroy(cfg)
            lib.fuse_unmount(self._fuse)
            lib.fuse_destroy(self._fuse)

    def resize(self, size: int) -> None:
        """The device grew (or shrank) to ``size`` bytes: serve that, and make the kernel forget the file's
        cached size (``fuse_invalidate_path``; the attributes are otherwise cached for an hour), then stat it
        so the inode has the new size before a loop device asks for it."""
        self.file.size = int(size)
        if self._fuse is not None:
            self._lib.fuse_invalidate_path(self._fuse, b"/" + DISK_NAME.encode())
        os.stat(self.path)

    def stop(self, *, lazy: bool = False, timeout: float = 30.0) -> None:
        """Unmount and join the serving thread; idempotent.

        ``lazy`` detaches the mount even while the file is open (MNT_DETACH):
        the session then ends when the last user closes it.
        """
        if self._thread is None:
            return
        try:
            unmount(self.mountpoint)
        except ExportBusy:
            if not lazy:
                raise
            unmount(self.mountpoint, lazy=True)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ExportBusy(f"FUSE session at {self.mountpoint} did not end within {timeout:g} s")
        self._thread = None
        if self._loop_result not in (0, None):
            log.debug("FUSE loop at %s ended with %s", self.mountpoint, self._loop_result)

    # ------------------------------------------------------------------ callbacks

    def _operations(self, mf):
        ops = mf.fuse_operations()
        types = {name: proto for name, proto, *_ in mf.fuse_operations._fields_}
        handlers = {
            "getattr": self._getattr, "open": self._open, "read": self._read, "write": self._write,
            "flush": self._flush, "release": self._release, "fsync": self._fsync, "readdir": self._readdir,
            "truncate": self._truncate, "fallocate": self._fallocate, "statfs": self._statfs,
        }
        self._mf = mf
        for name, handler in handlers.items():
            callback = types[name](_guarded(name, handler, self._count_error))
            self._callbacks.append(callback)
            setattr(ops, name, callback)
        ops.init = types["init"](self._init)
        self._callbacks.append(ops.init)
        return ops

    def _init(self, conn, cfg):
        """Set ``fuse_config`` (libfuse 3 takes ``direct_io`` here, not as a mount option); returns NULL."""
        try:
            if cfg:
                cfg.contents.direct_io = int(self.settings.direct_io)
        except BaseException:  # noqa: BLE001 - nothing may escape into libfuse
            log.exception("FUSE init failed")
        return None

    def _getattr(self, path, buf, fip) -> int:
        st = buf.contents
        ctypes.memset(buf, 0, ctypes.sizeof(st))
        if path == b"/":
            st.st_mode, st.st_nlink = stat.S_IFDIR | 0o755, 2
        elif path == b"/" + DISK_NAME.encode():
            st.st_mode, st.st_nlink = stat.S_IFREG | 0o600, 1
            st.st_size = self.file.size
            st.st_blksize = max(self.file.block, 4096)
            st.st_blocks = -(-self.file.size // 512)
        else:
            raise _FsError(errno.ENOENT)
        st.st_uid, st.st_gid = os.getuid(), os.getgid()
        for name in ("st_atimespec", "st_mtimespec", "st_ctimespec"):
            ts = getattr(st, name)
            ts.tv_sec = int(self._started_at)
        return 0

    def _check_file(self, path) -> None:
        if path not in (None, b"/" + DISK_NAME.encode()):
            raise _FsError(errno.EISDIR if path == b"/" else errno.ENOENT)

    def _open(self, path, fip) -> int:
        self._check_file(path)
        if fip.contents.flags & os.O_TRUNC:
            raise _FsError(errno.EPERM)  # never let "> disk" empty a volume
        return 0

    def _read(self, path, buf, size, offset, fip) -> int:
        data = self.file.read(offset, size)
        _copy_into(buf, data)
        return len(data)

    def _write(self, path, buf, size, offset, fip) -> int:
        fua = bool(fip and fip.contents.flags & (os.O_DSYNC | os.O_SYNC))
        return self.file.write(offset, ctypes.string_at(buf, size), fua=fua)

    def _flush(self, path, fip) -> int:
        self.file.flush()
        return 0

    def _fsync(self, path, datasync, fip) -> int:
        self.file.flush()
        return 0

    def _release(self, path, fip) -> int:
        return 0

    def _truncate(self, path, length, fip) -> int:
        self._check_file(path)
        if length != self.file.size:
            raise _FsError(errno.EPERM)
        return 0

    def _fallocate(self, path, mode, offset, length, fip) -> int:
        self.file.fallocate(mode, offset, length)
        return 0

    def _statfs(self, path, buf) -> int:
        sv = buf.contents
        sv.f_bsize = sv.f_frsize = self.file.block
        sv.f_blocks = self.file.size // self.file.block
        sv.f_files, sv.f_namemax = 1, 255
        return 0

    def _readdir(self, path, buf, filler, offset, fip, flags) -> int:
        if path != b"/":
            raise _FsError(errno.ENOTDIR)
        for name in (b".", b"..", DISK_NAME.encode()):
            filler(buf, name, None, 0, 0)
        return 0


def _errno_for(exc: BaseException) -> int:
    """The errno a device's failure is answered with: ENOSPC where the storage has no room for the write,
    EIO for anything else (a medium or hardware error, a session gone).

    No room is the target's SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 §4.7.3.7: its thin volume's disk is
    full), which Linux's sd turns into ENOSPC as well, or ENOSPC/EDQUOT from a local file.  The loop device
    passes ENOSPC on (BLK_STS_NOSPC) and makes every errno the block layer does not know EIO, so EDQUOT is
    answered as ENOSPC.  The sense is read off the exception (``CommandFailed`` of Shoal's initiator carries
    it) so that this module needs no initiator."""
    sense = (getattr(exc, "sense_key", None), getattr(exc, "asc", None), getattr(exc, "ascq", None))
    if sense == tuple(SPACE_ALLOCATION_FAILED_WRITE_PROTECT):
        return errno.ENOSPC
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errno.ENOSPC
    return errno.EIO


def _guarded(name: str, handler, on_eio: Callable[[], None] = lambda: None):
    """Wrap a callback: our own ``_FsError`` returns its errno, any other exception ``_errno_for``'s, EIO
    counted.  No room (ENOSPC) is logged in one line and not counted: a full disk fails every write until
    space is freed, the device itself is sound, and the application is told why."""

    def call(*args):
        try:
            return handler(*args)
        except _FsError as exc:
            return -exc.code
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into libfuse
            code = _errno_for(exc)
            if code != errno.EIO:
                log.warning("FUSE %s failed: %s; answering %s", name, exc, errno.errorcode[code])
                return -code
            if _first_in_a_while((name, type(exc), str(exc)[:200])):
                log.exception("FUSE %s failed; answering EIO (the same failure again within %g s: at debug level)",
                              name, _EIO_LOG_EVERY)
            else:
                log.debug("FUSE %s failed; answering EIO", name, exc_info=True)
            on_eio()
            return -errno.EIO

    return call


_EIO_LOG_EVERY = 60.0
"""Seconds between two tracebacks of one failure (callback, exception type and text): a session gone fails
every I/O of a busy file system the same way, hundreds a second, which would flood the log."""
_eio_logged: dict[tuple, float] = {}


def _first_in_a_while(key: tuple) -> bool:
    now = time.monotonic()
    last = _eio_logged.get(key)
    if last is not None and now - last < _EIO_LOG_EVERY:
        return False
    if len(_eio_logged) > 1000:  # failures whose texts vary (offsets in them): bounded, forgetting the oldest
        _eio_logged.clear()
    _eio_logged[key] = now
    return True


def _copy_into(buf, data: memoryview) -> None:
    """Copy a byte view into a C buffer with one memmove (no copy of its own when avoidable)."""
    if not data.readonly:
        ctypes.memmove(buf, (ctypes.c_char * len(data)).from_buffer(data), len(data))
    elif isinstance(data.obj, bytes) and len(data) == len(data.obj):
        ctypes.memmove(buf, data.obj, len(data))
    else:
        ctypes.memmove(buf, data.tobytes(), len(data))


def _option_value(text: str) -> str:
    """A value safe inside a comma-separated FUSE option list."""
    return "".join(c if c.isalnum() or c in "-_.:@" else "_" for c in text)
