"""The durable state database shared by the job queue and the delivery outbox, on one of two backends.

* **SQLite** (``state.backend = "sqlite"``, the embedded default): ``<storage.root>/dermnode.db`` in WAL mode.
  Each thread opens its own connection; SQLite serialises writers, and WAL lets readers (``dermnode status``) run
  beside them. ``synchronous=FULL`` makes a committed transaction survive power loss, which the Store SCP relies on
  before it acknowledges an image. One process serves a storage root (the instance lock of the service).
* **PostgreSQL** (``state.backend = "postgresql"``, :class:`PostgresState`): many receivers and workers on several
  hosts share one database. Claims take rows with ``FOR UPDATE SKIP LOCKED``; a claimed row carries its owner
  and a lease expiry that the owner renews; the schema is created and migrated here (versioned, under an advisory
  lock); ``NOTIFY`` wakes idle workers of other processes.

On both backends a commit that queues work also wakes the idle consumers of this process at once
(:class:`Wakeup`, :meth:`StateDB.wakeup`); polling stays the fallback.

The queue code is written once, in SQLite's dialect with ``?`` placeholders and portable SQL (``ON CONFLICT DO
NOTHING``, ``RETURNING``); a :class:`StateDB` opens :class:`StateConnection` objects that translate what differs
(placeholders, transactions, row access, driver errors) and says what its backend adds (leases, row locks).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from dermnode.errors import StorageError
from dermnode.settings import Settings

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


#: Errors of either database driver: what the queue code catches where the SQLite code caught ``sqlite3.Error``.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
#: Transient errors of a claim (a busy SQLite, a lost PostgreSQL connection): logged, and the loop tries again.
CLAIM_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)

#: NOTIFY channels: a new or re-queued job, a new delivery.
JOBS_CHANNEL = "dermnode_jobs"
DELIVERIES_CHANNEL = "dermnode_deliveries"


class Wakeup:
    """An in-process wake-up signal of one channel that no waiter can miss (a generation counter).

    A consumer takes :meth:`mark` *before* it looks for work and, when it found none, waits with
    :meth:`wait` for any :meth:`set` after that mark: a commit between its look and its wait still wakes it, and
    every waiter is woken by one :meth:`set` (unlike a shared :class:`threading.Event` that one waiter clears).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._generation = 0

    def mark(self) -> int:
        """The current generation, to pass to :meth:`wait`."""
        with self._cond:
            return self._generation

    def set(self) -> None:
        """Wake every waiter (and every later :meth:`wait` on an older mark)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, mark: int, timeout: float) -> bool:
        """Wait until a :meth:`set` after ``mark`` or ``timeout`` seconds; ``True`` when woken."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != mark, timeout)


_wakeups: dict[tuple[str, str], Wakeup] = {}
_wakeups_lock = threading.Lock()


def wakeup(database: str, channel: str) -> Wakeup:
    """The process-wide :class:`Wakeup` of ``channel`` of the state database ``database`` (one per pair, so
    every queue object of the same database in this process shares it)."""
    key = (database, channel)
    with _wakeups_lock:
        found = _wakeups.get(key)
        if found is None:
            found = _wakeups[key] = Wakeup()
        return found

#: The PostgreSQL schema, by version. Applied in order by :meth:`PostgresState.migrate`; never edit a released
#: version, add the next one.
PG_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE IF NOT EXISTS jobs (
    id BIGSERIAL PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    calling_aet TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    outcome TEXT,
    received_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    owner TEXT,
    lease_expires_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT REFERENCES jobs(id),
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    object_key TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    owner TEXT,
    lease_expires_at DOUBLE PRECISION,
    UNIQUE(destination, object_key)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries(job_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    ref_id BIGINT NOT NULL,
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    replayed_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS pruned (
    job_id BIGINT PRIMARY KEY REFERENCES jobs(id),
    pruned_at DOUBLE PRECISION NOT NULL
);
""",
    ),
)
#: Key of the advisory lock that serialises schema migrations of instances starting together.
PG_MIGRATION_LOCK = 0x6465726D6E6F6465  # "dermnode"


def database_path(storage_root: Path) -> Path:
    return storage_root / "dermnode.db"


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create if needed) the SQLite state database.

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


class PgRow:
    """A PostgreSQL row read by column name or position, like ``sqlite3.Row`` (``dict(row)`` works too)."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = tuple(values)

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key] if isinstance(key, int) else self._values[self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values, strict=True))!r})"


#: A row of either backend (column name or position).
Row = sqlite3.Row | PgRow


def _pg_row_factory(cursor: Any) -> Any:
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(index, values)


class StateConnection:
    """One connection of one thread, with the operations the queue code uses on both backends.

    ``execute`` takes SQL with ``?`` placeholders and returns a cursor (``fetchone``, ``fetchall``, ``rowcount``,
    iteration); ``transaction()`` is a write transaction (``BEGIN IMMEDIATE`` on SQLite).
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.raw.execute(sql, tuple(args))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.raw.rollback()
            raise
        self.raw.commit()

    @property
    def broken(self) -> bool:
        return False

    def close(self) -> None:
        self.raw.close()


class PgConnection(StateConnection):
    """A PostgreSQL connection in autocommit mode; ``?`` placeholders are translated to ``%s``."""

    _sql_cache: dict[str, str] = {}

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        translated = self._sql_cache.get(sql)
        if translated is None:
            translated = self._sql_cache[sql] = sql.replace("%", "%%").replace("?", "%s")
        return self.raw.execute(translated, tuple(args))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.raw.transaction():
            yield

    @property
    def broken(self) -> bool:
        return bool(self.raw.closed or self.raw.broken)


class StateDB:
    """Where the state lives and how to talk to it; one object per process and database, shared by the queues.

    Attributes
    ----------
    kind:
        ``"sqlite"`` or ``"postgresql"``.
    leases:
        Whether claimed rows carry an owner and a lease expiry (several processes share the state): an in-flight
        row is orphaned only once its lease is over, never merely because it is in flight.
    lock_rows:
        SQL appended to a ``SELECT`` that picks rows to change: ``FOR UPDATE SKIP LOCKED`` where rows can be
        locked, empty on SQLite (one writer at a time).
    lease_s:
        Length of a lease (0 where there are none).
    """

    kind = "sqlite"
    leases = False
    lock_rows = ""
    lease_s = 0.0

    def connect(self) -> StateConnection:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the state is, for messages (never a password)."""
        raise NotImplementedError

    def notify(self, conn: StateConnection, channel: str) -> None:
        """Wake idle workers of other processes (a no-op where they poll)."""

    def wake_key(self) -> str:
        """What identifies this database among the :func:`wakeup` signals of the process."""
        return f"{self.kind}:{id(self)}"

    def wakeup(self, channel: str) -> Wakeup:
        """The in-process :class:`Wakeup` of ``channel`` on this database: set after every commit that queues
        work (:meth:`WorkQueue.notify <dermnode.workqueue.base.WorkQueue.notify>`) and, on PostgreSQL, on every
        ``NOTIFY`` from another process; idle workers wait on it with their poll interval as the timeout."""
        return wakeup(self.wake_key(), channel)

    def listener(self) -> Notifier | None:
        """A thread that turns notifications into events, or ``None`` where workers only poll."""
        return None

    def close(self) -> None:
        """Close what this object keeps open across queues (the PostgreSQL listener and connections)."""


class SqliteState(StateDB):
    """The SQLite state database ``path`` (``<storage.root>/dermnode.db``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> StateConnection:
        return StateConnection(connect(self.path))

    def describe(self) -> str:
        return str(self.path)

    def wake_key(self) -> str:
        return f"sqlite:{os.path.abspath(self.path)}"


def mask_secret(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***`` (an empty secret masks nothing)."""
    return text.replace(secret, "***") if secret else text


class PostgresState(StateDB):
    """A PostgreSQL database shared by every dermnode process of a deployment.

    Parameters
    ----------
    dsn:
        libpq connection string or URI without a password (``host=db.example dbname=dermnode user=dermnode``).
    password:
        The password (from ``DERMNODE_STATE__PASSWORD``; libpq also reads ``PGPASSWORD``); never logged, masked in
        every error.
    lease_s:
        How long a claim holds a row without renewal; a row whose owner stopped renewing is re-claimed after it.
    connect_timeout_s:
        libpq ``connect_timeout``.
    """

    kind = "postgresql"
    leases = True
    lock_rows = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, *, password: str = "", lease_s: float = 30.0, connect_timeout_s: float = 10.0) -> None:
        self.dsn = dsn
        self._password = password
        self.lease_s = lease_s
        self.connect_timeout_s = connect_timeout_s
        self._migrated = False
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[PgConnection] = weakref.WeakSet()
        self._notifier: Notifier | None = None

    def _mask(self, text: str) -> str:
        return mask_secret(text, self._password)

    def wake_key(self) -> str:
        return f"postgresql:{self.dsn}"

    def describe(self) -> str:
        try:
            params = pg_conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "postgresql (unparsable dsn)"
        params.pop("password", None)
        return "postgresql " + " ".join(f"{k}={v}" for k, v in sorted(params.items()))

    def _open(self) -> Any:
        kwargs: dict[str, Any] = {"connect_timeout": max(1, int(self.connect_timeout_s)),
                                  "application_name": f"dermnode@{socket.gethostname()}:{os.getpid()}"}
        if self._password:
            kwargs["password"] = self._password
        try:
            return psycopg.connect(self.dsn, autocommit=True, row_factory=_pg_row_factory, **kwargs)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to the state database ({self.describe()}): "
                               f"{self._mask(str(exc)).strip()}") from None

    def connect(self) -> StateConnection:
        """Open a connection (and create or migrate the schema on the first one of this object).

        Raises
        ------
        StorageError
            When the database cannot be reached or migrated (the message never holds the password).
        """
        conn = PgConnection(self._open())
        if not self._migrated:
            with self._lock:
                if not self._migrated:
                    self.migrate(conn)
                    self._migrated = True
        self._connections.add(conn)
        return conn

    def migrate(self, conn: StateConnection) -> int:
        """Create or upgrade the schema to the newest of :data:`PG_MIGRATIONS`; returns the version.

        Idempotent, and safe when several instances start together: the whole upgrade runs in one transaction under
        a transaction-level advisory lock, so one instance migrates and the others find it done.

        Raises
        ------
        StorageError
            When the schema cannot be created or upgraded.
        """
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                    " applied_at DOUBLE PRECISION NOT NULL)"
                )
                current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
                newest = PG_MIGRATIONS[-1][0]
                if current > newest:
                    raise StorageError(
                        f"the state database has schema version {current}, newer than this dermnode knows ({newest}):"
                        " upgrade dermnode"
                    )
                for version, sql in PG_MIGRATIONS:
                    if version > current:
                        conn.raw.execute(sql)
                        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                                     (version, time.time()))
                        logger.info("state database migrated to schema version %d", version)
        except psycopg.Error as exc:
            raise StorageError(f"cannot create the schema of {self.describe()}: {self._mask(str(exc))}") from None
        return int(newest)

    def notify(self, conn: StateConnection, channel: str) -> None:
        conn.execute("SELECT pg_notify(?, '')", (channel,))

    def listener(self) -> Notifier:
        with self._lock:
            if self._notifier is None:
                self._notifier = Notifier(self)
            return self._notifier

    def close(self) -> None:
        self.close_all()

    def close_all(self) -> None:
        """Close every connection this object opened (tests; a process exits with them open)."""
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        for conn in list(self._connections):
            try:
                conn.close()
            except psycopg.Error:
                logger.debug("closing a state connection failed", exc_info=True)


class Notifier:
    """One thread per process that runs ``LISTEN`` on the queue channels and sets an event per channel.

    Each notification also sets the channel's in-process :class:`Wakeup` (:meth:`StateDB.wakeup`), on which the
    worker pool's idle threads wait with their poll interval as the timeout, so a lost connection or a missed
    notification only delays a claim to the next poll. :meth:`event` stays for callers that wait on one channel.
    """

    CHANNELS = (JOBS_CHANNEL, DELIVERIES_CHANNEL)
    RECONNECT_S = 2.0

    def __init__(self, db: PostgresState) -> None:
        self.db = db
        self._events = {c: threading.Event() for c in self.CHANNELS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dermnode-listen", daemon=True)
        self._thread.start()

    def event(self, channel: str) -> threading.Event:
        return self._events[channel]

    def wake_all(self) -> None:
        for channel, e in self._events.items():
            e.set()
            self.db.wakeup(channel).set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.db._open()
            except StorageError as exc:
                logger.warning("LISTEN connection failed, workers poll meanwhile: %s", exc)
                self._stop.wait(self.RECONNECT_S)
                continue
            try:
                for channel in self.CHANNELS:
                    raw.execute(f"LISTEN {channel}")
                self.wake_all()  # anything queued while we were not listening
                while not self._stop.is_set():
                    for note in raw.notifies(timeout=1.0):
                        event = self._events.get(note.channel)
                        if event is not None:
                            event.set()
                            self.db.wakeup(note.channel).set()
            except psycopg.Error as exc:
                logger.warning("LISTEN connection lost, workers poll meanwhile: %s", self.db._mask(str(exc)))
                self._stop.wait(self.RECONNECT_S)
            finally:
                raw.close()


def open_state(backend: str, *, storage_root: Path, dsn: str = "", password: str = "", lease_s: float = 30.0,
               connect_timeout_s: float = 10.0) -> StateDB:
    """The :class:`StateDB` of ``[state]``: SQLite under ``storage_root``, or PostgreSQL at ``dsn``."""
    if backend == "postgresql":
        return PostgresState(dsn, password=password, lease_s=lease_s, connect_timeout_s=connect_timeout_s)
    return SqliteState(database_path(storage_root))


def state_db_of(settings: Settings) -> StateDB:
    """The :class:`StateDB` of ``settings`` (``[state]`` and ``storage.root``)."""
    st = settings.state
    return open_state(st.backend, storage_root=settings.storage_root, dsn=st.dsn, password=st.password,
                      lease_s=st.lease_s, connect_timeout_s=st.connect_timeout_s)


def as_state_db(db: StateDB | Path) -> StateDB:
    """A :class:`StateDB` from a state database object or an SQLite file path (the embedded default)."""
    return db if isinstance(db, StateDB) else SqliteState(Path(db))


def dead_letter(
    conn: StateConnection,
    table: str,
    row_id: int,
    *,
    error: str,
    attempts: int,
    sop_instance_uid: str = "",
    destination: str = "",
    guard: str = "",
    guard_args: Sequence[Any] = (),
) -> bool:
    """Mark a job or delivery ``dead`` and record why in ``dead_letters``, in one transaction.

    ``guard`` (SQL starting with ``AND``, with ``guard_args``) restricts which row may change, e.g. only while its
    lease holder is the caller; returns ``False`` (and records nothing) when the guarded row did not match.
    """
    with conn.transaction():
        return dead_letter_in_transaction(conn, table, row_id, error=error, attempts=attempts,
                                          sop_instance_uid=sop_instance_uid, destination=destination,
                                          guard=guard, guard_args=guard_args)


def dead_letter_in_transaction(
    conn: StateConnection,
    table: str,
    row_id: int,
    *,
    error: str,
    attempts: int,
    sop_instance_uid: str = "",
    destination: str = "",
    guard: str = "",
    guard_args: Sequence[Any] = (),
) -> bool:
    """:func:`dead_letter` inside the caller's open transaction."""
    kind = {"jobs": "job", "deliveries": "delivery"}[table]
    now = time.time()
    cur = conn.execute(f"UPDATE {table} SET state = 'dead', last_error = ?, updated_at = ? WHERE id = ?{guard}",
                       (error, now, row_id, *guard_args))
    if guard and int(cur.rowcount) == 0:
        return False
    conn.execute(
        "INSERT INTO dead_letters (kind, ref_id, sop_instance_uid, destination, attempts, error, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (kind, row_id, sop_instance_uid, destination, attempts, error, now),
    )
    return True


def replay_dead(conn: StateConnection, table: str, row_id: int | None = None) -> int:
    """Put dead-lettered jobs or deliveries (one, or all) back to ``pending`` with a fresh attempt count."""
    with conn.transaction():
        return replay_dead_in_transaction(conn, table, row_id)


def replay_dead_in_transaction(conn: StateConnection, table: str, row_id: int | None = None) -> int:
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
    return int(cur.rowcount)
