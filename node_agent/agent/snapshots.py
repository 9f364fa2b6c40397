"""Snapshots: read-only point-in-time copies of volumes, on the volume's disk.

Snapshot ``ID`` of a volume on disk ``D`` lives in ``<D>/snapshots/ID.img``
(mode 0444: nothing writes it, it is never exported) with ``ID.json`` beside
it (the volume it was taken of, when, how).  It is made by ``copies``: a
reflink when the disk's filesystem shares extents, else a background copy
with progress, guarded against the volume's writes, under a temporary name
renamed into place when complete.  The point in time is taken with the
volume's LUN held still (``VolumeManager.quiesce``), after an fdatasync, so a
snapshot of an attached volume is crash-consistent.

A copy interrupted by a stop cannot be resumed: at start the temporary file is
removed and the record says "error" (the snapshot's point in time is lost:
delete it and take a new one).  A copy the stop caught after its image was
renamed into place (it is fsynced before) but before its record said so is
complete: its record says "ready" at start.  A snapshot the controller asked
for but this agent never started is simply not found, and the controller asks
again.

A snapshot whose record ``ID.json`` cannot be read (empty, not JSON, not an
object, a field of the wrong type: a filesystem repaired after a crash, a hand
edit) is listed in state "error", its message naming the file, as a volume's
(volumes.py): it is not cloned, a create of its id is ``FailedPrecondition``,
it can be deleted, and the node's other snapshots (and the agent's start) are
not affected.  At start the temporary files of record writes a stop cut
(``*.tmp``) are removed; an image without its record is reported in the log
and left alone (a snapshot's data, for whoever knows what it was).

Idempotency (agent.proto): create returns the existing snapshot (ready,
copying or failed) when it is of the same volume, ``AlreadyExists`` otherwise;
delete of an unknown id succeeds, stops a copy still running, and is refused
while a clone is being copied from the snapshot.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, replace

from node_agent.agent.copies import (COPYING, FAILED, READY, CopyJob, Source, flush_ahead, quiesced_once,
                                     start_copy)
from node_agent.agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from node_agent.agent.records import CorruptRecord, fsync_dir, read_json, remove_stale_temps, write_json
from node_agent.agent.settings import DiskSpec, check_name
from node_agent.agent.volumes import SNAPSHOTS_DIR, VolumeManager, _unlink, raise_if_source_gone, refuse_half_erased

log = logging.getLogger("shoal.agent.snapshots")

REFLINK, COPY = "reflink", "copy"
INTERRUPTED = "the copy was interrupted by an agent stop: delete the snapshot and take another"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on this node (agent.proto SnapshotInfo)."""

    snapshot_id: str
    volume_id: str
    size: int
    disk: str
    path: str
    allocated: int = 0
    state: str = READY
    progress: float = 1.0
    message: str = ""
    method: str = REFLINK
    created_at: float = 0.0
    corrupt: bool = False
    """Its record is unreadable (``message`` says which file): only a delete helps."""


def check_snapshot_id(snapshot_id: str) -> str:
    try:
        return check_name("snapshot_id", snapshot_id)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def source_name(snapshot_id: str) -> str:
    """How a clone's record names a snapshot it was made from."""
    return f"snapshot:{snapshot_id}"


class SnapshotManager:
    """The snapshots on this node's disks; see the module docstring."""

    def __init__(self, volumes: VolumeManager):
        self.volumes = volumes
        self._jobs: dict[str, CopyJob] = {}
        self._lock = threading.RLock()
        self._closing = False
        for spec in volumes.specs.values():
            os.makedirs(self._dir(spec), exist_ok=True)
            self._clean_partial(spec)

    # ------------------------------------------------------------------ queries

    def get(self, snapshot_id: str) -> SnapshotInfo | None:
        for spec in self.volumes.specs.values():
            info = self._info(spec, snapshot_id)
            if info is not None:
                return info
        return None

    def require(self, snapshot_id: str) -> SnapshotInfo:
        info = self.get(snapshot_id)
        if info is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist on this node")
        return info

    def list(self) -> list[SnapshotInfo]:
        found = []
        for spec in self.volumes.specs.values():
            for name in sorted(os.listdir(self._dir(spec))):
                if name.endswith(".json") and not name.startswith("."):
                    info = self._info(spec, name[:-5])
                    if info is not None:
                        found.append(info)
        return sorted(found, key=lambda s: s.snapshot_id)

    def source(self, snapshot_id: str) -> Source:
        """A ready snapshot as the source of a clone."""
        info = self.require(snapshot_id)
        if info.state != READY:
            raise FailedPrecondition(f"snapshot {snapshot_id} is {info.state}"
                                     + (f" ({info.progress:.0%})" if info.state == COPYING else
                                        f": {info.message}") + "; clone it once it is ready")
        return Source(source_name(snapshot_id), info.path, info.size)

    # ------------------------------------------------------------------ changes

    def create(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        check_snapshot_id(snapshot_id)
        with self._lock:
            existing = self.get(snapshot_id)
            if existing is not None:
                if existing.corrupt:  # of which volume, and taken when, is unknown: nothing to compare
                    raise FailedPrecondition(existing.message)
                if existing.volume_id != volume_id:
                    raise AlreadyExists(f"snapshot {snapshot_id} exists, of volume {existing.volume_id}, not "
                                        f"{volume_id}: delete it first or use another id")
                return existing
            src = self.volumes.source(volume_id)
            refuse_half_erased(src)
            spec = self.volumes.specs[self.volumes.require(volume_id).disk]
            meta = {"volume_id": volume_id, "size": src.size, "state": COPYING, "method": COPY,
                    "created_at": self.volumes.clock()}
            tmp = self._tmp(spec, snapshot_id)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, src.size)
            finally:
                os.close(fd)
            try:
                write_json(self._meta(spec, snapshot_id), meta)  # before the copy: a restart knows it was begun
                flush_ahead(src)  # the bulk of the flush while the LUN runs on
                job = quiesced_once(self.volumes.quiesce, volume_id, lambda: start_copy(
                    src, tmp, guards=self.volumes.guards, key=f"snapshot {snapshot_id}",
                    use_reflink=self.volumes.use_reflink, reflink_fn=self.volumes.reflink_fn,
                    pace=self.volumes.copy_pace,
                    on_done=lambda job: self._copy_done(spec, snapshot_id, job)))
            except BaseException as exc:
                _unlink(tmp)
                _unlink(self._meta(spec, snapshot_id))
                raise_if_source_gone(exc, src, f"snapshot {snapshot_id}")
                raise
            if job is None:
                self._finish(spec, snapshot_id, dict(meta, method=REFLINK))
                log.info("snapshot %s of volume %s: reflinked", snapshot_id, volume_id)
                return self.require(snapshot_id)
            self._jobs[snapshot_id] = job  # before the lock goes: the copy's end looks for it
            log.info("snapshot %s of volume %s: copying %d bytes in the background (no reflink on disk %s)",
                     snapshot_id, volume_id, src.size, spec.name)
        if not self.volumes.background_copies:
            job.wait()  # outside the lock: the copy's end takes it
        return self.require(snapshot_id)

    def delete(self, snapshot_id: str) -> bool:
        """Remove the snapshot (stopping its copy); False when there was nothing to remove."""
        check_snapshot_id(snapshot_id)
        clones = self.volumes.copying_from(source_name(snapshot_id))
        if clones:
            raise FailedPrecondition(f"snapshot {snapshot_id} is being cloned to {', '.join(clones)}: wait for "
                                     "the copy, or delete the clone first")
        with self._lock:
            job = self._jobs.pop(snapshot_id, None)
        if job is not None:
            job.cancel()
        with self._lock:
            info = self.get(snapshot_id)
            if info is None:
                return False
            spec = self.volumes.specs[info.disk]
            for path in (self._image(spec, snapshot_id), self._tmp(spec, snapshot_id),
                         self._meta(spec, snapshot_id)):
                _unlink(path)  # the 0444 image too: unlinking needs the directory's permission only
            fsync_dir(self._dir(spec))
        log.info("deleted snapshot %s of volume %s", snapshot_id, info.volume_id)
        return True

    def close(self) -> None:
        with self._lock:
            self._closing = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()

    # ------------------------------------------------------------------ helpers

    def _copy_done(self, spec: DiskSpec, snapshot_id: str, job: CopyJob) -> None:
        """On the copy's thread: rename the image into place, or record why it failed."""
        with self._lock:
            meta = read_json(self._meta(spec, snapshot_id), None)
            if meta is None:
                return
            if job.state == READY:
                try:
                    self._finish(spec, snapshot_id, meta)
                    log.info("snapshot %s: copy done", snapshot_id)
                except OSError as exc:
                    self._fail(spec, snapshot_id, meta, f"finishing the copy failed: {exc.strerror or exc}")
            else:
                self._fail(spec, snapshot_id, meta, INTERRUPTED if self._closing else job.message)
            self._jobs.pop(snapshot_id, None)

    def _finish(self, spec: DiskSpec, snapshot_id: str, meta: dict) -> None:
        tmp = self._tmp(spec, snapshot_id)
        os.chmod(tmp, 0o400)  # read-only, and as private as the volume's own 0600 image
        os.replace(tmp, self._image(spec, snapshot_id))
        write_json(self._meta(spec, snapshot_id), dict(meta, state=READY))
        fsync_dir(self._dir(spec))

    def _fail(self, spec: DiskSpec, snapshot_id: str, meta: dict, message: str) -> None:
        _unlink(self._tmp(spec, snapshot_id))
        write_json(self._meta(spec, snapshot_id), dict(meta, state=FAILED, message=message))

    def _info(self, spec: DiskSpec, snapshot_id: str) -> SnapshotInfo | None:
        meta_path = self._meta(spec, snapshot_id)
        try:
            meta = read_json(meta_path, None, dict)
            if meta is None:
                return None
            info = _from_record(meta_path, snapshot_id, spec.name, self._image(spec, snapshot_id), meta)
        except (CorruptRecord, OSError) as exc:
            # This snapshot only: the node's others are listed, and GetState answers.
            why = exc if isinstance(exc, CorruptRecord) else f"{meta_path}: unreadable ({exc.strerror or exc})"
            path = self._image(spec, snapshot_id)
            try:
                st = os.stat(path)
                size, allocated = st.st_size, st.st_blocks * 512
            except OSError:
                size = allocated = 0
            return SnapshotInfo(snapshot_id, "", size, spec.name, path, allocated, state=FAILED, progress=0.0,
                                message=f"{why}: snapshot {snapshot_id} cannot be cloned until that file is "
                                        'repaired (a JSON object such as {"volume_id": "...", "size": BYTES, '
                                        '"state": "ready"}) or the snapshot is deleted', corrupt=True)
        if info.state == READY:
            try:
                st = os.stat(info.path)
            except FileNotFoundError:
                return replace(info, state=FAILED, progress=0.0,
                               message=f"its image {info.path} is missing (deleted or lost): delete the snapshot")
            return replace(info, allocated=st.st_blocks * 512)
        if info.state == COPYING:
            job = self._jobs.get(snapshot_id)
            return replace(info, progress=job.progress if job is not None else 0.0)
        return replace(info, progress=0.0)

    def _clean_partial(self, spec: DiskSpec) -> None:
        """A copy a stop interrupted: its temporary file goes, its record says so; one whose image is in
        place (``_finish`` renames it only complete and fsynced) is ready."""
        directory = self._dir(spec)
        stale = remove_stale_temps(directory)
        if stale:
            log.info("disk %s: removed %s, left by record writes a stop interrupted (the records are whole)",
                     spec.name, ", ".join(stale))
        names = set(os.listdir(directory))
        for name in sorted(names):
            if name.startswith(".") and name.endswith(".img.creating"):
                _unlink(os.path.join(directory, name))
            elif name.endswith(".img"):
                path = os.path.join(directory, name)
                if stat.S_IMODE(os.stat(path).st_mode) & 0o077:  # an older agent made them readable by all
                    os.chmod(path, 0o400)
                if name[:-len(".img")] + ".json" not in names:
                    log.warning("disk %s: snapshot image %s has no record %s: it is not listed (its volume and "
                                "time are unknown) and is left alone, %d bytes; remove it once it is known not to "
                                "be needed", spec.name, path, self._meta(spec, name[:-len(".img")]),
                                os.stat(path).st_blocks * 512)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json") and not name.startswith("."):
                snapshot_id = name[:-5]
                try:
                    meta = read_json(os.path.join(directory, name), None, dict)
                except (CorruptRecord, OSError) as exc:
                    log.error("snapshot %s: %s: it is in state error until its record is repaired, or it is "
                              "deleted", snapshot_id, exc)
                    continue
                if meta is None or meta.get("state") != COPYING:
                    continue
                if os.path.exists(self._image(spec, snapshot_id)):
                    log.info("snapshot %s: its copy was done when the agent stopped; it is ready", snapshot_id)
                    write_json(os.path.join(directory, name), dict(meta, state=READY))
                else:
                    log.warning("snapshot %s: its copy was interrupted by a stop; delete it and take another",
                                snapshot_id)
                    write_json(os.path.join(directory, name), dict(meta, state=FAILED, message=INTERRUPTED))

    @staticmethod
    def _dir(spec: DiskSpec) -> str:
        return os.path.join(spec.path, SNAPSHOTS_DIR)

    def _image(self, spec: DiskSpec, snapshot_id: str) -> str:
        return os.path.join(self._dir(spec), f"{snapshot_id}.img")

    def _tmp(self, spec: DiskSpec, snapshot_id: str) -> str:
        return os.path.join(self._dir(spec), f".{snapshot_id}.img.creating")

    def _meta(self, spec: DiskSpec, snapshot_id: str) -> str:
        return os.path.join(self._dir(spec), f"{snapshot_id}.json")


def _from_record(meta_path: str, snapshot_id: str, disk: str, image: str, meta: dict) -> SnapshotInfo:
    """The snapshot a record (a JSON object) describes; ``CorruptRecord`` for a field of the wrong type."""
    fields = {"volume_id": (str,), "size": (int,), "state": (str,), "message": (str,), "method": (str,),
              "created_at": (int, float)}
    wrong = [f"{key!r}: {meta[key]!r}" for key, kinds in fields.items()
             if key in meta and (not isinstance(meta[key], kinds) or isinstance(meta[key], bool))]
    if wrong or meta.get("size", 0) < 0:
        raise CorruptRecord(meta_path, "fields of the wrong type: " + ", ".join(wrong or [f"'size': {meta['size']}"]))
    return SnapshotInfo(snapshot_id, meta.get("volume_id", ""), meta.get("size", 0), disk, image,
                        state=meta.get("state", READY), message=meta.get("message", ""),
                        method=meta.get("method", COPY), created_at=float(meta.get("created_at", 0.0)))
