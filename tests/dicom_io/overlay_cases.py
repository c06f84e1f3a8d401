"""Sources, masks and independent geometry checks for the presentation state and key image tests.

The checks do not use OpenCV's contour tracing: the mask boundary is the set of lesion pixels with a
4-neighbour outside the lesion (or on the image border), taken at their centres in PIXEL coordinates
(column + 0.5, row + 0.5).
"""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
from dicom_output_cases import as_multiframe, ellipse_mask, make_case

from dermnode.dicom_io.wrap import WrapOptions, synthetic_dermoscopy, wrap_rgb

STUDY_UID = "1.2.826.0.1.3680043.8.498.424242.2"
PR_SERIES_UID = "1.2.826.0.1.3680043.8.498.424242.10"
PR_SOP_UID = "1.2.826.0.1.3680043.8.498.424242.11"
KI_SERIES_UID = "1.2.826.0.1.3680043.8.498.424242.12"
KI_SOP_UID = "1.2.826.0.1.3680043.8.498.424242.13"
TRACKING_UID = "1.2.826.0.1.3680043.8.498.424242.14"
REASON = "image too blurred for analysis"
TEXT = {"algorithm_name": "dermnode", "algorithm_version": "0.1.0"}
ANALYSED = {**TEXT, "band": "indeterminate", "melanoma_probability": 0.62}


def synthetic_ellipse(h: int = 300, w: int = 400) -> np.ndarray:
    """The lesion of :func:`dermnode.dicom_io.wrap.synthetic_dermoscopy` as a mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0


def irregular_mask(h: int = 480, w: int = 640) -> np.ndarray:
    """A lobulated lesion (radius modulated by two harmonics) with a small satellite blob."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h * 0.5, xx - w * 0.55)
    theta = np.arctan2(yy - h * 0.5, xx - w * 0.55)
    mask = r < h * (0.3 + 0.04 * np.sin(7 * theta) + 0.015 * np.sin(23 * theta))
    mask |= np.hypot(yy - h * 0.15, xx - w * 0.1) < 6  # satellite: not the largest component
    return mask


def source_and_mask(kind: str) -> tuple[pydicom.Dataset, np.ndarray]:
    """A wrapped source of ``kind`` (small, jpeg, multiframe, dermoscopy, irregular) and its lesion mask."""
    if kind == "small":
        return make_case().source, ellipse_mask()
    if kind == "multiframe":
        return as_multiframe(make_case().source), ellipse_mask()
    if kind in ("jpeg", "dermoscopy"):
        rgb = synthetic_dermoscopy(300, 400)
        options = WrapOptions(jpeg=kind == "jpeg", pixel_spacing_mm=0.02, study_instance_uid=STUDY_UID)
        return wrap_rgb(rgb, options), synthetic_ellipse()
    if kind == "irregular":
        mask = irregular_mask()
        rgb = np.full((*mask.shape, 3), (214, 160, 140), np.uint8)
        rgb[mask] = (110, 70, 50)
        return wrap_rgb(rgb, WrapOptions(study_instance_uid=STUDY_UID)), mask
    raise ValueError(kind)


def component_at(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 8-connected component of ``mask`` containing (row, col), by repeated 3x3 dilation (no OpenCV)."""
    assert mask[row, col]
    region = np.zeros_like(mask, dtype=bool)
    region[row, col] = True
    while True:
        padded = np.pad(region, 1)
        grown = np.zeros_like(region)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                grown |= padded[dr : dr + mask.shape[0], dc : dc + mask.shape[1]]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def boundary_centres(mask: np.ndarray) -> np.ndarray:
    """``(N, 2)`` PIXEL coordinates (column, row) of the centres of the mask's boundary pixels."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    interior = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rows, cols = np.nonzero(inner & ~interior)
    return np.column_stack([cols, rows]).astype(np.float64) + 0.5


def nearest_distances(points: np.ndarray, targets: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Distance from every point to its nearest target point."""
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        d = np.linalg.norm(points[i : i + chunk, None, :] - targets[None, :, :], axis=2)
        out[i : i + chunk] = d.min(axis=1)
    return out


def sample_polyline(points: np.ndarray, step: float = 0.1) -> np.ndarray:
    """Points every ``step`` pixels along the polyline (vertices included)."""
    parts = []
    for p, q in itertools.pairwise(points):
        n = max(1, int(np.ceil(np.linalg.norm(q - p) / step)))
        parts.append(p + np.linspace(0.0, 1.0, n + 1)[:, None] * (q - p))
    return np.vstack(parts)


def lesion_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the mask in PIXEL coordinates (pixel edges)."""
    rows, cols = np.nonzero(mask)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (left, top, right, bottom) boxes share interior area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def max_feret_corners(mask: np.ndarray) -> float:
    """Largest distance between pixel corners of the mask's boundary pixels (brute force)."""
    centres = boundary_centres(mask)
    corners = np.vstack([centres + np.array([dx, dy]) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    corners = np.unique(corners, axis=0)
    best = 0.0
    for i in range(0, len(corners), 1024):
        d = np.linalg.norm(corners[i : i + 1024, None, :] - corners[None, :, :], axis=2)
        best = max(best, float(d.max()))
    return best
