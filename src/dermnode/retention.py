"""Retention: remove the local copies of work that is finished everywhere, so the disk does not fill up.

dermnode keeps every received image in the spool and every output under ``results/`` until an operator prunes
them (``dermnode prune --older-than-days N``, e.g. from a daily timer; ``--include-undelivered`` for a node whose
outputs are never delivered, see :func:`prune`). Without that option, only a job that is ``done`` (analysed
or refused with a reason), last changed more than N days ago, that was queued for delivery and whose deliveries
have **all** been delivered (outbox state ``done``) is pruned: its spool file is deleted, and its results
folder too when every deliverable output in it (SEG, SR, FHIR bundle) went out; a folder holding an output that
was never sent anywhere (the FHIR bundle of a node without an EHR, the SEG/SR of a node without a PACS) is kept,
as it is the only copy. Pending, running, failed or dead-lettered jobs, jobs with a delivery still pending or
dead, and jobs that had no delivery at all (no PACS and no EHR configured) are never touched, so nothing that
may still be needed for a retry, a replay or as the only copy goes away. The job and delivery rows stay (the
audit trail); ``pruned`` records when the files went. A re-sent copy of a pruned image is still recognised as
already processed.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dermnode.errors import StorageError
from dermnode.workqueue.db import DB_ERRORS, SqliteState, StateConnection, StateDB, as_state_db, database_path

logger = logging.getLogger(__name__)

_SECONDS_PER_DAY = 86_400.0

_PRUNABLE = """
SELECT j.id, j.sop_instance_uid, j.path FROM jobs j
WHERE j.state = 'done' AND j.updated_at < ?
  AND EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id)
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.state != 'done')
  AND NOT EXISTS (SELECT 1 FROM pruned p WHERE p.job_id = j.id)
ORDER BY j.id
"""

#: With ``include_undelivered``: every finished old job whose deliveries are over (none at all, done or
#: dead-lettered); never one with a delivery still pending or being sent (its file is about to be read). Jobs
#: pruned before are included: a plain prune may have kept their results folder (an undelivered only copy).
_PRUNABLE_UNDELIVERED = """
SELECT j.id, j.sop_instance_uid, j.path,
       NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id)
       OR EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.state = 'dead') AS undelivered
FROM jobs j
WHERE j.state = 'done' AND j.updated_at < ?
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.state NOT IN ('done', 'dead'))
ORDER BY j.id
"""


@dataclass
class PruneReport:
    """What :func:`prune` removed (or would remove with ``dry_run``)."""

    jobs: int = 0
    results_kept: int = 0  # results folders kept because an output in them was never delivered anywhere
    files: int = 0
    bytes: int = 0
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)
    undelivered: int = 0  # with include_undelivered: pruned jobs an output of which was never delivered
    left_undelivered: int = 0  # without it: old finished jobs left alone because nothing or not all went out


def _size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path`` (a file or a folder); (0, 0) when it does not exist."""
    if path.is_file():
        return 1, path.stat().st_size
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)
    return 0, 0


def _all_outputs_delivered(conn: StateConnection, job_id: int, results: Path) -> bool:
    """Whether every deliverable output in ``results`` (``*.dcm``, the FHIR bundle) went out in a done delivery.

    With a PACS but no EHR the FHIR bundle, or with an EHR but no PACS the SEG and SR, exist only here: such a
    folder is kept (only the spool copy of the received image goes).
    """
    if not results.is_dir():
        return True
    delivered = {
        Path(r[0]).resolve() for r in conn.execute("SELECT path FROM deliveries WHERE job_id = ? AND state = 'done'",
                                                   (job_id,))
    }
    outputs = [*results.glob("*.dcm"), *results.glob("diagnostic-report.json")]
    return all(p.resolve() in delivered for p in outputs)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def prune(
    storage_root: Path, older_than_days: float, *, dry_run: bool = False, now: float | None = None,
    include_undelivered: bool = False, state: StateDB | Path | None = None,
) -> PruneReport:
    """Delete the spool file and results folder of every finished, fully delivered job older than the limit.

    With ``include_undelivered`` (``dermnode prune --include-undelivered``, e.g. on a node with no PACS and no
    EHR, where nothing is ever delivered) every finished job older than the limit whose deliveries are over (none,
    delivered or dead-lettered) loses its spool file and its whole results folder, the only copy of what was never
    delivered. Jobs with a delivery still pending, and jobs that are not ``done`` (dead-lettered, failed,
    running), are never touched.

    Parameters
    ----------
    storage_root:
        ``storage.root`` of the service (spool and results; the SQLite state database unless ``state`` is given).
    older_than_days:
        Only jobs whose last state change is older than this many days are pruned (>= 0).
    dry_run:
        Count what would be removed, remove nothing.
    include_undelivered:
        Also prune finished jobs whose outputs were never (all) delivered, results folder included.
    now:
        Current time (seconds since the epoch); for tests.
    state:
        The state database (:class:`~dermnode.workqueue.db.StateDB`, e.g. the shared PostgreSQL state of
        ``state_db_of(settings)``, or an SQLite file path); default ``<storage_root>/dermnode.db``.

    Returns
    -------
    PruneReport
        Jobs pruned, results folders kept (an undelivered output), files and bytes removed, and the paths that
        could not be removed (they are retried at
        the next run: the job is recorded as pruned only when all its files are gone).

    Raises
    ------
    ValueError
        When ``older_than_days`` is negative.
    StorageError
        When the state database cannot be read or updated.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    cutoff = (time.time() if now is None else now) - older_than_days * _SECONDS_PER_DAY
    results_root = storage_root / "results"
    report = PruneReport(dry_run=dry_run)
    db = SqliteState(database_path(storage_root)) if state is None else as_state_db(state)
    conn = db.connect()
    try:
        rows = conn.execute(_PRUNABLE_UNDELIVERED if include_undelivered else _PRUNABLE, (cutoff,)).fetchall()
        if not include_undelivered:
            everything = conn.execute(_PRUNABLE_UNDELIVERED, (cutoff,)).fetchall()
            done_before = {r[0] for r in conn.execute("SELECT job_id FROM pruned")}
            left = {r["id"] for r in everything} - {r["id"] for r in rows}
            report.left_undelivered = len(left - done_before)
        for row in rows:
            results = results_root / row["sop_instance_uid"]
            targets = [Path(row["path"])]
            undelivered = False
            if include_undelivered:
                targets.append(results)
                if not any(_size(t)[0] for t in targets):
                    continue  # pruned before, nothing left
                undelivered = bool(row["undelivered"]) or not _all_outputs_delivered(conn, row["id"], results)
            elif _all_outputs_delivered(conn, row["id"], results):
                targets.append(results)
            else:
                report.results_kept += 1
            failed = False
            for target in targets:
                if not _inside(target, storage_root):
                    report.errors.append(f"{target}: outside {storage_root}, left in place")
                    failed = True
                    continue
                files, size = _size(target)
                if files == 0:
                    continue
                if not dry_run:
                    try:
                        if target.is_dir():
                            shutil.rmtree(target)
                        else:
                            target.unlink()
                    except OSError as exc:
                        report.errors.append(f"{target}: {exc.strerror or exc}")
                        failed = True
                        continue
                report.files += files
                report.bytes += size
            if failed:
                continue
            report.jobs += 1
            report.undelivered += undelivered
            if not dry_run:
                conn.execute(
                    "INSERT INTO pruned (job_id, pruned_at) VALUES (?, ?)"
                    " ON CONFLICT (job_id) DO UPDATE SET pruned_at = excluded.pruned_at",
                    (row["id"], time.time()),
                )
    except DB_ERRORS as exc:
        raise StorageError(f"cannot prune {storage_root} ({db.describe()}): {exc}") from exc
    finally:
        conn.close()
    logger.info(
        "%s %d finished job(s) older than %g day(s): %d file(s), %.1f MB%s",
        "would prune" if dry_run else "pruned",
        report.jobs,
        older_than_days,
        report.files,
        report.bytes / 1e6,
        f"; {len(report.errors)} path(s) could not be removed" if report.errors else "",
    )
    return report
