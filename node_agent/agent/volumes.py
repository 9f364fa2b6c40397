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
temporary files of copies under way.  A fully allocated create or expand holds
the disk's lock from its free-space check until the space is allocated (a thick
clone's, when its image is finished), so creates of different ids that run at
once cannot all pass the check and overcommit the disk together.

A failed create leaves nothing: an error after the image was renamed into
place (an fsync of the directory failing, a dying disk) removes the image too,
before its ``ID.json``.  An image without its record would be a volume that
looks thin and made from no source, and the create's repeat would be refused
where agent.proto says it creates the volume.

A volume whose ``ID.json`` cannot be read (empty, not JSON, not an object, a
field of the wrong type: a filesystem repaired after a crash, a hand edit) is
listed in state "error", its message naming the file; it is not exported
(``ExportManager.restore`` keeps its export unserved), cloned, snapshotted or
grown (``FailedPrecondition`` naming the file) until the file is repaired, and
can be deleted.  The node's other volumes are not affected.

What a stop can leave is looked at when the agent starts (``_clean_partial``):
the temporary file of an interrupted create or clone goes with its ``ID.json``;
the ``*.tmp`` of an atomic write the stop cut (a record, a LUN's reservations)
goes, the file it was to replace being whole; the rest is data or may be, and
is only reported.  An ``ID.json`` whose image is missing (the image deleted or
lost, or a create stopped between its record and its image) is a volume in
state "error" whose message says so: not served, deletable, and made afresh by
a create of its id (there is no image to write over).  An image without its
``ID.json`` (a delete stopped between the two, which its repeat finishes; an
agent from before records) is served as before, a thin volume made from no
source, with a warning in the log.

Disk identity (with ``state_dir``, as the agent runs): a disk's directory is
often a mount point, and a disk mounted late (or not at all, or another disk
mounted there) must not be taken for the disk: volumes made there would land on
the filesystem under the mount point and vanish once the disk is mounted.  So
the first time the agent sets a disk up it writes ``<disk>/.shoal-disk`` (the
disk's name and a random uuid) and records the uuid in ``<state_dir>/disks.json``.
At start a disk whose marker is missing, or holds another uuid, is
*unavailable*: nothing is created in its directory, its volumes are neither
listed nor served (their exports are kept unserved, ``ExportManager.restore``),
it is reported with capacity and free space 0 (common.proto Disk has no state:
the controller keeps the disk in its pools and places nothing on it), a create
on it answers ``Unavailable``, and an error in the log says what to do (mount
it and restart the agent).  Before each create, expand, lookup or listing the
disk's directory is compared (device and inode) with the one checked at start;
when it changed the marker is read again, and a disk without its marker is
unavailable from then on, until it is back: no create there, none of its
volumes found, reported with capacity 0 (what is served keeps being served).  A disk with a marker but no recorded uuid (the
agent's data directory was lost) is adopted when the marker names the same
disk.  A disk with neither (a new disk, or one an agent from before these
markers set up, volumes and all) is set up as new: its marker is written and
recorded, so an upgraded agent keeps its disks.  That cannot tell a disk that
an older agent used and that is not mounted at the upgrade from a new empty
one; the marker then lands under the mount point, and once the disk is mounted
it is refused as unmarked, whose log error says how to adopt it.  Without
``state_dir`` (tests, tools) no marker is written or checked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from node_agent.agent.copies import (COPYING, FAILED, FICLONE, READY, CopyJob, Source, WriteGuards, copy_extents,
                                     flush_ahead, quiesced_once, reflink, start_copy)
from node_agent.agent.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                     ResourceExhausted, Unavailable)
from node_agent.agent.records import (CorruptRecord, fsync_dir, read_json, remove_stale_temps,
                                      remove_temp, write_json)
from node_agent.agent.settings import DiskSpec, check_disk_paths, check_name
from node_agent.scsi.ptpl import SUFFIX as PTPL_SUFFIX
from node_agent.scsi.sidecar import SANITIZE_SUFFIX, SanitizeMark
from node_agent.storage.backing import unshare

log = logging.getLogger("shoal.agent.volumes")

BLOCK_SIZE = 512  # the LUN's logical block size: volume sizes are whole blocks
VOLUMES_DIR, SNAPSHOTS_DIR = "volumes", "snapshots"  # a disk's directories (snapshots.py keeps the second)
DISK_MARKER = ".shoal-disk"  # in a disk's directory: which disk it is (see "Disk identity" above)
DISKS_FILE = "disks.json"  # in the state directory: the uuid of each disk this agent set up
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
                 reflink_fn: Callable[[int, int], bool] = reflink, copy_pace: Callable[[], None] | None = None,
                 state_dir: str | None = None):
        if not disks:
            raise ValueError("a node agent needs at least one disk")
        check_disk_paths(disks)
        self.configured = {spec.name: spec for spec in disks}
        """Every disk given, available or not (``disks()`` reports them all)."""
        self.state_dir = state_dir
        """Where ``disks.json`` records each disk's uuid; None: disks are not checked (module docstring)."""
        self.unavailable: dict[str, str] = {}
        """Disks found not to be the disks this agent set up, at start (name -> why): not in ``specs``."""
        self._uuids: dict[str, str] = {}
        self._identity: dict[str, tuple[int, int]] = {}  # (st_dev, st_ino) of each disk's directory at start
        self._lost: dict[str, str] = {}  # disks whose directory changed since the start, and why they are refused
        # One per disk: a fully allocated create or expand holds it from the free-space check through the
        # allocation, so that two of them cannot both count the same free space.
        self._disk_locks = {spec.name: threading.Lock() for spec in disks}
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
        # Records found at start without their image (volume id -> disk name): volumes in state "error" until
        # deleted or made again (module docstring).
        self._orphans: dict[str, str] = {}
        self._lock = threading.RLock()
        if state_dir is not None:
            remove_temp(os.path.join(state_dir, DISKS_FILE))
        usable = self._check_disks(disks) if state_dir is not None else list(disks)
        self.specs = {spec.name: spec for spec in usable}
        """The disks in use; snapshots.py, too, looks only at these."""
        for spec in usable:
            os.makedirs(self._dir(spec), exist_ok=True)
            self._clean_partial(spec)
            if state_dir is not None:
                remove_temp(self._marker(spec))  # the disk's own (only a usable one's: the others are not ours)
                self._identity[spec.name] = _identity(spec.path)

    # ------------------------------------------------------------------ queries

    def disks(self) -> list[Disk]:
        """Every configured disk; an unavailable one with capacity and free space 0 (nothing goes there)."""
        return [self._disk(spec) for spec in self.configured.values()]

    def get(self, volume_id: str) -> VolumeInfo | None:
        """A volume that is ready (its image in place), or None; or a record without its image ("error"),
        unless another disk has the image."""
        orphan = None
        for spec in self._present():
            info = self._info(spec, volume_id)
            if info is not None and self._orphans.get(volume_id) == spec.name and not os.path.exists(info.path):
                orphan = orphan or info
            elif info is not None:
                return info
        return orphan

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
            if info.state == FAILED:  # on disk, yet "error": its record is unreadable (``_info``)
                raise FailedPrecondition(info.message)
            return info
        pending = self.lookup(volume_id)
        if pending is not None:
            raise FailedPrecondition(f"volume {volume_id} is a clone still being copied ({pending.progress:.0%})"
                                     if pending.state == COPYING else
                                     f"volume {volume_id} is a clone whose copy failed ({pending.message}): "
                                     "delete it, or create it again to retry")
        raise NotFound(f"volume {volume_id} does not exist on this node")

    def list(self) -> list[VolumeInfo]:
        """Ready volumes, clones being copied (or failed), and records without their image ("error"), by id."""
        found = {}
        for spec in self._present():
            for name in sorted(os.listdir(self._dir(spec))):
                if name.endswith(".img") and not name.startswith("."):
                    info = self._info(spec, name[:-4])
                    if info is not None:
                        found[info.volume_id] = info
        with self._lock:
            orphans = list(self._orphans.items())
        for volume_id, disk in orphans:
            spec = self.specs.get(disk)
            if volume_id not in found and spec is not None and not self._gone(spec):
                info = self._info(spec, volume_id)
                if info is not None:
                    found[volume_id] = info
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
        if info.state == FAILED and self._orphan(volume_id):
            return None  # a record without its image: nothing to write over, the create makes it afresh
        if info.state == FAILED and self.get(volume_id) is not None:
            # Not a failed clone (that has no image in place) but a volume whose record is unreadable: its
            # arguments cannot be compared, and making it again would write over its image.
            raise FailedPrecondition(info.message)
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
        elif not disk and self._orphans.get(volume_id) in self.specs:  # a record without its image: there too
            orphan_spec = self.specs[self._orphans[volume_id]]
            spec = orphan_spec if not self._gone(orphan_spec) else spec
        if src is not None:
            refuse_half_erased(src)
        if src is not None and size < src.size:
            raise InvalidArgument(f"a clone of {source_name} needs at least its {src.size} bytes, not {size}")
        # A thick volume: the disk's lock from the check through the allocation.  Not around a clone, whose
        # copy may run long after this returns: its check here is an early answer, and ``_finish_image``
        # checks again under the lock when it allocates.
        with self._disk_locks[spec.name] if not thin and src is None else contextlib.nullcontext():
            if not thin:
                free = self._disk(spec).free
                if size > free:
                    raise ResourceExhausted(f"disk {spec.name} has {free} bytes free, volume {volume_id} needs "
                                            f"{size}")
            path = self._image(spec, volume_id)
            tmp = self._tmp(spec, volume_id)
            self._drop_sidecars(path)  # an old volume's of this id, an older agent's delete left: never this one's
            try:
                with self._lock:
                    orphan = self._orphans.pop(volume_id, None)  # a record without its image: written anew
                if orphan is not None and orphan != spec.name:
                    # The id lives on this disk now: the record on the other one held no data.
                    _unlink(self._meta(self.specs[orphan], volume_id))
                write_json(self._meta(spec, volume_id),
                           {"thin": thin, "source": source_name, "created_at": self.clock()}, mode=0o600)
                if src is not None:
                    job = self._start_clone(volume_id, spec, tmp, size, thin, src)
                    if job is not None:
                        return self._wait_or_report(volume_id, job)
                else:
                    self._build(tmp, size, thin)
                    self._put_in_place(tmp, spec, volume_id)
            except BaseException as exc:
                # ``_put_in_place`` removed the image if the error came after its rename: nothing is left.
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
        with self._lock:
            self._orphans.pop(volume_id, None)
        log.info("deleted volume %s from disk %s", volume_id, info.disk)
        return True

    def expand(self, volume_id: str, size: int) -> VolumeInfo:
        """Grow the backing file to ``size``; never shrinks (a smaller size returns the volume as is)."""
        check_volume_id(volume_id)
        check_size(size)
        info = self.require(volume_id)
        if size <= info.size:
            return info
        spec = self.specs[info.disk]
        gone = self._gone(spec)
        if gone:
            raise Unavailable(gone)
        with self._disk_locks[spec.name] if not info.thin else contextlib.nullcontext():
            self._expand(info, size)
        return self.require(volume_id)

    def _expand(self, info: VolumeInfo, size: int) -> None:
        """``expand``'s check and growth (a fully allocated volume's under its disk's lock, which nothing holds
        while it takes ``_lock``: a clone's end takes them the other way round)."""
        volume_id = info.volume_id
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
        """A clone's copy is complete: allocate it (a thick one, under the disk's lock, within the disk's free
        space: ENOSPC otherwise) and put it in place.  On an error nothing is left in place."""
        with self._disk_locks[spec.name] if not thin else contextlib.nullcontext():
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                if not thin:
                    # What the allocation adds to what the copy already holds (counted as used: it is a file of
                    # the volumes directory), checked as create checks a new volume's size.
                    needed = max(0, size - os.fstat(fd).st_blocks * 512)
                    free = self._disk(spec).free
                    if needed > free:
                        raise OSError(errno.ENOSPC, f"disk {spec.name} has {free} bytes free, clone {volume_id} "
                                                    f"needs {needed} more")
                    # A reflinked clone shares its source's blocks, which posix_fallocate counts as allocated: a
                    # write to them would need new space later, and could fail for want of it.
                    unshare(fd, 0, size)
                    os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._put_in_place(tmp, spec, volume_id)

    def _put_in_place(self, tmp: str, spec: DiskSpec, volume_id: str) -> None:
        """Rename a complete image to its real name, durably.  When that fails after the rename the image is
        removed again: the create fails, and its caller then removes ``ID.json``, so nothing is left (an image
        kept without its record would pass for a thin volume made from no source)."""
        path = self._image(spec, volume_id)
        os.replace(tmp, path)
        try:
            fsync_dir(self._dir(spec))
        except BaseException:
            _unlink(path)
            raise

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
        """The disk to create on (``disk``, or the one with the most free space): ``NotFound`` for a name not
        configured, ``Unavailable`` for a disk that is not the disk this agent set up (not mounted?)."""
        if not disk:
            usable = self._present()
            if not usable:
                why = "; ".join(list(self.unavailable.values()) + list(self._lost.values()))
                raise Unavailable(f"no disk of this node is available: {why}")
            return max(usable, key=lambda spec: self._disk(spec).free)
        spec = self.specs.get(disk)
        if spec is None:
            if disk in self.unavailable:
                raise Unavailable(self.unavailable[disk])
            raise NotFound(f"no disk {disk!r} on this node (disks: {', '.join(sorted(self.configured))})")
        gone = self._gone(spec)
        if gone:
            raise Unavailable(gone)
        return spec

    def _disk(self, spec: DiskSpec) -> Disk:
        if spec.name in self.unavailable or self._gone(spec):
            return Disk(spec.name, spec.path, 0, 0)  # its directory's filesystem is not the disk's
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
            return self._orphan_info(spec, volume_id) if self._orphans.get(volume_id) == spec.name else None
        meta_path = self._meta(spec, volume_id)
        try:
            meta = read_json(meta_path, {}, dict)
            thin, source = meta.get("thin", True), meta.get("source", "")
            if not isinstance(thin, bool) or not isinstance(source, str):
                raise CorruptRecord(meta_path, f"'thin' must be true or false and 'source' a string, not "
                                               f"{thin!r} and {source!r}")
        except (CorruptRecord, OSError) as exc:
            # This volume only: the node's others are listed and served.  Not thin: nothing is known of it.
            why = exc if isinstance(exc, CorruptRecord) else f"{meta_path}: unreadable ({exc.strerror or exc})"
            return VolumeInfo(volume_id, st.st_size, spec.name, path, st.st_blocks * 512, thin=False,
                              state=FAILED, progress=0.0,
                              message=f"{why}: volume {volume_id} is not exported, cloned, snapshotted or grown "
                                      'until that file is repaired (a JSON object such as {"thin": false, '
                                      '"source": ""}) or the volume is deleted')
        return VolumeInfo(volume_id, st.st_size, spec.name, path, st.st_blocks * 512, thin, source)

    def _orphan(self, volume_id: str) -> bool:
        """Whether ``volume_id`` is a record found at start without its image, the image still missing."""
        disk = self._orphans.get(volume_id)
        return disk is not None and disk in self.specs and not os.path.exists(self._image(self.specs[disk],
                                                                                           volume_id))

    def _orphan_info(self, spec: DiskSpec, volume_id: str) -> VolumeInfo | None:
        """A record whose image is missing, as a volume in "error" (None once its record is gone too)."""
        meta_path = self._meta(spec, volume_id)
        try:
            meta = read_json(meta_path, None, dict)
        except (CorruptRecord, OSError):
            meta = {}  # its own damage says nothing more than the missing image does
        if meta is None:
            return None
        thin, source = meta.get("thin", True), meta.get("source", "")
        return VolumeInfo(volume_id, 0, spec.name, self._image(spec, volume_id), 0,
                          thin=thin if isinstance(thin, bool) else False,
                          source=source if isinstance(source, str) else "", state=FAILED, progress=0.0,
                          message=f"{meta_path}: the record of volume {volume_id} is there but its image "
                                  f"{self._image(spec, volume_id)} is missing (deleted or lost): its data is "
                                  "not on this node; put the image back and restart the agent, or delete the "
                                  "volume")

    # ------------------------------------------------------------------ disk identity

    def _check_disks(self, disks: Sequence[DiskSpec]) -> list[DiskSpec]:
        """The disks that are the disks this agent set up (see "Disk identity" in the module docstring); the
        others go to ``unavailable``, with an error in the log.  A disk set up now gets its marker before
        ``disks.json`` records it: a stop in between leaves a marker, adopted at the next start."""
        assert self.state_dir is not None
        record_path = os.path.join(self.state_dir, DISKS_FILE)
        # Corrupt: no start (the message names the file), since nothing could tell the disks apart then.
        recorded = read_json(record_path, {}, dict)
        entries = recorded.get("disks", {})
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("uuid"), str)
                                                    for e in entries.values()):
            raise CorruptRecord(record_path, 'expected {"disks": {NAME: {"uuid": ..., "path": ...}}}')
        entries = dict(entries)
        usable, owners, changed = [], {}, False
        for spec in disks:
            known = entries[spec.name]["uuid"] if spec.name in entries else None
            try:
                marker = self._read_marker(spec)
            except CorruptRecord as exc:
                self._refuse(spec, f"its marker is unreadable: {exc}",
                             f"repair it ({{\"disk\": \"{spec.name}\", \"uuid\": \"{known or '...'}\"}}) and restart "
                             "the agent")
                continue
            if marker is None and known is None:  # a new disk, or one an agent without markers set up: adopt
                adopted = os.path.isdir(self._dir(spec)) and any(not n.startswith(".")
                                                                  for n in os.listdir(self._dir(spec)))
                marker = {"disk": spec.name, "uuid": uuid.uuid4().hex, "created_at": self.clock()}
                write_json(self._marker(spec), marker)
                log.info("disk %s at %s: %s (marker %s, uuid %s)", spec.name, spec.path,
                         "adopted, volumes and all (set up before disk markers)" if adopted else "set up",
                         self._marker(spec), marker["uuid"])
            elif marker is None:
                self._refuse(spec, f"this agent set it up (uuid {known}) but {self._marker(spec)} is missing: "
                                   "the disk is not mounted there (yet)", self._mount_or_forget(spec, record_path))
                continue
            elif known is None and marker["disk"] != spec.name:
                self._refuse(spec, f"its marker {self._marker(spec)} says it is disk {marker['disk']!r} "
                                   f"(uuid {marker['uuid']}), not {spec.name!r}",
                             f"mount disk {spec.name} at {spec.path} and restart the agent (or, if the disk was "
                             f"renamed on purpose, write its new name into the marker)")
                continue
            elif known is not None and marker["uuid"] != known:
                self._refuse(spec, f"its marker {self._marker(spec)} says it is disk {marker['disk']!r} with uuid "
                                   f"{marker['uuid']}, but this agent set disk {spec.name} up with uuid {known}",
                             self._mount_or_forget(spec, record_path))
                continue
            if marker["uuid"] in owners:
                self._refuse(spec, f"it is the same disk as {owners[marker['uuid']]} (uuid {marker['uuid']}): "
                                   "one disk mounted twice?", f"give disk {spec.name} its own disk")
                continue
            owners[marker["uuid"]] = spec.name
            if known is None:
                entries[spec.name] = {"uuid": marker["uuid"], "path": spec.path}
                changed = True
            self._uuids[spec.name] = marker["uuid"]
            usable.append(spec)
        if changed:
            write_json(record_path, {"disks": entries})
        return usable

    def _refuse(self, spec: DiskSpec, why: str, fix: str) -> None:
        message = (f"disk {spec.name} at {spec.path} is unavailable: {why}.  Nothing is created there and its "
                   f"volumes are not served: {fix}")
        self.unavailable[spec.name] = message
        log.error("%s", message)

    @staticmethod
    def _mount_or_forget(spec: DiskSpec, record_path: str) -> str:
        return (f"mount the disk at {spec.path} and restart the agent.  If it is a new disk meant to replace it (or "
                f"an older agent's, whose marker went under its mount point at the upgrade), remove disk "
                f"{spec.name} from {record_path} and restart: the agent then sets it up as it finds it")

    def _present(self) -> list[DiskSpec]:
        """The disks in use whose directory is still the disk's (what is under a disk unmounted since the start
        is not its volumes)."""
        return [spec for spec in self.specs.values() if not self._gone(spec)]

    def _gone(self, spec: DiskSpec) -> str:
        """Why ``spec``'s directory is no longer the disk checked at start ("" while it is): cheap while its
        device and inode have not changed; else its marker is read again."""
        expected = self._identity.get(spec.name)
        if expected is None:
            return ""
        try:
            now = _identity(spec.path)
        except OSError:
            now = None
        if now != expected:
            try:
                marker = self._read_marker(spec) if now is not None else None
            except CorruptRecord:
                marker = None
            if marker is None or marker["uuid"] != self._uuids[spec.name]:
                why = (f"disk {spec.name}: {spec.path} is no longer the directory of the disk checked at start, and "
                       f"{self._marker(spec)} does not hold its uuid {self._uuids[spec.name]} (unmounted?): nothing "
                       "is created there until the disk is back (mount it again)")
                if spec.name not in self._lost:
                    log.error("%s", why)
                self._lost[spec.name] = why
                return why
            self._identity[spec.name] = now  # the same disk (mounted again): its directory from now on
        if self._lost.pop(spec.name, None) is not None:
            log.warning("disk %s at %s is back", spec.name, spec.path)
        return ""

    def _read_marker(self, spec: DiskSpec) -> dict | None:
        path = self._marker(spec)
        marker = read_json(path, None, dict)
        if marker is not None and not (isinstance(marker.get("uuid"), str) and marker["uuid"]
                                       and isinstance(marker.get("disk"), str)):
            raise CorruptRecord(path, 'expected {"disk": NAME, "uuid": UUID}')
        return marker

    @staticmethod
    def _marker(spec: DiskSpec) -> str:
        return os.path.join(spec.path, DISK_MARKER)

    def _clean_partial(self, spec: DiskSpec) -> None:
        """Remove what a create or clone interrupted by a stop left (``.ID.img.creating`` and its meta) and the
        temporary files of atomic writes; report records without their image, and images without their record
        (see the module docstring: neither is removed)."""
        directory = self._dir(spec)
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".img.creating"):
                volume_id = name[1:-len(".img.creating")]
                log.warning("removing %s: a create of volume %s was interrupted", name, volume_id)
                _unlink(os.path.join(directory, name))
                if not os.path.exists(self._image(spec, volume_id)):
                    _unlink(self._meta(spec, volume_id))
        stale = remove_stale_temps(directory)
        if stale:
            log.info("disk %s: removed %s, left by writes a stop interrupted (the files they were to replace "
                     "are whole)", spec.name, ", ".join(stale))
        names = set(os.listdir(directory))
        for name in sorted(names):
            if name.startswith(".") or not os.path.isfile(os.path.join(directory, name)):
                continue
            if name.endswith(".json") and name[:-len(".json")] + ".img" not in names:
                volume_id = name[:-len(".json")]
                self._orphans[volume_id] = spec.name
                log.error("volume %s on disk %s: its record %s is there but its image %s is missing: the volume "
                          "is in state error (its data is not on this node) until the image is put back, or the "
                          "volume is deleted", volume_id, spec.name, os.path.join(directory, name),
                          self._image(spec, volume_id))
            elif name.endswith(".img") and name[:-len(".img")] + ".json" not in names:
                log.warning("volume %s on disk %s: its image %s has no record %s (a delete a stop interrupted, "
                            "which its repeat finishes, or an older agent's volume): served as a thin volume made "
                            "from no source", name[:-len(".img")], spec.name, os.path.join(directory, name),
                            self._meta(spec, name[:-len(".img")]))

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


def _identity(path: str) -> tuple[int, int]:
    """What tells a directory from another at the same path (a mount over it, or its removal, changes it)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
