"""Worker threads: take jobs from the queue, run the processor, record the outcome; pump the outbox.

Failures of a job are classified: a :class:`~dermnode.errors.DecodeError` (the input itself is bad) is
dead-lettered at once, anything else is retried with backoff until ``workers.max_attempts``. Nothing is dropped
silently: every job ends ``done`` or in the dead-letter table with its error.

A thread never dies of an exception: a failure to record an outcome in the state database (``database is
locked`` past the busy timeout, a full disk) is logged and retried with bounded backoff, without running the
job again, so a job or delivery never stays ``running``/``sending`` while the process lives. Only a shutdown
whose grace period is over abandons such a retry; the row is then re-queued by ``recover()`` at the next start.
:meth:`WorkerPool.health` reports which threads are alive, for ``/healthz`` and ``/metrics``.

Idle threads wake on a commit instead of waiting out their poll interval: every commit that queues work (a job
from the Store SCP, a delivery from the pipeline) sets the in-process wake-up of its table
(:meth:`~dermnode.workqueue.db.StateDB.wakeup`), and where the state is shared by several processes (PostgreSQL)
so does a ``NOTIFY`` from another process; polling stays the fallback. There, a lease thread also renews the leases
of the jobs and deliveries this process holds and re-queues those of processes that stopped renewing theirs
(``recover()``). The delivery threads (one per destination by default) send to independent destinations
concurrently, each destination's deliveries one at a time (:meth:`Outbox.pump_once`). A pool may run only the job
threads (``--role analyze``) or only the delivery threads (``--role deliver``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dermnode.errors import DecodeError, OutputError, StorageError
from dermnode.settings import WorkerSettings
from dermnode.workqueue.base import StateUpdateAbandonedError, retry_state_update
from dermnode.workqueue.db import DB_ERRORS, Wakeup
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Deliverer, Outbox

logger = logging.getLogger(__name__)

#: What the state database raises while it cannot be reached (the lease loop logs one line and retries).
_DATABASE_AWAY: tuple[type[Exception], ...] = (StorageError, *DB_ERRORS)
audit = logging.getLogger("dermnode.audit")

#: A processor runs the pipeline for one job and returns a short outcome (e.g. ``"analysed"``).
Processor = Callable[[Job], str]

#: Errors caused by the input itself: retrying cannot help.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (DecodeError, OutputError)

#: Pause of a worker loop after an unexpected error outside a job (the loop itself never exits on one).
LOOP_ERROR_PAUSE_S = 1.0
#: After the shutdown grace period, how long :meth:`WorkerPool.stop` still waits for threads that were only
#: retrying a state update (they give up at once).
ABANDON_JOIN_S = 1.0


def run_job(queue: JobQueue, job: Job, processor: Processor, stop: threading.Event | None = None) -> bool:
    """Run one claimed job and record its outcome (``done``, retry later, or dead-letter).

    A failure of the processor is recorded, never raised. A failure to record the outcome (e.g.
    ``sqlite3.OperationalError: database is locked``) is logged and retried with bounded backoff
    (:func:`~dermnode.workqueue.base.retry_state_update`) without running the processor again.

    Parameters
    ----------
    queue:
        The job queue the job was claimed from.
    job:
        The claimed (``running``) job.
    processor:
        Runs the pipeline for the job.
    stop:
        Ends the retries of the state update (shutdown); ``None``: retry until it succeeds.

    Returns
    -------
    bool
        ``True`` when the outcome is recorded; ``False`` when ``stop`` was set while recording still failed:
        the job stays ``running`` and :meth:`JobQueue.recover` re-queues it at the next start. Processor and
        database errors are never raised.
    """
    halt = stop if stop is not None else threading.Event()
    error: Exception | None = None
    permanent = False
    outcome = ""
    try:
        outcome = processor(job)
    except PERMANENT_ERRORS as exc:
        error, permanent = exc, True
    except Exception as exc:
        logger.exception("job %d failed on attempt %d", job.id, job.attempts)
        error = exc
    try:
        if error is None:
            retry_state_update(lambda: queue.complete(job, outcome), what=f"outcome of job {job.id}", stop=halt)
            audit.info("job %d (sop_instance=%s) done: %s", job.id, job.sop_instance_uid, outcome)
            return True
        message = f"{type(error).__name__}: {error}"
        dead = retry_state_update(
            lambda: queue.fail(job, message, permanent=permanent), what=f"failure of job {job.id}", stop=halt
        )
    except StateUpdateAbandonedError as exc:
        logger.warning("%s; job %d stays running and is re-queued at the next start", exc, job.id)
        return False
    if permanent:
        audit.warning("job %d (sop_instance=%s) dead-lettered: %s", job.id, job.sop_instance_uid, error)
    else:
        audit.warning(
            "job %d (sop_instance=%s) failed on attempt %d%s: %s",
            job.id,
            job.sop_instance_uid,
            job.attempts,
            ", dead-lettered" if dead else ", will retry",
            error,
        )
    return True


@dataclass(frozen=True)
class PoolHealth:
    """Liveness of the pool's threads.

    Attributes
    ----------
    running:
        Started and not stopping: only then is a thread that is not alive a fault.
    workers_configured:
        ``workers.count``.
    workers_alive:
        Job threads alive now.
    outbox_alive:
        Whether every delivery thread is alive.
    dead:
        Components whose thread is not alive while running (``"worker-0"``, ``"outbox"``, ``"outbox-1"``); empty
        when healthy.
    """

    running: bool
    workers_configured: int
    workers_alive: int
    outbox_alive: bool
    dead: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """``True`` unless a thread is dead while the pool runs."""
        return not self.dead


class WorkerPool:
    """``workers.count`` job threads plus ``delivery_threads`` outbox threads.

    Parameters
    ----------
    queue, outbox:
        The durable stores.
    processor:
        Runs the pipeline for one job.
    deliverers:
        Delivery functions by kind (``"dicom"``, ``"fhir"``, ...).
    settings:
        ``[workers]`` settings.
    delivery_poll_s:
        How often an idle outbox thread looks for due deliveries (it is woken at once by a queued delivery).
    analyze, deliver:
        Whether to run the job threads and the delivery threads (the ``--role`` of the process).
    notify_poll_s:
        Where idle threads are also woken by ``NOTIFY`` (shared state), how often they still poll.
    delivery_threads:
        Delivery threads: how many destinations are sent to at once (the service starts one per destination).
    """

    def __init__(
        self,
        queue: JobQueue,
        outbox: Outbox,
        processor: Processor,
        deliverers: Mapping[str, Deliverer],
        settings: WorkerSettings,
        delivery_poll_s: float = 1.0,
        *,
        analyze: bool = True,
        deliver: bool = True,
        notify_poll_s: float = 2.0,
        delivery_threads: int = 1,
    ) -> None:
        self.queue = queue
        self.outbox = outbox
        self.processor = processor
        self.deliverers = dict(deliverers)
        self.settings = settings
        self.delivery_poll_s = delivery_poll_s
        self._stop = threading.Event()  # take no more work
        self._abandon = threading.Event()  # grace period over: give up retrying state updates
        self._workers: dict[str, threading.Thread] = {}
        self._outbox_threads: dict[str, threading.Thread] = {}
        self.delivery_threads = max(1, delivery_threads)
        self._lease_thread: threading.Thread | None = None
        self._lease_stop = threading.Event()  # set once the job and delivery threads are gone
        self._started = False
        self.analyze = analyze
        self.deliver = deliver
        self.notify_poll_s = notify_poll_s
        db = queue.state_db
        self._notifier = db.listener() if db.leases else None

    @property
    def _threads(self) -> list[threading.Thread]:
        return [*self._workers.values(), *self._outbox_threads.values()]

    def owner_id(self, index: int) -> str:
        """The owner recorded on the jobs worker ``index`` claims: unique per process (it holds the pid; and the host
        name where several hosts share the state)."""
        if self.queue.state_db.leases:
            return f"worker-{index}@{socket.gethostname()}:{os.getpid()}"
        return f"worker-{index}@{os.getpid()}"

    def start(self) -> None:
        """Start the job threads and the outbox thread.

        Raises
        ------
        RuntimeError
            When the pool was already started.
        """
        if self._started:
            raise RuntimeError("worker pool already started")
        self._started = True
        for i in range(self.settings.count if self.analyze else 0):
            t = threading.Thread(target=self._job_loop, args=(self.owner_id(i),), name=f"dermnode-worker-{i}")
            t.daemon = True
            self._workers[f"worker-{i}"] = t
            t.start()
        if self.deliver:
            for i in range(self.delivery_threads):
                name = "outbox" if i == 0 else f"outbox-{i}"
                t = threading.Thread(target=self._delivery_loop, name=f"dermnode-{name}")
                t.daemon = True
                self._outbox_threads[name] = t
                t.start()
        if self.queue.state_db.leases:
            t = threading.Thread(target=self._lease_loop, name="dermnode-lease")
            t.daemon = True
            self._lease_thread = t
            t.start()

    def health(self) -> PoolHealth:
        """Which threads are alive; a thread that is not alive while the pool runs is named in ``dead``."""
        running = self._started and not self._stop.is_set()
        alive = {name: t.is_alive() for name, t in self._workers.items()}
        outbox = {name: t.is_alive() for name, t in self._outbox_threads.items()}
        outbox_alive = bool(outbox) and all(outbox.values())
        dead: list[str] = []
        if running:
            dead = [name for name, ok in alive.items() if not ok]
            if self.deliver:
                dead += [name for name, ok in outbox.items() if not ok] or ([] if outbox else ["outbox"])
            if self._lease_thread is not None and not self._lease_thread.is_alive():
                dead.append("lease")
        return PoolHealth(
            running=running,
            workers_configured=self.settings.count,
            workers_alive=sum(alive.values()),
            outbox_alive=outbox_alive,
            dead=tuple(dead),
        )

    def _job_loop(self, owner: str) -> None:
        wake = self.queue.state_db.wakeup(self.queue.channel)
        while not self._stop.is_set():
            seen = wake.mark()  # before the claim: a job committed after it wakes the wait below
            try:
                job = self.queue.claim(owner)
            except Exception:
                logger.exception("cannot claim a job")
                job = None
            if job is None:
                self._idle(wake, self.settings.poll_interval_s, seen)
                continue
            try:
                run_job(self.queue, job, self.processor, stop=self._abandon)
            except Exception:  # run_job handles job and database errors; this keeps the thread alive regardless
                logger.exception("unexpected error in worker %s around job %d", owner, job.id)
                self._stop.wait(LOOP_ERROR_PAUSE_S)

    def _delivery_loop(self) -> None:
        wake = self.outbox.state_db.wakeup(self.outbox.channel)
        while not self._stop.is_set():
            seen = wake.mark()  # before the claim: a delivery queued (or a destination freed) after it wakes us
            try:
                busy = self.outbox.pump_once(self.deliverers, stop=self._abandon)
            except Exception:
                logger.exception("outbox pump failed")
                busy = False
            if not busy:
                self._idle(wake, self.delivery_poll_s, seen)

    def _idle(self, wake: Wakeup, poll_s: float, seen: int) -> None:
        """Wait for work on the channel of ``wake``: until a commit in this process queues some (or, shared state, a
        ``NOTIFY`` from another process) after the mark ``seen``, or the poll interval (``poll_s``; where
        ``NOTIFY`` wakes the threads, the longer ``notify_poll_s``), or :meth:`stop`."""
        timeout = poll_s if self._notifier is None else max(poll_s, self.notify_poll_s)
        wake.wait(seen, timeout)

    def _lease_loop(self) -> None:
        """Renew the leases of what this process holds; re-queue what processes that stopped renewing left."""
        lease_s = self.queue.state_db.lease_s
        period = max(lease_s / 3.0, 0.05)
        while not self._lease_stop.wait(period):
            for q in (self.queue, self.outbox):
                try:
                    q.renew_held()
                except _DATABASE_AWAY as exc:  # the database is away: one line, retried next period
                    logger.warning("lease renewal of %s failed, will retry: %s", q.table, exc)
                except Exception:
                    logger.exception("lease renewal of %s failed", q.table)
            if self._stop.is_set():
                continue  # keep renewing what still runs during the grace period, take nothing over
            try:
                if self.analyze:
                    self.queue.recover()
                if self.deliver:
                    self.outbox.recover()
            except _DATABASE_AWAY as exc:  # the database is away: one line, retried next period
                logger.warning("taking over orphaned work failed, will retry: %s", exc)
            except Exception:
                logger.exception("taking over orphaned work failed")

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop taking work, wait up to ``grace_s`` for running jobs; returns ``True`` if all finished.

        Jobs still running after the grace period (or whose outcome could not be recorded by then) stay
        ``running`` in the database and are re-queued by :meth:`JobQueue.recover` at the next start.

        Parameters
        ----------
        grace_s:
            Seconds running jobs get; ``None``: ``workers.shutdown_grace_s``.
        """
        self._stop.set()
        for q in (self.queue, self.outbox):
            q.state_db.wakeup(q.channel).set()  # idle threads see the stop at once
        if self._notifier is not None:
            self._notifier.wake_all()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        end = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._abandon.set()
        end = time.monotonic() + ABANDON_JOIN_S
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._lease_stop.set()  # leases of what still runs lapse: another process takes it over after the lease
        if self._lease_thread is not None:
            self._lease_thread.join(ABANDON_JOIN_S)
        if alive:
            logger.warning("still busy after %.0fs, left for re-queue at next start: %s", grace, alive)
        return not alive
