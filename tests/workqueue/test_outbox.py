"""The outbox: a failed state update never leaves a delivery ``sending`` nor stops the delivery thread."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dermnode.errors import DeliveryError
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue import base
from dermnode.workqueue import outbox as outbox_module
from dermnode.workqueue.base import StateUpdateAbandonedError, retry_state_update
from dermnode.workqueue.db import StateDB
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import BatchDeliverer, Delivery, Outbox
from dermnode.workqueue.workers import WorkerPool
from state_faults import LOCKED, flaky


@pytest.fixture
def outbox(state_db: StateDB | Path, tmp_path: Path) -> Outbox:
    ob = Outbox(state_db, DeliverySettings(max_attempts=3, backoff_initial_s=0.0))
    ob.add(None, "dicom", "pacs:main", "1.2.3.seg", tmp_path / "seg.dcm")
    return ob


def state(ob: Outbox) -> str:
    counts = ob.counts()
    (only,) = [k for k, v in counts.items() if v]
    return only


def test_failed_delivered_update_is_retried_not_left_sending(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    delivered, calls = flaky(outbox.delivered, failures=2)
    monkeypatch.setattr(outbox, "delivered", delivered)
    sent: list[int] = []
    assert outbox.pump_once({"dicom": lambda d: sent.append(d.id)}, stop=threading.Event())
    assert state(outbox) == "done" and len(calls) == 3
    assert len(sent) == 1, "the state update is retried, not the send"


def test_failed_failed_update_is_retried(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    failed, calls = flaky(outbox.failed, failures=1)
    monkeypatch.setattr(outbox, "failed", failed)

    def refused(d: Delivery) -> None:
        raise DeliveryError("peer refused", permanent=True)

    assert outbox.pump_once({"dicom": refused}, stop=threading.Event())
    assert state(outbox) == "dead_letter" and len(calls) == 2


def test_unexpected_deliverer_error_is_recorded_as_a_retry(outbox: Outbox) -> None:
    def bug(d: Delivery) -> None:
        raise ValueError("bug")

    assert outbox.pump_once({"dicom": bug})
    assert state(outbox) == "pending"
    (row,) = outbox._conn().execute("SELECT last_error FROM deliveries")
    assert "bug" in row["last_error"]


@pytest.mark.timeout(30)  # returning at all after stop is the behaviour; a hang fails here
def test_pump_gives_up_on_stop_and_recover_resends(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def always_locked(d: Delivery) -> None:
        raise sqlite3.OperationalError(LOCKED)

    monkeypatch.setattr(outbox, "delivered", always_locked)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert outbox.pump_once({"dicom": lambda d: None}, stop=stop)
    assert state(outbox) == "sending"
    monkeypatch.undo()
    assert outbox.recover() == 1 and state(outbox) == "pending"


class RecordingStop(threading.Event):
    """A stop event that records the pauses it is asked to wait (and waits them)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0.0))
        return super().wait(timeout)


def test_retry_state_update_backs_off_and_is_bounded() -> None:
    calls: list[float] = []

    def update() -> int:
        calls.append(time.monotonic())
        if len(calls) < 5:
            raise sqlite3.OperationalError(LOCKED)
        return 7

    stop = RecordingStop()
    assert retry_state_update(update, what="x", stop=stop, initial_s=0.01, max_s=0.04) == 7
    # the pause doubles from initial_s and stops growing at max_s: exactly these, not zero
    assert stop.waits == [0.01, 0.02, 0.04, 0.04]
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(gaps) == 4
    assert all(g >= w * 0.9 for g, w in zip(gaps, stop.waits, strict=True)), (gaps, stop.waits)
    assert all(g < 1.0 for g in gaps)

    stopped = threading.Event()
    stopped.set()
    with pytest.raises(StateUpdateAbandonedError):
        retry_state_update(lambda: (_ for _ in ()).throw(sqlite3.OperationalError(LOCKED)), what="y", stop=stopped)


class Clock:
    """A settable ``time`` stand-in for the work-queue base (claims and retries read ``time.time()``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_failed_delivery_backs_off_exponentially_up_to_the_cap(
    state_db: StateDB | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(base, "time", clock)
    monkeypatch.setattr(outbox_module, "time", clock)  # claims are made there
    ob = Outbox(state_db, DeliverySettings(max_attempts=5, backoff_initial_s=5, backoff_max_s=12))
    ob.add(None, "dicom", "pacs:main", "1.2.3.seg", tmp_path / "seg.dcm")

    def down(d: Delivery) -> None:
        raise DeliveryError("peer down")

    for expected_delay in (5.0, 10.0, 12.0, 12.0):
        started = clock.now
        assert ob.pump_once({"dicom": down})
        (due,) = ob._conn().execute("SELECT next_attempt_at FROM deliveries").fetchone()
        assert due == pytest.approx(started + expected_delay)
        clock.now = due - 0.01
        assert ob.claim() is None, f"re-sent {expected_delay - 0.01:.2f}s into a {expected_delay:.0f}s backoff"
        clock.now = due
    assert ob.pump_once({"dicom": down})  # the 5th attempt is the last
    assert ob.counts()["dead_letter"] == 1


def test_delivery_thread_survives_failed_updates(
    state_db: StateDB | Path, tmp_path: Path, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered, _ = flaky(outbox.delivered, failures=1)
    monkeypatch.setattr(outbox, "delivered", delivered)
    queue = JobQueue(state_db)
    pool = WorkerPool(queue, outbox, lambda j: "x", {"dicom": lambda d: None}, WorkerSettings(count=0), 0.02)
    pool.start()
    try:
        end = time.monotonic() + 10
        while state(outbox) != "done" and time.monotonic() < end:
            time.sleep(0.02)
        assert state(outbox) == "done"
        outbox.add(None, "dicom", "pacs:main", "1.2.3.sr", tmp_path / "sr.dcm")
        while outbox.counts()["done"] != 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert outbox.counts()["done"] == 2
        assert pool.health().outbox_alive and pool.health().ok
    finally:
        pool.stop(0.5)


def test_delivery_dead_letter_names_the_source_image(state_db: StateDB | Path, tmp_path: Path) -> None:
    """`dermnode status --dead-letters` must say which image a failed result belongs to."""
    from dermnode.workqueue.jobs import JobQueue

    queue = JobQueue(state_db)
    assert queue.enqueue("1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.7", tmp_path / "src.dcm")
    (job_id,) = queue._conn().execute("SELECT id FROM jobs").fetchone()
    ob = Outbox(state_db, DeliverySettings(max_attempts=1))
    ob.add(job_id, "dicom", "pacs:main", "1.2.3.4.5", tmp_path / "seg.dcm")
    delivery = ob.claim()
    assert delivery is not None
    assert ob.failed(delivery, "association rejected", permanent=True) is True
    (row,) = queue.dead_letters()
    assert (row["kind"], row["sop_instance_uid"], row["destination"]) == ("delivery", "1.2.3.4", "pacs:main")


# --- batches: one destination's due DICOM deliveries claimed together, each outcome on its own row (issue 12) ---


def _job(state_db: StateDB | Path, tmp_path: Path, sop_instance_uid: str) -> int:
    queue = JobQueue(state_db)
    assert queue.enqueue(sop_instance_uid, "1.2.840.10008.5.1.4.1.1.77.1.4", tmp_path / f"{sop_instance_uid}.dcm")
    (job_id,) = queue._conn().execute("SELECT id FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
    return int(job_id)


@pytest.fixture
def batch_outbox(state_db: StateDB | Path, tmp_path: Path) -> tuple[Outbox, int, int]:
    """Job 1's three objects for pacs:a (one queued after job 2's), job 2's two, one for pacs:b, job 1's bundle."""
    j1, j2 = _job(state_db, tmp_path, "1.1"), _job(state_db, tmp_path, "1.2")
    ob = Outbox(state_db, DeliverySettings(max_attempts=3, backoff_initial_s=60.0))
    for job_id, kind, destination, key in [
        (j1, "dicom", "pacs:a", "j1.seg"),
        (j2, "dicom", "pacs:a", "j2.seg"),
        (j1, "dicom", "pacs:a", "j1.sr"),
        (j1, "dicom", "pacs:b", "j1.seg.b"),
        (j1, "fhir", "fhir", "j1.bundle"),
        (j1, "dicom", "pacs:a", "j1.pr"),
        (j2, "dicom", "pacs:a", "j2.sr"),
    ]:
        assert ob.add(job_id, kind, destination, key, tmp_path / key)
    return ob, j1, j2


def _states(ob: Outbox) -> dict[str, str]:
    return {r["object_key"]: r["state"] for r in ob._conn().execute("SELECT object_key, state FROM deliveries")}


def test_claim_batch_takes_the_oldest_due_deliverys_destination_same_job_first(
    batch_outbox: tuple[Outbox, int, int],
) -> None:
    ob, _, _ = batch_outbox
    batch = ob.claim_batch(limits={"dicom": 3})
    assert [d.object_key for d in batch] == ["j1.seg", "j1.sr", "j1.pr"]
    assert all(d.attempts == 1 and d.destination == "pacs:a" for d in batch)
    assert [d.object_key for d in ob.claim_batch(exclude={"pacs:b"}, limits={"dicom": 16})] == ["j2.seg", "j2.sr"]
    assert [d.object_key for d in ob.claim_batch(limits={"dicom": 16})] == ["j1.seg.b"]
    assert [d.object_key for d in ob.claim_batch(limits={"dicom": 16})] == ["j1.bundle"], "fhir: one at a time"
    assert ob.claim_batch(limits={"dicom": 16}) == []
    assert set(_states(ob).values()) == {"sending"}
    assert ob.recover() == 7, "every claimed row is in flight, recovered like a single claim"


def test_claim_batch_without_a_limit_claims_one_and_skips_rows_not_due(batch_outbox: tuple[Outbox, int, int]) -> None:
    ob, _, _ = batch_outbox
    (first,) = ob.claim_batch()
    assert first.object_key == "j1.seg"
    ob._conn().execute("UPDATE deliveries SET next_attempt_at = ? WHERE object_key = 'j1.sr'", (time.time() + 60,))
    # the oldest due is job 2's: its deliveries first, then the oldest others of pacs:a
    assert [d.object_key for d in ob.claim_batch(limits={"dicom": 16})] == ["j2.seg", "j2.sr", "j1.pr"]
    assert _states(ob)["j1.sr"] == "pending"


def test_claim_batch_records_owner_and_lease_of_each_row(state_db: StateDB | Path, tmp_path: Path) -> None:
    ob = Outbox(state_db, DeliverySettings())
    for key in ("a", "b", "c"):
        ob.add(None, "dicom", "pacs:a", key, tmp_path / key)
    if not ob.state_db.leases:  # SQLite: one process, no owner recorded
        assert {d.owner for d in ob.claim_batch(limits={"dicom": 16})} == {None}
        return
    batch = ob.claim_batch("me", limits={"dicom": 16})
    assert len(batch) == 3 and {d.owner for d in batch} == {"me"}
    rows = ob._conn().execute("SELECT owner, lease_expires_at FROM deliveries").fetchall()
    assert {r["owner"] for r in rows} == {"me"} and all(r["lease_expires_at"] for r in rows)
    assert ob._held == {d.id: "me" for d in batch}
    assert ob.renew_held() == 3
    assert ob.delivered(batch[0]) and ob._held == {d.id: "me" for d in batch[1:]}


def test_batch_outcomes_are_recorded_per_delivery(batch_outbox: tuple[Outbox, int, int]) -> None:
    ob, j1, _ = batch_outbox
    calls: list[list[str]] = []

    def send(batch: Sequence[Delivery]) -> list[DeliveryError | None]:
        calls.append([d.object_key for d in batch])
        return [None, DeliveryError("status 0xC000", permanent=True), DeliveryError("status 0xA700")]

    assert ob.pump_once({"dicom": BatchDeliverer(send, max_batch=3)}, stop=threading.Event())
    assert calls == [["j1.seg", "j1.sr", "j1.pr"]]
    rows = {r["object_key"]: r for r in ob.for_job(j1)}
    assert rows["j1.seg"]["state"] == "done"
    assert rows["j1.sr"]["state"] == "dead" and "0xC000" in rows["j1.sr"]["last_error"]
    assert rows["j1.pr"]["state"] == "pending" and "0xA700" in rows["j1.pr"]["last_error"]
    (due,) = ob._conn().execute("SELECT next_attempt_at FROM deliveries WHERE object_key = 'j1.pr'").fetchone()
    assert due > time.time() + 30, "the transient failure backs off like a single delivery's"
    (dead,) = JobQueue(ob.state_db).dead_letters()
    assert dead["sop_instance_uid"] == "1.1"
    assert ob.busy_destinations() == frozenset()


def test_batch_deliverer_failure_is_every_deliverys_outcome(batch_outbox: tuple[Outbox, int, int]) -> None:
    ob, _, _ = batch_outbox

    def refused(batch: Sequence[Delivery]) -> list[DeliveryError | None]:
        raise DeliveryError("association rejected", permanent=True)

    def bug(batch: Sequence[Delivery]) -> list[DeliveryError | None]:
        return [None]  # too few answers: a bug, never "delivered"

    assert ob.pump_once({"dicom": BatchDeliverer(refused, max_batch=2)})
    assert _states(ob)["j1.seg"] == _states(ob)["j1.sr"] == "dead"
    assert _states(ob)["j1.pr"] == "pending"
    assert ob.pump_once({"dicom": BatchDeliverer(bug)})  # j2.seg, j1.pr, j2.sr
    states = _states(ob)
    assert states["j2.seg"] == states["j1.pr"] == states["j2.sr"] == "pending"
    (error,) = {r["last_error"] for r in ob._conn().execute("SELECT last_error FROM deliveries WHERE state = 'pending'")
                if r["last_error"]}
    assert "unexpected error" in error


def test_batch_deliverer_called_with_one_delivery(tmp_path: Path) -> None:
    delivery = Delivery(1, None, "dicom", "pacs:a", "k", tmp_path / "k", 1)
    BatchDeliverer(lambda b: [None])(delivery)
    with pytest.raises(DeliveryError, match="0xC000"):
        BatchDeliverer(lambda b: [DeliveryError("0xC000", permanent=True)])(delivery)


def test_plain_deliverers_still_get_one_delivery_per_call(batch_outbox: tuple[Outbox, int, int]) -> None:
    ob, _, _ = batch_outbox
    sent: list[str] = []
    deliverers = {"dicom": lambda d: sent.append(d.object_key), "fhir": lambda d: sent.append(d.object_key)}
    while ob.pump_once(deliverers):
        pass
    assert sent == ["j1.seg", "j2.seg", "j1.sr", "j1.seg.b", "j1.bundle", "j1.pr", "j2.sr"]
    assert set(_states(ob).values()) == {"done"}


def test_concurrent_batch_claims_never_take_a_row_twice(state_db: StateDB | Path, tmp_path: Path) -> None:
    """Two outbox objects (two processes on shared state) claiming batches at once: each row is claimed once."""
    first = Outbox(state_db, DeliverySettings())
    for i in range(60):
        first.add(None, "dicom", f"pacs:{i % 3}", f"k{i}", tmp_path / f"k{i}")
    claimed: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def claimer(ob: Outbox, out: list[int]) -> None:
        try:
            while batch := ob.claim_batch(limits={"dicom": 4}):
                assert len({d.destination for d in batch}) == 1 and len(batch) <= 4
                out += [d.id for d in batch]
        except BaseException as exc:
            errors.append(exc)

    outboxes = [first, Outbox(state_db, DeliverySettings())]
    threads = [threading.Thread(target=claimer, args=(ob, out)) for ob, out in zip(outboxes, claimed, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    every = sorted(r["id"] for r in first._conn().execute("SELECT id FROM deliveries"))
    assert sorted(claimed[0] + claimed[1]) == every


def test_add_all_queues_a_jobs_objects_in_one_step(state_db: StateDB | Path, tmp_path: Path) -> None:
    ob = Outbox(state_db, DeliverySettings())
    items = [(None, "dicom", "pacs:a", key, tmp_path / key) for key in ("seg", "pr", "sr")]
    wake = ob.state_db.wakeup(ob.channel)
    seen = wake.mark()
    assert ob.add_all([*items, items[0]]) == 3
    assert wake.wait(seen, 0.0), "one wake-up for the delivery threads"
    assert ob.add_all(items) == 0 and ob.add_all([]) == 0
    batch = ob.claim_batch(limits={"dicom": 16})
    assert [d.object_key for d in batch] == ["seg", "pr", "sr"]
