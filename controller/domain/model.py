"""The controller's records: frozen dataclasses, changed with ``dataclasses.replace``.

Volumes, attachments and exports are keyed by the volume's *name* (what users
and CSI say); the agent API speaks of the volume's *id* (its stable identity,
reported in VPD pages 0x80/0x83).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Node health.
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

# Volume states (admin.proto Volume.state).
CREATING = "creating"
AVAILABLE = "available"
ATTACHED = "attached"
DELETING = "deleting"
ERROR = "error"
VOLUME_STATES = (CREATING, AVAILABLE, ATTACHED, DELETING, ERROR)

# Attachment states (admin.proto Attachment.state).  "published": exported to the node and its agent told the
# target and credentials (CSI ControllerPublishVolume); the node logs in at NodeStageVolume.
ATTACHING = "attaching"
PUBLISHED = "published"
DETACHING = "detaching"
# The node was fenced: its owner no longer exports the volume to it, so it is not a writer any more; the row
# stays (shown by list/show) until the attachment is detached or the node unfenced.
FENCED = "fenced"
ATTACHMENT_STATES = (ATTACHING, PUBLISHED, ATTACHED, DETACHING, FENCED)

# Node fence states (admin.proto Node.fence): "" not fenced; "fencing" asked for, not every owner has
# answered yet (the controller's loop retries); "fenced" every owner cut the node off.
FENCING = "fencing"
FENCE_DONE = "fenced"
FENCE_STATES = ("", FENCING, FENCE_DONE)

# Attach modes: the consumer agent's connector.
MODES = ("userspace", "kernel")


@dataclass(frozen=True)
class Disk:
    """A disk (directory or device) a node offers to pools."""

    name: str
    path: str
    capacity_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Node:
    """A registered node: its agent, its initiator, its target portals, its disks."""

    id: str
    initiator_iqn: str
    agent_address: str
    portals: tuple[str, ...]
    labels: dict[str, str]
    disks: tuple[Disk, ...]
    health: str
    last_heartbeat: float
    fence: str = ""
    """"" | "fencing" | "fenced" (``FENCE_STATES``)."""
    fence_since: float = 0.0
    """When the fence was asked for (Unix seconds); 0 when not fenced."""
    fence_reason: str = ""
    """Why: "shoalctl node fence", or the silence that made the controller fence it; or what is still missing."""
    fence_steps: tuple[str, ...] = ()
    """What each owner did (one line per owner target host), in order."""

    @property
    def fenced(self) -> bool:
        """Fencing or fenced: nothing may be published to it."""
        return bool(self.fence)

    def disk(self, name: str) -> Disk | None:
        return next((d for d in self.disks if d.name == name), None)


@dataclass(frozen=True)
class Pool:
    """A named set of node disks; ``members`` empty means every disk of every node."""

    name: str
    members: tuple[tuple[str, str], ...]
    overcommit_ratio: float = 1.0

    def includes(self, node_id: str, disk: str) -> bool:
        return not self.members or (node_id, disk) in self.members


@dataclass(frozen=True)
class PoolUsage:
    """Capacity of a pool's disks (healthy or not), what is free on them, what its volumes promise."""

    capacity_bytes: int
    free_bytes: int
    provisioned_bytes: int


@dataclass(frozen=True)
class Volume:
    """A volume: where placement put it and where its lifecycle is."""

    name: str
    id: str
    size_bytes: int
    pool: str
    owner_node: str
    disk: str
    state: str
    thin: bool
    created_at: float
    source: str = ""
    requested_bytes: int = 0
    """The size a clone was asked to have (CSI CreateVolume): it is made at its source's size and grown to this
    once copied, so a repeat asking another size is told from one that finds it not grown yet.  0: none
    recorded (not a clone, or a record from before this field): the repeat's own size is taken."""
    source_id: str = ""
    """The id of the snapshot or volume a clone was made from (``source`` names it): the name may be reused
    once that one is deleted, and ids, unlike creation times read off a wall clock that may step back, never
    say a newer object is the same one.  "": not a clone, or a record from before this field."""


# Snapshot states (admin.proto Snapshot.state); "creating" while a full copy runs, with its progress.
READY = "ready"
SNAPSHOT_STATES = (CREATING, READY, DELETING, ERROR)


@dataclass(frozen=True)
class Snapshot:
    """A read-only point-in-time copy of a volume, kept on the volume's node and disk (clones of it go there)."""

    name: str
    id: str
    volume: str
    volume_id: str
    size_bytes: int
    owner_node: str
    disk: str
    state: str
    created_at: float
    progress: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Attachment:
    """A volume published to a consumer node."""

    volume: str
    node: str
    mode: str
    state: str
    device_path: str = ""
    shared: bool = False
    """Published as a second writer on purpose (live migration, multi-writer raw block)."""

    @property
    def writer(self) -> bool:
        """Counts as a node that may write the volume (a fenced node cannot any more)."""
        return self.state != FENCED


@dataclass(frozen=True)
class Export:
    """What the owner's agent answered to ExportVolume for one consumer initiator (the publish context).

    The CHAP secret is not here: it lives in the store only (``ChapCredential``).
    """

    volume: str
    initiator_iqn: str
    target_iqn: str
    portals: tuple[str, ...]
    lun: int
    naa: str
    serial: str
    chap_user: str

    def to_agent(self, volume_id: str) -> dict[str, Any]:
        """The ExportInfo-like dict the consumer's agent attaches with."""
        return {"volume_id": volume_id, "target_iqn": self.target_iqn, "portals": list(self.portals),
                "lun": self.lun, "naa": self.naa, "serial": self.serial, "chap_user": self.chap_user}


@dataclass(frozen=True)
class ChapCredential:
    """A volume's CHAP user and secret.  The secret never shows in a repr."""

    user: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Operation:
    """One line of the operations log: a decision, written before it is acted on."""

    id: int
    time: float
    kind: str
    subject: str
    state: str
    detail: str = ""


# Operation states.
OP_STARTED = "started"
OP_DONE = "done"
OP_FAILED = "failed"
