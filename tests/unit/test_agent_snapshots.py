"""Snapshots and clones on the node agent, on temporary directories (agent.proto CreateSnapshot & co.).

Both ways of copying are exercised: the background copy (``use_reflink=False``,
as on ext4 or tmpfs) and the reflink, with the real FICLONE where the temporary
directory's filesystem has it (btrfs, XFS) and otherwise with ``reflink_fn``, the
manager's own injection point, standing in for it.  The copy-before-write
guard is checked against a real ``FileBackingStore``.  A background copy is
held half way through the manager's ``copy_pace`` hook (its throttle).
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time

import pytest

from node_agent.agent import copies
from node_agent.agent import snapshots as snapshots_module
from node_agent.agent.copies import COPYING, FAILED, READY, CopyJob, GuardedBacking, WriteGuards
from node_agent.agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from node_agent.agent.settings import DiskSpec
from node_agent.agent.snapshots import INTERRUPTED, SnapshotManager
from node_agent.agent.volumes import VolumeManager
from node_agent.scsi.sidecar import SANITIZE_SUFFIX, SanitizeMark
from node_agent.storage.backing import FileBackingStore

MiB = 1 << 20


def fake_reflink(src_fd: int, dst_fd: int) -> bool:
    """Stands in for FICLONE: the same result (dst has src's data, at once), made by copying."""
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    copies.copy_extents(src_fd, dst_fd, 0, size)
    return True


def manager(tmp_path, **kwargs):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))], **kwargs)
    return volumes, SnapshotManager(volumes)


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


class Gate:
    """A ``copy_pace`` that lets each background copy do its first chunk, then waits until ``set()``."""

    def __init__(self):
        self.event = threading.Event()
        self.calls: dict[int, int] = {}

    def __call__(self) -> None:
        thread = threading.get_ident()
        self.calls[thread] = self.calls.get(thread, 0) + 1
        if self.calls[thread] > 1:
            assert self.event.wait(10), "gate never opened"

    def set(self) -> None:
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    def open_soon(self, delay: float = 0.2) -> None:
        """Open the gate after ``delay``: a cancel made meanwhile is seen before the next chunk."""
        timer = threading.Timer(delay, self.event.set)
        timer.daemon = True
        timer.start()


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.set()


# ---------------------------------------------------------------------------- the copy path


def test_snapshot_by_copy_holds_the_data_as_of_the_snapshot(tmp_path):
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, MiB, b"before" * 100)
    snap = snapshots.create("snap-1", "vol-1")
    assert (snap.state, snap.progress, snap.method, snap.size) == (READY, 1.0, "copy", 4 * MiB)
    write_at(volume.path, MiB, b"after!" * 100)
    assert read_at(snap.path, MiB, 600) == b"before" * 100
    assert stat.S_IMODE(os.stat(snap.path).st_mode) == 0o400  # read-only, and no one else's to read
    assert snap.allocated < 2 * MiB  # holes stay holes
    assert snapshots.list() == [snap]


def test_snapshot_repeat_returns_it_and_another_volume_is_already_exists(tmp_path):
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    volumes.create("vol-1", MiB)
    volumes.create("vol-2", MiB)
    snap = snapshots.create("snap-1", "vol-1")
    assert snapshots.create("snap-1", "vol-1") == snap
    with pytest.raises(AlreadyExists, match="of volume vol-1, not vol-2"):
        snapshots.create("snap-1", "vol-2")


def test_snapshot_errors_change_nothing(tmp_path):
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    with pytest.raises(NotFound, match="vol-nope"):
        snapshots.create("snap-1", "vol-nope")
    with pytest.raises(InvalidArgument, match="snapshot_id"):
        snapshots.create("Bad/Id", "vol-nope")
    assert snapshots.list() == []
    assert os.listdir(tmp_path / "d0" / "snapshots") == []


def test_delete_snapshot_removes_its_files_and_repeats_succeed(tmp_path):
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    volumes.create("vol-1", MiB)
    snapshots.create("snap-1", "vol-1")
    assert snapshots.delete("snap-1") is True
    assert os.listdir(tmp_path / "d0" / "snapshots") == []
    assert snapshots.delete("snap-1") is False
    assert snapshots.get("snap-1") is None


def test_background_copy_reports_progress_and_guards_the_volume(tmp_path, gate):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, 3 * MiB, b"old" * 10)
    snap = snapshots.create("snap-1", "vol-1")
    assert (snap.state, snap.method) == (COPYING, "copy")
    assert wait_until(lambda: snapshots.get("snap-1").progress) == 0.25  # one chunk of four, then the gate
    assert not os.path.exists(snap.path)  # renamed into place when complete
    with pytest.raises(FailedPrecondition, match="being copied"):
        volumes.delete("vol-1")
    with pytest.raises(FailedPrecondition, match="copying"):
        snapshots.source("snap-1")
    # A write through the volume's (guarded) LUN while the copy runs: the old chunk is saved first.
    backing = GuardedBacking(FileBackingStore(volume.path), "vol-1", volumes.guards)
    try:
        backing.write(3 * MiB, b"new" * 10)
    finally:
        backing.close()
    gate.set()
    done = wait_until(lambda: (s := snapshots.get("snap-1")).state == READY and s)
    assert done.progress == 1.0
    assert read_at(done.path, 3 * MiB, 30) == b"old" * 10
    assert read_at(volume.path, 3 * MiB, 30) == b"new" * 10
    assert volumes.guards.readers("vol-1") == ()


def test_deleting_a_snapshot_stops_its_copy(tmp_path, gate):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volumes.create("vol-1", 4 * MiB)
    assert snapshots.create("snap-1", "vol-1").state == COPYING
    gate.open_soon()
    assert snapshots.delete("snap-1") is True
    assert os.listdir(tmp_path / "d0" / "snapshots") == []
    assert volumes.guards.readers("vol-1") == ()
    assert volumes.delete("vol-1") is True


def test_a_copy_interrupted_by_a_stop_is_an_error_after_the_restart(tmp_path, gate):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volumes.create("vol-1", 4 * MiB)
    snapshots.create("snap-1", "vol-1")
    gate.open_soon()
    snapshots.close()
    _, again = manager(tmp_path, use_reflink=False)
    info = again.get("snap-1")
    assert (info.state, info.message) == (FAILED, INTERRUPTED)
    assert [n for n in os.listdir(tmp_path / "d0" / "snapshots") if n.startswith(".")] == []
    assert again.delete("snap-1") is True


def test_copy_before_write_saves_old_data_only_once(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * (3 * MiB))
    with open(dst, "wb") as fh:
        fh.truncate(3 * MiB)
    done = threading.Event()
    job = CopyJob("t", str(src), str(dst), 3 * MiB, on_done=lambda job: done.set())
    job.before_write(MiB + 10, 5)  # chunk 1 saved before the write
    write_at(str(src), MiB + 10, b"bbbbb")
    job.before_write(MiB + 10, 5)  # already saved: the new data must not be copied over it
    assert job.progress == pytest.approx(1 / 3)
    job.start()
    assert done.wait(10) and job.state == READY
    assert dst.read_bytes() == b"a" * (3 * MiB)


def test_a_background_copy_leaves_its_file_out_of_the_page_cache(tmp_path):
    """A background copy writes a whole volume: it drops what it wrote from the page cache as it goes and
    at the end (``copies._drop_cached``), so a clone or snapshot neither pushes the running guests' data out
    of the cache nor leaves the new volume cached in the large folios its big writes made."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 40 * MiB  # more than 2 x 16 chunks: the drops while copying run too
    data = os.urandom(size)
    src.write_bytes(data)
    with open(dst, "wb") as fh:
        fh.truncate(size)
    if cache_stat(str(src)) is None:
        pytest.skip("this kernel has no cachestat (Linux 6.5+) to count a file's cached pages")
    done = threading.Event()
    job = CopyJob("t", str(src), str(dst), size, on_done=lambda job: done.set())
    job.start()
    assert done.wait(30) and job.state == READY
    left = cache_stat(str(dst))
    assert left.cache <= 16, f"{left.cache} pages of the copy still cached"  # a few may be in flight elsewhere
    assert dst.read_bytes() == data


def test_a_background_copy_leaves_the_sources_page_cache_as_it_found_it(tmp_path):
    """Reading the source (a guest's running volume, for a snapshot) brings it into the page cache: the
    copy drops again what was not cached before (``copies.cached_pages`` per chunk), and leaves what was
    (the guest's working set) where it is."""
    from node_agent.agent.copies import cached_pages

    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 24 * MiB
    src.write_bytes(os.urandom(size))
    with open(dst, "wb") as fh:
        fh.truncate(size)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached_pages(fd, 0, size) is None:
            pytest.skip("this kernel has no cachestat (Linux 6.5+) to count a file's cached pages")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what this reads
        os.pread(fd, 4 * MiB, 0)  # the guest's working set: the first 4 MiB
        assert cached_pages(fd, 4 * MiB, size - 4 * MiB) == 0
        hot = cached_pages(fd, 0, 4 * MiB)
        assert hot == 1024
        done = threading.Event()
        job = CopyJob("t", str(src), str(dst), size, on_done=lambda job: done.set())
        job.start()
        assert done.wait(30) and job.state == READY
        assert cached_pages(fd, 0, 4 * MiB) == hot
        rest = cached_pages(fd, 4 * MiB, size - 4 * MiB)
        assert rest <= 16, f"the copy left {rest} pages of the source cached"
    finally:
        os.close(fd)
    assert dst.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------- clones


def test_clone_of_a_snapshot_in_the_background(tmp_path, gate):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, 0, b"as of the snapshot")
    gate.set()
    wait_until(lambda: snapshots.create("snap-1", "vol-1").state == READY)
    gate.clear()
    clone = volumes.create("vol-clone", 8 * MiB, source=snapshots.source("snap-1"))
    assert (clone.state, clone.source, clone.size) == (COPYING, "snapshot:snap-1", 8 * MiB)
    assert "vol-clone" in [v.volume_id for v in volumes.list()]
    with pytest.raises(FailedPrecondition, match="still being copied"):
        volumes.require("vol-clone")  # no export of a half-made volume
    with pytest.raises(FailedPrecondition, match="being cloned to vol-clone"):
        snapshots.delete("snap-1")
    assert volumes.create("vol-clone", 8 * MiB, source=snapshots.source("snap-1")).state == COPYING  # repeat
    gate.set()
    ready = wait_until(lambda: (v := volumes.lookup("vol-clone")).state == READY and v)
    assert ready.size == 8 * MiB and ready.source == "snapshot:snap-1"
    assert read_at(ready.path, 0, 18) == b"as of the snapshot"
    assert snapshots.delete("snap-1") is True


def test_deleting_a_clone_still_copying_stops_it(tmp_path, gate):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volumes.create("vol-1", 4 * MiB)
    assert volumes.create("vol-clone", 0, source="vol-1").state == COPYING
    gate.open_soon()
    assert volumes.delete("vol-clone") is True
    assert volumes.lookup("vol-clone") is None
    assert sorted(os.listdir(tmp_path / "d0" / "volumes")) == ["vol-1.img", "vol-1.json"]
    assert volumes.guards.readers("vol-1") == ()


# ---------------------------------------------------------------------------- the reflink path


def test_snapshot_and_clone_by_reflink_are_done_at_once(tmp_path):
    volumes, snapshots = manager(tmp_path, background_copies=True, reflink_fn=fake_reflink)
    volume = volumes.create("vol-1", 2 * MiB)
    write_at(volume.path, 512, b"reflinked")
    snap = snapshots.create("snap-1", "vol-1")
    assert (snap.state, snap.method, snap.progress) == (READY, "reflink", 1.0)
    clone = volumes.create("vol-clone", 0, source=snapshots.source("snap-1"))
    assert (clone.state, clone.size) == (READY, 2 * MiB)
    assert read_at(clone.path, 512, 9) == b"reflinked"


def test_real_ficlone_where_the_filesystem_has_it(tmp_path):
    probe_src, probe_dst = tmp_path / "probe-src", tmp_path / "probe-dst"
    probe_src.write_bytes(b"x" * 4096)
    probe_dst.touch()
    sfd, dfd = os.open(probe_src, os.O_RDONLY), os.open(probe_dst, os.O_RDWR)
    try:
        if not copies.reflink(sfd, dfd):
            pytest.skip(f"{tmp_path}'s filesystem has no reflink (FICLONE); the copy path is tested above")
    finally:
        os.close(sfd), os.close(dfd)
    volumes, snapshots = manager(tmp_path, background_copies=True)
    volume = volumes.create("vol-1", 2 * MiB)
    write_at(volume.path, 0, b"shared extents")
    snap = snapshots.create("snap-1", "vol-1")
    assert (snap.state, snap.method) == (READY, "reflink")
    write_at(volume.path, 0, b"changed after!")
    assert read_at(snap.path, 0, 14) == b"shared extents"


def test_the_guard_passes_everything_else_through(tmp_path):
    path = tmp_path / "img"
    guards = WriteGuards()
    backing = GuardedBacking(FileBackingStore(str(path), size=MiB), "vol-1", guards)
    try:
        backing.write(0, b"abc")
        assert backing.read(0, 3) == b"abc" and backing.size == MiB and backing.fd is not None
        backing.punch(0, 4096)
        assert backing.read(0, 3) == bytes(3)
    finally:
        backing.close()
    shutil.rmtree(tmp_path / "nothing", ignore_errors=True)


# ---------------------------------------------------------------------------- the point in time holds the LUN still briefly


def dirty_pages(path: str) -> int | None:
    """Pages of ``path`` dirty in the page cache (Linux ``cachestat``, 6.5 and later), or None without it."""
    stat_ = cache_stat(path)
    return None if stat_ is None else stat_.dirty


def cache_stat(path: str):
    """``path``'s page-cache counts (``cache``, ``dirty``, ... in pages; ``copies.cache_stat``), or None
    without ``cachestat`` (Linux 6.5+)."""
    from node_agent.agent.copies import cache_stat as stat_fd

    fd = os.open(path, os.O_RDONLY)
    try:
        return stat_fd(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("what", ["snapshot", "clone"])
def test_the_volume_is_flushed_before_it_is_held_still(tmp_path, what):
    """The point in time of a snapshot or clone is taken with the volume's LUN held still (for an exported
    volume, on the portal's event loop, which then serves no session), and ``start_copy`` flushes the volume
    there.  The bulk of that flush is done before (``copies.flush_ahead``), while the LUN runs on: when the
    LUN is held, no page of the volume is left dirty (seen with ``cachestat``), whatever was written."""
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    volume = volumes.create("vol-1", 32 * MiB)
    write_at(volume.path, 0, os.urandom(16 * MiB))
    before = dirty_pages(volume.path)
    if before is None:
        pytest.skip("this kernel has no cachestat (Linux 6.5+) to count a file's dirty pages")
    assert before > 0  # a fresh 16 MiB write: in the page cache, not on disk yet
    held: list[int | None] = []

    def quiesce(volume_id, fn):
        held.append(dirty_pages(volume.path))
        return fn()

    volumes.quiesce = quiesce
    if what == "snapshot":
        assert snapshots.create("snap-1", "vol-1").state == READY
    else:
        assert volumes.create("vol-clone", 0, source="vol-1").state == READY
    assert held == [0]


def test_a_volume_being_sanitized_or_failed_is_no_snapshot_or_clone_source(tmp_path):
    """Its ``.sanitize`` mark (scsi.sidecar.SanitizeMark) says the data is half-erased: a copy would carry
    that data without the mark, and its LUN would serve it as if all were well."""
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    info = volumes.create("vol-1", MiB)
    clone = volumes.create("vol-c", 0, source="vol-1")
    mark = SanitizeMark(info.path + SANITIZE_SUFFIX)
    mark.set("OVERWRITE", "iqn.2026-01.test:host-a", ause=True)
    with pytest.raises(FailedPrecondition, match="vol-1 is being sanitized, or its sanitize failed "
                                                 r"\(OVERWRITE started by iqn.2026-01.test:host-a"):
        snapshots.create("snap-1", "vol-1")
    with pytest.raises(FailedPrecondition, match="EXIT FAILURE MODE"):
        volumes.create("vol-2", 0, source="vol-1")
    assert snapshots.list() == []
    assert os.listdir(tmp_path / "d0" / "snapshots") == []
    assert sorted(v.volume_id for v in volumes.list()) == ["vol-1", "vol-c"]
    assert volumes.create("vol-c", 0, source="vol-1") == clone  # a repeat of a clone made before: as it is
    mark.clear()  # a SANITIZE completed
    assert snapshots.create("snap-1", "vol-1").state == READY
    assert volumes.create("vol-2", 0, source="vol-1").state == READY


def test_a_snapshot_whose_volume_is_deleted_meanwhile_is_not_found_and_leaves_nothing(tmp_path, monkeypatch):
    volumes, snapshots = manager(tmp_path, use_reflink=False)
    volumes.create("vol-1", MiB)
    real_flush = snapshots_module.flush_ahead

    def deleted_meanwhile(src):
        real_flush(src)
        assert volumes.delete("vol-1")

    monkeypatch.setattr(snapshots_module, "flush_ahead", deleted_meanwhile)
    with pytest.raises(NotFound, match="vol-1, the source of snapshot snap-1, was deleted meanwhile"):
        snapshots.create("snap-1", "vol-1")
    assert snapshots.list() == []
    assert os.listdir(tmp_path / "d0" / "snapshots") == []
