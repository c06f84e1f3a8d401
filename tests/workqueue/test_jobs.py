from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from dermnode.errors import DeliveryError, InsufficientSpaceError, StorageError
from dermnode.scp.spool import Spool
from dermnode.settings import DeliverySettings
from dermnode.workqueue import base
from dermnode.workqueue.db import StateDB
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Delivery, Outbox


class Clock:
    """A settable ``time`` stand-in for the work-queue base (claims and retries read ``time.time()``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def queue(state_db: StateDB | Path, tmp_path: Path) -> JobQueue:
    return JobQueue(state_db, max_attempts=3, retry_delay_s=0.0)


def test_enqueue_is_idempotent_per_sop_instance(queue: JobQueue, tmp_path: Path) -> None:
    assert queue.enqueue("1.2.3", "1.2.840.10008.5.1.4.1.1.77.1.7", tmp_path / "a.dcm")
    assert not queue.enqueue("1.2.3", "1.2.840.10008.5.1.4.1.1.77.1.7", tmp_path / "a.dcm")
    assert queue.counts()["pending"] == 1


def test_claim_complete(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("1.2.3", "1.2", tmp_path / "a")
    job = queue.claim("w")
    assert job is not None and job.attempts == 1
    assert queue.claim("w") is None
    queue.complete(job, "analysed")
    assert queue.counts()["done"] == 1


def test_failures_retry_then_dead_letter(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("1.2.3", "1.2", tmp_path / "a")
    for attempt in (1, 2):
        job = queue.claim("w")
        assert job is not None and job.attempts == attempt
        assert queue.fail(job, "boom") is False
    job = queue.claim("w")
    assert job is not None
    assert queue.fail(job, "boom 3") is True
    counts = queue.counts()
    assert counts["dead_letter"] == 1 and counts["pending"] == 0
    (dl,) = queue.dead_letters()
    assert dl["error"] == "boom 3" and dl["attempts"] == 3 and dl["sop_instance_uid"] == "1.2.3"
    assert queue.replay() == 1
    job = queue.claim("w")
    assert job is not None and job.attempts == 1


def test_permanent_failure_dead_letters_at_once(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("9", "1.2", tmp_path / "a")
    job = queue.claim("w")
    assert job is not None
    assert queue.fail(job, "cannot decode", permanent=True)


def test_recover_requeues_running_jobs(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("1", "1.2", tmp_path / "a")
    assert queue.claim("w") is not None
    other = JobQueue(queue.db_path)  # a "restarted" process
    assert other.recover() == 1
    job = other.claim("w2")
    assert job is not None and job.attempts == 2  # the interrupted attempt counts


def test_recover_dead_letters_a_job_that_keeps_killing_the_process(queue: JobQueue, tmp_path: Path) -> None:
    """A poison image that kills the process (kill -9: no fail()) is tried max_attempts times, then dead."""
    queue.enqueue("1.2.3", "1.2", tmp_path / "a")
    for attempt in (1, 2, 3):
        job = queue.claim("w")
        assert job is not None and job.attempts == attempt
        restarted = JobQueue(queue.db_path, max_attempts=3)  # the process died while analysing it
        assert restarted.recover() == (1 if attempt < 3 else 0)
    assert queue.claim("w") is None
    row = queue.get("1.2.3")
    assert row is not None and row["state"] == "dead"
    (dl,) = queue.dead_letters()
    assert dl["attempts"] == 3 and dl["sop_instance_uid"] == "1.2.3" and dl["replayed_at"] is None
    assert dl["error"] == "interrupted on attempt 3 of 3 (the process stopped while analysing it)"
    assert queue.counts()["dead_letter"] == 1
    assert queue.replay() == 1  # once the cause is fixed it can be replayed like any dead job
    job = queue.claim("w")
    assert job is not None and job.attempts == 1


def test_recover_names_the_jobs_that_ran_beside_a_dead_lettered_one(queue: JobQueue, tmp_path: Path) -> None:
    """With two workers the culprit cannot be told apart: the dead letter says which jobs ran with it."""
    queue.enqueue("9.1", "1.2", tmp_path / "a")
    queue.enqueue("9.2", "1.2", tmp_path / "b")
    for _ in (1, 2, 3):
        assert queue.claim("w0") is not None and queue.claim("w1") is not None
        JobQueue(queue.db_path, max_attempts=3).recover()
    errors = {dl["sop_instance_uid"]: dl["error"] for dl in queue.dead_letters()}
    assert set(errors) == {"9.1", "9.2"}
    assert "job(s) 2 were running at the same time" in errors["9.1"]
    assert "job(s) 1 were running at the same time" in errors["9.2"]


def test_recover_dead_letter_keeps_the_previous_error(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("7", "1.2", tmp_path / "a")
    for _ in (1, 2):
        job = queue.claim("w")
        assert job is not None
        queue.fail(job, "RuntimeError: boom")
    assert queue.claim("w") is not None
    assert JobQueue(queue.db_path, max_attempts=3).recover() == 0
    (dl,) = queue.dead_letters()
    assert dl["error"].startswith("interrupted on attempt 3 of 3") and dl["error"].endswith("RuntimeError: boom")


def test_state_of_jobs(queue: JobQueue, tmp_path: Path) -> None:
    assert queue.state("1.2.3") is None and not queue.contains("1.2.3")
    queue.enqueue("1.2.3", "1.2", tmp_path / "a")
    assert queue.state("1.2.3") == "pending" and queue.contains("1.2.3")
    job = queue.claim("w")
    assert job is not None and queue.state("1.2.3") == "running"
    queue.fail(job, "DecodeError: truncated", permanent=True)
    assert queue.state("1.2.3") == "dead" and queue.contains("1.2.3")


def test_requeue_dead_gives_a_fresh_start_with_the_new_copy(queue: JobQueue, tmp_path: Path) -> None:
    queue.enqueue("1.2.3", "1.2", tmp_path / "old.dcm", calling_aet="OLD")
    job = queue.claim("w")
    assert job is not None
    queue.fail(job, "DecodeError: truncated", permanent=True)
    assert queue.requeue_dead(
        "1.2.3", "1.2.4", tmp_path / "new.dcm", study_instance_uid="9.8", calling_aet="NEW", peer="127.0.0.1:1"
    )
    row = queue.get("1.2.3")
    assert row is not None
    assert (row["state"], row["attempts"], row["last_error"], row["outcome"]) == ("pending", 0, None, None)
    assert (row["path"], row["sop_class_uid"], row["calling_aet"]) == (str(tmp_path / "new.dcm"), "1.2.4", "NEW")
    (dl,) = queue.dead_letters()
    assert dl["replayed_at"] is not None
    assert not queue.requeue_dead("1.2.3", "1.2.4", tmp_path / "new.dcm")  # not dead any more
    job = queue.claim("w")
    assert job is not None and job.attempts == 1 and job.path == tmp_path / "new.dcm"
    assert not queue.requeue_dead("1.2.3", "1.2.4", tmp_path / "new.dcm")  # running: left alone
    assert not queue.requeue_dead("5.5", "1.2", tmp_path / "x.dcm")  # unknown
    assert queue.get("5.5") is None


class _BrokenConnection:
    """A connection whose every statement fails as a locked, full or corrupt database would."""

    broken = False

    def execute(self, *args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    def transaction(self) -> _BrokenConnection:
        return self

    def __enter__(self) -> _BrokenConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_scp_side_methods_turn_database_errors_into_storage_errors(
    queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "_conn", _BrokenConnection)
    with pytest.raises(StorageError, match="disk I/O error"):
        queue.state("1.2.3")
    with pytest.raises(StorageError, match="disk I/O error"):
        queue.contains("1.2.3")
    with pytest.raises(StorageError, match="disk I/O error"):
        queue.enqueue("1.2.3", "1.2", tmp_path / "a")
    with pytest.raises(StorageError, match="disk I/O error"):
        queue.requeue_dead("1.2.3", "1.2", tmp_path / "a")


def test_spool_refuses_below_min_free(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_mb=10**9)
    with pytest.raises(InsufficientSpaceError):
        spool.store("1.2.3", b"x")
    assert list(spool.files()) == []


def test_outbox_backoff_dead_letter_and_idempotent_add(state_db: StateDB | Path, tmp_path: Path) -> None:
    ob = Outbox(state_db, DeliverySettings(max_attempts=2, backoff_initial_s=0.0))
    f = tmp_path / "seg.dcm"
    f.write_bytes(b"x")
    assert ob.add(None, "dicom", "pacs:main", "1.2.3", f)
    assert not ob.add(None, "dicom", "pacs:main", "1.2.3", f)
    calls: list[Delivery] = []

    def flaky(d: Delivery) -> None:
        calls.append(d)
        raise DeliveryError("peer down")

    assert ob.pump_once({"dicom": flaky})
    assert ob.counts()["pending"] == 1
    assert ob.pump_once({"dicom": flaky})
    assert ob.counts()["dead_letter"] == 1 and len(calls) == 2
    assert ob.replay() == 1
    assert ob.pump_once({"dicom": lambda d: None})
    assert ob.counts()["done"] == 1 and not ob.pump_once({"dicom": flaky})


def test_outbox_permanent_error_is_not_retried(state_db: StateDB | Path, tmp_path: Path) -> None:
    ob = Outbox(state_db, DeliverySettings(max_attempts=5, backoff_initial_s=0.0))
    ob.add(None, "fhir", "fhir", "k", tmp_path / "b.json")

    def rejected(d: Delivery) -> None:
        raise DeliveryError("HTTP 400", permanent=True)

    ob.pump_once({"fhir": rejected})
    assert ob.counts()["dead_letter"] == 1
    assert not ob.pump_once({"fhir": rejected})


def test_job_and_outbox_share_one_backoff_policy(state_db: StateDB | Path, tmp_path: Path) -> None:
    queue = JobQueue(state_db, retry_delay_s=5, retry_delay_max_s=60)
    ob = Outbox(state_db, DeliverySettings(backoff_initial_s=5, backoff_max_s=60))
    assert [queue.backoff(n) for n in range(1, 8)] == [ob.backoff(n) for n in range(1, 8)]
    assert [queue.backoff(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
    assert JobQueue(state_db).backoff(20) == 600  # capped by default (was unbounded)


def test_failed_job_is_not_reclaimed_before_its_retry_is_due(state_db: StateDB | Path, tmp_path: Path) -> None:
    """A real retry delay (every other fixture sets 0): the job waits, then runs again."""
    queue = JobQueue(state_db, max_attempts=3, retry_delay_s=0.4)
    queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    job = queue.claim("w")
    assert job is not None
    failed_at = time.time()
    assert queue.fail(job, "boom") is False
    assert queue.claim("w") is None, "claimed again at once despite retry_delay_s"
    while time.time() < failed_at + 0.3:
        assert queue.claim("w") is None, "claimed again before the retry delay was over"
        time.sleep(0.05)
    deadline = time.time() + 5
    again = None
    while again is None and time.time() < deadline:
        again = queue.claim("w")
        time.sleep(0.02)
    assert again is not None and again.attempts == 2
    assert time.time() - failed_at >= 0.4


def test_job_retry_delay_doubles_and_is_capped(
    state_db: StateDB | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(base, "time", clock)
    queue = JobQueue(state_db, max_attempts=5, retry_delay_s=30, retry_delay_max_s=100)
    queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    for attempt, delay in enumerate((30.0, 60.0, 100.0, 100.0), start=1):
        job = queue.claim("w")
        assert job is not None and job.attempts == attempt
        assert queue.fail(job, f"error {attempt}") is False
        (due,) = queue._conn().execute("SELECT next_attempt_at FROM jobs").fetchone()
        assert due == pytest.approx(clock.now + delay)
        clock.now = due - 0.5
        assert queue.claim("w") is None
        clock.now = due
    job = queue.claim("w")
    assert job is not None and job.attempts == 5
    assert queue.fail(job, "last") is True
    assert queue.counts()["dead_letter"] == 1


def test_outbox_backoff_is_exponential_and_capped(state_db: StateDB | Path, tmp_path: Path) -> None:
    ob = Outbox(state_db, DeliverySettings(backoff_initial_s=5, backoff_max_s=60))
    assert [ob.backoff(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
