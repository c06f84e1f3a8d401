"""``/healthz`` and ``/metrics``: counts from the state database, liveness of the worker and outbox threads."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from dermnode.metrics import StageMetrics, health_document, render_metrics, start_http
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Outbox
from dermnode.workqueue.workers import PoolHealth, WorkerPool

HEALTHY = PoolHealth(running=True, workers_configured=2, workers_alive=2, outbox_alive=True)
DEAD = PoolHealth(running=True, workers_configured=2, workers_alive=1, outbox_alive=False, dead=("worker-1", "outbox"))


@pytest.fixture
def stores(tmp_path: Path) -> tuple[JobQueue, Outbox]:
    db = database_path(tmp_path)
    return JobQueue(db), Outbox(db, DeliverySettings())


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def http_servers() -> Iterator[list[ThreadingHTTPServer]]:
    servers: list[ThreadingHTTPServer] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_health_document_ok_and_dead(stores: tuple[JobQueue, Outbox]) -> None:
    queue, outbox = stores
    assert health_document(queue, outbox)[0] == 200
    code, doc = health_document(queue, outbox, HEALTHY)
    assert code == 200 and doc["status"] == "ok" and "dead" not in doc
    assert doc["threads"] == {"workers_alive": 2, "workers_configured": 2, "outbox_alive": True}
    code, doc = health_document(queue, outbox, DEAD)
    assert code == 503 and doc["status"] == "unhealthy" and doc["dead"] == ["worker-1", "outbox"]
    assert doc["jobs"] == queue.counts()


def test_metrics_export_thread_liveness(stores: tuple[JobQueue, Outbox]) -> None:
    queue, outbox = stores
    text = render_metrics(queue, outbox, StageMetrics(), DEAD)
    assert "dermnode_worker_threads_alive 1\n" in text
    assert "dermnode_worker_threads_configured 2\n" in text
    assert "dermnode_outbox_thread_alive 0\n" in text and "dermnode_healthy 0\n" in text
    assert "# TYPE dermnode_worker_threads_alive gauge" in text
    assert "dermnode_healthy 1\n" in render_metrics(queue, outbox, StageMetrics(), HEALTHY)
    assert "dermnode_worker_threads_alive" not in render_metrics(queue, outbox, StageMetrics())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_turns_503_when_a_worker_thread_dies(
    stores: tuple[JobQueue, Outbox], tmp_path: Path, http_servers: list[ThreadingHTTPServer]
) -> None:
    """A real pool: once a worker thread has died, ``/healthz`` answers 503 naming it and ``/metrics`` agrees."""
    queue, outbox = stores
    pool = WorkerPool(queue, outbox, lambda j: "ok", {}, WorkerSettings(count=1, poll_interval_s=0.02), 0.02)
    server = start_http("127.0.0.1", 0, lambda: (queue, outbox), StageMetrics(), pool.health)
    http_servers.append(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pool.start()
    try:
        code, body = get(base + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"

        def exits(job: Job) -> str:
            raise SystemExit  # not an Exception: ends the worker thread

        pool.processor = exits
        queue.enqueue("1.2.3", "1.2.840.10008.5.1.4.1.1.7", tmp_path / "x.dcm")
        end = time.monotonic() + 10
        while pool.health().ok and time.monotonic() < end:
            time.sleep(0.02)
        code, body = get(base + "/healthz")
        doc = json.loads(body)
        assert code == 503 and doc["status"] == "unhealthy" and doc["dead"] == ["worker-0"]
        assert doc["threads"]["outbox_alive"] is True
        code, body = get(base + "/metrics")
        assert code == 200 and "dermnode_worker_threads_alive 0\n" in body.decode()
    finally:
        pool.stop(0.5)


def _gauge(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_export_free_disk_and_whether_it_is_low(tmp_path: Path, stores: tuple[JobQueue, Outbox]) -> None:
    """Issue 16 item 18: free disk and "approaching storage.min_free_mb" are visible at every scrape."""
    import shutil

    from dermnode.workqueue.diskspace import LOW_DISK_FACTOR, register_minimum

    queue, outbox = stores
    free_mb = shutil.disk_usage(tmp_path).free / 1_048_576
    register_minimum(tmp_path, 1)
    text = render_metrics(queue, outbox, StageMetrics())
    assert _gauge(text, "dermnode_storage_free_bytes") == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)
    assert _gauge(text, "dermnode_storage_min_free_bytes") == 1_048_576
    assert _gauge(text, "dermnode_storage_low") == 0
    register_minimum(tmp_path, int(free_mb / LOW_DISK_FACTOR * 1.2))  # free < 2x the minimum: low
    text = render_metrics(queue, outbox, StageMetrics())
    assert _gauge(text, "dermnode_storage_low") == 1
    assert "# TYPE dermnode_storage_low gauge" in text
