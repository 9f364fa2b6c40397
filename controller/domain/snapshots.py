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
what a stop left half done.  A read only looks: it never asks an agent to take
a snapshot, nor writes a snapshot's row (a read racing a delete would bring the
deleted snapshot back); what it sees is recorded by the repeat of the create, or
by reconcile, each under the snapshot's lock with its row read again.

As everywhere in the controller, each decision is recorded (a row in a
transitional state and a line in the operations log) before an agent is
called, and calls are safe to repeat.

Idempotency, per method (admin.proto says the same per RPC):

* ``create_snapshot``: the existing snapshot when it is of the same volume
  (still creating, or ready), ``AlreadyExists`` when not.  One whose copy
  failed after its agent took it is ``FailedPrecondition`` (delete it and take
  a new one): its point in time was answered (``created_at``; CSI's
  creation_time), and the CO let the application write on; taken again now,
  it would silently hold later data under that time.  Only one no agent ever
  took (its agent does not have it: the controller stopped before asking, or
  the agent refused) is taken now, which its ``created_at`` says.
* ``clone_volume``: the existing volume when it is a clone of the same source
  (and, if one is named, in the same pool), ``AlreadyExists`` when not; a
  clone left "creating" is looked at first (as a snapshot's repeat does): a
  copy its agent reports failed is ``FailedPrecondition`` saying why, not
  hidden by a new copy; one its agent does not have is started.  A temporary
  failure asking the agent (``Unavailable``: unreachable, busy) leaves a
  clone being made "creating", as a snapshot's: the repeat, or reconcile once
  the node answers, asks again.  A failure for good (the agent refused the
  copy, or its copy failed) makes it "error".  A clone in "error" is finished
  (its copy started again) by the repeat, from the very snapshot or volume it
  was asked from (``source_id``): ``FailedPrecondition`` if that one is gone
  or the name now names another one; a repeat that cannot reach the agent
  leaves it "error", for the next repeat.  CSI asks not to restart a failed copy
  (``restart_failed``): the CO gets the failure, and the clone it has no id
  for is deleted.
* Snapshots and clones are made only on a placeable node
  (``placement.placeable``): a fenced one is ``FailedPrecondition``.
* ``delete_snapshot``: deleting what is gone succeeds; refused
  (``FailedPrecondition``) while a clone of the snapshot is being made
  ("creating": copying, or waiting for its agent after a temporary failure).
  A clone in "error" does not hold its source: nothing may ever repeat it,
  and the user who deletes the source gives it up (its repeat then says the
  source is gone: delete the clone).
* ``ControllerService.delete_volume`` refuses a volume that has snapshots or
  clones being made: delete those first (a snapshot outliving its volume
  would be a copy nobody can place a clone beside for sure, and the refusal
  is easy to lift later).  ``ControllerService.expand_volume`` refuses to
  grow it meanwhile: the copy a clone's repeat or reconcile starts again is
  asked at the size the clone recorded, and an agent refuses a clone smaller
  than its source.

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
                                     READY, Disk, Node, Pool, Snapshot, Volume)
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
                if existing.state == CREATING:  # under its lock, read again: the look may start it, and record
                    existing = self._observe(existing, record=True)
                elif existing.state == ERROR:
                    existing = self._repeat_failed(existing)
                return self._answer(existing)
            with locks.hold(volume_name):
                volume = self.service.get_volume(volume_name)
                if volume.state not in (AVAILABLE, ATTACHED):
                    raise FailedPrecondition(f"volume {volume_name} is {volume.state}: only an available or "
                                             "attached volume can be snapshotted")
                self.service._client(volume.owner_node, f"owning volume {volume_name}")  # healthy, or Unavailable
                _require_placeable(self.service.get_node(volume.owner_node), f"snapshot {name}")
                snapshot = Snapshot(name, self.service._new_volume_id(), volume.name, volume.id, volume.size_bytes,
                                    volume.owner_node, volume.disk, CREATING, self.service._clock())
                # Under the placement lock: placement counts snapshots (placement, rule 3), and a volume placed
                # at the same time must see this one or come before it.
                with self.service._placement_lock, self.store.transaction():
                    op = self.service._begin("create_snapshot", name, f"of volume {volume_name} on "
                                                                      f"{volume.owner_node}/{volume.disk}")
                    self.store.put_snapshot(snapshot)
                return self._answer(self._start(snapshot, op))

    @staticmethod
    def _answer(snapshot: Snapshot) -> Snapshot:
        """What ``create`` answers: the snapshot, or ``FailedPrecondition`` when its copy failed.

        Answered as a snapshot "not ready to use", a failure would leave a CSI CreateSnapshot waiting for good
        (the CO repeats it until it is ready); taken again, it would hold data written after the point in time
        already answered.  An error is final: the user (or CO) deletes it and takes a new one.
        """
        if snapshot.state != ERROR:
            return snapshot
        raise FailedPrecondition(f"snapshot {snapshot.name} of volume {snapshot.volume} failed after it was taken "
                                 f"({snapshot.message or 'no reason given'}): it is not taken again at a later "
                                 f"point in time under the same name; delete it (shoalctl snapshot delete "
                                 f"{snapshot.name}) and take a new one")

    def _repeat_failed(self, snapshot: Snapshot) -> Snapshot:
        """A repeat of the create of a snapshot in "error": its agent says whether it was ever taken.

        A copy the agent reports failed was cut, and that cut answered: the failure stands (``_answer``).  One
        the agent does not have (it refused the cut for good, so no point in time was ever answered) is taken
        now (``_retake``), as is one the agent has but the row says failed (an answer lost on the way).
        """
        client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
        failure = _agent_failure(lambda: client.get_snapshot(snapshot.id), snapshot.owner_node, "get_snapshot")
        if failure is None:
            return self._retake(snapshot)
        if failure and not snapshot.message:
            snapshot = replace(snapshot, message=failure)  # (answered, not written: a repeat)
        return snapshot

    def _retake(self, snapshot: Snapshot) -> Snapshot:
        """A failed snapshot no agent took, taken again (a repeat of its create): whatever its agent has of it
        is dropped first (``_repeat_failed`` says when); the new one is cut now."""
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
        it, not when an earlier attempt that failed was asked for.  Only for a snapshot no agent took yet
        (``create`` and reconcile make sure, under the snapshot's lock): one taken answered its point in time.

        The row is written only while it is still this snapshot (same id) in "creating": the callers hold the
        snapshot's lock, which a delete takes too, but a row written from a stale read must never bring back
        a snapshot deleted meanwhile.
        """
        op = op if op is not None else self.service._begin("create_snapshot", snapshot.name, "retry")
        try:
            client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
            snapshot = replace(snapshot, created_at=self.service._clock())
            info = client.create_snapshot(snapshot.id, snapshot.volume_id)
        except Exception as exc:
            error = _error(exc, snapshot.owner_node, "create_snapshot")
            with self.store.transaction():  # temporary: still "creating", a repeat or reconcile sends it again
                if not error.temporary and self._still_creating(snapshot) is not None:
                    self.store.put_snapshot(replace(snapshot, state=ERROR, message=str(error)))
                self.service._end(op, OP_FAILED, str(error))
            raise error from None
        snapshot = self._apply(snapshot, info)
        with self.store.transaction():
            current = self._still_creating(snapshot)
            if current is None:  # deleted (or taken by another call) meanwhile: nothing of it is written back
                self.service._end(op, OP_FAILED, "the snapshot changed meanwhile: not recorded")
                return self.store.get_snapshot(snapshot.name) or snapshot
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

    def _still_creating(self, snapshot: Snapshot) -> Snapshot | None:
        """The row of ``snapshot`` if it is still that snapshot (same id) in "creating", else None."""
        current = self.store.get_snapshot(snapshot.name)
        return current if current is not None and current.id == snapshot.id and current.state == CREATING else None

    def _observe(self, snapshot: Snapshot, *, record: bool = False) -> Snapshot:
        """A "creating" snapshot as its agent sees it now (best effort: the row as it is when unreachable).

        ``record`` false (a read): only looked at, nothing written, nothing started; a read racing a delete
        must not bring the snapshot back.  ``record`` true: the caller holds the snapshot's lock and read its
        row under it (``create``'s repeat, reconcile): what the agent says is recorded, and a snapshot the
        agent never took (the controller stopped, or a temporary failure, before it asked) is taken now; a
        failure taking it is raised.
        """
        try:
            client = self.service._client(snapshot.owner_node, f"holding volume {snapshot.volume}")
            info = client.get_snapshot(snapshot.id)
        except NotFound:  # the agent never took it: only the lock holder asks now
            return self._start(snapshot) if record else snapshot
        except DomainError as exc:
            log.debug("snapshot %s: progress unknown: %s", snapshot.name, exc)
            return snapshot
        updated = self._apply(snapshot, info)
        if record and updated != snapshot:
            with self.store.transaction():
                current = self._still_creating(snapshot)
                if current is None:
                    return self.store.get_snapshot(snapshot.name) or snapshot  # deleted or finished meanwhile
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
                                         "the clone is available, or delete it first")
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

    def clone(self, name: str, source: str, pool: str | None = None, requested_bytes: int = 0, *,
              restart_failed: bool = True) -> Volume:
        """``requested_bytes`` (checked by the caller): recorded on the clone this request makes, or on the one it
        repeats when that has none; never on a clone the request was refused for (another source or pool).

        A clone whose copy failed is ``FailedPrecondition`` saying why (its row says "error").  Its repeat
        starts the copy again unless ``restart_failed`` is false (CSI: the failure is the CO's answer), and
        then only when its agent has no failed copy of it (the agent refused the copy before it began, or a
        controller before this one left a temporary failure "error").
        """
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
                if existing.state == CREATING:  # looked at first: a failed copy is answered, not restarted unseen
                    made, failure = self._look_clone(existing)
                elif restart_failed:
                    made, failure = self._finish_clone(existing)  # "error": the repeat copies it again
                else:
                    made, failure = self._failed_or_finish(existing)
                return self._clone_answer(made, failure, restart_failed)
            origin, origin_id, node_id, disk, size, thin, default_pool = self._source(kind, source_name)
            self._pool_beside(pool or default_pool, node_id, disk, kind, source_name)
            self.service._client(node_id, f"holding {kind} {source_name}")  # healthy, or Unavailable
            _require_placeable(self.service.get_node(node_id), f"clone {name}")
            with self.service._placement_lock, self.store.transaction():
                # Read again in the transaction delete_pool checks in: a pool deleted since is not used.
                pool_record = self._pool_beside(pool or default_pool, node_id, disk, kind, source_name)
                self._check_room(node_id, disk, pool_record, size, thin, name)
                volume = Volume(name, self.service._new_volume_id(), size, pool_record.name, node_id, disk,
                                CREATING, thin, self.service._clock(), source=f"{kind}/{source_name}",
                                requested_bytes=requested_bytes, source_id=origin_id)
                op = self.service._begin("clone_volume", name, f"from {origin} on {node_id}/{disk}")
                self.store.put_volume(volume)
            log.info("volume %s (%s): clone of %s on %s/%s", name, volume.id, origin, node_id, disk)
            return self._clone_answer(*self._finish_clone(volume, op), restart_failed)

    @staticmethod
    def _clone_answer(volume: Volume, failure: str, restart_failed: bool) -> Volume:
        """What ``clone`` answers: the clone, or ``FailedPrecondition`` saying why its copy failed."""
        if volume.state != ERROR:
            return volume
        again = "repeat the clone to copy it again, or delete it" if restart_failed else "delete it and clone again"
        raise FailedPrecondition(f"the copy of clone {volume.name} from {volume.source} failed "
                                 f"({failure or 'no reason given'}): {again}")

    def _failed_or_finish(self, volume: Volume) -> tuple[Volume, str]:
        """A clone in "error" whose failed copy is not to be restarted: (it, why) when its agent reports its
        copy failed; else (its agent has none: a temporary failure before it copied anything, or one it
        finished meanwhile) finished as a repeat would."""
        client = self.service._client(volume.owner_node, f"owning volume {volume.name}")
        failure = _agent_failure(lambda: client.get_volume(volume.id), volume.owner_node, "get_volume")
        if failure is None:
            return self._finish_clone(volume)
        return volume, failure or "the copy failed"

    def finish_clone(self, volume: Volume, op: int | None = None) -> Volume:
        """Ask the owner to make (or tell how far it got with) the clone; record what it says.

        A clone that failed is "creating" again before the agent is asked (the decision first, as everywhere):
        what the agent answers then is recorded, a copy it made at once (a reflink) too.
        """
        return self._finish_clone(volume, op)[0]

    def _finish_clone(self, volume: Volume, op: int | None = None) -> tuple[Volume, str]:
        """``finish_clone``, and why the copy failed ("" unless the agent answered it failed)."""
        op = op if op is not None else self.service._begin("clone_volume", volume.name, "retry")
        kind = volume.source.split("/", 1)[0]
        before = volume.state
        try:
            ids = {"source_snapshot_id" if kind == SNAPSHOT else "source_volume_id": self._source_id(volume)}
            client = self.service._client(volume.owner_node, f"owning volume {volume.name}")
            if volume.state != CREATING:
                volume = replace(volume, state=CREATING)
                self.store.put_volume(volume)
            info = client.clone_volume(volume.id, volume.size_bytes, volume.disk, volume.thin, **ids)
        except Exception as exc:
            error = _error(exc, volume.owner_node, "clone_volume")
            # Temporary (the agent unreachable, busy): as it was, so a clone being made stays "creating", which
            # the repeat and reconcile ask again (its agent does not have it, or reports how far it got); a
            # failed one's repeat that did not reach the agent leaves it "error" (its agent still reports the
            # failed copy: reconcile would only record that again), for the next repeat.  For good: "error",
            # which only a repeat of the clone finishes (or a delete cleans up).
            with self.store.transaction():
                self.store.put_volume(replace(volume, state=before if error.temporary else ERROR))
                self.service._end(op, OP_FAILED, str(error))
            self.progress.pop(volume.name, None)
            raise error from None
        volume = self._record_clone(volume, info)
        failure = str(info.get("message") or "the copy failed") if volume.state == ERROR else ""
        self.service._end(op, OP_DONE if volume.state != ERROR else OP_FAILED,
                          "copying in the background" if volume.state == CREATING else failure or volume.state)
        return volume, failure

    def observe_clone(self, volume: Volume) -> Volume:
        """A clone still "creating" as its agent sees it now (best effort); started if its agent has none."""
        return self._look_clone(volume, best_effort=True)[0]

    def _look_clone(self, volume: Volume, *, best_effort: bool = False) -> tuple[Volume, str]:
        """A clone still "creating" as its agent sees it now, recorded, and why its copy failed ("" unless it
        did).  One its agent does not have (never started, or lost by an agent restart) is started; an agent
        that cannot be reached is ``Unavailable``, or with ``best_effort`` the row as it is."""
        try:
            client = self.service._client(volume.owner_node, f"owning volume {volume.name}")
            info = client.get_volume(volume.id)
        except NotFound:
            return self._finish_clone(volume)
        except DomainError as exc:
            if not best_effort:
                raise
            log.debug("clone %s: progress unknown: %s", volume.name, exc)
            return volume, ""
        except Exception as exc:
            raise _error(exc, volume.owner_node, "get_volume") from None
        volume = self._record_clone(volume, info)
        return volume, str(info.get("message") or "the copy failed") if volume.state == ERROR else ""

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
        """``FailedPrecondition`` while the volume has snapshots, or clones of it being made (``_unfinished_clones``:
        their copy reads this volume, not one made later under its name)."""
        snapshots = [s.name for s in self.store.list_snapshots(volume.name)]
        if snapshots:
            raise FailedPrecondition(f"volume {volume.name} has snapshots ({', '.join(snapshots)}): delete them "
                                     f"first (shoalctl snapshot delete NAME)")
        clones = self._unfinished_clones(VOLUME, volume)
        if clones:
            raise FailedPrecondition(f"volume {volume.name} is being cloned to {', '.join(clones)}: wait until the "
                                     "clone is available, or delete it first")

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
                    if current is None or current.state != CREATING or current.id != snapshot.id:
                        continue
                    try:
                        seen = self._observe(current, record=True)
                    except DomainError as exc:
                        log.warning("reconcile: snapshot %s: %s", snapshot.name, exc)
                        continue
                    if seen.state != CREATING:
                        done.append(_copy_ended("snapshot", snapshot.name, seen.state, seen.message))
            elif snapshot.state == DELETING:
                try_(f"deleted snapshot {snapshot.name}", lambda s=snapshot: self._finish_deleting(s.name))
        for volume in self.store.list_volumes():
            if volume.state == CREATING and volume.source and volume.owner_node in healthy:
                with self.service._volume_locks.hold(volume.name):
                    current = self.store.get_volume(volume.name)
                    if current is None or current.state != CREATING:
                        continue
                    try:
                        seen, failure = self._look_clone(current, best_effort=True)
                        if seen.state != CREATING:
                            done.append(_copy_ended("clone", volume.name, seen.state, failure))
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

    def _source(self, kind: str, source_name: str) -> tuple[str, str, str, str, int, bool, str]:
        """(description, id, node, disk, size, thin, default pool) of a ready source."""
        if kind == SNAPSHOT:
            snapshot = self.store.get_snapshot(source_name)
            if snapshot is None:
                raise NotFound(f"snapshot {source_name} does not exist (shoalctl snapshot list)")
            if snapshot.state == CREATING:
                snapshot = self._observe(snapshot)  # a look only: reconcile records it
            if snapshot.state != READY:
                raise FailedPrecondition(f"snapshot {source_name} is {snapshot.state}"
                                         + (f" ({snapshot.progress:.0%} copied)" if snapshot.state == CREATING
                                            else "") + ": clone it once it is ready")
            volume = self.store.get_volume(snapshot.volume)
            thin = volume.thin if volume is not None else True
            pool = volume.pool if volume is not None else (self.service.settings.default_pool or "default")
            return (f"snapshot {source_name}", snapshot.id, snapshot.owner_node, snapshot.disk, snapshot.size_bytes,
                    thin, pool)
        volume = self.store.get_volume(source_name)
        if volume is None:
            raise NotFound(f"volume {source_name} does not exist (shoalctl volume list)")
        if volume.state not in (AVAILABLE, ATTACHED):
            raise FailedPrecondition(f"volume {source_name} is {volume.state}: only an available or attached "
                                     "volume can be cloned")
        return (f"volume {source_name}", volume.id, volume.owner_node, volume.disk, volume.size_bytes, volume.thin,
                volume.pool)

    def _source_id(self, clone: Volume) -> str:
        """The agent's id of the clone's source: the snapshot or volume it was asked from, or
        ``FailedPrecondition``.

        A source is not deleted while a clone of it is not made (``_unfinished_clones``), but a clone recorded
        before that rule may name a source deleted since, and the name be reused: a source with another id than
        the one the clone recorded is another one, and the clone is never made from it.  (A clone recorded
        before its source's id was, has only times to go by: a source created after it is another one.)
        """
        kind, source_name = clone.source.split("/", 1)
        record = (self.store.get_snapshot(source_name) if kind == SNAPSHOT else self.store.get_volume(source_name))
        if record is None:
            raise FailedPrecondition(f"the {kind} {source_name} clone {clone.name} is made from is gone: delete "
                                     "the clone")
        if not _is_source_of(record, clone):
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
        candidate = placement.candidate(node, disk, self.store.list_volumes(), self.service._grown,
                                        self.store.list_snapshots())
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
        """Clones of ``source`` being made: "creating" (copying, or to be asked again after a temporary failure,
        by their repeat or reconcile), which keep their source as it is.

        A clone in "error" failed for good and keeps nothing: it may never be repeated, and a source held for
        it could never be deleted (nor grown) by a user who gave it up.  Its repeat finds the very snapshot or
        volume it was asked from, or is refused (``_source_id``: gone, or another one of that name).  Clones
        of an earlier object of its name (another id) keep nothing either.
        """
        name = f"{kind}/{source.name}"
        return [v.name for v in self.store.list_volumes()
                if v.source == name and v.state == CREATING and _is_source_of(source, v)]


def _is_source_of(source: Snapshot | Volume, clone: Volume) -> bool:
    """Whether ``source`` (of the name ``clone.source`` names) is the very one the clone was made from: the
    same id.  A clone recorded before ``source_id`` was has only wall-clock times to go by (a source created
    after it is another one), which a clock stepping back can get wrong; those records are the old ones."""
    if clone.source_id:
        return source.id == clone.source_id
    return source.created_at <= clone.created_at


def _require_placeable(node: Node, what: str) -> None:
    """``FailedPrecondition`` unless ``node`` may take new data (``placement.placeable``): a snapshot or clone
    takes room on its source's node as a new volume does, and a fenced node is one the operator has not known
    clean since.  (An unhealthy node is refused before, ``Unavailable``: worth retrying.)"""
    if not placement.placeable(node):
        raise FailedPrecondition(f"node {node.id} is {node.fence or node.health}: no new {what.split()[0]} is made "
                                 f"there ({what} would live beside its source); unfence it first "
                                 "(shoalctl node unfence)")


def _copy_ended(what: str, name: str, state: str, message: str) -> str:
    """Reconcile's line for a copy that ended: finished, or failed and why."""
    if state == ERROR:
        return f"{what} {name} failed copying: {message or 'no reason given'}"
    return f"{what} {name} finished copying"


def _agent_failure(look: Callable[[], dict], node: str, method: str) -> str | None:
    """What an agent says of a copy (``look``: its GetSnapshot or GetVolume): None when it has none (NotFound)
    or not a failed one, else its failure message ("" when it gives none); other errors as domain errors."""
    try:
        info = look()
    except NotFound:
        return None
    except Exception as exc:
        raise _error(exc, node, method) from None
    if _AGENT_STATES.get(str(info.get("state") or "ready"), ERROR) != ERROR:
        return None
    return str(info.get("message") or "")


def _error(exc: Exception, node_id: str, method: str) -> DomainError:
    from controller.domain.service import _as_domain_error

    return _as_domain_error(exc, node_id, method)
