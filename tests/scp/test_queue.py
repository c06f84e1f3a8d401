from __future__ import annotations

from pathlib import Path

import pytest

from dermnode.db import database_path
from dermnode.errors import DeliveryError, InsufficientSpaceError
from dermnode.outbox import Delivery, Outbox
from dermnode.scp.queue import JobQueue
from dermnode.scp.spool import Spool, atomic_write
from dermnode.settings import DeliverySettings


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    return JobQueue(database_path(tmp_path), max_attempts=3, retry_delay_s=0.0)


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


def test_atomic_write_is_owner_only_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "d" / "x.dcm"
    atomic_write(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.dcm"]


def test_spool_refuses_below_min_free(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_mb=10**9)
    with pytest.raises(InsufficientSpaceError):
        spool.store("1.2.3", b"x")
    assert list(spool.files()) == []


def test_outbox_backoff_dead_letter_and_idempotent_add(tmp_path: Path) -> None:
    ob = Outbox(database_path(tmp_path), DeliverySettings(max_attempts=2, backoff_initial_s=0.0))
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


def test_outbox_permanent_error_is_not_retried(tmp_path: Path) -> None:
    ob = Outbox(database_path(tmp_path), DeliverySettings(max_attempts=5, backoff_initial_s=0.0))
    ob.add(None, "fhir", "fhir", "k", tmp_path / "b.json")

    def rejected(d: Delivery) -> None:
        raise DeliveryError("HTTP 400", permanent=True)

    ob.pump_once({"fhir": rejected})
    assert ob.counts()["dead_letter"] == 1
    assert not ob.pump_once({"fhir": rejected})


def test_outbox_backoff_is_exponential_and_capped(tmp_path: Path) -> None:
    ob = Outbox(database_path(tmp_path), DeliverySettings(backoff_initial_s=5, backoff_max_s=60))
    assert [ob.backoff(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
