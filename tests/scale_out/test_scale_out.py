"""Scale-out proof (issue 15, item 4): 2 receive + 2 analyze + 1 deliver ``dermnode serve --role`` processes on one
throwaway PostgreSQL cluster and one shared storage root, with Orthanc (PACS) and the loopback FHIR server (EHR).

One farm per module (starting five processes and loading the models twice is the expensive part); the tests run in
file order and each checks its own images:

1. ``storescu`` load split over the two receivers: every acknowledged image analysed once and delivered once.
2. ``kill -9`` of an analyze process mid-job and of a receiver mid-association: nothing acknowledged is lost,
   nothing is delivered twice, the orphaned job is finished by the other worker after its lease.
3. PostgreSQL stopped (fast shutdown) and started again on the same port under load: the receivers answer 0xA700
   while it is down; everything acknowledged before and after is processed, once.

Skips with the reason when PostgreSQL, DCMTK, Orthanc or the shipped models are missing. Every wait is bounded;
every server listens on a loopback free port and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from scale_out_farm import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Farm,
    check_once,
    dcmtk_storescu,
    running_farm,
    send_each,
    sop_uid,
    storescu,
    write_sources,
)

from pg import PASSWORD, find_pg_bin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 3.0
OUTAGE: list[bool] = []  # set by test_postgresql_restart_under_load


def _models_present() -> bool:
    import os

    models = Path(os.environ.get("DERMNODE_ANALYSIS__MODELS_DIR") or REPO / "models")
    return (models / "segmentation.json").is_file() and (models / "classifier.json").is_file()


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    bin_dir, why = find_pg_bin()
    if bin_dir is None:
        pytest.skip(why)
    if not _models_present():
        pytest.skip("shipped models not found under models/")
    if dcmtk_storescu() is None:
        pytest.skip("DCMTK storescu is not installed (make setup installs dcmtk)")
    with running_farm(tmp_path_factory.mktemp("scale-out"), lease_s=LEASE_S) as f:
        yield f


def _owned_by(owner: str | None, pid: int) -> bool:
    return owner is not None and re.search(rf"[:@]{pid}$", owner) is not None


def test_storescu_load_over_two_receivers_each_image_analysed_and_delivered_once(
    farm: Farm, tmp_path: Path
) -> None:
    files = write_sources(tmp_path / "load", 32, tag="load")
    twice = write_sources(tmp_path / "twice", 4, tag="twice")  # sent to both receivers at the same time
    receivers = farm.by_role("receive")
    parts = [files[i::4] for i in range(4)]  # 4 associations x 8 images, two per receiver, all at once
    jobs = [(receivers[i % 2].port, part) for i, part in enumerate(parts)]
    jobs += [(receivers[0].port, twice), (receivers[1].port, twice)]
    logs = [tmp_path / f"storescu-{i}.log" for i in range(len(jobs))]
    procs = []
    for log, (port, part) in zip(logs, jobs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(storescu(port, part), stdout=out, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(120)
    texts = [log.read_text(errors="replace") for log in logs]
    assert [p.returncode for p in procs] == [0] * len(jobs), texts
    uids = [sop_uid(f) for f in files]
    twice_uids = [sop_uid(f) for f in twice]
    # the load was split: each receiver acknowledged its 16 (the audit line names the instance), and both
    # acknowledged the 4 images sent to each of them
    for r, expected in zip(receivers, (parts[0] + parts[2], parts[1] + parts[3]), strict=True):
        acked = set(re.findall(r"sop_instance=([0-9.]+) status=0x0000", r.log()))
        assert {sop_uid(f) for f in expected} | set(twice_uids) <= acked
    farm.wait_processed(uids + twice_uids, timeout=180)
    report = check_once(farm, uids + twice_uids)  # the images both receivers got: one job, analysed once
    assert report.jobs == 36 and report.fhir_posts == 36
    # both workers took jobs from the one queue
    per_worker = [len(re.findall(r"analysed ([0-9.]+):", p.log())) for p in farm.by_role("analyze")]
    assert all(n > 0 for n in per_worker), per_worker


def test_kill9_of_an_analyzer_mid_job_and_of_a_receiver_mid_association(farm: Farm, tmp_path: Path) -> None:
    (victim_name, victim), (_, survivor) = [(n, p) for n, p in farm.processes.items() if n.startswith("analyze-")]
    r_victim, r_other = farm.by_role("receive")
    burst = write_sources(tmp_path / "burst", 24, tag="kill-r")

    # kill -9 the victim while it holds a job: the row is still 'running' under its pid after the kill (a job it
    # finished just before the kill does not count: it is restarted and tried again, at most three times)
    uids: list[str] = []
    orphan = None
    for attempt in range(3):
        files = write_sources(tmp_path / f"jobs-{attempt}", 8, tag=f"kill-a{attempt}")
        batch = [sop_uid(f) for f in files]
        uids += batch
        res = send_each(r_other.port, files)
        assert [s for _, s in res] == [STATUS_SUCCESS] * len(files)
        end = time.monotonic() + 90
        claimed = None
        while claimed is None and time.monotonic() < end:
            rows = farm.sql("SELECT * FROM jobs WHERE state = 'running' AND sop_instance_uid = ANY(%s)"
                            " ORDER BY updated_at DESC", (batch,))
            claimed = next((r for r in rows if _owned_by(r["owner"], victim.pid)), None)
            if claimed is None:
                time.sleep(0.02)
        assert claimed is not None, "the analyze process never claimed a job"
        victim.kill9()
        row = farm.sql("SELECT * FROM jobs WHERE id = %s", (claimed["id"],))[0]
        if row["state"] == "running" and _owned_by(row["owner"], victim.pid):
            orphan = row
            break
        farm.restart(victim_name)
    assert orphan is not None, "three times the killed analyze process had just finished its job"
    lease_end = orphan["lease_expires_at"]

    # watch the orphan until it is done (own connection, beside the receiver kill below): who holds it, since when
    seen: list[tuple[float, str, str | None, int]] = []

    def watch() -> None:
        with psycopg.connect(farm.cluster.dsn, password=PASSWORD, autocommit=True) as conn:
            end = time.monotonic() + 120
            while time.monotonic() < end:
                found = conn.execute("SELECT state, owner, attempts FROM jobs WHERE id = %s",
                                     (orphan["id"],)).fetchone()
                assert found is not None
                state, owner, attempts = found
                seen.append((time.time(), state, owner, attempts))
                if state == "done":
                    return
                time.sleep(0.03)

    watcher = threading.Thread(target=watch, name="orphan-watch")
    watcher.start()

    # kill -9 a receiver in the middle of an association: after 4 acknowledged images, while the next C-STOREs are
    # sent back to back (the kill may land in one: stored and queued, or not, but unanswered)
    sent: list[tuple[str, int | None]] = []

    def sender() -> None:
        with contextlib.suppress(Exception):  # the association dies with the receiver
            send_each(r_victim.port, burst, out=sent, timeout_s=5)

    burst_thread = threading.Thread(target=sender, name="burst")
    burst_thread.start()
    end = time.monotonic() + 60
    while time.monotonic() < end and sum(s == STATUS_SUCCESS for _, s in list(sent)) < 4:
        time.sleep(0.01)
    r_victim.kill9()
    burst_thread.join(60)
    assert not burst_thread.is_alive()

    watcher.join(130)
    taken = [t for t, state, owner, _ in seen if not (state == "running" and _owned_by(owner, victim.pid))]
    assert taken and seen[-1][1] == "done", seen[-5:]
    # never taken from the dead worker before its lease ran out (observed after the fact: >= the real moment)
    assert taken[0] >= lease_end
    final = farm.sql("SELECT * FROM jobs WHERE id = %s", (orphan["id"],))[0]
    assert final["attempts"] == orphan["attempts"] + 1, (orphan, final)
    assert any(_owned_by(owner, survivor.pid) for _, state, owner, _ in seen if state == "running") or \
        f"analysed {orphan['sop_instance_uid']}:" in survivor.log()
    assert survivor.log().count(f"analysed {orphan['sop_instance_uid']}:") == 1, "finished by the other worker"

    # every image the killed receiver acknowledged (its audit log says so before the answer is sent) is processed,
    # and whatever it queued without answering too (the job row is committed before the response)
    acked_by_log = set(re.findall(r"sop_instance=([0-9.]+) status=0x0000", r_victim.log()))
    burst_uids = [sop_uid(f) for f in burst]
    acked = [u for u, s in sent if s == STATUS_SUCCESS]
    assert 4 <= len(acked) < len(burst), sent
    assert set(acked) <= acked_by_log
    queued = [r["sop_instance_uid"] for r in farm.jobs(burst_uids)]
    assert set(acked) <= set(queued)

    print(f"orphan job {orphan['id']} claimed by {orphan['owner']} (attempt {orphan['attempts']}), killed; taken "
          f"over {taken[0] - lease_end:+.2f} s after its lease end, finished on attempt {final['attempts']}; receiver "
          f"killed after {len(acked)} of {len(burst)} acknowledged ({len(queued)} queued)")
    everything = uids + queued
    farm.wait_processed(everything, timeout=150)
    check_once(farm, everything, analysed_at_most_twice=[orphan["sop_instance_uid"]])

    farm.restart(next(n for n, p in farm.processes.items() if p is r_victim))  # the next test wants both receivers


def test_postgresql_restart_under_load(farm: Farm, tmp_path: Path) -> None:
    receivers = farm.alive("receive")
    assert len(receivers) == 2
    before = write_sources(tmp_path / "before", 12, tag="pg-before")
    during = write_sources(tmp_path / "during", 4, tag="pg-during")
    after = write_sources(tmp_path / "after", 8, tag="pg-after")
    res = send_each(receivers[0].port, before[:6]) + send_each(receivers[1].port, before[6:])
    assert [s for _, s in res] == [STATUS_SUCCESS] * 12
    before_uids = [u for u, _ in res]
    assert farm.sql("SELECT count(*) AS n FROM jobs WHERE sop_instance_uid = ANY(%s) AND state <> 'done'",
                    (before_uids,))[0]["n"] > 0, "PostgreSQL should stop under load"

    farm.cluster.stop()  # fast shutdown by PID (pg_ctl stop -m fast)
    down_at = time.monotonic()
    assert farm.cluster.pid() is None or not _alive(farm.cluster.pid())
    try:
        refused = send_each(receivers[0].port, during[:2]) + send_each(receivers[1].port, during[2:])
        time.sleep(max(0.0, down_at + LEASE_S - time.monotonic()))  # down for at least 3 lease periods (lease_s / 3)
    finally:
        farm.cluster.start()  # the same data folder and port
        OUTAGE.append(True)
    assert [s for _, s in refused] == [STATUS_OUT_OF_RESOURCES] * 4, refused

    # the modality sends the refused images again, and new ones
    res = (send_each(receivers[0].port, during[:2] + after[:4])
           + send_each(receivers[1].port, during[2:] + after[4:]))
    assert [s for _, s in res] == [STATUS_SUCCESS] * 12, res
    everything = before_uids + [u for u, _ in res]
    farm.wait_processed(everything, timeout=150)
    report = check_once(farm, everything)
    print(f"PostgreSQL restart: {len(refused)} refused with 0xA700 while down; {report}")


def _alive(pid: int | None) -> bool:
    import os

    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_postgresql_outage_is_logged_without_tracebacks(farm: Farm) -> None:
    if not OUTAGE:
        pytest.skip("no PostgreSQL outage in this run (test_postgresql_restart_under_load did not run)")
    noisy = {name: len(re.findall(r"taking over orphaned work failed\nTraceback", proc.log()))
             for name, proc in farm.processes.items()}
    assert not any(noisy.values()), noisy
