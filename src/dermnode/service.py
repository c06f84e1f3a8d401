"""The running service: state stores, Store SCP, workers and outbox, wired from one Settings object."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from types import FrameType

from dermnode.db import database_path
from dermnode.metrics import StageMetrics, start_http
from dermnode.outbox import Deliverer, Outbox
from dermnode.scp.queue import JobQueue
from dermnode.scp.server import start_server
from dermnode.scp.spool import Spool
from dermnode.scp.workers import Processor, WorkerPool
from dermnode.settings import Settings

logger = logging.getLogger(__name__)


def recover_spool(spool: Spool, queue: JobQueue) -> int:
    """Enqueue complete spool files that have no job (a crash between spool write and queue commit).

    Such files were never acknowledged, but processing them loses nothing and keeps the spool and queue
    consistent. Returns the number of files enqueued.
    """
    from dermnode.dicom_io.reading import read_dataset
    from dermnode.errors import DecodeError

    known = queue.known_paths()
    added = 0
    for path in spool.files():
        if str(path) in known:
            continue
        try:
            ds = read_dataset(path)
            queue.enqueue(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path,
                          study_instance_uid=str(ds.get("StudyInstanceUID", "")))
            added += 1
        except (DecodeError, AttributeError) as exc:
            logger.warning("orphan spool file %s cannot be read: %s", path.name, exc)
    if added:
        logger.warning("recovered %d spooled instance(s) without a job", added)
    return added


def _unset_processor(job: object) -> str:
    raise RuntimeError("no job processor configured")


class Service:
    """dermnode as a whole. ``start()`` then ``wait()``; ``stop()`` from a signal handler or a test."""

    def __init__(self, settings: Settings, deliverers: Mapping[str, Deliverer]) -> None:
        self.settings = settings
        root = settings.storage_root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = database_path(root)
        self.spool = Spool(root, settings.storage.min_free_mb, fsync=settings.storage.fsync)
        self.queue = JobQueue(db, settings.workers.max_attempts, settings.workers.retry_delay_s)
        self.outbox = Outbox(db, settings.delivery)
        self.pool = WorkerPool(
            self.queue, self.outbox, _unset_processor, deliverers, settings.workers, settings.delivery.poll_interval_s
        )
        self.stage_metrics = StageMetrics()
        self._stopped = threading.Event()
        self._server: object | None = None
        self._http: ThreadingHTTPServer | None = None

    def set_processor(self, processor: Processor) -> None:
        """The job processor (built after the service, since it queues deliveries in the service's outbox)."""
        self.pool.processor = processor

    @property
    def port(self) -> int:
        server = self._server
        return int(server.server_address[1]) if server is not None else 0  # type: ignore[attr-defined]

    def start(self) -> None:
        """Recover interrupted work, start the workers and then the SCP.

        Raises
        ------
        OSError
            When the SCP port cannot be bound.
        """
        self.queue.recover()
        self.outbox.recover()
        recover_spool(self.spool, self.queue)
        self.pool.start()
        self._server = start_server(self.settings.scp, self.spool, self.queue)
        http = self.settings.http
        if http.enabled:
            self._http = start_http(http.bind, http.port, lambda: (self.queue, self.outbox), self.stage_metrics)

    def stop(self) -> None:
        """Stop accepting associations, then let running jobs finish (or leave them for re-queue)."""
        if self._stopped.is_set():
            return
        logger.info("shutting down: no new associations")
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
        finished = self.pool.stop()
        if self._http is not None:
            self._http.shutdown()
        logger.info("shutdown complete%s", "" if finished else " (unfinished jobs will be re-queued)")
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("received signal %d", signum)
            threading.Thread(target=self.stop, name="dermnode-shutdown").start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait(self) -> None:
        while not self._stopped.wait(1.0):
            pass
