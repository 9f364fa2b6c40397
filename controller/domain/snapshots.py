"""Snapshots and clones: point-in-time copies of volumes, kept on the volume's node and disk.

A snapshot is made by the agent that owns the volume: a reflink (done at once)
where the disk's filesystem shares extents, else a full copy in the
background; its row stays "creating", with the copy's progress, until the
agent reports it "ready".  A clone is a new volume made from a snapshot or a
volume: it is placed on the node and disk of its source (a reflink or a local
copy needs both files on one filesystem), in the source volume's pool unless
another pool that includes that disk is named, and stays "creating" with its
progress while it is copied.  Progress is looked up from the agent when a
snapshot or clone is read and by every reconcile pass, which also finishes
what a stop left half done.

As everywhere in the controller, each decision is recorded (a row in a
transitional state and a line in the operations log) before an agent is
called, and calls are safe to repeat.

Idempotency, per method (admin.proto says the same per RPC):

* ``create_snapshot``: the existing snapshot when it is of the same volume
  (still creating, or ready), ``AlreadyExists`` when not; a failed one is
  taken again (its failed copy dropped, the new one cut now, which its
  ``created_at`` says), as a retry would.
* ``clone_volume``: the existing volume when it is a clone of the same source
  (and, if one is named, in the same pool), ``AlreadyExists`` when not; a
  clone left "creating" or "error" is finished (its copy started again) by the
  repeat, from the very snapshot or volume it was asked from:
  ``FailedPrecondition`` if that name now names a newer one.
* ``delete_snapshot``: deleting what is gone succeeds; refused
  (``FailedPrecondition``) while a clone of the snapshot is not made yet
  (being copied, or failed and waiting for its repeat).
* ``ControllerService.delete_volume`` refuses a volume that has snapshots or
  clones not made yet (being copied, or failed): delete those first (a
  snapshot outliving its volume would be a copy nobody can place a clone
  beside for sure, and the refusal is easy to lift later).

Locks: a call that needs a snapshot's lock and a volume's takes them in one
order (``_holding``: snapshots first, then volumes, each by name), so two
calls needing the same two (``clone a <- volume/b`` and ``clone b <- volume/a``)
never wait for each other crosswise.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from controller.domain import placement
from controller.domain import validation as check
from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted)
from controller.domain.model import (ATTACHED, AVAILABLE, CREATING, DELETING, ERROR, HEALTHY, OP_DONE, OP_FAILED,
                                     READY, Disk, Pool, Snapshot, Volume)
from controller.domain.validation import human_bytes

if TYPE_CHECKING:
    from controller.domain.service import ControllerService

log = logging.getLogger("shoal.controller.snapshots")

SNAPSHOT, VOLUME = "snapshot", "volume"
# What an agent reports about a copy, as a row's state.
_AGENT_STATES = {"ready": READY, "copying": CREATING, "error": ERROR}


def parse_source(value: Any) -> tuple[str, str]:
    """``NAME``, ``snapshot/NAME`` or ``volume/NAME`` -> (kind or "", name)."""
    text = check._text(value, "source")
    kind, sep, name = text.partition("/")
    if not sep:
        return "", check.name(text, "source")
    if kind not in (SNAPSHOT, VOLUME):
        raise InvalidArgument(f"source {check.shown(text)}: give NAME, snapshot/NAME or volume/NAME")
    return kind, check.name(name, f"{kind} name")


def _lock_key(name: str) -> str:
    return f"snapshot/{name}"  # snapshots share the lock table with volumes, in their own namespace


def _source_key(kind: str, name: str) -> str:
    return _lock_key(name) if kind == SNAPSHOT else name


@contextmanager
def _holding(locks: Any, *keys: str) -> Iterator[None]:
    """Hold the locks of ``keys`` (snapshot keys first, then volume names, each sorted): the one order every
    call taking two of them follows (``create_snapshot``: its snapshot's, then its volume's)."""
    with ExitStack() as held:
        for key in sorted(set(keys), key=lambda k: (not k.startswith("snapshot/"), k)):
            held.enter_context(locks.hold(key))
        yield


class Snapshots:
    """The snapshot and clone half of ``ControllerService`` (which delegates to it)."""

    def __init__(self, service: "ControllerService"):
        self.service = service
        self.store = service.store
        self.progress: dict[str, float] = {}  # clone name -> progress of its background copy (not persisted)

    # ---- snapshots -------------------------------------------------------------------------

    def create(self, name: str, volume_name: str) -> Snapshot:
        name = check.name(name, "snapshot name")
        volume_name = check.name(volume_name, "volume name")
        locks = self.service._volume_locks
        with locks.hold(_lock_key(name)):
            existing = self.store.get_snapshot(name)
            if existing is not None:
                if existing.volume != volume_name:
                    raise AlreadyExists(f"snapshot {name} already exists, of volume {existing.volume}, not "
                                        f"{volume_name}: pick another name")
                if existing.state == DELETING:
                    raise FailedPrecondition(f"snapshot {name} is being deleted: delete it again to finish, then "
                                             "take it")
                if existing.state == CREATING:
                    existing = self._observe(existing)
                return self._retake(existing) if existing.state == ERROR else existing
            with locks.hold(volume_name):
                volume = self.service.get_volume(volume_name)
                if volume.state not in (AVAILABLE, ATTACHED):
                    raise FailedPrecondition(f"volume {volume_name} is {volume.state}: only an available or "
                                             "attached volume can be snapshotted")
                self.service._client(volume.owner_node, f"owning volume {volume_name}")  # healthy, or Unavailable
                snapshot = Snapshot(name, self.service._new_volume_id(), volume.name, volume.id, volume.size_bytes,
                                    volume.owner_node, volume.disk, CREATING, self.service._clock())
                with self.store.transaction():
                    op = self.service._begin("create_snapshot", name, f"of volume {volume_name} on "
                                                                      f"{volume.owner_node}/{volume.disk}")
                    self.store.put_snapshot(snapshot)
                return self._start(snapshot, op)

    def _retake(self, snapshot: Snapshot) -> Snapshot:
        """A failed snapshot taken again (a repeat of its create): the agent answers a repeat with the failed
        copy as it is, so that copy is dropped first; the new one is cut now.

        Answering the failure as is would leave a CSI CreateSnapshot "not ready to use" for good: the CO
        repeats it and waits, and nothing ever changes.
        """
        with self.service._volume_locks.hold(snapshot.volume):
            volume = self.service.get_volume(snapshot.volume)
            if volume.state not in (AVAILABLE, ATTACHED):
                raise FailedPrecondition(f"snapshot {snapshot.name} failed ({snapshot.message or 'no reason given'})"
                                         f" and volume {volume.name} is {volume.state}: only an available or "
                                         "attached volume can be snapshotted again")
            client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
            with self.store.transaction():
                op = self.service._begin("create_snapshot", snapshot.name,
                                         f"again, it failed: {snapshot.message or 'no reason given'}")
                snapshot = replace(snapshot, state=CREATING, progress=0.0, message="")
                self.store.put_snapshot(snapshot)
            try:
                client.delete_snapshot(snapshot.id)
            except Exception as exc:  # still "creating": a look finds the failed copy (error) or none (taken)
                error = _error(exc, snapshot.owner_node, "delete_snapshot")
                self.service._end(op, OP_FAILED, str(error))
                raise error from None
            return self._start(snapshot, op)

    def _start(self, snapshot: Snapshot, op: int | None = None) -> Snapshot:
        """Ask the owner to take the snapshot (a repeat returns how far it got); record what it says.

        ``created_at`` becomes the time of this call: the point in time the copy holds is when the agent cuts
        it, not when an earlier attempt that failed was asked for.
        """
        op = op if op is not None else self.service._begin("create_snapshot", snapshot.name, "retry")
        try:
            client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
            snapshot = replace(snapshot, created_at=self.service._clock())
            info = client.create_snapshot(snapshot.id, snapshot.volume_id)
        except Exception as exc:
            error = _error(exc, snapshot.owner_node, "create_snapshot")
            with self.store.transaction():  # temporary: still "creating", a repeat or reconcile sends it again
                if not error.temporary:
                    self.store.put_snapshot(replace(snapshot, state=ERROR, message=str(error)))
                self.service._end(op, OP_FAILED, str(error))
            raise error from None
        snapshot = self._apply(snapshot, info)
        with self.store.transaction():
            self.store.put_snapshot(snapshot)
            self.service._end(op, OP_DONE, f"{info.get('method') or 'copy'}; {snapshot.state}")
        log.info("snapshot %s of volume %s: %s (%s)", snapshot.name, snapshot.volume, snapshot.state,
                 info.get("method") or "copy")
        return snapshot

    def _apply(self, snapshot: Snapshot, info: dict[str, Any]) -> Snapshot:
        state = _AGENT_STATES.get(str(info.get("state") or "ready"), ERROR)
        progress = 1.0 if state == READY else float(info.get("progress") or 0.0)
        return replace(snapshot, state=state, progress=progress,
                       message=str(info.get("message") or "") if state == ERROR else "")

    def _observe(self, snapshot: Snapshot) -> Snapshot:
        """A "creating" snapshot as its agent sees it now (best effort: the row as it is when unreachable)."""
        try:
            client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
            info = client.get_snapshot(snapshot.id)
        except NotFound:  # the agent never took it (the controller stopped before asking): ask now
            try:
                return self._start(snapshot)
            except DomainError:
                return self.store.get_snapshot(snapshot.name) or snapshot
        except DomainError as exc:
            log.debug("snapshot %s: progress unknown: %s", snapshot.name, exc)
            return snapshot
        updated = self._apply(snapshot, info)
        if updated != snapshot:
            with self.store.transaction():
                current = self.store.get_snapshot(snapshot.name)
                if current is None or current.state != CREATING:
                    return current or snapshot  # deleted or finished meanwhile
                self.store.put_snapshot(updated)
                if updated.state != CREATING:
                    self.store.record_operation(self.service._clock(), "create_snapshot", snapshot.name,
                                                OP_DONE if updated.state == READY else OP_FAILED,
                                                updated.message or "background copy done")
            if updated.state != CREATING:
                log.info("snapshot %s: %s", snapshot.name, updated.state + (f": {updated.message}"
                                                                            if updated.message else ""))
        return updated

    def get(self, name: str) -> Snapshot:
        snapshot = self.store.get_snapshot(check.name(name, "snapshot name"))
        if snapshot is None:
            raise NotFound(f"snapshot {name} does not exist (shoalctl snapshot list shows the snapshots)")
        return self._observe(snapshot) if snapshot.state == CREATING else snapshot

    def list(self, volume: str | None = None) -> list[Snapshot]:
        volume = check.name(volume, "volume name") if volume is not None else None
        return [self._observe(s) if s.state == CREATING else s for s in self.store.list_snapshots(volume)]

    def delete(self, name: str) -> None:
        name = check.name(name, "snapshot name")
        with self.service._volume_locks.hold(_lock_key(name)):
            snapshot = self.store.get_snapshot(name)
            if snapshot is None:
                return
            clones = self._unfinished_clones(SNAPSHOT, snapshot)
            if clones:
                raise FailedPrecondition(f"snapshot {name} is being cloned to {', '.join(clones)}: wait until "
                                         "the clone is available (repeat a failed clone to finish it), or delete "
                                         "it first")
            with self.store.transaction():
                op = self.service._begin("delete_snapshot", name, f"from {snapshot.owner_node}/{snapshot.disk}")
                snapshot = replace(snapshot, state=DELETING)
                self.store.put_snapshot(snapshot)
            self._finish_delete(snapshot, op)

    def _finish_delete(self, snapshot: Snapshot, op: int) -> None:
        try:
            if self.store.get_node(snapshot.owner_node) is not None:  # a node removed for good holds nothing
                self.service._client(snapshot.owner_node, f"holding snapshot {snapshot.name}").delete_snapshot(
                    snapshot.id)
        except Exception as exc:
            error = _error(exc, snapshot.owner_node, "delete_snapshot")
            self.service._end(op, OP_FAILED, str(error))
            raise error from None
        with self.store.transaction():
            self.store.delete_snapshot(snapshot.name)
            self.service._end(op, OP_DONE)
        log.info("snapshot %s (%s) of volume %s deleted", snapshot.name, snapshot.id, snapshot.volume)

    # ---- clones ----------------------------------------------------------------------------

    def clone(self, name: str, source: str, pool: str | None = None, requested_bytes: int = 0) -> Volume:
        """``requested_bytes`` (checked by the caller): recorded on the clone this request makes, or on the one it
        repeats when that has none; never on a clone the request was refused for (another source or pool)."""
        name = check.name(name, "volume name")
        kind, source_name = parse_source(source)
        pool = check.name(pool, "pool name") if pool else None
        # A first look, without locks, to know which source to lock with the clone (a repeat: the one recorded);
        # under the locks everything is read again.
        existing = self.store.get_volume(name)
        if existing is not None:
            self._check_same_clone(existing, kind, source_name, pool)
            kind = existing.source.split("/", 1)[0]
        kind = kind or self._kind_of(source_name)
        with _holding(self.service._volume_locks, name, _source_key(kind, source_name)):
            existing = self.store.get_volume(name)
            if existing is not None:
                self._check_same_clone(existing, kind, source_name, pool)
                if existing.state == DELETING:
                    raise FailedPrecondition(f"volume {name} is being deleted: delete it again to finish, then "
                                             "clone it")
                if requested_bytes and not existing.requested_bytes:
                    existing = replace(existing, requested_bytes=requested_bytes)
                    self.store.put_volume(existing)
                if existing.state in (AVAILABLE, ATTACHED):
                    return existing
                return self.finish_clone(existing)  # "creating" (copying) or "error": the repeat finishes it
            origin, node_id, disk, size, thin, default_pool = self._source(kind, source_name)
            self._pool_beside(pool or default_pool, node_id, disk, kind, source_name)
            self.service._client(node_id, f"holding {kind} {source_name}")  # healthy, or Unavailable
            with self.service._placement_lock, self.store.transaction():
                # Read again in the transaction delete_pool checks in: a pool deleted since is not used.
                pool_record = self._pool_beside(pool or default_pool, node_id, disk, kind, source_name)
                self._check_room(node_id, disk, pool_record, size, thin, name)
                volume = Volume(name, self.service._new_volume_id(), size, pool_record.name, node_id, disk,
                                CREATING, thin, self.service._clock(), source=f"{kind}/{source_name}",
                                requested_bytes=requested_bytes)
                op = self.service._begin("clone_volume", name, f"from {origin} on {node_id}/{disk}")
                self.store.put_volume(volume)
            log.info("volume %s (%s): clone of %s on %s/%s", name, volume.id, origin, node_id, disk)
            return self.finish_clone(volume, op)

    def finish_clone(self, volume: Volume, op: int | None = None) -> Volume:
        """Ask the owner to make (or tell how far it got with) the clone; record what it says.

        A clone that failed is "creating" again before the agent is asked (the decision first, as everywhere):
        what the agent answers then is recorded, a copy it made at once (a reflink) too.
        """
        op = op if op is not None else self.service._begin("clone_volume", volume.name, "retry")
        kind = volume.source.split("/", 1)[0]
        try:
            ids = {"source_snapshot_id" if kind == SNAPSHOT else "source_volume_id": self._source_id(volume)}
            client = self.service._client(volume.owner_node, f"owning volume {volume.name}")
            if volume.state != CREATING:
                volume = replace(volume, state=CREATING)
                self.store.put_volume(volume)
            info = client.clone_volume(volume.id, volume.size_bytes, volume.disk, volume.thin, **ids)
        except Exception as exc:
            error = _error(exc, volume.owner_node, "clone_volume")
            with self.store.transaction():  # a repeat of the clone finishes it, a delete cleans it up
                self.store.put_volume(replace(volume, state=ERROR))
                self.service._end(op, OP_FAILED, str(error))
            self.progress.pop(volume.name, None)
            raise error from None
        volume = self._record_clone(volume, info)
        self.service._end(op, OP_DONE if volume.state != ERROR else OP_FAILED,
                          "copying in the background" if volume.state == CREATING else
                          str(info.get("message") or volume.state))
        return volume

    def observe_clone(self, volume: Volume) -> Volume:
        """A clone still "creating" as its agent sees it now (best effort)."""
        try:
            info = self.service._client(volume.owner_node, f"owning volume {volume.name}").get_volume(volume.id)
        except NotFound:
            return self.finish_clone(volume)  # never started (or lost by an agent restart): start it
        except DomainError as exc:
            log.debug("clone %s: progress unknown: %s", volume.name, exc)
            return volume
        return self._record_clone(volume, info)

    def _record_clone(self, volume: Volume, info: dict[str, Any]) -> Volume:
        state = _AGENT_STATES.get(str(info.get("state") or "ready"), ERROR)
        if state == CREATING:
            self.progress[volume.name] = float(info.get("progress") or 0.0)
            if volume.state != CREATING:  # a repeat after a failure started the copy again
                volume = replace(volume, state=CREATING)
                self.store.put_volume(volume)
            return volume
        self.progress.pop(volume.name, None)
        updated = replace(volume, state=AVAILABLE if state == READY else ERROR)
        with self.store.transaction():
            current = self.store.get_volume(volume.name)
            if current is None or current.state != CREATING or current.id != volume.id:
                return current or volume
            self.store.put_volume(updated)
            if state == ERROR:
                self.store.record_operation(self.service._clock(), "clone_volume", volume.name, OP_FAILED,
                                            str(info.get("message") or "the copy failed"))
        log.info("clone %s of %s: %s", volume.name, volume.source,
                 "available" if state == READY else f"failed: {info.get('message')}")
        return updated

    def clone_progress(self, volume: Volume) -> float:
        if volume.state == CREATING and volume.source:
            return self.progress.get(volume.name, 0.0)
        return 0.0

    # ---- what other operations ask -----------------------------------------------------------

    def check_volume_deletable(self, volume: Volume) -> None:
        """``FailedPrecondition`` while the volume has snapshots, or clones of it not made yet (copying, or
        failed: their repeat copies this volume, not one made later under its name)."""
        snapshots = [s.name for s in self.store.list_snapshots(volume.name)]
        if snapshots:
            raise FailedPrecondition(f"volume {volume.name} has snapshots ({', '.join(snapshots)}): delete them "
                                     f"first (shoalctl snapshot delete NAME)")
        clones = self._unfinished_clones(VOLUME, volume)
        if clones:
            raise FailedPrecondition(f"volume {volume.name} is being cloned to {', '.join(clones)}: wait until the "
                                     "clone is available (repeat a failed clone to finish it), or delete it first")

    def reconcile(self, try_: Callable[[str, Callable[[], Any]], None]) -> list[str]:
        """Look at every copy still running (finishing what a stop left) and finish deletes; one line each
        for what finished.

        ``try_`` (``Reconciler._try``) runs each delete left "deleting": a delete the agent keeps refusing is
        retried less and less often, as a volume's repairs are (each attempt writes an operation, and under
        Kubernetes an Event); it counts what it finished among the pass's repairs itself."""
        done = []
        healthy = {n.id for n in self.service.list_nodes() if n.health == HEALTHY}
        for snapshot in self.store.list_snapshots():
            if snapshot.owner_node not in healthy:
                continue
            if snapshot.state == CREATING:
                with self.service._volume_locks.hold(_lock_key(snapshot.name)):
                    current = self.store.get_snapshot(snapshot.name)
                    if current is not None and current.state == CREATING and \
                            self._observe(current).state != CREATING:
                        done.append(f"snapshot {snapshot.name} finished copying")
            elif snapshot.state == DELETING:
                try_(f"deleted snapshot {snapshot.name}", lambda s=snapshot: self._finish_deleting(s.name))
        for volume in self.store.list_volumes():
            if volume.state == CREATING and volume.source and volume.owner_node in healthy:
                with self.service._volume_locks.hold(volume.name):
                    current = self.store.get_volume(volume.name)
                    if current is None or current.state != CREATING:
                        continue
                    try:
                        if self.observe_clone(current).state != CREATING:
                            done.append(f"clone {volume.name} finished copying")
                    except DomainError as exc:
                        log.warning("reconcile: clone %s: %s", volume.name, exc)
        return done

    def _finish_deleting(self, name: str) -> bool:
        """Reconcile's repeat of a delete left "deleting"; False when a repeat by hand finished it meanwhile."""
        with self.service._volume_locks.hold(_lock_key(name)):
            current = self.store.get_snapshot(name)
            if current is None or current.state != DELETING:
                return False
            self.delete(name)
            return True

    # ---- helpers -----------------------------------------------------------------------------

    def _kind_of(self, source_name: str) -> str:
        snapshot = self.store.get_snapshot(source_name)
        volume = self.store.get_volume(source_name)
        if snapshot is not None and volume is not None:
            raise InvalidArgument(f"{source_name} names both a snapshot and a volume: give "
                                        f"snapshot/{source_name} or volume/{source_name}")
        if snapshot is None and volume is None:
            raise NotFound(f"no snapshot or volume {source_name} (shoalctl snapshot list, volume list)")
        return SNAPSHOT if snapshot is not None else VOLUME

    def _source(self, kind: str, source_name: str) -> tuple[str, str, str, int, bool, str]:
        """(description, node, disk, size, thin, default pool) of a ready source."""
        if kind == SNAPSHOT:
            snapshot = self.store.get_snapshot(source_name)
            if snapshot is None:
                raise NotFound(f"snapshot {source_name} does not exist (shoalctl snapshot list)")
            if snapshot.state == CREATING:
                snapshot = self._observe(snapshot)
            if snapshot.state != READY:
                raise FailedPrecondition(f"snapshot {source_name} is {snapshot.state}"
                                         + (f" ({snapshot.progress:.0%} copied)" if snapshot.state == CREATING
                                            else "") + ": clone it once it is ready")
            volume = self.store.get_volume(snapshot.volume)
            thin = volume.thin if volume is not None else True
            pool = volume.pool if volume is not None else (self.service.settings.default_pool or "default")
            return (f"snapshot {source_name}", snapshot.owner_node, snapshot.disk, snapshot.size_bytes, thin, pool)
        volume = self.store.get_volume(source_name)
        if volume is None:
            raise NotFound(f"volume {source_name} does not exist (shoalctl volume list)")
        if volume.state not in (AVAILABLE, ATTACHED):
            raise FailedPrecondition(f"volume {source_name} is {volume.state}: only an available or attached "
                                     "volume can be cloned")
        return f"volume {source_name}", volume.owner_node, volume.disk, volume.size_bytes, volume.thin, volume.pool

    def _source_id(self, clone: Volume) -> str:
        """The agent's id of the clone's source: the snapshot or volume it was asked from, or
        ``FailedPrecondition``.

        A source is not deleted while a clone of it is not made (``_unfinished_clones``), but a clone recorded
        before that rule may name a source deleted since, and the name be reused: a source newer than the clone
        is another one, and the clone is never made from it.
        """
        kind, source_name = clone.source.split("/", 1)
        record = (self.store.get_snapshot(source_name) if kind == SNAPSHOT else self.store.get_volume(source_name))
        if record is None:
            raise FailedPrecondition(f"the {kind} {source_name} clone {clone.name} is made from is gone: delete "
                                     "the clone")
        if record.created_at > clone.created_at:
            raise FailedPrecondition(f"the {kind} {source_name} clone {clone.name} was asked from is gone; {kind} "
                                     f"{source_name} is now another one, made after the clone: delete the clone "
                                     "(and clone again to copy the new one)")
        return record.id

    def _check_same_clone(self, volume: Volume, kind: str, source_name: str, pool: str | None) -> None:
        wanted = {f"{k}/{source_name}" for k in ((kind,) if kind else (SNAPSHOT, VOLUME))}
        differences = []
        if volume.source not in wanted:
            differences.append(f"it is {'a clone of ' + volume.source if volume.source else 'not a clone'}, "
                               f"asked for a clone of {'/'.join(filter(None, (kind, source_name)))}")
        if pool and volume.pool != pool:
            differences.append(f"pool {volume.pool}, asked {pool}")
        if differences:
            raise AlreadyExists(f"volume {volume.name} already exists: " + "; ".join(differences))

    def _check_room(self, node_id: str, disk_name: str, pool, size: int, thin: bool, name: str) -> None:
        node = self.service.get_node(node_id)
        disk = node.disk(disk_name) or Disk(disk_name, "", 0, 0)
        candidate = placement.candidate(node, disk, self.store.list_volumes(), self.service._grown)
        if candidate.headroom(pool, thin) < size:
            raise ResourceExhausted(f"pool {pool.name}: {node_id}/{disk_name}, where clone {name} must live "
                                    f"beside its source, has room for {human_bytes(candidate.headroom(pool, thin))},"
                                    f" not {human_bytes(size)}")

    def _pool_beside(self, pool_name: str, node_id: str, disk: str, kind: str, source_name: str) -> Pool:
        """The clone's pool, which must include the source's disk (a clone lives beside its source)."""
        pool_record = self.service.get_pool(pool_name)
        if not pool_record.includes(node_id, disk):
            raise FailedPrecondition(f"pool {pool_record.name} does not include {node_id}/{disk}, where "
                                     f"{kind} {source_name} is: a clone lives beside its source; name a "
                                     "pool that includes it, or none")
        return pool_record

    def _unfinished_clones(self, kind: str, source: Snapshot | Volume) -> list[str]:
        """Clones of ``source`` not made yet: being copied, or failed (a repeat copies it again).

        Both keep their source: a failed clone's repeat must find the very snapshot or volume it was asked
        from under the name it recorded, not a newer one of that name.  Clones older than ``source`` were of
        an earlier object of its name (``_source_id`` refuses them) and keep nothing.
        """
        name = f"{kind}/{source.name}"
        return [v.name for v in self.store.list_volumes()
                if v.source == name and v.state in (CREATING, ERROR) and v.created_at >= source.created_at]


def _error(exc: Exception, node_id: str, method: str) -> DomainError:
    from controller.domain.service import _as_domain_error

    return _as_domain_error(exc, node_id, method)
