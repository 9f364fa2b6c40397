"""The controller's view of node agents: two Protocols, and an in-memory fake of them.

``AgentClient`` is one node agent as the controller drives it; the gRPC
implementation (controller/api) turns agent.proto replies into the shapes
below and gRPC status codes into ``controller.domain.errors`` classes
(UNAVAILABLE and DEADLINE_EXCEEDED into ``Unavailable``).  Every method is
idempotent on the agent side (agent.proto says how), so the controller may
repeat any call after a failure.

``FakeAgents`` is a *boundary fake*: it stands where the gRPC client stands,
so the domain's unit tests run without processes.  It behaves as agent.proto
says an agent behaves (idempotent creates, ALREADY_EXISTS on other
parameters, refusing to delete an exported volume) and lets a test make one
node unreachable, fail the next call of a method, or restart (forget its
exports and attachments).  The real agents are exercised over gRPC by the
integration tests.

Shapes (plain dicts, so this module does not depend on generated code):

* ``export_volume`` returns an ExportInfo-like dict: ``volume_id``,
  ``target_iqn``, ``portals`` (list of "host:port"), ``lun``, ``naa``,
  ``serial``, ``chap_user``.
* ``clone_volume`` and ``get_volume`` return a VolumeInfo-like dict:
  ``volume_id``, ``size_bytes``, ``disk``, ``state`` ("ready", "copying" or
  "error"), ``progress`` (0..1), ``message``; ``create_snapshot`` and
  ``get_snapshot`` a SnapshotInfo-like one: ``snapshot_id``, ``volume_id``,
  ``size_bytes``, ``disk``, ``state``, ``progress``, ``message``, ``method``.
* ``get_state`` returns ``{"node_id": str, "volumes": [{"volume_id",
  "size_bytes", "disk"}], "snapshots": [SnapshotInfo-like dicts],
  "exports": [ExportInfo-like dict plus the
  initiators it admits, as "initiators" (a list, one entry per volume) or
  "initiator_iqn" (one entry per volume and initiator)], "attachments":
  [{"volume_id", "device_path", "mode"}], "disks": [...]}``.
* ``fence_initiator`` returns ``{"volume_ids": [...], "sessions_closed": int,
  "registrations_removed": int, "commands_waited": int}``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from controller.domain.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound, Unavailable
from controller.domain.model import Node


class AgentClient(Protocol):
    """One node agent (agent.proto AgentService)."""

    def create_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool) -> None: ...

    def delete_volume(self, volume_id: str) -> None: ...

    def expand_volume(self, volume_id: str, size_bytes: int) -> None: ...

    def export_volume(self, volume_id: str, initiator_iqn: str, chap_user: str,
                      chap_secret: str) -> dict[str, Any]: ...

    def unexport_volume(self, volume_id: str, initiator_iqn: str) -> None: ...

    def attach_volume(self, export: dict[str, Any], chap_secret: str, mode: str, *,
                      defer_login: bool = False) -> str:
        """The device ("" with ``defer_login``: the agent records the export, its CSI NodeStage logs in)."""
        ...

    def detach_volume(self, volume_id: str, mode: str, *, timeout: float | None = None) -> None:
        """``timeout``: seconds to wait for the agent at most (None: as long as an attach may take)."""
        ...

    def get_state(self) -> dict[str, Any]: ...

    # Snapshots and clones: reflinked at once, or copied in the background ("copying", with a progress).
    def clone_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool, *, source_volume_id: str = "",
                     source_snapshot_id: str = "") -> dict[str, Any]: ...

    def get_volume(self, volume_id: str) -> dict[str, Any]: ...

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> dict[str, Any]: ...

    def get_snapshot(self, snapshot_id: str) -> dict[str, Any]: ...

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def fence_initiator(self, initiator_iqn: str) -> dict[str, Any]:
        """Cut ``initiator_iqn`` off every target of this node; returns once its commands in flight ended."""
        ...


class AgentDirectory(Protocol):
    """Finds the agent of a node (by its registered ``agent_address``)."""

    def client(self, node: Node) -> AgentClient: ...


class _Hidden:
    """Keeps a secret the fake was given out of reprs and assertion rewrites."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"


@dataclass
class FakeAgentState:
    """What one fake agent holds."""

    node_id: str
    portals: tuple[str, ...] = ()
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)        # volume_id -> info
    exports: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (volume_id, iqn) -> info
    secrets: dict[tuple[str, str], _Hidden] = field(default_factory=dict)  # (volume_id, iqn) -> CHAP secret
    attachments: dict[str, dict[str, Any]] = field(default_factory=dict)   # volume_id -> attachment
    luns: dict[str, int] = field(default_factory=dict)                      # volume_id -> LUN number
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)      # snapshot_id -> info


class FakeAgents:
    """An ``AgentDirectory`` of in-memory agents (see the module docstring)."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgentState] = {}
        self.down: set[str] = set()
        self.failures: list[tuple[str | None, str, DomainError]] = []
        self.calls: list[tuple[str, str, str]] = []  # (node, method, volume_id or "")
        self.before_call: Callable[[str, str, str], None] | None = None  # sees (node, method, volume_id) first
        self.copy_steps = 0  # > 0: snapshots and clones copy in the background, done after that many looks

    # Test controls.
    def agent(self, node_id: str) -> FakeAgentState:
        return self.agents.setdefault(node_id, FakeAgentState(node_id))

    def fail_next(self, method: str, error: DomainError | None = None, node: str | None = None) -> None:
        """Make the next call of ``method`` (on ``node``, or any node) raise ``error``."""
        self.failures.append((node, method, error or Unavailable("fake agent: connection refused")))

    def restart(self, node_id: str) -> None:
        """The agent restarted without restoring its exports or attachments (volumes are on disk)."""
        state = self.agent(node_id)
        state.exports.clear()
        state.secrets.clear()
        state.attachments.clear()

    def secret_for(self, node_id: str, volume_id: str, iqn: str) -> str:
        return self.agent(node_id).secrets[(volume_id, iqn)].value

    def fail_copy(self, node_id: str, item_id: str, message: str = "copy failed: Input/output error") -> None:
        """A background copy (of snapshot or clone ``item_id``) on ``node_id`` fails."""
        state = self.agent(node_id)
        item = state.snapshots.get(item_id) or state.volumes[item_id]
        item.update(state="error", message=message, progress=0.0)

    def count(self, method: str, node: str | None = None) -> int:
        return sum(1 for n, m, _ in self.calls if m == method and node in (None, n))

    # AgentDirectory.
    def client(self, node: Node) -> "FakeAgentClient":
        state = self.agent(node.id)
        state.portals = node.portals
        return FakeAgentClient(self, state)

    def _enter(self, node_id: str, method: str, volume_id: str = "") -> None:
        self.calls.append((node_id, method, volume_id))
        if self.before_call is not None:
            self.before_call(node_id, method, volume_id)
        if node_id in self.down:
            raise Unavailable(f"agent of node {node_id} is unreachable (fake)")
        for i, (node, name, error) in enumerate(self.failures):
            if name == method and node in (None, node_id):
                del self.failures[i]
                raise error


class FakeAgentClient:
    """One fake agent, following agent.proto's idempotency rules."""

    def __init__(self, agents: FakeAgents, state: FakeAgentState):
        self._agents = agents
        self._state = state

    def create_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool) -> None:
        self._agents._enter(self._state.node_id, "create_volume", volume_id)
        have = self._state.volumes.get(volume_id)
        if have is not None:
            if (have["size_bytes"], have["disk"]) != (size_bytes, disk):
                raise AlreadyExists(f"volume {volume_id} exists with other parameters")
            return
        self._state.volumes[volume_id] = {"volume_id": volume_id, "size_bytes": size_bytes, "disk": disk,
                                          "thin": thin}

    def delete_volume(self, volume_id: str) -> None:
        self._agents._enter(self._state.node_id, "delete_volume", volume_id)
        if any(v == volume_id for v, _ in self._state.exports):
            raise FailedPrecondition(f"volume {volume_id} is exported")
        self._state.volumes.pop(volume_id, None)
        self._state.luns.pop(volume_id, None)

    def expand_volume(self, volume_id: str, size_bytes: int) -> None:
        self._agents._enter(self._state.node_id, "expand_volume", volume_id)
        have = self._state.volumes.get(volume_id)
        if have is None:
            raise NotFound(f"volume {volume_id} not found")
        have["size_bytes"] = max(have["size_bytes"], size_bytes)

    def export_volume(self, volume_id: str, initiator_iqn: str, chap_user: str,
                      chap_secret: str) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "export_volume", volume_id)
        if volume_id not in self._state.volumes:
            raise NotFound(f"volume {volume_id} not found")
        lun = self._state.luns.setdefault(volume_id, len(self._state.luns))
        info = {"volume_id": volume_id, "target_iqn": f"iqn.2024-01.io.shoal:{self._state.node_id}",
                "portals": list(self._state.portals), "lun": lun,
                "naa": "6" + hashlib.sha256(volume_id.encode()).hexdigest()[:31],
                "serial": volume_id[:64], "chap_user": chap_user}
        self._state.exports[(volume_id, initiator_iqn)] = info
        self._state.secrets[(volume_id, initiator_iqn)] = _Hidden(chap_secret)
        return dict(info)

    def unexport_volume(self, volume_id: str, initiator_iqn: str) -> None:
        self._agents._enter(self._state.node_id, "unexport_volume", volume_id)
        self._state.exports.pop((volume_id, initiator_iqn), None)
        self._state.secrets.pop((volume_id, initiator_iqn), None)

    def attach_volume(self, export: dict[str, Any], chap_secret: str, mode: str, *,
                      defer_login: bool = False) -> str:
        volume_id = export["volume_id"]
        self._agents._enter(self._state.node_id, "attach_volume", volume_id)
        have = self._state.attachments.get(volume_id)
        if have is None:
            have = {"volume_id": volume_id, "device_path": "", "mode": mode}
            self._state.attachments[volume_id] = have
        if not defer_login and not have["device_path"]:
            have["device_path"] = f"/dev/fake/{volume_id}"
        return have["device_path"]

    def detach_volume(self, volume_id: str, mode: str, *, timeout: float | None = None) -> None:
        self._agents._enter(self._state.node_id, "detach_volume", volume_id)
        self._state.attachments.pop(volume_id, None)

    def clone_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool, *, source_volume_id: str = "",
                     source_snapshot_id: str = "") -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "clone_volume", volume_id)
        source = ("snapshot:" + source_snapshot_id) if source_snapshot_id else source_volume_id
        # The clone first, as the agent: a repeat of one made before is answered whatever became of its source.
        have = self._state.volumes.get(volume_id)
        if have is not None:
            if (have["size_bytes"], have["disk"], have.get("source")) != (size_bytes, disk, source):
                raise AlreadyExists(f"volume {volume_id} exists with other parameters")
            if have["state"] != "error":
                return self._look(have)
        if source_snapshot_id and self._state.snapshots.get(source_snapshot_id, {}).get("state") != "ready":
            raise NotFound(f"snapshot {source_snapshot_id} not found (or not ready)")
        if source_volume_id and source_volume_id not in self._state.volumes:
            raise NotFound(f"volume {source_volume_id} not found")
        if have is not None:  # its copy failed: a repeat starts it again
            self._start_copy(have)
            return self._look(have)
        have = {"volume_id": volume_id, "size_bytes": size_bytes, "disk": disk, "thin": thin, "source": source}
        self._start_copy(have)
        self._state.volumes[volume_id] = have
        return dict(have)

    def get_volume(self, volume_id: str) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "get_volume", volume_id)
        have = self._state.volumes.get(volume_id)
        if have is None:
            raise NotFound(f"volume {volume_id} not found")
        return self._look(have)

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "create_snapshot", volume_id)
        have = self._state.snapshots.get(snapshot_id)
        if have is not None:
            if have["volume_id"] != volume_id:
                raise AlreadyExists(f"snapshot {snapshot_id} is of another volume")
            return self._look(have)
        volume = self._state.volumes.get(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} not found")
        have = {"snapshot_id": snapshot_id, "volume_id": volume_id, "size_bytes": volume["size_bytes"],
                "disk": volume["disk"]}
        self._start_copy(have)
        self._state.snapshots[snapshot_id] = have
        return dict(have)

    def get_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "get_snapshot", snapshot_id)
        have = self._state.snapshots.get(snapshot_id)
        if have is None:
            raise NotFound(f"snapshot {snapshot_id} not found")
        return self._look(have)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._agents._enter(self._state.node_id, "delete_snapshot", snapshot_id)
        if any(v.get("source") == "snapshot:" + snapshot_id and v.get("state") == "copying"
               for v in self._state.volumes.values()):
            raise FailedPrecondition(f"snapshot {snapshot_id} is being cloned")
        self._state.snapshots.pop(snapshot_id, None)

    def fence_initiator(self, initiator_iqn: str) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "fence_initiator")
        gone = sorted(volume_id for volume_id, iqn in self._state.exports if iqn == initiator_iqn)
        for volume_id in gone:
            self._state.exports.pop((volume_id, initiator_iqn), None)
            self._state.secrets.pop((volume_id, initiator_iqn), None)
        return {"volume_ids": gone, "sessions_closed": 0, "registrations_removed": 0, "commands_waited": 0}

    def _start_copy(self, item: dict[str, Any]) -> None:
        steps = self._agents.copy_steps
        item.update(state="copying" if steps else "ready", progress=0.0 if steps else 1.0, message="",
                    steps_left=steps, method="copy" if steps else "reflink")

    def _look(self, item: dict[str, Any]) -> dict[str, Any]:
        """One look at a copy: it moves on a step (the fake's clock is being looked at)."""
        if item.get("state") == "copying":
            item["steps_left"] -= 1
            total = self._agents.copy_steps or 1
            if item["steps_left"] <= 0:
                item.update(state="ready", progress=1.0)
            else:
                item["progress"] = 1 - item["steps_left"] / total
        return {k: v for k, v in item.items() if k != "steps_left"}

    def get_state(self) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "get_state")
        exports = [dict(info, initiator_iqn=iqn) for (_, iqn), info in self._state.exports.items()]
        return {"node_id": self._state.node_id,
                "volumes": [dict(v) for v in self._state.volumes.values()],
                "exports": exports,
                "attachments": [dict(a) for a in self._state.attachments.values()],
                "snapshots": [{k: v for k, v in s.items() if k != "steps_left"}
                              for s in self._state.snapshots.values()],
                "disks": []}
