"""Test images: synthetic ones (no data needed) and where the real shared data lives."""

from __future__ import annotations

import os
from pathlib import Path

from dermnode.dicom_io.wrap import synthetic_dermoscopy

__all__ = ["data_root", "synthetic_dermoscopy"]

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$DERMNODE_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data"))
