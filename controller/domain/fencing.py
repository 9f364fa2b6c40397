"""Fencing a node: cutting its initiator off every target that exports to it, before its volumes move.

A fence of node N (``shoalctl node fence N``, or the controller's loop once N is silent for longer than
``fence_grace``):

1. N's record says "fencing" (with when and why) in the same store transaction that any attach to N
   re-reads, so from then on nothing is published to N;
2. attaches to N already under way are waited for (their volumes' locks);
3. every owner of a volume exported to N runs ``FenceInitiator(N's IQN)``: N leaves every ACL, its
   sessions close, its persistent-reservation registrations go (as PREEMPT AND ABORT), and the agent
   answers once N's commands in flight have completed or been aborted;
4. once every owner has answered, N's attachments are "fenced" (no longer writers: the volumes may be
   published elsewhere), its export records go, and N is "fenced".

An owner that cannot be reached leaves N "fencing", with a step saying so; ``retry`` (the loop) calls the
owners that have not answered yet.  The owners to ask are those of N's attachments and export records (an
export record outlives a detach that could not reach the owner: ``ControllerService.detach_volume``), and every
owner with a "not yet" step, even once no record names it any more: a record going (a detach, forced or not)
does not make its owner stop admitting N; only the owner's answer does.  Each owner's answer is one step
(``Node.fence_steps``) and one line of the operations log.  N itself, as the owner of volumes attached to it,
is asked too: a fence by hand of a node that still runs must cut its own sessions to its own targets before
those volumes go elsewhere.  If N cannot be reached, its own volumes stay attached to it (their data is on N:
no other node could use them before N answers anyway) while the rest of the fence completes; a repeat of the
fence, or the loop, asks N again, and once it answers those attachments are fenced too.

``unfence`` (only of a fenced node) forgets N's fenced attachments and lets N back in; N's agent is asked to
detach them, but not waited for longer than ``FORGET_WAIT`` in all.  While N is fenced, its heartbeats are
accepted and answered with the volumes whose attachments it should drop (its agent drops them off its heartbeat
thread, so its heartbeats go on while a drop waits on a session that was cut off).
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING

from controller.domain import validation as check
from controller.domain.errors import DomainError, FailedPrecondition
from controller.domain.model import (ATTACHED, AVAILABLE, FENCE_DONE, FENCED, FENCING, OP_DONE, OP_FAILED, Node)

if TYPE_CHECKING:
    from controller.domain.service import ControllerService

log = logging.getLogger("shoal.controller.fencing")

DONE_MARK = ": fenced"
#: Seconds an unfence waits, for all its fenced attachments together, for the node's agent to forget them.  Best
#: effort: the agent was told to drop them with every heartbeat while fenced, and a drop of a volume whose owner
#: cut the node off waits until its session's reconnect gives up (30 s for a userspace one, open-iscsi's
#: replacement timeout for a kernel one): waiting for that would hold the unfence, and the agent's threads,
#: for as long.  An agent that did not answer in time goes on with the detach it was asked for.
FORGET_WAIT = 5.0


class Fencing:
    def __init__(self, service: "ControllerService"):
        self.service = service
        self.store = service.store
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _node_lock(self, node_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(node_id, threading.Lock())

    # ---- the API -----------------------------------------------------------------------------

    def fence(self, node_id: str, reason: str = "") -> Node:
        """Fence ``node_id`` (see the module docstring); the node as it is after this attempt.

        A repeat of a fenced node returns it; of a node still fencing, tries the missing owners again.
        """
        node_id = check.node_id(node_id)
        reason = check.line(reason or "shoalctl node fence", "fence reason", limit=500)
        with self._node_lock(node_id):
            with self.store.transaction():
                node = self.service.get_node(node_id)
                if node.fence == FENCE_DONE and not _self_pending(node):
                    return node
                if not node.fence:
                    node = replace(node, fence=FENCING, fence_since=self.service._clock(), fence_reason=reason,
                                   fence_steps=())
                    self.store.put_node(node)
                    self.service._end(self.service._begin("fence_requested", node_id, reason), OP_DONE, "fencing")
            log.warning("fencing node %s: %s", node_id, node.fence_reason)
            return self._attempt(node_id)

    def retry(self) -> list[str]:
        """Fence nodes silent for longer than ``fence_grace`` (when set), and try again the owners of every
        node still fencing; one line per node that changed.

        Silence is what this process measured on its monotonic clock (``ControllerService._silence``): never
        more than it has been watching, so a restarted controller, a new leader or a resumed one does not fence
        every node whose last heartbeat it stored (or received) before the gap, nor a step of the wall clock.
        """
        lines = []
        grace = self.service.settings.fence_grace
        for node in self.store.list_nodes():
            silent = self.service._silence(node)
            try:
                if not node.fence and grace and silent > grace:
                    done = self.fence(node.id, f"no heartbeat for {silent:.0f} s (fence grace {grace:g} s)")
                elif node.fence == FENCING:
                    done = self.fence(node.id)
                elif node.fence == FENCE_DONE and _self_pending(node):  # its own volumes: ask it again
                    done = self.fence(node.id)
                    if _self_pending(done):
                        continue
                else:
                    continue
            except DomainError as exc:  # the store, most likely: the next pass tries again
                log.warning("fencing node %s: %s", node.id, exc)
                continue
            lines.append(f"node {node.id} is {done.fence}")
        return lines

    def unfence(self, node_id: str) -> Node:
        """Let a fenced node back in; its fenced attachments are forgotten (detached there if it answers)."""
        node_id = check.node_id(node_id)
        with self._node_lock(node_id):
            node = self.service.get_node(node_id)
            if node.fence != FENCE_DONE:
                state = "still being fenced" if node.fence else "not fenced"
                raise FailedPrecondition(f"node {node_id} is {state}: only a fenced node can be unfenced"
                                         + (f" ({_pending(node)})" if node.fence else ""))
            ends = self.service._monotonic() + FORGET_WAIT
            for attachment in self.store.list_attachments(node=node_id):
                if attachment.state != FENCED:
                    continue
                with self.service._volume_locks.hold(attachment.volume):
                    self._forget_on_node(node, attachment, ends - self.service._monotonic())
                    self.store.delete_attachment(attachment.volume, node_id)
            with self.store.transaction():
                node = replace(self.service.get_node(node_id), fence="", fence_since=0.0, fence_reason="",
                               fence_steps=())
                self.store.put_node(node)
                self.service._end(self.service._begin("unfence_node", node_id), OP_DONE)
        log.warning("node %s unfenced: it may be published to again", node_id)
        return node

    def drop_list(self, node: Node) -> list[str]:
        """Volume ids a fenced node's agent should forget (its attachments there are fenced)."""
        if node.fence != FENCE_DONE:
            return []
        ids = []
        for attachment in self.store.list_attachments(node=node.id):
            volume = self.store.get_volume(attachment.volume)
            if attachment.state == FENCED and volume is not None:
                ids.append(volume.id)
        return ids

    # ---- one attempt ---------------------------------------------------------------------------

    def _attempt(self, node_id: str) -> Node:
        node = self.service.get_node(node_id)
        names = sorted({a.volume for a in self.store.list_attachments(node=node_id)}
                       | {e.volume for e in self.store.list_exports() if e.initiator_iqn == node.initiator_iqn})
        with ExitStack() as held:  # attaches to the node already under way finish first
            for name in names:
                held.enter_context(self.service._volume_locks.hold(name))
            steps = {line.split(":", 1)[0]: line for line in node.fence_steps}
            owners: dict[str, list[str]] = {}
            for name in names:
                volume = self.store.get_volume(name)
                if volume is not None:
                    owners.setdefault(volume.owner_node, []).append(name)
            # An owner asked before that has not answered is asked again, whether or not a record names it now:
            # the records that made it one may be gone meanwhile (a detach, forced or not, or reconcile), but not
            # what the owner admits: only its own answer says it no longer admits N.
            for owner, line in steps.items():
                if not line.startswith(owner + DONE_MARK):
                    owners.setdefault(owner, [])
            missing = []
            for owner, volumes in sorted(owners.items()):
                if steps.get(owner, "").startswith(owner + DONE_MARK):
                    continue  # answered in an earlier attempt
                steps[owner] = self._fence_at(node, owner, volumes)
                if not steps[owner].startswith(owner + DONE_MARK) and owner != node_id:
                    missing.append(owner)
            if node_id in owners and not steps[node_id].startswith(node_id + DONE_MARK):
                names = [n for n in names if n not in owners[node_id]]  # still its own: see the docstring
            with self.store.transaction():
                node = replace(self.service.get_node(node_id), fence_steps=tuple(steps.values()))
                if not missing:
                    node = replace(node, fence=FENCE_DONE)
                    self._cut_off(node, names)
                self.store.put_node(node)
        if missing:
            log.warning("node %s is still fencing: %s", node_id, _pending(node))
        else:
            log.warning("node %s is fenced (%d volume(s), owners: %s)", node_id, len(names),
                        ", ".join(sorted(owners)) or "none")
        return node

    def _fence_at(self, node: Node, owner: str, volumes: list[str]) -> str:
        """One owner's step: what it did, or why it did not."""
        held = ", ".join(volumes) or f"volumes exported to {node.id} when it was asked before"
        op = self.service._begin("fence_initiator", node.id, f"at {owner} ({held})")
        try:
            client = self.service._client(owner, f"owning {held}")
            done = client.fence_initiator(node.initiator_iqn)
        except DomainError as exc:
            line = f"{owner}: not yet: {exc}"
            if owner == node.id and volumes:
                line += f" ({', '.join(volumes)} stay attached to it: their data is there)"
            self.service._end(op, OP_FAILED, line)
            return line
        line = (f"{owner}{DONE_MARK}: {len(done.get('volume_ids', ()))} target(s) no longer admit "
                f"{node.initiator_iqn}, {done.get('sessions_closed', 0)} session(s) closed, "
                f"{done.get('registrations_removed', 0)} reservation registration(s) removed, "
                f"{done.get('commands_waited', 0)} command(s) in flight ended")
        self.service._end(op, OP_DONE, line)
        return line

    def _cut_off(self, node: Node, names: list[str]) -> None:
        """Inside the final transaction: N's attachments are fenced, its export records go."""
        for name in names:
            attachment = self.store.get_attachment(name, node.id)
            if attachment is not None and attachment.state != FENCED:
                self.store.put_attachment(replace(attachment, state=FENCED))
            self.store.delete_export(name, node.initiator_iqn)
            volume = self.store.get_volume(name)
            if volume is not None and volume.state == ATTACHED and not any(
                    a.writer for a in self.store.list_attachments(volume=name)):
                self.store.put_volume(replace(volume, state=AVAILABLE))
        self.service._end(self.service._begin("fence_node", node.id), OP_DONE,
                          f"fenced; {len(names)} attachment(s) fenced")

    def _forget_on_node(self, node: Node, attachment, wait: float) -> None:
        """Best effort: the unfenced node's agent forgets the attachment (its session is gone anyway), if it
        answers within ``wait`` seconds (what is left of ``FORGET_WAIT``); not asked once that is spent."""
        volume = self.store.get_volume(attachment.volume)
        if volume is None:
            return
        if wait <= 0:
            log.info("unfence %s: %s not detached there (its agent did not answer the detaches before in time); "
                     "its heartbeat no longer names it", node.id, attachment.volume)
            return
        try:
            self.service._client(node.id, "being unfenced").detach_volume(volume.id, attachment.mode,
                                                                          timeout=wait)
        except DomainError as exc:
            log.info("unfence %s: %s not detached there (%s); its heartbeat no longer names it", node.id,
                     attachment.volume, exc)


def _self_pending(node: Node) -> bool:
    """The fenced node has not yet cut its own sessions to the targets of its own volumes."""
    return any(line.startswith(node.id + ": not yet: ") for line in node.fence_steps)


def _pending(node: Node) -> str:
    waiting = [line for line in node.fence_steps if ": not yet: " in line]
    return "; ".join(waiting) or "no owner answered yet"
