"""Regressions from the HA / fencing review, against both stores.

* A fence is "fenced" only once every owner that may still admit the node has answered FenceInitiator: a detach
  that could not reach the owner keeps the export record (the owner may still admit the node), and an owner a
  fence has a "not yet" step for is asked again even once no record names it any more
  (controller/domain/fencing.py, ``ControllerService.detach_volume``).
* Snapshot deletes that reconcile repeats back off as volume repairs do (``Reconciler._try``).

Agents are ``FakeAgents`` (see test_controller_service.py).
"""

from __future__ import annotations

from controller.domain.errors import FailedPrecondition, Unavailable
from controller.domain.model import AVAILABLE, FENCE_DONE, FENCING
from tests.unit.test_controller_service import GiB, iqn
from tests.unit.test_controller_service import env  # noqa: F401 - the fixture, used by name


def _silence_all_but(the_env, *alive):
    """Every node misses its heartbeats (for longer than heartbeat_timeout) except ``alive``."""
    the_env.clock.now += 30
    for node in alive:
        the_env.svc.heartbeat(node)


def _admits(the_env, owner, volume, node):
    """The owner's agent exports ``volume`` to ``node``'s initiator."""
    return (volume.id, iqn(node)) in the_env.agents.agent(owner).exports


def _steps(node):
    return {line.split(":", 1)[0]: line for line in node.fence_steps}


# ---- F1: a fence reaches every owner that may still admit the node ------------------------------

def test_a_fence_waits_for_the_owner_after_a_forced_detach_while_fencing(env):
    """Fence first (owner down: "fencing"), then force-detach: the next attempts keep waiting for the owner."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-c")  # owner node-a and consumer node-b are silent
    node = env.svc.fence_node("node-b", "host hung")
    assert node.fence == FENCING and _steps(node)["node-a"].startswith("node-a: not yet: ")
    env.svc.detach_volume("vol-1", "node-b", force=True)
    assert env.svc.fence_pass() == ["node node-b is fencing"]
    node = env.svc.get_node("node-b")
    assert node.fence == FENCING and _steps(node)["node-a"].startswith("node-a: not yet: ")
    assert env.agents.count("fence_initiator", "node-a") == 0 and _admits(env, "node-a", volume, "node-b")

    env.svc.heartbeat("node-a")  # the owner is back: the loop asks it, and only then is node-b fenced
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    node = env.svc.get_node("node-b")
    assert node.fence == FENCE_DONE and _steps(node)["node-a"].startswith("node-a: fenced: ")
    assert env.agents.count("fence_initiator", "node-a") == 1 and not _admits(env, "node-a", volume, "node-b")
    assert env.store.list_exports() == []


def test_a_fence_after_a_forced_detach_asks_the_owner_it_could_not_reach(env):
    """Force-detach first (owner and consumer down), then fence: not "fenced" without the owner's answer, and an
    attach elsewhere once the owner is back does not leave the volume exported to the detached node too."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-c")
    env.svc.detach_volume("vol-1", "node-b", force=True)
    assert [e.initiator_iqn for e in env.store.list_exports("vol-1")] == [iqn("node-b")]  # the owner may admit it
    assert env.store.list_attachments() == [] and env.store.get_volume("vol-1").state == AVAILABLE
    node = env.svc.fence_node("node-b", "partitioned; moving its volumes")
    assert node.fence == FENCING and _steps(node)["node-a"].startswith("node-a: not yet: ")
    assert env.agents.count("fence_initiator") == 0

    env.svc.heartbeat("node-a")
    env.svc.attach_volume("vol-1", "node-c")  # the detached node's export goes first
    assert sorted(i for v, i in env.agents.agent("node-a").exports if v == volume.id) == [iqn("node-c")]
    assert [e.initiator_iqn for e in env.store.list_exports("vol-1")] == [iqn("node-c")]
    assert env.svc.fence_pass() == ["node node-b is fenced"]  # the owner's step was "not yet": asked again
    assert env.agents.count("fence_initiator", "node-a") == 1
    assert _steps(env.svc.get_node("node-b"))["node-a"].startswith("node-a: fenced: ")
    assert _admits(env, "node-a", volume, "node-c")  # the new consumer keeps its export


def test_a_detach_that_could_not_reach_the_owner_keeps_the_fence_asking_it(env):
    """A plain detach while the owner is unhealthy: the owner still admits the node, so a later fence asks it."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-b", "node-c")  # only the owner is silent
    env.svc.detach_volume("vol-1", "node-b")
    assert env.store.list_attachments() == [] and _admits(env, "node-a", volume, "node-b")
    assert env.store.get_export("vol-1", iqn("node-b")) is not None
    detach = next(o for o in env.store.list_operations(limit=100) if o.kind == "detach_volume")
    assert "owner node-a not reached" in detach.detail

    node = env.svc.fence_node("node-b", "rogue host")
    assert node.fence == FENCING and _steps(node)["node-a"].startswith("node-a: not yet: ")
    env.svc.heartbeat("node-a")
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    assert env.agents.count("fence_initiator", "node-a") == 1 and not _admits(env, "node-a", volume, "node-b")
    assert env.store.list_exports() == []


def test_an_owner_not_yet_asked_is_asked_again_once_reconcile_removed_the_record(env):
    """The record that made an owner one to ask can go before the fence's retry (reconcile removed the export
    once the owner was back): the owner's "not yet" step alone keeps it asked, and the fence waits for it."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-c")
    env.svc.fence_node("node-b", "host hung")
    env.svc.detach_volume("vol-1", "node-b", force=True)
    env.svc.heartbeat("node-a")
    assert env.svc.reconcile_once() == [f"removed export of volume vol-1 to {iqn('node-b')}"]
    assert env.store.list_exports() == [] and not _admits(env, "node-a", volume, "node-b")
    env.agents.down.add("node-a")  # the owner cannot answer the fence yet
    assert env.svc.fence_pass() == ["node node-b is fencing"]
    node = env.svc.get_node("node-b")
    assert node.fence == FENCING and _steps(node)["node-a"].startswith("node-a: not yet: ")
    env.agents.down.discard("node-a")
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    assert _steps(env.svc.get_node("node-b"))["node-a"].startswith("node-a: fenced: ")


def test_reconcile_unexports_what_a_detach_left_on_an_owner_that_was_down(env):
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-b", "node-c")
    env.svc.detach_volume("vol-1", "node-b")
    assert env.svc.reconcile_once() == []  # the owner is still down: nothing to do yet, the record stays
    assert env.store.get_export("vol-1", iqn("node-b")) is not None
    env.svc.heartbeat("node-a")
    assert env.svc.reconcile_once() == [f"removed export of volume vol-1 to {iqn('node-b')}"]
    assert not _admits(env, "node-a", volume, "node-b") and env.store.list_exports() == []
    assert env.svc.reconcile_once() == []
    env.svc.delete_volume("vol-1")


def test_reconcile_forgets_a_kept_record_once_the_owner_confirms_it_has_no_such_export(env):
    """The owner came back without the export (its agent lost it): it is asked to unexport (a no-op that
    confirms), and the record goes."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-b", "node-c")
    env.svc.detach_volume("vol-1", "node-b")
    env.agents.agent("node-a").exports.clear()
    env.svc.heartbeat("node-a")
    calls = env.agents.count("unexport_volume", "node-a")
    assert env.svc.reconcile_once() == [f"removed export of volume vol-1 to {iqn('node-b')}"]
    assert env.agents.count("unexport_volume", "node-a") == calls + 1
    assert env.store.list_exports() == [] and not _admits(env, "node-a", volume, "node-b")


def test_a_detach_whose_export_was_never_recorded_still_remembers_the_owner(env):
    """The export timed out on the controller but the owner made it: a detach while the owner is down records it
    (without target details), so the fence asks the owner and reconcile removes it."""
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})

    def late_export(node_id, method, volume_id):  # the owner exports, then its answer is lost
        if method == "export_volume":
            env.agents.before_call = None
            env.agents.client(env.store.get_node("node-a")).export_volume(volume.id, iqn("node-b"), "u", "s")
            # what the gRPC client makes of DEADLINE_EXCEEDED: a temporary failure (an attach that failed for good
            # has its export dropped at once: test_attach_failure_review.py)
            raise Unavailable("deadline exceeded (fake)")

    env.agents.before_call = late_export
    try:
        env.svc.attach_volume("vol-1", "node-b")
    except Unavailable:
        pass
    assert env.store.list_exports() == [] and _admits(env, "node-a", volume, "node-b")
    _silence_all_but(env, "node-c")
    env.svc.detach_volume("vol-1", "node-b", force=True)
    kept = env.store.get_export("vol-1", iqn("node-b"))
    assert kept is not None and kept.target_iqn == "" and env.store.list_attachments() == []
    assert env.svc.fence_node("node-b").fence == FENCING
    env.svc.heartbeat("node-a")
    assert env.svc.reconcile_once() == [f"removed export of volume vol-1 to {iqn('node-b')}"]
    assert env.store.list_exports() == [] and not _admits(env, "node-a", volume, "node-b")
    assert env.svc.fence_pass() == ["node node-b is fenced"]


def test_a_detach_reaching_the_owner_removes_the_record_as_before(env):
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-a")  # only the consumer is down: --force skips it, the owner unexports now
    env.svc.detach_volume("vol-1", "node-b", force=True)
    assert env.store.list_exports() == [] and not _admits(env, "node-a", volume, "node-b")
    node = env.svc.fence_node("node-b")
    assert node.fence == FENCE_DONE and node.fence_steps == ()


def test_a_repeated_detach_finishes_the_unexport_once_the_owner_is_back(env):
    volume = env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.attach_volume("vol-1", "node-b")
    _silence_all_but(env, "node-b", "node-c")
    env.svc.detach_volume("vol-1", "node-b")
    env.svc.heartbeat("node-a")
    env.svc.detach_volume("vol-1", "node-b")
    assert env.store.list_exports() == [] and not _admits(env, "node-a", volume, "node-b")
    calls = len(env.agents.calls)
    env.svc.detach_volume("vol-1", "node-b")  # nothing left: no call
    assert len(env.agents.calls) == calls


# ---- F4: snapshot deletes back off ------------------------------------------------------------

def test_snapshot_deletes_retried_by_reconcile_back_off_like_volume_deletes(env):
    env.svc.create_volume("vol-1", GiB, constraints={"zone": "a"})
    env.svc.create_snapshot("snap-1", "vol-1")
    env.svc.create_volume("vol-2", GiB, constraints={"zone": "a"})
    refusing = {"delete_snapshot", "delete_volume"}

    def refuse(node_id, method, volume_id):
        if method in refusing:
            raise FailedPrecondition("busy (fake, for good)")

    env.agents.before_call = refuse
    for call in (lambda: env.svc.delete_snapshot("snap-1"), lambda: env.svc.delete_volume("vol-2")):
        try:
            call()
        except FailedPrecondition:
            pass

    def ops(kind):
        return sum(1 for o in env.store.list_operations(limit=100_000) if o.kind == kind)

    for _ in range(20):  # 100 s of passes, every 5 s
        env.clock.now += 5
        for node in ("node-a", "node-b", "node-c"):
            env.svc.heartbeat(node)
        env.svc.reconcile_once()
    snapshot_calls, volume_calls = env.agents.count("delete_snapshot"), env.agents.count("delete_volume")
    assert snapshot_calls == volume_calls <= 7  # 1 + 2 at once + after 10, 20, 40 s (80 s not due yet)
    assert ops("delete_snapshot") == ops("delete_volume") == snapshot_calls

    refusing.clear()  # the agent lets go: the next due try deletes it, and says so once
    done = []
    for _ in range(40):
        env.clock.now += 5
        for node in ("node-a", "node-b", "node-c"):
            env.svc.heartbeat(node)
        done += env.svc.reconcile_once()
    assert done.count("deleted snapshot snap-1") == 1 and env.store.get_snapshot("snap-1") is None
    assert done.count("deleted volume vol-2") == 1 and env.store.get_volume("vol-2") is None
