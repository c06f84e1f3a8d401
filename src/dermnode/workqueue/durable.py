"""The one durable file write: every file dermnode must not lose or leave half-written goes through it.

Used by the spool (received instances, before the C-STORE answer) and the pipeline (``result.json``, SEG, SR,
the FHIR bundle, the overlay). The file is written to a temporary name in its final directory, flushed and
``fsync``-ed, renamed into place and the directory is ``fsync``-ed, so after a crash it is either complete or
absent. Files and folders are created owner-only (they hold PHI).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from dermnode.errors import StorageError

logger = logging.getLogger(__name__)

#: Most buffers one ``writev`` takes.
_IOV_MAX = int(os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write every buffer of ``parts`` to ``fd``, in order (``writev``: no joined copy of a large file)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def atomic_write(path: Path, data: bytes | memoryview | Sequence[bytes | memoryview], *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, directory fsync).

    ``data`` is one buffer or a sequence of buffers written one after the other (e.g. the file meta and the
    dataset as received, without joining them). When the file's folder is created by this call, its parent is
    fsynced too, so the folder entry is as durable as the file.

    Raises
    ------
    StorageError
        When any step fails; no partial file is left behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per writer thread
    parts: Sequence[bytes | memoryview] = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            new_folder = False
        except FileNotFoundError:  # the folder does not exist yet: make it (its entry is fsynced below)
            new_folder = True
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            # the new name, and a folder made just now (a fan-out folder, results/<uid>) in its parent
            for folder in (path.parent, path.parent.parent) if new_folder else (path.parent,):
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove temporary file %s", tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
