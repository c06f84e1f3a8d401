"""Shared fixtures: data location, a synthetic dermoscopy image, DICOM peers started on free loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if not (root / "isic2017" / "labels.csv").is_file():
        pytest.skip(f"real dermoscopy data not available at {root}")
    return root


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


@pytest.fixture
def lesion_rgb() -> np.ndarray:
    return synthetic_dermoscopy()
