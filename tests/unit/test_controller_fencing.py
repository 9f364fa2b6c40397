"""Two writers only on purpose, and fencing (controller/domain/fencing.py), against both stores.

Agents are ``FakeAgents`` (our own boundary, see test_controller_service.py); what an owner does when it
fences an initiator (ACL, sessions, reservations, commands in flight) is tested against the real target in
test_agent_fence.py and tests/integration/test_fencing.py.
"""

from __future__ import annotations

import pytest

from controller.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controller.domain.model import ATTACHED, AVAILABLE, FENCE_DONE, FENCED, FENCING, PUBLISHED, ChapCredential
from controller.domain.settings import ControllerSettings
from node_agent.iscsi.chap import initiator_secret
from tests.unit.test_controller_service import GiB, iqn
from tests.unit.test_controller_service import env  # noqa: F401 - the fixture, used by name


def test_a_second_node_is_refused_unless_shared(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b", login=False)
    before = env.snapshot()
    with pytest.raises(FailedPrecondition, match="published to node-b: .*--shared"):
        env.svc.attach_volume("vol-1", "node-c", login=False)
    assert env.snapshot() == before  # nothing changed, nothing exported to node-c
    assert (volume.id, iqn("node-c")) not in env.agents.agent("node-a").exports
    shared = env.svc.attach_volume("vol-1", "node-c", login=False, shared=True)
    assert (shared.state, shared.shared) == (PUBLISHED, True)
    assert env.store.get_attachment("vol-1", "node-c").shared
    assert not env.store.get_attachment("vol-1", "node-b").shared
    assert env.svc.attach_volume("vol-1", "node-c", login=False) == shared  # a repeat needs no flag


def test_a_repeat_cannot_make_a_single_writer_shared(env):
    """A node that has the volume as its single writer keeps that promise: a repeated attach or publish asking
    for shared (or multi-writer) is refused, so no multi-writer publish gets in beside it afterwards."""
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b", login=False)
    before = env.snapshot()
    for kwargs in ({"shared": True}, {"multi_writer": True}, {"shared": True, "login": True}):
        with pytest.raises(AlreadyExists, match="node-b as its single writer: a repeat cannot make it shared"):
            env.svc.attach_volume("vol-1", "node-b", login=kwargs.pop("login", False), **kwargs)
    assert env.snapshot() == before and not env.store.get_attachment("vol-1", "node-b").shared
    with pytest.raises(FailedPrecondition, match="node-b as its single writer"):
        env.svc.attach_volume("vol-1", "node-c", login=False, multi_writer=True)


def test_an_unhealthy_node_still_counts_as_a_writer(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.clock.now += 60  # node-b (and everyone) silent; only node-c comes back
    env.svc.heartbeat("node-c")
    env.svc.heartbeat("node-a")
    with pytest.raises(FailedPrecondition, match="published to node-b"):
        env.svc.attach_volume("vol-1", "node-c")


def test_fence_cuts_the_node_off_and_frees_its_volumes(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    node = env.svc.fence_node("node-b", "host lost power")
    assert (node.fence, node.fence_reason, node.fence_since) == (FENCE_DONE, "host lost power", env.clock.now)
    assert len(node.fence_steps) == 1 and node.fence_steps[0].startswith("node-a: fenced: 1 target(s)")
    assert env.agents.count("fence_initiator", "node-a") == 1
    assert (volume.id, iqn("node-b")) not in env.agents.agent("node-a").exports
    assert env.store.get_attachment("vol-1", "node-b").state == FENCED
    assert env.store.list_exports("vol-1") == []
    assert env.store.get_volume("vol-1").state == AVAILABLE
    kinds = [(o.kind, o.state) for o in env.store.list_operations("node-b")]
    assert kinds == [("fence_requested", "done"), ("fence_initiator", "done"), ("fence_node", "done")]
    # N's volume may go elsewhere now, without --shared and without touching node-b.
    assert env.svc.attach_volume("vol-1", "node-c").state == ATTACHED
    # Nothing is published to node-b; reconcile does not export to it again.
    env.svc.create_volume("vol-2", GiB)
    with pytest.raises(FailedPrecondition, match="node-b is fenced .*unfence"):
        env.svc.attach_volume("vol-2", "node-b")
    env.svc.reconcile_once()
    assert (volume.id, iqn("node-b")) not in env.agents.agent("node-a").exports
    # A repeat is the same answer and calls nobody.
    calls = env.agents.count("fence_initiator")
    assert env.svc.fence_node("node-b") == env.store.get_node("node-b")
    assert env.agents.count("fence_initiator") == calls


def test_an_unreachable_owner_leaves_it_fencing_until_the_loop_retries(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.down.add("node-a")
    node = env.svc.fence_node("node-b")
    assert node.fence == FENCING
    assert "node-a: not yet:" in node.fence_steps[0]
    with pytest.raises(FailedPrecondition, match="published to node-b"):  # not fenced yet: still a writer
        env.svc.attach_volume("vol-1", "node-c")
    with pytest.raises(FailedPrecondition, match="still being fenced"):
        env.svc.unfence_node("node-b")
    env.agents.down.clear()
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    assert env.store.get_node("node-b").fence == FENCE_DONE
    assert env.store.get_node("node-b").fence_steps[0].startswith("node-a: fenced")


def test_a_node_silent_past_the_grace_is_fenced_by_the_loop(env, tmp_path):
    env.settings = ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20, fence_grace=60)
    env.svc = env.new_service()
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.clock.now += 30
    for node in ("node-a", "node-c"):
        env.svc.heartbeat(node)
    assert env.svc.fence_pass() == []  # unhealthy, not yet past the grace
    env.clock.now += 40
    for node in ("node-a", "node-c"):
        env.svc.heartbeat(node)
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    assert "no heartbeat for 70 s" in env.store.get_node("node-b").fence_reason
    assert env.svc.fence_pass() == []


def test_a_restarted_controller_counts_the_grace_from_its_start(env):
    """Heartbeats stored before a controller restart (or a leader change) are old by the length of the gap: the
    new controller must give every node a whole grace period of its own before fencing it."""
    env.settings = ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20, fence_grace=60)
    env.svc = env.new_service()
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.clock.now += 120  # the controller was down for two minutes; nobody could heartbeat
    env.svc = env.new_service()  # started again on the same store
    assert env.svc.fence_pass() == []
    for node in ("node-a", "node-c"):
        env.svc.heartbeat(node)
    env.clock.now += 61  # node-b stays silent a whole grace period after the restart
    for node in ("node-a", "node-c"):
        env.svc.heartbeat(node)
    assert env.svc.fence_pass() == ["node node-b is fenced"]
    assert [n.id for n in env.svc.list_nodes() if n.fence] == ["node-b"]


def test_fence_grace_must_be_zero_or_at_least_the_heartbeat_timeout():
    with pytest.raises(ValueError, match="fence_grace"):
        ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20, fence_grace=10)
    assert ControllerSettings().fence_grace == 0


def test_a_fenced_node_heartbeats_and_is_told_what_to_drop_then_unfence_lets_it_back(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.svc.fence_node("node-b")
    node = env.svc.heartbeat("node-b")
    assert node.fence == FENCE_DONE  # a heartbeat does not end a fence; neither does registering again
    assert env.svc.volumes_to_drop(node) == [volume.id]
    node = env.svc.register_node("node-b", iqn("node-b"), "127.0.0.1:7000", ["127.0.0.1:3260"])
    assert node.fence == FENCE_DONE
    unfenced = env.svc.unfence_node("node-b")
    assert (unfenced.fence, unfenced.fence_steps) == ("", ())
    assert env.store.get_attachment("vol-1", "node-b") is None
    assert env.svc.volumes_to_drop(unfenced) == []
    with pytest.raises(FailedPrecondition, match="not fenced"):
        env.svc.unfence_node("node-b")
    assert env.svc.attach_volume("vol-1", "node-b", shared=True).state == ATTACHED


def test_detach_of_a_fenced_attachment_skips_the_fenced_node(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.svc.fence_node("node-b")
    env.agents.down.add("node-b")
    env.svc.detach_volume("vol-1", "node-b")
    assert env.store.list_attachments(volume="vol-1") == []
    assert env.agents.count("detach_volume", "node-b") == 0


def test_a_reachable_node_cuts_off_its_own_volumes_before_they_move(env):
    """A fence by hand of a node that still runs (a hung VM to move): its local session to its own volume's
    target must end before the volume goes to another node, or both write."""
    volume = env.svc.create_volume("vol-1", GiB)  # on node-a
    env.svc.attach_volume("vol-1", "node-a")
    node = env.svc.fence_node("node-a", "VM hung, move it")
    assert node.fence == FENCE_DONE and node.fence_steps[0].startswith("node-a: fenced: 1 target(s)")
    assert env.agents.count("fence_initiator", "node-a") == 1
    assert (volume.id, iqn("node-a")) not in env.agents.agent("node-a").exports
    assert env.store.get_attachment("vol-1", "node-a").state == FENCED
    assert env.svc.attach_volume("vol-1", "node-b").state == ATTACHED


def test_an_unreachable_node_keeps_its_own_volumes_until_it_answers(env):
    """A node that cannot be asked to cut its own sessions keeps its own volumes attached (their data is on
    it: nobody else could use them meanwhile); the rest of the fence completes, and the loop asks again."""
    env.svc.create_volume("vol-own", GiB)  # on node-a
    env.svc.attach_volume("vol-own", "node-a")
    env.svc.create_volume("vol-b", GiB, constraints={"zone": "b"})  # on node-b
    env.svc.attach_volume("vol-b", "node-a")
    env.agents.down.add("node-a")
    node = env.svc.fence_node("node-a")
    assert node.fence == FENCE_DONE
    assert any(s.startswith("node-a: not yet: ") and "vol-own stay attached to it" in s for s in node.fence_steps)
    assert env.store.get_attachment("vol-b", "node-a").state == FENCED  # node-b's volume may move
    assert env.svc.attach_volume("vol-b", "node-c").state == ATTACHED
    assert env.store.get_attachment("vol-own", "node-a").state != FENCED  # still a writer there
    with pytest.raises(FailedPrecondition, match="published to node-a"):
        env.svc.attach_volume("vol-own", "node-c")
    assert env.svc.fence_pass() == []  # still unreachable: nothing changed
    env.agents.down.clear()
    assert env.svc.fence_pass() == ["node node-a is fenced"]
    assert env.store.get_attachment("vol-own", "node-a").state == FENCED
    assert not any(": not yet: " in s for s in env.store.get_node("node-a").fence_steps)
    assert env.svc.attach_volume("vol-own", "node-c").state == ATTACHED


def test_a_node_holding_volumes_cannot_change_its_initiator_iqn(env):
    """A fence cuts off the IQN on record: a node that re-registered with another one would keep its old
    sessions through the fence (two writers).  Without volumes the change is allowed."""
    env.svc.create_volume("vol-1", GiB)  # on node-a
    env.svc.attach_volume("vol-1", "node-b")
    known = env.store.get_node("node-b")
    with pytest.raises(FailedPrecondition, match=f"node-b holds vol-1 as {iqn('node-b')}"):
        env.svc.register_node("node-b", "iqn.2026-01.io.shoal:node-b-reinstalled", known.agent_address,
                              known.portals, known.labels, known.disks)
    assert env.store.get_node("node-b").initiator_iqn == iqn("node-b")
    env.svc.detach_volume("vol-1", "node-b")
    assert env.svc.register_node("node-b", "iqn.2026-01.io.shoal:node-b-reinstalled", known.agent_address,
                                 known.portals, known.labels, known.disks).initiator_iqn.endswith("reinstalled")


def test_publish_secret_only_for_a_published_node(env):
    env.svc.create_volume("vol-1", GiB)
    with pytest.raises(FailedPrecondition, match="not published to node node-b"):
        env.svc.publish_secret("vol-1", "node-b")
    env.svc.attach_volume("vol-1", "node-b", login=False)
    chap = env.svc.publish_secret("vol-1", "node-b")
    volume = env.store.get_chap("vol-1")
    # node-b's own secret, derived from the volume's and its initiator name: never the volume's itself,
    # which would let node-b log in under another node's name (RFC 7143 §9.2.1)
    assert chap == ChapCredential(volume.user, initiator_secret(volume.secret, iqn("node-b")))
    assert chap.secret != volume.secret
    export, node = env.svc.publish_info("vol-1", "node-b")
    assert (export.initiator_iqn, node.initiator_iqn) == (iqn("node-b"), iqn("node-b"))
    env.svc.fence_node("node-b")
    with pytest.raises(FailedPrecondition):
        env.svc.publish_secret("vol-1", "node-b")


def test_fence_of_an_unknown_node_is_not_found_and_a_bad_id_is_refused(env):
    before = env.snapshot()
    with pytest.raises(NotFound):
        env.svc.fence_node("node-z")
    with pytest.raises(InvalidArgument):
        env.svc.fence_node("bad id!")
    assert env.snapshot() == before


def test_shoal_controller_fence_grace_flag():
    import argparse

    from controller import daemon as controller_daemon

    parser = argparse.ArgumentParser()
    controller_daemon.add_parser(parser.add_subparsers())

    def settings(*argv):
        return controller_daemon.settings_from_args(parser.parse_args(["controller", *argv]))[1]

    assert settings().fence_grace == 0
    assert settings("--heartbeat-interval", "0.5", "--heartbeat-timeout", "2", "--fence-grace", "3").fence_grace == 3
    with pytest.raises(ValueError, match="fence_grace"):
        settings("--heartbeat-timeout", "20", "--fence-grace", "5")
