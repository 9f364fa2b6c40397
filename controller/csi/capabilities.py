"""What Shoal accepts as a CSI volume capability (shared by the Controller and, later, the Node service).

Access types: mount (ext4 or xfs; empty means ext4) and raw block.  Access modes:
single-node writer, single-node reader, single-node single/multi writer; and
MULTI_NODE_MULTI_WRITER for raw block only (live migration of a VM hands the
device from one node to the other; a filesystem mounted twice would be corrupted).
Anything else is refused: ``unsupported`` says why, for INVALID_ARGUMENT (Controller
RPCs), for FAILED_PRECONDITION (the Node's "exceeds capabilities" when the capability is
well formed, ``malformed`` being INVALID_ARGUMENT there too) or for
ValidateVolumeCapabilities' message (an empty ``confirmed``, not an error).
"""

from __future__ import annotations

from typing import Iterable

from protos.csi.v1 import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode.Mode

FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"
SINGLE_NODE_MODES = frozenset({Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                               Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER})
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY})


def malformed(capability: csi_pb2.VolumeCapability) -> str:
    """Why ``capability`` is not a complete capability at all (no access type or mode); "" when it is."""
    if capability.WhichOneof("access_type") is None:
        return "volume capability needs an access type: mount or block"
    if not capability.HasField("access_mode") or capability.access_mode.mode == Mode.UNKNOWN:
        return "volume capability needs an access mode"
    return ""


def unsupported(capability: csi_pb2.VolumeCapability) -> str:
    """Why Shoal cannot serve ``capability`` (malformed, or a filesystem or mode it does not offer); "" when
    it can."""
    reason = malformed(capability)
    if reason:
        return reason
    access = capability.WhichOneof("access_type")
    mode = capability.access_mode.mode
    if access == "mount":
        fs_type = capability.mount.fs_type or DEFAULT_FS_TYPE
        if fs_type not in FS_TYPES:
            return f"filesystem {fs_type!r} is not supported: use {' or '.join(FS_TYPES)}"
        if mode == Mode.MULTI_NODE_MULTI_WRITER:
            return "MULTI_NODE_MULTI_WRITER is for raw block volumes only (a filesystem cannot be mounted twice)"
    if mode not in SINGLE_NODE_MODES and mode != Mode.MULTI_NODE_MULTI_WRITER:
        return f"access mode {Mode.Name(mode)} is not supported"
    return ""


def first_unsupported(capabilities: Iterable[csi_pb2.VolumeCapability]) -> str:
    for capability in capabilities:
        reason = unsupported(capability)
        if reason:
            return reason
    return ""


def is_single_node(capability: csi_pb2.VolumeCapability) -> bool:
    return capability.access_mode.mode in SINGLE_NODE_MODES


def is_multi_node_writer(capability: csi_pb2.VolumeCapability) -> bool:
    """MULTI_NODE_MULTI_WRITER: a second node may publish it at once (``unsupported`` allows it for block only)."""
    return capability.access_mode.mode == Mode.MULTI_NODE_MULTI_WRITER


def is_block(capability: csi_pb2.VolumeCapability) -> bool:
    return capability.WhichOneof("access_type") == "block"
