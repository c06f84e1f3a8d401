"""The durable job queue: one job per received SOP Instance, with retry and dead-letter.

States: ``pending`` -> ``running`` -> ``done``; a failed attempt goes back to ``pending`` with a delay until
``max_attempts`` is reached, then to ``dead`` with a row in ``dead_letters`` (the claim, backoff and dead-letter
mechanism shared with the outbox: :class:`~dermnode.workqueue.base.WorkQueue`). An attempt is counted when the job
is claimed. A job left ``running`` by a process that died (or was stopped before the job finished) is handled by
:meth:`JobQueue.recover` at start-up: it goes back to ``pending`` while it has attempts left, and is
dead-lettered ("interrupted on attempt N of N") once the interrupted attempt was its last, so an input that
crashes the process is tried ``max_attempts`` times and then lands in the dead letters instead of looping.

Where several processes share the state (PostgreSQL), :meth:`JobQueue.recover` takes only the running jobs whose
lease is over (their worker died or lost the database) and is also called periodically by the worker pool, so a
job of a dead host is finished by another after the lease. A job carries the owner of its claim, and
:meth:`JobQueue.complete`, :meth:`JobQueue.fail` and :meth:`JobQueue.release` change it only while that claim still
holds it (still ``running``, same owner, same attempt): a worker whose lease lapsed logs "lease lost" and leaves the
row of the worker that took the job over untouched.

A dead job whose instance is received again is re-queued with a fresh attempt count
(:meth:`JobQueue.requeue_dead`); in any other state a repeated SOP Instance UID is a duplicate.

The methods the Store SCP calls before it answers (:meth:`JobQueue.state`, :meth:`JobQueue.contains`,
:meth:`JobQueue.enqueue`, :meth:`JobQueue.requeue_dead`) raise :class:`~dermnode.errors.StorageError` for any
database error, so the SCP can answer "out of resources".
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dermnode.errors import StorageError
from dermnode.workqueue.base import WorkQueue
from dermnode.workqueue.db import (
    DB_ERRORS,
    JOBS_CHANNEL,
    Row,
    StateDB,
    dead_letter_in_transaction,
    replay_dead_in_transaction,
)

logger = logging.getLogger(__name__)

JOB_STATES = ("pending", "running", "done", "dead")


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    path: Path
    calling_aet: str
    attempts: int
    #: The owner recorded by the claim (the lease holder where the state is shared).
    owner: str | None = None


_INSERT_JOB = (
    "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, path, calling_aet, peer, received_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


@dataclass
class _Insert:
    """One caller's job insert waiting for its group commit (:meth:`JobQueue.enqueue`)."""

    args: tuple[object, ...]
    done: bool = False
    created: bool = False
    error: Exception | None = None


#: Longest pause between two attempts of a job (``workers.retry_delay_max_s``'s default).
DEFAULT_RETRY_DELAY_MAX_S = 600.0


class JobQueue(WorkQueue):
    """The job queue on the state database (SQLite or PostgreSQL). Thread-safe: each thread gets its own connection.

    Parameters
    ----------
    db_path:
        The state database: an SQLite file or a :class:`~dermnode.workqueue.db.StateDB`.
    max_attempts:
        Attempts before a job is dead-lettered.
    retry_delay_s:
        Delay before a failed job is retried; it doubles with each attempt ...
    retry_delay_max_s:
        ... up to this.
    """

    table = "jobs"
    in_flight = "running"
    channel = JOBS_CHANNEL

    def __init__(
        self,
        db_path: StateDB | Path,
        max_attempts: int = 3,
        retry_delay_s: float = 5.0,
        retry_delay_max_s: float = DEFAULT_RETRY_DELAY_MAX_S,
    ) -> None:
        super().__init__(
            db_path, max_attempts=max_attempts, backoff_initial_s=retry_delay_s, backoff_max_s=retry_delay_max_s
        )
        # group commit of concurrent enqueues (:meth:`enqueue`): who commits now, and what waits for the next commit
        self._group = threading.Condition(threading.Lock())
        self._group_leading = False
        self._group_queue: list[_Insert] = []

    @property
    def retry_delay_s(self) -> float:
        """The delay before the first retry."""
        return self.backoff_initial_s

    # -- producer side (the SCP) --------------------------------------------------------------------------
    def state(self, sop_instance_uid: str) -> str | None:
        """State of the job of an instance (one of :data:`JOB_STATES`), ``None`` when there is none.

        Raises
        ------
        StorageError
            When the database cannot be read.
        """
        try:
            row = (
                self._conn()
                .execute("SELECT state FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,))
                .fetchone()
            )
        except DB_ERRORS as exc:
            raise StorageError(f"cannot look up the job of an instance: {exc}") from exc
        return None if row is None else str(row["state"])

    def contains(self, sop_instance_uid: str) -> bool:
        """Whether the instance has a job, in any state.

        Raises
        ------
        StorageError
            When the database cannot be read.
        """
        return self.state(sop_instance_uid) is not None

    def enqueue(
        self,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        *,
        study_instance_uid: str = "",
        calling_aet: str = "",
        peer: str = "",
    ) -> bool:
        """Record a spooled instance as a pending job (durably committed on return).

        Concurrent calls (the Store SCP's associations) share commits: while one caller commits, the inserts of
        the others queue up and the next of them commits them all in one transaction (group commit: one WAL sync
        on SQLite, one round trip on PostgreSQL, and no writer waiting on SQLite's lock). Each caller still returns
        only once its own insert is committed, and a failure is raised to the caller whose insert failed.

        Returns
        -------
        bool
            ``True`` if a new job was created, ``False`` if the SOP Instance UID was already known.

        Raises
        ------
        StorageError
            When the job cannot be committed.
        """
        now = time.time()
        insert = _Insert((sop_instance_uid, sop_class_uid, study_instance_uid, str(path), calling_aet, peer, now, now))
        with self._group:
            self._group_queue.append(insert)
            while self._group_leading and not insert.done:
                self._group.wait()
            lead = not insert.done
            if lead:  # take every insert queued meanwhile, this one included, and commit them together
                self._group_leading = True
                batch, self._group_queue = self._group_queue, []
        if lead:
            try:
                self._commit_inserts(batch)
            finally:
                with self._group:
                    self._group_leading = False
                    for item in batch:
                        item.done = True
                    self._group.notify_all()
        if insert.error is not None:
            if isinstance(insert.error, DB_ERRORS):
                raise StorageError(f"cannot record job for an instance: {insert.error}") from insert.error
            raise insert.error
        return insert.created

    def _commit_inserts(self, batch: list[_Insert]) -> None:
        """Commit the job inserts of ``batch`` (group commit: one transaction, one WAL sync, for all of them) and
        record each one's outcome on it; if the transaction fails, each insert is tried on its own so that one
        bad insert fails alone. Wakes idle workers once when any job was created. Never raises."""
        try:
            conn = self._conn()
            if len(batch) == 1:
                batch[0].created = conn.execute(_INSERT_JOB, batch[0].args).rowcount == 1
            else:
                with conn.transaction():
                    for item in batch:
                        item.created = conn.execute(_INSERT_JOB, item.args).rowcount == 1
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                logger.warning("group commit of %d jobs failed, committing them one by one: %s", len(batch), exc)
                for item in batch:
                    try:
                        item.created = self._conn().execute(_INSERT_JOB, item.args).rowcount == 1
                    except Exception as one:
                        item.error = one
        if any(item.created for item in batch):
            self.notify()

    def requeue_dead(
        self,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        *,
        study_instance_uid: str = "",
        calling_aet: str = "",
        peer: str = "",
    ) -> bool:
        """Put the dead job of a re-received instance back to ``pending`` with a fresh attempt count.

        The job takes the new copy's attributes (path, classes, sender), its error and outcome are cleared, and
        its open dead-letter rows are marked replayed, in one transaction.

        Returns
        -------
        bool
            ``True`` when the job was dead and is now pending; ``False`` when it was not dead (any more), e.g.
            because a concurrent association re-queued it first.

        Raises
        ------
        StorageError
            When the change cannot be committed.
        """
        conn = self._conn()
        try:
            with conn.transaction():
                row = conn.execute(
                    "UPDATE jobs SET last_error = NULL, outcome = NULL, owner = NULL, sop_class_uid = ?,"
                    " study_instance_uid = ?, path = ?, calling_aet = ?, peer = ?"
                    " WHERE sop_instance_uid = ? AND state = 'dead' RETURNING id",
                    (sop_class_uid, study_instance_uid, str(path), calling_aet, peer, sop_instance_uid),
                ).fetchone()
                requeued = row is not None and replay_dead_in_transaction(conn, "jobs", row["id"]) == 1
        except DB_ERRORS as exc:
            raise StorageError(f"cannot re-queue the dead job of a re-received instance: {exc}") from exc
        if requeued:
            self.notify()
        return requeued

    # -- consumer side (the workers) ----------------------------------------------------------------------
    def claim(self, owner: str) -> Job | None:
        """Atomically take the oldest due pending job, mark it running and count the attempt."""
        row = self._claim_row(
            "id, sop_instance_uid, sop_class_uid, study_instance_uid, path, calling_aet, attempts", owner=owner
        )
        if row is None:
            return None
        return Job(
            id=row["id"],
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            study_instance_uid=row["study_instance_uid"],
            path=Path(row["path"]),
            calling_aet=row["calling_aet"],
            attempts=row["attempts"],
            owner=owner,
        )

    def complete(self, job: Job, outcome: str) -> bool:
        """Record a job as done; ``False`` (and nothing changed, "lease lost" logged) when, on shared state, its
        claim no longer holds it because another worker took it over after the lease."""
        guard, guard_args = self.holder_guard(job.owner, job.attempts)
        cur = self._conn().execute(
            "UPDATE jobs SET state = 'done', outcome = ?, last_error = NULL, owner = NULL, updated_at = ?"
            f" WHERE id = ?{guard}",
            (outcome, time.time(), job.id, *guard_args),
        )
        if guard and int(cur.rowcount) == 0:
            self.lease_lost(job.id, job.owner)
            return False
        self.forget(job.id, job.owner)
        return True

    def fail(self, job: Job, error: str, *, permanent: bool = False) -> bool:
        """Record a failed attempt. Returns ``True`` when the job was dead-lettered."""
        return self._record_failure(
            job.id,
            job.attempts,
            error,
            permanent=permanent,
            sop_instance_uid=job.sop_instance_uid,
            clear_owner=True,
            owner=job.owner,
        )

    def release(self, job: Job) -> None:
        """Give a claimed job back untouched (shutdown before it ran); the attempt is not counted."""
        guard, guard_args = self.holder_guard(job.owner, job.attempts)
        cur = self._conn().execute(
            "UPDATE jobs SET state = 'pending', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,"
            " owner = NULL, updated_at = ?"
            f" WHERE id = ? AND state = 'running'{guard}",
            (time.time(), job.id, *guard_args),
        )
        if guard and int(cur.rowcount) == 0:
            self.lease_lost(job.id, job.owner)
        else:
            self.forget(job.id, job.owner)

    def recover(self) -> int:
        """Handle jobs left ``running`` by a process that stopped: re-queue them or dead-letter them.

        The interrupted attempt counts (it was counted when the job was claimed). A job whose interrupted attempt
        was its last (``attempts >= max_attempts``) is dead-lettered with the reason "interrupted on attempt N of
        M (the process stopped while analysing it)", plus its previous error if it had one, so an input that
        kills the process ends in the dead letters; the others go back to ``pending``, due at once. With several
        workers, a job running beside the culprit may be dead-lettered with it; its reason names the jobs that ran
        at the same time, so an operator can replay the innocent one.

        Returns
        -------
        int
            The number of jobs re-queued (dead-lettered ones not included).
        """
        conn = self._conn()
        now = time.time()
        orphaned, args = self.orphaned(now)
        with conn.transaction():
            rows = conn.execute(
                f"SELECT id, sop_instance_uid, attempts, last_error FROM jobs WHERE {orphaned} ORDER BY id"
                f"{self.state_db.lock_rows}",
                args,
            ).fetchall()
            running = [r["id"] for r in rows]
            for row in rows:
                if row["attempts"] < self.max_attempts:
                    continue
                reason = (
                    f"interrupted on attempt {row['attempts']} of {self.max_attempts}"
                    " (the process stopped while analysing it)"
                )
                others = [str(i) for i in running if i != row["id"]]
                if others:  # with several workers the culprit cannot be told apart: say so, replay may be right
                    reason += (
                        f"; job(s) {', '.join(others)} were running at the same time, so this image may not be the "
                        "cause: replay it once the cause is known"
                    )
                if row["last_error"]:
                    reason += f"; previous error: {row['last_error']}"
                dead_letter_in_transaction(
                    conn,
                    "jobs",
                    row["id"],
                    error=reason,
                    attempts=row["attempts"],
                    sop_instance_uid=row["sop_instance_uid"],
                )
                logger.error("job %d (sop_instance=%s) dead-lettered: %s", row["id"], row["sop_instance_uid"], reason)
            requeue = [r["id"] for r in rows if r["attempts"] < self.max_attempts]
            count = 0
            if requeue:
                cur = conn.execute(
                    "UPDATE jobs SET state = 'pending', owner = NULL, next_attempt_at = 0, updated_at = ?"
                    f" WHERE state = 'running' AND id IN ({', '.join('?' for _ in requeue)})",
                    (now, *requeue),
                )
                count = int(cur.rowcount)
        if count:
            logger.warning("re-queued %d job(s) interrupted by a previous shutdown or crash", count)
            self.notify()
        return count

    # -- reporting ----------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Jobs by state plus ``failed`` (pending jobs that already failed at least once)."""
        conn = self._conn()
        out = self._state_counts(JOB_STATES)
        failed = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND last_error IS NOT NULL"
        ).fetchone()[0]
        out["failed"] = failed
        out["dead_letter"] = out.pop("dead")
        return out

    def get(self, sop_instance_uid: str) -> Row | None:
        row: Row | None = (
            self._conn().execute("SELECT * FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        )
        return row

    def dead_letters(self, kind: str | None = None) -> list[Row]:
        sql = "SELECT * FROM dead_letters"
        args: tuple[str, ...] = ()
        if kind:
            sql += " WHERE kind = ?"
            args = (kind,)
        return list(self._conn().execute(sql + " ORDER BY id", args))

    def known_paths(self) -> set[str]:
        return {row[0] for row in self._conn().execute("SELECT path FROM jobs")}
