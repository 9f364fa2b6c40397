"""The SQLite schema as numbered migrations, applied in order, each once.

``schema_migrations`` records which ran.  Never edit a migration that has
shipped: add the next number.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "initial schema", """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            initiator_iqn TEXT NOT NULL,
            agent_address TEXT NOT NULL,
            portals TEXT NOT NULL,          -- JSON list of "host:port"
            labels TEXT NOT NULL,           -- JSON object
            disks TEXT NOT NULL,            -- JSON list of {name, path, capacity_bytes, free_bytes}
            health TEXT NOT NULL,
            last_heartbeat REAL NOT NULL
        );
        CREATE TABLE pools (
            name TEXT PRIMARY KEY,
            members TEXT NOT NULL,          -- JSON list of [node_id, disk]
            overcommit_ratio REAL NOT NULL
        );
        CREATE TABLE volumes (
            name TEXT PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
            pool TEXT NOT NULL,
            owner_node TEXT NOT NULL,
            disk TEXT NOT NULL,
            state TEXT NOT NULL,
            thin INTEGER NOT NULL,
            created_at REAL NOT NULL,
            source TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX volumes_pool ON volumes (pool);
        CREATE TABLE attachments (
            volume TEXT NOT NULL,
            node TEXT NOT NULL,
            mode TEXT NOT NULL,
            state TEXT NOT NULL,
            device_path TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (volume, node)
        );
        CREATE TABLE exports (
            volume TEXT NOT NULL,
            initiator_iqn TEXT NOT NULL,
            target_iqn TEXT NOT NULL,
            portals TEXT NOT NULL,          -- JSON list
            lun INTEGER NOT NULL,
            naa TEXT NOT NULL,
            serial TEXT NOT NULL,
            chap_user TEXT NOT NULL,
            PRIMARY KEY (volume, initiator_iqn)
        );
        CREATE TABLE chap_secrets (
            volume TEXT PRIMARY KEY,
            chap_user TEXT NOT NULL,
            secret TEXT NOT NULL
        );
        CREATE TABLE operations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            state TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX operations_subject ON operations (subject);
    """),
    (2, "snapshots", """
        CREATE TABLE snapshots (
            name TEXT PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            volume TEXT NOT NULL,
            volume_id TEXT NOT NULL,
            size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
            owner_node TEXT NOT NULL,
            disk TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            progress REAL NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX snapshots_volume ON snapshots (volume);
    """),
    (3, "fencing and shared attachments", """
        ALTER TABLE nodes ADD COLUMN fence TEXT NOT NULL DEFAULT '';
        ALTER TABLE nodes ADD COLUMN fence_since REAL NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN fence_reason TEXT NOT NULL DEFAULT '';
        ALTER TABLE nodes ADD COLUMN fence_steps TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE attachments ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
    """),
    (4, "the size a clone was asked to have", """
        ALTER TABLE volumes ADD COLUMN requested_bytes INTEGER NOT NULL DEFAULT 0;
    """),
    (5, "the id of a clone's source", """
        ALTER TABLE volumes ADD COLUMN source_id TEXT NOT NULL DEFAULT '';
    """),
)
