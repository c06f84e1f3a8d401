"""The outbox: a failed state update never leaves a delivery ``sending`` nor stops the delivery thread."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dermnode.errors import DeliveryError
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue import base
from dermnode.workqueue.base import StateUpdateAbandonedError, retry_state_update
from dermnode.workqueue.db import StateDB
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Delivery, Outbox
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
