"""Volumes as backing files on the node's disks: create (sparse or allocated), clone, expand, delete.

A disk is a directory; volume ``ID`` lives in ``<disk>/volumes/ID.img`` with
``ID.json`` beside it (thin or not, what it was cloned from) and, once a LUN
has served it, ``ID.img.pr`` (persistent reservations, SPC-4 §5.13.5).  The
files themselves are the record: a volume exists when its ``.img`` does, so a
restarted agent finds its volumes by listing the disks.  A new image is built
under a temporary name and renamed into place when complete, so a crash never
leaves a half-made volume behind under its real name.

Idempotency (agent.proto): create returns the existing volume when size and
disk match and raises ``AlreadyExists`` otherwise; delete of an unknown id
succeeds; expand to a size not above the current one returns the volume as it is.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node_agent.agent.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from node_agent.agent.records import fsync_dir, read_json, write_json
from node_agent.agent.settings import DiskSpec, check_name

log = logging.getLogger("shoal.agent.volumes")

BLOCK_SIZE = 512  # the LUN's logical block size: volume sizes are whole blocks
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h: share all extents of another file (reflink)
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM)
_COPY_CHUNK = 64 << 20


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


def check_volume_id(volume_id: str) -> str:
    """Volume ids name files and IQNs, and are the LUN's serial (VPD 0x80 holds up to 64 characters)."""
    try:
        return check_name("volume_id", volume_id)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def check_size(size: int) -> int:
    if size <= 0:
        raise InvalidArgument("size_bytes must be positive")
    if size % BLOCK_SIZE:
        raise InvalidArgument(f"size_bytes {size} is not a multiple of the {BLOCK_SIZE}-byte block")
    return size


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst`` share ``src``'s extents (btrfs, XFS with reflink, bcachefs); False where unsupported."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise


def copy_sparse(src_fd: int, dst_fd: int, length: int) -> None:
    """Copy the data extents of ``src`` (SEEK_DATA/SEEK_HOLE), leaving holes as holes."""
    offset = 0
    while offset < length:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            data = offset  # no SEEK_DATA: copy everything
        if data >= length:
            return
        try:
            hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), length)
        except OSError:
            hole = length
        pos = data
        while pos < hole:
            n = os.copy_file_range(src_fd, dst_fd, min(_COPY_CHUNK, hole - pos), pos, pos)
            if n <= 0:
                raise OSError(errno.EIO, "copy_file_range made no progress")
            pos += n
        offset = hole


class VolumeManager:
    """The volumes on this node's disks."""

    def __init__(self, disks: Sequence[DiskSpec], *, statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.time):
        if not disks:
            raise ValueError("a node agent needs at least one disk")
        self.specs = {spec.name: spec for spec in disks}
        self.statvfs = statvfs
        self.clock = clock
        for spec in disks:
            os.makedirs(self._dir(spec), exist_ok=True)
            self._clean_partial(spec)

    # ------------------------------------------------------------------ queries

    def disks(self) -> list[Disk]:
        return [self._disk(spec) for spec in self.specs.values()]

    def get(self, volume_id: str) -> VolumeInfo | None:
        for spec in self.specs.values():
            info = self._info(spec, volume_id)
            if info is not None:
                return info
        return None

    def require(self, volume_id: str) -> VolumeInfo:
        info = self.get(volume_id)
        if info is None:
            raise NotFound(f"volume {volume_id} does not exist on this node")
        return info

    def list(self) -> list[VolumeInfo]:
        found = []
        for spec in self.specs.values():
            for name in sorted(os.listdir(self._dir(spec))):
                if name.endswith(".img") and not name.startswith("."):
                    info = self._info(spec, name[:-4])
                    if info is not None:
                        found.append(info)
        return found

    # ------------------------------------------------------------------ changes

    def create(self, volume_id: str, size: int, disk: str = "", thin: bool = True,
               source: str = "") -> VolumeInfo:
        """Create the backing file; see the module docstring for what a repeat does."""
        check_volume_id(volume_id)
        src = self.require(source) if source else None
        if src is not None and size == 0:
            size = src.size
        check_size(size)
        spec = self._spec(disk)
        existing = self.get(volume_id)
        if existing is not None:
            return self._compatible(existing, size, disk, source)
        if src is not None and size < src.size:
            raise InvalidArgument(f"a clone of {source} needs at least its {src.size} bytes, not {size}")
        if not thin:
            free = self._disk(spec).free
            if size > free:
                raise ResourceExhausted(f"disk {spec.name} has {free} bytes free, volume {volume_id} needs {size}")
        path = self._image(spec, volume_id)
        tmp = os.path.join(self._dir(spec), f".{volume_id}.img.creating")
        try:
            self._build(tmp, size, thin, src)
            write_json(self._meta(spec, volume_id),
                       {"thin": thin, "source": source, "created_at": self.clock()}, mode=0o600)
            os.replace(tmp, path)
            fsync_dir(self._dir(spec))
        except BaseException as exc:
            _unlink(tmp)
            _unlink(self._meta(spec, volume_id))
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"disk {spec.name} ran out of space creating volume {volume_id}") from None
            if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
                raise InvalidArgument(f"{size} bytes is too large for disk {spec.name}'s filesystem") from None
            raise
        log.info("created volume %s: %d bytes on disk %s (%s%s)", volume_id, size, spec.name,
                 "thin" if thin else "allocated", f", clone of {source}" if source else "")
        return self.require(volume_id)

    def delete(self, volume_id: str) -> bool:
        """Remove the volume's files; False when there was nothing to remove."""
        check_volume_id(volume_id)
        info = self.get(volume_id)
        if info is None:
            return False
        spec = self.specs[info.disk]
        for path in (info.path, info.path + ".pr", self._meta(spec, volume_id)):
            _unlink(path)
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
        try:
            fd = os.open(info.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if info.thin:
                    os.ftruncate(fd, size)
                else:
                    os.posix_fallocate(fd, info.size, size - info.size)
                os.fsync(fd)
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

    # ------------------------------------------------------------------ helpers

    def _compatible(self, existing: VolumeInfo, size: int, disk: str, source: str) -> VolumeInfo:
        if existing.size != size or (disk and existing.disk != disk) or (source and existing.source != source):
            raise AlreadyExists(
                f"volume {existing.volume_id} exists with {existing.size} bytes on disk {existing.disk}"
                + (f" (clone of {existing.source})" if existing.source else "")
                + f"; asked for {size} bytes on disk {disk or 'any'}: delete it first or use another id")
        return existing

    def _build(self, tmp: str, size: int, thin: bool, src: VolumeInfo | None) -> None:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if src is not None:
                src_fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if not reflink(src_fd, fd):
                        os.ftruncate(fd, src.size)
                        copy_sparse(src_fd, fd, src.size)
                finally:
                    os.close(src_fd)
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
        used = sum(info.allocated for info in self.list() if info.disk == spec.name)
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
        """Remove what a create interrupted by a crash left (``.ID.img.creating`` and its meta)."""
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
        return os.path.join(spec.path, "volumes")

    def _image(self, spec: DiskSpec, volume_id: str) -> str:
        return os.path.join(self._dir(spec), f"{volume_id}.img")

    def _meta(self, spec: DiskSpec, volume_id: str) -> str:
        return os.path.join(self._dir(spec), f"{volume_id}.json")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
