"""``RegistrationService`` (protos/shoal/v1/agent.proto): node agents announce themselves and heartbeat.

Register, repeated, updates the node's record (the domain's ``register_node``);
Heartbeat of a node that never registered is ``NOT_FOUND``, which tells the
agent to register again (after the controller lost its state, say).  A
heartbeat without disks keeps the disks the controller knows.  Every answer
carries the heartbeat interval, so agents that registered with a controller
started with other settings follow this one's.

``node_labels`` (``--store kubernetes``: ``controller.k8s_nodes.KubernetesNodeLabels``) merges the topology
labels of the Kubernetes Node named like the registering node into the labels the agent sent.  Register
answers the labels recorded (merged): the agent's CSI NodeGetInfo reports its topology from them, so
CSINode's topology and CreateVolume's ``accessible_topology`` (the owner's recorded labels) agree.
"""

from __future__ import annotations

from typing import Callable, Mapping

from controller.api import convert
from controller.api.decorators import rpc
from controller.domain.service import ControllerService
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc


class RegistrationServicer(agent_pb2_grpc.RegistrationServiceServicer):
    def __init__(self, service: ControllerService,
                 node_labels: Callable[[str, Mapping[str, str]], Mapping[str, str]] | None = None):
        self.service = service
        self.node_labels = node_labels

    @rpc("node_id", "initiator_iqn", "agent_address")
    def Register(self, request, context):
        labels = dict(request.labels)
        if self.node_labels is not None:
            labels = dict(self.node_labels(request.node_id, labels))
        node = self.service.register_node(request.node_id, request.initiator_iqn, request.agent_address,
                                          list(request.portals), labels, convert.disks_from_proto(request.disks))
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=self.service.settings.heartbeat_interval,
                                          labels=dict(node.labels))

    @rpc("node_id")
    def Heartbeat(self, request, context):
        node = self.service.heartbeat(request.node_id,
                                      convert.disks_from_proto(request.disks) if request.disks else None)
        return agent_pb2.HeartbeatResponse(fenced=node.fenced, drop_volume_ids=self.service.volumes_to_drop(node),
                                           heartbeat_interval_seconds=self.service.settings.heartbeat_interval)
