"""Binary segmentation metrics, computed per image and then averaged.

Conventions: when both the prediction and the ground truth are empty, Dice and Jaccard are 1 (a perfect
answer) and sensitivity is 1; when the image has no background, specificity is 1. The ISIC 2018
*thresholded Jaccard* scores an image's Jaccard as 0 when it is below 0.65.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

THRESHOLDED_JACCARD_CUTOFF = 0.65
METRIC_NAMES = (
    "dice",
    "jaccard",
    "thresholded_jaccard",
    "pixel_accuracy",
    "sensitivity",
    "specificity",
)


@dataclass(frozen=True)
class SegmentationScores:
    """Metrics of one image (or means over images)."""

    dice: float
    jaccard: float
    thresholded_jaccard: float
    pixel_accuracy: float
    sensitivity: float
    specificity: float

    def to_json(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _as_bool(a: npt.ArrayLike, what: str) -> npt.NDArray[np.bool_]:
    arr = np.asarray(a)
    if arr.dtype != np.bool_:
        arr = arr > (127 if arr.dtype == np.uint8 and arr.max(initial=0) > 1 else 0)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D mask, got shape {arr.shape}")
    return arr


def score_masks(prediction: npt.ArrayLike, truth: npt.ArrayLike) -> SegmentationScores:
    """Metrics of one predicted mask against its ground truth.

    Parameters
    ----------
    prediction, truth:
        2-D masks of equal shape: boolean, 0/1, or uint8 0/255.

    Returns
    -------
    SegmentationScores
        Dice, Jaccard, thresholded Jaccard, pixel accuracy, sensitivity and specificity.

    Raises
    ------
    ValueError
        When the masks are not 2-D or their shapes differ.
    """
    p = _as_bool(prediction, "prediction")
    t = _as_bool(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    union = tp + fp + fn
    dice = 1.0 if union == 0 else 2.0 * tp / (2 * tp + fp + fn)
    jaccard = 1.0 if union == 0 else tp / union
    return SegmentationScores(
        dice=dice,
        jaccard=jaccard,
        thresholded_jaccard=jaccard if jaccard >= THRESHOLDED_JACCARD_CUTOFF else 0.0,
        pixel_accuracy=(tp + tn) / p.size if p.size else 1.0,
        sensitivity=1.0 if tp + fn == 0 else tp / (tp + fn),
        specificity=1.0 if tn + fp == 0 else tn / (tn + fp),
    )


def mean_scores(scores: Iterable[SegmentationScores]) -> SegmentationScores:
    """Mean of per-image metrics.

    Parameters
    ----------
    scores:
        Per-image scores.

    Returns
    -------
    SegmentationScores
        Metric-wise means.

    Raises
    ------
    ValueError
        When ``scores`` is empty.
    """
    items = list(scores)
    if not items:
        raise ValueError("no scores to average")
    return SegmentationScores(**{name: float(np.mean([getattr(s, name) for s in items])) for name in METRIC_NAMES})
