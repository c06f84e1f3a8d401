"""Segmentation metrics on hand-made masks (exact values)."""

from __future__ import annotations

import numpy as np
import pytest

from dermnode.evaluation.segmentation_metrics import mean_scores, score_masks


def _masks() -> tuple[np.ndarray, np.ndarray]:
    # 10x10 image; truth: 4x5 block (20 px); prediction: 4x4 block inside it + 4 px outside
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:7] = True
    pred = np.zeros((10, 10), bool)
    pred[2:6, 2:6] = True  # 16 TP
    pred[8, 0:4] = True  # 4 FP
    return pred, truth


def test_scores_exact() -> None:
    pred, truth = _masks()
    s = score_masks(pred, truth)
    tp, fp, fn, tn = 16, 4, 4, 76
    assert s.dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s.jaccard == pytest.approx(tp / (tp + fp + fn))
    assert s.pixel_accuracy == pytest.approx((tp + tn) / 100)
    assert s.sensitivity == pytest.approx(tp / (tp + fn))
    assert s.specificity == pytest.approx(tn / (tn + fp))
    # Jaccard 16/24 = 0.667 >= 0.65: kept
    assert s.thresholded_jaccard == pytest.approx(16 / 24)


def test_thresholded_jaccard_zero_below_065() -> None:
    truth = np.zeros((10, 10), bool)
    truth[0:5, 0:10] = True  # 50 px
    pred = np.zeros((10, 10), bool)
    pred[0:3, 0:10] = True  # 30 px inside: Jaccard 0.6
    s = score_masks(pred, truth)
    assert s.jaccard == pytest.approx(0.6)
    assert s.thresholded_jaccard == 0.0


def test_perfect_and_empty_conventions() -> None:
    truth = np.zeros((6, 6), bool)
    truth[1:4, 1:4] = True
    perfect = score_masks(truth, truth)
    assert (perfect.dice, perfect.jaccard, perfect.pixel_accuracy) == (1.0, 1.0, 1.0)
    both_empty = score_masks(np.zeros((6, 6), bool), np.zeros((6, 6), bool))
    assert both_empty.dice == 1.0 and both_empty.sensitivity == 1.0 and both_empty.specificity == 1.0
    missed = score_masks(np.zeros((6, 6), bool), truth)
    assert missed.dice == 0.0 and missed.sensitivity == 0.0 and missed.specificity == 1.0


def test_uint8_255_masks_and_mean() -> None:
    pred, truth = _masks()
    a = score_masks(pred.astype(np.uint8) * 255, truth.astype(np.uint8) * 255)
    assert a == score_masks(pred, truth)
    m = mean_scores([a, score_masks(truth, truth)])
    assert m.dice == pytest.approx((a.dice + 1.0) / 2)


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        score_masks(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        mean_scores([])
