"""The persistent delivery outbox (DICOM C-STORE to PACS, FHIR transactions to the EHR).

A delivery is one object (a SEG or SR file, a FHIR bundle file) for one destination. It is recorded
with ``UNIQUE(destination, object_key)``, so re-processing a job never queues a second copy. A failed send is
retried with exponential backoff (``delivery.backoff_initial_s`` doubling up to ``delivery.backoff_max_s``)
until ``delivery.max_attempts``, then dead-lettered with the last error (the claim, backoff and dead-letter
mechanism shared with the job queue: :class:`~dermnode.workqueue.base.WorkQueue`). A permanent failure (a DICOM
refusal, an HTTP 4xx) is dead-lettered at once. Retries resend the same file, hence the same SOP Instance
UIDs or FHIR identifiers: idempotent at the receiver. Where the state is shared, a delivery carries the owner of its
claim and its outcome is recorded only while that claim still holds it (:meth:`WorkQueue.holder_guard`).

A kind whose deliverer is a :class:`BatchDeliverer` (DICOM: one association) is sent in batches: one claim takes
the oldest due delivery and up to ``max_batch - 1`` more due deliveries of the same kind and destination (those of
the same job first), in one transaction, and the deliverer sends them together; each delivery's outcome (sent,
retry after its own backoff, dead letter) is still recorded on its own row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dermnode.errors import DeliveryError, StorageError
from dermnode.settings import DeliverySettings
from dermnode.workqueue.base import StateUpdateAbandonedError, WorkQueue, retry_state_update
from dermnode.workqueue.db import CLAIM_ERRORS, DB_ERRORS, DELIVERIES_CHANNEL, Row, StateDB

logger = logging.getLogger(__name__)
audit = logging.getLogger("dermnode.audit")

DELIVERY_STATES = ("pending", "sending", "done", "dead")


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int | None
    kind: str  # "dicom" | "fhir"
    destination: str
    object_key: str
    path: Path
    attempts: int
    #: The owner recorded by the claim (the lease holder where the state is shared).
    owner: str | None = None


#: A deliverer sends one delivery or raises :class:`DeliveryError`.
Deliverer = Callable[[Delivery], None]

#: Most deliveries a :class:`BatchDeliverer` gets at once by default: well above one job's objects for one PACS (3).
MAX_BATCH = 16

#: Queues one delivery (``add``, ``add_all``): nothing when the object is already queued for the destination.
_INSERT = (
    "INSERT INTO deliveries (job_id, kind, destination, object_key, path, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)

#: The columns a claim returns (those of :class:`Delivery`).
_CLAIMED = "id, job_id, kind, destination, object_key, path, attempts"


class BatchDeliverer:
    """A deliverer that sends several deliveries of one kind to one destination together (one DICOM association).

    It is a :data:`Deliverer` too: called with one delivery, it sends that one and raises its failure.

    Parameters
    ----------
    send:
        Sends the deliveries it is given (all to one destination, in order) and returns one outcome per delivery,
        in the same order: ``None`` when sent, else the :class:`DeliveryError` (``permanent`` or not). It may
        instead raise :class:`DeliveryError` when that is every delivery's outcome.
    max_batch:
        The most deliveries one call gets (at least 1).
    """

    def __init__(
        self, send: Callable[[Sequence[Delivery]], Sequence[DeliveryError | None]], *, max_batch: int = MAX_BATCH
    ) -> None:
        self.send = send
        self.max_batch = max(1, max_batch)

    def __call__(self, delivery: Delivery) -> None:
        """Send one delivery.

        Raises
        ------
        DeliveryError
            When it was not sent.
        """
        outcomes = self.send([delivery])
        if len(outcomes) != 1:
            raise DeliveryError(f"deliverer answered {len(outcomes)} outcomes for 1 delivery")
        if outcomes[0] is not None:
            raise outcomes[0]


def _delivery(row: Row, owner: str | None) -> Delivery:
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        kind=row["kind"],
        destination=row["destination"],
        object_key=row["object_key"],
        path=Path(row["path"]),
        attempts=row["attempts"],
        owner=owner,
    )


class Outbox(WorkQueue):
    """The outbox on the state database (SQLite or PostgreSQL). Thread-safe: one connection per thread.

    Raises
    ------
    StorageError
        From the constructor, when the database cannot be opened.
    """

    table = "deliveries"
    in_flight = "sending"
    channel = DELIVERIES_CHANNEL

    def __init__(self, db_path: StateDB | Path, settings: DeliverySettings) -> None:
        self.settings = settings
        self._sending: dict[str, int] = {}  # destinations with a delivery in flight from this object: how many
        self._dispatch = threading.Lock()  # a claim and the marking of its destination as busy are one step
        super().__init__(
            db_path,
            max_attempts=settings.max_attempts,
            backoff_initial_s=settings.backoff_initial_s,
            backoff_max_s=settings.backoff_max_s,
        )

    def add(self, job_id: int | None, kind: str, destination: str, object_key: str, path: Path) -> bool:
        """Queue one object for one destination; returns ``False`` if it was already queued.

        Raises
        ------
        StorageError
            When the delivery cannot be recorded.
        """
        now = time.time()
        try:
            cur = self._conn().execute(_INSERT, (job_id, kind, destination, object_key, str(path), now, now))
        except DB_ERRORS as exc:
            raise StorageError(f"cannot record delivery {object_key} to {destination}: {exc}") from exc
        created = cur.rowcount == 1
        if created:
            self.notify()
        return created

    def add_all(self, items: Sequence[tuple[int | None, str, str, str, Path]]) -> int:
        """Queue several objects at once, in one transaction with one wake-up; returns how many were new.

        A job's result objects queued so are claimed together by the next :meth:`pump_once` (one association per
        PACS), where one :meth:`add` each may wake a delivery thread that claims the first before the next is queued.

        Parameters
        ----------
        items:
            ``(job_id, kind, destination, object_key, path)`` each, as :meth:`add` takes them; one already queued
            is left as it is.

        Raises
        ------
        StorageError
            When the deliveries cannot be recorded (none is).
        """
        if not items:
            return 0
        now = time.time()
        created = 0
        try:
            conn = self._conn()
            with conn.transaction():
                for job_id, kind, destination, object_key, path in items:
                    cur = conn.execute(_INSERT, (job_id, kind, destination, object_key, str(path), now, now))
                    created += int(cur.rowcount == 1)
        except DB_ERRORS as exc:
            raise StorageError(f"cannot record {len(items)} deliveries: {exc}") from exc
        if created:
            self.notify()
        return created

    def claim(self, owner: str | None = None, *, exclude: Collection[str] = ()) -> Delivery | None:
        """Take the oldest due delivery (marking it ``sending``; owner and lease where the state is shared).

        Parameters
        ----------
        owner:
            Recorded on the claim (default: :meth:`WorkQueue.claim_owner`).
        exclude:
            Destinations whose deliveries are not taken (those this process is sending to right now).
        """
        batch = self.claim_batch(owner, exclude=exclude)
        return batch[0] if batch else None

    def claim_batch(
        self, owner: str | None = None, *, exclude: Collection[str] = (), limits: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        """Take the oldest due delivery and, where its kind is sent in batches, more of its destination, at once.

        In one transaction: the oldest due ``pending`` delivery is picked (as :meth:`claim` picks it); when
        ``limits`` allows more than one of its kind, up to that many due ``pending`` deliveries of the same kind
        and destination are added, those of the same job first, then the oldest. Every one is marked ``sending``,
        its attempt counted, and, where the state is shared, gets the owner and a lease (rows locked by another
        claimer are skipped, as by :meth:`claim`). Only rows still ``pending`` at the update are taken.

        Parameters
        ----------
        owner:
            Recorded on the claim (default: :meth:`WorkQueue.claim_owner`).
        exclude:
            Destinations whose deliveries are not taken (those this process is sending to right now).
        limits:
            The most deliveries one claim takes, by kind; kinds not named: 1.

        Returns
        -------
        list of Delivery
            The claimed deliveries, the oldest due one first; empty when none is due (or when the database is busy
            or its connection lost: logged, the caller's loop tries again).
        """
        owner = self.claim_owner(owner)
        db = self.state_db
        skip = sorted(exclude)
        not_in = f" AND destination NOT IN ({', '.join('?' for _ in skip)})" if skip else ""
        due = "state = 'pending' AND next_attempt_at <= ?"
        try:
            conn = self._conn()
            with conn.transaction():
                now = time.time()
                first = conn.execute(
                    f"SELECT id, job_id, kind, destination FROM deliveries WHERE {due}{not_in}"
                    f" ORDER BY id LIMIT 1{db.lock_rows}",
                    (now, *skip),
                ).fetchone()
                if first is None:
                    return []
                ids = [int(first["id"])]
                limit = max(1, (limits or {}).get(str(first["kind"]), 1))
                if limit > 1:
                    more = conn.execute(
                        f"SELECT id FROM deliveries WHERE {due} AND kind = ? AND destination = ? AND id <> ?"
                        f" ORDER BY CASE WHEN job_id = ? THEN 0 ELSE 1 END, id LIMIT ?{db.lock_rows}",
                        (now, first["kind"], first["destination"], first["id"], first["job_id"], limit - 1),
                    ).fetchall()
                    ids += [int(r["id"]) for r in more]
                sets, args = self.claim_assignments(owner, now)
                rows = conn.execute(
                    f"UPDATE deliveries SET state = 'sending', attempts = attempts + 1, {sets}updated_at = ?"
                    f" WHERE state = 'pending' AND id IN ({', '.join('?' for _ in ids)}) RETURNING {_CLAIMED}",
                    (*args, now, *ids),
                ).fetchall()
        except CLAIM_ERRORS as exc:
            logger.warning("%s claim failed, will retry: %s", self.table, exc)
            return []
        claimed = {int(row["id"]): _delivery(row, owner) for row in rows}
        if db.leases and owner is not None:
            with self._held_lock:
                self._held.update(dict.fromkeys(claimed, owner))
        return [claimed[i] for i in ids if i in claimed]

    def delivered(self, delivery: Delivery) -> bool:
        """Record a successful send; ``False`` (nothing changed, "lease lost" logged) when, on shared state, the
        claim no longer holds the delivery because another worker took it over after the lease.

        Raises
        ------
        sqlite3.Error, psycopg.Error
            When the state database cannot be written (:meth:`pump_once` retries).
        """
        now = time.time()
        guard, guard_args = self.holder_guard(delivery.owner, delivery.attempts)
        cur = self._conn().execute(
            "UPDATE deliveries SET state = 'done', last_error = NULL, delivered_at = ?, updated_at = ?"
            f" WHERE id = ?{guard}",
            (now, now, delivery.id, *guard_args),
        )
        if guard and int(cur.rowcount) == 0:
            self.lease_lost(delivery.id, delivery.owner)
            return False
        self.forget(delivery.id, delivery.owner)
        return True

    def failed(self, delivery: Delivery, error: str, *, permanent: bool) -> bool:
        """Record a failed attempt; returns ``True`` when the delivery was dead-lettered.

        Raises
        ------
        sqlite3.Error, psycopg.Error
            When the state database cannot be written (:meth:`pump_once` retries).
        """
        sop_instance_uid = ""
        if self.exhausted(delivery.attempts, permanent=permanent):
            # the source image the result belongs to, so that a dead letter names it (like a job's does)
            row = (
                self._conn()
                .execute(
                    "SELECT j.sop_instance_uid FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.id = ?",
                    (delivery.id,),
                )
                .fetchone()
            )
            sop_instance_uid = "" if row is None else str(row[0])
        return self._record_failure(
            delivery.id,
            delivery.attempts,
            error,
            permanent=permanent,
            sop_instance_uid=sop_instance_uid,
            destination=delivery.destination,
            owner=delivery.owner,
        )

    def recover(self) -> int:
        """Deliveries left ``sending`` by a dead process go back to ``pending`` (resent: idempotent).

        Where the state is shared, only those whose lease is over (:meth:`WorkQueue.orphaned`).
        """
        orphaned, args = self.orphaned(time.time())
        cur = self._conn().execute(
            f"UPDATE deliveries SET state = 'pending', next_attempt_at = 0 WHERE {orphaned}", args
        )
        if cur.rowcount:
            self.notify()
        return int(cur.rowcount)

    def counts(self) -> dict[str, int]:
        """Deliveries by state, ``dead`` reported as ``dead_letter``."""
        out = self._state_counts(DELIVERY_STATES)
        out["dead_letter"] = out.pop("dead")
        return out

    def for_job(self, job_id: int) -> list[Row]:
        return list(
            self._conn().execute(
                "SELECT kind, destination, object_key, state, attempts, last_error FROM deliveries"
                " WHERE job_id = ? ORDER BY id",
                (job_id,),
            )
        )

    def busy_destinations(self) -> frozenset[str]:
        """Destinations a :meth:`pump_once` of this object is sending to right now."""
        with self._dispatch:
            return frozenset(self._sending)

    def pump_once(self, deliverers: Mapping[str, Deliverer], stop: threading.Event | None = None) -> bool:
        """Send the next due delivery, if any, with the due deliveries its deliverer takes along; returns whether one
        was attempted.

        Where the deliverer of the oldest due delivery's kind is a :class:`BatchDeliverer`, the claim takes up to its
        ``max_batch`` due deliveries of that kind and destination (:meth:`claim_batch`: those of the same job first)
        and they are sent together (DICOM: over one association); otherwise that one delivery alone. Each outcome is
        recorded on its own delivery, as if it had been sent alone.

        Safe to call from several threads at once (the worker pool's delivery threads): deliveries to different
        destinations (PACS A, PACS B, the FHIR server) are sent concurrently, while a destination with a delivery
        in flight from this object is skipped by the other callers' claims, so each destination still gets its
        deliveries one call at a time, oldest first, each with its own backoff.

        The outcome is recorded with :func:`retry_state_update`: a delivery never stays ``sending`` because its
        state update failed once. It is left ``sending`` (and resent after the next start, which is idempotent)
        only when ``stop`` is set while the update still fails.

        Parameters
        ----------
        deliverers:
            Delivery functions by kind.
        stop:
            Ends the retries of the state update (shutdown); ``None``: retry until it succeeds.

        Raises
        ------
        sqlite3.Error, psycopg.Error
            Never for a failed send or state update; only when claiming a delivery fails with an error other
            than a busy database (the caller's loop logs it and carries on).
        """
        limits = {kind: d.max_batch for kind, d in deliverers.items() if isinstance(d, BatchDeliverer)}
        with self._dispatch:
            batch = self.claim_batch(exclude=self._sending, limits=limits)
            if not batch:
                return False
            destination = batch[0].destination
            self._sending[destination] = self._sending.get(destination, 0) + 1
        try:
            self._send(batch, deliverers, stop)
        finally:
            with self._dispatch:
                left = self._sending.pop(destination, 1) - 1
                if left > 0:
                    self._sending[destination] = left
        return True

    def _send(
        self, batch: Sequence[Delivery], deliverers: Mapping[str, Deliverer], stop: threading.Event | None
    ) -> None:
        """Send claimed deliveries (one kind, one destination) and record each outcome (see :meth:`pump_once`)."""
        halt = stop if stop is not None else threading.Event()
        deliverer = deliverers.get(batch[0].kind)
        outcomes: list[tuple[str, bool] | None]  # per delivery: None (sent) or (error, permanent)
        if deliverer is None:
            outcomes = [(f"no deliverer configured for kind {batch[0].kind!r}", True)] * len(batch)
        elif isinstance(deliverer, BatchDeliverer):
            outcomes = self._attempt_batch(deliverer, batch)
            if len(batch) > 1:
                logger.debug(
                    "sent %d deliveries to %s together: %d delivered",
                    len(batch),
                    batch[0].destination,
                    sum(o is None for o in outcomes),
                )
        else:
            outcomes = [self._attempt(deliverer, delivery) for delivery in batch]  # one, unless claimed otherwise
        for delivery, outcome in zip(batch, outcomes, strict=True):
            self._record(delivery, outcome, halt)

    @staticmethod
    def _attempt(deliverer: Deliverer, delivery: Delivery) -> tuple[str, bool] | None:
        """Send one delivery: ``None`` when sent, else ``(error, permanent)``."""
        try:
            deliverer(delivery)
        except DeliveryError as exc:
            return str(exc), exc.permanent
        except Exception as exc:
            logger.exception("unexpected error delivering %s", delivery.object_key)
            return f"unexpected error: {exc!r}", False
        return None

    @staticmethod
    def _attempt_batch(deliverer: BatchDeliverer, batch: Sequence[Delivery]) -> list[tuple[str, bool] | None]:
        """Send deliveries together: per delivery, ``None`` when sent, else ``(error, permanent)``."""
        try:
            answers = deliverer.send(batch)
            if len(answers) != len(batch):
                raise RuntimeError(f"deliverer answered {len(answers)} outcomes for {len(batch)} deliveries")
        except DeliveryError as exc:
            return [(str(exc), exc.permanent)] * len(batch)
        except Exception as exc:
            logger.exception("unexpected error delivering %s", ", ".join(d.object_key for d in batch))
            return [(f"unexpected error: {exc!r}", False)] * len(batch)
        return [None if a is None else (str(a), a.permanent) for a in answers]

    def _record(self, delivery: Delivery, outcome: tuple[str, bool] | None, halt: threading.Event) -> None:
        """Record the outcome of one sent delivery: ``None`` (delivered) or ``(error, permanent)``."""
        try:
            if outcome is None:
                retry_state_update(lambda: self.delivered(delivery), what=f"delivery {delivery.id} as sent", stop=halt)
                audit.info(
                    "delivered %s %s to %s (attempt %d)",
                    delivery.kind,
                    delivery.object_key,
                    delivery.destination,
                    delivery.attempts,
                )
            else:
                message, permanent = outcome
                dead = retry_state_update(
                    lambda: self.failed(delivery, message, permanent=permanent),
                    what=f"failed attempt of delivery {delivery.id}",
                    stop=halt,
                )
                audit.warning(
                    "delivery %s of %s to %s failed (attempt %d%s): %s",
                    delivery.id,
                    delivery.object_key,
                    delivery.destination,
                    delivery.attempts,
                    ", dead-lettered" if dead else f", retry in {self.backoff(delivery.attempts):.0f}s",
                    message,
                )
        except StateUpdateAbandonedError as exc:
            logger.warning("%s; delivery %d stays 'sending' and is resent after the next start", exc, delivery.id)
