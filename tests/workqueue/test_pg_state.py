"""What the shared PostgreSQL state adds: SKIP LOCKED claims, leases, NOTIFY, migrations, masked passwords."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from dermnode.errors import StorageError
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue.db import PostgresState
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Outbox
from dermnode.workqueue.workers import WorkerPool
from pg import PASSWORD, Cluster, fresh_pg


def test_concurrent_claims_never_take_the_same_job(pg_state: PostgresState, tmp_path: Path) -> None:
    queue = JobQueue(pg_state)
    for i in range(60):
        queue.enqueue(f"1.2.{i}", "1.2", tmp_path / f"{i}.dcm")
    taken: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (job := queue.claim(name)) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(taken) == list(range(1, 61))  # every job once, none twice
    assert queue.counts()["running"] == 60


def test_a_renewed_lease_is_never_taken_over_an_expired_one_is(pg_cluster: Cluster, tmp_path: Path) -> None:
    db = fresh_pg(pg_cluster, lease_s=0.6)
    try:
        owner, other = JobQueue(db, max_attempts=3), JobQueue(db, max_attempts=3)
        owner.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
        job = owner.claim("worker-0@host-a:1")
        assert job is not None
        end = time.monotonic() + 1.5  # well past the lease: renewed every 0.2 s it is never orphaned
        while time.monotonic() < end:
            assert owner.renew_held() == 1
            assert other.recover() == 0 and other.claim("worker-0@host-b:2") is None
            time.sleep(0.2)
        time.sleep(0.8)  # the owner "died": no renewal
        assert other.recover() == 1
        taken = other.claim("worker-0@host-b:2")
        assert taken is not None and taken.id == job.id and taken.attempts == 2
        assert not owner.renew(job.id, "worker-0@host-a:1")  # the old owner's lease is gone
        assert owner.renew_held() == 0
        row = other.get("1.2.3")
        assert row is not None and row["owner"] == "worker-0@host-b:2" and row["lease_expires_at"] > time.time()
    finally:
        db.close_all()


def test_worker_pool_takes_over_the_job_of_a_dead_process(pg_cluster: Cluster, tmp_path: Path) -> None:
    """A job claimed by a process that stopped renewing is finished by another pool after the lease."""
    db = fresh_pg(pg_cluster, lease_s=0.5)
    try:
        dead = JobQueue(db)
        dead.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
        assert dead.claim("worker-0@dead-host:1") is not None  # and then the host died
        done: list[str] = []
        queue, outbox = JobQueue(db), Outbox(db, DeliverySettings())

        def processor(job: Job) -> str:
            done.append(job.sop_instance_uid)
            return "analysed"

        pool = WorkerPool(queue, outbox, processor, {}, WorkerSettings(count=1, poll_interval_s=0.05), 0.05,
                          deliver=False, notify_poll_s=0.2)
        started = time.monotonic()
        pool.start()
        try:
            end = time.monotonic() + 10
            while queue.counts()["done"] != 1 and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            pool.stop(1.0)
        assert done == ["1.2.3"] and queue.counts()["done"] == 1
        assert time.monotonic() - started >= 0.3  # not before the lease was over
        row = queue.get("1.2.3")
        assert row is not None and row["attempts"] == 2
    finally:
        db.close_all()


def test_a_stale_worker_cannot_finish_or_fail_a_job_taken_over(
    pg_state: PostgresState, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lease 0 s: the first claim lapses at once, another queue re-claims the job; the stale worker's outcome changes
    nothing (logged "lease lost"), the new holder's completes it."""
    stale, holder = JobQueue(pg_state, max_attempts=2), JobQueue(pg_state, max_attempts=2)
    stale.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    old = stale.claim("worker-0@host-a:1")
    assert old is not None and old.owner == "worker-0@host-a:1"
    assert holder.recover() == 1
    new = holder.claim("worker-0@host-b:2")
    assert new is not None and new.id == old.id and new.attempts == 2

    def row() -> tuple[object, ...]:
        r = holder.get("1.2.3")
        assert r is not None
        return (r["state"], r["owner"], r["attempts"], r["last_error"], r["outcome"])

    before = row()
    assert before[:3] == ("running", "worker-0@host-b:2", 2)
    with caplog.at_level("WARNING", logger="dermnode.workqueue.base"):
        assert stale.complete(old, "analysed by the stale worker") is False
        assert stale.fail(old, "OSError: stale", permanent=False) is False  # would have re-queued it
        assert stale.fail(old, "ValueError: stale", permanent=True) is False  # would have dead-lettered it
        stale.release(old)  # would have put it back to pending
    assert row() == before
    assert holder.dead_letters() == []
    assert caplog.text.count(f"lease lost: job {old.id} is now held by another worker") == 4

    assert holder.complete(new, "analysed") is True
    done = holder.get("1.2.3")
    assert done is not None and done["state"] == "done" and done["outcome"] == "analysed" and done["owner"] is None
    assert stale.complete(old, "late") is False
    assert holder.state("1.2.3") == "done"


def test_a_stale_worker_cannot_fail_a_job_the_same_owner_reclaimed(pg_state: PostgresState, tmp_path: Path) -> None:
    """The attempt number tells two claims of one owner apart: the first claim's failure leaves the second alone."""
    queue = JobQueue(pg_state, max_attempts=5)
    queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    first = queue.claim("worker-0@host-a:1")
    assert first is not None and queue.recover() == 1
    second = queue.claim("worker-0@host-a:1")
    assert second is not None and second.attempts == 2
    assert queue.fail(first, "OSError: stale") is False
    assert queue.state("1.2.3") == "running"
    assert queue.fail(second, "OSError: real") is False  # recorded: back to pending, not dead-lettered
    r = queue.get("1.2.3")
    assert r is not None and r["state"] == "pending" and r["last_error"] == "OSError: real"


def test_a_stale_sender_cannot_record_a_delivery_taken_over(
    pg_state: PostgresState, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = DeliverySettings(max_attempts=2)
    stale, holder = Outbox(pg_state, settings), Outbox(pg_state, settings)
    stale.add(None, "dicom", "pacs", "seg-1", tmp_path / "seg.dcm")
    old = stale.claim("deliveries@host-a:1")
    assert old is not None and old.owner == "deliveries@host-a:1"
    assert holder.recover() == 1
    new = holder.claim()  # the default owner of this process
    assert new is not None and new.id == old.id and new.attempts == 2 and new.owner == holder.default_owner()
    with caplog.at_level("WARNING", logger="dermnode.workqueue.base"):
        assert stale.delivered(old) is False
        assert stale.failed(old, "timeout", permanent=False) is False
        assert stale.failed(old, "refused", permanent=True) is False
    assert holder.state_of(new.id) == "sending" and holder.counts()["dead_letter"] == 0
    assert JobQueue(pg_state).dead_letters() == []
    assert caplog.text.count(f"lease lost: delivery {old.id} is now held by another worker") == 3
    assert holder.delivered(new) is True
    assert holder.state_of(new.id) == "done"
    assert stale.delivered(old) is False and holder.state_of(new.id) == "done"


def test_recover_takes_only_expired_leases(pg_cluster: Cluster, tmp_path: Path) -> None:
    """The periodic recover() of the lease loop never touches a row whose lease is still running."""
    db = fresh_pg(pg_cluster, lease_s=30.0)
    try:
        queue, outbox = JobQueue(db), Outbox(db, DeliverySettings())
        queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
        outbox.add(None, "dicom", "pacs", "seg-1", tmp_path / "seg.dcm")
        job, delivery = queue.claim("worker-0@host-a:1"), outbox.claim()
        assert job is not None and delivery is not None
        other_q, other_o = JobQueue(db), Outbox(db, DeliverySettings())
        assert other_q.recover() == 0 and other_o.recover() == 0
        assert queue.state("1.2.3") == "running" and outbox.state_of(delivery.id) == "sending"
        assert queue.complete(job, "analysed") and outbox.delivered(delivery)
    finally:
        db.close_all()


def test_notify_wakes_a_listener(pg_state: PostgresState, tmp_path: Path) -> None:
    listener = pg_state.listener()
    wake = listener.event("dermnode_jobs")
    assert wake.wait(5)  # set once when listening starts
    wake.clear()
    JobQueue(pg_state).enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    assert wake.wait(5)


def test_schema_migration_is_versioned_and_safe_when_instances_start_together(pg_cluster: Cluster) -> None:
    admin = psycopg.connect(pg_cluster.dsn, password=PASSWORD, autocommit=True)
    admin.execute("DROP DATABASE IF EXISTS migrate_race")
    admin.execute("CREATE DATABASE migrate_race")
    dsn = pg_cluster.dsn.replace("dbname=dermnode", "dbname=migrate_race")
    errors: list[BaseException] = []
    states = [PostgresState(dsn, password=PASSWORD) for _ in range(6)]
    barrier = threading.Barrier(len(states))

    def start(db: PostgresState) -> None:
        barrier.wait()
        try:
            JobQueue(db)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    conn = states[0].connect()
    assert [tuple(r) for r in conn.execute("SELECT version FROM schema_version")] == [(1,)]
    for db in states:
        db.close_all()
    admin.execute("DROP DATABASE migrate_race")
    admin.close()


def test_the_password_is_never_in_an_error(pg_cluster: Cluster) -> None:
    wrong = "not-the-password-7f3a"
    with pytest.raises(StorageError) as err:
        PostgresState(pg_cluster.dsn, password=wrong).connect()
    assert wrong not in str(err.value) and "password authentication failed" in str(err.value)
    assert "user=dermnode" in str(err.value)
    assert PASSWORD not in PostgresState(pg_cluster.dsn, password=PASSWORD).describe()
