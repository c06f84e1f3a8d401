"""Shared fixtures: data location, a synthetic dermoscopy image, DICOM peers started on free loopback ports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthetic import data_root, synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if not (root / "isic2017" / "labels.csv").is_file():
        pytest.skip(f"real dermoscopy data not available at {root}")
    return root


@pytest.fixture
def lesion_rgb() -> np.ndarray:
    return synthetic_dermoscopy()
