"""Classification metrics: scikit-learn where it has them, two small functions where it has none.

* **AUC**, **ROC curve**, **balanced accuracy**, **confusion matrix** — :mod:`sklearn.metrics`
  (``roc_auc_score``, ``roc_curve`` with every threshold kept, ``balanced_accuracy_score``,
  ``confusion_matrix``), behind the checks this project relies on (binary 0/1 labels, both classes present,
  labels in range). The AUC counts a tie between a positive and a negative as 1/2 (Mann–Whitney U).
* **Sensitivity at a specificity** — the highest sensitivity over ROC operating points whose specificity is at
  least the target (a step function, no interpolation).
* **ECE** — expected calibration error with ``n_bins`` equal-width bins on the confidence (scikit-learn's
  ``calibration_curve`` gives the per-bin means but not the bin sizes the ECE weighs them by):
  ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. For a binary probability the "confidence" is the
  predicted probability of the positive class and "accuracy" the observed positive rate in the bin
  (reliability-diagram form); for multi-class outputs the confidence is the top probability and the accuracy
  whether the top class is right. Bins are ``(lo, hi]`` except the first, which is ``[0, hi]``.
* **Bootstrap CI** — percentile interval of the AUC over stratified resamples (positives and negatives are
  resampled separately so every replicate has both classes).
* **Temperature** — one scalar fitted by minimising the NLL (no scikit-learn equivalent).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


def _binary_inputs(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length ({y.shape[0]} vs {s.shape[0]})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    return y.astype(bool), s


def _both_classes(y: npt.NDArray[np.bool_], what: str) -> None:
    if not y.any() or y.all():
        raise ValueError(f"{what} needs at least one positive and one negative")


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`; ties count one half).

    Parameters
    ----------
    y_true : array_like
        Binary labels (0/1).
    scores : array_like
        Scores, higher meaning more likely positive.

    Returns
    -------
    float
        The AUC in [0, 1].

    Raises
    ------
    ValueError
        When the inputs differ in length, labels are not binary, or only one class is present.
    """
    y, s = _binary_inputs(y_true, scores)
    _both_classes(y, "AUC")
    return float(skm.roc_auc_score(y, s))


def roc_curve(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC operating points at every distinct score (:func:`sklearn.metrics.roc_curve`, none dropped).

    Parameters
    ----------
    y_true : array_like
        Binary labels (0/1).
    scores : array_like
        Scores, higher meaning more likely positive.

    Returns
    -------
    tuple of ndarray
        ``(fpr, tpr, thresholds)``; the first point is ``(0, 0)`` at threshold ``+inf``; a case is called
        positive when ``score >= threshold``.

    Raises
    ------
    ValueError
        When only one class is present or the inputs are invalid.
    """
    y, s = _binary_inputs(y_true, scores)
    _both_classes(y, "ROC")
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thr.astype(np.float64)


def sensitivity_at_specificity(y_true: npt.ArrayLike, scores: npt.ArrayLike, specificity: float) -> float:
    """Highest sensitivity among operating points with specificity >= ``specificity``.

    Parameters
    ----------
    y_true : array_like
        Binary labels (0/1).
    scores : array_like
        Scores, higher meaning more likely positive.
    specificity : float
        Target specificity in [0, 1].

    Returns
    -------
    float
        Sensitivity in [0, 1].

    Raises
    ------
    ValueError
        When only one class is present or the inputs are invalid.
    """
    fpr, tpr, _ = roc_curve(y_true, scores)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max())


def balanced_accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``y_true``
    (:func:`sklearn.metrics.balanced_accuracy_score`).

    Parameters
    ----------
    y_true : array_like
        Integer class labels.
    y_pred : array_like
        Integer predicted labels.

    Returns
    -------
    float
        Balanced accuracy in [0, 1].

    Raises
    ------
    ValueError
        When the inputs are empty or differ in length.
    """
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    with warnings.catch_warnings():
        # a predicted class absent from y_true has no recall: scikit-learn leaves it out (as intended) and warns
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(skm.balanced_accuracy_score(t, p))


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> npt.NDArray[np.int64]:
    """Confusion matrix with rows = true class and columns = predicted class
    (:func:`sklearn.metrics.confusion_matrix` over the labels ``0 .. n_classes - 1``).

    Parameters
    ----------
    y_true : array_like
        Integer class labels in ``[0, n_classes)``.
    y_pred : array_like
        Integer predicted labels in ``[0, n_classes)``.
    n_classes : int
        Number of classes.

    Returns
    -------
    ndarray
        ``(n_classes, n_classes)`` int64 counts.

    Raises
    ------
    ValueError
        When a label is out of range or the inputs differ in length.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred differ in length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError("label out of range")
    if t.size == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return skm.confusion_matrix(t, p, labels=np.arange(n_classes)).astype(np.int64)


def expected_calibration_error(y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins.

    Parameters
    ----------
    y_true : array_like
        Binary labels (0/1) when ``probs`` is 1-D, else integer class labels.
    probs : array_like
        1-D positive-class probabilities, or ``(N, K)`` class probabilities.
    n_bins : int
        Number of equal-width bins on [0, 1].

    Returns
    -------
    float
        ECE in [0, 1].

    Raises
    ------
    ValueError
        When the inputs are empty or inconsistent.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true).ravel()
    if p.ndim == 1:
        conf = p
        hit = y.astype(np.float64)
    elif p.ndim == 2:
        conf = p.max(axis=1)
        hit = (p.argmax(axis=1) == y.astype(np.int64)).astype(np.float64)
    else:
        raise ValueError("probs must be 1-D or 2-D")
    if conf.shape[0] != y.shape[0] or conf.size == 0:
        raise ValueError("y_true and probs must be non-empty and of equal length")
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    n = conf.size
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.sum() / n * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


def bootstrap_auc_ci(
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC (stratified resampling).

    Parameters
    ----------
    y_true : array_like
        Binary labels (0/1).
    scores : array_like
        Scores, higher meaning more likely positive.
    n_boot : int
        Number of bootstrap replicates.
    alpha : float
        ``1 - confidence level`` (0.05 gives a 95% interval).
    seed : int
        Seed of the resampling generator.

    Returns
    -------
    tuple of float
        ``(low, high)``.

    Raises
    ------
    ValueError
        When only one class is present or the inputs are invalid.
    """
    y, s = _binary_inputs(y_true, scores)
    pos = s[y]
    neg = s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("bootstrap AUC needs both classes")
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot, dtype=np.float64)
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    for i in range(n_boot):
        bp = pos[rng.integers(0, pos.size, pos.size)]
        bn = neg[rng.integers(0, neg.size, neg.size)]
        aucs[i] = roc_auc(labels, np.r_[bp, bn])
    lo, hi = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def fit_temperature(logits: npt.ArrayLike, y_true: npt.ArrayLike) -> float:
    """Fit a temperature ``T`` minimising the negative log-likelihood of ``logits / T``.

    A 1-D ``logits`` array is a binary logit (sigmoid); a 2-D array holds multi-class logits (softmax).
    The search is a log-spaced grid on [0.05, 20] refined by a golden-section search around the best point.

    Parameters
    ----------
    logits : array_like
        Binary logits ``(N,)`` or class logits ``(N, K)``.
    y_true : array_like
        Binary labels or integer class labels.

    Returns
    -------
    float
        The fitted temperature (> 0).

    Raises
    ------
    ValueError
        When the inputs are empty.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).ravel()
    if z.shape[0] == 0:
        raise ValueError("cannot fit a temperature on no samples")

    def nll(t: float) -> float:
        if z.ndim == 1:
            zz = z / t
            # log(1 + exp(-|z|)) formulation, stable
            return float(np.mean(np.logaddexp(0.0, zz) - y * zz))
        zz = z / t
        zz = zz - zz.max(axis=1, keepdims=True)
        logp = zz - np.log(np.exp(zz).sum(axis=1, keepdims=True))
        return float(-np.mean(logp[np.arange(len(y)), y.astype(np.int64)]))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    vals = [nll(float(t)) for t in grid]
    i = int(np.argmin(vals))
    lo = float(np.log(grid[max(i - 1, 0)]))
    hi = float(np.log(grid[min(i + 1, len(grid) - 1)]))
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    for _ in range(40):
        c = b - g * (b - a)
        d = a + g * (b - a)
        if nll(float(np.exp(c))) < nll(float(np.exp(d))):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2.0))
