"""CSI Node service: stage (log in, mkfs only on a blank device nothing uses, mount), publish (bind mounts),
expand, stats.

Paths: ``staging_target_path``, ``target_path`` and ``volume_path`` must be absolute (the spec's "MUST be an
absolute path"; INVALID_ARGUMENT otherwise, before anything is made or mounted).  A symbolic link at one of them
is never followed: stage and publish refuse it (FAILED_PRECONDITION), unstage, unpublish and stats leave it
alone.  A publish creates its mount point itself (``O_CREAT|O_EXCL|O_NOFOLLOW`` for a file, ``mkdir`` for a
directory) and accepts an existing one only if it is an ordinary file or directory.

Every RPC that uses the device (stage, publish, unstage, expand) holds the agent's own lock of the volume
(``DeviceResolver.hold``): the agent's detach (ControllerUnpublishVolume, ``shoalctl volume detach``) waits for
it, and then finds the device in use.  The device's identity is checked at the start and again right before
mkfs and before mount.

Idempotency, RPC by RPC (a repeat of a finished call answers as the first did):

- NodeStageVolume: logs in to the LUN ControllerPublishVolume recorded with this
  node's agent (a repeat finds it logged in), through the agent's connector, which
  checks the LUN's identity before a device exists.  Staging path already mounted
  from this volume's device with the same filesystem, read-only-ness and mount flags (as far as mountinfo
  shows them: ``mounts.flags_differ``) -> OK; mounted from something else or otherwise -> ALREADY_EXISTS.
  Formatting: only a blank device (``mounts.reads_blank``: blkid finds no signature and the device reads back
  zeros -- all of it up to 1 GiB, evenly spread windows of a larger one) that nothing uses (no mount of it,
  no block publish of it, no exclusive opener); anything else is FAILED_PRECONDITION and never formatted.
  Shoal's volumes are created zeroed (thin files), so a volume reads blank until something wrote to it.
  A device published for raw block access is never mounted as a filesystem (FAILED_PRECONDITION).
  A read-only stage (reader-only access mode) never writes the device: no mkfs, no offline growth, and the
  filesystem is mounted ``ro`` with ``noload`` (ext4) or ``norecovery`` (xfs), so not even a journal replay
  writes it.  An ext4 smaller than its device (the volume grew meanwhile) is grown before a writable mount.
  A stage that fails after logging in logs out again (unless the device is in use), so a failed stage leaves
  no session behind.  A failed mount, and an ext4 that ``dumpe2fs`` or the offline growth fail on (damaged),
  answer FAILED_PRECONDITION with the command's message.  Block access mounts nothing at stage: it leaves a
  marker file holding the volume id (``BLOCK_STAGE_MARKER``) in the staging directory, so that a stage with
  mount access at that path is ALREADY_EXISTS, as a block stage where a filesystem is staged is (also after
  the agent restarted); NodeUnstageVolume removes it.
- Mount flags are filesystem options, one per flag; flags that change what is mounted or how
  (``REFUSED_MOUNT_FLAGS``: ``ro``/``rw`` are the access mode's and ``readonly``'s to say; ``loop``,
  ``offset=``, ``sizelimit=`` mount a loop device instead of the volume; ``bind``, ``remount``, ``X-mount.*``,
  propagation flags, ...) are INVALID_ARGUMENT; so are ``noload``/``norecovery`` (no journal replay: the plugin
  adds them itself to a read-only stage, a writable mount never goes without) and mount(8)'s ``user``,
  ``users``, ``owner``, ``group`` (meaningless for root's mount, and they add nosuid/nodev/noexec of their own).
- NodePublishVolume: no ``staging_target_path`` -> FAILED_PRECONDITION (the spec's row for a plugin with
  STAGE_UNSTAGE_VOLUME).  Target already mounted from the same source, for the same access type and
  read-only-ness (and for mount access: staged with the capability's filesystem and mount flags, as far as
  mountinfo shows them) -> OK; anything else there -> ALREADY_EXISTS.  Mount access bind-mounts the staging
  path; block access bind-mounts the device file onto a file at the target path.  ``readonly`` (or a reader-only
  access mode) makes the bind mount read-only, and for block access the device bound is a read-only loop
  device over the volume's (``losetup --read-only``): the kernel refuses writes to it, where a read-only bind
  mount of a device node refuses none.  FAILED_PRECONDITION (the spec's "published with another capability"):
  block access while the volume's filesystem is mounted (staged), mount access while it is published for
  block access, mount access with another filesystem or mount flags than the staging mount's (a first
  publish; its repeat would be ALREADY_EXISTS), and a SINGLE_NODE_SINGLE_WRITER volume published at another
  target already.
- NodeUnpublishVolume: unmount what is mounted there (and detach the read-only loop device a read-only block
  publish made); remove the empty directory or file publish made; anything else there, or a path that is not
  mounted or does not exist -> OK, left as it is.
- NodeUnstageVolume: unmount the staging path if it holds this volume's device (another volume's staging mount
  stays: this volume is not staged there), then log out (the agent keeps the record until
  ControllerUnpublishVolume), then remove the block stage marker; refuses (FAILED_PRECONDITION) while the
  device is still published somewhere: a device path must not outlive its login.  The volume's devices are the
  agent's answer (``DeviceResolver.unstage_devices``): a recorded ``/dev/sdX`` that is another volume's disk by
  now (a host reboot) is not, so that volume's mounts neither block nor are taken; a dead loop device a stopped
  agent left of a userspace volume is, so the staging mount made on it is unmounted and the logout removes the
  device.
- NodeExpandVolume: an unsupported ``volume_capability`` -> INVALID_ARGUMENT (this RPC's "exceeds
  capabilities").  The device re-reads its capacity (the connector's rescan); smaller than
  ``required_bytes`` -> UNAVAILABLE (the LUN's new size is not seen yet: retry).  Then ``resize2fs`` (ext4)
  or ``xfs_growfs`` (xfs) through a writable mount of the filesystem (the staging path when the publish at
  ``volume_path`` is read-only), nothing more for block (read-only loop devices take the new size).  A
  filesystem that already fills the device is left as it is.
- NodeGetVolumeStats: NOT_FOUND for a path where nothing of this volume is mounted (another volume's mount
  there too), and for a volume this node has no record of (not ControllerPublishVolume'd here);
  volume_condition is abnormal when the node is not logged in, the device is gone or not the volume's, the
  session or its FUSE export is down, or I/O errors were seen.

The device comes from ``DeviceResolver`` (the agent's attachment, checked).  A second call
on a volume while one is under way is ABORTED (``InFlight``).

NodeGetInfo reports, as ``accessible_topology``, the node's labels under the controller's topology keys
(``CsiSettings.topology_keys``, the keys CreateVolume's ``accessible_topology`` is made of), taken from
``NodeLabels``: with a controller, the labels it recorded at the agent's last successful Register (the
Kubernetes Node's topology labels merged in with ``--store kubernetes``), so CSINode and the volumes' node
affinity agree.  Before the first Register it waits up to ``labels_timeout`` and then answers UNAVAILABLE:
an empty topology would stay in CSINode, while a failed plugin registration is retried (node-driver-registrar
restarts).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import Mapping

from controller.csi import capabilities as caps
from controller.csi.controller import CsiSettings
from controller.csi.errors import InFlight, csi_rpc
from controller.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mount, Mounter, flags_differ
from node_agent.host.runner import CommandFailed
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger("shoal.csi.node")

NodeRPC = csi_pb2.NodeServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
NODE_CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.EXPAND_VOLUME, NodeRPC.GET_VOLUME_STATS,
                     NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER)
#: The Controller's keys: NodeGetInfo's segments are the same keys CreateVolume's accessible_topology uses.
DEFAULT_TOPOLOGY_KEYS: tuple[str, ...] = CsiSettings().topology_keys
#: How long NodeGetInfo waits for the agent's first Register (normally well under a second after start) before
#: answering UNAVAILABLE; kubelet gives the call minutes, so a few seconds cost nothing.
LABELS_TIMEOUT = 5.0
#: Mount flags (the part before any "=") that would make ``mount -o`` do something else than mount the volume's
#: filesystem as the access mode says: another source (loop devices, bind mounts), another program, other
#: propagation, mount(8)'s own actions, or a read-only-ness of its own.
REFUSED_MOUNT_FLAGS = frozenset({
    "bind", "rbind", "remount", "move",
    "ro", "rw",
    "loop", "offset", "sizelimit", "encryption",
    "helper", "uhelper",
    "shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable",
    "noload", "norecovery",
    "user", "users", "owner", "group",
})
#: Why some of ``REFUSED_MOUNT_FLAGS`` are refused, where it is not the general "not a filesystem option".
REFUSED_BECAUSE = {
    # A writable ext4 mounted with noload runs without its journal (and skips its replay): the next crash leaves it
    # inconsistent.  A read-only stage gets them from the plugin itself (NO_REPLAY): a mount flag is never needed.
    **dict.fromkeys(("noload", "norecovery"),
                    "it skips the filesystem's journal replay: a read-only stage gets it from the plugin, a writable "
                    "mount must never go without"),
    # mount(8)'s options for an fstab entry that a user other than root may mount: they mean nothing for a mount
    # the plugin makes as root, except that mount(8) adds nosuid,nodev(,noexec) of its own, which a repeated
    # stage would then see as flags not asked for (ALREADY_EXISTS for an identical repeat).  Refused rather than
    # expanded in flags_differ: what they imply is mount(8)'s rule (a later "exec" undoes "user"'s noexec, ...),
    # and a StorageClass that wants nosuid, nodev or noexec can say so.
    **dict.fromkeys(("user", "users", "owner", "group"),
                    "it is mount(8)'s option for mounts by users other than root, and adds nosuid, nodev (and "
                    "noexec) of its own: ask for those flags themselves"),
}
#: Prefixes of mount(8)'s userspace options (``X-mount.mkdir``, ``X-mount.subdir=``, ``x-systemd.*``).
REFUSED_MOUNT_FLAG_PREFIXES = ("X-", "x-")
#: What a read-only stage adds to ``ro`` so that mounting writes nothing (no journal or log replay).
NO_REPLAY = {"ext4": "noload", "xfs": "norecovery"}
#: The file a block stage leaves in its staging directory (it mounts nothing there), holding the volume id: the
#: record that the path is staged for block access, which a later stage with mount access at the same path must
#: see (ALREADY_EXISTS), also after the agent restarted.  NodeUnstageVolume removes it.
BLOCK_STAGE_MARKER = ".shoal-block-stage"


class NodeLabels:
    """The node's labels for NodeGetInfo: given at once (an agent without a controller), or ``set`` by the
    registration after every successful Register (the controller's record); thread-safe."""

    def __init__(self, labels: Mapping[str, str] | None = None):
        self._changed = threading.Condition()
        self._labels = dict(labels) if labels is not None else None

    def set(self, labels: Mapping[str, str]) -> None:
        with self._changed:
            self._labels = dict(labels)
            self._changed.notify_all()

    def wait(self, timeout: float) -> dict[str, str] | None:
        """The labels, waiting up to ``timeout`` seconds for the first ``set``; None if none came."""
        with self._changed:
            self._changed.wait_for(lambda: self._labels is not None, timeout)
            return dict(self._labels) if self._labels is not None else None


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, labels: Mapping[str, str] | NodeLabels, devices: DeviceResolver,
                 mounter: Mounter, *, topology_keys: tuple[str, ...] = DEFAULT_TOPOLOGY_KEYS,
                 labels_timeout: float = LABELS_TIMEOUT):
        self.node_id = node_id
        self.labels = labels if isinstance(labels, NodeLabels) else NodeLabels(labels)
        self.devices = devices
        self.mounter = mounter
        self.topology_keys = topology_keys
        self.labels_timeout = labels_timeout
        self.busy = InFlight()

    # -- information -------------------------------------------------------------------------------------
    @csi_rpc()
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t)) for t in NODE_CAPABILITIES])

    @csi_rpc()
    def NodeGetInfo(self, request, context):
        labels = self.labels.wait(self.labels_timeout)
        if labels is None:
            raise Unavailable(f"node {self.node_id} has not registered with the Shoal controller yet, which "
                              "records its topology labels: retry")
        segments = {k: labels[k] for k in self.topology_keys if k in labels}
        response = csi_pb2.NodeGetInfoResponse(node_id=self.node_id)
        if segments:
            response.accessible_topology.CopyFrom(csi_pb2.Topology(segments=segments))
        return response

    # -- stage ---------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "staging_target_path", "volume_capability")
    def NodeStageVolume(self, request, context):
        capability = _supported(request.volume_capability)
        path = _absolute(request.staging_target_path, "staging_target_path")
        volume_id = request.volume_id
        with self.busy.hold(volume_id, f"volume {volume_id}"), self.devices.hold(volume_id):
            logged_in_before = bool(self.devices.logged_in(volume_id))
            device = self.devices.stage(volume_id, request.publish_context)
            try:
                self._stage(request, capability, device, path)
            except BaseException:
                if not logged_in_before:  # the CO was told nothing is staged: no NodeUnstageVolume will come
                    self._undo_login(volume_id, device)
                raise
        return csi_pb2.NodeStageVolumeResponse()

    def _stage(self, request, capability, device: str, path: str) -> None:
        volume_id = request.volume_id
        _not_a_symlink(path, "staging_target_path")
        current = self.mounter.mounted_at(path)
        marked = None if current is not None else _block_stage_of(path)
        if caps.is_block(capability):
            if current is not None:  # staged before as a filesystem: not the same volume capability
                raise AlreadyExists(f"volume {volume_id} is staged at {path} with a filesystem, not for block access")
            if marked and marked != volume_id:
                raise AlreadyExists(f"{path} is the staging path of volume {marked} for block access, not of "
                                    f"volume {volume_id}")
            if marked is None:
                _mark_block_stage(path, volume_id)
            return
        if marked is not None:  # staged before for block access: not the same volume capability
            raise AlreadyExists(f"volume {marked or volume_id} is staged at {path} for block access, not with a "
                                "filesystem")
        fs_type = capability.mount.fs_type or caps.DEFAULT_FS_TYPE
        read_only = capability.access_mode.mode in caps.READ_ONLY_MODES
        flags = list(capability.mount.mount_flags)
        if current is not None:
            self._check_staged(volume_id, path, current, device, fs_type, read_only, flags)
            return
        raw = [use.mount_point for use in self.mounter.uses(device) if use.block]
        if raw:  # a write through the device file would corrupt the filesystem under the mount
            raise FailedPrecondition(f"volume {volume_id} is published for raw block access at {', '.join(raw)}: "
                                     "its filesystem is not mounted as well (NodeUnpublishVolume those first)")
        found = self._filesystem_on(volume_id, device)
        if not found and read_only:
            raise FailedPrecondition(f"volume {volume_id} holds no filesystem, and a read-only stage never formats: "
                                     "stage it writable once")
        if not found:
            self._format(request, device, fs_type)
        elif found != fs_type:
            raise FailedPrecondition(f"volume {volume_id} holds {found!r}, not {fs_type!r}: it is never reformatted")
        elif found == "ext4" and not read_only:
            self._grow_ext4_offline(volume_id, device)
        _make_directory(path)
        self._recheck(request, device)
        options = flags + (["ro", NO_REPLAY[fs_type]] if read_only else [])
        try:
            self.mounter.mount(device, path, fs_type, options)
        except CommandFailed as exc:  # a mount flag the filesystem refuses, a filesystem needing a check, ...
            raise FailedPrecondition(f"volume {volume_id}: mounting its {fs_type} at {path} failed: {exc}") from None

    def _grow_ext4_offline(self, volume_id: str, device: str) -> None:
        """The volume grew while it was not staged (or where online growth is refused): grow its ext4 now,
        before it is mounted.  xfs grows only mounted: NodeExpandVolume does that.  A filesystem that
        ``dumpe2fs``, ``e2fsck -p`` or ``resize2fs`` fail on (damaged: a checksum that does not match, ...) is
        FAILED_PRECONDITION, as a failed mount is: it needs a check by hand, which no retry of the stage does."""
        try:
            if self.mounter.ext4_size(device) < _size(device):
                self.mounter.grow_offline(device)
        except CommandFailed as exc:
            raise FailedPrecondition(f"volume {volume_id}: its ext4 on {device} could not be checked or grown to "
                                     f"the device's size (it needs e2fsck by hand): {exc}") from None

    def _check_staged(self, volume_id: str, path: str, current: Mount, device: str, fs_type: str,
                      read_only: bool, flags: list[str]) -> None:
        """A repeated stage: OK when ``current`` is what this one would have mounted, else ALREADY_EXISTS."""
        if current.dev != os.stat(device).st_rdev:
            raise AlreadyExists(f"{path} is already mounted from {current.source}, not volume {volume_id}'s device")
        staged_ro = "ro" in current.options
        differ = flags_differ(flags, current)
        if current.fs_type != fs_type or staged_ro != read_only or differ:
            raise AlreadyExists(f"volume {volume_id} is staged at {path} as {current.fs_type} "
                                f"({'ro' if staged_ro else 'rw'}{', other mount flags: ' if differ else ''}"
                                f"{', '.join(differ)}), not as the capability asks ({fs_type}, "
                                f"{'ro' if read_only else 'rw'})")

    def _filesystem_on(self, volume_id: str, device: str) -> str:
        try:
            return self.mounter.fs_type(device)
        except OSError as exc:  # never taken for blank: formatting it could wipe a filesystem
            raise Unavailable(f"volume {volume_id}: {device} could not be read to check what it holds ({exc}); "
                              "retry") from None

    def _format(self, request, device: str, fs_type: str) -> None:
        """mkfs, on a device nothing uses: no mount or publish of it, no exclusive opener (an ``O_EXCL`` open
        succeeds), and still the volume's."""
        volume_id = request.volume_id
        users = self.mounter.users(device)
        if users:
            raise FailedPrecondition(f"volume {volume_id} reads blank but is in use at {', '.join(users)}: "
                                     "it is never formatted while in use")
        try:
            held = self.mounter.held_exclusively(device)
        except OSError as exc:
            raise Unavailable(f"volume {volume_id}: {device} could not be opened ({exc}); retry") from None
        if held:
            raise FailedPrecondition(f"volume {volume_id}: {device} is held open exclusively by something else on "
                                     "this node: it is never formatted while in use")
        self._recheck(request, device)
        self.mounter.mkfs(device, fs_type)

    def _recheck(self, request, device: str) -> None:
        """The device is still the volume's (record, connector and VPD checks) right before mkfs or mount."""
        again = self.devices.device(request.volume_id, request.publish_context)
        if again != device:
            raise FailedPrecondition(f"volume {request.volume_id} is now at {again}, not {device}: retry")

    def _undo_login(self, volume_id: str, device: str) -> None:
        users = self.mounter.users(device)
        if users:
            log.warning("volume %s: the failed stage leaves it logged in: %s is in use at %s", volume_id, device,
                        ", ".join(users))
            return
        try:
            self.devices.unstage(volume_id)
        except Exception as exc:  # the stage's own error is the answer; a repeat logs in and tries again
            log.warning("volume %s: logging out after the failed stage failed: %s", volume_id, exc)
        else:
            log.info("volume %s: logged out again after the failed stage", volume_id)

    @csi_rpc("volume_id", "staging_target_path")
    def NodeUnstageVolume(self, request, context):
        path = _absolute(request.staging_target_path, "staging_target_path")
        volume_id = request.volume_id
        with self.busy.hold(volume_id, f"volume {volume_id}"), self.devices.hold(volume_id):
            devices = self.devices.unstage_devices(volume_id)
            staging = os.path.realpath(path)
            mount = None if _is_symlink(path) else self.mounter.mounted_at(path)
            ours = mount is not None and any(_mounted_from(mount, device) for device in devices)
            elsewhere = [p for device in devices for p in self.mounter.users(device) if p != staging]
            if elsewhere:  # logging out under a published device would leave its path to whoever comes next
                raise FailedPrecondition(f"volume {volume_id} is still published at {', '.join(elsewhere)}: "
                                         "NodeUnpublishVolume first")
            if ours:
                self.mounter.umount(path)
            elif mount is not None:  # not this volume's: it is not staged there, and another's stays
                log.warning("unstage of volume %s: %s holds %s, not this volume's device: left mounted", volume_id,
                            path, mount.source)
            for device in devices:
                self._detach_unused_loops(device)
            self.devices.unstage(volume_id)
            # Only once logged out: an unstage that fails before is repeated, and finds the volume still staged
            # for block access meanwhile (a stage with mount access there stays refused).
            if mount is None or ours:
                _unmark_block_stage(path, volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish ---------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "target_path", "volume_capability")
    def NodePublishVolume(self, request, context):
        capability = _supported(request.volume_capability)
        target = _absolute(request.target_path, "target_path")
        if not request.staging_target_path:
            raise FailedPrecondition("staging_target_path is not set: this plugin stages volumes "
                                     "(STAGE_UNSTAGE_VOLUME): NodeStageVolume first")
        staging = _absolute(request.staging_target_path, "staging_target_path")
        readonly = request.readonly or capability.access_mode.mode in caps.READ_ONLY_MODES
        block = caps.is_block(capability)
        volume_id = request.volume_id
        with self.busy.hold(volume_id, f"volume {volume_id}"), self.devices.hold(volume_id):
            if not block:
                staged = None if _is_symlink(staging) else self.mounter.mounted_at(staging)
                if staged is None:
                    raise FailedPrecondition(f"volume {volume_id} is not staged at {staging}: NodeStageVolume first")
            device = self.devices.device(volume_id, request.publish_context)
            rdev = os.stat(device).st_rdev
            if not block and staged.dev != rdev:  # another volume's staging path: never bind that
                raise FailedPrecondition(f"{staging} holds another volume's filesystem, not volume {volume_id}'s")
            _not_a_symlink(target, "target_path")
            current = self.mounter.mounted_at(target)
            if current is not None:
                self._check_published(volume_id, target, current, rdev, block, readonly)
                if not block:
                    unlike = _unlike_staged(capability, staged)
                    if unlike:  # the spec's "published ... but is incompatible with the specified volume_capability"
                        raise AlreadyExists(f"volume {volume_id} is published at {target} from its staging at "
                                            f"{staging}, staged {unlike}: not as the capability asks")
                return csi_pb2.NodePublishVolumeResponse()
            if not block:
                unlike = _unlike_staged(capability, staged)
                if unlike:  # a first publish that would answer OK, and then its identical repeat ALREADY_EXISTS
                    raise FailedPrecondition(f"volume {volume_id} is staged at {staging} {unlike}: it is published "
                                             "with the capability it was staged with only (NodeStageVolume again)")
            self._check_other_uses(volume_id, capability, device, staging, target)
            if block:
                self._publish_block(device, target, readonly)
            else:
                _make_directory(target)
                self.mounter.bind(staging, target, readonly)
        return csi_pb2.NodePublishVolumeResponse()

    def _check_published(self, volume_id: str, target: str, current: Mount, rdev: int, block: bool,
                         readonly: bool) -> None:
        """A repeated publish: OK when ``target`` holds what this one would have bound, else ALREADY_EXISTS."""
        held = self._held_at(target, current, rdev)
        if held is None or held[0] != block:
            raise AlreadyExists(f"{target} is already mounted from {current.source}, not volume {volume_id}'s "
                                f"{'device' if block else 'filesystem'}")
        published_ro = "ro" in current.options and (not block or held[1])
        if published_ro != readonly:
            raise AlreadyExists(f"volume {volume_id} is published at {target} "
                                f"{'read-only' if published_ro else 'writable'}, not as asked")

    def _held_at(self, path: str, mount: Mount, rdev: int) -> tuple[bool, bool] | None:
        """What of the device ``rdev`` is mounted at ``path``: (block, through a read-only loop device) for its
        device file or a read-only loop device over it, (False, False) for its filesystem, None for neither."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if stat.S_ISBLK(st.st_mode):
            if st.st_rdev == rdev:
                return True, False
            loop = self.mounter.loop_at(path)
            return (True, True) if loop is not None and loop[1] == rdev else None
        return (False, False) if mount.dev == rdev else None

    def _check_other_uses(self, volume_id: str, capability, device: str, staging: str, target: str) -> None:
        """FAILED_PRECONDITION for a publish that the device's other uses rule out (CSI NodePublishVolume:
        published with another capability, or a single writer's second target)."""
        uses = self.mounter.uses(device)
        if caps.is_block(capability):
            clash = [use.mount_point for use in uses if not use.block]
            why = "its filesystem is mounted at {}: it is not published for raw block access as well"
        else:
            clash = [use.mount_point for use in uses if use.block]
            why = "it is published for raw block access at {}: its filesystem is not published as well"
        if clash:
            raise FailedPrecondition(f"volume {volume_id}: {why.format(', '.join(clash))}")
        if capability.access_mode.mode == Mode.SINGLE_NODE_SINGLE_WRITER:
            own = {os.path.realpath(staging), os.path.realpath(target)}
            others = [use.mount_point for use in uses if use.mount_point not in own]
            if others:
                raise FailedPrecondition(f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and published at "
                                         f"{', '.join(others)} already")

    def _publish_block(self, device: str, target: str, readonly: bool) -> None:
        _make_file(target)
        source = self.mounter.read_only_loop(device) if readonly else device
        try:
            self.mounter.bind(source, target, readonly)
        except BaseException:
            if source != device:
                self._detach_loop(source)
            raise

    @csi_rpc("volume_id", "target_path")
    def NodeUnpublishVolume(self, request, context):
        target = _absolute(request.target_path, "target_path")
        volume_id = request.volume_id
        with self.busy.hold(volume_id, f"volume {volume_id}"):
            if _is_symlink(target):  # never made by a publish, never followed
                log.warning("unpublish of volume %s: %s is a symbolic link: left alone", volume_id, target)
                return csi_pb2.NodeUnpublishVolumeResponse()
            loops = set()
            while self.mounter.mounted_at(target) is not None:  # a repeated publish elsewhere may have stacked
                loop = self.mounter.loop_at(target)
                self.mounter.umount(target)
                if loop is not None:
                    loops.add(loop[0])
            device = self.devices.logged_in(volume_id)
            for loop in sorted(loops | set(self.mounter.loops_over(device) if device else ())):
                if not self.mounter.users(loop):
                    self._detach_loop(loop)
            _remove(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _detach_unused_loops(self, device: str) -> None:
        for loop in self.mounter.loops_over(device):
            if not self.mounter.users(loop):
                self._detach_loop(loop)

    def _detach_loop(self, loop: str) -> None:
        try:
            self.mounter.detach_loop(loop)
        except CommandFailed as exc:  # the next unpublish or unstage of the volume tries again
            log.warning("read-only loop device %s stays: %s", loop, exc)

    # -- expand ------------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "volume_path")
    def NodeExpandVolume(self, request, context):
        if request.HasField("volume_capability"):
            reason = caps.unsupported(request.volume_capability)
            if reason:  # this RPC's "exceeds capabilities" is INVALID_ARGUMENT
                raise InvalidArgument(reason)
        _absolute(request.volume_path, "volume_path")
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (limit and required > limit):
            raise InvalidArgument("capacity_range: bytes must not be negative, required_bytes at most limit_bytes")
        volume_id = request.volume_id
        with self.busy.hold(volume_id, f"volume {volume_id}"), self.devices.hold(volume_id):
            device = self.devices.device(volume_id, {})
            mount = self._filesystem_to_grow(request, device)
            size = self.devices.rescan(volume_id)
            if required and size < required:  # not FAILED_PRECONDITION: for this RPC that means "MUST NOT retry"
                raise Unavailable(f"volume {volume_id} is {size} bytes on this node, not yet the {required} bytes "
                                  "asked (ControllerExpandVolume first, or the LUN's new size is not seen yet): retry")
            for loop in self.mounter.loops_over(device):
                self.mounter.refresh_loop(loop)
            if mount is not None:
                where = self._writable_mount(volume_id, device, request.volume_path)
                try:
                    self.mounter.grow(device, where, mount.fs_type)
                except CommandFailed as exc:  # e.g. online ext4 growth without CAP_SYS_RESOURCE: EPERM
                    raise FailedPrecondition(f"volume {volume_id}: growing its {mount.fs_type} at {where} failed: "
                                             f"{exc}") from None
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def _filesystem_to_grow(self, request, device: str) -> Mount | None:
        """The volume's filesystem mounted at volume_path, or None for block access (the device file there)."""
        path = request.volume_path
        if _is_symlink(path) or not os.path.exists(path):
            raise NotFound(f"volume path {path} does not exist")
        rdev = os.stat(device).st_rdev
        mount = self.mounter.mounted_at(path)
        held = self._held_at(path, mount, rdev) if mount is not None else None
        if (held is not None and held[0]) or (request.HasField("volume_capability")
                                              and caps.is_block(request.volume_capability)):
            return None
        if held is None:
            raise NotFound(f"volume {request.volume_id} is not mounted at {path}")
        if mount.fs_type not in caps.FS_TYPES:
            raise FailedPrecondition(f"{path} holds {mount.fs_type}: Shoal grows only {' and '.join(caps.FS_TYPES)}")
        return mount

    def _writable_mount(self, volume_id: str, device: str, volume_path: str) -> str:
        """A writable mount of the volume's filesystem to grow it through: ``volume_path`` when it is one, else
        another (the staging path under a read-only publish)."""
        mounts = self.mounter.filesystem_mounts(device)
        writable = [m.mount_point for m in mounts if "rw" in m.options and "ro" not in m.super_options]
        here = os.path.realpath(volume_path)
        if here in writable:
            return here
        if not writable:
            raise FailedPrecondition(f"volume {volume_id}'s filesystem is mounted read-only only: it can grow once "
                                     "it is staged writable")
        return writable[0]

    # -- stats ------------------------------------------------------------------------------------------------
    @csi_rpc("volume_id", "volume_path")
    def NodeGetVolumeStats(self, request, context):
        path = _absolute(request.volume_path, "volume_path")
        mount = None if _is_symlink(path) or not os.path.exists(path) else self.mounter.mounted_at(path)
        if mount is None:
            raise NotFound(f"nothing of volume {request.volume_id} is mounted at {path}")
        self._check_volume_at(request.volume_id, path, mount)
        reason = self.devices.condition(request.volume_id)
        Usage = csi_pb2.VolumeUsage
        if stat.S_ISBLK(os.stat(path).st_mode):
            try:
                usage = [Usage(unit=Usage.BYTES, total=_size(path))]
            except OSError as exc:  # the disk behind the device node is gone (ENXIO), or fails
                reason, usage = reason or f"the device at {path} fails: {exc.strerror}", []
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

    def _check_volume_at(self, volume_id: str, path: str, mount: Mount) -> None:
        """NOT_FOUND for a volume this node has no record of (the spec's "Volume does not exist ... on specified
        volume_path": nothing of it can be there, whatever is mounted), and when ``path`` holds another device
        than the volume's.  A volume published here but not logged in, or whose device is gone, cannot be
        compared: the volume condition reports that."""
        if not self.devices.known(volume_id):
            raise NotFound(f"volume {volume_id} is not published to this node: {path} holds nothing of it")
        device = self.devices.logged_in(volume_id)
        try:
            rdev = os.stat(device).st_rdev if device else None
        except OSError:
            rdev = None
        if rdev is not None and self._held_at(path, mount, rdev) is None:
            raise NotFound(f"{path} holds {mount.source}, not volume {volume_id}")


def _block_stage_of(path: str) -> str | None:
    """The volume id the block stage marker at staging path ``path`` names ("" if it names none: written by
    hand), or None when there is no marker (nothing staged there for block access)."""
    marker = os.path.join(path, BLOCK_STAGE_MARKER)
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a symbolic link (ELOOP) or unreadable: never taken as "nothing staged"
        raise FailedPrecondition(f"the block stage marker {marker} cannot be read ({exc.strerror})") from None
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)


def _mark_block_stage(path: str, volume_id: str) -> None:
    """Leave the marker of a block stage in the staging directory (made here if the CO did not), whole or not at
    all (written aside, then renamed over), and on disk before the stage answers."""
    _make_directory(path)
    marker = os.path.join(path, BLOCK_STAGE_MARKER)
    partial = marker + ".new"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, volume_id.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, marker)


def _unmark_block_stage(path: str, volume_id: str) -> None:
    """Remove the block stage marker of ``volume_id`` at ``path`` (another volume's stays, as its mounts do)."""
    if _is_symlink(path):
        return
    marked = _block_stage_of(path)
    if marked == volume_id or marked == "":
        try:
            os.unlink(os.path.join(path, BLOCK_STAGE_MARKER))
        except FileNotFoundError:
            pass
    elif marked is not None:
        log.warning("unstage of volume %s: %s is the block staging path of volume %s: left as it is", volume_id,
                    path, marked)


def _unlike_staged(capability: csi_pb2.VolumeCapability, staged: Mount) -> str:
    """How the staging mount ``staged`` differs from a mount publish's capability: its filesystem type, and the
    mount flags as far as mountinfo shows them (``flags_differ``, as a repeated stage compares them); "" when it
    does not.  A publish binds the staging mount as it is: a filesystem or mount flags it asks for otherwise are
    not what it gets.  (The CO gives a publish the capability of the stage: kubelet does.)"""
    fs_type = capability.mount.fs_type or caps.DEFAULT_FS_TYPE
    unlike = [f"as {staged.fs_type}, not {fs_type}"] if staged.fs_type != fs_type else []
    differ = flags_differ(list(capability.mount.mount_flags), staged)
    if differ:
        unlike.append(f"with other mount flags: {', '.join(differ)}")
    return " and ".join(unlike)


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
            if not flag or "," in flag:
                raise InvalidArgument(f"mount flag {flag!r} is not accepted: give one filesystem option per flag")
            name = flag.split("=", 1)[0]
            if name in REFUSED_BECAUSE:
                raise InvalidArgument(f"mount flag {flag!r} is not accepted: {REFUSED_BECAUSE[name]}")
            if name in REFUSED_MOUNT_FLAGS or flag.startswith(REFUSED_MOUNT_FLAG_PREFIXES):
                raise InvalidArgument(f"mount flag {flag!r} is not accepted: mount flags are filesystem options; "
                                      "read-only is the access mode's or the publish's readonly to say")
    return capability


def _absolute(path: str, field: str) -> str:
    if not os.path.isabs(path):
        raise InvalidArgument(f"{field} {path!r} is not an absolute path")
    return path


def _is_symlink(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _not_a_symlink(path: str, field: str) -> None:
    if _is_symlink(path):
        raise FailedPrecondition(f"{field} {path} is a symbolic link: it is never followed")


def _make_directory(path: str) -> None:
    """The mount point of a stage or of a mount publish: made here, or an existing directory (not a link)."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise FailedPrecondition(f"{path} exists and is not a directory") from None


def _make_file(path: str) -> None:
    """The mount point of a block publish: made here (never through a link), or an existing regular file."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise FailedPrecondition(f"{path} exists and is not a regular file") from None
    else:
        os.close(fd)


def _mounted_from(mount: Mount, device: str) -> bool:
    """Whether ``mount`` is of ``device``'s filesystem (by its number; by its path if the device is gone)."""
    try:
        return mount.dev == os.stat(device).st_rdev
    except OSError:
        return mount.source == device


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
    except OSError as exc:  # a directory with something in it: not (only) what a publish made
        log.warning("unpublish: %s is left as it is: %s", path, exc.strerror)
