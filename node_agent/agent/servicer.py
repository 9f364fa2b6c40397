"""``AgentService`` (protos/shoal/v1/agent.proto): validate, call a manager, build the answer.

Each method checks its arguments (``INVALID_ARGUMENT`` naming the field, and
nothing changed), then calls ``volumes``/``snapshots``/``exports``/``attachments``, whose
docstrings say what a repeat does.  The ``rpc`` decorator serialises calls per
volume, logs (never a secret) and maps errors with the one table of
``errors.GRPC_CODES``; anything else is a bug, logged with its traceback and
answered ``INTERNAL``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator

import grpc

from node_agent.agent.attachments import AttachmentManager, check_mode
from node_agent.agent.errors import InvalidArgument, NotFound, grpc_status
from node_agent.agent.exports import ExportInfo, ExportManager, refuse_if_exported
from node_agent.agent.settings import check_name
from node_agent.agent.snapshots import SnapshotInfo, SnapshotManager, check_snapshot_id, source_name
from node_agent.agent.volumes import VolumeInfo, VolumeManager, check_size, check_volume_id
from node_agent.iscsi.names import check_iqn
from node_agent.iscsi.target import Credentials
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("shoal.agent.rpc")

MIN_SECRET, MAX_SECRET = 12, 255  # RFC 7143 §9.2.1 (96 bits at least); iSCSI text values stay short
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class KeyedLocks:
    """One lock per volume id: two calls about one volume never interleave."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        if not key:
            yield
            return
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def rpc(volume_of: Callable[[object], str] | None = None):
    """Serialise per volume, log, and turn exceptions into gRPC statuses."""
    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        def handler(self: "AgentServicer", request, context: grpc.ServicerContext):
            key = volume_of(request) if volume_of else None
            try:
                with self.locks.hold(key):
                    return method(self, request, context)
            except Exception as exc:
                status = grpc_status(exc)
                if status is None:
                    log.exception("%s %r failed", name, key or "")
                    status = (grpc.StatusCode.INTERNAL, f"{name} failed inside the node agent; see its log")
                else:
                    log.info("%s %r: %s: %s", name, key or "", status[0].name, status[1])
            context.abort(*status)
        return handler
    return wrap


# ----------------------------------------------------------------------------- validation

def _volume_id(value: str, field: str = "volume_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return check_volume_id(value)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc).replace("volume_id", field, 1)) from None


def _iqn(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return check_iqn(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def _credentials(user: str, secret: str, what: str, *, required: bool) -> Credentials | None:
    if not user and not secret:
        if required:
            raise InvalidArgument(f"{what}_user and {what}_secret are required")
        return None
    if not user or not secret:
        raise InvalidArgument(f"{what}_user and {what}_secret go together")
    if _CONTROL.search(user) or _CONTROL.search(secret):
        raise InvalidArgument(f"{what}_user and {what}_secret must not contain control characters")
    if not MIN_SECRET <= len(secret.encode()) <= MAX_SECRET:
        raise InvalidArgument(f"{what}_secret must be {MIN_SECRET}-{MAX_SECRET} bytes long (RFC 7143 §9.2.1)")
    if len(user.encode()) > MAX_SECRET:
        raise InvalidArgument(f"{what}_user is longer than {MAX_SECRET} bytes")
    return Credentials(user, secret)


def _snapshot_id(value: str, field: str = "snapshot_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return check_snapshot_id(value)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc).replace("snapshot_id", field, 1)) from None


def _volume_proto(info: VolumeInfo) -> agent_pb2.VolumeInfo:
    return agent_pb2.VolumeInfo(volume_id=info.volume_id, size_bytes=info.size, disk=info.disk, path=info.path,
                                allocated_bytes=info.allocated, state=info.state, progress=info.progress,
                                message=info.message)


def _snapshot_proto(info: SnapshotInfo) -> agent_pb2.SnapshotInfo:
    return agent_pb2.SnapshotInfo(snapshot_id=info.snapshot_id, volume_id=info.volume_id, size_bytes=info.size,
                                  disk=info.disk, path=info.path, allocated_bytes=info.allocated, state=info.state,
                                  progress=info.progress, message=info.message, method=info.method)


def _export_proto(info: ExportInfo, initiators: tuple[str, ...] = ()) -> common_pb2.ExportInfo:
    return common_pb2.ExportInfo(volume_id=info.volume_id, target_iqn=info.target_iqn, portals=list(info.portals),
                                 lun=info.lun, naa=info.naa, serial=info.serial, chap_user=info.chap_user,
                                 initiators=list(initiators))


def _export_from_proto(message: common_pb2.ExportInfo) -> ExportInfo:
    return ExportInfo(volume_id=message.volume_id, target_iqn=message.target_iqn, portals=tuple(message.portals),
                      lun=message.lun, naa=message.naa, serial=message.serial, chap_user=message.chap_user)


# ----------------------------------------------------------------------------- the service

class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Thin: see the module docstring; idempotency rules are in agent.proto and the managers."""

    def __init__(self, node_id: str, volumes: VolumeManager, exports: ExportManager,
                 attachments: AttachmentManager, snapshots: SnapshotManager | None = None):
        self.node_id = node_id
        self.volumes = volumes
        self.exports = exports
        self.attachments = attachments
        self.snapshots = snapshots if snapshots is not None else SnapshotManager(volumes)
        self.locks = KeyedLocks()

    @rpc(lambda r: r.volume_id)
    def CreateVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        source = _volume_id(request.source_volume_id, "source_volume_id") if request.source_volume_id else ""
        if source == volume_id:
            raise InvalidArgument("source_volume_id must name another volume")
        snapshot = (_snapshot_id(request.source_snapshot_id, "source_snapshot_id")
                    if request.source_snapshot_id else "")
        if source and snapshot:
            raise InvalidArgument("give source_volume_id or source_snapshot_id, not both")
        if request.size_bytes or not (source or snapshot):
            check_size(request.size_bytes)
        if request.disk:
            try:
                check_name("disk", request.disk)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        # proto3 bool: an unset ``thin`` reads False; the proto says sparse is the default, but the field
        # cannot tell "unset" from "thick", so False means fully allocated as written.
        # A repeat first: a clone made before is answered so after its snapshot was deleted.
        existing = self.volumes.existing(volume_id, request.size_bytes, request.disk, request.thin,
                                         source_name(snapshot) if snapshot else source)
        if existing is not None:
            return _volume_proto(existing)
        origin = self.snapshots.source(snapshot) if snapshot else source
        info = self.volumes.create(volume_id, request.size_bytes, request.disk, request.thin, origin)
        return _volume_proto(info)

    @rpc()
    def GetVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        info = self.volumes.lookup(volume_id)
        if info is None:
            raise NotFound(f"volume {volume_id} does not exist on this node")
        return _volume_proto(info)

    @rpc(lambda r: r.volume_id)  # the volume's lock: no export, unexport or delete of it meanwhile
    def CreateSnapshot(self, request, context):
        snapshot_id = _snapshot_id(request.snapshot_id)
        volume_id = _volume_id(request.volume_id)
        return _snapshot_proto(self.snapshots.create(snapshot_id, volume_id))

    @rpc(lambda r: f"snapshot:{r.snapshot_id}")
    def DeleteSnapshot(self, request, context):
        self.snapshots.delete(_snapshot_id(request.snapshot_id))
        return agent_pb2.DeleteSnapshotResponse()

    @rpc()
    def GetSnapshot(self, request, context):
        return _snapshot_proto(self.snapshots.require(_snapshot_id(request.snapshot_id)))

    @rpc(lambda r: r.volume_id)
    def DeleteVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        refuse_if_exported(self.exports, volume_id)
        self.volumes.delete(volume_id)
        return agent_pb2.DeleteVolumeResponse()

    @rpc(lambda r: r.volume_id)
    def ExpandVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        check_size(request.size_bytes)
        info = self.volumes.expand(volume_id, request.size_bytes)
        self.exports.capacity_changed(volume_id, info.size)
        return _volume_proto(info)

    @rpc(lambda r: r.volume_id)
    def ExportVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        initiator = _iqn(request.initiator_iqn, "initiator_iqn")
        chap = _credentials(request.chap_user, request.chap_secret, "chap", required=True)
        mutual = _credentials(request.mutual_chap_user, request.mutual_chap_secret, "mutual_chap", required=False)
        if mutual is not None and chap is not None and mutual.secret == chap.secret:
            raise InvalidArgument("mutual_chap_secret must differ from chap_secret (RFC 7143 §9.2.1)")
        assert chap is not None
        return _export_proto(self.exports.export(volume_id, initiator, chap, mutual))

    @rpc(lambda r: r.volume_id)
    def UnexportVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        self.exports.unexport(volume_id, _iqn(request.initiator_iqn, "initiator_iqn"))
        return agent_pb2.UnexportVolumeResponse()

    @rpc(lambda r: r.export.volume_id)
    def AttachVolume(self, request, context):
        if not request.HasField("export"):
            raise InvalidArgument("export is required")
        _volume_id(request.export.volume_id, "export.volume_id")
        mode = check_mode(request.mode)
        device = self.attachments.attach(_export_from_proto(request.export), request.chap_secret,
                                         request.mutual_chap_user, request.mutual_chap_secret, mode,
                                         defer_login=request.defer_login)
        return agent_pb2.AttachVolumeResponse(device_path=device)

    @rpc(lambda r: r.volume_id)
    def DetachVolume(self, request, context):
        volume_id = _volume_id(request.volume_id)
        self.attachments.detach(volume_id, check_mode(request.mode))
        return agent_pb2.DetachVolumeResponse()

    @rpc()
    def FenceInitiator(self, request, context):
        if not request.initiator_iqn:
            raise InvalidArgument("initiator_iqn is required")
        volume_ids, result = self.exports.fence(request.initiator_iqn)
        return agent_pb2.FenceInitiatorResponse(volume_ids=volume_ids, sessions_closed=result.sessions_closed,
                                                registrations_removed=result.registrations_removed,
                                                commands_waited=result.commands_waited)

    @rpc()
    def GetState(self, request, context):
        return agent_pb2.AgentState(
            node_id=self.node_id,
            volumes=[_volume_proto(v) for v in self.volumes.list()],
            exports=[_export_proto(self.exports.info(r.volume_id, r.chap_user), r.initiators)
                     for r in self.exports.records()],
            attachments=[agent_pb2.Attachment(volume_id=a.volume_id, device_path=a.device_path, mode=a.mode,
                                              logged_in=a.logged_in) for a in self.attachments.list()],
            disks=[common_pb2.Disk(name=d.name, path=d.path, capacity_bytes=d.capacity, free_bytes=d.free)
                   for d in self.volumes.disks()],
            snapshots=[_snapshot_proto(s) for s in self.snapshots.list()],
        )
