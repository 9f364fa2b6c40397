"""Volumes as backing files on the node's disks: create (sparse or allocated), clone, expand, delete.

A disk is a directory; volume ``ID`` lives in ``<disk>/volumes/ID.img`` with
``ID.json`` beside it (thin or not, what it was cloned from) and, once a LUN
has served it, ``ID.img.pr`` (persistent reservations, SPC-4 §5.13.5) and, while a
sanitize runs or has failed, ``ID.img.sanitize`` (``scsi.sidecar.SanitizeMark``).  The
files themselves are the record: a volume exists when its ``.img`` does, so a
restarted agent finds its volumes by listing the disks.  A new image is built
under a temporary name and renamed into place when complete, so a crash never
leaves a half-made volume behind under its real name; a delete removes the
sidecars and ``ID.json`` first and the image last, so a crash in between leaves
a volume its repeat deletes, never sidecars without a volume (and a create
removes any it finds, so a new volume never inherits reservations or a failed
sanitize of an old one of the same id).

A clone (of a volume, or of a snapshot: ``copies.Source``) is a reflink where
the filesystem shares extents; otherwise, with ``background_copies``, a
``copies.CopyJob`` fills the temporary file while the volume shows state
"copying" with its progress, and the rename happens when the copy is done.  A
clone interrupted by a restart is gone (its temporary file is removed at
start); the controller's repeat of the create starts it again.

Idempotency (agent.proto): create returns the existing volume when size,
disk, thin and source match (a clone still copying is returned as it is; a
repeat after a failed copy starts it again) and raises ``AlreadyExists``
otherwise.  The existing volume is looked up before the source: a repeat of a
clone made before is answered so after its source was deleted, or grew (a size
of 0, "as large as the source", matches any).  Delete of an unknown id
succeeds, and stops a clone still copying; expand to a size not above the
current one returns the volume as it is; a failed expand changes nothing.

A disk with a configured capacity counts as used what every file of its
``volumes`` and ``snapshots`` directories holds: volumes, snapshots, and the
temporary files of copies under way.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from node_agent.agent.copies import (COPYING, FAILED, FICLONE, READY, CopyJob, Source, WriteGuards, copy_extents,
                                     flush_ahead, quiesced_once, reflink, start_copy)
from node_agent.agent.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                     ResourceExhausted)
from node_agent.agent.records import fsync_dir, read_json, write_json
from node_agent.agent.settings import DiskSpec, check_name
from node_agent.scsi.ptpl import SUFFIX as PTPL_SUFFIX
from node_agent.scsi.sidecar import SANITIZE_SUFFIX, SanitizeMark
from node_agent.storage.backing import unshare

log = logging.getLogger("shoal.agent.volumes")

BLOCK_SIZE = 512  # the LUN's logical block size: volume sizes are whole blocks
VOLUMES_DIR, SNAPSHOTS_DIR = "volumes", "snapshots"  # a disk's directories (snapshots.py keeps the second)
__all__ = ["BLOCK_SIZE", "FICLONE", "Disk", "VolumeInfo", "VolumeManager", "check_size", "check_volume_id",
           "copy_sparse", "reflink"]


@dataclass(frozen=True)
class Disk:
    """A disk as the controller sees it (common.proto Disk)."""

    name: str
    path: str
    capacity: int
    free: int


@dataclass(frozen=True)
class VolumeInfo:
    """A volume on this node (agent.proto VolumeInfo)."""

    volume_id: str
    size: int
    disk: str
    path: str
    allocated: int
    thin: bool = True
    source: str = ""
    state: str = READY
    progress: float = 1.0
    message: str = ""


def check_volume_id(volume_id: str) -> str:
    """Volume ids name files and IQNs, and are the LUN's serial (VPD 0x80 holds up to 64 characters)."""
    try:
        return check_name("volume_id", volume_id)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


#: The largest size a file offset can hold (``off_t`` is signed 64-bit): larger sizes are valid uint64 on the
#: wire but no file can have them.
MAX_SIZE = (1 << 63) - BLOCK_SIZE


def check_size(size: int) -> int:
    if size <= 0:
        raise InvalidArgument("size_bytes must be positive")
    if size > MAX_SIZE:
        raise InvalidArgument(f"size_bytes {size} is larger than any file can be ({MAX_SIZE} bytes at most)")
    if size % BLOCK_SIZE:
        raise InvalidArgument(f"size_bytes {size} is not a multiple of the {BLOCK_SIZE}-byte block")
    return size


def copy_sparse(src_fd: int, dst_fd: int, length: int) -> None:
    """Copy the data extents of ``src`` (SEEK_DATA/SEEK_HOLE), leaving holes as holes."""
    copy_extents(src_fd, dst_fd, 0, length)


def _run_now(volume_id: str, fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class _Clone:
    """A clone whose background copy runs (or failed): not a volume until its image is renamed into place."""

    info: VolumeInfo
    tmp: str
    job: CopyJob | None = None


def refuse_half_erased(src: Source) -> None:
    """FailedPrecondition when a sanitize runs on the source or has failed (its ``.sanitize`` mark): a
    snapshot or clone would carry the half-erased data without the mark and serve it as if all were well."""
    mark = SanitizeMark(src.path + SANITIZE_SUFFIX)
    if mark.present():
        raise FailedPrecondition(f"{src.name} is being sanitized, or its sanitize failed ({mark.describe()}): "
                                 "it is no copy source until a SANITIZE completes or EXIT FAILURE MODE ends "
                                 "the failed state")


class VolumeManager:
    """The volumes on this node's disks."""

    def __init__(self, disks: Sequence[DiskSpec], *, statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.time, guards: WriteGuards | None = None,
                 background_copies: bool = False, use_reflink: bool = True,
                 reflink_fn: Callable[[int, int], bool] = reflink, copy_pace: Callable[[], None] | None = None):
        if not disks:
            raise ValueError("a node agent needs at least one disk")
        self.specs = {spec.name: spec for spec in disks}
        self.statvfs = statvfs
        self.clock = clock
        self.guards = guards or WriteGuards()
        self.background_copies = background_copies
        """False: a clone's full copy finishes inside ``create`` (tests, tools); True: it runs in the background."""
        self.use_reflink = use_reflink
        self.reflink_fn = reflink_fn
        self.copy_pace = copy_pace
        """Called by a background copy before each chunk (a throttle); None: full speed."""
        # Runs a copy's start while nothing writes the source volume; the exports (built on these volumes)
        # put in ``ExportManager.quiesced`` so an exported volume's LUN is held still meanwhile.
        self.quiesce: Callable[[str, Callable[[], Any]], Any] = _run_now
        self._clones: dict[str, _Clone] = {}
        self._lock = threading.RLock()
        for spec in disks:
            os.makedirs(self._dir(spec), exist_ok=True)
            self._clean_partial(spec)

    # ------------------------------------------------------------------ queries

    def disks(self) -> list[Disk]:
        return [self._disk(spec) for spec in self.specs.values()]

    def get(self, volume_id: str) -> VolumeInfo | None:
        """A volume that is ready (its image in place), or None."""
        for spec in self.specs.values():
            info = self._info(spec, volume_id)
            if info is not None:
                return info
        return None

    def lookup(self, volume_id: str) -> VolumeInfo | None:
        """A ready volume, or a clone still copying (or failed), or None."""
        with self._lock:
            clone = self._clones.get(volume_id)
            if clone is not None:
                return self._clone_info(clone)
        return self.get(volume_id)

    def require(self, volume_id: str) -> VolumeInfo:
        """A ready volume; ``FailedPrecondition`` for a clone still copying, ``NotFound`` when absent."""
        info = self.get(volume_id)
        if info is not None:
            return info
        pending = self.lookup(volume_id)
        if pending is not None:
            raise FailedPrecondition(f"volume {volume_id} is a clone still being copied ({pending.progress:.0%})"
                                     if pending.state == COPYING else
                                     f"volume {volume_id} is a clone whose copy failed ({pending.message}): "
                                     "delete it, or create it again to retry")
        raise NotFound(f"volume {volume_id} does not exist on this node")

    def list(self) -> list[VolumeInfo]:
        """Ready volumes and clones being copied (or failed), by id."""
        found = {}
        for spec in self.specs.values():
            for name in sorted(os.listdir(self._dir(spec))):
                if name.endswith(".img") and not name.startswith("."):
                    info = self._info(spec, name[:-4])
                    if info is not None:
                        found[info.volume_id] = info
        with self._lock:
            for volume_id, clone in self._clones.items():
                found.setdefault(volume_id, self._clone_info(clone))
        return [found[k] for k in sorted(found)]

    def source(self, volume_id: str) -> Source:
        """A ready volume as the source of a copy (its LUN's writes are guarded while the copy runs)."""
        info = self.require(volume_id)
        return Source(volume_id, info.path, info.size, guard=volume_id)

    def copying_from(self, source_name: str) -> list[str]:
        """Ids of clones whose copy still reads ``source_name`` (a volume id or ``snapshot:ID``)."""
        with self._lock:
            return sorted(c.info.volume_id for c in self._clones.values()
                          if c.info.source == source_name and c.info.state == COPYING)

    def existing(self, volume_id: str, size: int, disk: str, thin: bool, source: str) -> VolumeInfo | None:
        """What a repeat of ``create`` finds: the volume as it is (a clone still copying too), or None when
        there is none or its copy failed (the create starts it again); ``AlreadyExists`` when it was made with
        other arguments.  ``source`` is only a name here (a volume id, or ``snapshot:ID``): a clone made before
        is found whatever became of its source since."""
        info = self.lookup(volume_id)
        if info is None:
            return None
        self._compatible(info, size, disk, thin, source)
        return info if info.state != FAILED else None

    # ------------------------------------------------------------------ changes

    def create(self, volume_id: str, size: int, disk: str = "", thin: bool = True,
               source: str | Source = "") -> VolumeInfo:
        """Create the backing file, or a clone of ``source`` (a volume id, or a ``Source``); see the module
        docstring for what a repeat does."""
        check_volume_id(volume_id)
        source_name = source if isinstance(source, str) else source.name
        if size or not source_name:
            check_size(size)
        spec = self._spec(disk)
        existing = self.existing(volume_id, size, disk, thin, source_name)
        if existing is not None:
            return existing
        src = (self.source(source) if source else None) if isinstance(source, str) else source
        if src is not None and size == 0:
            size = src.size
        with self._lock:
            failed = self._clones.get(volume_id)
        if failed is not None:  # a clone whose copy failed: start it again, on its disk
            self._drop_clone(volume_id)
            spec = self.specs[failed.info.disk]
        if src is not None:
            refuse_half_erased(src)
        if src is not None and size < src.size:
            raise InvalidArgument(f"a clone of {source_name} needs at least its {src.size} bytes, not {size}")
        if not thin:
            free = self._disk(spec).free
            if size > free:
                raise ResourceExhausted(f"disk {spec.name} has {free} bytes free, volume {volume_id} needs {size}")
        path = self._image(spec, volume_id)
        tmp = self._tmp(spec, volume_id)
        self._drop_sidecars(path)  # an old volume's of this id, an older agent's delete left: never this one's
        try:
            write_json(self._meta(spec, volume_id),
                       {"thin": thin, "source": source_name, "created_at": self.clock()}, mode=0o600)
            if src is not None:
                job = self._start_clone(volume_id, spec, tmp, size, thin, src)
                if job is not None:
                    return self._wait_or_report(volume_id, job)
            else:
                self._build(tmp, size, thin)
                os.replace(tmp, path)
                fsync_dir(self._dir(spec))
        except BaseException as exc:
            _unlink(tmp)
            _unlink(self._meta(spec, volume_id))
            if src is not None:
                raise_if_source_gone(exc, src, f"clone {volume_id}")
            raise _space_error(exc, spec.name, f"creating volume {volume_id}", size) from None
        log.info("created volume %s: %d bytes on disk %s (%s%s)", volume_id, size, spec.name,
                 "thin" if thin else "allocated", f", reflinked from {source_name}" if src else "")
        return self.require(volume_id)

    def delete(self, volume_id: str) -> bool:
        """Remove the volume's files (stopping a clone still copying); False when there was nothing to remove.
        ``FailedPrecondition`` while a snapshot or clone is being copied from it."""
        check_volume_id(volume_id)
        readers = self.guards.readers(volume_id)
        if readers:
            raise FailedPrecondition(f"volume {volume_id} is being copied ({', '.join(j.key for j in readers)}): "
                                     "wait for the copy, or delete the snapshot or clone first")
        if self._drop_clone(volume_id):
            log.info("deleted volume %s (a clone still copying: its copy stopped)", volume_id)
            return True
        info = self.get(volume_id)
        if info is None:
            return False
        spec = self.specs[info.disk]
        # The image last: until it goes the volume exists, and a repeat after a crash finishes the delete.
        self._drop_sidecars(info.path)
        _unlink(self._meta(spec, volume_id))
        _unlink(info.path)
        fsync_dir(self._dir(spec))
        log.info("deleted volume %s from disk %s", volume_id, info.disk)
        return True

    def expand(self, volume_id: str, size: int) -> VolumeInfo:
        """Grow the backing file to ``size``; never shrinks (a smaller size returns the volume as is)."""
        check_volume_id(volume_id)
        check_size(size)
        info = self.require(volume_id)
        if size <= info.size:
            return info
        if not info.thin:  # as create: the new part is allocated now, within the disk's free space
            free = self._disk(self.specs[info.disk]).free
            if size - info.size > free:
                raise ResourceExhausted(f"disk {info.disk} has {free} bytes free, growing volume {volume_id} "
                                        f"to {size} bytes needs {size - info.size}")
        try:
            fd = os.open(info.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    if info.thin:
                        os.ftruncate(fd, size)
                    else:
                        os.posix_fallocate(fd, info.size, size - info.size)
                    os.fsync(fd)
                except BaseException:
                    # A failed expand changes nothing: a posix_fallocate that ran out of space has grown the
                    # file part of the way and holds what it got (the disk full); this releases it.
                    os.ftruncate(fd, info.size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"disk {info.disk} has no room to grow volume {volume_id} "
                                        f"to {size} bytes") from None
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(f"{size} bytes is too large for disk {info.disk}'s filesystem") from None
            raise
        log.info("expanded volume %s: %d -> %d bytes", volume_id, info.size, size)
        return self.require(volume_id)

    def close(self) -> None:
        """Stop every background copy (their clones are gone; the controller starts them again)."""
        with self._lock:
            clones = list(self._clones.values())
        for clone in clones:
            if clone.job is not None:
                clone.job.cancel()

    # ------------------------------------------------------------------ clones

    def _start_clone(self, volume_id: str, spec: DiskSpec, tmp: str, size: int, thin: bool,
                     src: Source) -> CopyJob | None:
        """Reflink (done: the image is in place, None returned) or start the background copy (its job)."""
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, src.size)
        finally:
            os.close(fd)
        info = VolumeInfo(volume_id, size, spec.name, self._image(spec, volume_id), 0, thin, src.name, COPYING, 0.0)
        clone = _Clone(info, tmp)
        with self._lock:
            self._clones[volume_id] = clone
        try:
            flush_ahead(src)  # the bulk of the flush while the LUN runs on
            job = quiesced_once(self.quiesce, src.guard, lambda: start_copy(
                src, tmp, guards=self.guards, key=f"clone {volume_id}", use_reflink=self.use_reflink,
                reflink_fn=self.reflink_fn, pace=self.copy_pace, on_done=lambda job: self._clone_done(clone, job)))
        except BaseException:
            with self._lock:
                self._clones.pop(volume_id, None)
            raise
        if job is None:  # reflinked: finish now
            with self._lock:
                self._clones.pop(volume_id, None)
            self._finish_image(tmp, size, thin, spec, volume_id)
            return None
        clone.job = job
        log.info("clone %s of %s: copying %d bytes in the background (no reflink on disk %s)", volume_id,
                 src.name, src.size, spec.name)
        return job

    def _wait_or_report(self, volume_id: str, job: CopyJob) -> VolumeInfo:
        if not self.background_copies:
            job.wait()
            info = self.lookup(volume_id)
            if info is not None and info.state == FAILED:
                raise OSError(errno.EIO, info.message)
        info = self.lookup(volume_id)
        assert info is not None
        return info

    def _clone_done(self, clone: _Clone, job: CopyJob) -> None:
        """On the copy's thread: put the image in place, or record why it failed."""
        volume_id, spec = clone.info.volume_id, self.specs[clone.info.disk]
        with self._lock:
            if self._clones.get(volume_id) is not clone:
                return  # deleted (or restarted) meanwhile
            if job.state == READY:
                try:
                    self._finish_image(clone.tmp, clone.info.size, clone.info.thin, spec, volume_id)
                except OSError as exc:
                    job.state, job.message = FAILED, str(_space_error(exc, spec.name,
                                                                      f"finishing clone {volume_id}",
                                                                      clone.info.size))
                else:
                    del self._clones[volume_id]
                    log.info("clone %s of %s: copy done", volume_id, clone.info.source)
                    return
            _unlink(clone.tmp)
            _unlink(self._meta(spec, volume_id))  # kept in memory until a delete, or a repeat starts it again
            clone.info = replace(clone.info, state=FAILED, message=job.message)

    def _finish_image(self, tmp: str, size: int, thin: bool, spec: DiskSpec, volume_id: str) -> None:
        fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if not thin:
                # A reflinked clone shares its source's blocks, which posix_fallocate counts as allocated: a
                # write to them would need new space later, and could fail for want of it.
                unshare(fd, 0, size)
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._image(spec, volume_id))
        fsync_dir(self._dir(spec))

    def _drop_clone(self, volume_id: str) -> bool:
        with self._lock:
            clone = self._clones.pop(volume_id, None)
        if clone is None:
            return False
        if clone.job is not None:
            clone.job.cancel()
        spec = self.specs[clone.info.disk]
        _unlink(clone.tmp)
        _unlink(self._meta(spec, volume_id))
        return True

    def _clone_info(self, clone: _Clone) -> VolumeInfo:
        info = clone.info
        if info.state == COPYING and clone.job is not None:
            info = replace(info, progress=clone.job.progress)
        return info

    # ------------------------------------------------------------------ helpers

    def _compatible(self, existing: VolumeInfo, size: int, disk: str, thin: bool, source: str) -> None:
        """``AlreadyExists`` unless the arguments describe ``existing`` (agent.proto): its size (0, a clone's
        "as large as the source": any), disk (empty: any), thin or not, and source (empty: none, not any)."""
        if ((size and existing.size != size) or (disk and existing.disk != disk) or existing.thin != thin
                or existing.source != source):
            asked = f"{size} bytes" if size else "the source's size"
            raise AlreadyExists(
                f"volume {existing.volume_id} exists with {existing.size} bytes on disk {existing.disk} "
                f"({_kind(existing.thin, existing.source)}); asked for {asked} on disk {disk or 'any'} "
                f"({_kind(thin, source)}): delete it first or use another id")

    @staticmethod
    def _drop_sidecars(path: str) -> None:
        """The image's persistent reservations and sanitize mark (scsi.ptpl, scsi.sidecar)."""
        _unlink(path + PTPL_SUFFIX)
        _unlink(path + SANITIZE_SUFFIX)

    def _build(self, tmp: str, size: int, thin: bool) -> None:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if not thin:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _spec(self, disk: str) -> DiskSpec:
        if not disk:
            return max(self.specs.values(), key=lambda spec: self._disk(spec).free)
        spec = self.specs.get(disk)
        if spec is None:
            raise NotFound(f"no disk {disk!r} on this node (disks: {', '.join(sorted(self.specs))})")
        return spec

    def _disk(self, spec: DiskSpec) -> Disk:
        st = self.statvfs(spec.path)
        fs_capacity, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if spec.capacity is None:
            return Disk(spec.name, spec.path, fs_capacity, fs_free)
        used = sum(_allocated(os.path.join(spec.path, name)) for name in (VOLUMES_DIR, SNAPSHOTS_DIR))
        return Disk(spec.name, spec.path, spec.capacity, max(0, min(fs_free, spec.capacity - used)))

    def _info(self, spec: DiskSpec, volume_id: str) -> VolumeInfo | None:
        path = self._image(spec, volume_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        meta = read_json(self._meta(spec, volume_id), {})
        return VolumeInfo(volume_id, st.st_size, spec.name, path, st.st_blocks * 512,
                          bool(meta.get("thin", True)), str(meta.get("source", "")))

    def _clean_partial(self, spec: DiskSpec) -> None:
        """Remove what a create or clone interrupted by a stop left (``.ID.img.creating`` and its meta)."""
        directory = self._dir(spec)
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".img.creating"):
                volume_id = name[1:-len(".img.creating")]
                log.warning("removing %s: a create of volume %s was interrupted", name, volume_id)
                _unlink(os.path.join(directory, name))
                if not os.path.exists(self._image(spec, volume_id)):
                    _unlink(self._meta(spec, volume_id))

    @staticmethod
    def _dir(spec: DiskSpec) -> str:
        return os.path.join(spec.path, VOLUMES_DIR)

    def _image(self, spec: DiskSpec, volume_id: str) -> str:
        return os.path.join(self._dir(spec), f"{volume_id}.img")

    def _tmp(self, spec: DiskSpec, volume_id: str) -> str:
        return os.path.join(self._dir(spec), f".{volume_id}.img.creating")

    def _meta(self, spec: DiskSpec, volume_id: str) -> str:
        return os.path.join(self._dir(spec), f"{volume_id}.json")


def raise_if_source_gone(exc: BaseException, src: Source, what: str) -> None:
    """NotFound when ``exc`` came of the source's file having been deleted (the volume deleted between the
    lookup of the source and the copy's start): what a retry will answer, not an internal error."""
    if isinstance(exc, FileNotFoundError) and not os.path.exists(src.path):
        raise NotFound(f"{src.name}, the source of {what}, was deleted meanwhile") from None


def _space_error(exc: BaseException, disk: str, doing: str, size: int) -> BaseException:
    """ENOSPC/EDQUOT as ``ResourceExhausted``, EFBIG as ``InvalidArgument``; anything else as it is."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"disk {disk} ran out of space {doing}")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return InvalidArgument(f"{size} bytes is too large for disk {disk}'s filesystem")
    return exc


def _kind(thin: bool, source: str) -> str:
    return ("thin" if thin else "fully allocated") + (f", clone of {source}" if source else "")


def _allocated(directory: str) -> int:
    """Bytes the files of ``directory`` hold (extents a reflink shares count in each file: an overstatement,
    on the safe side)."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass  # removed meanwhile (a copy finished, a delete)
    return total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
