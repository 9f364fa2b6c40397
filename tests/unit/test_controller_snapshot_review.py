"""Regression tests for the review of the controller's snapshot and clone lifecycle (controller/domain/snapshots.py,
reconcile, CSI), one section per finding (F1..F9), against both stores where the store matters.

Agents are ``FakeAgents`` (controller/domain/agents.py): ``copy_steps`` N > 0 makes a copy run in the background
until N looks, ``fail_copy`` makes one fail, ``fail_next`` makes one call fail.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest

from controller.domain.errors import FailedPrecondition, ResourceExhausted, Unavailable
from controller.domain.model import AVAILABLE, CREATING, ERROR, READY, Disk, Volume
from protos.csi.v1 import csi_pb2
from tests.unit.test_controller_service import GiB, Env
from tests.unit.test_csi_controller import Code, Csi, code_of


@pytest.fixture(params=["memory", "sqlite"])
def env(request, tmp_path):
    from controller.store import MemoryStore, SqliteStore

    store = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "state.db"))
    env = Env(store, tmp_path)
    env.svc.create_volume("vol-1", GiB)
    yield env
    if request.param == "sqlite":
        store.close()


@pytest.fixture
def csi():
    """A real gRPC CSI Controller server over an ``Env`` (as tests/unit/test_csi_controller.py's)."""
    import shutil
    import tempfile

    from controller.store import MemoryStore

    directory = tempfile.mkdtemp(prefix="csi", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    csi = Csi(Env(MemoryStore(), directory), f"unix://{directory}/controller.sock")
    yield csi
    csi.close()
    shutil.rmtree(directory, ignore_errors=True)


def owner(env, name="vol-1"):
    return env.store.get_volume(name).owner_node


def volume_source(volume_id):
    return csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


def snapshot_source(snapshot_id):
    return csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


# ---- F1: a snapshot whose cut was answered is never taken again later --------------------------------------


def test_a_snapshot_whose_copy_failed_after_it_was_taken_is_a_final_error(env):
    env.agents.copy_steps = 3
    snap = env.svc.create_snapshot("snap-1", "vol-1")  # answered: the point in time is snap.created_at
    env.agents.fail_copy(snap.owner_node, snap.id, "copy failed: No space left on device")
    env.clock.now += 10  # the application writes on
    calls = env.agents.count("create_snapshot")
    for _ in range(2):
        with pytest.raises(FailedPrecondition, match="failed after it was taken .*No space left.*delete it"):
            env.svc.create_snapshot("snap-1", "vol-1")
    assert env.agents.count("create_snapshot") == calls  # never cut again
    failed = env.store.get_snapshot("snap-1")
    assert (failed.id, failed.state, failed.created_at) == (snap.id, ERROR, snap.created_at)
    assert env.svc.get_snapshot("snap-1").state == ERROR  # what shoalctl shows
    env.svc.delete_snapshot("snap-1")  # the way out: delete it, take a new one
    again = env.svc.create_snapshot("snap-1", "vol-1")
    assert again.id != snap.id and again.created_at == env.clock.now


def test_a_snapshot_whose_copy_failed_seen_by_reconcile_first_is_a_final_error(env):
    env.agents.copy_steps = 3
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_copy(snap.owner_node, snap.id, "the copy was interrupted by an agent stop")
    env.svc.reconcile_once()
    assert env.store.get_snapshot("snap-1").state == ERROR
    with pytest.raises(FailedPrecondition, match="failed after it was taken .*interrupted by an agent stop"):
        env.svc.create_snapshot("snap-1", "vol-1")
    assert env.agents.count("create_snapshot") == 1 and env.agents.count("delete_snapshot") == 0


def test_a_snapshot_the_agent_refused_to_take_is_taken_by_the_repeat(env):
    """No point in time was ever answered (the agent refused the cut for good): a repeat may take it now."""
    env.agents.fail_next("create_snapshot", ResourceExhausted("disk data0 is full"))
    with pytest.raises(ResourceExhausted):
        env.svc.create_snapshot("snap-1", "vol-1")
    assert env.store.get_snapshot("snap-1").state == ERROR
    env.clock.now += 10
    again = env.svc.create_snapshot("snap-1", "vol-1")
    assert (again.state, again.created_at) == (READY, env.clock.now)


def test_csi_create_snapshot_after_a_failed_copy_is_a_final_error_and_a_new_one_can_be_taken(csi):
    csi.env.agents.copy_steps = 2
    volume = csi.create("pvc-1", GiB)
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snapshot-1")
    first = csi.ctl.CreateSnapshot(request).snapshot
    csi.env.agents.fail_copy(csi.env.store.get_volume("pvc-1").owner_node, first.snapshot_id)
    csi.env.clock.now += 10
    assert code_of(csi.ctl.CreateSnapshot, request) == Code.FAILED_PRECONDITION  # final for the CO
    csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=first.snapshot_id))
    second = csi.ctl.CreateSnapshot(request).snapshot
    assert second.snapshot_id != first.snapshot_id and second.creation_time.seconds == int(csi.env.clock.now)


# ---- F2: reads never start a snapshot nor write its row ---------------------------------------------------


def test_reads_never_start_a_snapshot_the_agent_never_took_reconcile_does(env):
    env.agents.fail_next("create_snapshot")
    with pytest.raises(Unavailable):
        env.svc.create_snapshot("snap-1", "vol-1")
    row = env.store.get_snapshot("snap-1")
    assert row.state == CREATING
    env.clock.now += 5
    assert env.svc.get_snapshot("snap-1") == row
    assert env.svc.list_snapshots() == [row] and env.svc.list_snapshots(volume="vol-1") == [row]
    with pytest.raises(FailedPrecondition, match="clone it once it is ready"):
        env.svc.clone_volume("vol-c", "snapshot/snap-1")
    assert env.agents.count("create_snapshot") == 1 and env.store.get_snapshot("snap-1") == row
    assert "snapshot snap-1 finished copying" in env.svc.reconcile_once()  # under its lock, row read again
    taken = env.store.get_snapshot("snap-1")
    assert (taken.state, taken.created_at, env.agents.count("create_snapshot")) == (READY, env.clock.now, 2)


def test_reads_of_a_copy_do_not_write_its_row(env):
    env.agents.copy_steps = 2
    env.svc.create_snapshot("snap-1", "vol-1")
    row = env.store.get_snapshot("snap-1")
    assert env.svc.get_snapshot("snap-1").progress == 0.5
    assert env.svc.get_snapshot("snap-1").state == READY  # seen ready...
    assert env.store.get_snapshot("snap-1") == row  # ...recorded by reconcile, not by the read
    env.agents.copy_steps = 0
    env.svc.reconcile_once()
    assert env.store.get_snapshot("snap-1").state == READY


@pytest.mark.parametrize("read", ["list", "get"])
def test_a_read_racing_a_delete_does_not_bring_the_snapshot_back(env, read):
    env.agents.copy_steps = 5
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    fired = []

    def delete_first(node, method, item):  # the delete finishes between the reader's row read and its look
        if method == "get_snapshot" and not fired and threading.current_thread().name == "reader":
            fired.append(1)
            env.svc.delete_snapshot("snap-1")

    env.agents.before_call = delete_first
    reader = threading.Thread(target=env.svc.list_snapshots if read == "list" else
                              (lambda: env.svc.get_snapshot("snap-1")), name="reader")
    reader.start()
    reader.join(5)
    env.agents.before_call = None
    assert fired
    assert env.store.get_snapshot("snap-1") is None
    assert snap.id not in env.agents.agent(snap.owner_node).snapshots
    assert env.agents.count("create_snapshot") == 1
    env.svc.delete_volume("vol-1")  # nothing pins it


def test_csi_list_snapshots_and_clone_from_a_snapshot_do_not_start_it(csi):
    volume = csi.create("pvc-1", GiB)
    csi.env.agents.fail_next("create_snapshot")
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snapshot-1")
    assert code_of(csi.ctl.CreateSnapshot, request) == Code.UNAVAILABLE
    row = csi.env.store.get_snapshot("snapshot-1")
    listed = csi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert [e.snapshot.ready_to_use for e in listed] == [False]
    assert code_of(csi.create, "pvc-c", GiB, None,
                   volume_content_source=snapshot_source(row.id)) == Code.FAILED_PRECONDITION
    assert csi.env.agents.count("create_snapshot") == 1 and csi.env.store.get_snapshot("snapshot-1") == row
    assert csi.ctl.CreateSnapshot(request).snapshot.ready_to_use  # the CO's repeat takes it, under the lock


def test_start_does_not_write_a_row_that_is_not_its_snapshot_any_more(env):
    """``_start`` writes only while the row is still that snapshot in "creating" (a stale read never brings a
    deleted snapshot back, nor overwrites a new one of its name)."""
    env.agents.fail_next("create_snapshot")
    with pytest.raises(Unavailable):
        env.svc.create_snapshot("snap-1", "vol-1")
    stale = env.store.get_snapshot("snap-1")
    env.svc.delete_snapshot("snap-1")
    env.svc._snapshots._start(stale)
    assert env.store.get_snapshot("snap-1") is None


# ---- F3: clone <-> source identity by id, not wall-clock time --------------------------------------------------


def test_clones_record_their_sources_id(env):
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    assert env.svc.clone_volume("c1", "snapshot/snap-1").source_id == snap.id
    assert env.svc.clone_volume("c2", "volume/vol-1").source_id == env.store.get_volume("vol-1").id
    assert env.store.get_volume("c1").source_id == snap.id  # kept by the store


@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_a_clock_stepping_back_does_not_break_a_clones_identity(env, kind):
    if kind == "snapshot":
        env.svc.create_snapshot("src", "vol-1")
    source = f"{kind}/src" if kind == "snapshot" else "volume/vol-1"
    env.clock.now -= 0.5  # an NTP step, or a new leader whose clock is behind
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", source)
    # Still its source's clone: the source is kept, and the repeat finishes it.
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):
        if kind == "snapshot":
            env.svc.delete_snapshot("src")
        else:
            env.svc.delete_volume("vol-1")
    assert env.svc.clone_volume("vol-c", source).state == AVAILABLE


def test_csi_clones_after_a_clock_step_back(csi):
    volume = csi.create("pvc-src", GiB)
    snap = csi.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id,
                                                                name="snap-1")).snapshot
    csi.env.clock.now -= 0.5
    by_volume = csi.create("pvc-c1", GiB, None, volume_content_source=volume_source(volume.volume_id))
    by_snapshot = csi.create("pvc-c2", GiB, None, volume_content_source=snapshot_source(snap.snapshot_id))
    assert by_volume.content_source.volume.volume_id == volume.volume_id
    assert by_snapshot.content_source.snapshot.snapshot_id == snap.snapshot_id
    # The repeats are the same request (same source id), whatever the clocks say.
    assert csi.create("pvc-c1", GiB, None, volume_content_source=volume_source(volume.volume_id)) == by_volume


def test_a_clone_of_a_source_deleted_and_its_name_reused_is_refused_by_id(env):
    """Also when the newer source's clock reads earlier than the clone's: only the id says which one it is."""
    env.svc.create_volume("src", GiB, constraints={"zone": env.store.get_node(owner(env)).labels["zone"]})
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", "volume/src")
    clone = env.store.get_volume("vol-c")
    env.store.delete_volume("vol-c")  # as a controller before the rule that keeps a failed clone's source
    env.svc.delete_volume("src")
    env.clock.now -= 60  # the new one is made "before" the clone
    env.svc.create_volume("src", GiB, constraints={"zone": env.store.get_node(owner(env)).labels["zone"]})
    env.store.put_volume(clone)
    with pytest.raises(FailedPrecondition, match="is now another one"):
        env.svc.clone_volume("vol-c", "volume/src")
    env.svc.delete_volume("src")  # the dead clone keeps nothing


def test_a_clone_recorded_before_its_sources_id_was_goes_by_times(env):
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", "volume/vol-1")
    env.store.put_volume(replace(env.store.get_volume("vol-c"), source_id=""))
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):
        env.svc.delete_volume("vol-1")
    assert env.svc.clone_volume("vol-c", "volume/vol-1").state == AVAILABLE


def test_the_kubernetes_store_keeps_a_clones_source_id():
    from controller.store import kubernetes

    clone = Volume("c", "id-c", GiB, "default", "node-a", "data0", AVAILABLE, True, 1.0, "volume/v", GiB, "id-v")
    assert kubernetes._volume(kubernetes._volume_spec(clone)) == clone
    old = kubernetes._volume_spec(clone)
    del old["sourceId"]  # a record from before the field
    assert kubernetes._volume(old) == replace(clone, source_id="")


# ---- F4: a source does not grow while a clone of it is not made -----------------------------------------


def test_a_volume_being_cloned_does_not_grow_until_the_clone_is_made(env):
    env.agents.copy_steps = 3
    env.svc.clone_volume("vol-c", "volume/vol-1")
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):
        env.svc.expand_volume("vol-1", 2 * GiB)
    assert env.store.get_volume("vol-1").size_bytes == GiB
    assert env.svc.expand_volume("vol-1", GiB).size_bytes == GiB  # the same size: no growth, asked again
    while env.svc.observe_volume("vol-c").state == CREATING:
        pass
    assert env.svc.expand_volume("vol-1", 2 * GiB).size_bytes == 2 * GiB


def test_a_clone_lost_by_an_agent_restart_is_finished_at_its_sources_size(env):
    """The review's stuck clone: its copy lost, its repeat asks the size it recorded, which still fits."""
    env.agents.copy_steps = 3
    clone = env.svc.clone_volume("vol-c", "volume/vol-1")
    with pytest.raises(FailedPrecondition):
        env.svc.expand_volume("vol-1", 2 * GiB)
    del env.agents.agent(clone.owner_node).volumes[clone.id]  # lost
    env.agents.copy_steps = 0
    assert "clone vol-c finished copying" in env.svc.reconcile_once()
    assert env.store.get_volume("vol-c").state == AVAILABLE


# ---- F5: a clone whose copy failed is answered as failed ---------------------------------------------------


def test_the_repeat_of_a_clone_whose_copy_failed_answers_the_failure(env):
    env.agents.copy_steps = 2
    clone = env.svc.clone_volume("vol-c", "volume/vol-1")
    env.agents.fail_copy(clone.owner_node, clone.id, "finishing clone: disk data0 has no room (ENOSPC)")
    with pytest.raises(FailedPrecondition, match=r"copy of clone vol-c .*failed \(finishing clone: .*ENOSPC.*repeat"):
        env.svc.clone_volume("vol-c", "volume/vol-1")
    assert env.agents.count("clone_volume") == 1  # looked at, not restarted
    assert env.store.get_volume("vol-c").state == ERROR
    last = env.store.list_operations("vol-c")[-1]
    assert (last.state, last.detail) == ("failed", "finishing clone: disk data0 has no room (ENOSPC)")
    # shoalctl's contract: the repeat of a clone in "error" copies it again.
    assert env.svc.clone_volume("vol-c", "volume/vol-1").state == CREATING
    assert env.agents.count("clone_volume") == 2


def test_csi_a_clone_whose_copy_failed_is_a_final_error_and_dropped(csi):
    source = csi.create("pvc-src", GiB)
    owner_node = csi.env.store.get_volume("pvc-src").owner_node
    csi.env.agents.copy_steps = 2
    src = volume_source(source.volume_id)
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=src) == Code.ABORTED  # copying
    clone = csi.env.store.get_volume("pvc-clone")
    csi.env.agents.fail_copy(owner_node, clone.id, "finishing clone: disk data0 has no room (ENOSPC)")
    with pytest.raises(Exception) as info:
        csi.create("pvc-clone", GiB, None, volume_content_source=src)
    assert info.value.code() == Code.FAILED_PRECONDITION and "ENOSPC" in info.value.details()
    assert csi.env.store.get_volume("pvc-clone") is None  # the CO has no id for it: dropped
    assert csi.env.agents.count("clone_volume") == 1
    assert ("clone_volume", "failed") in [(o.kind, o.state) for o in csi.env.store.list_operations("pvc-clone")]
    csi.env.agents.copy_steps = 0
    assert csi.create("pvc-clone", GiB, None, volume_content_source=src).volume_id != clone.id  # a new one


def test_csi_a_clone_failed_seen_by_reconcile_is_a_final_error_too(csi):
    source = csi.create("pvc-src", GiB)
    csi.env.agents.copy_steps = 2
    src = volume_source(source.volume_id)
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=src) == Code.ABORTED
    clone = csi.env.store.get_volume("pvc-clone")
    csi.env.agents.fail_copy(clone.owner_node, clone.id, "copy failed: Input/output error")
    assert "clone pvc-clone failed copying: copy failed: Input/output error" in csi.env.svc.reconcile_once()
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=src) == Code.FAILED_PRECONDITION
    assert csi.env.store.get_volume("pvc-clone") is None and csi.env.agents.count("clone_volume") == 1


def test_csi_a_clone_left_by_a_temporary_failure_is_still_made_by_the_repeat(csi):
    source = csi.create("pvc-src", GiB)
    src = volume_source(source.volume_id)
    csi.env.agents.fail_next("clone_volume")
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=src) == Code.UNAVAILABLE
    assert csi.env.store.get_volume("pvc-clone").state == CREATING  # the agent never copied anything
    assert csi.create("pvc-clone", GiB, None, volume_content_source=src).capacity_bytes == GiB


def test_csi_a_clone_a_controller_before_left_error_after_a_temporary_failure_is_made_by_the_repeat(csi):
    """Rows such a controller wrote (a temporary failure made them "error"): the CSI repeat still makes them,
    its agent having no failed copy of them."""
    source = csi.create("pvc-src", GiB)
    src = volume_source(source.volume_id)
    csi.env.agents.fail_next("clone_volume")
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=src) == Code.UNAVAILABLE
    csi.env.store.put_volume(replace(csi.env.store.get_volume("pvc-clone"), state=ERROR))
    assert csi.create("pvc-clone", GiB, None, volume_content_source=src).capacity_bytes == GiB


# ---- F7: no snapshot nor clone on a fenced node -------------------------------------------------------------


def test_snapshots_and_clones_are_refused_on_a_fenced_node(env):
    node = owner(env)
    env.svc.create_snapshot("snap-1", "vol-1")
    env.svc.fence_node(node, "test")
    before = (env.store.list_volumes(), env.store.list_snapshots())
    with pytest.raises(FailedPrecondition, match=f"node {node} is fenced"):
        env.svc.create_snapshot("snap-2", "vol-1")
    for source in ("volume/vol-1", "snapshot/snap-1"):
        with pytest.raises(FailedPrecondition, match=f"node {node} is fenced"):
            env.svc.clone_volume("vol-c", source)
    assert (env.store.list_volumes(), env.store.list_snapshots()) == before
    assert env.svc.create_snapshot("snap-1", "vol-1").state == READY  # what exists is still answered
    env.svc.unfence_node(node)
    assert env.svc.clone_volume("vol-c", "snapshot/snap-1").state == AVAILABLE


# ---- F8, F9: what reconcile says ---------------------------------------------------------------------------


def test_reconcile_says_a_copy_failed_and_why(env):
    env.agents.copy_steps = 3
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_copy(snap.owner_node, snap.id, "copy failed: No space left on device")
    assert env.svc.reconcile_once() == ["snapshot snap-1 failed copying: copy failed: No space left on device"]
    env.svc.delete_snapshot("snap-1")
    env.agents.copy_steps = 1  # done at the next look
    env.svc.create_snapshot("snap-2", "vol-1")
    assert env.svc.reconcile_once() == ["snapshot snap-2 finished copying"]


def test_reconcile_reports_snapshots_missing_on_their_node_or_unknown(env, caplog):
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    agent = env.agents.agent(snap.owner_node)
    del agent.snapshots[snap.id]
    agent.snapshots["orphan-id"] = {"snapshot_id": "orphan-id", "volume_id": "x", "state": "ready"}
    with caplog.at_level(logging.DEBUG, logger="shoal.controller.reconcile"):
        env.svc.reconcile_once()
        env.svc.reconcile_once()  # a standing condition: once at its level
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        (logging.WARNING, f"reconcile: node {snap.owner_node} holds snapshot id orphan-id that the controller "
                          "does not know"),
        (logging.ERROR, f"reconcile: snapshot snap-1 ({snap.id}) of volume vol-1 is missing on its node "
                        f"{snap.owner_node}")]
    assert env.store.get_snapshot("snap-1").state == READY  # reported, not changed


# ---- F10: snapshots count in capacity (placement, pool and status figures) ---------------------------------


@pytest.fixture
def small(env):
    """Pool "small": node-a's 11 GiB disk alone (reported all free), no overcommit; volume "big" (6 GiB) there,
    beside vol-1 (1 GiB, pool default)."""
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 11 * GiB, 11 * GiB)])
    env.svc.create_pool("small", [("node-a", "data0")])
    env.svc.create_volume("big", 6 * GiB, pool="small")
    return env


def test_a_snapshot_promises_its_volumes_size_on_its_disk(small):
    """A 6 GiB volume's snapshot promises 6 GiB (a copy holds that much, a reflink once the volume is written
    over): beside it nothing more is promised on the 11 GiB disk without overcommit."""
    env = small
    env.svc.create_volume("fits", 4 * GiB, pool="small")  # before any snapshot: 1 + 6 + 4 of 11
    env.svc.delete_volume("fits")
    env.svc.create_snapshot("snap-big", "big")
    with pytest.raises(ResourceExhausted, match=r"largest: node-a/data0 0 B"):
        env.svc.create_volume("more", 4 * GiB, pool="small")
    with pytest.raises(ResourceExhausted, match="node-a/data0"):
        env.svc.expand_volume("big", 7 * GiB)
    with pytest.raises(ResourceExhausted, match="where clone c must live beside its source"):
        env.svc.clone_volume("c", "snapshot/snap-big")
    assert env.svc.pool_usage("small").provisioned_bytes == 12 * GiB
    assert env.svc.status()["provisioned_bytes"] == (1 + 6 + 6) * GiB  # vol-1, big, snap-big
    env.svc.delete_snapshot("snap-big")  # its room is free again
    assert env.svc.create_volume("more", 4 * GiB, pool="small").owner_node == "node-a"
    assert env.svc.pool_usage("small").provisioned_bytes == 10 * GiB


def test_an_overcommitting_pool_takes_snapshots_within_its_ratio(env):
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 10 * GiB, 10 * GiB)])
    env.svc.create_pool("over", [("node-a", "data0")], overcommit_ratio=2.0)
    env.svc.create_volume("big", 6 * GiB, pool="over")
    env.svc.create_snapshot("snap-big", "big")
    assert env.svc.create_volume("more", 7 * GiB, pool="over").owner_node == "node-a"  # 1 + 6 + 6 + 7 of 20
    with pytest.raises(ResourceExhausted):
        env.svc.create_volume("too-much", GiB, pool="over")


def test_a_snapshot_taken_since_the_last_heartbeat_is_not_in_its_free_space_yet(small):
    """Thick placement goes by the free space the node reported: a snapshot cut (or still copied) since then
    takes room that report does not show, as a thick volume placed since does."""
    env = small
    env.clock.now += 5
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 40 * GiB, 14 * GiB)])  # "big" made, thin: 0 used
    env.clock.now += 5
    env.svc.create_snapshot("snap-big", "big")
    with pytest.raises(ResourceExhausted, match=r"thick: real free space\) \(largest: node-a/data0 8.0 GiB"):
        env.svc.create_volume("thick", 10 * GiB, pool="small", thin=False)  # 14 reported - 6 unreported
    env.clock.now += 5
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 40 * GiB, 14 * GiB)])  # the reflink took nothing
    assert env.svc.create_volume("thick", 10 * GiB, pool="small", thin=False).owner_node == "node-a"


# ---- F11: a clone failed for a while is retried; one failed for good stays an error ------------------------


def test_a_clone_the_agent_could_not_be_asked_for_stays_creating_and_reconcile_makes_it(env):
    node = owner(env)
    env.agents.down.add(node)  # unreachable for a moment, still healthy to the controller
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", "volume/vol-1")
    assert env.store.get_volume("vol-c").state == CREATING  # not given up: a repeat or reconcile asks again
    assert env.svc.reconcile_once() == [] and env.store.get_volume("vol-c").state == CREATING  # still down
    env.agents.down.discard(node)
    assert env.svc.reconcile_once() == ["clone vol-c finished copying"]
    clone = env.store.get_volume("vol-c")
    assert clone.state == AVAILABLE and clone.id in env.agents.agent(node).volumes
    assert [(o.kind, o.state) for o in env.store.list_operations("vol-c")] == [
        ("clone_volume", "failed"), ("clone_volume", "done")]


def test_a_clone_the_agent_refused_for_good_stays_an_error_that_reconcile_leaves_alone(env):
    env.agents.fail_next("clone_volume", ResourceExhausted("fake agent: disk data0 has 0 bytes free"))
    with pytest.raises(ResourceExhausted):
        env.svc.clone_volume("vol-c", "volume/vol-1")
    assert env.store.get_volume("vol-c").state == ERROR
    calls = env.agents.count("clone_volume")
    env.svc.reconcile_once()
    assert env.store.get_volume("vol-c").state == ERROR and env.agents.count("clone_volume") == calls
    assert env.svc.clone_volume("vol-c", "volume/vol-1").state == AVAILABLE  # shoalctl's repeat asks again


def test_a_repeat_of_a_failed_clone_that_fails_for_a_while_leaves_it_failed_for_the_next_repeat(env):
    """Its agent still reports the copy that failed: "creating" would only have reconcile record that failure
    again.  The repeat's caller got UNAVAILABLE, and repeats."""
    env.agents.copy_steps = 2
    clone = env.svc.clone_volume("vol-c", "volume/vol-1")
    env.agents.fail_copy(clone.owner_node, clone.id)
    with pytest.raises(FailedPrecondition):
        env.svc.clone_volume("vol-c", "volume/vol-1")  # failed for good: "error"
    env.agents.copy_steps = 0
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", "volume/vol-1")
    assert env.store.get_volume("vol-c").state == ERROR
    assert env.svc.clone_volume("vol-c", "volume/vol-1").state == AVAILABLE


# ---- F12: a clone failed for good does not hold its source ---------------------------------------------------


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_a_clone_failed_for_good_does_not_pin_its_source(env, kind):
    source = "snap-1" if kind == "snapshot" else "vol-1"
    if kind == "snapshot":
        env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.copy_steps = 2
    clone = env.svc.clone_volume("vol-c", f"{kind}/{source}")
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):  # copying: kept
        env.svc.delete_snapshot("snap-1") if kind == "snapshot" else env.svc.delete_volume("vol-1")
    env.agents.fail_copy(clone.owner_node, clone.id, "copy failed: Input/output error")
    with pytest.raises(FailedPrecondition, match="Input/output error"):
        env.svc.clone_volume("vol-c", f"{kind}/{source}")
    assert env.store.get_volume("vol-c").state == ERROR
    if kind == "volume":
        assert env.svc.expand_volume("vol-1", 2 * GiB).size_bytes == 2 * GiB  # grows, too
        env.svc.delete_volume("vol-1")
    else:
        env.svc.delete_snapshot("snap-1")
        assert env.store.get_snapshot("snap-1") is None
    calls = env.agents.count("clone_volume")
    with pytest.raises(FailedPrecondition, match=f"the {kind} {source} clone vol-c is made from is gone: delete"):
        env.svc.clone_volume("vol-c", f"{kind}/{source}")
    assert env.agents.count("clone_volume") == calls
    env.svc.delete_volume("vol-c")
    assert env.store.get_volume("vol-c") is None


def test_csi_get_capacity_counts_snapshots(csi):
    """GetCapacity offers what placement would take: a snapshot's promise is off it, as for create and clone."""
    pool = {"pool": "default"}
    before = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=pool)).available_capacity
    csi.env.svc.create_volume("vol-snapped", 2 * GiB)
    with_volume = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=pool)).available_capacity
    assert with_volume == before - 2 * GiB
    csi.env.svc.create_snapshot("snap-1", "vol-snapped")
    assert csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=pool)).available_capacity \
        == with_volume - 2 * GiB
    csi.env.svc.delete_snapshot("snap-1")
    assert csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=pool)).available_capacity == with_volume
