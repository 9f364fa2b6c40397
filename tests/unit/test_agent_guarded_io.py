"""The agent's exported volumes take part in the target's non-blocking I/O (issue 7, fair under a slow disk).

The node agent wraps every exported volume's backing store in its
copy-before-write guard (``agent.copies.guarded``).  A wrapper that forwarded
``read_nowait``/``write_nowait`` blindly would let writes bypass the guard, so
until now the guard offered neither and every agent LUN ran its I/O on the
portal's event loop: one cold or slow volume stalled every session of the node.
The guard now offers guarded versions of what the wrapped store's own class
offers, and these tests check, against a real ``FileBackingStore`` and a real
``LogicalUnit``:

- what the logical unit then uses (non-blocking reads and writes, gathered
  writes) for each kind of store;
- that a write a running background copy must first save goes to a worker
  (which saves it through the guarded ``write``), and the snapshot keeps the old
  data; that writes are not gathered while a copy runs, and a gathered write
  is guarded all the same;
- that ``LogicalUnit.io_paused`` waits for I/O running on a worker and holds
  back what a worker picks up meanwhile (the snapshot's point in time);
- through the agent's real portal (``PortalThread``, Shoal's initiator over
  127.0.0.1): a guarded volume on the slow TEST device
  (``tests/support/slow_target.DelayedBackingStore``, every I/O 50 ms) does not
  stall another volume's session, and ``call_quiesced`` runs after a write in
  flight on a worker has reached the file.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from node_agent.agent.copies import (READY, GuardedBacking, GuardedGatheringBacking, GuardedNowaitBacking,
                                     WriteGuards, guarded)
from node_agent.agent.portal import PortalThread
from node_agent.agent.settings import DiskSpec
from node_agent.agent.snapshots import SnapshotManager
from node_agent.agent.volumes import VolumeManager
from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient
from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.target import Credentials
from node_agent.scsi.device import GOOD, LogicalUnit, LunIdentity, Nexus
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore
from node_agent.target_service import LunSpec, PortalConfig
from tests.support.fairness import DELAY, measure
from tests.support.slow_target import DelayedBackingStore
from test_agent_snapshots import Gate, read_at, wait_until, write_at

MiB = 1 << 20
NEXUS = Nexus("iqn.2007-10.com.example:init,i,0x000000000001", "iqn.2026-01.io.shoal:t,t,0x0001")
INITIATOR = "iqn.2026-01.io.shoal:guarded-test-host"
CHAP = Credentials("guarded-user", "guarded-secret-1")


def write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") + bytes([0])


def unit(backing) -> LogicalUnit:
    lu = LogicalUnit(backing, LunIdentity(volume_id="vol-1"), target_name="iqn.2026-01.io.shoal:t")
    lu.take_unit_attention(NEXUS)  # the power-on unit attention
    return lu


@pytest.fixture
def copying(tmp_path):
    """A 4 MiB volume with marked data in chunks 0 and 3, a snapshot of it being copied (chunk 0 is
    copied, the copy waits before chunk 1 until ``gate.set()``), and the volume's store as an export
    opens it: the ``FileBackingStore`` and its guard."""
    gate = Gate()
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))], use_reflink=False,
                            background_copies=True, copy_pace=gate)
    snapshots = SnapshotManager(volumes)
    volume = volumes.create("vol-1", 4 * MiB)
    write_at(volume.path, 0, b"OLD0" * 128)
    write_at(volume.path, 3 * MiB, b"OLD3" * 128)
    snapshots.create("snap-1", "vol-1")
    wait_until(lambda: snapshots.get("snap-1").progress == 0.25)
    inner = FileBackingStore(volume.path)
    try:
        yield volumes, snapshots, volume, gate, inner, guarded(inner, "vol-1", volumes.guards)
    finally:
        gate.set()
        inner.close()


def finished(snapshots):
    return wait_until(lambda: (s := snapshots.get("snap-1")).state == READY and s)


# ---------------------------------------------------------------------------- what the unit uses


def test_the_guard_offers_what_the_wrapped_store_offers(tmp_path):
    store = FileBackingStore(str(tmp_path / "img"), size=MiB)
    try:
        files = guarded(store, "vol-1", WriteGuards())
        assert type(files) is GuardedGatheringBacking
        lu = unit(files)
        assert lu.read_nowait is not None and lu.write_nowait is not None and lu._writev is not None
        slow = guarded(DelayedBackingStore(store, 0.0), "vol-1", WriteGuards())
        assert type(slow) is GuardedNowaitBacking
        lu = unit(slow)
        assert lu.read_nowait is not None and lu.write_nowait is not None and lu._writev is None
        plain = guarded(MemoryBackingStore(MiB), "vol-1", WriteGuards())
        assert type(plain) is GuardedBacking
        lu = unit(plain)
        assert lu.read_nowait is None and lu.write_nowait is None and lu._writev is None  # inline, as before
    finally:
        store.close()


# ---------------------------------------------------------------------------- writes during a copy


def test_a_write_the_copy_must_save_first_goes_to_a_worker_and_the_snapshot_keeps_the_old_data(copying):
    volumes, snapshots, volume, gate, _, backing = copying
    lu = unit(backing)
    assert volumes.guards.would_copy("vol-1", 3 * MiB, 512) and not volumes.guards.would_copy("vol-1", 0, 512)
    # Chunk 0 is copied already: the write is done now, on the loop.
    now = lu.execute_deferrable(NEXUS, write10(0, 1), b"NEW0" * 128, 512)
    assert now.blocking is None and now.status == GOOD
    assert read_at(volume.path, 0, 512) == b"NEW0" * 128
    # Chunk 3 is not: the write goes to a worker and nothing is written until it runs there.
    later = lu.execute_deferrable(NEXUS, write10(3 * MiB // 512, 1), b"NEW3" * 128, 512)
    assert later.blocking is not None
    assert read_at(volume.path, 3 * MiB, 512) == b"OLD3" * 128
    assert later.blocking().status == GOOD  # what the worker runs: the guarded write
    assert read_at(volume.path, 3 * MiB, 512) == b"NEW3" * 128
    gate.set()
    snap = finished(snapshots)
    assert read_at(snap.path, 0, 512) == b"OLD0" * 128
    assert read_at(snap.path, 3 * MiB, 512) == b"OLD3" * 128


def test_writes_are_not_gathered_while_a_copy_runs(copying):
    volumes, snapshots, volume, gate, inner, backing = copying
    lu = unit(backing)
    assert lu.write_nowait(0, b"x" * 512) is True  # ext4: learns that RWF_NOWAIT writes are refused
    assert backing.inline_writes is False  # each write asks write_nowait, which may send it to a worker
    assert lu.gather_offset(write10(3 * MiB // 512, 1), b"y" * 512) is None
    gate.set()
    finished(snapshots)
    wait_until(lambda: not volumes.guards.readers("vol-1"))  # the finished job leaves the guards
    assert backing.inline_writes == inner.inline_writes  # the copy is done: the store decides again


def test_a_gathered_write_during_a_copy_saves_the_old_data_first(copying):
    volumes, snapshots, volume, gate, _, backing = copying
    pieces = [memoryview(b"GAT%d" % i * 128) for i in range(2)]
    backing.writev(3 * MiB, pieces, 1024)
    assert read_at(volume.path, 3 * MiB, 1024) == b"".join(pieces)
    gate.set()
    assert read_at(finished(snapshots).path, 3 * MiB, 512) == b"OLD3" * 128


# ---------------------------------------------------------------------------- io_paused


def test_io_paused_waits_for_io_on_a_worker_and_holds_back_what_starts_meanwhile(tmp_path):
    lu = unit(FileBackingStore(str(tmp_path / "img"), size=MiB))
    order: list[str] = []
    release = threading.Event()

    def first_io():
        order.append("first starts")
        release.wait(10)
        order.append("first ends")

    first = threading.Thread(target=lu.deferred(first_io).blocking)
    first.start()
    wait_until(lambda: order == ["first starts"])
    inside = threading.Event()
    second: list[threading.Thread] = []

    def pauser():
        with lu.io_paused():
            order.append("paused")
            inside.set()
            worker = threading.Thread(target=lu.deferred(lambda: order.append("second runs")).blocking)
            worker.start()
            second.append(worker)
            time.sleep(0.2)  # the second I/O had time to run, were it not held back
            order.append("resumes")

    paused = threading.Thread(target=pauser)
    paused.start()
    assert not inside.wait(0.2)  # the running I/O holds the pause off
    release.set()
    paused.join(10)
    first.join(10)
    second[0].join(10)
    assert order == ["first starts", "first ends", "paused", "resumes", "second runs"]
    lu.close()


# ---------------------------------------------------------------------------- through the agent's portal


@pytest.fixture
def portal(tmp_path):
    """The agent's portal with two guarded volumes as ``ExportManager`` serves them (LUN 0, CHAP, an ACL):
    ``slow`` on the slow TEST device, ``fast`` on a plain file."""
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    host, port = portal.start()
    guards = WriteGuards()  # no copy running: nothing to save
    paths = {}
    try:
        for name, wrap in (("slow", lambda b: guarded(DelayedBackingStore(b, DELAY), "vol-slow", guards)),
                           ("fast", lambda b: guarded(b, "vol-fast", guards))):
            paths[name] = tmp_path / f"{name}.img"
            portal.add_target(f"iqn.2026-01.io.shoal:target:{name}", LunSpec(str(paths[name]), 16 * MiB, wrap=wrap),
                              chap=CHAP, mutual_chap=None, allowed_initiators=[INITIATOR])
        yield portal, host, port, paths
    finally:
        portal.stop()


def client(host: str, port: int, name: str, depth: int) -> IscsiClient:
    settings = ClientSettings(initiator_iqn=INITIATOR, queue_depth=depth, reconnect_timeout=5)
    return IscsiClient(host, port, f"iqn.2026-01.io.shoal:target:{name}", settings=settings,
                       chap=(CHAP.user, initiator_secret(CHAP.secret, INITIATOR)))


@pytest.mark.slow
def test_a_slow_volume_does_not_stall_another_volume_of_the_agent(portal):
    portal, host, port, _ = portal

    async def scenario():
        async with client(host, port, "slow", 16) as slow, client(host, port, "fast", 1) as fast:
            return await measure(LunDevice(slow, 0), LunDevice(fast, 0))

    result = asyncio.run(scenario())
    print(result)
    assert result["peak_in_flight"] == 16 and result["slow_completed"] > 0
    assert result["loaded"] <= 2 * result["idle"], result


def test_call_quiesced_runs_once_a_write_on_a_worker_reached_the_file(portal):
    portal, host, port, paths = portal
    iqn = "iqn.2026-01.io.shoal:target:slow"
    seen: list[bytes] = []

    async def scenario():
        async with client(host, port, "slow", 4) as slow:
            device = LunDevice(slow, 0)
            await device.read_blocks(0, 1)  # past the power-on unit attention
            write = asyncio.ensure_future(device.write_blocks(8, b"in-flight-write!" * 32))
            deadline = time.monotonic() + 5
            while portal.call(lambda: portal.service.registry.targets[iqn].luns.luns[0]._io_running) == 0:
                assert time.monotonic() < deadline, "the write never went to a worker"
                await asyncio.sleep(0.005)
            # The write is on a worker now, sleeping before it writes.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, portal.call_quiesced, iqn,
                                       lambda: seen.append(read_at(str(paths["slow"]), 8 * 512, 512)))
            await write

    asyncio.run(scenario())
    assert seen == [b"in-flight-write!" * 32]
