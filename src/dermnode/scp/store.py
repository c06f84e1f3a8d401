"""Store and queue one received instance: the one write path of a C-STORE and of a console upload.

:func:`admit` checks what must hold before anything is written: free disk (one ``statvfs``: the refusal below
``storage.min_free_mb`` and the rate-limited low-disk warning read the same number) and whether the SOP Instance
is already known. :func:`store_and_queue` then writes the instance to the spool (temporary file, fsync, rename,
directory fsync) and commits its job, or re-queues the dead job of a re-received instance; it returns only once
both are durable, so its caller may acknowledge.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from pathlib import Path

from dermnode.errors import InsufficientSpaceError, StorageError
from dermnode.scp.spool import Spool
from dermnode.workqueue.diskspace import LowDiskWarner, disk_space
from dermnode.workqueue.jobs import JobQueue

logger = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    """What :func:`store_and_queue` did with an instance."""

    #: Stored and a new job queued.
    STORED = "stored and queued"
    #: Already known (its job is pending, running or done): not stored again, not processed again.
    DUPLICATE = "duplicate SOP Instance UID: already stored, not processed again"
    #: Stored, but a concurrent association queued the same instance first: stored once.
    DUPLICATE_CONCURRENT = "duplicate (concurrent), stored once"
    #: Its job was dead-lettered: stored again and re-queued with a fresh attempt count.
    REQUEUED = "re-received after dead-letter: stored again and re-queued"
    #: Its job was dead-lettered, but a concurrent association re-queued it first: stored once.
    REQUEUED_CONCURRENT = "re-received after dead-letter, re-queued concurrently: stored once"

    @property
    def queued(self) -> bool:
        """Whether this call queued the instance for analysis."""
        return self in (StoreOutcome.STORED, StoreOutcome.REQUEUED)


#: ``existing`` of :func:`store_and_queue` when the caller did not call :func:`admit` itself.
NOT_ADMITTED = "<not admitted>"


def admit(
    spool: Spool, queue: JobQueue, sop_instance_uid: str, *, disk_warner: LowDiskWarner | None = None
) -> str | None:
    """Check free disk space and look up the instance's job, before anything is written.

    Parameters
    ----------
    spool, queue:
        Where the instance would go.
    sop_instance_uid:
        The instance.
    disk_warner:
        Warns (rate-limited) when free space approaches the minimum.

    Returns
    -------
    str or None
        The state of the instance's job (``None``: new). Anything but ``None`` and ``"dead"`` is a duplicate.

    Raises
    ------
    InsufficientSpaceError
        When free disk space is below ``storage.min_free_mb``.
    StorageError
        When free space or the state database cannot be read.
    """
    try:
        space = disk_space(spool.directory, spool.min_free_mb)
    except OSError as exc:
        raise StorageError(f"cannot read the free disk space of {spool.directory}: {exc}") from exc
    if disk_warner is not None:
        disk_warner.check(space, spool.directory.parent)
    if space.below_minimum:
        raise InsufficientSpaceError(
            f"free disk space {space.free_bytes / 1_048_576:.0f} MB is below storage.min_free_mb={spool.min_free_mb}"
        )
    return queue.state(sop_instance_uid)


def store_and_queue(
    spool: Spool,
    queue: JobQueue,
    *,
    sop_instance_uid: str,
    sop_class_uid: str,
    study_instance_uid: str,
    data: bytes | memoryview | Sequence[bytes | memoryview],
    calling_aet: str,
    peer: str,
    existing: str | None = NOT_ADMITTED,
    disk_warner: LowDiskWarner | None = None,
) -> tuple[StoreOutcome, Path | None]:
    """Durably store one parsed instance and queue its job; returns what happened and the spool path.

    Parameters
    ----------
    spool, queue:
        The service's spool and job queue.
    sop_instance_uid, sop_class_uid, study_instance_uid:
        From the checked dataset (the SOP Instance UID has the DICOM UID syntax: it names the spool file).
    data:
        The DICOM file (preamble, file meta, dataset), or its parts in order, written as given (never
        re-encoded).
    calling_aet, peer:
        The sender, recorded on the job.
    existing:
        The job state :func:`admit` returned when the caller already called it (the SCP does, before it parses
        the dataset); by default :func:`admit` runs here.
    disk_warner:
        Passed to :func:`admit`.

    Returns
    -------
    tuple of StoreOutcome and Path or None
        The outcome, and the spool path (``None`` for a duplicate: nothing written).

    Raises
    ------
    InsufficientSpaceError
        When free disk space is below ``storage.min_free_mb``.
    StorageError
        When free space, the spool or the state database cannot be read or written (nothing acknowledged).
    """
    if existing == NOT_ADMITTED:
        existing = admit(spool, queue, sop_instance_uid, disk_warner=disk_warner)
    if existing is not None and existing != "dead":
        return StoreOutcome.DUPLICATE, None
    path = spool.store(sop_instance_uid, data, check_space=False)  # atomic: replaces the copy of a dead job
    if existing == "dead":
        requeued = queue.requeue_dead(
            sop_instance_uid, sop_class_uid, path, study_instance_uid=study_instance_uid, calling_aet=calling_aet,
            peer=peer,
        )
        if requeued:
            logger.warning(
                "SOP Instance %s re-received from %s (%s) after its job was dead-lettered: stored again and"
                " re-queued with a fresh attempt count",
                sop_instance_uid,
                calling_aet,
                peer,
            )
        return (StoreOutcome.REQUEUED if requeued else StoreOutcome.REQUEUED_CONCURRENT), path
    created = queue.enqueue(
        sop_instance_uid, sop_class_uid, path, study_instance_uid=study_instance_uid, calling_aet=calling_aet,
        peer=peer,
    )
    return (StoreOutcome.STORED if created else StoreOutcome.DUPLICATE_CONCURRENT), path
