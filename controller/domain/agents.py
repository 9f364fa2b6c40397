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
* ``get_state`` returns ``{"node_id": str, "volumes": [{"volume_id",
  "size_bytes", "disk"}], "exports": [ExportInfo-like dict plus the
  initiators it admits, as "initiators" (a list, one entry per volume) or
  "initiator_iqn" (one entry per volume and initiator)], "attachments":
  [{"volume_id", "device_path", "mode"}], "disks": [...]}``.
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

    def attach_volume(self, export: dict[str, Any], chap_secret: str, mode: str) -> str: ...

    def detach_volume(self, volume_id: str, mode: str) -> None: ...

    def get_state(self) -> dict[str, Any]: ...


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


class FakeAgents:
    """An ``AgentDirectory`` of in-memory agents (see the module docstring)."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgentState] = {}
        self.down: set[str] = set()
        self.failures: list[tuple[str | None, str, DomainError]] = []
        self.calls: list[tuple[str, str, str]] = []  # (node, method, volume_id or "")
        self.before_call: Callable[[str, str, str], None] | None = None  # sees (node, method, volume_id) first

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

    def attach_volume(self, export: dict[str, Any], chap_secret: str, mode: str) -> str:
        volume_id = export["volume_id"]
        self._agents._enter(self._state.node_id, "attach_volume", volume_id)
        have = self._state.attachments.get(volume_id)
        if have is None:
            have = {"volume_id": volume_id, "device_path": f"/dev/fake/{volume_id}", "mode": mode}
            self._state.attachments[volume_id] = have
        return have["device_path"]

    def detach_volume(self, volume_id: str, mode: str) -> None:
        self._agents._enter(self._state.node_id, "detach_volume", volume_id)
        self._state.attachments.pop(volume_id, None)

    def get_state(self) -> dict[str, Any]:
        self._agents._enter(self._state.node_id, "get_state")
        exports = [dict(info, initiator_iqn=iqn) for (_, iqn), info in self._state.exports.items()]
        return {"node_id": self._state.node_id,
                "volumes": [dict(v) for v in self._state.volumes.values()],
                "exports": exports,
                "attachments": [dict(a) for a in self._state.attachments.values()],
                "disks": []}
