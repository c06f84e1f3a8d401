"""Classification metrics on small hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from dermnode.evaluation.classification_metrics import (
    balanced_accuracy,
    bootstrap_auc_ci,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    roc_auc,
    roc_curve,
    sensitivity_at_specificity,
)


def test_auc_perfect_inverted_tied() -> None:
    y = [0, 0, 1, 1]
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_hand_example_with_a_tie() -> None:
    # pairs (pos, neg): (0.8 > 0.1), (0.8 > 0.4), (0.4 = 0.4 -> 1/2), (0.4 > 0.1) -> 3.5 / 4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(0.875)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_roc_curve_and_sensitivity_at_specificity() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.9])
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.isinf(thr[0])
    # specificity >= 0.75 allows one false positive: threshold 0.6 -> both positives found
    assert sensitivity_at_specificity(y, s, 0.75) == 1.0
    # specificity 1.0: threshold 0.9 only -> 1 of 2
    assert sensitivity_at_specificity(y, s, 1.0) == 0.5


def test_balanced_accuracy_and_confusion_matrix() -> None:
    t = [0, 0, 0, 0, 1, 1, 2]
    p = [0, 0, 0, 1, 1, 0, 2]
    assert balanced_accuracy(t, p) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    cm = confusion_matrix(t, p, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_ece_binary_hand_example() -> None:
    # bin (0.1, 0.2]: conf 0.2, observed 0/2 -> gap 0.2 ; bin (0.7, 0.8]: conf 0.8, observed 1/2 -> gap 0.3
    y = [0, 0, 1, 0]
    p = [0.2, 0.2, 0.8, 0.8]
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.2 + 0.5 * 0.3)


def test_ece_perfectly_calibrated_is_zero_and_multiclass() -> None:
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    # top-class confidences 0.9 (right) and 0.6 (wrong): 0.5 * 0.1 + 0.5 * 0.6
    assert expected_calibration_error([0, 1], probs) == pytest.approx(0.35)


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    z_true = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z_true))).astype(int)
    t = fit_temperature(z_true * 3.0, y)  # over-confident logits: T should be about 3
    assert t == pytest.approx(3.0, rel=0.1)


def test_bootstrap_ci_brackets_auc() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(30), np.zeros(120)].astype(int)
    s = np.r_[rng.normal(1, 1, 30), rng.normal(0, 1, 120)]
    lo, hi = bootstrap_auc_ci(y, s, n_boot=300)
    assert lo < roc_auc(y, s) < hi


def test_known_values_from_the_scikit_learn_documentation() -> None:
    # the examples of sklearn.metrics.roc_curve / roc_auc_score / balanced_accuracy_score, worked by hand:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4 -> 3 of 4 pairs ordered -> AUC 0.75
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, s) == 0.75
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    # recalls 3/4 (class 0) and 1/2 (class 1)
    assert balanced_accuracy([0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]) == 0.625
    # a predicted class absent from y_true has no recall and is not averaged
    assert balanced_accuracy([0, 0], [0, 1]) == 0.5


def test_bootstrap_ci_known_value() -> None:
    # fixed seed: the interval of this small stratified bootstrap is reproducible to the last digits
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.5, 0.3, 0.4, 0.9, 0.8]
    assert roc_auc(y, s) == pytest.approx(8 / 9)
    lo, hi = bootstrap_auc_ci(y, s, n_boot=200, seed=0)
    assert (lo, hi) == pytest.approx((5 / 9, 1.0), abs=1e-12)  # the numpy-only implementation gave the same
