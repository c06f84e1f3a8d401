"""The running service: state stores, Store SCP, workers and outbox, wired from one Settings object.

With the embedded SQLite state, one storage root serves one process: :class:`Service` takes an exclusive ``flock``
on ``<root>/dermnode.lock`` before it opens anything else and holds it for the life of the process, so a second
``dermnode serve`` on the same root stops with :class:`InstanceLockedError` before it can re-queue the first one's
running jobs.

With the state on PostgreSQL (``state.backend = "postgresql"``) many processes share the state and a storage root
on a shared file system: there is no instance lock (claims are leased, recovery takes only expired leases), and each
process may run one role (:data:`ROLES`): ``receive`` (Store SCP, spool, web console), ``analyze`` (job workers),
``deliver`` (the outbox), or ``all``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from dermnode.errors import ConfigError, StorageError
from dermnode.metrics import StageMetrics, start_http
from dermnode.scp.server import start_server
from dermnode.scp.spool import Spool
from dermnode.settings import ScpSettings, Settings, is_loopback
from dermnode.web.server import WebServer
from dermnode.workqueue.db import state_db_of
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Deliverer, Outbox
from dermnode.workqueue.workers import PoolHealth, Processor, WorkerPool

logger = logging.getLogger(__name__)

#: The instance lock file under ``storage.root`` (holds the owner's pid; never deleted).
LOCK_FILE = "dermnode.lock"
#: What one ``dermnode serve`` process runs (``--role``).
ROLES = ("all", "receive", "analyze", "deliver")


class InstanceLockedError(StorageError):
    """Another dermnode process holds the storage root."""


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on ``<root>/dermnode.lock``, held until :meth:`release`.

    The kernel drops the lock when the process exits, however it exits (``kill -9`` included), so a stale lock
    file never blocks a restart. The file (owner-only) holds the owner's pid for the error message.

    Parameters
    ----------
    root:
        The storage root (must exist).

    Raises
    ------
    InstanceLockedError
        When another process holds the lock; the message names the root and that process's pid.
    StorageError
        When the lock file cannot be opened or locked for another reason.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the instance lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InstanceLockedError(f"another dermnode is running on {root} (pid {holder or 'unknown'})") from exc
            raise StorageError(f"cannot lock {self.path}: {exc}") from exc
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # the lock is held; only the pid note is missing
            logger.warning("instance lock %s held, but the pid could not be written: %s", self.path, exc)
        self._fd: int | None = fd
        logger.debug("instance lock %s held by pid %d", self.path, os.getpid())

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would let two processes lock two different files)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class SharedState:
    """Stands in for :class:`InstanceLock` where the state is shared (PostgreSQL): several processes serve the root."""

    held = True

    def release(self) -> None:
        self.held = False


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError as exc:
        logger.debug("cannot read the lock holder's pid: %s", exc)
        return ""
    return text if text.isdigit() else ""


class PortInUseError(StorageError, OSError):
    """The DICOM port is taken: reported as a ``dermnode: error:`` line (a :class:`DermnodeError`) and still an
    :class:`OSError` for callers that handle socket errors."""


def check_port_free(settings: ScpSettings) -> None:
    """Fail fast, before any recovery, when the DICOM port is already taken.

    The SCP binds the port for real afterwards (:func:`~dermnode.scp.server.start_server`), which still fails
    if another program takes it in between; this check only makes the common clash cheap and clean. Port 0
    (any free port) is not checked.

    Raises
    ------
    PortInUseError
        When ``scp.bind``:``scp.port`` cannot be bound (an :class:`OSError` and a :class:`DermnodeError`).
    """
    if settings.port == 0:
        return
    try:
        infos = socket.getaddrinfo(settings.bind, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
    except OSError as exc:  # not resolvable here: the SCP's own bind reports it
        logger.debug("port check skipped for %s: %s", settings.bind, exc)
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SCP: TIME_WAIT is no clash
        try:
            probe.bind((settings.bind, settings.port))
        except OSError as exc:
            raise PortInUseError(
                exc.errno, f"cannot bind the DICOM port {settings.bind}:{settings.port}: {exc.strerror}"
            ) from exc


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
            queue.enqueue(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                path,
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            )
            added += 1
        except (DecodeError, AttributeError) as exc:
            logger.warning("orphan spool file %s cannot be read: %s", path.name, exc)
    if added:
        logger.warning("recovered %d spooled instance(s) without a job", added)
    return added


class _NoServer:
    """The SCP of a process that does not receive (``--role analyze|deliver``)."""

    def shutdown(self) -> None:
        return None


def delivery_destinations(settings: Settings) -> int:
    """How many destinations results are delivered to (every ``[[pacs]]``, plus the FHIR server when
    ``fhir.base_url`` is set), at least 1: the number of delivery threads, so that they are sent to concurrently."""
    return max(1, len(settings.pacs) + (1 if settings.fhir.base_url else 0))


def _unset_processor(job: object) -> str:
    raise RuntimeError("no job processor configured")


class Service:
    """dermnode as a whole. ``start()`` then ``wait()``; ``stop()`` from a signal handler or a test.

    Parameters
    ----------
    settings:
        The validated settings.
    deliverers:
        Delivery functions by kind.
    role:
        What this process runs (:data:`ROLES`); anything but ``all`` needs the shared PostgreSQL state.

    Raises
    ------
    ConfigError
        When ``role`` is unknown, or not ``all`` on the SQLite state.
    InstanceLockedError
        When another dermnode process serves the same storage root (nothing was opened or changed).
    StorageError
        When the storage root, its lock or the state database cannot be opened.
    """

    def __init__(self, settings: Settings, deliverers: Mapping[str, Deliverer], role: str = "all") -> None:
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        shared = settings.state.backend == "postgresql"
        if role != "all" and not shared:
            raise ConfigError(f'--role {role} needs the shared state: state.backend = "postgresql" (with the SQLite '
                              "state one process serves the storage root and runs every role)")
        self.settings = settings
        self.role = role
        self.receives = role in ("all", "receive")
        self.analyzes = role in ("all", "analyze")
        self.delivers = role in ("all", "deliver")
        root = settings.storage_root
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the storage root {root}: {exc}") from exc
        # first of all: nothing below may run while another process serves this root (SQLite state)
        self.lock: InstanceLock | SharedState = SharedState() if shared else InstanceLock(root)
        try:
            db = state_db_of(settings)
            self.spool = Spool(root, settings.storage.min_free_mb, fsync=settings.storage.fsync)
            self.queue = JobQueue(
                db, settings.workers.max_attempts, settings.workers.retry_delay_s, settings.workers.retry_delay_max_s
            )
            self.outbox = Outbox(db, settings.delivery)
            self.queue.storage_root = self.outbox.storage_root = root
            self.pool = WorkerPool(
                self.queue,
                self.outbox,
                _unset_processor,
                deliverers,
                settings.workers,
                settings.delivery.poll_interval_s,
                analyze=self.analyzes,
                deliver=self.delivers,
                notify_poll_s=settings.state.notify_poll_s,
                delivery_threads=delivery_destinations(settings),
            )
        except BaseException:
            self.lock.release()
            raise
        self.stage_metrics = StageMetrics()
        self._stopped = threading.Event()
        self._server: object | None = None
        self._http: ThreadingHTTPServer | None = None
        self._web: WebServer | None = None

    def set_processor(self, processor: Processor) -> None:
        """The job processor (built after the service, since it queues deliveries in the service's outbox)."""
        self.pool.processor = processor

    @property
    def port(self) -> int:
        server = self._server
        return int(server.server_address[1]) if server is not None else 0  # type: ignore[attr-defined]

    @property
    def web_port(self) -> int:
        """The bound port of the web console (0 when disabled or not started)."""
        return self._web.port if self._web is not None else 0

    @property
    def http_port(self) -> int:
        """The bound port of ``/healthz`` and ``/metrics`` (0 when disabled or not started)."""
        return int(self._http.server_address[1]) if self._http is not None else 0

    def health(self) -> PoolHealth:
        """Liveness of the worker and outbox threads (a dead one is named while the service runs)."""
        return self.pool.health()

    def start(self) -> None:
        """Check the port, recover interrupted work, bind the SCP and the HTTP endpoints, then start the workers.

        Recovery runs before the SCP accepts associations (so it cannot race a C-STORE) and is safe because this
        process holds the instance lock; the workers start last, so a failed bind leaves no thread behind.

        The web console's port is bound first of all (a taken port is an error before anything changes); the
        console starts serving after the SCP and the HTTP endpoints.

        Raises
        ------
        OSError
            When the SCP, HTTP or web console port cannot be bound.
        StorageError
            When the state database cannot be written during recovery.
        ConfigError
            When ``web.users_file`` cannot be read.
        """
        if self.receives:
            check_port_free(self.settings.scp)
        if self.settings.web.enabled and self.receives:
            self._web = self._build_web()
        try:
            self._start_serving()
        except BaseException:
            if self._web is not None:
                self._web.stop()
                self._web = None
            raise

    def _build_web(self) -> WebServer:
        from dermnode.web.app import asgi_app, create_app

        web = self.settings.web
        app = create_app(self.settings, spool=self.spool, queue=self.queue, health=self.health,
                         stages=self.stage_metrics)
        server = WebServer(asgi_app(app), web)  # binds now: a taken port stops the start here
        if not is_loopback(web.bind) and not (web.tls_certificate or web.secure_cookies):
            logger.warning(
                "web console on %s without TLS: passwords and session cookies cross the network in clear; set "
                "web.tls_certificate/web.tls_private_key, or serve it behind a TLS proxy with web.secure_cookies",
                web.bind,
            )
        return server

    def _start_serving(self) -> None:
        # SQLite: everything in flight was this root's previous process's; PostgreSQL: only expired leases
        if self.analyzes:
            self.queue.recover()
        if self.delivers:
            self.outbox.recover()
        server: Any = _NoServer()
        if self.receives:
            recover_spool(self.spool, self.queue)
            server = start_server(self.settings.scp, self.spool, self.queue)
            self._server = server
        http = self.settings.http
        if http.enabled:
            try:
                self._http = start_http(
                    http.bind, http.port, lambda: (self.queue, self.outbox), self.stage_metrics, self.health
                )
            except BaseException:
                server.shutdown()
                self._server = None
                raise
        if self._web is not None:
            try:
                self._web.start()
            except BaseException:
                server.shutdown()
                self._server = None
                if self._http is not None:
                    self._http.shutdown()
                    self._http.server_close()
                    self._http = None
                raise
        self.pool.start()

    def stop(self) -> None:
        """Stop accepting associations, then let running jobs finish (or leave them for re-queue)."""
        if self._stopped.is_set():
            return
        logger.info("shutting down: no new associations or uploads")
        if self._web is not None:
            self._web.stop()
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
        finished = self.pool.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        logger.info("shutdown complete%s", "" if finished else " (unfinished jobs will be re-queued)")
        self._stopped.set()

    def close(self) -> None:
        """Stop if needed and release the instance lock (tests, embedding; ``dermnode serve`` holds the lock until
        the process exits)."""
        if self._server is not None or self._http is not None or self._web is not None or self.pool.health().running:
            self.stop()
        self.lock.release()
        self.queue.state_db.close()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("received signal %d", signum)
            threading.Thread(target=self.stop, name="dermnode-shutdown").start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait(self) -> None:
        while not self._stopped.wait(1.0):
            pass
