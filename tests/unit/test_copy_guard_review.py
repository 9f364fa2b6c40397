"""Review of the copy-before-write guard and of a copy's start (agent.copies, snapshots, volumes).

- A chunk the guard cannot save before a write (the copy's disk full: ENOSPC from ``copy_extents``, the
  one point patched here) fails the snapshot or clone, not the guest's write, as a device-mapper snapshot
  is invalidated when it overflows: the write (plain, gathered, or a punch) goes ahead, the job ends
  "error" with the first failure's message, its guard goes, and the snapshot or clone is never served as
  complete, not even when the copy's thread was copying its last chunk at that moment.
- A copy's start handed to ``VolumeManager.quiesce`` (for an exported volume, the portal's event loop) that
  its caller gave up on (``PortalThread.call_within``'s TimeoutError, ``fn`` still queued) must not run
  later: by then the controller's retry may have made the copy's temporary file and record again.  The
  loop is simulated by a queue (``Loop``) that runs what was handed to it in order, as the real loop does.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

from node_agent.agent import copies
from node_agent.agent.copies import COPYING, FAILED, READY, CopyJob, guarded
from node_agent.agent.errors import FailedPrecondition, Unavailable
from node_agent.storage.backing import FileBackingStore
from test_agent_snapshots import Gate, manager, read_at, wait_until, write_at

MiB = 1 << 20


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.set()


def disk_full(monkeypatch) -> list[tuple[int, int]]:
    """From now on every ``copy_extents`` fails ENOSPC; the (start, end) it was asked for are listed."""
    asked: list[tuple[int, int]] = []

    def full(src_fd, dst_fd, start, end):
        asked.append((start, end))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(copies, "copy_extents", full)
    return asked


def change(store, how: str, offset: int) -> None:
    """One change of the volume through its guarded store, as a LUN makes it."""
    if how == "write":
        store.write(offset, b"NEW!" * 1024)
    elif how == "writev":
        store.writev(offset, [memoryview(b"NEW!" * 512), memoryview(b"NEW!" * 512)], 4096)
    else:
        store.punch(offset, 4096)


# ---------------------------------------------------------------------------- a save that fails


@pytest.mark.parametrize("how", ["write", "writev", "punch"])
def test_a_save_that_fails_fails_the_snapshot_and_the_write_goes_ahead(tmp_path, gate, monkeypatch, how):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, 3 * MiB, b"OLD3" * 1024)
    assert snapshots.create("snap-1", "vol-1").state == COPYING
    wait_until(lambda: snapshots.get("snap-1").progress == 0.25)  # chunk 0 copied; the thread waits
    asked = disk_full(monkeypatch)
    store = FileBackingStore(volume.path)
    try:
        lun = guarded(store, "vol-1", volumes.guards)
        change(lun, how, 3 * MiB)  # chunk 3 is not copied: saving it fails, the change is made
        change(lun, how, 2 * MiB)  # the copy failed already: nothing more to save
    finally:
        store.close()
    assert asked == [(3 * MiB, 4 * MiB)]
    expected = b"\0" * 4096 if how == "punch" else b"NEW!" * 1024
    assert read_at(volume.path, 3 * MiB, 4096) == expected
    assert read_at(volume.path, 2 * MiB, 4096) == expected
    gate.set()
    snap = wait_until(lambda: (s := snapshots.get("snap-1")).state != COPYING and s)
    assert snap.state == FAILED
    assert snap.message.startswith("copy failed: No space left on device (saving bytes 3145728-4194304")
    assert not os.path.exists(snap.path)
    assert [n for n in os.listdir(tmp_path / "d0" / "snapshots") if n.startswith(".")] == []  # no tmp
    with pytest.raises(FailedPrecondition, match="snap-1 is error: copy failed"):
        snapshots.source("snap-1")
    wait_until(lambda: volumes.guards.readers("vol-1") == ())
    assert snapshots.delete("snap-1") is True
    assert volumes.delete("vol-1") is True


def test_a_save_that_fails_fails_the_clone_and_the_write_goes_ahead(tmp_path, gate, monkeypatch):
    volumes, _ = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volume = volumes.create("vol-1", 4 * MiB)
    assert volumes.create("vol-c", 0, source="vol-1").state == COPYING
    wait_until(lambda: volumes.lookup("vol-c").progress == 0.25)
    disk_full(monkeypatch)
    store = FileBackingStore(volume.path)
    try:
        guarded(store, "vol-1", volumes.guards).write(MiB, b"NEW!" * 1024)
    finally:
        store.close()
    assert read_at(volume.path, MiB, 4096) == b"NEW!" * 1024
    gate.set()
    clone = wait_until(lambda: (v := volumes.lookup("vol-c")).state != COPYING and v)
    assert clone.state == FAILED and "No space left on device" in clone.message
    assert volumes.get("vol-c") is None  # not a volume: no image in place
    with pytest.raises(FailedPrecondition, match="a clone whose copy failed"):
        volumes.require("vol-c")
    wait_until(lambda: volumes.guards.readers("vol-1") == ())


class WatchedLock:
    """The job's lock, telling when its copy thread starts waiting for it."""

    def __init__(self, lock, thread_name: str):
        self._lock, self._thread_name = lock, thread_name
        self.thread_waits = threading.Event()

    def __enter__(self):
        if threading.current_thread().name == self._thread_name:
            self.thread_waits.set()
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


def test_the_copy_thread_on_its_last_chunk_does_not_make_a_failed_copy_ready(tmp_path, monkeypatch):
    """The thread checked for a cancel and then waits for the chunk a write is saving; the save fails:
    the thread, once it has the lock, finds the chunk not copied and the job failed, and must not end
    "ready" after its (skipped) last chunk."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * (2 * MiB))
    with open(dst, "wb") as fh:
        fh.truncate(2 * MiB)
    go, done = threading.Event(), threading.Event()
    paces = []

    def pace():
        paces.append(1)
        if len(paces) == 2:  # before chunk 1, the last
            assert go.wait(10)

    job = CopyJob("t", str(src), str(dst), 2 * MiB, on_done=lambda job: done.set(), pace=pace)
    job._lock = watched = WatchedLock(job._lock, "copy-t")
    real = copies.copy_extents
    saving = threading.Event()

    def full_once_the_thread_waits(src_fd, dst_fd, start, end):
        if threading.current_thread().name == "copy-t":
            return real(src_fd, dst_fd, start, end)
        saving.set()
        watched.thread_waits.clear()  # set by chunk 0; the thread waits in pace() before chunk 1 now
        go.set()  # the thread passes its cancel check and waits for the lock this save holds
        assert watched.thread_waits.wait(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(copies, "copy_extents", full_once_the_thread_waits)
    job.start()
    wait_until(lambda: len(paces) == 2)
    job.before_write(MiB + 10, 5)  # does not raise
    assert saving.is_set()
    assert done.wait(10)
    assert job.state == FAILED and job.message.startswith("copy failed: No space left on device")
    assert job.progress == 0.5


# ---------------------------------------------------------------------------- a start given up on


class Loop:
    """Stands in for the portal's loop behind ``VolumeManager.quiesce``: ``give_up`` queues ``fn`` and raises
    the TimeoutError of ``PortalThread.call_within`` (the loop is busy); ``run`` queues ``fn`` and then runs
    the queue in order, as the loop does once it gets to it, and returns (or raises) ``fn``'s outcome.
    ``outcomes`` holds what each queued call returned or raised, in order."""

    def __init__(self):
        self.queue: list = []
        self.outcomes: list = []

    def give_up(self, volume_id, fn):
        self.queue.append(fn)
        raise TimeoutError()

    def run(self, volume_id, fn):
        self.queue.append(fn)
        while self.queue:
            queued = self.queue.pop(0)
            try:
                self.outcomes.append(queued())
            except Exception as exc:  # handed to a future nobody waits on any more
                self.outcomes.append(exc)
        if isinstance(self.outcomes[-1], Exception):
            raise self.outcomes[-1]
        return self.outcomes[-1]


def make(what: str, volumes, snapshots):
    if what == "snapshot":
        return snapshots.create("snap-1", "vol-1")
    return volumes.lookup("vol-c") if volumes.create("vol-c", 0, source="vol-1") else None


def made(what: str, volumes, snapshots):
    if what == "snapshot":
        return snapshots.get("snap-1")
    return volumes.lookup("vol-c")


@pytest.mark.parametrize("what", ["snapshot", "clone"])
def test_a_start_given_up_on_does_not_run_once_the_loop_gets_to_it(tmp_path, gate, what):
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True, copy_pace=gate)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, MiB, b"T1" * 512)
    loop = Loop()
    volumes.quiesce = loop.give_up
    with pytest.raises(Unavailable, match="retry"):  # the given-up wait (TimeoutError): worth a retry
        make(what, volumes, snapshots)
    assert made(what, volumes, snapshots) is None
    assert [n for n in os.listdir(tmp_path / "d0" / "snapshots") if n.startswith(".")] == []
    write_at(volume.path, MiB, b"T2" * 512)  # the guest goes on writing; the controller retries
    volumes.quiesce = loop.run  # the loop catches up: the stale start first, then the retry's
    assert make(what, volumes, snapshots).state == COPYING
    stale, fresh = loop.outcomes
    assert isinstance(stale, Exception) and not isinstance(stale, CopyJob)  # refused to start
    assert isinstance(fresh, CopyJob)
    assert volumes.guards.readers("vol-1") == (fresh,)  # one copy into the file, of one point in time
    gate.set()
    info = wait_until(lambda: (i := made(what, volumes, snapshots)).state != COPYING and i)
    assert info.state == READY
    assert read_at(info.path, MiB, 1024) == b"T2" * 512
    wait_until(lambda: volumes.guards.readers("vol-1") == ())


@pytest.mark.parametrize("what", ["snapshot", "clone"])
def test_a_start_that_ran_as_its_caller_gave_up_is_the_calls_outcome(tmp_path, what):
    """The timeout fired as the loop ran the start: the copy it began is this create's, not an orphan
    writing to a file that the create's clean-up removed."""
    volumes, snapshots = manager(tmp_path, use_reflink=False, background_copies=True)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, MiB, b"T1" * 512)

    def ran_then_timed_out(volume_id, fn):
        fn()
        raise TimeoutError()

    volumes.quiesce = ran_then_timed_out
    make(what, volumes, snapshots)
    info = wait_until(lambda: (i := made(what, volumes, snapshots)) and i.state != COPYING and i)
    assert info.state == READY
    assert read_at(info.path, MiB, 1024) == b"T1" * 512
    wait_until(lambda: volumes.guards.readers("vol-1") == ())
