"""``MemoryStore``: the ``StateStore`` in dictionaries, for tests and throwaway controllers.

A transaction copies the tables when it starts and puts the copy back if it
fails, so it has the same all-or-nothing behaviour as SQLite.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from controller.domain.model import Attachment, ChapCredential, Export, Node, Operation, Pool, Snapshot, Volume

_TABLES = ("nodes", "pools", "volumes", "snapshots", "attachments", "exports", "chap", "operations")


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self.nodes: dict[str, Node] = {}
        self.pools: dict[str, Pool] = {}
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.attachments: dict[tuple[str, str], Attachment] = {}
        self.exports: dict[tuple[str, str], Export] = {}
        self.chap: dict[str, ChapCredential] = {}
        self.operations: dict[int, Operation] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.nodes)} nodes, {len(self.volumes)} volumes)"

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            saved = {t: copy.copy(getattr(self, t)) for t in _TABLES} if self._depth == 0 else None
            self._depth += 1
            try:
                yield
            except BaseException:
                if saved is not None:
                    for table, value in saved.items():
                        setattr(self, table, value)
                raise
            finally:
                self._depth -= 1

    # Nodes.
    def put_node(self, node: Node) -> None:
        with self.transaction():
            self.nodes[node.id] = replace(node, labels=dict(node.labels))

    def get_node(self, node_id: str) -> Node | None:
        with self._lock:
            node = self.nodes.get(node_id)
            return None if node is None else replace(node, labels=dict(node.labels))  # a copy, as SQLite's

    def list_nodes(self) -> list[Node]:
        with self._lock:
            return [replace(self.nodes[k], labels=dict(self.nodes[k].labels)) for k in sorted(self.nodes)]

    def delete_node(self, node_id: str) -> None:
        with self.transaction():
            self.nodes.pop(node_id, None)

    # Pools.
    def put_pool(self, pool: Pool) -> None:
        with self.transaction():
            self.pools[pool.name] = pool

    def get_pool(self, name: str) -> Pool | None:
        with self._lock:
            return self.pools.get(name)

    def list_pools(self) -> list[Pool]:
        with self._lock:
            return [self.pools[k] for k in sorted(self.pools)]

    def delete_pool(self, name: str) -> None:
        with self.transaction():
            self.pools.pop(name, None)

    # Volumes.
    def put_volume(self, volume: Volume) -> None:
        with self.transaction():
            clash = next((v for v in self.volumes.values() if v.id == volume.id and v.name != volume.name), None)
            if clash is not None:
                raise ValueError(f"volume id {volume.id} is already used by volume {clash.name}")
            self.volumes[volume.name] = volume

    def get_volume(self, name: str) -> Volume | None:
        with self._lock:
            return self.volumes.get(name)

    def list_volumes(self, pool: str | None = None) -> list[Volume]:
        with self._lock:
            return [self.volumes[k] for k in sorted(self.volumes) if pool in (None, self.volumes[k].pool)]

    def delete_volume(self, name: str) -> None:
        with self.transaction():
            self.volumes.pop(name, None)

    # Snapshots.
    def put_snapshot(self, snapshot: Snapshot) -> None:
        with self.transaction():
            clash = next((s for s in self.snapshots.values() if s.id == snapshot.id and s.name != snapshot.name),
                         None)
            if clash is not None:
                raise ValueError(f"snapshot id {snapshot.id} is already used by snapshot {clash.name}")
            self.snapshots[snapshot.name] = snapshot

    def get_snapshot(self, name: str) -> Snapshot | None:
        with self._lock:
            return self.snapshots.get(name)

    def list_snapshots(self, volume: str | None = None) -> list[Snapshot]:
        with self._lock:
            return [self.snapshots[k] for k in sorted(self.snapshots) if volume in (None, self.snapshots[k].volume)]

    def delete_snapshot(self, name: str) -> None:
        with self.transaction():
            self.snapshots.pop(name, None)

    # Attachments.
    def put_attachment(self, attachment: Attachment) -> None:
        with self.transaction():
            self.attachments[(attachment.volume, attachment.node)] = attachment

    def get_attachment(self, volume: str, node: str) -> Attachment | None:
        with self._lock:
            return self.attachments.get((volume, node))

    def list_attachments(self, volume: str | None = None, node: str | None = None) -> list[Attachment]:
        with self._lock:
            return [a for k, a in sorted(self.attachments.items())
                    if volume in (None, a.volume) and node in (None, a.node)]

    def delete_attachment(self, volume: str, node: str) -> None:
        with self.transaction():
            self.attachments.pop((volume, node), None)

    # Exports.
    def put_export(self, export: Export) -> None:
        with self.transaction():
            self.exports[(export.volume, export.initiator_iqn)] = export

    def get_export(self, volume: str, initiator_iqn: str) -> Export | None:
        with self._lock:
            return self.exports.get((volume, initiator_iqn))

    def list_exports(self, volume: str | None = None) -> list[Export]:
        with self._lock:
            return [e for k, e in sorted(self.exports.items()) if volume in (None, e.volume)]

    def delete_export(self, volume: str, initiator_iqn: str) -> None:
        with self.transaction():
            self.exports.pop((volume, initiator_iqn), None)

    # CHAP.
    def put_chap(self, volume: str, credential: ChapCredential) -> None:
        with self.transaction():
            self.chap[volume] = credential

    def get_chap(self, volume: str) -> ChapCredential | None:
        with self._lock:
            return self.chap.get(volume)

    def delete_chap(self, volume: str) -> None:
        with self.transaction():
            self.chap.pop(volume, None)

    # Operations.
    def record_operation(self, time: float, kind: str, subject: str, state: str, detail: str = "") -> int:
        with self.transaction():
            op_id = max(self.operations, default=0) + 1
            self.operations[op_id] = Operation(op_id, time, kind, subject, state, detail)
            return op_id

    def finish_operation(self, op_id: int, state: str, detail: str = "") -> None:
        with self.transaction():
            if op_id in self.operations:
                self.operations[op_id] = replace(self.operations[op_id], state=state, detail=detail)

    def list_operations(self, subject: str | None = None, limit: int = 100) -> list[Operation]:
        with self._lock:
            ops = [o for _, o in sorted(self.operations.items()) if subject in (None, o.subject)]
            return ops[-limit:] if limit > 0 else []
