"""The one work-queue mechanism under the job queue and the delivery outbox.

A work item is a row of a state-database table (``jobs`` or ``deliveries``) with a ``state``, an ``attempts``
count and a ``next_attempt_at`` time. Both queues share:

* **claim** — one atomic ``UPDATE ... RETURNING`` takes the oldest due ``pending`` row, marks it in flight
  (``running`` job, ``sending`` delivery) and counts the attempt (:meth:`WorkQueue._claim_row`);
* **retry with backoff** — a failed attempt goes back to ``pending``, due after :func:`backoff_delay`:
  exponential (``initial_s * 2 ** (attempts - 1)``) and capped at ``max_s``;
* **dead letter** — a permanent failure, or a failure on the last allowed attempt, marks the row ``dead`` and
  records why in ``dead_letters`` (:meth:`WorkQueue._record_failure`); :meth:`WorkQueue.replay` puts dead rows
  back with a fresh attempt count;
* **state updates that must not be lost** — :func:`retry_state_update` repeats a failed state-database write
  with the same capped exponential backoff until it succeeds or the caller stops.

Each thread gets its own connection of the state database (:class:`~dermnode.workqueue.db.StateDB`: SQLite, or
PostgreSQL shared by several processes). Where the state is shared (``StateDB.leases``), a claim also records the
owner and a lease expiry; the owner renews the leases of what it holds (:meth:`WorkQueue.renew_held`, called by the
worker pool's lease thread), and only a row whose lease is over counts as orphaned (:meth:`WorkQueue.orphaned`), so
another host takes it over after the lease and never while its owner still works on it. Finishing or failing a
claimed row is tied to the claim (:meth:`WorkQueue.holder_guard`): the update only applies while the row is still
in flight, held by the same owner, on the same attempt; a worker whose lease lapsed and whose row another worker
took over changes nothing (it logs "lease lost") instead of overwriting the new holder's row.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dermnode.errors import StorageError
from dermnode.workqueue.db import (
    CLAIM_ERRORS,
    StateConnection,
    StateDB,
    as_state_db,
    dead_letter,
    replay_dead,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: First pause before a failed state update (``database is locked`` past the busy timeout, a full disk) is
#: retried; the pause doubles up to :data:`STATE_RETRY_MAX_S`.
STATE_RETRY_INITIAL_S = 0.1
#: Longest pause between two tries of a state update.
STATE_RETRY_MAX_S = 5.0


def backoff_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """The pause after failed attempt number ``attempts``: ``initial_s`` doubling per attempt, capped at ``max_s``.

    Parameters
    ----------
    attempts:
        Attempts made so far (1 after the first failure; 0 is treated as 1).
    initial_s:
        Pause after the first failure.
    max_s:
        Longest pause.

    Returns
    -------
    float
        ``min(max_s, initial_s * 2 ** (attempts - 1))`` seconds.
    """
    return float(min(max_s, initial_s * 2 ** max(attempts - 1, 0)))


class StateUpdateAbandonedError(StorageError):
    """A state update still failed when its caller was told to stop.

    The row keeps its in-flight state (``running`` job, ``sending`` delivery) and is put back to ``pending`` by
    ``recover()`` at the next start.
    """


def retry_state_update(
    update: Callable[[], T],
    *,
    what: str,
    stop: threading.Event,
    initial_s: float | None = None,
    max_s: float | None = None,
) -> T:
    """Run ``update`` (one state-database write) until it succeeds, backing off between tries.

    Every failure is logged with its traceback; the pause follows :func:`backoff_delay` from ``initial_s`` up to
    ``max_s`` (defaults: :data:`STATE_RETRY_INITIAL_S`, :data:`STATE_RETRY_MAX_S`) and ends at once when ``stop``
    is set.

    Parameters
    ----------
    update:
        The write; it must be safe to repeat (each state update of the queue and the outbox is).
    what:
        What is recorded, for the log (no PHI: ids only).
    stop:
        Set when the caller must give up (shutdown).

    Returns
    -------
    T
        What ``update`` returned.

    Raises
    ------
    StateUpdateAbandonedError
        When ``stop`` is set while the update still fails.
    """
    first = STATE_RETRY_INITIAL_S if initial_s is None else initial_s
    cap = STATE_RETRY_MAX_S if max_s is None else max_s
    tries = 0
    while True:
        tries += 1
        delay = backoff_delay(tries, first, cap)
        try:
            result = update()
        except Exception:
            logger.exception("cannot record %s (try %d), retrying in %.1fs", what, tries, delay)
        else:
            if tries > 1:
                logger.info("recorded %s after %d tries", what, tries)
            return result
        if stop.wait(delay):
            raise StateUpdateAbandonedError(f"gave up recording {what} after {tries} tries: stopping")


class WorkQueue:
    """Claim, retry with capped exponential backoff, and dead-letter over one state-database table.

    Subclasses name their table and in-flight state and build their own item type from the claimed row.
    Thread-safe: each thread gets its own connection.

    Parameters
    ----------
    db_path:
        The state database: an SQLite file, or a :class:`~dermnode.workqueue.db.StateDB` (PostgreSQL).
    max_attempts:
        Attempts before an item is dead-lettered.
    backoff_initial_s, backoff_max_s:
        The retry pause (:func:`backoff_delay`).

    Raises
    ------
    StorageError
        From the constructor, when the database cannot be opened.
    """

    #: The table of the items (``jobs``, ``deliveries``).
    table: ClassVar[str]
    #: The state of a claimed item (``running``, ``sending``).
    in_flight: ClassVar[str]

    #: The NOTIFY channel that wakes idle consumers of this table.
    channel: ClassVar[str]

    def __init__(
        self, db_path: StateDB | Path, *, max_attempts: int, backoff_initial_s: float, backoff_max_s: float
    ) -> None:
        self.db_path = db_path
        self.state_db = as_state_db(db_path)
        #: The storage root whose free disk ``/metrics`` reports: the SQLite file's folder; set by the service
        #: where the state is elsewhere.
        self.storage_root: Path | None = db_path.parent if isinstance(db_path, Path) else None
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._local = threading.local()
        self._held: dict[int, str] = {}  # rows this process claimed, by id: their owner (leases only)
        self._held_lock = threading.Lock()
        self._conn()  # create the schema now, fail early

    def _conn(self) -> StateConnection:
        conn: StateConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:  # a lost PostgreSQL connection: open a new one
            conn = None
        if conn is None:
            conn = self.state_db.connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def backoff(self, attempts: int) -> float:
        """Seconds before an item that failed its attempt number ``attempts`` is due again."""
        return backoff_delay(attempts, self.backoff_initial_s, self.backoff_max_s)

    def exhausted(self, attempts: int, *, permanent: bool = False) -> bool:
        """Whether a failure on attempt ``attempts`` dead-letters the item."""
        return permanent or attempts >= self.max_attempts

    def default_owner(self) -> str:
        """The owner recorded on rows claimed without one where leases need it: unique per host and process."""
        return f"{self.table}@{socket.gethostname()}:{os.getpid()}"

    def claim_owner(self, owner: str | None) -> str | None:
        """The owner a claim records: ``owner``, or :meth:`default_owner` where leases need one."""
        if owner is None and self.state_db.leases:
            return self.default_owner()
        return owner

    def holder_guard(self, owner: str | None, attempts: int) -> tuple[str, tuple[Any, ...]]:
        """SQL (``AND ...``) and arguments that restrict an update to the row of one claim.

        Where the state is shared: the row must still be in flight, held by ``owner``, on the attempt counted by
        that claim (``attempts`` grows with each claim, so a re-claim by the same owner string is told apart).
        SQLite: nothing (one process; its in-flight rows are its own), so the behaviour there is unchanged.
        """
        if not self.state_db.leases:
            return "", ()
        return f" AND state = '{self.in_flight}' AND owner = ? AND attempts = ?", (owner, attempts)

    def lease_lost(self, row_id: int, owner: str | None) -> None:
        """Log that the claim on row ``row_id`` was lost (its lease lapsed and another worker took it over) and
        stop renewing it; the caller's change is dropped."""
        kind = {"jobs": "job", "deliveries": "delivery"}.get(self.table, self.table)
        logger.warning("lease lost: %s %d is now held by another worker (%s's outcome not recorded)",
                       kind, row_id, owner)
        self.forget(row_id, owner)

    def forget(self, row_id: int, owner: str | None) -> None:
        """Stop renewing the lease of row ``row_id`` (finished, or no longer held by ``owner``)."""
        with self._held_lock:
            if row_id in self._held and self._held[row_id] == owner:
                del self._held[row_id]

    def claim_assignments(self, owner: str | None, now: float) -> tuple[str, list[Any]]:
        """SQL ``SET`` items (each ending in ``", "``) and their arguments that a claim writes besides the state:
        the owner, and where the state is shared the lease expiry."""
        sets = ""
        args: list[Any] = []
        if owner is not None:
            sets += "owner = ?, "
            args.append(owner)
        if self.state_db.leases:
            sets += "lease_expires_at = ?, "
            args.append(now + self.state_db.lease_s)
        return sets, args

    def _claim_row(
        self, returning: str, *, owner: str | None = None, where: str = "", where_args: Sequence[Any] = ()
    ) -> Any:
        """Atomically take the oldest due pending row, mark it in flight and count the attempt.

        Where the state is shared, the row is picked with ``FOR UPDATE SKIP LOCKED`` (claimers never wait for nor
        take each other's row) and gets the owner and a lease expiry, renewed by :meth:`renew_held`.
        ``where`` (SQL starting with ``AND``, with ``where_args``) narrows which pending rows may be taken.

        A busy database or a lost connection is logged and answered with ``None`` (the caller's loop tries again).
        """
        db = self.state_db
        now = time.time()
        owner = self.claim_owner(owner)
        sets, args = self.claim_assignments(owner, now)
        args += [now, now, *where_args]
        try:
            row = (
                self._conn()
                .execute(
                    f"UPDATE {self.table} SET state = '{self.in_flight}', attempts = attempts + 1, {sets}"
                    f"updated_at = ? WHERE id = (SELECT id FROM {self.table} WHERE state = 'pending'"
                    f" AND next_attempt_at <= ?{where} ORDER BY id LIMIT 1{db.lock_rows}) RETURNING {returning}",
                    args,
                )
                .fetchone()
            )
        except CLAIM_ERRORS as exc:
            logger.warning("%s claim failed, will retry: %s", self.table, exc)
            return None
        if row is not None and db.leases and owner is not None:
            with self._held_lock:
                self._held[int(row["id"])] = owner
        return row

    def renew(self, row_id: int, owner: str) -> bool:
        """Extend the lease of an in-flight row held by ``owner``; ``False`` when it is no longer theirs (or done).

        Always ``True`` where there are no leases (SQLite: one process, its in-flight rows are its own).
        """
        db = self.state_db
        if not db.leases:
            return True
        cur = self._conn().execute(
            f"UPDATE {self.table} SET lease_expires_at = ? WHERE id = ? AND owner = ? AND state = '{self.in_flight}'",
            (time.time() + db.lease_s, row_id, owner),
        )
        return int(cur.rowcount) == 1

    def renew_held(self) -> int:
        """Renew the lease of every row this object claimed that is still in flight; returns how many.

        Rows that finished (or were taken over) are forgotten. A failed renewal is logged and tried at the next
        call (the lease is several renewal periods long).
        """
        with self._held_lock:
            held = list(self._held.items())
        renewed = 0
        for row_id, owner in held:
            try:
                ok = self.renew(row_id, owner)
            except Exception as exc:
                logger.warning("cannot renew the lease of %s %d: %s", self.table, row_id, exc)
                continue
            if ok:
                renewed += 1
            else:
                self.forget(row_id, owner)
        return renewed

    def orphaned(self, now: float) -> tuple[str, tuple[Any, ...]]:
        """SQL condition (and its arguments) of in-flight rows nobody works on any more.

        SQLite: every in-flight row (one process serves the state; its recovery runs at start). Shared state: the
        in-flight rows whose lease is over.
        """
        if self.state_db.leases:
            return f"state = '{self.in_flight}' AND lease_expires_at <= ?", (now,)
        return f"state = '{self.in_flight}'", ()

    def notify(self) -> None:
        """Wake idle consumers of this table after a commit that queued work: those of this process at once
        (:meth:`StateDB.wakeup <dermnode.workqueue.db.StateDB.wakeup>`, both backends) and those of other
        processes by ``NOTIFY`` (PostgreSQL). Never raises: consumers poll anyway."""
        self.state_db.wakeup(self.channel).set()
        try:
            self.state_db.notify(self._conn(), self.channel)
        except Exception as exc:  # they poll anyway
            logger.debug("notify on %s failed: %s", self.channel, exc)

    def _record_failure(
        self,
        row_id: int,
        attempts: int,
        error: str,
        *,
        permanent: bool,
        sop_instance_uid: str = "",
        destination: str = "",
        clear_owner: bool = False,
        owner: str | None = None,
    ) -> bool:
        """Dead-letter the row (:meth:`exhausted`) or put it back to ``pending``, due after :meth:`backoff`.

        Where the state is shared, only while the claim of ``owner`` on attempt ``attempts`` still holds the row
        (:meth:`holder_guard`); otherwise nothing changes and "lease lost" is logged (:meth:`lease_lost`).

        Returns
        -------
        bool
            ``True`` when the row was dead-lettered (``False`` also when the lease was lost).

        Raises
        ------
        sqlite3.Error, psycopg.Error
            When the state database cannot be written (callers retry with :func:`retry_state_update`).
        """
        conn = self._conn()
        guard, guard_args = self.holder_guard(owner, attempts)
        if self.exhausted(attempts, permanent=permanent):
            recorded = dead_letter(
                conn,
                self.table,
                row_id,
                error=error,
                attempts=attempts,
                sop_instance_uid=sop_instance_uid,
                destination=destination,
                guard=guard,
                guard_args=guard_args,
            )
            if not recorded:
                self.lease_lost(row_id, owner)
                return False
            self.forget(row_id, owner)
            return True
        now = time.time()
        clear = "owner = NULL, " if clear_owner else ""
        cur = conn.execute(
            f"UPDATE {self.table} SET state = 'pending', last_error = ?, {clear}next_attempt_at = ?, updated_at = ?"
            f" WHERE id = ?{guard}",
            (error, now + self.backoff(attempts), now, row_id, *guard_args),
        )
        if guard and int(cur.rowcount) == 0:
            self.lease_lost(row_id, owner)
        else:
            self.forget(row_id, owner)
        return False

    def replay(self, row_id: int | None = None) -> int:
        """Put dead-lettered items (one, or all) back into the queue with a fresh attempt count."""
        n = replay_dead(self._conn(), self.table, row_id)
        if n:
            self.notify()
        return n

    def state_of(self, row_id: int) -> str | None:
        """The state of item ``row_id`` (``pending``, ``done``, ``dead``, ...), or ``None`` when there is none."""
        row = self._conn().execute(f"SELECT state FROM {self.table} WHERE id = ?", (row_id,)).fetchone()
        return None if row is None else str(row["state"])

    def _state_counts(self, states: tuple[str, ...]) -> dict[str, int]:
        """Items by state, in the order of ``states`` (0 for a state without items)."""
        out = dict.fromkeys(states, 0)
        for row in self._conn().execute(f"SELECT state, COUNT(*) AS n FROM {self.table} GROUP BY state"):
            out[row["state"]] = row["n"]
        return out
