"""Retention: only finished, fully delivered, old jobs lose their files; everything else stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dermnode.retention import prune
from dermnode.settings import DeliverySettings
from dermnode.workqueue.db import SqliteState, StateConnection, StateDB, database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Outbox

DAY = 86_400.0


@pytest.fixture(params=("sqlite", "postgresql"))
def backend(request: pytest.FixtureRequest) -> Iterator[StateDB | None]:
    """The state database of one test: ``None`` for the SQLite default (``<root>/dermnode.db``, what :func:`prune`
    opens without ``state``), or the shared PostgreSQL state (issue 15) with empty tables; skipped without one."""
    if request.param == "sqlite":
        yield None
        return
    from pg import find_pg_bin, fresh_pg, shared_cluster

    bin_dir, why = find_pg_bin()
    if bin_dir is None:
        pytest.skip(why)
    db = fresh_pg(shared_cluster())
    yield db
    db.close_all()


def _db(root: Path, db: StateDB | None = None) -> StateDB:
    return SqliteState(database_path(root)) if db is None else db


def _sql(root: Path, db: StateDB | None = None) -> StateConnection:
    """A connection to the state of the test (either backend: ``?`` placeholders, rows by name or position)."""
    return _db(root, db).connect()


def _job(root: Path, uid: str, state: str, age_days: float, deliveries: tuple[str, ...] = ("done",),
         db: StateDB | None = None) -> Path:
    """A job row with a spool file and a results folder, last changed ``age_days`` ago.

    ``deliveries`` are outcomes made through the outbox itself: ``done`` (delivered), ``pending``, ``dead``.
    """
    spool = root / "spool" / "ab" / f"{uid}.dcm"
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_bytes(b"x" * 100)
    results = root / "results" / uid
    results.mkdir(parents=True, exist_ok=True)
    (results / "sr.dcm").write_bytes(b"y" * 50)
    (results / "result.json").write_bytes(b"{}")
    t = time.time() - age_days * DAY
    queue = JobQueue(_db(root, db))
    assert queue.enqueue(uid, "1.2", spool)
    outbox = Outbox(_db(root, db), DeliverySettings(max_attempts=1))
    conn = _sql(root, db)
    (job_id,) = conn.execute("SELECT id FROM jobs WHERE sop_instance_uid = ?", (uid,)).fetchone()
    for i, outcome in enumerate(deliveries):
        assert outbox.add(job_id, "dicom", f"pacs:{uid}", f"{uid}.{i}", results / "sr.dcm")
        if outcome == "pending":  # due later, so that the claims below take the deliveries of this call only
            later = time.time() + 1e6
            conn.execute("UPDATE deliveries SET next_attempt_at = ? WHERE object_key = ?", (later, f"{uid}.{i}"))
            continue
        delivery = outbox.claim()
        assert delivery is not None
        if outcome == "done":
            outbox.delivered(delivery)
        else:
            outbox.failed(delivery, "refused", permanent=True)
    conn.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (state, t, job_id))
    conn.close()
    return spool


def test_prunes_only_finished_fully_delivered_old_jobs(tmp_path: Path, backend: StateDB | None) -> None:
    root = tmp_path / "var"
    old_done = _job(root, "1.1", "done", 40, db=backend)
    recent = _job(root, "1.2", "done", 1, db=backend)
    dead = _job(root, "1.3", "dead", 40, db=backend)
    undelivered = _job(root, "1.4", "done", 40, ("done", "pending"), db=backend)
    dead_delivery = _job(root, "1.5", "done", 40, ("dead",), db=backend)
    no_delivery = _job(root, "1.6", "done", 40, (), db=backend)  # no PACS/FHIR configured: results/ is the only copy
    two_done = _job(root, "1.7", "done", 40, ("done", "done"), db=backend)

    dry = prune(root, 30, state=backend, dry_run=True)
    assert (dry.jobs, dry.files, dry.bytes) == (2, 6, 2 * (100 + 50 + 2))
    assert old_done.exists()  # a dry run removes nothing

    report = prune(root, 30, state=backend)
    assert (report.jobs, report.files, report.errors) == (2, 6, [])
    for gone in (old_done, two_done):
        assert not gone.exists() and not (root / "results" / gone.stem).exists()
    for kept in (recent, dead, undelivered, dead_delivery, no_delivery):
        assert kept.exists() and (root / "results" / kept.stem).is_dir()

    conn = _sql(root, backend)
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 7  # the audit trail stays
    assert {r[0] for r in conn.execute("SELECT job_id FROM pruned")} == {1, 7}
    conn.close()
    assert prune(root, 30, state=backend).jobs == 0  # idempotent


def test_results_with_an_undelivered_output_are_kept(tmp_path: Path, backend: StateDB | None) -> None:
    """A PACS but no EHR: SEG and SR went out, the FHIR bundle exists only here, so results/ stays."""
    root = tmp_path / "var"
    spool = _job(root, "4.1", "done", 10, db=backend)  # its one done delivery is results/4.1/sr.dcm
    results = root / "results" / "4.1"
    (results / "diagnostic-report.json").write_text("{}")
    report = prune(root, 1, state=backend)
    assert (report.jobs, report.results_kept, report.errors) == (1, 1, [])
    assert not spool.exists()  # the received image's spool copy goes
    assert (results / "diagnostic-report.json").is_file() and (results / "sr.dcm").is_file()


def test_presentation_state_and_key_image_are_outputs_like_seg_and_sr(tmp_path: Path, backend: StateDB | None) -> None:
    """pr.dcm and key-image.dcm (issue 18) count as outputs: an undelivered one keeps results/; a folder whose every
    output went out (SEG/SR, presentation state, key image) is pruned."""
    root = tmp_path / "var"
    for uid in ("5.1", "5.2"):
        _job(root, uid, "done", 10, db=backend)
        for name in ("pr.dcm", "key-image.dcm"):
            (root / "results" / uid / name).write_bytes(b"p" * 10)
    outbox = Outbox(_db(root, backend), DeliverySettings(max_attempts=1))
    conn = _sql(root, backend)
    (job_id,) = conn.execute("SELECT id FROM jobs WHERE sop_instance_uid = '5.2'").fetchone()
    (updated_at,) = conn.execute("SELECT updated_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
    for name in ("pr.dcm", "key-image.dcm"):
        assert outbox.add(job_id, "dicom", "pacs:5.2", f"5.2.{name}", root / "results" / "5.2" / name)
        delivery = outbox.claim()
        assert delivery is not None
        outbox.delivered(delivery)
    conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (updated_at, job_id))
    conn.close()
    report = prune(root, 1, state=backend)
    assert (report.jobs, report.results_kept, report.errors) == (2, 1, [])
    kept = root / "results" / "5.1"
    assert (kept / "pr.dcm").is_file() and (kept / "key-image.dcm").is_file()
    assert not (root / "results" / "5.2").exists()


def test_files_outside_the_storage_root_are_left_alone(tmp_path: Path, backend: StateDB | None) -> None:
    root = tmp_path / "var"
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"z")
    _job(root, "2.1", "done", 10, db=backend)
    conn = _sql(root, backend)
    conn.execute("UPDATE jobs SET path = ?", (str(outside),))
    conn.close()
    report = prune(root, 1, state=backend)
    assert outside.exists() and report.jobs == 0 and "outside" in report.errors[0]


def test_negative_age_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="older_than_days"):
        prune(tmp_path, -1)


def test_cli_prune(tmp_path: Path) -> None:
    root = tmp_path / "var"
    spool = _job(root, "3.1", "done", 5)
    env = {**os.environ, "DERMNODE_STORAGE__ROOT": str(root)}
    cmd = [sys.executable, "-m", "dermnode.cli", "prune", "--older-than-days", "2"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "would remove the files of 1 finished job(s): 3 file(s)" in dry.stdout and spool.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "removed the files of 1 finished job(s)" in done.stdout and not spool.exists()
    negative = subprocess.run([*cmd[:-1], "-1"], capture_output=True, text=True, env=env, timeout=120)
    assert negative.returncode == 2 and "--older-than-days must be 0 or more" in negative.stderr


def test_include_undelivered_prunes_a_node_without_pacs_or_ehr(tmp_path: Path, backend: StateDB | None) -> None:
    """Issue 16 item 18: with no PACS and no EHR nothing is ever delivered, so plain prune keeps everything; the
    explicit option removes old finished jobs' files anyway, never those still being delivered or dead-lettered."""
    root = tmp_path / "var"
    no_delivery = _job(root, "5.1", "done", 40, (), db=backend)
    only_copy = _job(root, "5.2", "done", 40, db=backend)  # delivered SR, undelivered FHIR bundle beside it
    (root / "results" / "5.2" / "diagnostic-report.json").write_text("{}")
    dead_delivery = _job(root, "5.3", "done", 40, ("dead",), db=backend)
    in_flight = _job(root, "5.4", "done", 40, ("done", "pending"), db=backend)
    dead_job = _job(root, "5.5", "dead", 40, (), db=backend)
    recent = _job(root, "5.6", "done", 1, (), db=backend)

    assert prune(root, 30, state=backend).jobs == 1  # only 5.2's spool copy, its results stay without the option
    report = prune(root, 30, state=backend, include_undelivered=True)
    assert report.errors == []
    for gone in (no_delivery, only_copy, dead_delivery):
        assert not gone.exists() and not (root / "results" / gone.stem).exists(), gone
    for kept in (in_flight, dead_job, recent):
        assert kept.exists() and (root / "results" / kept.stem).is_dir(), kept
    assert report.undelivered == 3


def test_cli_prune_include_undelivered(tmp_path: Path) -> None:
    root = tmp_path / "var"
    spool = _job(root, "6.1", "done", 5, ())
    env = {**os.environ, "DERMNODE_STORAGE__ROOT": str(root)}
    cmd = [sys.executable, "-m", "dermnode.cli", "prune", "--older-than-days", "2"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0 and spool.exists()
    assert "--include-undelivered" in plain.stdout  # the plain run says what it left and how to remove it
    done = subprocess.run([*cmd, "--include-undelivered"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not spool.exists() and not (root / "results" / "6.1").exists()
    assert "never delivered" in done.stdout


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_cli_prune_on_the_shared_postgresql_state(tmp_path: Path, backend: StateDB,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: ``dermnode prune`` works against the shared PostgreSQL state from any host (it used to refuse)."""
    from dermnode.cli import main
    from pg import PASSWORD, shared_cluster

    root = tmp_path / "shared"
    spool = _job(root, "7.1", "done", 5, db=backend)
    recent = _job(root, "7.2", "done", 1, db=backend)
    monkeypatch.setenv("DERMNODE_STORAGE__ROOT", str(root))
    monkeypatch.setenv("DERMNODE_STATE__BACKEND", "postgresql")
    monkeypatch.setenv("DERMNODE_STATE__DSN", shared_cluster().dsn)
    monkeypatch.setenv("DERMNODE_STATE__PASSWORD", PASSWORD)
    assert main(["prune", "--older-than-days", "2", "--dry-run"]) == 0
    assert spool.exists()
    assert main(["prune", "--older-than-days", "2"]) == 0
    assert not spool.exists() and not (root / "results" / "7.1").exists() and recent.exists()
    assert not (root / "dermnode.db").exists()  # no SQLite state was made beside the shared one
    conn = _sql(root, backend)
    assert [r["job_id"] for r in conn.execute("SELECT job_id FROM pruned")] == [1]
    conn.close()
