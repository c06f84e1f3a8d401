"""Where the receive time goes: dermnode's Store SCP in-process, with its C-STORE steps timed.

Usage::

    .venv/bin/python bench/ingest_profile.py [--n 200] [--encoding jpeg|native]

Starts the Store SCP in this process (``dermnode.scp.server.start_server`` with the real spool and job queue,
fsync on, audit logging to a file as ``dermnode serve`` does), sends N files over one association with
``storescu`` (``TCP_NODELAY=1``, after a 4-file warm-up and ``sync``), and reports per image: wall time, CPU time
of the process (all threads) and the wall time of each step of the C-STORE handler (free-space check and job lookup,
``pydicom`` decode of the dataset, the file meta plus a view of the received bytes, spool write with fsyncs, SQLite
commit). Whatever CPU is not in the handler is
pynetdicom's PDU and DIMSE processing in its reactor and DUL threads (pure Python, one GIL).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import send_parallel, source_images, write_dicoms
from pynetdicom.events import Event

import dermnode.scp.server as srv
from dermnode.logging_setup import configure_logging
from dermnode.scp.spool import Spool
from dermnode.settings import LoggingSettings, ScpSettings
from dermnode.workqueue.jobs import JobQueue

# the test helpers (tests/ is put on sys.path by common)
from peers import free_port

ACC: dict[str, float] = collections.defaultdict(float)
LOCK = threading.Lock()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with LOCK:
                ACC[name] += time.perf_counter() - t

    return wrapper


def instrument() -> None:
    Spool.store = timed("spool.store: write, fsync, rename, dir fsync", Spool.store)  # type: ignore[method-assign]
    JobQueue.enqueue = timed("queue.enqueue: SQLite commit (WAL, FULL)", JobQueue.enqueue)  # type: ignore[method-assign]
    srv.admit = timed("admit: statvfs + job lookup", srv.admit)  # type: ignore[assignment]
    srv.received_file = timed("received_file(): meta + view of the received bytes", srv.received_file)
    Event.dataset = property(timed("event.dataset: pydicom decode", Event.dataset.fget))  # type: ignore[assignment, arg-type]
    srv.handle_store = timed("handle_store (whole handler)", srv.handle_store)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--encoding", choices=["jpeg", "native"], default="jpeg")
    args = ap.parse_args(argv)
    jpeg = args.encoding == "jpeg"
    instrument()
    images, _ = source_images(60)
    env = {"TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory(prefix="dermnode-bench-prof-") as tmp:
        work = Path(tmp)
        configure_logging(LoggingSettings())
        log = (work / "service.log").open("w")
        logging.getLogger().handlers[0].stream = log  # type: ignore[attr-defined]
        files = write_dicoms(work / "src", args.n + 4, jpeg=jpeg, images=images)
        port = free_port()
        server = srv.start_server(ScpSettings(port=port), Spool(work, 1), JobQueue(work / "db.sqlite"))
        try:
            send_parallel(port, [f.path for f in files[:4]], jpeg=jpeg, called_aet="DERMNODE", associations=1,
                          timeout_s=60, env=env)
            os.sync()
            ACC.clear()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            res = send_parallel(port, [f.path for f in files[4:]], jpeg=jpeg, called_aet="DERMNODE", associations=1,
                                timeout_s=300, env=env)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            server.shutdown()
            log.close()
    n = args.n
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    print(f"{args.encoding}: {n / res.wall_s:.1f} images/s over 1 association, {res.success_responses}/{n} "
          f"acknowledged; per image: wall {res.wall_s / n * 1000:.2f} ms, process CPU {cpu / n * 1000:.2f} ms")
    for name, secs in sorted(ACC.items(), key=lambda kv: -kv[1]):
        print(f"  {name:48s} {secs / n * 1000:6.2f} ms/image (wall)")
    if res.success_responses != n:
        print(res.errors[:1500])
    return 0 if res.success_responses == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
