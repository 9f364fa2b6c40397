"""SqliteStore specifics: WAL, numbered migrations, a file only its owner reads, state that survives a reopen."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from controller.domain.model import AVAILABLE, ChapCredential, Pool, Volume
from controller.store import SqliteStore
from controller.store.migrations import MIGRATIONS


def test_wal_and_migrations(tmp_path):
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    assert store.journal_mode() == "wal"
    assert store.schema_version() == MIGRATIONS[-1][0]
    store.close()
    SqliteStore(path).close()  # a second open applies nothing twice
    db = sqlite3.connect(path)
    rows = db.execute("SELECT version, description FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(v, d) for v, d, _ in MIGRATIONS]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"nodes", "pools", "volumes", "attachments", "exports", "chap_secrets", "operations"} <= tables
    db.close()


def test_migrations_are_numbered_in_order():
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))


def test_file_is_private(tmp_path):
    path = tmp_path / "state.db"
    SqliteStore(str(path)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_state_survives_reopen(tmp_path):
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    store.put_pool(Pool("fast", (("node-a", "data0"),), 2.0))
    v = Volume("vol-1", "id-1", 1 << 30, "fast", "node-a", "data0", AVAILABLE, False, 12.5)
    store.put_volume(v)
    store.put_chap("vol-1", ChapCredential("shoal-id-1", "s3cret-s3cret-s3cret"))
    store.close()
    again = SqliteStore(path)
    assert again.get_volume("vol-1") == v
    assert again.get_pool("fast") == Pool("fast", (("node-a", "data0"),), 2.0)
    assert again.get_chap("vol-1").secret == "s3cret-s3cret-s3cret"
    again.close()


def test_one_store_per_file_a_second_is_refused_until_the_first_closes(tmp_path):
    """Two controllers on one state file each passed their own in-process checks (a volume attached to two
    nodes as single writer, reproduced by a review): a second store on the file is refused, naming why."""
    path = str(tmp_path / "state.db")
    one = SqliteStore(path)
    one.put_pool(Pool("p1", ()))
    with pytest.raises(sqlite3.OperationalError, match="another Shoal controller"):
        SqliteStore(path)
    assert one.get_pool("p1") is not None  # the first goes on serving
    one.close()
    two = SqliteStore(path)
    assert two.get_pool("p1") is not None
    two.close()


def test_a_database_of_a_newer_schema_is_refused_at_open(tmp_path):
    """Rows of a newer schema would be misread (``SELECT *`` into fewer fields): refuse to open, naming versions."""
    path = str(tmp_path / "state.db")
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (MIGRATIONS[-1][0] + 1,))
    db.commit()
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match=f"version {MIGRATIONS[-1][0] + 1}, newer"):
        SqliteStore(path)
    # the lock the refused open took was given back: fixed, the file opens again
    db = sqlite3.connect(path)
    db.execute("DELETE FROM schema_migrations WHERE version > ?", (MIGRATIONS[-1][0],))
    db.commit()
    db.close()
    SqliteStore(path).close()


def test_a_state_file_that_cannot_be_written_is_refused_at_open():
    """It used to open (and the controller say it was ready), then fail every change.  Root writes any file, so
    the open is tried by a forked child that became nobody (uid 65534), on a file only readable to it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shoal-ro-") as directory:
        os.chmod(directory, 0o777)  # only the file is read-only: SQLite may make its -wal and -shm beside it
        path = os.path.join(directory, "state.db")
        SqliteStore(path).close()
        os.chmod(path, 0o444)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery, only the answer through the pipe
            answer = b"opened"
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                SqliteStore(path)
            except sqlite3.Error as exc:
                answer = b"refused: " + str(exc).encode()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                answer = repr(exc).encode()
            os.write(write, answer)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read().decode()
        os.waitpid(pid, 0)
    assert answer.startswith("refused:"), answer


def test_a_failed_statement_that_sqlite_rolled_back_reports_its_own_error(tmp_path):
    """SQLite ends the transaction itself after some errors (disk full, I/O error); our ROLLBACK then raised
    "no transaction is active" and hid the real error."""
    store = SqliteStore(str(tmp_path / "state.db"))
    with pytest.raises(sqlite3.OperationalError, match="stand-in for a full disk"):
        with store.transaction():
            store.put_pool(Pool("p1", ()))
            store._db.execute("ROLLBACK")  # what SQLite does on its own after SQLITE_FULL / SQLITE_IOERR
            raise sqlite3.OperationalError("stand-in for a full disk")
    assert store.get_pool("p1") is None
    store.put_pool(Pool("p2", ()))  # and it goes on working
    assert store.get_pool("p2") is not None
    store.close()


def test_a_database_of_schema_1_gets_the_snapshots_table_and_keeps_its_rows(tmp_path):
    """Migration 2 (snapshots) on a file written before it: applied once, the volumes still there."""
    from controller.domain.model import READY, Snapshot
    from controller.store.sqlite import _statements

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
               "applied_at REAL NOT NULL)")
    for statement in _statements(MIGRATIONS[0][2]):
        db.execute(statement)
    db.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (MIGRATIONS[0][1],))
    db.execute("INSERT INTO volumes VALUES ('vol-1', 'id-1', 4096, 'default', 'node-a', 'data0', 'available', 1, "
               "1.0, '')")
    db.commit()
    db.close()
    store = SqliteStore(path)
    try:
        assert store.schema_version() == MIGRATIONS[-1][0] >= 2
        assert store.get_volume("vol-1").state == AVAILABLE
        snap = Snapshot("snap-1", "sid-1", "vol-1", "id-1", 4096, "node-a", "data0", READY, 2.0, 1.0)
        store.put_snapshot(snap)
        assert store.list_snapshots("vol-1") == [snap]
    finally:
        store.close()


def test_a_database_of_schema_2_gets_fence_and_shared_columns_with_defaults(tmp_path):
    """Migration 3 (fencing, shared attachments) on a file written before it: old rows read as not fenced and
    not shared."""
    from controller.domain.model import Attachment
    from controller.store.sqlite import _statements

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
               "applied_at REAL NOT NULL)")
    for version, description, script in MIGRATIONS[:2]:
        for statement in _statements(script):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, description))
    db.execute("INSERT INTO nodes VALUES ('node-b', 'iqn.2024-01.io.shoal:node-b', '127.0.0.1:1', '[]', '{}', '[]', "
               "'healthy', 5.0)")
    db.execute("INSERT INTO attachments VALUES ('vol-1', 'node-b', 'kernel', 'attached', '/dev/sdb')")
    db.commit()
    db.close()
    store = SqliteStore(path)
    try:
        node = store.get_node("node-b")
        assert (node.fence, node.fence_since, node.fence_reason, node.fence_steps) == ("", 0.0, "", ())
        assert store.get_attachment("vol-1", "node-b") == Attachment("vol-1", "node-b", "kernel", "attached",
                                                                     "/dev/sdb", shared=False)
    finally:
        store.close()
