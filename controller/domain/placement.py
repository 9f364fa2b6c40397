"""Placement as pure functions: which node disk gets a new volume.

Rules, in order:

1. Candidates are the disks of healthy, unfenced nodes that belong to the pool
   (a pool without members has every disk of every node).
2. Topology: the node's labels must contain every ``constraints`` key with
   the same value.
3. Capacity: what the disk's volumes and snapshots promise (all volumes on
   it, of any pool, in any state but gone, and every snapshot kept there at
   its volume's size) plus the new size must stay within
   ``capacity * overcommit_ratio``; a thick volume also needs that much real
   free space: what the disk last reported, less the thick volumes (and the
   growth of thick volumes) and the snapshots that report cannot count yet
   (``unreported_thick``), so two thick volumes placed or grown between two
   heartbeats are not both promised the same free bytes.

   A snapshot counts its volume's whole size, as a volume does, whatever it
   holds now: a full copy holds up to that much, and a reflinked one comes to
   hold it as its volume is written over (each write then needs new room).
   So a pool that does not overcommit (ratio 1) keeps that promise with
   snapshots too: no write to a volume, nor a copy, runs out of room; a pool
   whose snapshots mostly share their volumes' blocks sets a ratio above 1.
4. Spreading: the disk promising the fewest bytes wins, then the one with the
   fewest volumes, then node id and disk name, so the choice is deterministic.

When nothing fits, ``ResourceExhausted`` says why: no disks, no healthy
node, no node with the labels, or the largest room there is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from controller.domain.errors import ResourceExhausted
from controller.domain.model import CREATING, HEALTHY, Disk, Node, Pool, PoolUsage, Snapshot, Volume
from controller.domain.validation import human_bytes


@dataclass(frozen=True)
class Request:
    """What the new (or growing) volume needs."""

    size_bytes: int
    thin: bool = True
    constraints: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Candidate:
    """A pool disk and what is already promised on it."""

    node_id: str
    disk: Disk
    provisioned_bytes: int
    volumes: int
    unreported_thick_bytes: int = 0
    """Thick bytes placed on the disk that its reported free space does not count yet (``unreported_thick``)."""

    def headroom(self, pool: Pool, thin: bool) -> int:
        """The largest new volume this disk takes."""
        promised = int(self.disk.capacity_bytes * pool.overcommit_ratio) - self.provisioned_bytes
        return max(0, promised if thin else min(promised, self.disk.free_bytes - self.unreported_thick_bytes))

    @property
    def key(self) -> tuple[int, int, str, str]:
        return (self.provisioned_bytes, self.volumes, self.node_id, self.disk.name)


def provisioned(volumes: Iterable[Volume],
                snapshots: Iterable[Snapshot] = ()) -> dict[tuple[str, str], tuple[int, int]]:
    """(node, disk) -> (bytes promised, number of volumes): volumes and snapshots (rule 3) promise their size."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for volume in volumes:
        size, n = out.get((volume.owner_node, volume.disk), (0, 0))
        out[(volume.owner_node, volume.disk)] = (size + volume.size_bytes, n + 1)
    for snapshot in snapshots:
        size, n = out.get((snapshot.owner_node, snapshot.disk), (0, 0))
        out[(snapshot.owner_node, snapshot.disk)] = (size + snapshot.size_bytes, n)
    return out


Growth = Mapping[str, Sequence[tuple[float, int]]]
"""Volume id -> (when, bytes) of each time the volume grew (``unreported_thick``)."""


def unreported_thick(nodes: Iterable[Node], volumes: Iterable[Volume], grown: Growth | None = None,
                     snapshots: Iterable[Snapshot] = ()) -> dict[tuple[str, str], int]:
    """(node, disk) -> bytes of thick volumes (and snapshots) the disk's last reported free space does not
    count yet.

    A node reports free space with each heartbeat; a thick volume takes its space when its agent makes it.
    One placed at or after the node's last heartbeat, or not made yet ("creating"), is not in what the disk
    reported: its bytes are taken off that, until a heartbeat after it says what is really free.  The same
    holds for the bytes a thick volume grew by (``grown``) at or after the last heartbeat, and for a snapshot
    taken at or after it or still being copied (its copy fills the disk as it goes), at its volume's size.
    """
    last_report = {node.id: node.last_heartbeat for node in nodes}
    out: dict[tuple[str, str], int] = {}
    for volume in volumes:
        reported = last_report.get(volume.owner_node)
        if volume.thin or reported is None:
            continue
        if volume.state == CREATING or volume.created_at >= reported:
            unreported = volume.size_bytes
        else:
            unreported = sum(extra for at, extra in (grown or {}).get(volume.id, ()) if at >= reported)
        if unreported:
            key = (volume.owner_node, volume.disk)
            out[key] = out.get(key, 0) + unreported
    for snapshot in snapshots:
        reported = last_report.get(snapshot.owner_node)
        if reported is not None and (snapshot.state == CREATING or snapshot.created_at >= reported):
            key = (snapshot.owner_node, snapshot.disk)
            out[key] = out.get(key, 0) + snapshot.size_bytes
    return out


def candidate(node: Node, disk: Disk, volumes: Iterable[Volume], grown: Growth | None = None,
              snapshots: Iterable[Snapshot] = ()) -> Candidate:
    """One disk of ``node``, with what ``volumes`` (every volume, of any pool) and ``snapshots`` (every
    snapshot) promise on it."""
    volumes, snapshots = list(volumes), list(snapshots)
    used, count = provisioned(volumes, snapshots).get((node.id, disk.name), (0, 0))
    return Candidate(node.id, disk, used, count,
                     unreported_thick([node], volumes, grown, snapshots).get((node.id, disk.name), 0))


def placeable(node: Node) -> bool:
    """A node new volumes may go to: healthy and not fenced (a fenced node, which may keep sending heartbeats,
    is one the operator has not known clean since; unfenced, it is placeable again)."""
    return node.health == HEALTHY and not node.fenced


def pool_disks(pool: Pool, nodes: Iterable[Node], *, healthy_only: bool = True) -> list[tuple[Node, Disk]]:
    """The pool's disks, of placeable nodes only unless ``healthy_only`` is false (then of every node)."""
    return [(node, disk) for node in nodes if not healthy_only or placeable(node)
            for disk in node.disks if pool.includes(node.id, disk.name)]


def matches(node: Node, constraints: Mapping[str, str] | None) -> bool:
    return all(node.labels.get(key) == value for key, value in (constraints or {}).items())


def candidates(pool: Pool, nodes: Iterable[Node], volumes: Iterable[Volume],
               constraints: Mapping[str, str] | None = None, grown: Growth | None = None,
               snapshots: Iterable[Snapshot] = ()) -> list[Candidate]:
    """Rules 1 and 2, with what each disk already holds, best first (rule 4)."""
    nodes, volumes, snapshots = list(nodes), list(volumes), list(snapshots)
    used = provisioned(volumes, snapshots)
    unreported = unreported_thick(nodes, volumes, grown, snapshots)
    out = [Candidate(node.id, disk, *used.get((node.id, disk.name), (0, 0)),
                     unreported_thick_bytes=unreported.get((node.id, disk.name), 0))
           for node, disk in pool_disks(pool, nodes) if matches(node, constraints)]
    return sorted(out, key=lambda c: c.key)


def place(request: Request, pool: Pool, nodes: Iterable[Node], volumes: Iterable[Volume],
          grown: Growth | None = None, snapshots: Iterable[Snapshot] = ()) -> tuple[str, str]:
    """The (node id, disk name) for a new volume, or ``ResourceExhausted`` saying why there is none."""
    nodes = list(nodes)
    options = candidates(pool, nodes, volumes, request.constraints, grown, snapshots)
    for candidate in options:
        if candidate.headroom(pool, request.thin) >= request.size_bytes:
            return candidate.node_id, candidate.disk.name
    raise ResourceExhausted(_why_nothing_fits(request, pool, nodes, options))


def fits_growth(candidate: Candidate, pool: Pool, thin: bool, extra_bytes: int) -> bool:
    """Whether a volume already on ``candidate`` may grow by ``extra_bytes``."""
    return candidate.headroom(pool, thin) >= extra_bytes


def usage(pool: Pool, nodes: Iterable[Node], volumes: Iterable[Volume],
          snapshots: Iterable[Snapshot] = ()) -> PoolUsage:
    """Capacity and free space of every pool disk (healthy or not); bytes its volumes, and the snapshots of
    its volumes, promise (rule 3)."""
    disks = pool_disks(pool, nodes, healthy_only=False)
    volumes = list(volumes)
    mine = {v.name for v in volumes if v.pool == pool.name}
    return PoolUsage(capacity_bytes=sum(d.capacity_bytes for _, d in disks),
                     free_bytes=sum(d.free_bytes for _, d in disks),
                     provisioned_bytes=sum(v.size_bytes for v in volumes if v.pool == pool.name)
                     + sum(s.size_bytes for s in snapshots if s.volume in mine))


def _why_nothing_fits(request: Request, pool: Pool, nodes: list[Node], options: list[Candidate]) -> str:
    prefix = f"pool {pool.name}:"
    if not pool_disks(pool, nodes, healthy_only=False):
        return (f"{prefix} no disks (no node that has its disks registered){_members(pool)}; "
                "start an agent or add members to the pool")
    if not pool_disks(pool, nodes):
        others = sorted({f"{n.id} ({n.fence or 'unhealthy'})" for n, _ in pool_disks(pool, nodes, healthy_only=False)})
        return f"{prefix} no healthy, unfenced node ({', '.join(others)}); retry when an agent is back"
    if not options:
        wanted = ",".join(f"{k}={v}" for k, v in sorted((request.constraints or {}).items()))
        return f"{prefix} no healthy node has labels {wanted}"
    best = max(options, key=lambda c: (c.headroom(pool, request.thin), -c.provisioned_bytes))
    kind = "" if request.thin else " (thick: real free space)"
    return (f"{prefix} no healthy node with {human_bytes(request.size_bytes)} free{kind} "
            f"(largest: {best.node_id}/{best.disk.name} {human_bytes(best.headroom(pool, request.thin))}; "
            f"overcommit ratio {pool.overcommit_ratio:g})")


def _members(pool: Pool) -> str:
    if not pool.members:
        return ""
    return " among its members " + ", ".join(f"{n}/{d}" for n, d in pool.members)
