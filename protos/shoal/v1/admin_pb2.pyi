from protos.shoal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "initiator_iqn", "agent_address", "portals", "labels", "disks", "health", "last_heartbeat_unix", "fence", "fence_since_unix", "fence_reason", "fence_steps")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    FENCE_SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    FENCE_REASON_FIELD_NUMBER: _ClassVar[int]
    FENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    id: str
    initiator_iqn: str
    agent_address: str
    portals: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    disks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Disk]
    health: str
    last_heartbeat_unix: float
    fence: str
    fence_since_unix: float
    fence_reason: str
    fence_steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., initiator_iqn: _Optional[str] = ..., agent_address: _Optional[str] = ..., portals: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., disks: _Optional[_Iterable[_Union[_common_pb2.Disk, _Mapping]]] = ..., health: _Optional[str] = ..., last_heartbeat_unix: _Optional[float] = ..., fence: _Optional[str] = ..., fence_since_unix: _Optional[float] = ..., fence_reason: _Optional[str] = ..., fence_steps: _Optional[_Iterable[str]] = ...) -> None: ...

class FenceNodeRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnfenceNodeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PoolMember(_message.Message):
    __slots__ = ("node_id", "disk")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    disk: str
    def __init__(self, node_id: _Optional[str] = ..., disk: _Optional[str] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "members", "overcommit_ratio", "capacity_bytes", "provisioned_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    members: _containers.RepeatedCompositeFieldContainer[PoolMember]
    overcommit_ratio: float
    capacity_bytes: int
    provisioned_bytes: int
    def __init__(self, name: _Optional[str] = ..., members: _Optional[_Iterable[_Union[PoolMember, _Mapping]]] = ..., overcommit_ratio: _Optional[float] = ..., capacity_bytes: _Optional[int] = ..., provisioned_bytes: _Optional[int] = ...) -> None: ...

class CreatePoolRequest(_message.Message):
    __slots__ = ("name", "members", "overcommit_ratio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    members: _containers.RepeatedCompositeFieldContainer[PoolMember]
    overcommit_ratio: float
    def __init__(self, name: _Optional[str] = ..., members: _Optional[_Iterable[_Union[PoolMember, _Mapping]]] = ..., overcommit_ratio: _Optional[float] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeletePoolResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Volume(_message.Message):
    __slots__ = ("name", "id", "size_bytes", "pool", "owner_node", "disk", "state", "thin", "attached_nodes", "source", "progress")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THIN_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_NODES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    size_bytes: int
    pool: str
    owner_node: str
    disk: str
    state: str
    thin: bool
    attached_nodes: _containers.RepeatedScalarFieldContainer[str]
    source: str
    progress: float
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., pool: _Optional[str] = ..., owner_node: _Optional[str] = ..., disk: _Optional[str] = ..., state: _Optional[str] = ..., thin: _Optional[bool] = ..., attached_nodes: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., progress: _Optional[float] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes", "pool", "thick", "constraints")
    class ConstraintsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    THICK_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    pool: str
    thick: bool
    constraints: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., pool: _Optional[str] = ..., thick: _Optional[bool] = ..., constraints: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("volume", "node", "device_path", "state", "shared", "export", "initiator_iqn")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    volume: str
    node: str
    device_path: str
    state: str
    shared: bool
    export: _common_pb2.ExportInfo
    initiator_iqn: str
    def __init__(self, volume: _Optional[str] = ..., node: _Optional[str] = ..., device_path: _Optional[str] = ..., state: _Optional[str] = ..., shared: _Optional[bool] = ..., export: _Optional[_Union[_common_pb2.ExportInfo, _Mapping]] = ..., initiator_iqn: _Optional[str] = ...) -> None: ...

class AttachVolumeRequest(_message.Message):
    __slots__ = ("name", "node", "mode", "publish_only", "shared")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_ONLY_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: str
    mode: str
    publish_only: bool
    shared: bool
    def __init__(self, name: _Optional[str] = ..., node: _Optional[str] = ..., mode: _Optional[str] = ..., publish_only: _Optional[bool] = ..., shared: _Optional[bool] = ...) -> None: ...

class GetPublishSecretRequest(_message.Message):
    __slots__ = ("name", "node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: str
    def __init__(self, name: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class PublishSecret(_message.Message):
    __slots__ = ("chap_user", "chap_secret")
    CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    chap_user: str
    chap_secret: str
    def __init__(self, chap_user: _Optional[str] = ..., chap_secret: _Optional[str] = ...) -> None: ...

class DetachVolumeRequest(_message.Message):
    __slots__ = ("name", "node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: str
    def __init__(self, name: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class DetachVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("name", "volume", "size_bytes", "state", "progress", "id", "owner_node", "disk", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    volume: str
    size_bytes: int
    state: str
    progress: float
    id: str
    owner_node: str
    disk: str
    message: str
    def __init__(self, name: _Optional[str] = ..., volume: _Optional[str] = ..., size_bytes: _Optional[int] = ..., state: _Optional[str] = ..., progress: _Optional[float] = ..., id: _Optional[str] = ..., owner_node: _Optional[str] = ..., disk: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("name", "volume")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    name: str
    volume: str
    def __init__(self, name: _Optional[str] = ..., volume: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloneVolumeRequest(_message.Message):
    __slots__ = ("name", "source", "pool")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    pool: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Status(_message.Message):
    __slots__ = ("nodes", "healthy_nodes", "volumes", "attachments", "capacity_bytes", "free_bytes", "provisioned_bytes")
    NODES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_NODES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_BYTES_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    healthy_nodes: int
    volumes: int
    attachments: int
    capacity_bytes: int
    free_bytes: int
    provisioned_bytes: int
    def __init__(self, nodes: _Optional[int] = ..., healthy_nodes: _Optional[int] = ..., volumes: _Optional[int] = ..., attachments: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., provisioned_bytes: _Optional[int] = ...) -> None: ...
