"""Point-in-time copies of backing files: a reflink where the filesystem shares extents, else a background copy.

A snapshot or a clone starts as ``copy_image(source, tmp)``:

* **reflink** (FICLONE): the new file shares the source's extents at once; done
  before the call returns.
* **background copy**: a ``CopyJob`` thread copies the source chunk by chunk
  (data extents only, holes stay holes) and reports its progress.  The copy is
  still of the source *as it was when the job started*: while it runs, a
  write to the source's LUN first copies the chunks it is about to change
  (copy-before-write, as a device-mapper snapshot does).  ``WriteGuards`` is
  where the jobs of a volume are found; ``guarded`` wraps the backing store of
  every LUN the agent exports and asks the guards before each write (plain,
  gathered or handed to a worker thread) and punch (UNMAP, WRITE SAME); a
  write that would have to copy first goes to a worker, as I/O that would
  block does, so the portal's other sessions go on meanwhile.  A chunk that
  cannot be saved (the copy's disk full) fails the copy, never the write: as
  a device-mapper snapshot that overflows, the snapshot or clone is then lost
  ("error"), and the volume's guest sees nothing of it.

The point in time is taken by ``start`` while nothing else writes the source:
the caller runs it on the iSCSI portal's event loop when the volume is exported
(``ExportManager.quiesced``), once the LUN's I/O on worker threads has finished
and with what a worker picks up meanwhile held back, so no SCSI command runs
between the flush (fdatasync) and the reflink or the registration of the job's
guard (``quiesced_once``: a start its caller gave up waiting for never runs).  That
makes a snapshot of an attached volume crash-consistent: it holds every write
acknowledged before it and none after, as a power cut would.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from node_agent.agent.errors import Unavailable

log = logging.getLogger("shoal.agent.copies")
T = TypeVar("T")

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h: share all extents of another file (reflink)
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM)
CHUNK = 1 << 20  # copy-before-write granularity: a write waits for at most a few of these
_COPY_STEP = 64 << 20
_DROP_EVERY = 16  # chunks a background copy writes between two _drop_cached of what it wrote

# Copy states (agent.proto VolumeInfo.state / SnapshotInfo.state).
READY = "ready"
COPYING = "copying"
FAILED = "error"


def _drop_cached(fd: int, start: int, end: int) -> None:
    """Ask the kernel to drop ``[start, end)`` of a file from the page cache (0, 0: all of it); the part
    still dirty is sent to disk now and dropped by the next call over it.

    A background copy writes a whole volume through the page cache, and reads its source through it: kept
    there, the copy would push the running guests' data out of the cache, and (on kernels that cache ext4
    files in large folios, 6.16 and later) leave the new volume, and the source's parts its guest never
    read, in large folios, into which each small random write later costs the kernel more (tests/perf/
    README.md, "Random 4 KiB writes into large page-cache folios").  So the copy drops what it wrote, and
    what it read of the source where nothing was cached before (``CopyJob._cold``), as OpenStack's volume
    copies with ``dd iflag=direct oflag=direct`` keep the cache clean, without waiting for each write.
    Advice only: a kernel or filesystem that ignores it changes nothing."""
    try:
        os.posix_fadvise(fd, start, end - start if end else 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("posix_fadvise(DONTNEED) of a copy: %s", exc)


def _runs(flags: bytearray, chunk: int, length: int):
    """(start, end) byte ranges of the runs of chunks whose flag is 1."""
    index, count = 0, len(flags)
    while index < count:
        if not flags[index]:
            index += 1
            continue
        first = index
        while index < count and flags[index]:
            index += 1
        yield first * chunk, min(index * chunk, length)


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_NR_CACHESTAT = 451  # the same on every architecture's unified syscall table (Linux 6.5)
_libc = ctypes.CDLL(None, use_errno=True)
_cachestat_works = True


def cache_stat(fd: int, start: int = 0, length: int = 0) -> _CacheStat | None:
    """Page-cache counts (``cache``, ``dirty``, ``writeback``, ... in pages) of ``[start, start+length)`` of
    ``fd``'s file (length 0: to its end), from ``cachestat`` (Linux 6.5 and later); None where the kernel
    cannot say."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    stat_ = _CacheStat()
    if _libc.syscall(_NR_CACHESTAT, fd, ctypes.byref(_CacheRange(start, length)), ctypes.byref(stat_), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an older kernel, or a seccomp filter
            _cachestat_works = False
        return None
    return stat_


def cached_pages(fd: int, start: int, length: int) -> int | None:
    """Pages of ``[start, start+length)`` of ``fd``'s file in the page cache; None where the kernel cannot
    say (or ``length`` is not positive)."""
    stat_ = cache_stat(fd, start, length) if length > 0 else None
    return None if stat_ is None else stat_.cache


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst`` share ``src``'s extents (btrfs, XFS with reflink, bcachefs); False where unsupported."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise


def copy_extents(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Copy the data extents of ``src`` in ``[start, end)`` to the same offsets of ``dst`` (SEEK_DATA/SEEK_HOLE);
    holes are left as holes (``dst`` is expected to be sparse there)."""
    offset = start
    while offset < end:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            data = offset  # no SEEK_DATA: copy everything
        if data >= end:
            return
        try:
            hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        pos = data
        while pos < hole:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(_COPY_STEP, hole - pos), pos, pos)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                n = _copy_by_hand(src_fd, dst_fd, pos, min(_COPY_STEP, hole - pos))
            if n <= 0:
                raise OSError(errno.EIO, "copy_file_range made no progress")
            pos += n
        offset = hole


_NO_COPY_RANGE = (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
"""``copy_file_range`` cannot copy between these two files: two filesystems (EXDEV: the kernel refuses that
between most filesystems since 5.19), or one that does not support it."""


def _copy_by_hand(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    """``length`` bytes at ``offset`` through user memory, 1 MiB at a time; the bytes copied."""
    done = 0
    while done < length:
        chunk = os.pread(src_fd, min(1 << 20, length - done), offset + done)
        if not chunk:
            break  # the source ended early (truncated meanwhile): the caller sees no progress
        view = memoryview(chunk)
        while view:
            written = os.pwrite(dst_fd, view, offset + done)
            view = view[written:]
            done += written
    return done


@dataclass(frozen=True)
class Source:
    """What a copy is made of: a volume (whose LUN may be written meanwhile) or a snapshot (read-only)."""

    name: str
    """What the copy's record says it came from: a volume id, or ``snapshot:ID``."""
    path: str
    size: int
    guard: str = ""
    """The volume id whose exported LUN must copy before writing while a background copy runs ("" for a
    snapshot: nothing writes it)."""


class CopyJob:
    """A background copy of ``src_path`` (its first ``length`` bytes) into ``dst_path``; see the module docstring.

    ``on_done(job)`` runs on the job's thread once it finished, failed or was
    cancelled (``state`` says which).  ``pace()``, if given, is called before
    each chunk, outside the lock: a throttle.  Chunks are copied under ``_lock``, by
    the thread or by ``before_write``; ``_copied`` says which are done.
    """

    def __init__(self, key: str, src_path: str, dst_path: str, length: int, *,
                 on_done: Callable[["CopyJob"], None], chunk: int = CHUNK,
                 pace: Callable[[], None] | None = None):
        self.key = key
        self._pace = pace
        self.length = length
        self.chunk = chunk
        self.state = COPYING
        self.message = ""
        self._on_done = on_done
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._copied = bytearray((length + chunk - 1) // chunk)
        self._done_chunks = 0
        self._src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._dst = os.open(dst_path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self._src)
            raise
        self._thread = threading.Thread(target=self._run, name=f"copy-{key}", daemon=True)

    def __repr__(self) -> str:
        return f"CopyJob({self.key!r}, {self.state}, {self.progress:.0%})"

    @property
    def progress(self) -> float:
        if self.state == READY or not self._copied:
            return 1.0
        return self._done_chunks / len(self._copied)

    def start(self) -> None:
        self._thread.start()

    def cancel(self, timeout: float = 30.0) -> None:
        """Stop the copy (it ends in state ``error``) and wait for the thread."""
        self._cancel.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def would_copy(self, offset: int, length: int) -> bool:
        """Whether ``before_write(offset, length)`` would copy anything (read without the lock: a chunk
        marked copied stays copied)."""
        if self.state != COPYING or length <= 0 or offset >= self.length:
            return False
        first, last = offset // self.chunk, (min(offset + length, self.length) - 1) // self.chunk
        return not all(self._copied[first:last + 1])

    def before_write(self, offset: int, length: int) -> None:
        """The source is about to change ``[offset, offset+length)``: copy those chunks first (old data).

        Never raises for the copy's sake: a chunk that cannot be saved (the copy's disk full, an I/O error
        on it) fails the copy, not the write, as a device-mapper snapshot is invalidated when it overflows;
        the write then goes ahead (``_copy_chunk``)."""
        if self.state != COPYING or length <= 0 or offset >= self.length:
            return
        first, last = offset // self.chunk, (min(offset + length, self.length) - 1) // self.chunk
        for index in range(first, last + 1):
            if not self._copied[index]:
                self._copy_chunk(index, before_write=True)

    def _copy_chunk(self, index: int, tidy_source: bool = False, *, before_write: bool = False) -> None:
        """Copy chunk ``index`` unless done (or the copy failed).  ``tidy_source``: drop from the page cache
        what reading the source's chunk brought in (a chunk none of which was cached when the copy began: see
        ``_cold``); a chunk saved before a write is in use, and stays.  ``before_write``: an ``OSError``
        fails the job (state, message, cancel: the thread stops at its next chunk) instead of being raised
        into the write, which then changes the source under a copy that can never be complete."""
        with self._lock:
            if self._copied[index] or self.state != COPYING:
                return
            start = index * self.chunk
            end = min(start + self.chunk, self.length)
            try:
                copy_extents(self._src, self._dst, start, end)
            except OSError as exc:
                if not before_write:
                    raise  # the thread's own pass: _run records it
                self._fail(f"copy failed: {exc.strerror or exc} (saving bytes {start}-{end} of the source "
                           "before a write to it; the write went ahead)")
                self._cancel.set()
                log.error("copy %s failed: saving bytes %d-%d before a write: %s", self.key, start, end, exc)
                return
            if tidy_source:
                _drop_cached(self._src, start, end)
            self._copied[index] = 1
            self._done_chunks += 1

    def _fail(self, message: str) -> None:
        """Under ``_lock``: the copy failed; the first failure's message is the one kept (a cancel that
        follows, the thread's own stop, says less)."""
        if self.state == COPYING:
            self.state, self.message = FAILED, message

    def _cold(self) -> bytearray | None:
        """1 for each chunk of the source none of which is in the page cache now (None: the kernel cannot
        say).  Read before the pass, as the pass's own readahead brings the next chunks in: what the copy
        reads there is dropped again, the cached rest (the guest's working set) left alone."""
        cold = bytearray(len(self._copied))
        for index in range(len(cold)):
            start = index * self.chunk
            pages = cached_pages(self._src, start, min(self.chunk, self.length - start))
            if pages is None:
                return None
            cold[index] = pages == 0
        return cold

    def _run(self) -> None:
        try:
            advised = 0  # [0, advised): written back already asked for by an earlier _drop_cached
            cold = self._cold()
            for index in range(len(self._copied)):
                if self._pace is not None:
                    self._pace()  # outside the lock: a write to the source never waits for it
                if self._cancel.is_set():
                    raise InterruptedError("the copy was cancelled")
                self._copy_chunk(index, tidy_source=cold is not None and cold[index] == 1)
                if (index + 1) % _DROP_EVERY == 0:
                    end = (index + 1) * self.chunk
                    _drop_cached(self._dst, max(0, advised - _DROP_EVERY * self.chunk), end)
                    advised = end
            os.fsync(self._dst)
            _drop_cached(self._dst, 0, 0)  # all of it written now: every page goes
            if cold is not None:  # again, in whole runs of cold chunks: readahead's large folios that
                for start, end in _runs(cold, self.chunk, self.length):  # straddle two chunks go only so
                    _drop_cached(self._src, start, end)
            with self._lock:
                if self.state == COPYING:  # not when a chunk saved before a write failed meanwhile: the
                    self.state = READY     # pass skipped it (and the rest), and the write changed it
        except BaseException as exc:  # reported through state/message; the thread ends here
            with self._lock:
                self._fail(f"copy failed: {exc.strerror or exc}" if isinstance(exc, OSError)
                           and not isinstance(exc, InterruptedError) else str(exc))
            if not isinstance(exc, InterruptedError):
                log.error("copy %s failed: %s", self.key, exc)
        finally:
            os.close(self._src)
            os.close(self._dst)
        try:
            self._on_done(self)
        except Exception:
            log.exception("finishing copy %s failed", self.key)


class WriteGuards:
    """The background copies reading each volume, consulted before its LUN is written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[CopyJob, ...]] = {}

    def add(self, volume_id: str, job: CopyJob) -> None:
        with self._lock:
            self._jobs[volume_id] = self._jobs.get(volume_id, ()) + (job,)

    def remove(self, volume_id: str, job: CopyJob) -> None:
        with self._lock:
            jobs = tuple(j for j in self._jobs.get(volume_id, ()) if j is not job)
            if jobs:
                self._jobs[volume_id] = jobs
            else:
                self._jobs.pop(volume_id, None)

    def readers(self, volume_id: str) -> tuple[CopyJob, ...]:
        return self._jobs.get(volume_id, ())

    def before_write(self, volume_id: str, offset: int, length: int) -> None:
        for job in self._jobs.get(volume_id, ()):  # a tuple: safe to read without the lock
            job.before_write(offset, length)

    def would_copy(self, volume_id: str, offset: int, length: int) -> bool:
        """Whether a write of ``[offset, offset+length)`` must first wait for a copy of the old data."""
        jobs = self._jobs.get(volume_id)  # None almost always: asked on every write of an exported volume
        return jobs is not None and any(job.would_copy(offset, length) for job in jobs)


class GuardedBacking:
    """A LUN's backing store that lets the volume's background copies save what a write would change.

    Reads and everything else go straight to the wrapped store (a decorator,
    not a subclass, so it fits any ``BackingStore``).
    """

    def __init__(self, inner, volume_id: str, guards: WriteGuards):
        self._inner = inner
        self._volume_id = volume_id
        self._guards = guards

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._guards.before_write(self._volume_id, offset, len(data))
        self._inner.write(offset, data, fua)

    def punch(self, offset: int, length: int) -> None:
        self._guards.before_write(self._volume_id, offset, length)
        self._inner.punch(offset, length)


class GuardedNowaitBacking(GuardedBacking):
    """``GuardedBacking`` of a store with non-blocking I/O (``read_nowait``/``write_nowait``), which it offers
    too, so that the LUN takes part in the target's hand-off of I/O that would block (a cold read, a FUA
    write, SYNCHRONIZE CACHE, a write that a background copy must first save the old data of): those run
    on a worker thread, and a slow volume does not stall the portal's other sessions.

    A deferred write runs the guarded ``write`` on its worker.  ``ExportManager.quiesced`` holds such I/O
    still (``LogicalUnit.io_paused``) while a copy takes its point in time."""

    def read_nowait(self, offset: int, length: int):
        return self._inner.read_nowait(offset, length)  # reads change nothing: not guarded

    def would_copy(self, offset: int, length: int) -> bool:
        """A write there must first save the old data for a background copy (a worker's job)."""
        return self._guards.would_copy(self._volume_id, offset, length)

    def write_nowait(self, offset: int, data, fua: bool = False) -> bool:
        if self._guards.would_copy(self._volume_id, offset, len(data)):
            return False  # the old data must be copied first: a worker does that, through ``write``
        return self._inner.write_nowait(offset, data, fua)


class GuardedGatheringBacking(GuardedNowaitBacking):
    """``GuardedNowaitBacking`` of a store that also writes adjacent WRITEs with one ``writev``."""

    @property
    def inline_writes(self) -> bool:
        """The store's answer, except while a background copy of the volume runs: then a write may have to
        wait for the copy (``write_nowait`` tells which), so ``LogicalUnit.gather_offset`` gathers none."""
        return self._inner.inline_writes and not self._guards.readers(self._volume_id)

    def writev(self, offset: int, buffers: list, length: int) -> None:
        # Gathered only while no copy runs (``inline_writes``), and copies start on the loop that gathers:
        # nothing to save here, but the guard stays, as on every write.
        self._guards.before_write(self._volume_id, offset, length)
        self._inner.writev(offset, buffers, length)


def guarded(inner, volume_id: str, guards: WriteGuards) -> GuardedBacking:
    """The guard of ``inner`` offering what ``inner``'s own class offers of non-blocking and gathered I/O."""
    kind = type(inner)
    if not (hasattr(kind, "read_nowait") and hasattr(kind, "write_nowait")):
        return GuardedBacking(inner, volume_id, guards)
    if hasattr(kind, "writev"):
        return GuardedGatheringBacking(inner, volume_id, guards)
    return GuardedNowaitBacking(inner, volume_id, guards)


def flush_ahead(source: Source) -> None:
    """fdatasync the file of a volume about to be copied, while its LUN still runs: ``start_copy``'s own
    flush, which runs with the LUN held still (for an exported volume on the portal's event loop, where
    every session of the node waits for it), then has only what was written since to write, not the
    seconds' worth a busy volume may have in the page cache.  A snapshot source (read-only) needs none."""
    if not source.guard:
        return
    fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class StartAbandoned(Exception):
    """A copy's start reached after its caller gave up waiting for it (``quiesced_once``): not run."""


class _Once(Generic[T]):
    """``fn`` run at most once, and not at all once ``give_up`` came first."""

    def __init__(self, fn: Callable[[], T]):
        self._fn = fn
        self._lock = threading.Lock()
        self._began = self._abandoned = False
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> T:
        with self._lock:
            if self._abandoned:
                log.warning("a copy's start was reached after its caller gave up waiting for it: not started")
                raise StartAbandoned("its caller gave up waiting for it")
            self._began = True
        try:
            self._result = self._fn()
            return self._result
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._done.set()

    def give_up(self) -> bool:
        """True: ``fn`` has not begun, and now never will; False: it ran, or runs now (see ``outcome``)."""
        with self._lock:
            self._abandoned = not self._began
            return self._abandoned

    def outcome(self) -> T:
        """What ``fn`` returned (or raised), once it has ended."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def quiesced_once(quiesce: Callable[[str, Callable[[], T]], T], volume_id: str, fn: Callable[[], T]) -> T:
    """``quiesce(volume_id, fn)`` for a copy's start (``start_copy``), where ``fn`` runs only while this call
    still waits for it.

    ``quiesce`` can give up with ``fn`` still queued: ``PortalThread.call_within`` raises TimeoutError and
    leaves it on the portal's loop.  The caller then removes the copy's file and record, and the controller's
    retry may make them again before the loop gets to ``fn``; run then, the stale start would copy (or
    reflink) another point in time into the retry's file, and its end would rename or fail the retry's
    copy.  So ``fn`` refuses to run (``StartAbandoned``, on the loop, to nobody) once this call has given
    up; and if it had begun by then, this call waits for it and its outcome is the call's, so that nothing
    it started runs on unowned."""
    once = _Once(fn)
    try:
        return quiesce(volume_id, once.run)
    except BaseException as exc:
        if once.give_up():  # never ran, and never will
            if isinstance(exc, TimeoutError):  # the portal was busy (long I/O on a worker): worth a retry
                raise Unavailable(f"volume {volume_id}: the iSCSI portal did not get to the copy's start in time "
                                  "(busy with I/O); nothing was made: retry") from None
            raise
        return once.outcome()


def start_copy(source: Source, dst_path: str, *, guards: WriteGuards, key: str,
               on_done: Callable[[CopyJob], None], use_reflink: bool = True,
               reflink_fn: Callable[[int, int], bool] = reflink,
               pace: Callable[[], None] | None = None) -> CopyJob | None:
    """Take the point in time of ``source`` into ``dst_path`` (an existing file of ``source.size`` bytes).

    Returns None when a reflink made the copy (complete, flushed), else a
    started ``CopyJob`` registered with ``guards`` for ``source.guard``.  The
    source is flushed (fdatasync) first.  Run it where no write to the source
    can interleave (see the module docstring), after ``flush_ahead``.
    """
    src_fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(src_fd)  # what the LUN acknowledged is in the file, not only in the page cache
        if use_reflink:
            dst_fd = os.open(dst_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if reflink_fn(src_fd, dst_fd):
                    os.ftruncate(dst_fd, source.size)
                    os.fsync(dst_fd)
                    return None
            finally:
                os.close(dst_fd)
    finally:
        os.close(src_fd)

    def finished(job: CopyJob) -> None:
        if source.guard:
            guards.remove(source.guard, job)
        on_done(job)

    job = CopyJob(key, source.path, dst_path, source.size, on_done=finished, pace=pace)
    if source.guard:
        guards.add(source.guard, job)
    job.start()
    return job
