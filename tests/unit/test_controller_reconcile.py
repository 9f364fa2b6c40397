"""reconcile_once (controller/domain/reconcile.py): desired state in the store against FakeAgents' observed state."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import pytest

from controller.domain.errors import Unavailable
from controller.domain.model import AVAILABLE, CREATING, DELETING, DETACHING
from tests.unit.test_controller_service import GiB, env, iqn  # noqa: F401  (env is a fixture)


def test_nothing_to_do(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    assert env.svc.reconcile_once() == []


def test_reexports_after_an_agent_restart(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    secret = env.store.get_chap("vol-1").secret
    env.agents.restart("node-a")
    assert env.svc.reconcile_once() == [f"re-exported volume vol-1 to {iqn('node-b')}"]
    assert list(env.agents.agent("node-a").exports) == [(volume.id, iqn("node-b"))]
    assert env.agents.secret_for("node-a", volume.id, iqn("node-b")) == secret  # the same CHAP secret
    assert env.svc.reconcile_once() == []


def test_removes_exports_nobody_should_have(env):
    """An export of a known volume to a node with no attachment goes; one of a volume id the controller does
    not know goes only once the agent has no such volume either (after a lost or older state, the volumes the
    controller forgot keep their exports and their consumers' sessions: nothing is cut on a guess)."""
    volume = env.svc.create_volume("vol-1", GiB)
    owner = env.agents.client(env.store.get_node("node-a"))
    owner.export_volume(volume.id, iqn("node-c"), "u", "stray-secret-123456")
    env.agents.agent("node-a").volumes["orphan-id"] = {"volume_id": "orphan-id", "size_bytes": GiB, "disk": "data0"}
    owner.export_volume("orphan-id", iqn("node-b"), "u", "stray-secret-123456")
    repaired = env.svc.reconcile_once()
    assert repaired == [f"removed export of volume vol-1 to {iqn('node-c')}"]
    assert list(env.agents.agent("node-a").exports) == [("orphan-id", iqn("node-b"))]
    assert "orphan-id" in env.agents.agent("node-a").volumes  # unknown data is never deleted on a guess
    del env.agents.agent("node-a").volumes["orphan-id"]  # the volume itself is gone: its export means nothing
    assert env.svc.reconcile_once() == [
        f"removed export of volume (unknown id orphan-id, gone from the node) to {iqn('node-b')}"]
    assert env.agents.agent("node-a").exports == {}


def test_finishes_a_create_the_controller_did_not_finish(env):
    env.svc.create_volume("vol-0", GiB)
    row = env.svc.create_volume("vol-1", GiB)
    # As if the controller stopped after recording the decision, before calling the agent.
    env.agents.agent(row.owner_node).volumes.pop(row.id)
    env.store.put_volume(replace(row, state=CREATING))
    assert env.svc.reconcile_once() == [f"created volume vol-1 on {row.owner_node}/data0"]
    assert env.store.get_volume("vol-1").state == AVAILABLE
    assert row.id in env.agents.agent(row.owner_node).volumes


def test_a_create_finished_meanwhile_is_not_reported(env):
    """Reconcile waits for the create in flight (the volume's lock), looks again, and claims nothing."""
    env.svc.create_volume("vol-0", GiB)
    row = env.svc.create_volume("vol-1", GiB)
    env.store.put_volume(replace(row, state=CREATING))
    result = []
    with env.svc._volume_locks.hold("vol-1"):  # as if a create of vol-1 were in flight
        worker = threading.Thread(target=lambda: result.append(env.svc.reconcile_once()))
        worker.start()
        deadline = time.monotonic() + 10
        while env.svc._volume_locks._locks["vol-1"][1] < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # until reconcile waits for the lock
        env.store.put_volume(row)  # ...and that create finishes
    worker.join(10)
    assert result == [[]]
    assert env.store.get_volume("vol-1").state == AVAILABLE


def test_finishes_deletes_and_detaches(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.create_volume("vol-2", GiB)
    env.svc.attach_volume("vol-2", "node-c")
    env.agents.fail_next("delete_volume")
    with pytest.raises(Unavailable):
        env.svc.delete_volume("vol-1")
    env.agents.fail_next("detach_volume")
    with pytest.raises(Unavailable):
        env.svc.detach_volume("vol-2", "node-c")
    assert env.store.get_volume("vol-1").state == DELETING
    assert env.store.get_attachment("vol-2", "node-c").state == DETACHING
    # A detaching attachment keeps its export: the consumer may still be flushing.
    assert sorted(env.svc.reconcile_once()) == ["deleted volume vol-1", "detached volume vol-2 from node-c"]
    assert env.store.get_volume("vol-1") is None and env.store.list_attachments() == []
    assert env.store.get_volume("vol-2").state == AVAILABLE
    assert all(not a.exports for a in env.agents.agents.values())


def test_unreachable_and_unhealthy_agents_are_skipped(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.restart("node-a")
    env.agents.down.add("node-a")
    assert env.svc.reconcile_once() == []
    env.agents.down.clear()
    env.clock.now += 60
    env.svc.heartbeat("node-b")
    env.svc.heartbeat("node-c")
    calls = env.agents.count("get_state", "node-a")
    assert env.svc.reconcile_once() == []
    assert env.agents.count("get_state", "node-a") == calls  # node-a is unhealthy: not asked
    env.svc.heartbeat("node-a")
    assert env.svc.reconcile_once() == [f"re-exported volume vol-1 to {iqn('node-b')}"]


def test_waits_for_the_owner_before_finishing_rows(env):
    row = env.svc.create_volume("vol-1", GiB)
    env.agents.agent("node-a").volumes.pop(row.id)
    env.store.put_volume(replace(row, state=CREATING))
    env.clock.now += 60
    env.svc.heartbeat("node-b")
    assert env.svc.reconcile_once() == []
    assert env.store.get_volume("vol-1").state == CREATING
    env.svc.heartbeat("node-a")
    assert env.svc.reconcile_once() == ["created volume vol-1 on node-a/data0"]


def test_observed_exports_may_list_their_initiators(env):
    """An agent may report one export per volume with all its initiators (``initiators``)."""
    from controller.domain.reconcile import _initiators
    assert _initiators({"volume_id": "v", "initiators": ["iqn.a", "iqn.b"]}) == ["iqn.a", "iqn.b"]
    assert _initiators({"volume_id": "v", "initiator_iqn": "iqn.a"}) == ["iqn.a"]
    assert _initiators({"volume_id": "v"}) == []


def test_a_standing_condition_is_logged_once_not_on_every_pass(env, caplog):
    """A pass runs every few seconds: an unknown volume, its export and a volume missing on its node are
    logged at their level when first found, hourly while they last, and at once when they come back after
    a pass without them; the passes between say them at debug level."""
    volume = env.svc.create_volume("vol-1", GiB)
    owner_id = volume.owner_node
    owner = env.agents.agent(owner_id)
    other = "node-b" if owner_id != "node-b" else "node-c"
    owner.volumes.pop(volume.id)  # missing on its node
    owner.volumes["orphan-id"] = {"volume_id": "orphan-id", "size_bytes": GiB, "disk": "data0"}
    env.agents.client(env.store.get_node(owner_id)).export_volume("orphan-id", iqn(other), "u",
                                                                   "stray-secret-123456")
    caplog.set_level(logging.DEBUG, logger="shoal.controller.reconcile")

    def loud():
        lines = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        caplog.clear()
        return lines

    expected = sorted([
        f"reconcile: node {owner_id} exports volume id orphan-id, which the controller does not know there, to "
        f"{iqn(other)}: kept (a consumer may be using it; was the controller's state lost?)",
        f"reconcile: node {owner_id} holds volume id orphan-id that the controller does not know",
        f"reconcile: volume vol-1 ({volume.id}) is missing on its node {owner_id}"])
    env.svc.reconcile_once()
    assert loud() == expected
    for _ in range(3):
        env.svc.reconcile_once()
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "orphan-id" in r.getMessage()]
    assert loud() == [] and len(debug) == 6
    env.clock.now += 3600  # an hour later, still there: said again, once
    for node in env.store.list_nodes():
        env.svc.heartbeat(node.id)
    env.svc.reconcile_once()
    env.svc.reconcile_once()
    assert loud() == expected
    del owner.volumes["orphan-id"]  # gone (and its export with it: nothing holds the volume any more) ...
    assert env.svc.reconcile_once() == [
        f"removed export of volume (unknown id orphan-id, gone from the node) to {iqn(other)}"]
    assert loud() == []  # the missing volume is still missing: not news
    owner.volumes["orphan-id"] = {"volume_id": "orphan-id", "size_bytes": GiB, "disk": "data0"}  # ... and back
    env.svc.reconcile_once()
    assert loud() == [f"reconcile: node {owner_id} holds volume id orphan-id that the controller does not know"]


def test_a_repair_that_keeps_failing_backs_off_and_one_that_succeeds_is_forgotten(env):
    """A delete the owner's agent keeps refusing was tried on every pass, each try an operation (and under
    Kubernetes an Event): the 1,000-entry operations log wore out in about an hour.  It is now retried on the
    next two passes, then after 10 s, 20 s, ... up to 5 minutes; a success forgets its failures."""
    from controller.domain.errors import FailedPrecondition

    volume = env.svc.create_volume("vol-1", GiB)
    env.store.put_volume(replace(env.store.get_volume("vol-1"), state=DELETING))  # a delete left half done

    def attempts():
        return [c for c in env.agents.calls if c[1] == "delete_volume" and c[2] == volume.id]

    def later(seconds):  # the nodes heartbeat meanwhile: the owner stays healthy
        env.clock.now += seconds
        for node in env.svc.list_nodes():
            env.svc.heartbeat(node.id, list(node.disks))

    for _ in range(6):
        env.agents.fail_next("delete_volume", FailedPrecondition("the agent refuses: volume busy"))
    for _ in range(5):
        env.svc.reconcile_once()
    assert len(attempts()) == 3  # two retried at once, the third failure backs off 10 s
    later(10)
    env.svc.reconcile_once()
    env.svc.reconcile_once()
    assert len(attempts()) == 4  # tried once more; now 20 s
    later(19)
    env.svc.reconcile_once()
    assert len(attempts()) == 4
    later(1)
    env.svc.reconcile_once()
    assert len(attempts()) == 5
    later(40)
    env.agents.failures.clear()  # the agent lets it go now
    assert any("vol-1" in line for line in env.svc.reconcile_once())
    assert env.store.get_volume("vol-1") is None and env.svc._repair_failures == {}


def test_a_volume_its_agent_reports_in_error_is_reported_with_the_agents_message_not_repaired(env, caplog):
    """The agent lists a volume it cannot serve (its record damaged, its image missing) in state "error" with a
    message saying why.  Reconcile did not see the state: it tried a re-export (refused on every pass, each try
    an operation), grew a damaged volume smaller than its row, and said nothing (size above 0: not "missing").
    It now logs the agent's message at ERROR once per condition, and neither re-exports nor grows it."""
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    owner = env.agents.agent(volume.owner_node)
    env.agents.restart(volume.owner_node)  # its export is not served (the agent keeps it until repaired)
    message = f"/data/{volume.id}.json: corrupt record (Expecting value: line 1 column 1 (char 0))"
    owner.volumes[volume.id].update(state="error", message=message, size_bytes=GiB // 2)
    caplog.set_level(logging.DEBUG, logger="shoal.controller.reconcile")

    def loud():
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        caplog.clear()
        return lines

    report = (f"reconcile: volume vol-1 ({volume.id}) is in error on its node {volume.owner_node}: {message}; it is "
              "not exported again or grown until it is repaired there (or deleted)")
    assert env.svc.reconcile_once() == [] and loud() == [report]
    assert env.svc.reconcile_once() == [] and loud() == []  # still so: not news
    assert env.agents.count("export_volume", volume.owner_node) == 1  # the attach's own, no re-export
    assert env.agents.count("expand_volume") == 0 and owner.volumes[volume.id]["size_bytes"] == GiB // 2
    owner.volumes[volume.id].update(state="ready", message="", size_bytes=GiB)  # repaired on the node
    assert env.svc.reconcile_once() == [f"re-exported volume vol-1 to {iqn('node-b')}"] and loud() == []


def test_the_grpc_client_passes_each_volumes_state_and_message_to_reconcile():
    """``GrpcAgentClient.get_state`` kept size, disk and path of each volume and dropped its state and message."""
    from controller.agents_grpc import AgentCallSettings, GrpcAgentClient
    from protos.shoal.v1 import agent_pb2

    class Stub:
        def GetState(self, request, timeout):  # noqa: N802 - the stub's method name
            return agent_pb2.AgentState(node_id="node-a", volumes=[
                agent_pb2.VolumeInfo(volume_id="v1", size_bytes=GiB, disk="data0", state="error",
                                     message="v1.json: corrupt record"),
                agent_pb2.VolumeInfo(volume_id="v2", size_bytes=GiB, disk="data0")])  # an agent without states

    volumes = GrpcAgentClient("node-a", "127.0.0.1:1", Stub(), AgentCallSettings()).get_state()["volumes"]
    assert [(v["volume_id"], v["size_bytes"], v["state"], v["message"]) for v in volumes] == [
        ("v1", GiB, "error", "v1.json: corrupt record"), ("v2", GiB, "ready", "")]


def test_a_volume_whose_image_is_missing_on_its_agent_is_reported_missing_with_the_agents_message(env, caplog):
    """A record without its image: state "error", size 0.  Reported missing, as before, now with the agent's
    message (which names the image the agent looked for), and not re-exported."""
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.restart(volume.owner_node)
    message = f"the record of volume {volume.id} is there but its image /d/{volume.id}.img is missing"
    env.agents.agent(volume.owner_node).volumes[volume.id].update(state="error", message=message, size_bytes=0)
    with caplog.at_level(logging.ERROR, logger="shoal.controller.reconcile"):
        assert env.svc.reconcile_once() == []
    assert [r.getMessage() for r in caplog.records] == [
        f"reconcile: volume vol-1 ({volume.id}) is missing on its node {volume.owner_node}: {message}"]
    assert env.agents.count("export_volume", volume.owner_node) == 1  # the attach's own, no re-export
