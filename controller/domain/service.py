"""``ControllerService``: the volume lifecycle, idempotent by name.

Every method validates its arguments first (bad input changes nothing), then
works under the volume's lock: it records the decision in the store (a row in
a transitional state plus a line in the operations log) *before* calling an
agent, and records the outcome after.  A failure in between leaves a row that
says what was being done, so a repeat of the call, or ``reconcile_once``,
finishes it.

Idempotency, per method (admin.proto says the same per RPC):

* ``create_pool`` / ``create_volume``: the existing object when the
  parameters match, ``AlreadyExists`` when not; a volume left "creating" or
  "error" by a failure is finished by the repeat.
* ``delete_pool`` / ``delete_volume``: deleting what is gone succeeds;
  refused (``FailedPrecondition``) while the pool has volumes or the volume
  is attached.
* ``expand_volume``: the same size again is a no-op on the agent; smaller is
  ``InvalidArgument`` (volumes only grow).
* ``attach_volume``: a repeat returns the same attachment; with ``login=False`` (CSI
  ControllerPublishVolume, ``shoalctl volume connect``) the node's agent only records the target and
  credentials, the attachment is "published", and the node's CSI NodeStageVolume (or a hypervisor
  logging in as the node) logs in.  A second node is refused while another (not fenced) node has the
  volume, unless the new publish is ``shared`` (live migration, multi-writer raw block); a
  ``multi_writer`` publish (CSI MULTI_NODE_MULTI_WRITER) only while every other node has it shared too.
  Nothing is published to a node that is fencing or fenced.
* ``fence_node`` / ``unfence_node``: see ``controller.domain.fencing``.
* ``detach_volume``: a repeat, or a detach of what is not attached, succeeds.
* snapshots and clones: see ``controller.domain.snapshots``; ``delete_volume``
  is refused while the volume has snapshots or is being cloned.

CHAP secrets are generated here (``secrets.token_urlsafe``), kept in the
store, passed to agents, and never logged, returned or put in an error.
"""

from __future__ import annotations

import logging
import secrets as _secrets
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping

from controller.domain import placement
from controller.domain import validation as check
from controller.domain.agents import AgentClient, AgentDirectory
from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted, Unavailable)
from controller.domain.fencing import Fencing
from controller.domain.model import (ATTACHED, ATTACHING, AVAILABLE, CREATING, DELETING, DETACHING, ERROR, FENCED,
                                     HEALTHY, OP_DONE, OP_FAILED, OP_STARTED, PUBLISHED, UNHEALTHY, Attachment,
                                     ChapCredential, Disk, Export, Node, Pool, PoolUsage, Snapshot, Volume)
from controller.domain.settings import ControllerSettings
from controller.domain.snapshots import Snapshots
from controller.domain.validation import human_bytes
from controller.store.base import StateStore
from node_agent.iscsi.chap import initiator_secret

log = logging.getLogger("shoal.controller")


class _LockTable:
    """One lock per name, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.RLock, int]] = {}

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(name, (threading.RLock(), 0))
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[name]
                if users == 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)


class _Liveness:
    """When this process last heard from each node, on a monotonic clock: what health and fencing decide on.

    ``Node.last_heartbeat`` is wall-clock time, kept for display: a step of the system clock (NTP, a resumed VM)
    would make every node look silent for the size of the step (and fence it, with ``fence_grace``), or a dead
    one alive.  A node counts as heard when this process started watching at the latest: a restarted controller
    (or a new leader) gives every node a whole timeout and grace of its own.  Watching starts again when the
    health loop did not run for much longer than its interval: the process was paused (a stopped or frozen VM),
    and the heartbeats sent meanwhile were not received, not missing.  Plain dict and float updates: heartbeats
    of any thread need no lock.
    """

    PAUSE_FACTOR = 3.0
    """A wait between two health passes this many times the usual one (and long enough to matter) is a pause."""

    def __init__(self, monotonic: Callable[[], float], settings: ControllerSettings):
        self._monotonic = monotonic
        # A shorter pause is harmless: a node heard at most one interval before it is not silent past the timeout.
        self._harmless_pause = settings.heartbeat_timeout - settings.heartbeat_interval
        self._since = monotonic()
        self._heard: dict[str, float] = {}
        self._pass_ended: float | None = None
        self._usual_wait: float | None = None  # the shortest wait seen between two passes: the loop's interval

    def heard(self, node_id: str) -> None:
        self._heard[node_id] = self._monotonic()

    def silence(self, node_id: str) -> float:
        seen = max(self._heard.get(node_id, self._since), self._since)
        return max(0.0, self._monotonic() - seen)

    def pass_starts(self) -> float:
        """A health pass starts: how long the loop was paused (watching starts again), or 0."""
        now = self._monotonic()
        if self._pass_ended is None:
            return 0.0
        wait = now - self._pass_ended
        if self._usual_wait is not None and wait > max(self.PAUSE_FACTOR * self._usual_wait, self._harmless_pause):
            self._since = now
            return wait
        self._usual_wait = wait if self._usual_wait is None else min(self._usual_wait, wait)
        return 0.0

    def pass_ends(self) -> None:
        self._pass_ended = self._monotonic()


class ControllerService:
    def __init__(self, store: StateStore, agents: AgentDirectory, *,
                 settings: ControllerSettings | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None, secrets: Any = _secrets):
        """``clock``: wall-clock time, for records (heartbeats shown, fence and operation times).  ``monotonic``:
        what liveness is measured on (see ``_Liveness``); by default ``time.monotonic``, or ``clock`` when a
        test gives one clock only (its fake time then drives both)."""
        self.store = store
        self.agents = agents
        self.settings = settings or ControllerSettings()
        self._clock = clock
        self._monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self._liveness = _Liveness(self._monotonic, self.settings)
        # Standing conditions reconcile found (an unknown volume, a missing one) -> when last logged at their own
        # level (``Reconciler._standing``): once, not on every pass.
        self._standing: dict[tuple, float] = {}
        # Repairs that failed, by description: (failures in a row, monotonic time before which not to retry).
        self._repair_failures: dict[str, tuple[int, float]] = {}
        self._secrets = secrets
        self._volume_locks = _LockTable()
        self._placement_lock = threading.RLock()  # capacity is read, then promised: one decision at a time
        # Thick growth, for placement.unreported_thick: volume id -> (when, bytes) of each expand, under the
        # placement lock.  In memory: a restart forgets growth no heartbeat counted yet, for one heartbeat at most.
        self._grown: dict[str, tuple[tuple[float, int], ...]] = {}
        self._snapshots = Snapshots(self)
        self._fencing = Fencing(self)
        if self.settings.default_pool and self.store.get_pool(self.settings.default_pool) is None:
            self.store.put_pool(Pool(self.settings.default_pool, (), 1.0))

    def __repr__(self) -> str:
        return f"ControllerService({self.store!r})"

    # ---- nodes -------------------------------------------------------------------------------

    def register_node(self, node_id: str, initiator_iqn: str, agent_address: str, portals: Iterable[str],
                      labels: Mapping[str, str] | None = None, disks: Iterable[Disk] = ()) -> Node:
        """Add or update a node; it is healthy as of now.  Repeat: updates the record (a fence stays)."""
        node = Node(id=check.node_id(node_id), initiator_iqn=check.iqn(initiator_iqn),
                    agent_address=check.address(agent_address, "agent address"), portals=check.portals(portals),
                    labels=check.labels(labels, "node labels"), disks=check.disks(disks), health=HEALTHY,
                    last_heartbeat=self._clock())
        with self.store.transaction():
            clash = next((n for n in self.store.list_nodes()
                          if n.initiator_iqn == node.initiator_iqn and n.id != node.id), None)
            if clash is not None:
                raise AlreadyExists(f"initiator IQN {node.initiator_iqn} is already used by node {clash.id}: "
                                    "every node needs its own IQN (its ACL entries would be shared)")
            known = self.store.get_node(node.id)
            if known is not None and known.initiator_iqn != node.initiator_iqn and not known.fence:
                held = sorted({a.volume for a in self.store.list_attachments(node=node.id)}
                              | {e.volume for e in self.store.list_exports() if e.initiator_iqn == known.initiator_iqn})
                if held:
                    # a fence cuts off the IQN on record: the old one's sessions would outlive it (two writers)
                    raise FailedPrecondition(
                        f"node {node.id} holds {', '.join(held)} as {known.initiator_iqn}: it cannot register "
                        f"as {node.initiator_iqn} until those are detached and their owners no longer export "
                        "them to it (or the node is fenced and unfenced)")
            if known is not None and known.fence:
                if known.initiator_iqn != node.initiator_iqn:
                    raise FailedPrecondition(f"node {node.id} is {known.fence} as {known.initiator_iqn}: it cannot "
                                             "register with another initiator IQN until it is unfenced")
                node = replace(node, fence=known.fence, fence_since=known.fence_since,
                               fence_reason=known.fence_reason, fence_steps=known.fence_steps)
            self.store.put_node(node)
        self._liveness.heard(node.id)
        if (known is not None and known.agent_address != node.agent_address and known.health == HEALTHY
                and node.last_heartbeat - known.last_heartbeat < self.settings.heartbeat_timeout):
            # An agent that restarted at a new address does this too; so do two agents with one node id (two
            # hosts of the same host name): each registration then moves the node to the other.  Say so.
            log.warning("node %s registered from %s while its agent at %s was heard %.0f s ago: an agent that "
                        "moved, or two agents with one node id (give each --node-id its own name)", node.id,
                        node.agent_address, known.agent_address, node.last_heartbeat - known.last_heartbeat)
        log.info("node %s registered (%s, %d disks)", node.id, node.agent_address, len(node.disks))
        return node

    def heartbeat(self, node_id: str, disks: Iterable[Disk] | None = None) -> Node:
        """The node is alive; ``disks`` (if given) replaces its disks' capacity and free space."""
        node_id = check.node_id(node_id)
        new_disks = check.disks(disks) if disks is not None else None
        with self.store.transaction():
            node = self.get_node(node_id)
            node = replace(node, health=HEALTHY, last_heartbeat=self._clock(),
                           disks=new_disks if new_disks is not None else node.disks)
            self.store.put_node(node)
        self._liveness.heard(node_id)
        return node

    def fence_node(self, node_id: str, reason: str = "") -> Node:
        return self._fencing.fence(node_id, reason)

    def unfence_node(self, node_id: str) -> Node:
        return self._fencing.unfence(node_id)

    def fence_pass(self) -> list[str]:
        """Fence nodes silent past ``fence_grace``; retry fences still waiting for an owner (the loop's)."""
        try:
            return self._fencing.retry()
        finally:
            self._liveness.pass_ends()

    def volumes_to_drop(self, node: Node) -> list[str]:
        """Volume ids whose attachments a fenced node's agent should forget (told in its heartbeat answer)."""
        return self._fencing.drop_list(node)

    def list_nodes(self) -> list[Node]:
        return [self._effective(n) for n in self.store.list_nodes()]

    def get_node(self, node_id: str) -> Node:
        node = self.store.get_node(check.node_id(node_id))
        if node is None:
            raise NotFound(f"node {node_id} is not registered (shoalctl node list shows the nodes)")
        return self._effective(node)

    def mark_unhealthy(self) -> list[str]:
        """Mark nodes silent for longer than ``heartbeat_timeout`` unhealthy; return their ids.

        The health loop's pass starts here (then ``fence_pass``): a pass long overdue means the process was
        paused, and every node's silence counts from now (``_Liveness``).
        """
        paused = self._liveness.pass_starts()
        if paused:
            log.warning("the health loop did not run for %.0f s (was the controller paused?): every node's silence "
                        "counts from now", paused)
        marked = []
        try:
            with self.store.transaction():
                for node in self.store.list_nodes():
                    if node.health == HEALTHY and self._silence(node) > self.settings.heartbeat_timeout:
                        self.store.put_node(replace(node, health=UNHEALTHY))
                        marked.append(node.id)
        finally:
            self._liveness.pass_ends()
        for node_id in marked:
            log.warning("node %s is unhealthy: no heartbeat for more than %g s", node_id,
                        self.settings.heartbeat_timeout)
        return marked

    def _effective(self, node: Node) -> Node:
        """The node as of now: healthy only while heartbeats arrive, even before ``mark_unhealthy`` runs."""
        if node.health == HEALTHY and self._silence(node) > self.settings.heartbeat_timeout:
            return replace(node, health=UNHEALTHY)
        return node

    def _silence(self, node: Node) -> float:
        """Seconds since this process last heard from ``node`` (monotonic; see ``_Liveness``)."""
        return self._liveness.silence(node.id)

    def _unhealthy(self, node: Node) -> str:
        return f"node {node.id} is unhealthy (no heartbeat for {self._silence(node):.0f} s)"

    # ---- pools -------------------------------------------------------------------------------

    def create_pool(self, name: str, members: Iterable[tuple[str, str]] = (),
                    overcommit_ratio: float = 1.0) -> Pool:
        """A pool over ``members`` ((node id, disk) pairs; none: every disk).  Idempotent by name."""
        name = check.name(name, "pool name")
        ratio = check.ratio(overcommit_ratio, maximum=self.settings.max_overcommit_ratio)
        if isinstance(members, (str, bytes)):
            raise InvalidArgument("pool members must be a list of (node, disk) pairs")
        wanted = []
        for member in members:
            if not isinstance(member, (tuple, list)) or len(member) != 2:
                raise InvalidArgument(f"pool member {check.shown(member)} is not a (node, disk) pair")
            wanted.append((check.node_id(member[0]), check.disk_name(member[1])))
        pool = Pool(name, tuple(sorted(set(wanted))), ratio)
        with self.store.transaction():
            existing = self.store.get_pool(name)
            if existing is not None:
                if existing != pool:
                    raise AlreadyExists(f"pool {name} already exists with {_describe_pool(existing)}; "
                                        f"asked for {_describe_pool(pool)}")
                return existing
            for node_id, disk in pool.members:
                node = self.get_node(node_id)
                if node.disk(disk) is None:
                    have = ", ".join(d.name for d in node.disks) or "none"
                    raise NotFound(f"node {node_id} has no disk {disk} (its disks: {have})")
            self.store.put_pool(pool)
        log.info("pool %s created (%s)", name, _describe_pool(pool))
        return pool

    def list_pools(self) -> list[Pool]:
        return self.store.list_pools()

    def get_pool(self, name: str) -> Pool:
        pool = self.store.get_pool(check.name(name, "pool name"))
        if pool is None:
            known = ", ".join(p.name for p in self.store.list_pools()) or "none"
            raise NotFound(f"pool {name} does not exist (pools: {known}); create it with shoalctl pool create")
        return pool

    def pool_usage(self, name: str) -> PoolUsage:
        pool = self.get_pool(name)
        return placement.usage(pool, self.store.list_nodes(), self.store.list_volumes(), self.store.list_snapshots())

    def delete_pool(self, name: str) -> None:
        """Delete a pool without volumes.  Deleting what is gone succeeds.

        Decided under the placement lock, in one transaction: a create or clone places its volume in a pool it
        reads again in its own (placement) transaction, so the pool is either gone before (``NotFound``) or
        has the volume when this looks (refused), never deleted under a volume being placed in it.
        """
        name = check.name(name, "pool name")
        with self._placement_lock, self.store.transaction():
            volumes = self.store.list_volumes(pool=name)
            if volumes:
                raise FailedPrecondition(f"pool {name} still has {len(volumes)} volume(s) "
                                         f"({_some(v.name for v in volumes)}): delete them first")
            self.store.delete_pool(name)

    # ---- volumes -----------------------------------------------------------------------------

    def create_volume(self, name: str, size_bytes: int, pool: str = "default", thin: bool = True,
                      constraints: Mapping[str, str] | None = None) -> Volume:
        name = check.name(name, "volume name")
        size = check.size(size_bytes, multiple=self.settings.volume_size_multiple,
                          maximum=self.settings.max_volume_bytes)
        pool = check.name(pool, "pool name")
        if not isinstance(thin, bool):
            raise InvalidArgument(f"thin must be true or false, not {check.shown(thin)}")
        constraints = check.labels(constraints, "constraints")
        with self._volume_locks.hold(name):
            existing = self.store.get_volume(name)
            if existing is not None:
                self._check_same_volume(existing, size, pool, thin, constraints)
                if existing.state in (AVAILABLE, ATTACHED):
                    return existing
                if existing.state == DELETING:
                    raise FailedPrecondition(f"volume {name} is being deleted: delete it again to finish, "
                                             "then create it")
                return self._finish_create(existing)  # "creating" or "error": a failure left it half done
            self.get_pool(pool)  # NotFound before anything is decided
            with self._placement_lock, self.store.transaction():
                pool_record = self.get_pool(pool)  # again, where delete_pool decides: not deleted meanwhile
                node_id, disk = placement.place(placement.Request(size, thin, constraints), pool_record,
                                                self.list_nodes(), self.store.list_volumes(), self._grown,
                                                self.store.list_snapshots())
                volume = Volume(name, self._new_volume_id(), size, pool, node_id, disk, CREATING, thin,
                                self._clock())
                op = self._begin("create_volume", name, f"{human_bytes(size)} on {node_id}/{disk}")
                self.store.put_volume(volume)
            log.info("volume %s (%s, %s) placed on %s/%s", name, volume.id, human_bytes(size), node_id, disk)
            return self._finish_create(volume, op)

    def _check_same_volume(self, volume: Volume, size: int, pool: str, thin: bool,
                           constraints: Mapping[str, str]) -> None:
        differences = []
        if volume.size_bytes != size:
            differences.append(f"size {human_bytes(volume.size_bytes)} ({volume.size_bytes} bytes), "
                               f"asked {human_bytes(size)} ({size} bytes)")
        if volume.pool != pool:
            differences.append(f"pool {volume.pool}, asked {pool}")
        if volume.thin != thin:
            differences.append(f"{'thin' if volume.thin else 'thick'}, asked {'thin' if thin else 'thick'}")
        owner = self.store.get_node(volume.owner_node)
        if constraints and (owner is None or not placement.matches(owner, constraints)):
            differences.append(f"its node {volume.owner_node} does not have the labels asked for")
        if differences:
            raise AlreadyExists(f"volume {volume.name} already exists with other parameters: "
                                + "; ".join(differences))

    def _finish_create(self, volume: Volume, op: int | None = None) -> Volume:
        if volume.source:  # a clone: made from its source, maybe copied in the background
            return self._snapshots.finish_clone(volume, op)
        op = op if op is not None else self._begin("create_volume", volume.name, "retry")
        try:
            client = self._client(volume.owner_node, f"owning volume {volume.name}")
            client.create_volume(volume.id, volume.size_bytes, volume.disk, volume.thin)
        except Exception as exc:
            error = _as_domain_error(exc, volume.owner_node, "create_volume")
            with self.store.transaction():  # a repeat of create finishes it, a delete cleans it up
                self.store.put_volume(replace(volume, state=ERROR))
                self._end(op, OP_FAILED, str(error))
            raise error from None
        volume = replace(volume, state=AVAILABLE)
        with self.store.transaction():
            self.store.put_volume(volume)
            self._end(op, OP_DONE)
        return volume

    def list_volumes(self, pool: str | None = None) -> list[Volume]:
        if pool is not None:
            pool = check.name(pool, "pool name")
        return self.store.list_volumes(pool)

    def get_volume(self, name: str) -> Volume:
        volume = self.store.get_volume(check.name(name, "volume name"))
        if volume is None:
            raise NotFound(f"volume {name} does not exist (shoalctl volume list shows the volumes)")
        return volume

    def expand_volume(self, name: str, size_bytes: int) -> Volume:
        """Grow a volume online (the target reports CAPACITY DATA HAS CHANGED).  Never shrinks."""
        name = check.name(name, "volume name")
        size = check.size(size_bytes, multiple=self.settings.volume_size_multiple,
                          maximum=self.settings.max_volume_bytes)
        with self._volume_locks.hold(name):
            volume = self.get_volume(name)
            if volume.state not in (AVAILABLE, ATTACHED):
                raise FailedPrecondition(f"volume {name} is {volume.state}: only an available or attached "
                                         "volume can grow")
            if size < volume.size_bytes:
                raise InvalidArgument(f"volume {name} is {human_bytes(volume.size_bytes)} ({volume.size_bytes} "
                                      f"bytes); volumes only grow: ask for {volume.size_bytes} bytes or more")
            if size > volume.size_bytes:
                # A clone being made is copied again (a repeat, reconcile after an agent restart) at the size it
                # recorded, which its agent refuses once the source is larger: the clone could never be made.
                # (Under this volume's lock, which a clone of it takes too.)  One failed for good holds nothing.
                clones = self._snapshots._unfinished_clones("volume", volume)
                if clones:
                    raise FailedPrecondition(f"volume {name} is being cloned to {', '.join(clones)}: it grows once "
                                             "the clone is available (or delete the clone)")
            old = volume
            with self._placement_lock, self.store.transaction():
                if size > volume.size_bytes:
                    self._check_growth(volume, size - volume.size_bytes)
                    volume = replace(volume, size_bytes=size)
                    self.store.put_volume(volume)  # desired size first: reconcile finishes a temporary failure
                    self._note_growth(volume, size - old.size_bytes)
                op = self._begin("expand_volume", name, f"{human_bytes(old.size_bytes)} -> {human_bytes(size)}")
            try:
                self._client(volume.owner_node, f"owning volume {name}").expand_volume(volume.id, size)
            except Exception as exc:
                error = _as_domain_error(exc, volume.owner_node, "expand_volume")
                restored = None if error.temporary else self._size_on_agent(old, size)
                with self._placement_lock, self.store.transaction():
                    if restored is not None:
                        self._record_size(volume, restored)
                    self._end(op, OP_FAILED, str(error))
                raise error from None
            self._end(op, OP_DONE)
            return volume

    def _record_size(self, recorded: Volume, restored: Volume) -> None:
        """Put ``restored`` (the size the agent has) in place of ``recorded``, the growth noted undone.  Under
        the placement lock, in a transaction."""
        self.store.put_volume(restored)
        self._note_growth(restored, restored.size_bytes - recorded.size_bytes)

    def _size_on_agent(self, volume: Volume, asked: int) -> Volume:
        """``volume`` at the size its agent has, after the agent refused to grow it to ``asked`` for good.

        The record read before this expand may already hold an earlier expand's size, kept because that one
        failed for a while (reconcile retries it): going back to it would keep a size the agent now refused.
        When the agent cannot say, the record stays as it was read.
        """
        try:
            have = int(self._client(volume.owner_node, f"owning volume {volume.name}")
                       .get_volume(volume.id)["size_bytes"])
        except Exception as exc:  # noqa: BLE001 - best effort: the expand's own error is what is raised
            log.warning("volume %s: its agent refused to grow it to %d bytes and cannot say its size now (%s); "
                        "the record keeps %d bytes", volume.name, asked, exc, volume.size_bytes)
            return volume
        if not 0 < have <= asked:
            return volume
        return replace(volume, size_bytes=have)

    def _check_growth(self, volume: Volume, extra: int) -> None:
        node = self.get_node(volume.owner_node)
        if node.health != HEALTHY:
            raise Unavailable(f"{self._unhealthy(node)}; it owns volume {volume.name}: retry when it is back")
        disk = node.disk(volume.disk)
        pool = self.get_pool(volume.pool)
        candidate = placement.candidate(node, disk or Disk(volume.disk, "", 0, 0), self.store.list_volumes(),
                                        self._grown, self.store.list_snapshots())
        if not placement.fits_growth(candidate, pool, volume.thin, extra):
            raise ResourceExhausted(f"pool {pool.name}: {node.id}/{volume.disk}, which holds volume {volume.name}, "
                                    f"has room for {human_bytes(candidate.headroom(pool, volume.thin))} more, "
                                    f"not {human_bytes(extra)}")

    def _note_growth(self, volume: Volume, extra: int) -> None:
        """Record that thick ``volume`` grew by ``extra`` bytes now (less than 0: shrank back, the newest growth
        undone first), so the disk's free space its node reported before is not promised twice.  Growth a
        heartbeat has counted since, or of a volume gone, is forgotten here.  Under the placement lock."""
        reported = {n.id: n.last_heartbeat for n in self.store.list_nodes()}
        owners = {v.id: v.owner_node for v in self.store.list_volumes()}
        for volume_id, entries in list(self._grown.items()):
            if volume_id in owners:
                entries = tuple(e for e in entries if e[0] >= reported.get(owners[volume_id], e[0]))
            if volume_id not in owners or not entries:
                del self._grown[volume_id]
            else:
                self._grown[volume_id] = entries
        if volume.thin or not extra:
            return
        entries = list(self._grown.get(volume.id, ()))
        if extra > 0:
            entries.append((self._clock(), extra))
        undo = -extra
        while undo > 0 and entries:
            at, grew = entries.pop()
            if grew > undo:
                entries.append((at, grew - undo))
            undo -= grew
        if entries:
            self._grown[volume.id] = tuple(entries)
        else:
            self._grown.pop(volume.id, None)

    def delete_volume(self, name: str) -> None:
        """Delete a volume that is not attached.  Deleting what is gone succeeds."""
        name = check.name(name, "volume name")
        with self._volume_locks.hold(name):
            volume = self.store.get_volume(name)
            if volume is None:
                return
            attachments = self.store.list_attachments(volume=name)
            if attachments:
                nodes = ", ".join(a.node for a in attachments)
                raise FailedPrecondition(f"volume {name} is attached to {nodes}: detach it first "
                                         f"(shoalctl volume detach {name} --node NODE)")
            self._snapshots.check_volume_deletable(volume)
            with self.store.transaction():
                op = self._begin("delete_volume", name, f"from {volume.owner_node}/{volume.disk}")
                volume = replace(volume, state=DELETING)
                self.store.put_volume(volume)
            self._finish_delete(volume, op)

    def _finish_delete(self, volume: Volume, op: int) -> None:
        try:
            if self.store.get_node(volume.owner_node) is not None:  # a node removed for good holds nothing
                client = self._client(volume.owner_node, f"owning volume {volume.name}")
                for export in self.store.list_exports(volume.name):
                    client.unexport_volume(volume.id, export.initiator_iqn)
                    self.store.delete_export(volume.name, export.initiator_iqn)
                client.delete_volume(volume.id)
        except Exception as exc:
            error = _as_domain_error(exc, volume.owner_node, "delete_volume")
            self._end(op, OP_FAILED, str(error))
            raise error from None
        with self.store.transaction():
            for export in self.store.list_exports(volume.name):
                self.store.delete_export(volume.name, export.initiator_iqn)
            self.store.delete_chap(volume.name)
            self.store.delete_volume(volume.name)
            self._end(op, OP_DONE)
        log.info("volume %s (%s) deleted", volume.name, volume.id)

    # ---- attachments -------------------------------------------------------------------------

    def list_attachments(self, volume: str | None = None, node: str | None = None) -> list[Attachment]:
        volume = check.name(volume, "volume name") if volume is not None else None
        node = check.node_id(node) if node is not None else None
        return self.store.list_attachments(volume=volume, node=node)

    def attach_volume(self, name: str, node_id: str, mode: str = "userspace", *, login: bool = True,
                      shared: bool = False, multi_writer: bool = False) -> Attachment:
        """Publish a volume to a node: the owner exports it to the node's IQN with CHAP, the node attaches.

        ``login=False`` (CSI ControllerPublishVolume): the consumer's agent records the target and the
        credentials without logging in, and the attachment is "published"; the node's CSI NodeStageVolume
        logs in.  A repeated publish returns the same attachment; a plain attach of a published one logs in, and
        a repeated attach asks the node's agent again (the device it answers is recorded).
        ``shared``: another node may have the volume at the same time (see ``_check_single_writer``).
        ``multi_writer`` (CSI MULTI_NODE_MULTI_WRITER): shared, but only beside nodes that have it shared too: a
        node that holds the volume as its single writer was promised it alone.
        """
        name = check.name(name, "volume name")
        node_id = check.node_id(node_id)
        mode = check.mode(mode)
        if not isinstance(shared, bool) or not isinstance(multi_writer, bool):
            raise InvalidArgument(f"shared and multi_writer must be true or false, not {check.shown(shared)}, "
                                  f"{check.shown(multi_writer)}")
        with self._volume_locks.hold(name):
            volume = self.get_volume(name)
            consumer = self.get_node(node_id)
            existing = self.store.get_attachment(name, node_id)
            if existing is not None and existing.mode != mode:
                raise AlreadyExists(f"volume {name} is attached to {node_id} in {existing.mode} mode: detach it "
                                    f"first to attach it in {mode} mode")
            if consumer.fenced:
                raise FailedPrecondition(f"node {node_id} is {consumer.fence} ({consumer.fence_reason}): nothing is "
                                         f"published to it; shoalctl node unfence {node_id} once the host is known "
                                         "clean")
            if existing is not None and (shared or multi_writer) and not existing.shared:
                # Its single writer, as it was promised: made shared, it would let a multi-writer publish in
                # elsewhere beside a node that may have a filesystem mounted on the volume.
                raise AlreadyExists(f"volume {name} is attached to {node_id} as its single writer: a repeat "
                                    "cannot make it shared; detach it first to attach it shared")
            # A repeated publish is answered from the record. A repeated attach (login) asks the node again: its
            # agent may have restarted meanwhile, and the device recorded then may be gone or, its number reused,
            # another volume's; the agent's attach is idempotent and checks the device (AttachmentManager._login).
            if existing is not None and existing.state in (ATTACHED, PUBLISHED) and not login:
                return existing
            if existing is not None and existing.state == DETACHING:
                raise FailedPrecondition(f"volume {name} is being detached from {node_id}: detach it again to "
                                         "finish, then attach")
            if volume.state not in (AVAILABLE, ATTACHED):
                raise FailedPrecondition(f"volume {name} is {volume.state}: only an available volume can be "
                                         "attached")
            if consumer.health != HEALTHY:
                raise FailedPrecondition(f"{self._unhealthy(consumer)}: cannot attach volume {name} to it")
            shared = shared or multi_writer or (existing is not None and existing.shared)
            # A node that holds the volume passed this check when it got it; a second node came only shared
            # since (live migration): a repeat, or the login of a publish, is not a second writer.
            held = existing is not None and existing.writer
            if multi_writer or not (shared or held):
                self._check_single_writer(name, node_id, beside_shared=multi_writer)
            with self.store.transaction():
                if self.get_node(node_id).fenced:  # re-read: a fence marks the node in a transaction too
                    raise FailedPrecondition(f"node {node_id} is being fenced: nothing is published to it")
                op = self._begin("attach_volume" if login else "publish_volume", name,
                                 f"to {node_id} ({mode}{', shared' if shared else ''})")
                chap = self._chap(volume)
                if existing is None or existing.shared != shared:
                    self.store.put_attachment(replace(existing, shared=shared) if existing is not None
                                              else Attachment(name, node_id, mode, ATTACHING, shared=shared))
            own = initiator_secret(chap.secret, consumer.initiator_iqn)  # the node's own secret for it
            try:
                export = self._export(volume, consumer, chap)
                consumer_client = self._client(node_id, f"attaching volume {name}")
                device = consumer_client.attach_volume(export.to_agent(volume.id), own, mode,
                                                       defer_login=not login)
            except Exception as exc:
                error = _as_domain_error(exc, node_id, "attach_volume", secret=chap.secret, also=own)
                if not error.temporary and (existing is None or existing.state == ATTACHING):
                    # Failed for good (the node cannot attach this way, the LUN is not the volume): no repeat
                    # finishes it, so a row would only claim the node has the volume.  A temporary failure
                    # keeps its "attaching" row for the repeat (or a detach) to finish.
                    self._forget_failed_attach(volume, consumer, mode, error)
                self._end(op, OP_FAILED, str(error))
                raise error from None
            attachment = Attachment(name, node_id, mode, ATTACHED if login else PUBLISHED, device, shared)
            with self.store.transaction():
                self.store.put_attachment(attachment)
                if volume.state == AVAILABLE:
                    self.store.put_volume(replace(volume, state=ATTACHED))
                self._end(op, OP_DONE)
            if login:
                log.info("volume %s attached to %s at %s", name, node_id, device)
            else:
                log.info("volume %s published to %s (the node logs in when it stages it)", name, node_id)
            return attachment

    def _forget_failed_attach(self, volume: Volume, consumer: Node, mode: str, error: DomainError) -> None:
        """Undo what an attach that failed for good recorded: its "attaching" row, and the owner's export to the
        node (the consumer's agent keeps no record of a login that failed).  The owner is asked even when no
        export was recorded: its answer may have been lost after it exported.  An owner that cannot drop it now
        leaves an export record (without target details when there was none), as a detach does: reconcile
        removes it once the owner is back, and a fence of the node asks that owner."""
        export = self.store.get_export(volume.name, consumer.initiator_iqn)
        try:
            unexported = self._unexport(volume, consumer.initiator_iqn)
        except Exception as exc:  # noqa: BLE001 - the attach's own error is the answer
            log.warning("volume %s: its owner %s could not drop the export to %s after the failed attach (%s); "
                        "reconcile removes it", volume.name, volume.owner_node, consumer.id, exc)
            unexported = False
        with self.store.transaction():
            if unexported:
                self.store.delete_export(volume.name, consumer.initiator_iqn)
            elif export is None:
                self.store.put_export(Export(volume.name, consumer.initiator_iqn, "", (), 0, "", "", ""))
            self.store.delete_attachment(volume.name, consumer.id)
        log.warning("volume %s: attach to %s (%s) failed for good, nothing recorded: %s", volume.name, consumer.id,
                    mode, error)

    def _check_single_writer(self, name: str, node_id: str, *, beside_shared: bool = False) -> None:
        """Refuse a second node unless asked for: a volume has one writer except on purpose (``shared``).

        ``beside_shared`` (a multi-writer publish): only the nodes that have the volume not shared count; they
        were promised it alone.  A fenced node's attachment does not count (its owner cut it off); an unhealthy
        node's does: it may still be writing, so its volumes move only once it is fenced.
        """
        others = [a.node for a in self.store.list_attachments(volume=name)
                  if a.node != node_id and a.writer and not (beside_shared and a.shared)]
        if others and beside_shared:
            raise FailedPrecondition(
                f"volume {name} is published to {', '.join(others)} as its single writer: a multi-writer publish "
                "to another node is refused; unpublish it there first, or fence a failed node (shoalctl node "
                "fence NODE)")
        if others:
            raise FailedPrecondition(
                f"volume {name} is published to {', '.join(others)}: a second node is refused; detach it there "
                f"first, fence a failed node (shoalctl node fence NODE), or publish with --shared for live "
                "migration or multi-writer raw block (CSI: MULTI_NODE_MULTI_WRITER)")

    def publish_info(self, name: str, node_id: str) -> tuple[Export | None, Node]:
        """How ``node_id`` reaches volume ``name`` (the owner's answer when it was published), and the node."""
        name = check.name(name, "volume name")
        node = self.get_node(node_id)
        return self.store.get_export(name, node.initiator_iqn), node

    def publish_secret(self, name: str, node_id: str) -> ChapCredential:
        """The CHAP credentials a node logs in with, for a volume published to it (and only then)."""
        name = check.name(name, "volume name")
        node = self.get_node(node_id)
        attachment = self.store.get_attachment(name, node.id)
        if attachment is None or not attachment.writer or node.fenced:
            raise FailedPrecondition(f"volume {name} is not published to node {node.id}: publish it first "
                                     f"(shoalctl volume connect {name} --node {node.id})")
        chap = self.store.get_chap(name)
        if chap is None:
            raise FailedPrecondition(f"volume {name} has no CHAP credentials yet: publish it first")
        # The node's own secret, never the volume's: the owner's target checks each initiator name against a
        # secret derived from the volume's, so a node cannot log in under another's name (RFC 7143 §9.2.1).
        return ChapCredential(chap.user, initiator_secret(chap.secret, node.initiator_iqn))

    def _chap(self, volume: Volume) -> ChapCredential:
        chap = self.store.get_chap(volume.name)
        if chap is None:
            chap = ChapCredential(self.settings.chap_user_prefix + volume.id,
                                  self._secrets.token_urlsafe(self.settings.chap_secret_bytes))
            self.store.put_chap(volume.name, chap)
        return chap

    def _export(self, volume: Volume, consumer: Node, chap: ChapCredential) -> Export:
        """Ask the owner to export ``volume`` to ``consumer``'s initiator; record what it answered.

        Exports the owner may still have to nodes that no longer hold the volume (a detach that could not reach
        the owner kept their records) go first: else the volume would be exported to a node that let it go, maybe
        one that is fenced or gone (a forced detach), beside the new one until reconcile removes it.
        """
        owner = self._client(volume.owner_node, f"owning volume {volume.name}")
        iqns = {n.initiator_iqn: n.id for n in self.store.list_nodes()}
        for stale in self.store.list_exports(volume.name):
            holder = iqns.get(stale.initiator_iqn)
            if stale.initiator_iqn == consumer.initiator_iqn or (
                    holder is not None and self.store.get_attachment(volume.name, holder) is not None):
                continue
            owner.unexport_volume(volume.id, stale.initiator_iqn)
            self.store.delete_export(volume.name, stale.initiator_iqn)
            log.info("volume %s: its owner %s no longer exports it to %s (detached while %s was unreachable)",
                     volume.name, volume.owner_node, stale.initiator_iqn, volume.owner_node)
        info = owner.export_volume(volume.id, consumer.initiator_iqn, chap.user, chap.secret)
        export = Export(volume=volume.name, initiator_iqn=consumer.initiator_iqn,
                        target_iqn=str(info["target_iqn"]), portals=tuple(info.get("portals") or ()),
                        lun=int(info.get("lun", 0)), naa=str(info.get("naa", "")),
                        serial=str(info.get("serial", "")), chap_user=chap.user)
        self.store.put_export(export)
        return export

    def detach_volume(self, name: str, node_id: str, *, force: bool = False) -> None:
        """Unpublish: the node detaches, the owner drops the node's initiator.  A repeat succeeds.

        ``force`` skips the consumer node (for a node that is gone for good); the
        owner's export is removed now, or by reconcile when the owner is back.
        A fenced attachment skips the consumer too (its node is cut off, maybe dead) and stays "fenced" until
        the detach is done: "detaching" would make it a writer again, and its retry would ask the consumer.

        An owner that is unhealthy is not asked either (the detach succeeds: the consumer is done with it), but
        it may still admit the node's initiator, so the export record stays until the owner drops it: it is
        what tells a later fence of the node to ask that owner (``controller.domain.fencing``), reconcile to
        remove the export once the owner is back, and an attach elsewhere to remove it first (``_export``).
        An attachment whose export was never recorded (its export failed, maybe after the owner did it) gets a
        record without target details for the same reason.  A repeat of the detach asks the owner again.
        """
        name = check.name(name, "volume name")
        node_id = check.node_id(node_id)
        with self._volume_locks.hold(name):
            volume = self.store.get_volume(name)
            node = self.store.get_node(node_id)
            if volume is None or node is None:
                return
            attachment = self.store.get_attachment(name, node_id)
            export = self.store.get_export(name, node.initiator_iqn)
            if attachment is None and export is None:
                return
            with self.store.transaction():
                op = self._begin("detach_volume", name, f"from {node_id}" + (" (forced)" if force else ""))
                if attachment is not None and attachment.state != FENCED:
                    self.store.put_attachment(replace(attachment, state=DETACHING))
            try:
                if attachment is not None and not force and attachment.state != FENCED:
                    consumer = self._client(node_id, f"detaching volume {name}",
                                            hint=f"; or detach with force if {node_id} is gone for good")
                    consumer.detach_volume(volume.id, attachment.mode)
                unexported = self._unexport(volume, node.initiator_iqn)
            except Exception as exc:
                error = _as_domain_error(exc, node_id, "detach_volume")
                self._end(op, OP_FAILED, str(error))
                raise error from None
            with self.store.transaction():
                if unexported:
                    self.store.delete_export(name, node.initiator_iqn)
                elif export is None and attachment is not None and attachment.state != FENCED:
                    # Its export failed, or timed out after the owner made it: the owner may admit the node.
                    self.store.put_export(Export(name, node.initiator_iqn, "", (), 0, "", "", ""))
                self.store.delete_attachment(name, node_id)
                if volume.state == ATTACHED and not self.store.list_attachments(volume=name):
                    self.store.put_volume(replace(volume, state=AVAILABLE))
                self._end(op, OP_DONE, "" if unexported else
                          f"owner {volume.owner_node} not reached: its export to {node_id} stays on record until "
                          "it drops it (reconcile, once it is back)")
            log.info("volume %s detached from %s", name, node_id)

    def _unexport(self, volume: Volume, initiator_iqn: str) -> bool:
        """The owner drops ``initiator_iqn`` from the volume's export; False when the owner is unhealthy (not
        asked: it may still admit the initiator, and the caller keeps the export record for it)."""
        owner = self.store.get_node(volume.owner_node)
        if owner is None:
            return True  # a node removed for good admits nobody
        if self._effective(owner).health != HEALTHY:
            # Reconcile removes the export ("nobody should have it") when the owner is back.
            log.warning("volume %s: owner %s is unhealthy; its export to %s stays on record and is removed when "
                        "it is back", volume.name, volume.owner_node, initiator_iqn)
            return False
        self.agents.client(owner).unexport_volume(volume.id, initiator_iqn)
        return True

    # ---- snapshots and clones (controller.domain.snapshots says how, and what a repeat does) ---

    def create_snapshot(self, name: str, volume: str) -> Snapshot:
        return self._snapshots.create(name, volume)

    def get_snapshot(self, name: str) -> Snapshot:
        return self._snapshots.get(name)

    def list_snapshots(self, volume: str | None = None) -> list[Snapshot]:
        return self._snapshots.list(volume)

    def delete_snapshot(self, name: str) -> None:
        self._snapshots.delete(name)

    def clone_volume(self, name: str, source: str, pool: str | None = None, *, requested_bytes: int = 0,
                     restart_failed: bool = True) -> Volume:
        """A new volume from a snapshot or a volume, on the source's node and disk.

        ``requested_bytes``: the size it was asked to have (CSI CreateVolume), recorded on the clone (also when it
        failed half way: its repeat is then told from another request), or on the clone this call repeats when
        that has none; a request refused for another source or pool changes nothing.  The clone is made at its
        source's size; the caller grows it.

        A clone whose copy failed is ``FailedPrecondition`` saying why; ``restart_failed`` false: its repeat does
        not copy it again (CSI, whose CO is told the failure, and deletes it).
        """
        if requested_bytes:
            requested_bytes = check.size(requested_bytes, multiple=self.settings.volume_size_multiple,
                                         maximum=self.settings.max_volume_bytes, what="requested size")
        return self._snapshots.clone(name, source, pool, requested_bytes, restart_failed=restart_failed)

    def observe_volume(self, name: str) -> Volume:
        """``get_volume``, with a clone still being copied looked up on its agent (best effort)."""
        volume = self.get_volume(name)
        if volume.state == CREATING and volume.source:
            with self._volume_locks.hold(volume.name):
                current = self.get_volume(name)
                if current.state == CREATING:
                    try:
                        return self._snapshots.observe_clone(current)
                    except DomainError:
                        return self.get_volume(name)
                return current
        return volume

    def clone_progress(self, volume: Volume) -> float:
        """0..1 for a clone still being copied in the background (as last seen), else 0."""
        return self._snapshots.clone_progress(volume)

    # ---- status and reconcile ----------------------------------------------------------------

    def status(self) -> dict[str, int]:
        nodes = self.list_nodes()
        volumes = self.store.list_volumes()
        return {"nodes": len(nodes), "healthy_nodes": sum(n.health == HEALTHY for n in nodes),
                "volumes": len(volumes), "attachments": len(self.store.list_attachments()),
                "capacity_bytes": sum(d.capacity_bytes for n in nodes for d in n.disks),
                "free_bytes": sum(d.free_bytes for n in nodes for d in n.disks),
                # What volumes and snapshots promise (placement, rule 3), as each pool's figure.
                "provisioned_bytes": sum(v.size_bytes for v in volumes)
                + sum(s.size_bytes for s in self.store.list_snapshots())}

    def reconcile_once(self) -> list[str]:
        """Compare desired state with what each healthy agent reports and repair the difference.

        Returns one line per repair (see ``controller.domain.reconcile``).
        """
        from controller.domain.reconcile import Reconciler
        return Reconciler(self).run()

    # ---- helpers -----------------------------------------------------------------------------

    def _client(self, node_id: str, role: str, hint: str = "") -> AgentClient:
        """The agent of a healthy node, or ``Unavailable`` saying which node and why."""
        node = self.store.get_node(node_id)
        if node is None:
            raise Unavailable(f"node {node_id} ({role}) is not registered; retry when its agent registers")
        node = self._effective(node)
        if node.health != HEALTHY:
            raise Unavailable(f"{self._unhealthy(node)} ({role}); retry when it is back{hint}")
        return self.agents.client(node)

    def _new_volume_id(self) -> str:
        return str(uuid.UUID(hex=self._secrets.token_hex(16), version=4))

    def _begin(self, kind: str, subject: str, detail: str = "") -> int:
        return self.store.record_operation(self._clock(), kind, subject, OP_STARTED, detail)

    def _end(self, op: int, state: str, detail: str = "") -> None:
        self.store.finish_operation(op, state, detail)


def _as_domain_error(exc: Exception, node_id: str, method: str, *, secret: str = "",
                     also: str = "") -> DomainError:
    """The error to raise after an agent call failed: ours as is, anything else as ``Unavailable``.

    Either way, a secret (``secret``, ``also``) that got into the message is cut out.
    """
    if isinstance(exc, DomainError):
        error = exc
    else:
        error = Unavailable(f"agent of node {node_id} failed on {method}: {type(exc).__name__}: {exc}")
    for value in (secret, also):
        if value and value in str(error):
            error = type(error)(str(error).replace(value, "<secret>"))
    return error


def _describe_pool(pool: Pool) -> str:
    members = ", ".join(f"{n}/{d}" for n, d in pool.members) or "every disk"
    return f"members {members}, overcommit ratio {pool.overcommit_ratio:g}"


def _some(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
