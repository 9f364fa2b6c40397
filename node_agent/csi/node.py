"""CSI Node service: stage (mkfs only on a blank device, mount), publish (bind mounts), stats.

Idempotency, RPC by RPC (a repeat of a finished call answers as the first did):

- NodeStageVolume: staging path already mounted from this volume's device -> OK;
  mounted from something else -> ALREADY_EXISTS.  Block access mounts nothing at stage.
- NodePublishVolume: target already mounted from the same source -> OK; from something
  else -> ALREADY_EXISTS.  Mount access bind-mounts the staging path; block access
  bind-mounts the device file onto a file at the target path.  ``readonly`` (or a
  reader-only access mode) makes the bind mount read-only.  For block access that is what
  other CSI drivers do too, and it is advisory: the kernel does not refuse a write through a
  device node on a read-only mount (a read-only block publish is the CO's promise, not ours).
- NodeUnpublishVolume / NodeUnstageVolume: unmount what is mounted there; a path that
  is not mounted or does not exist -> OK.  Unpublish removes the target it leaves.
- NodeGetVolumeStats: NOT_FOUND for a path where nothing is mounted.

The device comes from ``DeviceResolver`` (the agent's attachment, checked).  A second call
on a volume while one is under way is ABORTED (``InFlight``).
"""

from __future__ import annotations

import os
import stat
from typing import Mapping

from controller.csi import capabilities as caps
from controller.csi.errors import InFlight, csi_rpc
from controller.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

NodeRPC = csi_pb2.NodeServiceCapability.RPC
NODE_CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.SINGLE_NODE_MULTI_WRITER)
#: The same keys as the Controller's ``CsiSettings.topology_keys`` (kept equal by a test).
DEFAULT_TOPOLOGY_KEYS = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone", "region", "zone")
#: Mount flags that would make ``mount -o`` do something else than mount the volume's filesystem.
REFUSED_MOUNT_FLAGS = frozenset({"bind", "rbind", "remount", "move", "X-mount.mkdir"})


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, labels: Mapping[str, str], devices: DeviceResolver, mounter: Mounter, *,
                 topology_keys: tuple[str, ...] = DEFAULT_TOPOLOGY_KEYS):
        self.node_id = node_id
        self.labels = dict(labels)
        self.devices = devices
        self.mounter = mounter
        self.topology_keys = topology_keys
        self.busy = InFlight()

    # -- information -------------------------------------------------------------------------------------
    @csi_rpc()
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t)) for t in NODE_CAPABILITIES])

    @csi_rpc()
    def NodeGetInfo(self, request, context):
        segments = {k: self.labels[k] for k in self.topology_keys if k in self.labels}
        response = csi_pb2.NodeGetInfoResponse(node_id=self.node_id)
        if segments:
            response.accessible_topology.CopyFrom(csi_pb2.Topology(segments=segments))
        return response

    # -- stage ---------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "staging_target_path", "volume_capability")
    def NodeStageVolume(self, request, context):
        capability = _supported(request.volume_capability)
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            device = self.devices.device(request.volume_id, request.publish_context)
            if caps.is_block(capability):
                return csi_pb2.NodeStageVolumeResponse()
            path = request.staging_target_path
            current = self.mounter.mounted_at(path)
            if current is not None:
                if current.dev != os.stat(device).st_rdev:
                    raise AlreadyExists(f"{path} is already mounted from {current.source}, not volume "
                                        f"{request.volume_id}'s device")
                return csi_pb2.NodeStageVolumeResponse()
            fs_type = capability.mount.fs_type or caps.DEFAULT_FS_TYPE
            found = self.mounter.fs_type(device)
            if not found:
                self.mounter.mkfs(device, fs_type)
            elif found != fs_type:
                raise FailedPrecondition(f"volume {request.volume_id} holds {found!r}, not {fs_type!r}: "
                                         "it is never reformatted")
            os.makedirs(path, exist_ok=True)
            options = list(capability.mount.mount_flags)
            if capability.access_mode.mode in caps.READ_ONLY_MODES:
                options.append("ro")
            self.mounter.mount(device, path, fs_type, options)
        return csi_pb2.NodeStageVolumeResponse()

    @csi_rpc("volume_id", "staging_target_path")
    def NodeUnstageVolume(self, request, context):
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            if self.mounter.mounted_at(request.staging_target_path) is not None:
                self.mounter.umount(request.staging_target_path)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish ---------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "staging_target_path", "target_path", "volume_capability")
    def NodePublishVolume(self, request, context):
        capability = _supported(request.volume_capability)
        readonly = request.readonly or capability.access_mode.mode in caps.READ_ONLY_MODES
        target = request.target_path
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            if caps.is_block(capability):
                device = self.devices.device(request.volume_id, request.publish_context)
                source, source_dev = device, os.stat(device).st_rdev
            else:
                staged = self.mounter.mounted_at(request.staging_target_path)
                if staged is None:
                    raise FailedPrecondition(f"volume {request.volume_id} is not staged at "
                                             f"{request.staging_target_path}: NodeStageVolume first")
                source, source_dev = request.staging_target_path, staged.dev
            current = self.mounter.mounted_at(target)
            if current is not None:
                if current.dev != source_dev and not _is_device_file_of(target, source_dev):
                    raise AlreadyExists(f"{target} is already mounted from {current.source}")
                return csi_pb2.NodePublishVolumeResponse()
            if caps.is_block(capability):
                os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
                if not os.path.exists(target):
                    with open(target, "a"):
                        pass
            else:
                os.makedirs(target, exist_ok=True)
            self.mounter.bind(source, target, readonly)
        return csi_pb2.NodePublishVolumeResponse()

    @csi_rpc("volume_id", "target_path")
    def NodeUnpublishVolume(self, request, context):
        target = request.target_path
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            while self.mounter.mounted_at(target) is not None:  # a repeated publish elsewhere may have stacked
                self.mounter.umount(target)
            _remove(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- stats ------------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "volume_path")
    def NodeGetVolumeStats(self, request, context):
        path = request.volume_path
        if not os.path.exists(path) or self.mounter.mounted_at(path) is None:
            raise NotFound(f"nothing of volume {request.volume_id} is mounted at {path}")
        Usage = csi_pb2.VolumeUsage
        if stat.S_ISBLK(os.stat(path).st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            return csi_pb2.NodeGetVolumeStatsResponse(usage=[Usage(unit=Usage.BYTES, total=size)])
        st = os.statvfs(path)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=[
            Usage(unit=Usage.BYTES, total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
                  used=(st.f_blocks - st.f_bfree) * st.f_frsize),
            Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree)])

    # NodeExpandVolume is not offered yet: the generated base class answers UNIMPLEMENTED.


def _supported(capability: csi_pb2.VolumeCapability) -> csi_pb2.VolumeCapability:
    reason = caps.unsupported(capability)
    if reason:
        raise InvalidArgument(reason)
    if capability.WhichOneof("access_type") == "mount":
        for flag in capability.mount.mount_flags:
            if not flag or "," in flag or flag.split("=", 1)[0] in REFUSED_MOUNT_FLAGS:
                raise InvalidArgument(f"mount flag {flag!r} is not accepted: give one filesystem option per flag")
    return capability


def _is_device_file_of(path: str, rdev: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
