from protos.shoal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VolumeInfo(_message.Message):
    __slots__ = ("volume_id", "size_bytes", "disk", "path", "allocated_bytes", "state", "progress", "message")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    disk: str
    path: str
    allocated_bytes: int
    state: str
    progress: float
    message: str
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., disk: _Optional[str] = ..., path: _Optional[str] = ..., allocated_bytes: _Optional[int] = ..., state: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("snapshot_id", "volume_id", "size_bytes", "disk", "path", "allocated_bytes", "state", "progress", "message", "method")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    volume_id: str
    size_bytes: int
    disk: str
    path: str
    allocated_bytes: int
    state: str
    progress: float
    message: str
    method: str
    def __init__(self, snapshot_id: _Optional[str] = ..., volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., disk: _Optional[str] = ..., path: _Optional[str] = ..., allocated_bytes: _Optional[int] = ..., state: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "size_bytes", "disk", "thin", "source_volume_id", "source_snapshot_id")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    THIN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    disk: str
    thin: bool
    source_volume_id: str
    source_snapshot_id: str
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., disk: _Optional[str] = ..., thin: _Optional[bool] = ..., source_volume_id: _Optional[str] = ..., source_snapshot_id: _Optional[str] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id", "volume_id")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    volume_id: str
    def __init__(self, snapshot_id: _Optional[str] = ..., volume_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "size_bytes")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ExportVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "initiator_iqn", "chap_user", "chap_secret", "mutual_chap_user", "mutual_chap_secret")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    initiator_iqn: str
    chap_user: str
    chap_secret: str
    mutual_chap_user: str
    mutual_chap_secret: str
    def __init__(self, volume_id: _Optional[str] = ..., initiator_iqn: _Optional[str] = ..., chap_user: _Optional[str] = ..., chap_secret: _Optional[str] = ..., mutual_chap_user: _Optional[str] = ..., mutual_chap_secret: _Optional[str] = ...) -> None: ...

class UnexportVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "initiator_iqn")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    initiator_iqn: str
    def __init__(self, volume_id: _Optional[str] = ..., initiator_iqn: _Optional[str] = ...) -> None: ...

class UnexportVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachVolumeRequest(_message.Message):
    __slots__ = ("export", "chap_secret", "mutual_chap_user", "mutual_chap_secret", "mode", "defer_login")
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DEFER_LOGIN_FIELD_NUMBER: _ClassVar[int]
    export: _common_pb2.ExportInfo
    chap_secret: str
    mutual_chap_user: str
    mutual_chap_secret: str
    mode: str
    defer_login: bool
    def __init__(self, export: _Optional[_Union[_common_pb2.ExportInfo, _Mapping]] = ..., chap_secret: _Optional[str] = ..., mutual_chap_user: _Optional[str] = ..., mutual_chap_secret: _Optional[str] = ..., mode: _Optional[str] = ..., defer_login: _Optional[bool] = ...) -> None: ...

class AttachVolumeResponse(_message.Message):
    __slots__ = ("device_path",)
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    device_path: str
    def __init__(self, device_path: _Optional[str] = ...) -> None: ...

class DetachVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "mode")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    mode: str
    def __init__(self, volume_id: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class DetachVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FenceInitiatorRequest(_message.Message):
    __slots__ = ("initiator_iqn",)
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    initiator_iqn: str
    def __init__(self, initiator_iqn: _Optional[str] = ...) -> None: ...

class FenceInitiatorResponse(_message.Message):
    __slots__ = ("volume_ids", "sessions_closed", "registrations_removed", "commands_waited")
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_WAITED_FIELD_NUMBER: _ClassVar[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    sessions_closed: int
    registrations_removed: int
    commands_waited: int
    def __init__(self, volume_ids: _Optional[_Iterable[str]] = ..., sessions_closed: _Optional[int] = ..., registrations_removed: _Optional[int] = ..., commands_waited: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("volume_id", "device_path", "mode", "logged_in")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LOGGED_IN_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    device_path: str
    mode: str
    logged_in: bool
    def __init__(self, volume_id: _Optional[str] = ..., device_path: _Optional[str] = ..., mode: _Optional[str] = ..., logged_in: _Optional[bool] = ...) -> None: ...

class AgentState(_message.Message):
    __slots__ = ("node_id", "volumes", "exports", "attachments", "disks", "snapshots")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeInfo]
    exports: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExportInfo]
    attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    disks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Disk]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, node_id: _Optional[str] = ..., volumes: _Optional[_Iterable[_Union[VolumeInfo, _Mapping]]] = ..., exports: _Optional[_Iterable[_Union[_common_pb2.ExportInfo, _Mapping]]] = ..., attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ..., disks: _Optional[_Iterable[_Union[_common_pb2.Disk, _Mapping]]] = ..., snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "initiator_iqn", "agent_address", "portals", "labels", "disks")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    initiator_iqn: str
    agent_address: str
    portals: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    disks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Disk]
    def __init__(self, node_id: _Optional[str] = ..., initiator_iqn: _Optional[str] = ..., agent_address: _Optional[str] = ..., portals: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., disks: _Optional[_Iterable[_Union[_common_pb2.Disk, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "disks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    disks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Disk]
    def __init__(self, node_id: _Optional[str] = ..., disks: _Optional[_Iterable[_Union[_common_pb2.Disk, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("fenced", "drop_volume_ids", "heartbeat_interval_seconds")
    FENCED_FIELD_NUMBER: _ClassVar[int]
    DROP_VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    fenced: bool
    drop_volume_ids: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval_seconds: float
    def __init__(self, fenced: _Optional[bool] = ..., drop_volume_ids: _Optional[_Iterable[str]] = ..., heartbeat_interval_seconds: _Optional[float] = ...) -> None: ...
