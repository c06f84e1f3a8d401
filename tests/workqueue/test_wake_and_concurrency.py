"""Idle threads wake on a commit (not at their next poll), and deliveries to independent destinations run
concurrently while each destination still gets its deliveries one at a time, oldest first.

No wall-clock assertions: poll intervals are set to 60 s, so a job or delivery handled within the bounded waits
below can only have been woken by the commit; the concurrency tests order events with :class:`threading.Event`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dermnode.errors import DeliveryError
from dermnode.settings import DeliverySettings, WorkerSettings
from dermnode.workqueue.db import StateDB, Wakeup, as_state_db
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Deliverer, Delivery, Outbox
from dermnode.workqueue.workers import WorkerPool

HUGE_POLL_S = 60.0  # far beyond every bounded wait below: only a wake-up can explain a prompt claim
BOUND_S = 20.0


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    started: list[WorkerPool] = []
    yield started
    for pool in started:
        pool.stop(2.0)


@pytest.fixture
def idle_waits(monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """Released each time a thread starts waiting on a :class:`Wakeup` (i.e. it found no work and went idle)."""
    entered = threading.Semaphore(0)
    original = Wakeup.wait

    def wait(self: Wakeup, mark: int, timeout: float) -> bool:
        entered.release()
        return original(self, mark, timeout)

    monkeypatch.setattr(Wakeup, "wait", wait)
    return entered


def wait_until(predicate: Callable[[], bool]) -> None:
    end = time.monotonic() + BOUND_S
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def make_pool(pools: list[WorkerPool], queue: JobQueue, outbox: Outbox, processor: object,
              deliverers: dict[str, Deliverer], *, workers: int = 1, delivery_threads: int = 1,
              analyze: bool = True) -> WorkerPool:
    pool = WorkerPool(queue, outbox, processor, deliverers,  # type: ignore[arg-type]
                      WorkerSettings(count=workers, poll_interval_s=HUGE_POLL_S), delivery_poll_s=HUGE_POLL_S,
                      notify_poll_s=HUGE_POLL_S, delivery_threads=delivery_threads, analyze=analyze)
    pools.append(pool)
    return pool


def test_wakeup_is_not_missed_between_look_and_wait() -> None:
    wake = Wakeup()
    seen = wake.mark()
    wake.set()  # a commit after the consumer looked, before it waits
    assert wake.wait(seen, HUGE_POLL_S)  # returns at once
    assert not wake.wait(wake.mark(), 0.0)


def test_every_waiter_is_woken_by_one_set() -> None:
    wake = Wakeup()
    seen = wake.mark()
    woken: list[bool] = []
    threads = [threading.Thread(target=lambda: woken.append(wake.wait(seen, BOUND_S))) for _ in range(3)]
    for t in threads:
        t.start()
    wake.set()
    for t in threads:
        t.join(BOUND_S)
    assert woken == [True, True, True]


def test_queues_of_the_same_database_share_the_wakeup(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    assert as_state_db(db).wakeup("dermnode_jobs") is as_state_db(db).wakeup("dermnode_jobs")
    assert as_state_db(db).wakeup("dermnode_jobs") is not as_state_db(tmp_path / "other.db").wakeup("dermnode_jobs")
    assert as_state_db(db).wakeup("dermnode_jobs") is not as_state_db(db).wakeup("dermnode_deliveries")


def test_enqueue_wakes_an_idle_worker_long_before_its_poll(
    state_db: StateDB | Path, tmp_path: Path, pools: list[WorkerPool], idle_waits: threading.Semaphore
) -> None:
    queue = JobQueue(state_db, retry_delay_s=0.0)
    outbox = Outbox(state_db, DeliverySettings())
    processed = threading.Event()

    def processor(job: Job) -> str:
        processed.set()
        return "analysed"

    pool = make_pool(pools, queue, outbox, processor, {})
    pool.start()
    assert idle_waits.acquire(timeout=BOUND_S)  # a thread found nothing to do and waits (60 s poll)
    assert queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    assert processed.wait(BOUND_S), "the commit did not wake the idle worker"


def test_queued_delivery_wakes_the_idle_outbox_long_before_its_poll(
    state_db: StateDB | Path, tmp_path: Path, pools: list[WorkerPool], idle_waits: threading.Semaphore
) -> None:
    queue = JobQueue(state_db, retry_delay_s=0.0)
    outbox = Outbox(state_db, DeliverySettings())
    sent = threading.Event()
    pool = make_pool(pools, queue, outbox, lambda job: "x", {"fhir": lambda d: sent.set()}, analyze=False)
    pool.start()
    assert idle_waits.acquire(timeout=BOUND_S)
    assert outbox.add(None, "fhir", "fhir", "bundle-1", tmp_path / "b.json")
    assert sent.wait(BOUND_S), "the queued delivery did not wake the idle outbox"


def test_stop_wakes_idle_threads(tmp_path: Path, pools: list[WorkerPool], idle_waits: threading.Semaphore) -> None:
    db = tmp_path / "state.db"
    pool = make_pool(pools, JobQueue(db), Outbox(db, DeliverySettings()), lambda job: "x", {}, delivery_threads=2)
    pool.start()
    for _ in range(3):  # one job thread and two delivery threads went idle with a 60 s poll
        assert idle_waits.acquire(timeout=BOUND_S)
    assert pool.stop(BOUND_S)


def test_slow_destination_does_not_hold_back_another(
    state_db: StateDB | Path, tmp_path: Path, pools: list[WorkerPool]
) -> None:
    queue = JobQueue(state_db, retry_delay_s=0.0)
    outbox = Outbox(state_db, DeliverySettings())
    slow_started, release_slow, fhir_sent = threading.Event(), threading.Event(), threading.Event()

    def dicom(d: Delivery) -> None:
        slow_started.set()
        assert release_slow.wait(BOUND_S)

    outbox.add(None, "dicom", "pacs:slow", "seg-1", tmp_path / "seg.dcm")  # the older one
    outbox.add(None, "fhir", "fhir", "bundle-1", tmp_path / "b.json")
    pool = make_pool(pools, queue, outbox, lambda job: "x", {"dicom": dicom, "fhir": lambda d: fhir_sent.set()},
                     delivery_threads=2, analyze=False)
    pool.start()
    try:
        assert slow_started.wait(BOUND_S)
        assert fhir_sent.wait(BOUND_S), "the FHIR delivery waited for the slow PACS"
        wait_until(lambda: outbox.counts()["done"] == 1)  # its outcome is recorded while the PACS still hangs
        assert not release_slow.is_set()
    finally:
        release_slow.set()
    wait_until(lambda: outbox.counts()["done"] == 2)


def test_one_destination_gets_its_deliveries_one_at_a_time_in_order(
    state_db: StateDB | Path, tmp_path: Path
) -> None:
    """Three callers of ``pump_once`` at once: A1 and B1 are sent concurrently; A2 waits for A1 (the other
    caller skips destination A while A1 is in flight) and is sent after it."""
    outbox = Outbox(state_db, DeliverySettings())
    for key in ("a1", "a2"):
        outbox.add(None, "dicom", "pacs:a", key, tmp_path / f"{key}.dcm")
    outbox.add(None, "dicom", "pacs:b", "b1", tmp_path / "b1.dcm")
    started = {k: threading.Event() for k in ("a1", "a2", "b1")}
    release = {k: threading.Event() for k in ("a1", "a2", "b1")}
    order: list[str] = []

    def dicom(d: Delivery) -> None:
        order.append(d.object_key)
        started[d.object_key].set()
        assert release[d.object_key].wait(BOUND_S)

    results: list[bool] = []
    stop = threading.Event()
    callers = [threading.Thread(target=lambda: results.append(outbox.pump_once({"dicom": dicom}, stop)))
               for _ in range(3)]
    for t in callers:
        t.start()
    assert started["a1"].wait(BOUND_S) and started["b1"].wait(BOUND_S)
    for t in callers:  # the third caller found only A2, whose destination is busy: nothing for it
        t.join(0.05)
    assert not started["a2"].is_set() and outbox.busy_destinations() == {"pacs:a", "pacs:b"}
    release["a1"].set()
    release["b1"].set()
    for t in callers:
        t.join(BOUND_S)
    assert sorted(results) == [False, True, True]
    assert outbox.busy_destinations() == frozenset()
    release["a2"].set()
    assert outbox.pump_once({"dicom": dicom}, stop)  # A is free again: A2 is next, after A1
    assert order.index("a1") < order.index("a2") and order[-1] == "a2"
    assert outbox.counts()["done"] == 3


def test_failed_delivery_keeps_backoff_and_frees_its_destination(state_db: StateDB | Path, tmp_path: Path) -> None:
    outbox = Outbox(state_db, DeliverySettings(max_attempts=2, backoff_initial_s=3600.0))

    def refused(d: Delivery) -> None:
        raise DeliveryError("PACS down")

    outbox.add(None, "dicom", "pacs:a", "a1", tmp_path / "a1.dcm")
    assert outbox.pump_once({"dicom": refused})
    assert outbox.busy_destinations() == frozenset()
    assert not outbox.pump_once({"dicom": refused})  # backing off: not due
    assert outbox.counts()["pending"] == 1


def test_claim_skips_excluded_destinations(state_db: StateDB | Path, tmp_path: Path) -> None:
    outbox = Outbox(state_db, DeliverySettings())
    outbox.add(None, "dicom", "pacs:a", "a1", tmp_path / "a1.dcm")
    outbox.add(None, "fhir", "fhir", "f1", tmp_path / "f1.json")
    assert outbox.claim(exclude={"pacs:a", "fhir"}) is None
    got = outbox.claim(exclude={"pacs:a"})
    assert got is not None and got.destination == "fhir"
    got = outbox.claim()
    assert got is not None and got.destination == "pacs:a"


def test_health_names_each_delivery_thread(tmp_path: Path, pools: list[WorkerPool]) -> None:
    db = tmp_path / "state.db"
    pool = make_pool(pools, JobQueue(db), Outbox(db, DeliverySettings()), lambda job: "x", {}, delivery_threads=3)
    pool.start()
    health = pool.health()
    assert health.ok and health.outbox_alive
    assert {t.name for t in threading.enumerate()} >= {"dermnode-outbox", "dermnode-outbox-1", "dermnode-outbox-2"}


def test_concurrent_enqueues_share_one_commit(state_db: StateDB | Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """While one enqueue commits, the others queue up and the next of them commits them all together."""
    queue = JobQueue(state_db)
    batches: list[list[str]] = []
    first_in, release_first = threading.Event(), threading.Event()
    real = JobQueue._commit_inserts

    def commit(self: JobQueue, batch: list) -> None:  # type: ignore[type-arg]
        batches.append([str(item.args[0]) for item in batch])
        if len(batches) == 1:
            first_in.set()
            assert release_first.wait(BOUND_S)
        real(self, batch)

    monkeypatch.setattr(JobQueue, "_commit_inserts", commit)
    created: dict[str, bool] = {}

    def enqueue(uid: str) -> None:
        created[uid] = queue.enqueue(uid, "1.2", tmp_path / f"{uid}.dcm")

    first = threading.Thread(target=enqueue, args=("1.1",))
    first.start()
    assert first_in.wait(BOUND_S)
    others = [threading.Thread(target=enqueue, args=(f"1.{i}",)) for i in (2, 3, 4)]
    for t in others:
        t.start()
    wait_until(lambda: len(queue._group_queue) == 3)  # all three wait for the commit in progress
    release_first.set()
    for t in (first, *others):
        t.join(BOUND_S)
    assert batches[0] == ["1.1"] and sorted(batches[1]) == ["1.2", "1.3", "1.4"] and len(batches) == 2
    assert created == {"1.1": True, "1.2": True, "1.3": True, "1.4": True}
    assert all(queue.state(uid) == "pending" for uid in created)
    assert not queue.enqueue("1.3", "1.2", tmp_path / "again.dcm")  # a duplicate is still told apart


def test_a_failed_group_commit_fails_only_the_bad_insert(tmp_path: Path) -> None:
    from dermnode.workqueue.jobs import _Insert

    queue = JobQueue(tmp_path / "state.db")
    good = _Insert(("1.1", "1.2", "", str(tmp_path / "a"), "", "", 0.0, 0.0))
    bad = _Insert(("1.2", None, "", str(tmp_path / "b"), "", "", 0.0, 0.0))  # sop_class_uid NOT NULL
    queue._commit_inserts([good, bad])
    assert good.created and good.error is None
    assert bad.error is not None and not bad.created
    assert queue.state("1.1") == "pending" and queue.state("1.2") is None
