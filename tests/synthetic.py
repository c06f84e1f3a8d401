"""Test images: synthetic ones (no data needed) and where the real shared data lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$DERMNODE_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data"))


def synthetic_dermoscopy(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    """Skin-toned background with a darker brown elliptical lesion in the middle and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[...] = (214, 160, 140)
    inside = ((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0
    img[inside] = (120, 72, 50)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
