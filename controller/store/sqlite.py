"""``SqliteStore``: the embedded default ``StateStore``.

One file, WAL journal (readers do not block the writer; a crash loses no
committed transaction), ``synchronous=FULL`` because every row is a decision
the controller acts on right after writing it.  The schema comes from
``migrations.MIGRATIONS``; ``schema_migrations`` records what ran.  The file
holds CHAP secrets, so it is created readable by its owner only (SQLite gives
the -wal and -shm files the same permissions).

One connection, shared by the controller's threads under a lock; a
transaction is ``BEGIN IMMEDIATE`` ... ``COMMIT``.  One store per file: the
store holds an exclusive ``flock`` on the file while it is open, so a second
controller started on the same file fails at once, naming it (two would each
pass their own in-process checks, such as "one writer per volume", and both
act).  SQLite's own locks are POSIX record locks, which ``flock`` does not
touch; the descriptor holding it is closed only after SQLite's connection.

Opening refuses a file whose schema is newer than this code knows (rows it
would misread) and a file it cannot write (it would serve, then fail every
change).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from controller.domain.model import (Attachment, ChapCredential, Disk, Export, Node, Operation, Pool, Snapshot,
                                     Volume)
from controller.store.migrations import MIGRATIONS


class SqliteStore:
    def __init__(self, path: str, *, busy_timeout: float = 10.0):
        self.path = path
        self._lock_fd: int | None = None
        if path != ":memory:":
            self._lock_fd = _lock_exclusively(path)
        self._lock = threading.RLock()
        self._depth = 0
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd is not None:  # after the connection: closing it drops the process's POSIX locks
                os.close(self._lock_fd)
                self._lock_fd = None

    # Schema.
    def _migrate(self) -> None:
        with self.transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)")
            done = {row[0] for row in self._db.execute("SELECT version FROM schema_migrations")}
            known = MIGRATIONS[-1][0]
            if done and max(done) > known:
                raise sqlite3.DatabaseError(f"its schema is version {max(done)}, newer than this Shoal knows "
                                            f"({known}): run the Shoal release that wrote it")
            # A write every open makes (the database header): a file this process cannot write fails here, not
            # at the first change after the controller said it was ready.
            self._db.execute(f"PRAGMA user_version = {known}")
            for version, description, script in MIGRATIONS:
                if version in done:
                    continue
                for statement in _statements(script):
                    self._db.execute(statement)
                self._db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                 (version, description, time.time()))

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer and self._db.in_transaction:  # SQLite may have rolled back itself (disk full, I/O)
                    self._db.execute("ROLLBACK")
                raise
            else:
                self._depth -= 1
                if outer:
                    self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self.transaction():
            try:
                return self._db.execute(sql, args)
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"store refused the write: {exc}") from None

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # Nodes.
    def put_node(self, node: Node) -> None:
        disks = [[d.name, d.path, d.capacity_bytes, d.free_bytes] for d in node.disks]
        self._write(f"INSERT OR REPLACE INTO nodes ({_NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (node.id, node.initiator_iqn, node.agent_address, json.dumps(list(node.portals)),
                     json.dumps(node.labels, sort_keys=True), json.dumps(disks), node.health, node.last_heartbeat,
                     node.fence, node.fence_since, node.fence_reason, json.dumps(list(node.fence_steps))))

    def get_node(self, node_id: str) -> Node | None:
        rows = self._rows(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,))
        return _node(rows[0]) if rows else None

    def list_nodes(self) -> list[Node]:
        return [_node(r) for r in self._rows(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id")]

    def delete_node(self, node_id: str) -> None:
        self._write("DELETE FROM nodes WHERE id = ?", (node_id,))

    # Pools.
    def put_pool(self, pool: Pool) -> None:
        self._write("INSERT OR REPLACE INTO pools VALUES (?, ?, ?)",
                    (pool.name, json.dumps([list(m) for m in pool.members]), pool.overcommit_ratio))

    def get_pool(self, name: str) -> Pool | None:
        rows = self._rows("SELECT * FROM pools WHERE name = ?", (name,))
        return _pool(rows[0]) if rows else None

    def list_pools(self) -> list[Pool]:
        return [_pool(r) for r in self._rows("SELECT * FROM pools ORDER BY name")]

    def delete_pool(self, name: str) -> None:
        self._write("DELETE FROM pools WHERE name = ?", (name,))

    # Volumes.
    def put_volume(self, v: Volume) -> None:
        # An upsert, not INSERT OR REPLACE: that would delete another volume with the same id.
        self._write(f"INSERT INTO volumes ({_VOLUME_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET "
                    "id = excluded.id, size_bytes = excluded.size_bytes, pool = excluded.pool, "
                    "owner_node = excluded.owner_node, disk = excluded.disk, state = excluded.state, "
                    "thin = excluded.thin, created_at = excluded.created_at, source = excluded.source, "
                    "requested_bytes = excluded.requested_bytes, source_id = excluded.source_id",
                    (v.name, v.id, v.size_bytes, v.pool, v.owner_node, v.disk, v.state, int(v.thin),
                     v.created_at, v.source, v.requested_bytes, v.source_id))

    def get_volume(self, name: str) -> Volume | None:
        rows = self._rows(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE name = ?", (name,))
        return _volume(rows[0]) if rows else None

    def list_volumes(self, pool: str | None = None) -> list[Volume]:
        if pool is None:
            return [_volume(r) for r in self._rows(f"SELECT {_VOLUME_COLUMNS} FROM volumes ORDER BY name")]
        return [_volume(r) for r in self._rows(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE pool = ? ORDER BY name",
                                               (pool,))]

    def delete_volume(self, name: str) -> None:
        self._write("DELETE FROM volumes WHERE name = ?", (name,))

    # Snapshots.
    def put_snapshot(self, s: Snapshot) -> None:
        self._write("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "id = excluded.id, volume = excluded.volume, volume_id = excluded.volume_id, "
                    "size_bytes = excluded.size_bytes, owner_node = excluded.owner_node, disk = excluded.disk, "
                    "state = excluded.state, created_at = excluded.created_at, progress = excluded.progress, "
                    "message = excluded.message",
                    (s.name, s.id, s.volume, s.volume_id, s.size_bytes, s.owner_node, s.disk, s.state, s.created_at,
                     s.progress, s.message))

    def get_snapshot(self, name: str) -> Snapshot | None:
        rows = self._rows(f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE name = ?", (name,))
        return Snapshot(*rows[0]) if rows else None

    def list_snapshots(self, volume: str | None = None) -> list[Snapshot]:
        rows = self._rows(f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE (?1 IS NULL OR volume = ?1) "
                          "ORDER BY name", (volume,))
        return [Snapshot(*r) for r in rows]

    def delete_snapshot(self, name: str) -> None:
        self._write("DELETE FROM snapshots WHERE name = ?", (name,))

    # Attachments.
    def put_attachment(self, a: Attachment) -> None:
        self._write(f"INSERT OR REPLACE INTO attachments ({_ATTACHMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (a.volume, a.node, a.mode, a.state, a.device_path, int(a.shared)))

    def get_attachment(self, volume: str, node: str) -> Attachment | None:
        rows = self._rows(f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE volume = ? AND node = ?",
                          (volume, node))
        return _attachment(rows[0]) if rows else None

    def list_attachments(self, volume: str | None = None, node: str | None = None) -> list[Attachment]:
        rows = self._rows(f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE (?1 IS NULL OR volume = ?1) "
                          "AND (?2 IS NULL OR node = ?2) ORDER BY volume, node", (volume, node))
        return [_attachment(r) for r in rows]

    def delete_attachment(self, volume: str, node: str) -> None:
        self._write("DELETE FROM attachments WHERE volume = ? AND node = ?", (volume, node))

    # Exports.
    def put_export(self, e: Export) -> None:
        self._write("INSERT OR REPLACE INTO exports VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.volume, e.initiator_iqn, e.target_iqn, json.dumps(list(e.portals)), e.lun, e.naa,
                     e.serial, e.chap_user))

    def get_export(self, volume: str, initiator_iqn: str) -> Export | None:
        rows = self._rows("SELECT * FROM exports WHERE volume = ? AND initiator_iqn = ?", (volume, initiator_iqn))
        return _export(rows[0]) if rows else None

    def list_exports(self, volume: str | None = None) -> list[Export]:
        rows = self._rows("SELECT * FROM exports WHERE (?1 IS NULL OR volume = ?1) ORDER BY volume, initiator_iqn",
                          (volume,))
        return [_export(r) for r in rows]

    def delete_export(self, volume: str, initiator_iqn: str) -> None:
        self._write("DELETE FROM exports WHERE volume = ? AND initiator_iqn = ?", (volume, initiator_iqn))

    # CHAP.
    def put_chap(self, volume: str, credential: ChapCredential) -> None:
        self._write("INSERT OR REPLACE INTO chap_secrets VALUES (?, ?, ?)",
                    (volume, credential.user, credential.secret))

    def get_chap(self, volume: str) -> ChapCredential | None:
        rows = self._rows("SELECT chap_user, secret FROM chap_secrets WHERE volume = ?", (volume,))
        return ChapCredential(*rows[0]) if rows else None

    def delete_chap(self, volume: str) -> None:
        self._write("DELETE FROM chap_secrets WHERE volume = ?", (volume,))

    # Operations.
    def record_operation(self, time: float, kind: str, subject: str, state: str, detail: str = "") -> int:
        cursor = self._write("INSERT INTO operations (time, kind, subject, state, detail) VALUES (?, ?, ?, ?, ?)",
                             (time, kind, subject, state, detail))
        return int(cursor.lastrowid)

    def finish_operation(self, op_id: int, state: str, detail: str = "") -> None:
        self._write("UPDATE operations SET state = ?, detail = ? WHERE id = ?", (state, detail, op_id))

    def list_operations(self, subject: str | None = None, limit: int = 100) -> list[Operation]:
        rows = self._rows("SELECT * FROM (SELECT * FROM operations WHERE (?1 IS NULL OR subject = ?1) "
                          "ORDER BY id DESC LIMIT ?2) ORDER BY id", (subject, max(0, limit)))
        return [Operation(*r) for r in rows]


# Named, so a later migration that adds a column does not shift what ``Snapshot(*row)`` (or ``_node``, ``_volume``)
# gets.
_NODE_COLUMNS = ("id, initiator_iqn, agent_address, portals, labels, disks, health, last_heartbeat, fence, "
                 "fence_since, fence_reason, fence_steps")
_VOLUME_COLUMNS = ("name, id, size_bytes, pool, owner_node, disk, state, thin, created_at, source, requested_bytes, "
                   "source_id")
_ATTACHMENT_COLUMNS = "volume, node, mode, state, device_path, shared"
_SNAPSHOT_COLUMNS = "name, id, volume, volume_id, size_bytes, owner_node, disk, state, created_at, progress, message"


def _statements(script: str) -> list[str]:
    # No triggers in the migrations, so ';' ends every statement.
    return [s.strip() for s in script.split(";") if s.strip()]


def _node(row: tuple) -> Node:
    node_id, iqn, address, portals, labels, disks, health, heartbeat, fence, since, reason, steps = row
    return Node(node_id, iqn, address, tuple(json.loads(portals)), json.loads(labels),
                tuple(Disk(*d) for d in json.loads(disks)), health, heartbeat, fence, since, reason,
                tuple(json.loads(steps)))


def _attachment(row: tuple) -> Attachment:
    volume, node, mode, state, device_path, shared = row
    return Attachment(volume, node, mode, state, device_path, bool(shared))


def _pool(row: tuple) -> Pool:
    name, members, ratio = row
    return Pool(name, tuple(tuple(m) for m in json.loads(members)), ratio)


def _volume(row: tuple) -> Volume:
    name, vol_id, size, pool, owner, disk, state, thin, created, source, requested, source_id = row
    return Volume(name, vol_id, size, pool, owner, disk, state, bool(thin), created, source, requested, source_id)


def _export(row: tuple) -> Export:
    volume, iqn, target, portals, lun, naa, serial, user = row
    return Export(volume, iqn, target, tuple(json.loads(portals)), lun, naa, serial, user)


def _lock_exclusively(path: str) -> int:
    """Create ``path`` (owner-only) if missing and hold an exclusive ``flock`` on it: a descriptor to close last."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot open it for writing: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise sqlite3.OperationalError("another Shoal controller has it open (one controller per state file)") \
            from None
    except BaseException:
        os.close(fd)
        raise
    return fd
