"""The durable spool: every received instance is written here, atomically, before it is acknowledged.

Each file is written with :func:`~dermnode.workqueue.durable.atomic_write` (temporary name, ``fsync``, rename,
directory ``fsync``), so after a crash a spool file is either complete or absent. Files and folders are created
owner-only (they hold PHI).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from dermnode.errors import InsufficientSpaceError, StorageError
from dermnode.workqueue.durable import atomic_write

logger = logging.getLogger(__name__)


class Spool:
    """Durable storage of received DICOM files under ``<root>/spool``.

    Parameters
    ----------
    root:
        ``storage.root``.
    min_free_mb:
        Refuse new files when less than this much disk is free.
    fsync:
        Whether to fsync (always on in production; tests may turn it off for speed).
    """

    def __init__(self, root: Path, min_free_mb: int, *, fsync: bool = True) -> None:
        self.directory = root / "spool"
        self.min_free_mb = min_free_mb
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_for(self, sop_instance_uid: str) -> Path:
        """Deterministic spool path of an instance (two-level fan-out by hash).

        The SCP only passes syntactically valid UIDs (:func:`is_valid_uid`); this check is the second line of
        defence: whatever the UID, the path must be a plain file directly in its fan-out folder of the spool.

        Raises
        ------
        StorageError
            When the UID would make the path leave the spool (``/``, ``..``, a NUL byte, ...).
        """
        digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        folder = self.directory / digest[:2]
        path = folder / f"{sop_instance_uid}.dcm"
        try:
            inside = path.parent == folder and path.resolve().parent == folder.resolve()
        except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte
            raise StorageError(f"refusing spool path for SOP Instance UID {sop_instance_uid!r}: {exc}") from exc
        if not inside or path.name.startswith("."):
            raise StorageError(
                f"refusing SOP Instance UID {sop_instance_uid!r}: its spool path is not a plain file in {folder}"
            )
        return path

    def free_mb(self) -> float:
        return shutil.disk_usage(self.directory).free / 1_048_576

    def check_space(self) -> None:
        """Raise :class:`InsufficientSpaceError` when free space is below the configured minimum."""
        free = self.free_mb()
        if free < self.min_free_mb:
            raise InsufficientSpaceError(
                f"free disk space {free:.0f} MB is below storage.min_free_mb={self.min_free_mb}"
            )

    def store(
        self, sop_instance_uid: str, encoded: bytes | memoryview | Sequence[bytes | memoryview], *,
        check_space: bool = True,
    ) -> Path:
        """Durably store one encoded DICOM file (preamble, file meta and dataset).

        Parameters
        ----------
        sop_instance_uid:
            Names the file (:meth:`path_for`).
        encoded:
            The file's bytes, or its parts in order (e.g. preamble and file meta, then the dataset exactly as
            received), written without joining them.
        check_space:
            Whether to check the free disk space first; ``False`` where the caller just did
            (:func:`dermnode.scp.store.store_and_queue`).

        Raises
        ------
        InsufficientSpaceError
            When free disk space is below the minimum.
        StorageError
            When the file cannot be written.
        """
        if check_space:
            self.check_space()
        path = self.path_for(sop_instance_uid)
        atomic_write(path, encoded, fsync=self.fsync)
        return path

    def files(self) -> Iterator[Path]:
        """All complete spool files (temporary files excluded)."""
        for path in self.directory.glob("*/*.dcm"):
            if not path.name.startswith("."):
                yield path
