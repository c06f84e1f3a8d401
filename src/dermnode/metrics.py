"""Operational endpoints: ``/healthz`` and Prometheus ``/metrics`` on a loopback HTTP port.

Queue and delivery counts are read from the state database, so they always agree with ``dermnode status``.
Stage latencies are accumulated in memory by the job processor (:class:`StageMetrics`) and exported as
Prometheus summaries (``_sum`` and ``_count`` in seconds).

``/healthz`` answers 200 ``{"status": "ok", ...}`` while every worker thread and the outbox thread is alive,
and 503 ``{"status": "unhealthy", "dead": ["worker-0", ...], ...}`` when one of them has died while the service
runs (or when the state database cannot be read). ``/metrics`` exports the same liveness as gauges, and the free
disk of the storage root at each scrape (``dermnode_storage_free_bytes``, ``dermnode_storage_min_free_bytes``,
``dermnode_storage_low``: 1 below twice ``storage.min_free_mb``, see :mod:`dermnode.workqueue.diskspace`).

When the analysing process has a band calibration, ``/metrics`` also exports the drift watch
(:mod:`dermnode.drift`), per device (the calling AE title that sent the images) over its rolling window of
results: ``dermnode_band_fraction{device,band}``, ``dermnode_drift_mean_melanoma_probability{device}``,
``dermnode_drift_window_results{device}``, ``dermnode_drift_p_value{device}`` (chi-square test of the window's
band counts against the calibration's ``dermnode_band_expected_fraction{band}``) and ``dermnode_drift_flag{device}``
(1 when the window holds at least the minimum count and p is below the bound). Each process keeps its own window
of the jobs it analysed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dermnode.drift import BANDS, DriftMonitor
from dermnode.workqueue.diskspace import disk_space
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Outbox
from dermnode.workqueue.workers import PoolHealth

logger = logging.getLogger(__name__)


class StageMetrics:
    """Thread-safe accumulator of per-stage latencies and outcome counters.

    ``drift`` is the process's drift watch, set by the job processor when a band calibration is active
    (``None``: no calibration, nothing to compare with).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.drift: DriftMonitor | None = None
        self.latency_sum_s: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}

    def observe(self, timings_ms: Mapping[str, float], outcome: str) -> None:
        with self._lock:
            for stage, ms in timings_ms.items():
                self.latency_sum_s[stage] = self.latency_sum_s.get(stage, 0.0) + ms / 1000.0
                self.latency_count[stage] = self.latency_count.get(stage, 0) + 1
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def snapshot(self) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.latency_sum_s), dict(self.latency_count), dict(self.outcomes)


def render_metrics(queue: JobQueue, outbox: Outbox, stages: StageMetrics, health: PoolHealth | None = None) -> str:
    """The Prometheus text exposition of dermnode's state.

    Parameters
    ----------
    queue, outbox:
        The state stores (counts).
    stages:
        Stage latencies and outcomes since start.
    health:
        Thread liveness of the worker pool; ``None`` leaves the liveness gauges out.

    Raises
    ------
    sqlite3.Error, psycopg.Error
        When the state database cannot be read.
    """
    jobs = queue.counts()
    deliveries = outbox.counts()
    lines = [
        "# HELP dermnode_received_total Instances received and durably queued.",
        "# TYPE dermnode_received_total counter",
        f"dermnode_received_total {jobs['pending'] + jobs['running'] + jobs['done'] + jobs['dead_letter']}",
        "# HELP dermnode_analysed_total Jobs processed to completion (any analysis status).",
        "# TYPE dermnode_analysed_total counter",
        f"dermnode_analysed_total {jobs['done']}",
        "# HELP dermnode_failed_total Jobs dead-lettered.",
        "# TYPE dermnode_failed_total counter",
        f"dermnode_failed_total {jobs['dead_letter']}",
        "# HELP dermnode_delivered_total Objects delivered to a PACS or the EHR.",
        "# TYPE dermnode_delivered_total counter",
        f"dermnode_delivered_total {deliveries['done']}",
        "# HELP dermnode_delivery_failed_total Deliveries dead-lettered.",
        "# TYPE dermnode_delivery_failed_total counter",
        f"dermnode_delivery_failed_total {deliveries['dead_letter']}",
        "# HELP dermnode_queue_depth Jobs waiting or running.",
        "# TYPE dermnode_queue_depth gauge",
        f"dermnode_queue_depth {jobs['pending'] + jobs['running']}",
        "# HELP dermnode_jobs Jobs by state.",
        "# TYPE dermnode_jobs gauge",
        *(f'dermnode_jobs{{state="{k}"}} {v}' for k, v in jobs.items()),
        "# HELP dermnode_deliveries Deliveries by state.",
        "# TYPE dermnode_deliveries gauge",
        *(f'dermnode_deliveries{{state="{k}"}} {v}' for k, v in deliveries.items()),
    ]
    sums, counts, outcomes = stages.snapshot()
    lines += [
        "# HELP dermnode_stage_latency_seconds Pipeline stage latency.",
        "# TYPE dermnode_stage_latency_seconds summary",
    ]
    for stage in sorted(sums):
        lines.append(f'dermnode_stage_latency_seconds_sum{{stage="{stage}"}} {sums[stage]:.6f}')
        lines.append(f'dermnode_stage_latency_seconds_count{{stage="{stage}"}} {counts[stage]}')
    lines += [
        "# HELP dermnode_analysis_outcomes_total Analysis outcomes since start.",
        "# TYPE dermnode_analysis_outcomes_total counter",
    ]
    lines += [f'dermnode_analysis_outcomes_total{{status="{k}"}} {v}' for k, v in sorted(outcomes.items())]
    lines += _storage_lines(queue)
    if stages.drift is not None:
        lines += drift_lines(stages.drift)
    if health is not None:
        lines += [
            "# HELP dermnode_worker_threads_alive Analysis worker threads alive.",
            "# TYPE dermnode_worker_threads_alive gauge",
            f"dermnode_worker_threads_alive {health.workers_alive}",
            "# HELP dermnode_worker_threads_configured Analysis worker threads configured (workers.count).",
            "# TYPE dermnode_worker_threads_configured gauge",
            f"dermnode_worker_threads_configured {health.workers_configured}",
            "# HELP dermnode_outbox_thread_alive Whether the delivery (outbox) thread is alive.",
            "# TYPE dermnode_outbox_thread_alive gauge",
            f"dermnode_outbox_thread_alive {int(health.outbox_alive)}",
            "# HELP dermnode_healthy Whether every thread that should run is alive (as /healthz).",
            "# TYPE dermnode_healthy gauge",
            f"dermnode_healthy {int(health.ok)}",
        ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value (backslash, double quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def drift_lines(monitor: DriftMonitor) -> list[str]:
    """The drift watch's gauges: per device its window's band mix, mean probability, p-value and flag."""
    states = monitor.snapshot()
    lines = [
        "# HELP dermnode_band_expected_fraction Fraction of lesions per band on the active calibration's data.",
        "# TYPE dermnode_band_expected_fraction gauge",
        *(f'dermnode_band_expected_fraction{{band="{b.value}"}} {monitor.expected[b]:.6g}' for b in BANDS),
        "# HELP dermnode_band_fraction Fraction of the device's recent results per band (its rolling window).",
        "# TYPE dermnode_band_fraction gauge",
    ]
    for st in states:
        lines += [f'dermnode_band_fraction{{device="{_label(st.device)}",band="{b.value}"}} {st.fractions[b]:.6g}'
                  for b in BANDS]
    gauges = (
        ("dermnode_drift_window_results", "Results in the device's rolling window.", lambda st: str(st.n)),
        ("dermnode_drift_mean_melanoma_probability", "Mean melanoma probability over the device's window.",
         lambda st: f"{st.mean_probability:.6g}"),
        ("dermnode_drift_p_value", "Chi-square p-value of the window's band mix against the calibration's.",
         lambda st: f"{st.p_value:.6g}"),
        ("dermnode_drift_flag", f"1 when the device's band mix departs from the calibration's (p < "
         f"{monitor.alpha:g} over at least {monitor.min_count} results).", lambda st: str(int(st.drifting))),
    )
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{device="{_label(st.device)}"}} {value(st)}' for st in states]
    return lines


def _storage_lines(queue: JobQueue) -> list[str]:
    """Free disk of the storage root (the state database's folder), measured now, against storage.min_free_mb."""
    root = queue.storage_root
    if root is None:
        return []
    try:
        space = disk_space(root)
    except OSError as exc:
        logger.debug("cannot read free disk of %s: %s", root, exc)
        return []
    return [
        "# HELP dermnode_storage_free_bytes Free disk space of the storage root.",
        "# TYPE dermnode_storage_free_bytes gauge",
        f"dermnode_storage_free_bytes {space.free_bytes}",
        "# HELP dermnode_storage_min_free_bytes storage.min_free_mb in bytes: below it C-STORE answers 0xA700.",
        "# TYPE dermnode_storage_min_free_bytes gauge",
        f"dermnode_storage_min_free_bytes {space.min_free_bytes}",
        "# HELP dermnode_storage_low Whether free disk is below twice storage.min_free_mb (refusals approach).",
        "# TYPE dermnode_storage_low gauge",
        f"dermnode_storage_low {int(space.low)}",
    ]


def health_document(queue: JobQueue, outbox: Outbox, health: PoolHealth | None = None) -> tuple[int, dict[str, object]]:
    """The ``/healthz`` answer: HTTP status and JSON document.

    Parameters
    ----------
    queue, outbox:
        The state stores (counts).
    health:
        Thread liveness of the worker pool; ``None``: not checked.

    Returns
    -------
    tuple[int, dict[str, object]]
        200 with ``status = "ok"``, or 503 with ``status = "unhealthy"`` and ``dead`` naming each component
        whose thread is not alive while the service runs.

    Raises
    ------
    sqlite3.Error, psycopg.Error
        When the state database cannot be read.
    """
    doc: dict[str, object] = {"status": "ok", "jobs": queue.counts(), "deliveries": outbox.counts()}
    if health is None:
        return 200, doc
    doc["threads"] = {
        "workers_alive": health.workers_alive,
        "workers_configured": health.workers_configured,
        "outbox_alive": health.outbox_alive,
    }
    if health.ok:
        return 200, doc
    doc["status"] = "unhealthy"
    doc["dead"] = list(health.dead)
    return 503, doc


def start_http(
    bind: str,
    port: int,
    queue_factory: Callable[[], tuple[JobQueue, Outbox]],
    stages: StageMetrics,
    health: Callable[[], PoolHealth] | None = None,
) -> ThreadingHTTPServer:
    """Serve ``/healthz`` and ``/metrics`` in a background thread; returns the server (``shutdown()``).

    Parameters
    ----------
    bind, port:
        Listen address (port 0: any free port, read it from ``server.server_address``).
    queue_factory:
        Returns the state stores.
    stages:
        Stage latencies.
    health:
        Returns the worker pool's thread liveness at each request; ``None``: not reported.

    Raises
    ------
    OSError
        When the port cannot be bound.
    """
    queue, outbox = queue_factory()
    reported: list[tuple[str, ...]] = [()]  # the dead components last logged (one warning per change)
    report_lock = threading.Lock()

    def _log_dead_change(dead: tuple[str, ...]) -> None:
        with report_lock:
            if dead == reported[0]:
                return
            reported[0] = dead
        if dead:
            logger.error("unhealthy: thread(s) not alive: %s", ", ".join(dead))
        else:
            logger.info("healthy again: every thread alive")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/healthz":
                    pool = health() if health is not None else None
                    code, doc = health_document(queue, outbox, pool)
                    if pool is not None:
                        _log_dead_change(pool.dead)
                    body, ctype = json.dumps(doc), "application/json"
                elif self.path == "/metrics":
                    code = 200
                    body = render_metrics(queue, outbox, stages, health() if health is not None else None)
                    ctype = "text/plain; version=0.0.4"
                else:
                    self.send_error(404)
                    return
            except Exception as exc:
                logger.exception("health/metrics request failed")
                body, ctype = json.dumps({"status": "error", "error": str(exc)}), "application/json"
                self.send_response(503)
            else:
                self.send_response(code)
            data = body.encode()
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("http %s", format % args)

    server = ThreadingHTTPServer((bind, port), Handler)
    threading.Thread(target=server.serve_forever, name="dermnode-http", daemon=True).start()
    logger.info("health and metrics on http://%s:%d/", bind, server.server_address[1])
    return server
