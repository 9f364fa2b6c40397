from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Disk(_message.Message):
    __slots__ = ("name", "path", "capacity_bytes", "free_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    capacity_bytes: int
    free_bytes: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class ExportInfo(_message.Message):
    __slots__ = ("volume_id", "target_iqn", "portals", "lun", "naa", "serial", "chap_user", "initiators")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_IQN_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    LUN_FIELD_NUMBER: _ClassVar[int]
    NAA_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    INITIATORS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_iqn: str
    portals: _containers.RepeatedScalarFieldContainer[str]
    lun: int
    naa: str
    serial: str
    chap_user: str
    initiators: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, volume_id: _Optional[str] = ..., target_iqn: _Optional[str] = ..., portals: _Optional[_Iterable[str]] = ..., lun: _Optional[int] = ..., naa: _Optional[str] = ..., serial: _Optional[str] = ..., chap_user: _Optional[str] = ..., initiators: _Optional[_Iterable[str]] = ...) -> None: ...
