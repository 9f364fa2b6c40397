"""Domain records to admin.proto messages and back: field by field, nothing clever."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.domain.model import (ATTACHING, DETACHING, Attachment, Disk, Export, Node, Pool, PoolUsage, Snapshot,
                                     Volume)
from protos.shoal.v1 import admin_pb2, common_pb2


UINT64_MAX = (1 << 64) - 1


def uint64(n: int) -> int:
    """A sum of bytes for a uint64 field: a sum over many disks can pass 2**64 - 1, which protobuf refuses."""
    return min(max(n, 0), UINT64_MAX)


def disk_to_proto(disk: Disk) -> common_pb2.Disk:
    return common_pb2.Disk(name=disk.name, path=disk.path, capacity_bytes=disk.capacity_bytes,
                           free_bytes=disk.free_bytes)


def disks_from_proto(disks: Iterable[common_pb2.Disk]) -> list[Disk]:
    return [Disk(d.name, d.path, d.capacity_bytes, d.free_bytes) for d in disks]


def node_to_proto(node: Node) -> admin_pb2.Node:
    return admin_pb2.Node(id=node.id, initiator_iqn=node.initiator_iqn, agent_address=node.agent_address,
                          portals=list(node.portals), labels=dict(node.labels),
                          disks=[disk_to_proto(d) for d in node.disks], health=node.health,
                          last_heartbeat_unix=node.last_heartbeat, fence=node.fence,
                          fence_since_unix=node.fence_since, fence_reason=node.fence_reason,
                          fence_steps=list(node.fence_steps))


def pool_to_proto(pool: Pool, usage: PoolUsage | None = None) -> admin_pb2.Pool:
    message = admin_pb2.Pool(name=pool.name, overcommit_ratio=pool.overcommit_ratio,
                             members=[admin_pb2.PoolMember(node_id=n, disk=d) for n, d in pool.members])
    if usage is not None:
        message.capacity_bytes = uint64(usage.capacity_bytes)
        message.provisioned_bytes = uint64(usage.provisioned_bytes)
    return message


def status_to_proto(status: Mapping[str, int]) -> admin_pb2.Status:
    """``ControllerService.status()``; its byte sums clamped to a uint64."""
    return admin_pb2.Status(**{key: uint64(value) if key.endswith("_bytes") else value
                               for key, value in status.items()})


def attached_node(attachment: Attachment) -> str:
    """How ``Volume.attached_nodes`` names the node of ``attachment``: its id, and "(attaching)" or "(detaching)"
    after it while a call left the row unfinished (failed for a while: its repeat, or a detach, finishes it), so
    list and show never say a node has a volume its attach has not given it."""
    if attachment.state in (ATTACHING, DETACHING):
        return f"{attachment.node} ({attachment.state})"
    return attachment.node


def volume_to_proto(volume: Volume, attached_nodes: Iterable[str] = (), progress: float = 0.0) -> admin_pb2.Volume:
    return admin_pb2.Volume(name=volume.name, id=volume.id, size_bytes=volume.size_bytes, pool=volume.pool,
                            owner_node=volume.owner_node, disk=volume.disk, state=volume.state, thin=volume.thin,
                            attached_nodes=sorted(attached_nodes), source=volume.source, progress=progress)


def snapshot_to_proto(snapshot: Snapshot) -> admin_pb2.Snapshot:
    return admin_pb2.Snapshot(name=snapshot.name, volume=snapshot.volume, size_bytes=snapshot.size_bytes,
                              state=snapshot.state, progress=snapshot.progress, id=snapshot.id,
                              owner_node=snapshot.owner_node, disk=snapshot.disk, message=snapshot.message)


def attachment_to_proto(attachment: Attachment, export: Export | None = None,
                        initiator_iqn: str = "") -> admin_pb2.Attachment:
    """The attachment; with ``export``, how the node reaches the volume (never the secret)."""
    message = admin_pb2.Attachment(volume=attachment.volume, node=attachment.node,
                                   device_path=attachment.device_path, state=attachment.state,
                                   shared=attachment.shared, initiator_iqn=initiator_iqn)
    if export is not None:
        message.export.CopyFrom(common_pb2.ExportInfo(target_iqn=export.target_iqn, portals=list(export.portals),
                                                      lun=export.lun, naa=export.naa, serial=export.serial,
                                                      chap_user=export.chap_user))
    return message
