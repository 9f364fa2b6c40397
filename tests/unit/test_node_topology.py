"""NodeGetInfo's topology is the controller's record of the node (CSI §NodeGetInfo, "accessible_topology").

With ``--store kubernetes`` the controller merges the Kubernetes Node's topology labels into the labels an agent
registers with (controller/k8s_nodes.py), and CreateVolume's ``accessible_topology`` comes from the owner's
merged labels.  RegisterResponse.labels hands the merged labels back, and the agent's NodeGetInfo reports them,
so CSINode gets the same keys as the volumes' node affinity.  Here the controller is ``ControllerService`` over
``MemoryStore`` and a real agent directory, served in-process over gRPC on 127.0.0.1; ``zone_of`` stands in
for the Kubernetes Node (the same merge, ``merge_labels``, without an API server).  The agent is the real
``Agent`` with its CSI Node socket; connectors are never built (nothing attaches).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from controller.agents_grpc import GrpcAgentDirectory
from controller.api.server import build_server
from controller.csi.controller import CsiSettings
from controller.csi.server import build_csi_controller_server
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.k8s_nodes import merge_labels
from controller.store import MemoryStore
from node_agent.agent.daemon import Agent
from node_agent.agent.registration import NodeAnnouncement, Registrar
from node_agent.agent.settings import AgentSettings
from node_agent.agent.volumes import Disk
from node_agent.csi.node import DEFAULT_TOPOLOGY_KEYS, NodeLabels, NodeServicer
from node_agent.csi.server import build_csi_node_server
from protos.csi.v1 import csi_pb2, csi_pb2_grpc
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc

ZONE = "topology.kubernetes.io/zone"
MiB = 1 << 20


class KubernetesNodes:
    """The Kubernetes Nodes' labels, as ``KubernetesNodeLabels`` would read them: ``zone`` for every node."""

    def __init__(self, zone: str):
        self.zone = zone

    def __call__(self, node_id: str, agent_labels):
        return merge_labels(agent_labels, {ZONE: self.zone, "kubernetes.io/hostname": node_id, "disk": "ssd"})


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
    return value


class Cluster:
    """A controller (RegistrationService, CSI Controller) and one agent (AgentService, CSI Node), in-process."""

    def __init__(self, directory: str, zone: str = "z1"):
        self.dir = directory
        self.nodes = KubernetesNodes(zone)
        self.store = MemoryStore()
        self.agents = GrpcAgentDirectory()
        self.service = ControllerService(self.store, self.agents,
                                         settings=ControllerSettings(heartbeat_interval=0.1, heartbeat_timeout=20))
        self.server, self.port = build_server(self.service, "127.0.0.1:0", node_labels=self.nodes)
        self.csi_server = build_csi_controller_server(self.service, f"unix://{directory}/controller.sock",
                                                      settings=CsiSettings())
        self.csi_channel = grpc.insecure_channel(f"unix://{directory}/controller.sock")
        self.controller = csi_pb2_grpc.ControllerStub(self.csi_channel)
        self.agent: Agent | None = None
        self.node_channel: grpc.Channel | None = None

    def start_agent(self, controller: str = "", **fields) -> Agent:
        settings = AgentSettings(node_id="n1", data_dir=f"{self.dir}/agent", listen="127.0.0.1:0",
                                 portal_listen="127.0.0.1:0", controller=controller or f"127.0.0.1:{self.port}",
                                 csi_endpoint=f"unix://{self.dir}/node.sock", max_register_backoff=0.2, **fields)
        self.agent = Agent(settings, connectors={})
        self.agent.start()
        self.node_channel = grpc.insecure_channel(f"unix://{self.dir}/node.sock")
        return self.agent

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.node_channel)

    def close(self) -> None:
        if self.node_channel is not None:
            self.node_channel.close()
        if self.agent is not None:
            self.agent.stop()
        self.csi_channel.close()
        self.csi_server.stop(None).wait(5)
        self.server.stop(None).wait(5)
        self.agents.close()


@pytest.fixture
def cluster():
    directory = tempfile.mkdtemp(prefix="topo", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    cluster = Cluster(directory)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(directory, ignore_errors=True)


def segments(topologies) -> list[dict[str, str]]:
    return [dict(t.segments) for t in topologies]


def test_node_info_reports_the_zone_the_controller_merged_and_volumes_use_the_same_segments(cluster):
    """The reviewer's case: the agent runs with the chart's arguments (no ``--label``), the Kubernetes Node
    has a zone.  NodeGetInfo (CSINode's topology) and CreateVolume's accessible_topology (the PV's node
    affinity) must name the same segments, or the scheduler finds no node for the volume."""
    agent = cluster.start_agent()
    assert agent.registrar.registered.wait(20)
    info = cluster.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=20)
    assert info.node_id == "n1"
    assert dict(info.accessible_topology.segments) == {ZONE: "z1"}  # the hostname is no CSI topology key
    request = csi_pb2.CreateVolumeRequest(name="pvc-1", capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
                                          volume_capabilities=[csi_pb2.VolumeCapability(
                                              mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                                              access_mode=csi_pb2.VolumeCapability.AccessMode(
                                                  mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))])
    volume = cluster.controller.CreateVolume(request, timeout=30).volume
    assert segments(volume.accessible_topology) == [dict(info.accessible_topology.segments)]


def test_both_sides_use_one_key_list():
    assert DEFAULT_TOPOLOGY_KEYS is CsiSettings().topology_keys


def test_register_answers_the_merged_labels(cluster):
    """RegisterResponse.labels: what the controller recorded, the Node's topology labels included."""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.port}") as channel:
        answer = agent_pb2_grpc.RegistrationServiceStub(channel).Register(agent_pb2.RegisterRequest(
            node_id="n9", initiator_iqn="iqn.2026-11.io.shoal:node:n9", agent_address="127.0.0.1:9",
            portals=["127.0.0.1:3260"], labels={ZONE: "agent-says", "rack": "r1"}), timeout=10)
    # the Node's zone wins over the agent's, its "disk" is no topology label; the agent's "rack" stays
    assert dict(answer.labels) == {ZONE: "z1", "kubernetes.io/hostname": "n9", "rack": "r1"}
    assert dict(answer.labels) == cluster.store.get_node("n9").labels


def test_node_info_waits_for_the_first_registration(cluster):
    """The CSI socket opens before the agent has registered; a NodeGetInfo then waits for the registration
    instead of answering an empty topology (which kubelet would keep in CSINode)."""
    cluster.server.stop(None).wait(5)  # the controller is down while the agent starts
    agent = cluster.start_agent()
    answers = []
    asking = threading.Thread(target=lambda: answers.append(
        cluster.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=20)))
    asking.start()
    time.sleep(0.5)
    assert not agent.registrar.registered.is_set() and not answers
    cluster.server, _ = build_server(cluster.service, f"127.0.0.1:{cluster.port}", node_labels=cluster.nodes)
    asking.join(20)
    assert dict(answers[0].accessible_topology.segments) == {ZONE: "z1"}


def test_node_info_before_registration_is_unavailable():
    """No registration within ``labels_timeout``: UNAVAILABLE, so kubelet's plugin registration is retried."""
    directory = tempfile.mkdtemp(prefix="topo", dir="/tmp")
    server = build_csi_node_server(NodeServicer("n1", NodeLabels(), None, None, labels_timeout=0.2),
                                   f"unix://{directory}/node.sock")
    try:
        with grpc.insecure_channel(f"unix://{directory}/node.sock") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not registered" in failed.value.details()
    finally:
        server.stop(None).wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def test_reregistration_refreshes_the_topology(cluster):
    """The controller forgets the node (a new state store, say): the agent's next heartbeat is NOT_FOUND, it
    registers again, and NodeGetInfo reports what the controller recorded this time."""
    agent = cluster.start_agent()
    assert agent.registrar.registered.wait(20)
    assert dict(cluster.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=20).accessible_topology.segments) \
        == {ZONE: "z1"}
    cluster.nodes.zone = "z2"
    with cluster.store.transaction():
        cluster.store.delete_node("n1")
    wait_for(lambda: dict(cluster.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=20)
                          .accessible_topology.segments) == {ZONE: "z2"})


def test_an_agent_without_a_controller_reports_its_own_labels(tmp_path):
    directory = tempfile.mkdtemp(prefix="topo", dir="/tmp")
    agent = Agent(AgentSettings(node_id="n1", data_dir=str(tmp_path / "agent"), listen="127.0.0.1:0",
                                portal_listen="127.0.0.1:0", controller="", labels={"zone": "a"},
                                csi_endpoint=f"unix://{directory}/node.sock"), connectors={})
    agent.start()
    try:
        with grpc.insecure_channel(f"unix://{directory}/node.sock") as channel:
            info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        assert dict(info.accessible_topology.segments) == {"zone": "a"}
    finally:
        agent.stop()
        shutil.rmtree(directory, ignore_errors=True)


class OldController(agent_pb2_grpc.RegistrationServiceServicer):
    """A controller from before RegisterResponse.labels: it answers none (it recorded the labels as sent)."""

    def Register(self, request, context):
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=60)

    def Heartbeat(self, request, context):
        return agent_pb2.HeartbeatResponse()


def test_a_controller_answering_no_labels_leaves_the_agents_own():
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(OldController(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    labels = NodeLabels()
    node = NodeAnnouncement("n1", "iqn.2026-11.io.shoal:node:n1", "127.0.0.1:7071", ("127.0.0.1:3260",),
                            {"zone": "a"})
    registrar = Registrar(node, lambda: [Disk("data0", "/srv/d0", 100, 60)],
                          grpc.insecure_channel(f"127.0.0.1:{port}"), on_registered=labels.set)
    try:
        assert registrar.register_until_done() == 60
        assert labels.wait(0) == {"zone": "a"} == registrar.labels
    finally:
        registrar.channel.close()
        server.stop(None)
