"""Worker threads: a failure to record a job's outcome never kills a thread nor leaves the job ``running``."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dermnode.errors import DecodeError
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Outbox
from dermnode.workqueue.workers import WorkerPool, run_job
from state_faults import LOCKED, flaky


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")




@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    return JobQueue(database_path(tmp_path), max_attempts=3, retry_delay_s=0.0)


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(database_path(tmp_path), DeliverySettings())


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    started: list[WorkerPool] = []
    yield started
    for pool in started:
        pool.stop(0.5)


def start_pool(
    pools: list[WorkerPool], queue: JobQueue, outbox: Outbox, processor: Callable[[Job], str], count: int = 1
) -> WorkerPool:
    pool = WorkerPool(
        queue, outbox, processor, {}, WorkerSettings(count=count, poll_interval_s=0.02), delivery_poll_s=0.02
    )
    pools.append(pool)
    pool.start()
    return pool


def states(queue: JobQueue, *uids: str) -> list[str]:
    out = []
    for uid in uids:
        row = queue.get(uid)
        assert row is not None
        out.append(row["state"])
    return out


def test_worker_survives_a_failed_complete_and_records_the_outcome(
    queue: JobQueue, outbox: Outbox, pools: list[WorkerPool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's case: ``complete`` raises ``database is locked`` once; the thread lives on, both jobs end
    ``done``, the processor runs once per job, and no job stays ``running``."""
    for uid in ("a", "b"):
        queue.enqueue(uid, "1.2.3", tmp_path / uid)
    complete, calls = flaky(queue.complete, failures=1)
    monkeypatch.setattr(queue, "complete", complete)
    processed: list[str] = []

    def processor(job: Job) -> str:
        processed.append(job.sop_instance_uid)
        return "analysed"

    pool = start_pool(pools, queue, outbox, processor)
    wait_until(lambda: queue.counts()["done"] == 2, what="both jobs done")
    assert states(queue, "a", "b") == ["done", "done"]
    assert sorted(processed) == ["a", "b"], "the outcome is retried, not the job"
    assert len(calls) == 3
    health = pool.health()
    assert health.ok and health.workers_alive == 1 and health.outbox_alive


def test_worker_survives_a_failed_fail_and_the_job_is_retried(
    queue: JobQueue, outbox: Outbox, pools: list[WorkerPool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.enqueue("x", "1.2.3", tmp_path / "x")
    fail, calls = flaky(queue.fail, failures=2)
    monkeypatch.setattr(queue, "fail", fail)
    attempts: list[int] = []

    def processor(job: Job) -> str:
        attempts.append(job.attempts)
        if job.attempts == 1:
            raise RuntimeError("transient")
        return "analysed"

    pool = start_pool(pools, queue, outbox, processor)
    wait_until(lambda: states(queue, "x") == ["done"], what="job done on its second attempt")
    assert attempts == [1, 2] and len(calls) == 3
    assert pool.health().ok


def test_failed_dead_letter_record_is_retried(queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue.enqueue("bad", "1.2.3", tmp_path / "bad")
    fail, calls = flaky(queue.fail, failures=2)
    monkeypatch.setattr(queue, "fail", fail)
    job = queue.claim("t")
    assert job is not None

    def processor(job: Job) -> str:
        raise DecodeError("not a dataset")

    assert run_job(queue, job, processor, stop=threading.Event())
    assert states(queue, "bad") == ["dead"] and len(calls) == 3
    assert len(queue.dead_letters("job")) == 1, "one dead-letter row, not one per try"


@pytest.mark.timeout(30)  # returning at all after stop is the behaviour; a hang fails here
def test_run_job_gives_up_on_stop_and_the_job_is_recoverable(
    queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.enqueue("s", "1.2.3", tmp_path / "s")

    def always_locked(job: Job, outcome: str) -> None:
        raise sqlite3.OperationalError(LOCKED)

    monkeypatch.setattr(queue, "complete", always_locked)
    job = queue.claim("t")
    assert job is not None
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert run_job(queue, job, lambda j: "analysed", stop=stop) is False
    assert states(queue, "s") == ["running"]
    monkeypatch.undo()
    assert queue.recover() == 1 and states(queue, "s") == ["pending"]


@pytest.mark.timeout(30)  # returning at all after stop is the behaviour; a hang fails here
def test_stop_ends_a_stuck_state_update_after_the_grace_period(
    queue: JobQueue, outbox: Outbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.enqueue("g", "1.2.3", tmp_path / "g")

    def always_locked(job: Job, outcome: str) -> None:
        raise sqlite3.OperationalError(LOCKED)

    monkeypatch.setattr(queue, "complete", always_locked)
    ran = threading.Event()

    def processor(job: Job) -> str:
        ran.set()
        return "analysed"

    pool = WorkerPool(queue, outbox, processor, {}, WorkerSettings(count=1, poll_interval_s=0.02), 0.02)
    pool.start()
    assert ran.wait(10)
    assert pool.stop(0.3) is True
    assert not any(t.is_alive() for t in pool._threads)
    assert states(queue, "g") == ["running"]  # left for recover() at the next start


def test_worker_loop_survives_an_unexpected_error(
    queue: JobQueue, outbox: Outbox, pools: list[WorkerPool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dermnode.workqueue.workers as workers

    real = workers.run_job
    calls: list[int] = []

    def broken_once(*args: object, **kwargs: object) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug around a job")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(workers, "run_job", broken_once)
    monkeypatch.setattr(workers, "LOOP_ERROR_PAUSE_S", 0.01)
    queue.enqueue("u1", "1.2.3", tmp_path / "u1")
    pool = start_pool(pools, queue, outbox, lambda j: "analysed")
    wait_until(lambda: len(calls) >= 1, what="first job")
    queue.enqueue("u2", "1.2.3", tmp_path / "u2")
    wait_until(lambda: states(queue, "u2") == ["done"], what="the next job")
    assert pool.health().workers_alive == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_names_a_dead_worker_thread(
    queue: JobQueue, outbox: Outbox, pools: list[WorkerPool], tmp_path: Path
) -> None:
    pool = start_pool(pools, queue, outbox, lambda j: "analysed", count=2)
    assert pool.health().ok and pool.health().workers_alive == 2

    def exits(job: Job) -> str:
        raise SystemExit  # not an Exception: ends the thread it runs on

    pool.processor = exits
    queue.enqueue("k", "1.2.3", tmp_path / "k")
    wait_until(lambda: not pool.health().ok, what="a dead worker")
    health = pool.health()
    assert health.running and health.workers_alive == 1 and health.workers_configured == 2
    assert len(health.dead) == 1 and health.dead[0].startswith("worker-")
    pool.stop(0.5)
    assert pool.health().ok, "a stopped pool is not unhealthy"


def test_claimed_jobs_record_a_per_process_owner(queue: JobQueue, outbox: Outbox, tmp_path: Path) -> None:
    queue.enqueue("o", "1.2.3", tmp_path / "o")
    pool = WorkerPool(queue, outbox, lambda j: "x", {}, WorkerSettings(count=2))
    owners = {pool.owner_id(0), pool.owner_id(1)}
    assert len(owners) == 2 and all(str(os.getpid()) in o for o in owners)
    assert queue.claim(pool.owner_id(1)) is not None
    row = queue.get("o")
    assert row is not None and row["owner"] == f"worker-1@{os.getpid()}"
