"""CSI Node service: stage (log in, mkfs only on a blank device, mount), publish (bind mounts), expand, stats.

Idempotency, RPC by RPC (a repeat of a finished call answers as the first did):

- NodeStageVolume: logs in to the LUN ControllerPublishVolume recorded with this
  node's agent (a repeat finds it logged in), through the agent's connector, which
  checks the LUN's identity before a device exists.  Staging path already mounted
  from this volume's device -> OK; mounted from something else -> ALREADY_EXISTS.
  An ext4 smaller than its device (the volume grew meanwhile) is grown before it is
  mounted.  Block access mounts nothing at stage.
- NodePublishVolume: target already mounted from the same source -> OK; from something
  else -> ALREADY_EXISTS.  Mount access bind-mounts the staging path; block access
  bind-mounts the device file onto a file at the target path.  ``readonly`` (or a
  reader-only access mode) makes the bind mount read-only.  For block access that is what
  other CSI drivers do too, and it is advisory: the kernel does not refuse a write through a
  device node on a read-only mount (a read-only block publish is the CO's promise, not ours).
- NodeUnpublishVolume / NodeUnstageVolume: unmount what is mounted there; a path that
  is not mounted or does not exist -> OK.  Unpublish removes the target it leaves;
  Unstage then logs out (the agent keeps the record until ControllerUnpublishVolume),
  and refuses (FAILED_PRECONDITION) while the device is still published somewhere:
  a device path must not outlive its login.
- NodeExpandVolume: the device re-reads its capacity (the connector's rescan), then
  ``resize2fs`` (ext4) or ``xfs_growfs`` (xfs) for mount access, nothing more for
  block.  A filesystem that already fills the device is left as it is.
- NodeGetVolumeStats: NOT_FOUND for a path where nothing is mounted; volume_condition
  is abnormal when the node is not logged in, the device is gone or not the volume's,
  the session or its FUSE export is down, or I/O errors were seen.

The device comes from ``DeviceResolver`` (the agent's attachment, checked).  A second call
on a volume while one is under way is ABORTED (``InFlight``).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Mapping

from controller.csi import capabilities as caps
from controller.csi.errors import InFlight, csi_rpc
from controller.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter
from node_agent.host.runner import CommandFailed
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger("shoal.csi.node")

NodeRPC = csi_pb2.NodeServiceCapability.RPC
NODE_CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.EXPAND_VOLUME, NodeRPC.GET_VOLUME_STATS,
                     NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER)
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
            device = self.devices.stage(request.volume_id, request.publish_context)
            path = request.staging_target_path
            current = self.mounter.mounted_at(path)
            read_only = capability.access_mode.mode in caps.READ_ONLY_MODES
            if caps.is_block(capability):
                if current is not None:  # staged before as a filesystem: not the same volume capability
                    raise AlreadyExists(f"volume {request.volume_id} is staged at {path} with a filesystem, "
                                        "not for block access")
                return csi_pb2.NodeStageVolumeResponse()
            fs_type = capability.mount.fs_type or caps.DEFAULT_FS_TYPE
            if current is not None:
                if current.dev != os.stat(device).st_rdev:
                    raise AlreadyExists(f"{path} is already mounted from {current.source}, not volume "
                                        f"{request.volume_id}'s device")
                if current.fs_type != fs_type or ("ro" in current.options) != read_only:
                    raise AlreadyExists(f"volume {request.volume_id} is staged at {path} as {current.fs_type} "
                                        f"({'ro' if 'ro' in current.options else 'rw'}), not as the capability "
                                        f"asks ({fs_type}, {'ro' if read_only else 'rw'})")
                return csi_pb2.NodeStageVolumeResponse()
            try:
                found = self.mounter.fs_type(device)
            except OSError as exc:  # never taken for blank: formatting it could wipe a filesystem
                raise Unavailable(f"volume {request.volume_id}: {device} could not be read to check what it "
                                  f"holds ({exc}); retry") from None
            if not found and read_only:
                raise FailedPrecondition(f"volume {request.volume_id} holds no filesystem, and a read-only stage "
                                         "never formats: stage it writable once")
            if not found:
                self.mounter.mkfs(device, fs_type)
            elif found != fs_type:
                raise FailedPrecondition(f"volume {request.volume_id} holds {found!r}, not {fs_type!r}: "
                                         "it is never reformatted")
            elif found == "ext4" and self.mounter.ext4_size(device) < _size(device):
                # The volume grew while it was not staged (or where online growth is refused): grow it now,
                # before it is mounted.  xfs grows only mounted: NodeExpandVolume does that.
                self.mounter.grow_offline(device)
            os.makedirs(path, exist_ok=True)
            options = list(capability.mount.mount_flags)
            if read_only:
                options.append("ro")
            self.mounter.mount(device, path, fs_type, options)
        return csi_pb2.NodeStageVolumeResponse()

    @csi_rpc("volume_id", "staging_target_path")
    def NodeUnstageVolume(self, request, context):
        staging = os.path.realpath(request.staging_target_path)
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            device = self.devices.logged_in(request.volume_id)
            elsewhere = [p for p in self.mounter.users(device) if p != staging] if device else []
            if elsewhere:  # logging out under a published device would leave its path to whoever comes next
                raise FailedPrecondition(f"volume {request.volume_id} is still published at "
                                         f"{', '.join(elsewhere)}: NodeUnpublishVolume first")
            if self.mounter.mounted_at(staging) is not None:
                self.mounter.umount(staging)
            self.devices.unstage(request.volume_id)
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
                device = self.devices.device(request.volume_id, request.publish_context)
                if staged.dev != os.stat(device).st_rdev:  # another volume's staging path: never bind that
                    raise FailedPrecondition(f"{request.staging_target_path} holds another volume's filesystem, "
                                             f"not volume {request.volume_id}'s")
                source, source_dev = request.staging_target_path, staged.dev
            current = self.mounter.mounted_at(target)
            if current is not None:
                if current.dev != source_dev and not _is_device_file_of(target, source_dev):
                    raise AlreadyExists(f"{target} is already mounted from {current.source}")
                if ("ro" in current.options) != readonly:
                    raise AlreadyExists(f"volume {request.volume_id} is published at {target} "
                                        f"{'read-only' if 'ro' in current.options else 'writable'}, not as asked")
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
        if not os.path.isabs(target):
            raise InvalidArgument(f"target_path {target!r} is not an absolute path")
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            while self.mounter.mounted_at(target) is not None:  # a repeated publish elsewhere may have stacked
                self.mounter.umount(target)
            _remove(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- expand ------------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "volume_path")
    def NodeExpandVolume(self, request, context):
        if request.HasField("volume_capability"):
            _supported(request.volume_capability)
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (limit and required > limit):
            raise InvalidArgument("capacity_range: bytes must not be negative, required_bytes at most limit_bytes")
        with self.busy.hold(request.volume_id, f"volume {request.volume_id}"):
            device = self.devices.device(request.volume_id, {})
            mount = self._filesystem_to_grow(request, device)
            size = self.devices.rescan(request.volume_id)
            if required and size < required:
                raise FailedPrecondition(f"volume {request.volume_id} is {size} bytes on this node, less than "
                                         f"the {required} bytes asked: ControllerExpandVolume first")
            if mount is not None:
                try:
                    self.mounter.grow(device, request.volume_path, mount.fs_type)
                except CommandFailed as exc:  # e.g. online ext4 growth without CAP_SYS_RESOURCE: EPERM
                    raise FailedPrecondition(f"volume {request.volume_id}: growing its {mount.fs_type} at "
                                             f"{request.volume_path} failed: {exc}") from None
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def _filesystem_to_grow(self, request, device: str):
        """The volume's filesystem mounted at volume_path, or None for block access (the device file there)."""
        path = request.volume_path
        if not os.path.exists(path):
            raise NotFound(f"volume path {path} does not exist")
        rdev = os.stat(device).st_rdev
        if _is_device_file_of(path, rdev) or (request.HasField("volume_capability")
                                              and caps.is_block(request.volume_capability)):
            return None
        mount = self.mounter.mounted_at(path)
        if mount is None or mount.dev != rdev:
            raise NotFound(f"volume {request.volume_id} is not mounted at {path}")
        if mount.fs_type not in caps.FS_TYPES:
            raise FailedPrecondition(f"{path} holds {mount.fs_type}: Shoal grows only {' and '.join(caps.FS_TYPES)}")
        return mount

    # -- stats ------------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "volume_path")
    def NodeGetVolumeStats(self, request, context):
        path = request.volume_path
        if not os.path.exists(path) or self.mounter.mounted_at(path) is None:
            raise NotFound(f"nothing of volume {request.volume_id} is mounted at {path}")
        reason = self.devices.condition(request.volume_id)
        Usage = csi_pb2.VolumeUsage
        if stat.S_ISBLK(os.stat(path).st_mode):
            usage = [Usage(unit=Usage.BYTES, total=_size(path))]
        else:
            try:
                st = os.statvfs(path)
            except OSError as exc:
                reason, usage = reason or f"the filesystem at {path} fails: {exc.strerror}", []
            else:
                usage = [Usage(unit=Usage.BYTES, total=st.f_blocks * st.f_frsize,
                               available=st.f_bavail * st.f_frsize, used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                         Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail,
                               used=st.f_files - st.f_ffree)]
        condition = csi_pb2.VolumeCondition(abnormal=bool(reason), message=reason or "healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _supported(capability: csi_pb2.VolumeCapability) -> csi_pb2.VolumeCapability:
    """INVALID_ARGUMENT for a malformed capability or mount flag; FAILED_PRECONDITION for a well-formed one
    Shoal does not serve (the spec's "Exceeds capabilities" of NodeStageVolume and NodePublishVolume)."""
    reason = caps.malformed(capability)
    if reason:
        raise InvalidArgument(reason)
    reason = caps.unsupported(capability)
    if reason:
        raise FailedPrecondition(reason)
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
    """Remove what publish made at ``path``: an empty directory (mount access) or an empty file (the mount
    point of a block publish).  Anything else there is not ours and stays."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
        else:
            log.warning("unpublish: %s is not what a publish leaves (a %s file of %d bytes): left alone", path,
                        "regular" if stat.S_ISREG(st.st_mode) else "special", st.st_size)
    except FileNotFoundError:
        pass
