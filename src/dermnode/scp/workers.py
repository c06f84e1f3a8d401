"""Worker threads: take jobs from the queue, run the processor, record the outcome; pump the outbox.

Failures of a job are classified: a :class:`~dermnode.errors.DecodeError` (the input itself is bad) is
dead-lettered at once, anything else is retried with backoff until ``workers.max_attempts``. Nothing is dropped
silently: every job ends ``done`` or in the dead-letter table with its error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from dermnode.errors import DecodeError, OutputError
from dermnode.outbox import Deliverer, Outbox
from dermnode.scp.queue import Job, JobQueue
from dermnode.settings import WorkerSettings

logger = logging.getLogger(__name__)
audit = logging.getLogger("dermnode.audit")

#: A processor runs the pipeline for one job and returns a short outcome (e.g. ``"analysed"``).
Processor = Callable[[Job], str]

#: Errors caused by the input itself: retrying cannot help.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (DecodeError, OutputError)


def run_job(queue: JobQueue, job: Job, processor: Processor) -> None:
    """Run one claimed job and record its outcome (never raises for a job failure)."""
    try:
        outcome = processor(job)
    except PERMANENT_ERRORS as exc:
        queue.fail(job, f"{type(exc).__name__}: {exc}", permanent=True)
        audit.warning("job %d (sop_instance=%s) dead-lettered: %s", job.id, job.sop_instance_uid, exc)
    except Exception as exc:
        logger.exception("job %d failed on attempt %d", job.id, job.attempts)
        dead = queue.fail(job, f"{type(exc).__name__}: {exc}")
        audit.warning(
            "job %d (sop_instance=%s) failed on attempt %d%s: %s",
            job.id,
            job.sop_instance_uid,
            job.attempts,
            ", dead-lettered" if dead else ", will retry",
            exc,
        )
    else:
        queue.complete(job, outcome)
        audit.info("job %d (sop_instance=%s) done: %s", job.id, job.sop_instance_uid, outcome)


class WorkerPool:
    """``workers.count`` job threads plus one outbox thread.

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
    """

    def __init__(
        self,
        queue: JobQueue,
        outbox: Outbox,
        processor: Processor,
        deliverers: Mapping[str, Deliverer],
        settings: WorkerSettings,
        delivery_poll_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.outbox = outbox
        self.processor = processor
        self.deliverers = dict(deliverers)
        self.settings = settings
        self.delivery_poll_s = delivery_poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.settings.count):
            t = threading.Thread(target=self._job_loop, args=(f"worker-{i}",), name=f"dermnode-worker-{i}")
            t.daemon = True
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._delivery_loop, name="dermnode-outbox")
        t.daemon = True
        t.start()
        self._threads.append(t)

    def _job_loop(self, owner: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim(owner)
            except Exception:
                logger.exception("cannot claim a job")
                job = None
            if job is None:
                self._stop.wait(self.settings.poll_interval_s)
                continue
            run_job(self.queue, job, self.processor)

    def _delivery_loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.outbox.pump_once(self.deliverers)
            except Exception:
                logger.exception("outbox pump failed")
                busy = False
            if not busy:
                self._stop.wait(self.delivery_poll_s)

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop taking work, wait up to ``grace_s`` for running jobs; returns ``True`` if all finished.

        Jobs still running after the grace period stay ``running`` in the database and are re-queued by
        :meth:`JobQueue.recover` at the next start.
        """
        self._stop.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        end = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("still busy after %.0fs, left for re-queue at next start: %s", grace, alive)
        return not alive
