"""One reconcile pass: desired state (the store) against observed state (each agent's GetState).

Repairs, each under the volume's lock and re-checked against the store first:

* a volume row left "creating" (the controller stopped mid-create) is created;
* a volume row left "deleting" is deleted (exports first);
  (both only once the owner is healthy; rows in "error" wait for a repeat of
  create, or a delete, by whoever asked);
* an attachment left "detaching" is detached;
* an export that should exist (an attachment in any state but "fenced") but the owner does
  not report (its agent restarted without restoring it) is exported again;
* an export the owner reports, or the store records (a detach that could not reach the owner keeps the
  record), that no attachment wants is removed: the owner drops it, then the record goes; one of a volume the
  controller does not know as the node's (its state was lost, or restored from an older copy) only while the
  agent no longer holds the volume: otherwise it is logged and kept, since a consumer may be using it;
* a volume smaller on its agent than recorded (an expand that failed
  temporarily) is grown;
* snapshots and clones still being copied are looked at (progress, and the
  end of the copy), snapshots left "deleting" are deleted
  (``Snapshots.reconcile``).

Agents that cannot be reached are skipped: the next pass tries again.
Volumes (and snapshots) an agent holds that the controller does not know are
only logged, never deleted, nor their exports removed: data, and the sessions
using it, are not thrown away on a guess.  A volume its agent reports in state
"error" (its record damaged, its image missing) is reported with the agent's
message, never re-exported or grown: the agent refuses both until someone
repairs or deletes it, and each refused attempt would be one more operation.
Such a standing condition (and a volume, or a ready snapshot, missing on its
node, or in error there) is logged at its level once,
again every ``REPEAT_STANDING`` seconds while it lasts, and at once if it comes
back after a pass without it; the passes between log it at debug level (a pass
runs every few seconds).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from controller.domain.errors import DomainError
from controller.domain.model import (ATTACHED, AVAILABLE, CREATING, DELETING, DETACHING, HEALTHY,
                                     OP_STARTED, READY, Node)

if TYPE_CHECKING:
    from controller.domain.service import ControllerService

log = logging.getLogger("shoal.controller.reconcile")

REPEAT_STANDING = 3600.0  # seconds between two log lines at its own level about one standing condition
RETRY_AT_ONCE = 2  # failures of one repair in a row retried on the next passes; then it backs off
RETRY_DELAY, RETRY_DELAY_MAX = 10.0, 300.0  # seconds: the first back-off, doubled each further failure, and cap
AGENT_ERROR = "error"  # the agent's state of a volume it holds but cannot serve (agent.proto VolumeInfo.state)


class Reconciler:
    def __init__(self, service: "ControllerService"):
        self.service = service
        self.store = service.store
        self.repaired: list[str] = []
        self._seen: set[tuple] = set()  # standing conditions found in this pass
        self._tried: set[str] = set()  # repairs that failed, or wait for their next try, in this pass

    def run(self) -> list[str]:
        self._finish_rows()
        skipped = set()
        for node in self.service.list_nodes():
            if node.health != HEALTHY:
                skipped.add(node.id)
                continue
            try:
                observed = self.service.agents.client(node).get_state()
            except DomainError as exc:
                log.warning("reconcile: node %s: %s", node.id, exc)
                skipped.add(node.id)
                continue
            self._reconcile_node(node, observed)
        standing = self.service._standing
        for key in list(standing):
            if key not in self._seen and key[0] not in skipped:  # gone: if it comes back, it is news again
                del standing[key]
        failures = self.service._repair_failures
        for what in list(failures):
            if what not in self._tried:  # not needed any more (or its node was skipped): forget its failures
                del failures[what]
        return self.repaired

    def _report_standing(self, key: tuple, level: int, message: str, *args: Any) -> None:
        """Log a standing condition (``key``: node id first) at ``level`` when it is news, debug otherwise."""
        self._seen.add(key)
        now = self.service._monotonic()
        last = self.service._standing.get(key)
        if last is None or now - last >= REPEAT_STANDING:
            self.service._standing[key] = now
            log.log(level, message, *args)
        else:
            log.debug(message, *args)

    def _try(self, what: str, action) -> None:
        """Run one repair; it counts unless it fails or returns False (someone else finished it meanwhile).

        A repair that keeps failing (an agent that refuses a delete, say) is retried on the next passes, then
        less and less often (``RETRY_DELAY`` doubling up to ``RETRY_DELAY_MAX``): each attempt writes an
        operation (and, under Kubernetes, its Event), and a retry every pass would wear the operations log
        out in an hour.  Any success, or a repair no longer needed, forgets its failures."""
        failures = self.service._repair_failures
        now = self.service._monotonic()
        count, not_before = failures.get(what, (0, 0.0))
        if now < not_before:
            self._tried.add(what)
            return
        try:
            done = action()
        except DomainError as exc:
            count += 1
            delay = 0.0 if count <= RETRY_AT_ONCE else min(RETRY_DELAY * 2 ** (count - RETRY_AT_ONCE - 1),
                                                            RETRY_DELAY_MAX)
            failures[what] = (count, now + delay)
            self._tried.add(what)
            log.warning("reconcile: %s failed%s: %s", what,
                        f" ({count} times in a row; next try in {delay:g} s)" if delay else "", exc)
        else:
            failures.pop(what, None)
            if done is not False:
                self.repaired.append(what)

    # Rows a failure or a stop left in a transitional state.
    def _finish_rows(self) -> None:
        healthy = {n.id for n in self.service.list_nodes() if n.health == HEALTHY}
        for volume in self.store.list_volumes():
            if volume.owner_node not in healthy:
                continue  # the next pass after its heartbeats resume
            if volume.state == CREATING and volume.source:
                continue  # a clone: its copy is looked at below (snapshots.reconcile)
            if volume.state == CREATING:
                self._try(f"created volume {volume.name} on {volume.owner_node}/{volume.disk}",
                          lambda v=volume: self._create(v.name))
            elif volume.state == DELETING:
                self._try(f"deleted volume {volume.name}", lambda v=volume: self._delete(v.name))
        self.repaired.extend(self.service._snapshots.reconcile(self._try))
        for attachment in self.store.list_attachments():
            if attachment.state == DETACHING:
                self._try(f"detached volume {attachment.volume} from {attachment.node}",
                          lambda a=attachment: self.service.detach_volume(a.volume, a.node))

    def _create(self, name: str) -> bool:
        with self.service._volume_locks.hold(name):  # a create in flight holds it: wait, then look again
            volume = self.store.get_volume(name)
            if volume is None or volume.state != CREATING:
                return False
            self.service._finish_create(volume)
            return True

    def _delete(self, name: str) -> bool:
        with self.service._volume_locks.hold(name):
            volume = self.store.get_volume(name)
            if volume is None or volume.state != DELETING or self.store.list_attachments(volume=name):
                return False
            op = self.store.record_operation(self.service._clock(), "delete_volume", name, OP_STARTED,
                                             "reconcile")
            self.service._finish_delete(volume, op)
            return True

    # One agent's observed state.
    def _reconcile_node(self, node: Node, observed: dict[str, Any]) -> None:
        owned = {v.id: v for v in self.store.list_volumes() if v.owner_node == node.id}
        seen = {(e["volume_id"], iqn) for e in observed.get("exports", ()) for iqn in _initiators(e)}
        # Volumes the agent holds in "error", with its message: reported below, neither re-exported nor grown.
        broken = {str(v["volume_id"]): str(v.get("message") or "")
                  for v in observed.get("volumes", ()) if v.get("state") == AGENT_ERROR}
        for key in sorted(self._wanted(owned) - seen):
            if key[0] in broken:
                continue
            volume = owned[key[0]]
            self._try(f"re-exported volume {volume.name} to {key[1]}",
                      lambda v=volume, iqn=key[1]: self._reexport(v.name, iqn))
        sizes = {v["volume_id"]: int(v.get("size_bytes", 0)) for v in observed.get("volumes", ())}
        # Export records nobody wants any more are the owner's to drop too, reported or not: a detach that could
        # not reach the owner kept the record (the owner may still admit the node) until the owner confirms.
        recorded = {(v.id, e.initiator_iqn) for v in owned.values() for e in self.store.list_exports(v.name)}
        for volume_id, iqn in sorted((seen | recorded) - self._wanted(owned)):
            if volume_id in owned:
                name = owned[volume_id].name
            elif volume_id in sizes:
                self._report_standing((node.id, "unknown export", volume_id, iqn), logging.WARNING,
                               "reconcile: node %s exports volume id %s, which the controller does not know there, "
                               "to %s: kept (a consumer may be using it; was the controller's state lost?)", node.id,
                               volume_id, iqn)
                continue
            else:
                name = f"(unknown id {volume_id}, gone from the node)"
            self._try(f"removed export of volume {name} to {iqn}",
                      lambda vid=volume_id, iqn=iqn: self._unexport(node, vid, iqn))
        for volume_id, size in sorted(sizes.items()):
            volume = owned.get(volume_id)
            if volume is None:
                self._report_standing((node.id, "unknown volume", volume_id), logging.WARNING,
                               "reconcile: node %s holds volume id %s that the controller does not know", node.id,
                               volume_id)
            elif volume.state in (AVAILABLE, ATTACHED) and 0 < size < volume.size_bytes and volume_id not in broken:
                self._try(f"expanded volume {volume.name} to {volume.size_bytes} bytes",
                          lambda v=volume: self._expand(v.name))
        for volume in owned.values():
            if volume.state not in (AVAILABLE, ATTACHED):
                continue
            why = broken.get(volume.id, "")
            # The agent's message in the key: a volume whose error changes (its image put back, its record
            # still damaged) is news again.
            if volume.id in broken and sizes.get(volume.id):  # its image is there, the agent cannot serve it
                self._report_standing((node.id, "volume in error", volume.id, why), logging.ERROR,
                                      "reconcile: volume %s (%s) is in error on its node %s: %s; it is not exported "
                                      "again or grown until it is repaired there (or deleted)", volume.name,
                                      volume.id, node.id, why or "the agent gives no reason")
            # Size 0: no volume has it; the agent lists a record whose image is missing (an "error" volume):
            # missing as well, not a volume to grow, and the agent's message says where the image should be.
            elif not sizes.get(volume.id):
                self._report_standing((node.id, "missing volume", volume.id, why), logging.ERROR,
                                      "reconcile: volume %s (%s) is missing on its node %s%s", volume.name, volume.id,
                                      node.id, f": {why}" if why else "")
        self._compare_snapshots(node, observed)

    def _compare_snapshots(self, node: Node, observed: dict[str, Any]) -> None:
        """Snapshots as for volumes: a ready one missing on its node (clones of it would fail, CSI says it is
        ready to use) is logged at ERROR, one the node holds that the controller does not know at WARNING;
        neither is changed (a snapshot is data, and the report says what is wrong, not a guess what to do).
        Those still being copied or deleted are ``Snapshots.reconcile``'s."""
        held = {str(s.get("snapshot_id")) for s in observed.get("snapshots", ())}
        known = {s.id: s for s in self.store.list_snapshots() if s.owner_node == node.id}
        for snapshot_id in sorted(held - set(known)):
            self._report_standing((node.id, "unknown snapshot", snapshot_id), logging.WARNING,
                                  "reconcile: node %s holds snapshot id %s that the controller does not know",
                                  node.id, snapshot_id)
        for snapshot in known.values():
            if snapshot.state == READY and snapshot.id not in held:
                self._report_standing((node.id, "missing snapshot", snapshot.id), logging.ERROR,
                                      "reconcile: snapshot %s (%s) of volume %s is missing on its node %s",
                                      snapshot.name, snapshot.id, snapshot.volume, node.id)

    def _wanted(self, owned: dict) -> set[tuple[str, str]]:
        """(volume id, initiator IQN) the owner should export: every attachment, detaching ones included
        (the consumer may still be flushing); never to a fenced attachment or node."""
        wanted = set()
        for volume_id, volume in owned.items():
            for attachment in self.store.list_attachments(volume=volume.name):
                consumer = self.store.get_node(attachment.node)
                if consumer is not None and attachment.writer and not consumer.fenced:
                    wanted.add((volume_id, consumer.initiator_iqn))
        return wanted

    def _reexport(self, name: str, iqn: str) -> None:
        with self.service._volume_locks.hold(name):
            volume = self.store.get_volume(name)
            consumer = next((n for n in self.store.list_nodes() if n.initiator_iqn == iqn), None)
            attachment = self.store.get_attachment(name, consumer.id) if consumer is not None else None
            if volume is None or attachment is None or not attachment.writer or consumer.fenced:
                return
            self.service._export(volume, consumer, self.service._chap(volume))

    def _unexport(self, node: Node, volume_id: str, iqn: str) -> None:
        volume = next((v for v in self.store.list_volumes() if v.id == volume_id), None)
        if volume is None:
            self.service.agents.client(node).unexport_volume(volume_id, iqn)
            return
        with self.service._volume_locks.hold(volume.name):
            if (volume_id, iqn) in self._wanted({volume_id: volume}):
                return  # attached meanwhile
            self.service.agents.client(node).unexport_volume(volume_id, iqn)
            self.store.delete_export(volume.name, iqn)

    def _expand(self, name: str) -> None:
        """Finish an expand that failed for a while.  One the agent now refuses for good (no room left on a
        thick volume's disk, say) puts the record back to the agent's size, as ``expand_volume`` does: else
        every pass would ask again for a size it will not get, and the capacity would stay promised."""
        service = self.service
        with service._volume_locks.hold(name):
            volume = self.store.get_volume(name)
            if volume is None:
                return
            try:
                service._client(volume.owner_node, f"owning volume {name}").expand_volume(volume.id,
                                                                                          volume.size_bytes)
            except Exception as exc:
                from controller.domain.service import _as_domain_error  # (service imports this module)

                error = _as_domain_error(exc, volume.owner_node, "expand_volume")
                if not error.temporary:
                    back = service._size_on_agent(volume, volume.size_bytes)
                    if back.size_bytes != volume.size_bytes:
                        with service._placement_lock, self.store.transaction():
                            service._record_size(volume, back)
                        log.warning("reconcile: volume %s cannot grow to %d bytes (%s): its record goes back to "
                                    "the %d bytes its node has", name, volume.size_bytes, error, back.size_bytes)
                raise error from None


def _initiators(export: dict[str, Any]) -> list[str]:
    """The initiators an observed export admits: ``initiators`` (a list) or ``initiator_iqn`` (one)."""
    if export.get("initiators"):
        return list(export["initiators"])
    return [export["initiator_iqn"]] if export.get("initiator_iqn") else []
