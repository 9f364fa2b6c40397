"""Snapshots and clones in the controller (controller/domain/snapshots.py), against both stores.

Agents are ``FakeAgents`` (our own boundary, controller/domain/agents.py):
with ``copy_steps`` 0 a copy is done at once (a reflink), with N > 0 it is a
background copy that finishes after N looks; ``fail_copy`` makes one fail.
The real agents copy in tests/unit/test_agent_snapshots.py and end to end in
tests/integration/test_snapshots_e2e.py.
"""

from __future__ import annotations

import pytest

from controller.domain.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                      Unavailable)
from controller.domain.model import AVAILABLE, CREATING, DELETING, ERROR, READY, Disk
from tests.unit.test_controller_service import GiB, Env, iqn


@pytest.fixture(params=["memory", "sqlite"])
def env(request, tmp_path):
    from controller.store import MemoryStore, SqliteStore

    store = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "state.db"))
    env = Env(store, tmp_path)
    env.svc.create_volume("vol-1", GiB)
    yield env
    if request.param == "sqlite":
        store.close()


def owner(env, name="vol-1"):
    return env.store.get_volume(name).owner_node


# ---- snapshots -------------------------------------------------------------------------------


def test_snapshot_by_reflink_is_ready_at_once_and_idempotent(env):
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    volume = env.store.get_volume("vol-1")
    assert (snap.volume, snap.volume_id, snap.size_bytes, snap.state, snap.progress) == (
        "vol-1", volume.id, GiB, READY, 1.0)
    assert (snap.owner_node, snap.disk) == (volume.owner_node, volume.disk)
    assert env.agents.agent(volume.owner_node).snapshots[snap.id]["volume_id"] == volume.id
    assert env.svc.create_snapshot("snap-1", "vol-1") == snap
    assert env.agents.count("create_snapshot") == 1
    env.svc.create_volume("vol-2", GiB)
    with pytest.raises(AlreadyExists, match="of volume vol-1, not vol-2"):
        env.svc.create_snapshot("snap-1", "vol-2")
    ops = [(o.kind, o.state) for o in env.store.list_operations("snap-1")]
    assert ops == [("create_snapshot", "done")]


def test_a_background_copy_reports_progress_until_ready(env):
    env.agents.copy_steps = 4
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    assert (snap.state, snap.progress) == (CREATING, 0.0)
    seen = [env.svc.get_snapshot("snap-1").progress for _ in range(2)]
    assert seen == [0.25, 0.5]
    assert [s.progress for s in env.svc.list_snapshots(volume="vol-1")] == [0.75]
    assert env.svc.reconcile_once() and env.store.get_snapshot("snap-1").state == READY
    assert env.svc.get_snapshot("snap-1").progress == 1.0


def test_snapshot_bad_input_and_missing_volume_change_nothing(env):
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="snapshot name"):
        env.svc.create_snapshot("Bad_Name", "vol-1")
    with pytest.raises(NotFound, match="volume nope"):
        env.svc.create_snapshot("snap-1", "nope")
    assert env.snapshot() == before and env.store.list_snapshots() == []


def test_snapshot_of_a_volume_whose_node_is_down_is_unavailable_and_recorded_only_after(env):
    env.agents.down.add(owner(env))
    env.clock.now += 60  # no heartbeat: unhealthy
    with pytest.raises(Unavailable, match="unhealthy"):
        env.svc.create_snapshot("snap-1", "vol-1")
    assert env.store.list_snapshots() == []


def test_a_temporary_failure_leaves_it_creating_and_a_repeat_or_reconcile_finishes_it(env):
    env.agents.fail_next("create_snapshot")
    with pytest.raises(Unavailable):
        env.svc.create_snapshot("snap-1", "vol-1")
    assert env.store.get_snapshot("snap-1").state == CREATING  # recorded before acting
    assert env.svc.get_snapshot("snap-1").state == CREATING  # a read only looks: it never takes a snapshot
    assert env.svc.create_snapshot("snap-1", "vol-1").state == READY  # the repeat: the agent never had it, so it
    # is asked again (reconcile does the same, under the snapshot's lock)


def test_a_failed_copy_is_an_error(env):
    env.agents.copy_steps = 3
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_copy(snap.owner_node, snap.id, "copy failed: No space left on device")
    failed = env.svc.get_snapshot("snap-1")
    assert (failed.state, failed.message) == (ERROR, "copy failed: No space left on device")


def test_delete_snapshot_and_repeat(env):
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    env.svc.delete_snapshot("snap-1")
    env.svc.delete_snapshot("snap-1")
    assert env.store.list_snapshots() == []
    assert snap.id not in env.agents.agent(snap.owner_node).snapshots


def test_a_failed_delete_is_finished_by_reconcile(env):
    env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_next("delete_snapshot")
    with pytest.raises(Unavailable):
        env.svc.delete_snapshot("snap-1")
    assert env.store.get_snapshot("snap-1").state == DELETING
    assert "deleted snapshot snap-1" in env.svc.reconcile_once()
    assert env.store.list_snapshots() == []


def test_a_volume_with_snapshots_cannot_be_deleted(env):
    env.svc.create_snapshot("snap-1", "vol-1")
    with pytest.raises(FailedPrecondition, match="has snapshots \\(snap-1\\)"):
        env.svc.delete_volume("vol-1")
    assert env.store.get_volume("vol-1").state == AVAILABLE
    env.svc.delete_snapshot("snap-1")
    env.svc.delete_volume("vol-1")


# ---- clones ----------------------------------------------------------------------------------


def test_clone_of_a_snapshot_lives_beside_it(env):
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    clone = env.svc.clone_volume("vol-c", "snap-1")
    assert (clone.owner_node, clone.disk, clone.size_bytes, clone.pool, clone.state, clone.source) == (
        snap.owner_node, snap.disk, GiB, "default", AVAILABLE, "snapshot/snap-1")
    fake = env.agents.agent(snap.owner_node).volumes[clone.id]
    assert fake["source"] == f"snapshot:{snap.id}"
    assert env.svc.clone_volume("vol-c", "snap-1") == clone  # repeat
    assert env.svc.clone_volume("vol-c", "snapshot/snap-1") == clone
    with pytest.raises(AlreadyExists, match="clone of snapshot/snap-1"):
        env.svc.clone_volume("vol-c", "vol-1")
    with pytest.raises(AlreadyExists, match="not a clone"):
        env.svc.clone_volume("vol-1", "snap-1")


def test_clone_of_a_volume_in_the_background_with_progress(env):
    env.agents.copy_steps = 3
    clone = env.svc.clone_volume("vol-c", "volume/vol-1")
    assert (clone.state, clone.owner_node, clone.source) == (CREATING, owner(env), "volume/vol-1")
    assert env.svc.clone_progress(clone) == 0.0
    with pytest.raises(FailedPrecondition, match="only an available volume"):
        env.svc.attach_volume("vol-c", "node-b")
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):
        env.svc.delete_volume("vol-1")
    looked = env.svc.observe_volume("vol-c")
    assert env.svc.clone_progress(looked) == pytest.approx(1 / 3)
    assert env.svc.clone_volume("vol-c", "vol-1").state == CREATING  # a repeat looks too
    assert "clone vol-c finished copying" in env.svc.reconcile_once()
    done = env.store.get_volume("vol-c")
    assert done.state == AVAILABLE and env.svc.clone_progress(done) == 0.0
    env.svc.attach_volume("vol-c", "node-b")


def test_a_snapshot_being_cloned_cannot_be_deleted(env):
    env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.copy_steps = 5
    env.svc.clone_volume("vol-c", "snap-1")
    with pytest.raises(FailedPrecondition, match="being cloned to vol-c"):
        env.svc.delete_snapshot("snap-1")
    env.svc.delete_volume("vol-c")  # a clone still copying can go (the agent stops its copy)
    env.svc.delete_snapshot("snap-1")


def test_a_failed_clone_copy_is_an_error_and_a_repeat_starts_it_again(env):
    env.agents.copy_steps = 2
    clone = env.svc.clone_volume("vol-c", "vol-1")
    env.agents.fail_copy(clone.owner_node, clone.id)
    assert env.svc.observe_volume("vol-c").state == ERROR
    again = env.svc.clone_volume("vol-c", "vol-1")
    assert again.state == CREATING
    env.svc.observe_volume("vol-c")
    assert env.svc.observe_volume("vol-c").state == AVAILABLE


def test_clone_source_errors(env):
    env.svc.create_snapshot("twin", "vol-1")
    env.svc.create_volume("twin", GiB)
    before = env.store.list_volumes()
    with pytest.raises(InvalidArgument, match="both a snapshot and a volume"):
        env.svc.clone_volume("vol-c", "twin")
    with pytest.raises(NotFound, match="no snapshot or volume nope"):
        env.svc.clone_volume("vol-c", "nope")
    with pytest.raises(InvalidArgument, match="snapshot/NAME or volume/NAME"):
        env.svc.clone_volume("vol-c", "pool/twin")
    with pytest.raises(NotFound, match="snapshot vol-1 does not exist"):
        env.svc.clone_volume("vol-c", "snapshot/vol-1")
    assert env.store.list_volumes() == before


def test_clone_into_a_pool_without_the_source_disk_is_refused(env):
    node = owner(env)
    other = next(n for n in ("node-a", "node-b", "node-c") if n != node)
    env.svc.create_pool("elsewhere", [(other, "data0")])
    with pytest.raises(FailedPrecondition, match=f"does not include {node}/data0"):
        env.svc.clone_volume("vol-c", "vol-1", pool="elsewhere")
    env.svc.create_pool("here", [(node, "data0")])
    assert env.svc.clone_volume("vol-c", "vol-1", pool="here").pool == "here"


def test_clone_needs_room_on_the_source_disk(env):
    node = owner(env)
    env.svc.register_node(node, iqn(node), "127.0.0.1:7000", ["127.0.0.1:3260"], {},
                          [Disk("data0", "/srv/data0", int(1.5 * GiB), GiB)])
    from controller.domain.errors import ResourceExhausted

    with pytest.raises(ResourceExhausted, match="must live beside its source"):
        env.svc.clone_volume("vol-c", "vol-1")
    assert env.store.get_volume("vol-c") is None


class Stop(BaseException):
    """The controller process stopping where it is (nothing after it runs, no ``except Exception`` sees it)."""


def test_a_clone_left_creating_by_a_stop_is_finished_by_reconcile(env):
    def stop(node, method, volume_id):
        if method == "clone_volume":
            raise Stop()

    env.agents.before_call = stop
    with pytest.raises(Stop):
        env.svc.clone_volume("vol-c", "vol-1")
    env.agents.before_call = None
    assert env.store.get_volume("vol-c").state == CREATING  # recorded before the agent was asked
    assert "clone vol-c finished copying" in env.svc.reconcile_once()
    assert env.store.get_volume("vol-c").state == AVAILABLE


# ---- repeats after failures, sources, locks ----------------------------------------------------------


def test_a_snapshot_whose_copy_failed_after_it_was_taken_is_not_taken_again(env):
    """Its point in time was answered (created_at): taken again now, it would hold later writes under that time.
    The failure is the answer, for good; the way out is to delete it and take a new one."""
    env.agents.copy_steps = 3
    snap = env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_copy(snap.owner_node, snap.id, "copy failed: No space left on device")
    assert env.svc.get_snapshot("snap-1").state == ERROR
    env.clock.now += 10
    with pytest.raises(FailedPrecondition, match="failed after it was taken"):
        env.svc.create_snapshot("snap-1", "vol-1")
    assert env.agents.count("create_snapshot") == 1 and env.agents.count("delete_snapshot") == 0
    assert [(o.state, o.detail) for o in env.store.list_operations("snap-1")] == [
        ("done", "copy; creating"), ("failed", "copy failed: No space left on device")]
    env.svc.delete_snapshot("snap-1")
    again = env.svc.create_snapshot("snap-1", "vol-1")
    assert again.id != snap.id and (again.state, again.created_at) == (CREATING, env.clock.now)


def test_a_snapshot_taken_after_its_failed_request_has_the_time_it_was_cut(env):
    env.agents.fail_next("create_snapshot")
    with pytest.raises(Unavailable):
        env.svc.create_snapshot("snap-1", "vol-1")
    asked_at = env.clock.now
    assert env.store.get_snapshot("snap-1").created_at == asked_at
    env.clock.now += 15  # the volume is written meanwhile; the snapshot holds what it has when it is cut
    snap = env.svc.create_snapshot("snap-1", "vol-1")  # the repeat: the agent never had it, so it is taken now
    assert snap.state == READY and snap.created_at == asked_at + 15
    assert env.store.get_snapshot("snap-1").created_at == asked_at + 15


def test_a_failed_clone_is_made_by_its_repeat_when_the_agent_copies_at_once(env):
    env.agents.fail_next("clone_volume", ResourceExhausted("fake agent: disk data0 has 0 bytes free"))
    with pytest.raises(ResourceExhausted):
        env.svc.clone_volume("vol-c", "vol-1")
    assert env.store.get_volume("vol-c").state == ERROR  # refused for good: only a repeat asks again
    again = env.svc.clone_volume("vol-c", "vol-1")  # a reflink: the agent answers "ready"
    assert again.state == AVAILABLE and env.store.get_volume("vol-c") == again
    assert env.agents.agent(again.owner_node).volumes[again.id]["source"] == env.store.get_volume("vol-1").id
    assert [(o.kind, o.state) for o in env.store.list_operations("vol-c")] == [
        ("clone_volume", "failed"), ("clone_volume", "done")]
    env.svc.attach_volume("vol-c", "node-b")


def test_a_clone_failed_for_a_while_keeps_its_source_volume_or_snapshot(env):
    env.svc.create_snapshot("snap-1", "vol-1")
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-s", "snapshot/snap-1")
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-v", "volume/vol-1")
    # Still being made (its repeat or reconcile asks again): its source is kept as it is.
    assert [env.store.get_volume(n).state for n in ("vol-s", "vol-v")] == [CREATING, CREATING]
    with pytest.raises(FailedPrecondition, match="being cloned to vol-s: wait until the clone is available"):
        env.svc.delete_snapshot("snap-1")
    env.svc.delete_volume("vol-s")
    env.svc.delete_snapshot("snap-1")
    with pytest.raises(FailedPrecondition, match="being cloned to vol-v"):
        env.svc.delete_volume("vol-1")
    assert env.svc.clone_volume("vol-v", "volume/vol-1").state == AVAILABLE
    env.svc.delete_volume("vol-1")  # a made clone keeps nothing


@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_a_failed_clone_is_never_made_from_a_newer_source_of_the_same_name(env, kind):
    """A failed clone recorded before failed clones kept their source: its source was deleted and the name
    reused since.  The repeat refuses rather than copy the newer data under the old request."""
    from dataclasses import replace

    old = env.svc.create_snapshot("src", "vol-1") if kind == "snapshot" else env.svc.create_volume("src", GiB)
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("vol-c", f"{kind}/src")
    clone = env.store.get_volume("vol-c")
    env.svc.delete_volume("vol-c")  # (as such a controller allowed:) the source goes, the clone's row stays
    if kind == "snapshot":
        env.svc.delete_snapshot("src")
    else:
        env.svc.delete_volume("src")
    env.store.put_volume(clone)
    env.clock.now += 5
    new = env.svc.create_snapshot("src", "vol-1") if kind == "snapshot" else env.svc.create_volume(
        "src", GiB, constraints={"zone": env.store.get_node(old.owner_node).labels["zone"]})
    assert new.id != old.id
    calls = env.agents.count("clone_volume")
    with pytest.raises(FailedPrecondition, match=f"{kind} src is now another one, made after the clone"):
        env.svc.clone_volume("vol-c", f"{kind}/src")
    assert env.agents.count("clone_volume") == calls  # the agent was never asked to copy the new one
    assert env.store.get_volume("vol-c") == replace(clone, state=ERROR)
    # The dead clone keeps nothing: the new source goes when asked.
    if kind == "snapshot":
        env.svc.delete_snapshot("src")
    else:
        env.svc.delete_volume("src")


def test_crossed_clones_take_their_locks_in_one_order(env):
    """clone a <- volume/b and clone b <- volume/a at once: each takes both names' locks, in one order, so
    neither waits for the other crosswise (both fail, NOT_FOUND) and later calls on a and b go on."""
    import threading

    from controller.domain.errors import DomainError

    meet = threading.Barrier(2, timeout=5)
    real = env.store.get_volume
    met: set[str] = set()

    def get_volume(name):  # each clone's first look meets the other's, so they run side by side
        thread = threading.current_thread().name
        if thread.startswith("clone-") and thread not in met:
            met.add(thread)
            meet.wait()
        return real(name)

    env.store.get_volume = get_volume
    errors: list[DomainError] = []

    def run(name, source):
        try:
            env.svc.clone_volume(name, source)
        except DomainError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", "volume/b"), name="clone-1", daemon=True),
               threading.Thread(target=run, args=("b", "volume/a"), name="clone-2", daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    env.store.get_volume = real
    assert not any(t.is_alive() for t in threads), "the crossed clones wait for each other for ever"
    assert sorted(type(e).__name__ for e in errors) == ["NotFound", "NotFound"]
    assert env.svc.create_volume("a", GiB).state == AVAILABLE


def test_a_clone_takes_its_own_lock_and_its_sources_in_one_order_for_all(env):
    """The order the crossed clones above rely on: snapshot keys first (as create_snapshot takes them), then
    volume names, sorted; whichever of the two is the clone."""
    from contextlib import contextmanager

    taken = []
    hold = env.svc._volume_locks.hold

    @contextmanager
    def recording(name):
        taken.append(name)
        with hold(name):
            yield

    env.svc._volume_locks.hold = recording
    for name, source in (("a", "volume/b"), ("b", "volume/a")):
        with pytest.raises(NotFound):
            env.svc.clone_volume(name, source)
    assert taken == ["a", "b", "a", "b"]
    env.svc._volume_locks.hold = hold
    env.svc.create_snapshot("snap-1", "vol-1")
    env.svc._volume_locks.hold = recording
    taken.clear()
    env.svc.clone_volume("a-clone", "snapshot/snap-1")
    assert taken == ["snapshot/snap-1", "a-clone"]
