"""Operational endpoints: ``/healthz`` and Prometheus ``/metrics`` on a loopback HTTP port.

Queue and delivery counts are read from the state database, so they always agree with ``dermnode status``.
Stage latencies are accumulated in memory by the job processor (:class:`StageMetrics`) and exported as
Prometheus summaries (``_sum`` and ``_count`` in seconds).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dermnode.outbox import Outbox
from dermnode.scp.queue import JobQueue

logger = logging.getLogger(__name__)


class StageMetrics:
    """Thread-safe accumulator of per-stage latencies and outcome counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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


def render_metrics(queue: JobQueue, outbox: Outbox, stages: StageMetrics) -> str:
    """The Prometheus text exposition of dermnode's state."""
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
    lines += ["# HELP dermnode_analysis_outcomes_total Analysis outcomes since start.",
              "# TYPE dermnode_analysis_outcomes_total counter"]
    lines += [f'dermnode_analysis_outcomes_total{{status="{k}"}} {v}' for k, v in sorted(outcomes.items())]
    return "\n".join(lines) + "\n"


def start_http(bind: str, port: int, queue_factory: Callable[[], tuple[JobQueue, Outbox]],
               stages: StageMetrics) -> ThreadingHTTPServer:
    """Serve ``/healthz`` and ``/metrics`` in a background thread; returns the server (``shutdown()``).

    Raises
    ------
    OSError
        When the port cannot be bound.
    """
    queue, outbox = queue_factory()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/healthz":
                    body = json.dumps({"status": "ok", "jobs": queue.counts(), "deliveries": outbox.counts()})
                    ctype = "application/json"
                elif self.path == "/metrics":
                    body = render_metrics(queue, outbox, stages)
                    ctype = "text/plain; version=0.0.4"
                else:
                    self.send_error(404)
                    return
            except Exception as exc:
                logger.exception("health/metrics request failed")
                body, ctype = json.dumps({"status": "error", "error": str(exc)}), "application/json"
                self.send_response(503)
            else:
                self.send_response(200)
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
