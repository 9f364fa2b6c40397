"""An attach that cannot work on a node says so, and leaves nothing recorded; a fenced node keeps heartbeating.

Found by a review of ``shoalctl volume attach --mode kernel`` on a host without the iscsi_tcp kernel module
(``make up`` in a container): iscsiadm's ``-m iface -o update`` exits 7 ("Cound not locate transport for iface
shoal"), which the kernel connector took for a temporary failure, so the agent answered UNAVAILABLE, shoalctl
said "agent ... is unreachable ...; retry when it is back", and the controller kept the attachment row: ``volume
list`` showed the node under ATTACHED TO with no device until a detach by hand.  Now the connector tells a host
that cannot run the kernel initiator (no tcp transport, iscsid not answering) as a ``PermanentConnectorError``
(FAILED_PRECONDITION), and the controller forgets an attach that failed for good (row and export); one that
failed for a while keeps its row, shown as "NODE (attaching)", for a repeat or a detach to finish.

And by a review of ``shoalctl node fence`` of a node that has a volume attached: the agent detached the volumes
its heartbeat answer named on the heartbeat thread itself, where a flush on the cut-off session waited for its
reconnect to give up (30 s), so the node went unhealthy (tests/integration/test_self_fence_review.py runs that
end to end).

Boundaries: ``FakeKernel`` (tests/unit/test_host_kernel.py) plays open-iscsi at our runner and sysfs; the
controller's agents are ``FakeAgents``; the agent's heartbeats go over real gRPC to a small RegistrationService.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import grpc
import pytest

from controller.api.admin import AdminServicer
from controller.cli import connect
from controller.domain.errors import FailedPrecondition, Unavailable
from controller.domain.model import ATTACHED, ATTACHING, AVAILABLE
from node_agent.agent.attachments import KERNEL, AttachmentManager
from node_agent.agent.daemon import Agent
from node_agent.agent.errors import grpc_status
from node_agent.agent.exports import ExportInfo
from node_agent.agent.registration import Registrar
from node_agent.agent.settings import AgentSettings
from node_agent.host.connector import PermanentConnectorError, TemporaryConnectorError
from protos.shoal.v1 import admin_pb2, agent_pb2
from tests.unit.test_agent_registration import NODE, Controller, disks, free_port, serve, wait_for
from tests.unit.test_controller_service import GiB, iqn
from tests.unit.test_controller_service import env  # noqa: F401 - the fixture, used by name
from tests.unit.test_host_kernel import IQN, PORTAL, FakeKernel, iface, volume

NO_TRANSPORT = "iscsiadm: Cound not locate transport for iface shoal\n"


@pytest.fixture
def kernel(tmp_path):
    return FakeKernel(tmp_path, {0: "vol-a"})


def without_transport(kernel: FakeKernel) -> None:
    """What iscsiadm does on a kernel without iscsi_tcp (it tried to load the module and could not)."""
    kernel.runner.on(*iface("-o", "update"), rc=7, stderr=NO_TRANSPORT)


def with_transport(kernel: FakeKernel) -> None:
    (kernel.sysfs / "class" / "iscsi_transport" / "tcp").mkdir(parents=True)


# --------------------------------------------------------------------------- the kernel connector

def test_a_kernel_without_the_tcp_transport_fails_for_good_naming_it(kernel):
    without_transport(kernel)
    with pytest.raises(PermanentConnectorError) as raised:
        kernel.connector().attach(volume(0))
    message = str(raised.value)
    assert "cannot work on this node" in message and "iscsi_tcp" in message and "--mode userspace" in message
    assert "Cound not locate transport" in message  # iscsiadm's own words, for whoever debugs it
    assert not kernel.sessions and not kernel.records  # nothing logged in, no node record left
    assert grpc_status(raised.value)[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_an_iface_update_failing_where_the_transport_is_there_stays_temporary(kernel):
    """A failure that is not the missing transport (a locked database, say) may pass: a retry is worth it."""
    with_transport(kernel)
    without_transport(kernel)
    with pytest.raises(TemporaryConnectorError):
        kernel.connector().attach(volume(0))


@pytest.mark.parametrize("rc, names", [(20, "iscsid"), (12, "iscsi_tcp")])
def test_a_login_iscsiadm_cannot_hand_to_the_kernel_fails_for_good(kernel, rc, names):
    """Exit 20: iscsid does not answer, after iscsiadm ran iscsid.startup and tried again; exit 12: no transport."""
    with_transport(kernel)
    kernel.login_rc = rc
    with pytest.raises(PermanentConnectorError, match=f"cannot work on this node: .*{names}"):
        kernel.connector().attach(volume(0))
    assert not kernel.records  # the record the failed login would have used is gone


def test_a_login_that_fails_otherwise_stays_temporary(kernel):
    with_transport(kernel)
    kernel.login_rc = 8  # ISCSI_ERR_TRANS_TIMEOUT: the portal did not answer in time
    with pytest.raises(TemporaryConnectorError):
        kernel.connector().attach(volume(0))


def test_the_agent_answers_failed_precondition_and_keeps_no_record(kernel, tmp_path):
    without_transport(kernel)
    manager = AttachmentManager(str(tmp_path / "agent"), {KERNEL: kernel.connector})
    export = ExportInfo("vol-a", IQN, (PORTAL,), 0, volume(0).expected_naa, "vol-a", "")
    with pytest.raises(PermanentConnectorError) as raised:
        manager.attach(export, mode=KERNEL)
    code, message = grpc_status(raised.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "iscsi_tcp" in message
    assert manager.list() == []


# --------------------------------------------------------------------------- the controller's record

PERMANENT = "agent of node node-b: AttachVolume: the kernel connector cannot work on this node: no iscsi_tcp"


class Context:
    def abort(self, code, details):
        raise RuntimeError(code, details)


def shown(env, name="vol-1"):
    """``attached_nodes`` as GetVolume and ListVolumes answer them (what volume show and list print)."""
    servicer = AdminServicer(env.svc)
    one = list(servicer.GetVolume(admin_pb2.GetVolumeRequest(name=name), Context()).attached_nodes)
    listed = {v.name: list(v.attached_nodes)
              for v in servicer.ListVolumes(admin_pb2.ListVolumesRequest(), Context()).volumes}
    assert listed[name] == one
    return one


def test_an_attach_that_failed_for_good_leaves_no_attachment_nor_export(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("attach_volume", FailedPrecondition(PERMANENT), node="node-b")
    with pytest.raises(FailedPrecondition, match="cannot work on this node"):
        env.svc.attach_volume("vol-1", "node-b", mode="kernel")
    assert env.store.get_attachment("vol-1", "node-b") is None
    assert env.store.list_exports("vol-1") == [] and env.agents.agent("node-a").exports == {}
    assert env.store.get_volume("vol-1").state == AVAILABLE
    assert shown(env) == []
    assert env.store.list_operations("vol-1")[-1].state == "failed"
    # nothing to detach first: the volume can be attached another way, or deleted
    assert env.svc.attach_volume("vol-1", "node-b").state == ATTACHED
    assert (volume.id, iqn("node-b")) in env.agents.agent("node-a").exports


def test_an_export_the_owner_could_not_drop_stays_on_record_until_reconcile_removes_it(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("attach_volume", FailedPrecondition(PERMANENT), node="node-b")
    env.agents.fail_next("unexport_volume", Unavailable("fake agent: connection reset"), node="node-a")
    with pytest.raises(FailedPrecondition, match="cannot work on this node"):  # the attach's error, not the cleanup's
        env.svc.attach_volume("vol-1", "node-b", mode="kernel")
    assert env.store.get_attachment("vol-1", "node-b") is None
    assert [e.initiator_iqn for e in env.store.list_exports("vol-1")] == [iqn("node-b")]
    env.svc.reconcile_once()
    assert env.store.list_exports("vol-1") == []
    assert (volume.id, iqn("node-b")) not in env.agents.agent("node-a").exports


def test_an_export_whose_answer_was_lost_is_dropped_too(env):
    """The owner exported, then its answer was a refusal for good: nothing recorded it, the owner is asked anyway;
    one that cannot be asked now leaves a record without target details for reconcile (as a detach does)."""
    volume = env.svc.create_volume("vol-1", GiB)

    def late_export(node_id, method, volume_id):
        if method == "export_volume":
            env.agents.before_call = None
            env.agents.client(env.store.get_node("node-a")).export_volume(volume.id, iqn("node-b"), "u", "s")
            raise FailedPrecondition("refused (fake)")

    env.agents.before_call = late_export
    with pytest.raises(FailedPrecondition):
        env.svc.attach_volume("vol-1", "node-b")
    assert env.agents.agent("node-a").exports == {} and env.store.list_exports() == []
    assert env.store.list_attachments() == []
    env.agents.before_call = late_export
    env.agents.fail_next("unexport_volume", Unavailable("fake agent: connection reset"), node="node-a")
    with pytest.raises(FailedPrecondition):
        env.svc.attach_volume("vol-1", "node-b")
    [kept] = env.store.list_exports("vol-1")
    assert (kept.initiator_iqn, kept.target_iqn) == (iqn("node-b"), "") and env.store.list_attachments() == []
    assert (volume.id, iqn("node-b")) in env.agents.agent("node-a").exports
    env.svc.reconcile_once()
    assert env.store.list_exports() == [] and env.agents.agent("node-a").exports == {}


def test_an_attach_that_failed_for_a_while_is_shown_attaching_then_finished_or_cleaned(env):
    env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("attach_volume", Unavailable("agent of node node-b is unreachable"), node="node-b")
    with pytest.raises(Unavailable):
        env.svc.attach_volume("vol-1", "node-b", mode="kernel")
    assert env.store.get_attachment("vol-1", "node-b").state == ATTACHING  # kept for the repeat
    assert env.store.get_volume("vol-1").state == AVAILABLE
    assert shown(env) == ["node-b (attaching)"]  # not "node-b": it has no device
    # its repeat fails for good: the row goes
    env.agents.fail_next("attach_volume", FailedPrecondition(PERMANENT), node="node-b")
    with pytest.raises(FailedPrecondition):
        env.svc.attach_volume("vol-1", "node-b", mode="kernel")
    assert env.store.get_attachment("vol-1", "node-b") is None and env.store.list_exports("vol-1") == []
    assert shown(env) == []


def test_a_repeat_of_an_attach_that_works_keeps_it_when_it_fails(env):
    """The node has the volume (maybe mounted): a repeated attach refused for good does not take it away."""
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.fail_next("attach_volume", FailedPrecondition("identity mismatch"), node="node-b")
    with pytest.raises(FailedPrecondition):
        env.svc.attach_volume("vol-1", "node-b")
    assert env.store.get_attachment("vol-1", "node-b").state == ATTACHED
    assert (volume.id, iqn("node-b")) in env.agents.agent("node-a").exports
    assert shown(env) == ["node-b"]


def test_detach_says_it_detached_a_row_left_attaching(capsys):
    class Api:
        def call(self, method, request):
            if method == "GetVolume":
                return admin_pb2.Volume(name="vol-1", attached_nodes=["node-b (attaching)"])
            return admin_pb2.DetachVolumeResponse()

    connect.detach(Api(), argparse.Namespace(name="vol-1", node="node-b", output="json"), "detach")
    assert json.loads(capsys.readouterr().out) == {"name": "vol-1", "node": "node-b", "detached": True}


# --------------------------------------------------------------------------- a fenced agent's heartbeats

class Dropping(Controller):
    """Answers every heartbeat "fenced, drop VOLUME" (as the controller does while the node is fenced)."""

    def Heartbeat(self, request, context):
        self.heartbeats.append(request)
        return agent_pb2.HeartbeatResponse(fenced=True, drop_volume_ids=["vol-a"])


class SlowAttachments:
    """An ``AttachmentManager`` whose detach waits as a flush on a cut-off session does (until ``release``)."""

    def __init__(self):
        self.release = threading.Event()
        self.detaching = 0
        self.most_at_once = 0
        self.records = {"vol-a": object()}
        self._guard = threading.Lock()

    def get(self, volume_id):
        return self.records.get(volume_id)

    def detach(self, volume_id, mode="", *, only=None):
        assert only is self.records.get(volume_id)  # the record the heartbeat's drop was decided on
        with self._guard:
            self.detaching += 1
            self.most_at_once = max(self.most_at_once, self.detaching)
        try:
            assert self.release.wait(30)
            self.records.pop(volume_id, None)
            return True
        finally:
            with self._guard:
                self.detaching -= 1


def test_heartbeats_go_on_while_a_fenced_volume_is_being_dropped(tmp_path):
    agent = Agent(AgentSettings(node_id="n1", data_dir=str(tmp_path), controller=""))
    agent.attachments = attachments = SlowAttachments()
    controller = Dropping(interval=0.05)
    port = free_port()
    server = serve(controller, port)
    registrar = Registrar(NODE, disks, grpc.insecure_channel(f"127.0.0.1:{port}"), timeout=1,
                          on_drop=agent._drop_fenced)
    registrar.start()
    try:
        wait_for(lambda: attachments.detaching == 1)
        beats = len(controller.heartbeats)
        time.sleep(1.0)  # twenty intervals while the detach waits
        assert len(controller.heartbeats) >= beats + 10, "the heartbeats stalled behind the drop"
        assert attachments.most_at_once == 1  # named again by every beat, dropped once at a time
        attachments.release.set()
        wait_for(lambda: attachments.get("vol-a") is None and not agent._dropping)
    finally:
        attachments.release.set()
        registrar.stop()
        server.stop(None)


def test_unfence_waits_for_the_agent_a_few_seconds_in_all(env, monkeypatch):
    """Each forget gets what is left of ``FORGET_WAIT`` as its deadline; once that is spent the agent is not asked
    (it was told to drop them with every heartbeat while fenced), and the unfence still completes."""
    from controller.domain import fencing
    from controller.domain.agents import FakeAgentClient
    from controller.domain.model import FENCED

    for name in ("vol-1", "vol-2", "vol-3"):
        env.svc.create_volume(name, GiB)
        env.svc.attach_volume(name, "node-b")
    env.svc.fence_node("node-b")
    assert {a.state for a in env.store.list_attachments(node="node-b")} == {FENCED}
    deadlines = []
    real = FakeAgentClient.detach_volume

    def slow_detach(self, volume_id, mode, *, timeout=None):
        deadlines.append(timeout)
        env.clock.now += 3.0  # each answers after 3 s (or its deadline passes)
        return real(self, volume_id, mode, timeout=timeout)

    monkeypatch.setattr(FakeAgentClient, "detach_volume", slow_detach)
    node = env.svc.unfence_node("node-b")
    assert node.fence == "" and env.store.list_attachments(node="node-b") == []
    assert deadlines == [fencing.FORGET_WAIT, fencing.FORGET_WAIT - 3.0]  # the third is not asked


def test_a_late_drop_does_not_take_away_an_attach_made_once_unfenced(tmp_path):
    """A drop decided while fenced may get the volume's lock only after the node was unfenced and the volume
    attached again (it waited behind the unfence's own detach): it detaches only the record it was decided on."""
    from tests.unit.test_csi_attachments import EXPORT, SECRET, FakeConnector

    connector = FakeConnector()
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector})
    manager.attach(EXPORT, SECRET)
    fenced = manager.get("vol-1")
    assert manager.detach("vol-1")                     # the unfence's detach
    assert manager.attach(EXPORT, SECRET) == "/dev/fake-vol-1"  # attached again
    assert not manager.detach("vol-1", only=fenced)    # the late drop
    assert manager.get("vol-1") is not None and connector.calls[-1] == ("attach", "vol-1")
    assert manager.detach("vol-1", only=manager.get("vol-1"))  # its own record: detached
