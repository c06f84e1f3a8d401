"""The durable state database (SQLite in WAL mode) shared by the job queue and the delivery outbox.

Each thread opens its own connection with :func:`connect`; SQLite serialises writers, and WAL lets readers
(``dermnode status``) run beside them. ``synchronous=FULL`` makes a committed transaction survive power loss,
which the Store SCP relies on before it acknowledges an image.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from dermnode.errors import StorageError

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    calling_aet TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    outcome TEXT,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER REFERENCES jobs(id),
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    object_key TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE(destination, object_key)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    ref_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    replayed_at REAL
);
CREATE TABLE IF NOT EXISTS pruned (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    pruned_at REAL NOT NULL
);
"""


def database_path(storage_root: Path) -> Path:
    return storage_root / "dermnode.db"


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create if needed) the state database.

    Raises
    ------
    StorageError
        When the database cannot be opened or its schema cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not path.exists()
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(path, 0o600)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open state database {path}: {exc}") from exc
    return conn


def dead_letter(
    conn: sqlite3.Connection,
    table: str,
    row_id: int,
    *,
    error: str,
    attempts: int,
    sop_instance_uid: str = "",
    destination: str = "",
) -> None:
    """Mark a job or delivery ``dead`` and record why in ``dead_letters``, in one transaction."""
    kind = {"jobs": "job", "deliveries": "delivery"}[table]
    now = time.time()
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"UPDATE {table} SET state = 'dead', last_error = ?, updated_at = ? WHERE id = ?",
                     (error, now, row_id))
        conn.execute(
            "INSERT INTO dead_letters (kind, ref_id, sop_instance_uid, destination, attempts, error, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (kind, row_id, sop_instance_uid, destination, attempts, error, now),
        )


def replay_dead(conn: sqlite3.Connection, table: str, row_id: int | None = None) -> int:
    """Put dead-lettered jobs or deliveries (one, or all) back to ``pending`` with a fresh attempt count."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        return replay_dead_in_transaction(conn, table, row_id)


def replay_dead_in_transaction(conn: sqlite3.Connection, table: str, row_id: int | None = None) -> int:
    """:func:`replay_dead` inside the caller's open transaction (to combine it with other changes atomically)."""
    kind = {"jobs": "job", "deliveries": "delivery"}[table]
    now = time.time()
    only = " AND id = ?" if row_id is not None else ""
    args: tuple[int, ...] = (row_id,) if row_id is not None else ()
    cur = conn.execute(
        f"UPDATE {table} SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ?"
        f" WHERE state = 'dead'{only}",
        (now, *args),
    )
    conn.execute(
        "UPDATE dead_letters SET replayed_at = ? WHERE kind = ? AND replayed_at IS NULL" + only.replace("id", "ref_id"),
        (now, kind, *args),
    )
    return cur.rowcount
