"""The persistent delivery outbox (DICOM C-STORE to PACS, FHIR transactions to the EHR).

A delivery is one object (a SEG or SR file, a FHIR bundle file) for one destination. It is recorded
with ``UNIQUE(destination, object_key)``, so re-processing a job never queues a second copy. A failed send is
retried with exponential backoff (``delivery.backoff_initial_s`` doubling up to ``delivery.backoff_max_s``)
until ``delivery.max_attempts``, then dead-lettered with the last error (the claim, backoff and dead-letter
mechanism shared with the job queue: :class:`~dermnode.workqueue.base.WorkQueue`). A permanent failure (a DICOM
refusal, an HTTP 4xx) is dead-lettered at once. Retries resend the same file, hence the same SOP Instance
UIDs or FHIR identifiers: idempotent at the receiver. Where the state is shared, a delivery carries the owner of its
claim and its outcome is recorded only while that claim still holds it (:meth:`WorkQueue.holder_guard`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from dermnode.errors import DeliveryError, StorageError
from dermnode.settings import DeliverySettings
from dermnode.workqueue.base import StateUpdateAbandonedError, WorkQueue, retry_state_update
from dermnode.workqueue.db import DB_ERRORS, DELIVERIES_CHANNEL, Row, StateDB

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
            cur = self._conn().execute(
                "INSERT INTO deliveries (job_id, kind, destination, object_key, path, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job_id, kind, destination, object_key, str(path), now, now),
            )
        except DB_ERRORS as exc:
            raise StorageError(f"cannot record delivery {object_key} to {destination}: {exc}") from exc
        created = cur.rowcount == 1
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
        owner = self.claim_owner(owner)
        skip = sorted(exclude)
        where = f" AND destination NOT IN ({', '.join('?' for _ in skip)})" if skip else ""
        row = self._claim_row(
            "id, job_id, kind, destination, object_key, path, attempts", owner=owner, where=where, where_args=skip
        )
        if row is None:
            return None
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
        """Send one due delivery, if any; returns whether one was attempted.

        Safe to call from several threads at once (the worker pool's delivery threads): deliveries to different
        destinations (PACS A, PACS B, the FHIR server) are sent concurrently, while a destination with a delivery
        in flight from this object is skipped by the other callers' claims, so each destination still gets its
        deliveries one at a time, oldest first, with its own backoff.

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
        with self._dispatch:
            delivery = self.claim(exclude=self._sending)
            if delivery is None:
                return False
            self._sending[delivery.destination] = self._sending.get(delivery.destination, 0) + 1
        try:
            self._send(delivery, deliverers, stop)
        finally:
            with self._dispatch:
                left = self._sending.pop(delivery.destination, 1) - 1
                if left > 0:
                    self._sending[delivery.destination] = left
        return True

    def _send(self, delivery: Delivery, deliverers: Mapping[str, Deliverer], stop: threading.Event | None) -> None:
        """Send one claimed delivery and record its outcome (see :meth:`pump_once`)."""
        halt = stop if stop is not None else threading.Event()
        deliverer = deliverers.get(delivery.kind)
        error: str | None = None
        permanent = False
        try:
            if deliverer is None:
                raise DeliveryError(f"no deliverer configured for kind {delivery.kind!r}", permanent=True)
            deliverer(delivery)
        except DeliveryError as exc:
            error, permanent = str(exc), exc.permanent
        except Exception as exc:
            logger.exception("unexpected error delivering %s", delivery.object_key)
            error = f"unexpected error: {exc!r}"
        try:
            if error is None:
                retry_state_update(lambda: self.delivered(delivery), what=f"delivery {delivery.id} as sent", stop=halt)
                audit.info(
                    "delivered %s %s to %s (attempt %d)",
                    delivery.kind,
                    delivery.object_key,
                    delivery.destination,
                    delivery.attempts,
                )
            else:
                message = error
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
