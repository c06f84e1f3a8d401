"""Free disk space of the storage root: how close it is to ``storage.min_free_mb``, and a rate-limited warning.

Below ``storage.min_free_mb`` the Store SCP answers 0xA700 (out of resources). Before that, when free space falls
below :data:`LOW_DISK_FACTOR` times the minimum, the node warns: once in the log (again at most every
:data:`WARN_INTERVAL_S`, and once more when space is back), and at every scrape of ``/metrics``
(``dermnode_storage_free_bytes``, ``dermnode_storage_min_free_bytes``, ``dermnode_storage_low``). The minimum is
registered per storage root by whoever enforces it (the Store SCP at start), so the metrics read the same value.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Free space below this many times ``storage.min_free_mb`` is "low": the warning comes before the refusals.
LOW_DISK_FACTOR = 2.0
#: At most one low-disk warning in the log per this many seconds.
WARN_INTERVAL_S = 600.0
_MB = 1_048_576

_minimums: dict[Path, int] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class DiskSpace:
    """Free space of a storage root against its configured minimum."""

    free_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        """Below :data:`LOW_DISK_FACTOR` times the minimum (a minimum of 0 is never low)."""
        return self.min_free_bytes > 0 and self.free_bytes < LOW_DISK_FACTOR * self.min_free_bytes

    @property
    def below_minimum(self) -> bool:
        """Below the minimum itself: C-STORE is refused."""
        return self.free_bytes < self.min_free_bytes


def _key(root: Path) -> Path:
    return Path(root).resolve()


def register_minimum(root: Path, min_free_mb: int) -> None:
    """Record ``storage.min_free_mb`` of the storage ``root`` (read by :func:`disk_space` without a minimum)."""
    with _lock:
        _minimums[_key(root)] = int(min_free_mb)


def registered_minimum(root: Path) -> int | None:
    """The ``storage.min_free_mb`` registered for ``root``, or ``None``."""
    with _lock:
        return _minimums.get(_key(root))


def disk_space(root: Path, min_free_mb: int | None = None) -> DiskSpace:
    """Free space of the file system holding ``root``, against ``min_free_mb`` (default: the registered one, or 0).

    Raises
    ------
    OSError
        When the file system cannot be queried (``root`` does not exist).
    """
    minimum = registered_minimum(root) if min_free_mb is None else min_free_mb
    return DiskSpace(free_bytes=int(shutil.disk_usage(root).free), min_free_bytes=int(minimum or 0) * _MB)


class LowDiskWarner:
    """Logs a warning when free space is low, at most once per ``interval_s``, and once when it is back.

    Parameters
    ----------
    interval_s:
        Minimum time between two warnings while space stays low.
    clock:
        Monotonic clock (for tests).
    """

    def __init__(self, interval_s: float = WARN_INTERVAL_S, clock: object = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_warned: float | None = None

    def check(self, space: DiskSpace, where: Path) -> bool:
        """Warn about ``space`` of ``where`` when it is low and the last warning is old enough; ``True`` if warned."""
        now = self._clock()  # type: ignore[operator]
        with self._lock:
            if not space.low:
                if self._last_warned is not None:
                    self._last_warned = None
                    logger.info("free disk on %s is back to %.0f MB (storage.min_free_mb = %d)", where,
                                space.free_bytes / _MB, space.min_free_bytes // _MB)
                return False
            if self._last_warned is not None and now - self._last_warned < self.interval_s:
                return False
            self._last_warned = now
        logger.warning(
            "free disk on %s is %.0f MB, approaching storage.min_free_mb = %d (C-STORE is refused with 0xA700 "
            "below it): run `dermnode prune --older-than-days N` or free space",
            where, space.free_bytes / _MB, space.min_free_bytes // _MB,
        )
        return True
