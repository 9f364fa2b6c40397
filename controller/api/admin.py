"""``AdminService`` (protos/shoal/v1/admin.proto) over ``ControllerService``.

Each method: required fields (the ``rpc`` decorator), proto3 defaults made
explicit (an unset pool is the controller's configured default pool,
``ControllerSettings.default_pool``, as for CSI; an unset mode "userspace",
an unset overcommit ratio 1.0), one domain call, the answer.  Idempotency is the
domain's, as admin.proto writes it per RPC; nothing here keeps state.
"""

from __future__ import annotations

from collections import defaultdict

from controller.api import convert
from controller.api.decorators import rpc
from controller.domain.service import ControllerService
from controller.metrics import ControllerMetrics
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_MODE = "userspace"


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, service: ControllerService, metrics: ControllerMetrics | None = None):
        self.service = service
        self.metrics = metrics if metrics is not None else ControllerMetrics()

    # Nodes.
    @rpc()
    def ListNodes(self, request, context):
        return admin_pb2.ListNodesResponse(nodes=[convert.node_to_proto(n) for n in self.service.list_nodes()])

    @rpc("id")
    def GetNode(self, request, context):
        return convert.node_to_proto(self.service.get_node(request.id))

    @rpc("id")
    def FenceNode(self, request, context):
        return convert.node_to_proto(self.service.fence_node(request.id, request.reason))

    @rpc("id")
    def UnfenceNode(self, request, context):
        return convert.node_to_proto(self.service.unfence_node(request.id))

    # Pools.
    @rpc("name")
    def CreatePool(self, request, context):
        pool = self.service.create_pool(request.name, [(m.node_id, m.disk) for m in request.members],
                                        request.overcommit_ratio or 1.0)
        return self._pool(pool)

    @rpc()
    def ListPools(self, request, context):
        return admin_pb2.ListPoolsResponse(pools=[self._pool(p) for p in self.service.list_pools()])

    @rpc("name")
    def GetPool(self, request, context):
        return self._pool(self.service.get_pool(request.name))

    @rpc("name")
    def DeletePool(self, request, context):
        self.service.delete_pool(request.name)
        return admin_pb2.DeletePoolResponse()

    def _pool(self, pool):
        return convert.pool_to_proto(pool, self.service.pool_usage(pool.name))

    # Volumes.
    @rpc("name", "size_bytes")
    def CreateVolume(self, request, context):
        volume = self.service.create_volume(request.name, request.size_bytes, request.pool or self._default_pool(),
                                            thin=not request.thick, constraints=dict(request.constraints))
        return self._volume(volume)

    @rpc()
    def ListVolumes(self, request, context):
        attached = defaultdict(list)
        for attachment in self.service.list_attachments():
            attached[attachment.volume].append(convert.attached_node(attachment))
        volumes = self.service.list_volumes(request.pool or None)
        return admin_pb2.ListVolumesResponse(volumes=[
            convert.volume_to_proto(v, attached[v.name], self.service.clone_progress(v)) for v in volumes])

    @rpc("name")
    def GetVolume(self, request, context):
        return self._volume(self.service.observe_volume(request.name))  # a clone's copy: as it is now

    @rpc("name", "size_bytes")
    def ExpandVolume(self, request, context):
        return self._volume(self.service.expand_volume(request.name, request.size_bytes))

    @rpc("name")
    def DeleteVolume(self, request, context):
        self.service.delete_volume(request.name)
        return admin_pb2.DeleteVolumeResponse()

    def _default_pool(self) -> str:
        # "" disables the default pool's creation, not the name: "default", as the CSI controller does.
        return self.service.settings.default_pool or "default"

    def _volume(self, volume):
        attached = [convert.attached_node(a) for a in self.service.list_attachments(volume=volume.name)]
        return convert.volume_to_proto(volume, attached, self.service.clone_progress(volume))

    # Attachments.
    @rpc("name", "node")
    def AttachVolume(self, request, context):
        mode = request.mode or DEFAULT_MODE
        with self.metrics.time_attach(mode):
            attachment = self.service.attach_volume(request.name, request.node, mode,
                                                    login=not request.publish_only, shared=request.shared)
        export, node = self.service.publish_info(attachment.volume, attachment.node)
        return convert.attachment_to_proto(attachment, export, node.initiator_iqn)

    @rpc("name", "node")
    def GetPublishSecret(self, request, context):
        chap = self.service.publish_secret(request.name, request.node)
        return admin_pb2.PublishSecret(chap_user=chap.user, chap_secret=chap.secret)

    @rpc("name", "node")
    def DetachVolume(self, request, context):
        self.service.detach_volume(request.name, request.node)
        return admin_pb2.DetachVolumeResponse()

    # Snapshots and clones.
    @rpc("name", "volume")
    def CreateSnapshot(self, request, context):
        return convert.snapshot_to_proto(self.service.create_snapshot(request.name, request.volume))

    @rpc("name")
    def GetSnapshot(self, request, context):
        return convert.snapshot_to_proto(self.service.get_snapshot(request.name))

    @rpc()
    def ListSnapshots(self, request, context):
        snapshots = self.service.list_snapshots(request.volume or None)
        return admin_pb2.ListSnapshotsResponse(snapshots=[convert.snapshot_to_proto(s) for s in snapshots])

    @rpc("name")
    def DeleteSnapshot(self, request, context):
        self.service.delete_snapshot(request.name)
        return admin_pb2.DeleteSnapshotResponse()

    @rpc("name", "source")
    def CloneVolume(self, request, context):
        return self._volume(self.service.clone_volume(request.name, request.source, request.pool or None))

    # Status.
    @rpc()
    def GetStatus(self, request, context):
        return convert.status_to_proto(self.service.status())
