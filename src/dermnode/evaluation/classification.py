"""Evaluation of the shipped classifier on a data split.

:func:`evaluate_classification` runs the same inference path as :class:`~dermnode.inference.classification.
Classifier` (crop from the ground-truth mask box for ISIC 2017, whole image for isic-9class; flip TTA;
temperature scaling) and writes ``classification_metrics.json``, ``roc.png`` and ``confusion_matrix.png``.

Which images a split means (see :func:`dermnode.training.classification.load_samples`):

* ``val`` — melanoma metrics on the ISIC 2017 official validation split (150 images, 30 melanomas); 9-class
  metrics on the held-out 15% of the isic-9class train rows.
* ``test`` — isic-9class test rows (ISIC 2017 has no labelled test masks here): MEL-vs-rest melanoma metrics and
  9-class metrics.
* ``train`` — the training images (sanity check only).

Melanoma metrics: AUC with a stratified bootstrap 95% CI (2000 replicates), balanced accuracy at p = 0.5,
sensitivity at 80% and 95% specificity, ECE (10 bins) of the calibrated and the uncalibrated probability, and
the band distribution (fraction of cases and melanoma rate per band). 9-class: balanced accuracy, confusion
matrix (rows = truth), top-class ECE; plus the MEL-vs-rest AUC of the melanoma head on those images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dermnode.errors import PipelineError
from dermnode.evaluation.classification_metrics import (
    balanced_accuracy,
    bootstrap_auc_ci,
    confusion_matrix,
    expected_calibration_error,
    roc_auc,
    roc_curve,
    sensitivity_at_specificity,
)
from dermnode.inference.calibration import BandCalibration
from dermnode.inference.classification import band_for
from dermnode.inference.classifier_models import load_classifier
from dermnode.inference.imaging import sigmoid, softmax
from dermnode.settings import AnalysisSettings
from dermnode.training.classification import CLASS_INDEX, Sample, batched_logits, eval_batch, load_samples
from dermnode.vocabulary import DIAGNOSIS_CLASSES

logger = logging.getLogger(__name__)


def binary_metrics(
    y: npt.ArrayLike, p: npt.ArrayLike, settings: AnalysisSettings, calibration: BandCalibration | None = None
) -> dict[str, Any]:
    """Metrics of probabilities ``p`` for binary labels ``y``: ROC AUC with a bootstrap 95 % interval (2000
    resamples), sensitivity at 80 % and 95 % specificity (the latter with a bootstrap 95 % interval), balanced
    accuracy at 0.5, expected calibration error (10 bins), and per confidence band (``calibration``'s cut-offs,
    else ``settings``) its share of the cases and their positive rate.

    Parameters
    ----------
    y:
        0/1 labels.
    p:
        Probabilities of the positive class.
    settings:
        Band thresholds (without a calibration).
    calibration:
        The band calibration the probabilities were made with, if any.

    Returns
    -------
    dict
        ``n``, ``n_positive``, ``auc``, ``auc_ci95``, sensitivities, balanced accuracy, ECE and bands.

    Raises
    ------
    ValueError
        When only one class is present.
    """
    yy = np.asarray(y, dtype=np.int64)
    pp = np.asarray(p, dtype=np.float64)
    lo, hi = bootstrap_auc_ci(yy, pp, n_boot=2000, seed=0)
    names = np.array(
        [(calibration.band(float(v)) if calibration else band_for(float(v), settings)).value for v in pp]
    )
    rng = np.random.default_rng(0)
    sens95 = []
    for _ in range(1000):
        idx = rng.integers(0, len(yy), len(yy))
        if 0 < yy[idx].sum() < len(idx):
            sens95.append(sensitivity_at_specificity(yy[idx], pp[idx], 0.95))
    bands = {
        b: {
            "fraction": float((names == b).mean()),
            "n": int((names == b).sum()),
            "positive_rate": float(yy[names == b].mean()) if (names == b).any() else None,
        }
        for b in ("benign", "indeterminate", "malignant")
    }
    return {
        "n": len(yy),
        "n_positive": int(yy.sum()),
        "auc": roc_auc(yy, pp),
        "auc_ci95": [lo, hi],
        "sensitivity_at_80_specificity": sensitivity_at_specificity(yy, pp, 0.80),
        "sensitivity_at_95_specificity": sensitivity_at_specificity(yy, pp, 0.95),
        "sensitivity_at_95_specificity_ci95": [float(np.percentile(sens95, 2.5)), float(np.percentile(sens95, 97.5))],
        "balanced_accuracy_at_0.5": balanced_accuracy(yy, (pp >= 0.5).astype(np.int64)),
        "ece": expected_calibration_error(yy, pp),
        "bands": bands,
        "band_cutoffs": (
            {"calibration": calibration.identity_text(), "benign_below": calibration.benign_below,
             "malignant_above": calibration.malignant_above}
            if calibration
            else {"benign_below": settings.band_benign_below, "malignant_above": settings.band_malignant_above}
        ),
    }


def binary_report(
    y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], p_uncal: npt.NDArray[np.float64]
) -> dict[str, Any]:
    """Melanoma-vs-rest metrics of calibrated probabilities ``p`` (and uncalibrated ``p_uncal``).

    Parameters
    ----------
    y : ndarray
        Binary labels.
    p : ndarray
        Calibrated probabilities.
    p_uncal : ndarray
        Probabilities before temperature scaling.

    Returns
    -------
    dict
        :func:`binary_metrics` of ``p`` (default bands) with ``ece`` reported as ``ece_calibrated``, plus
        ``ece_uncalibrated``.

    Raises
    ------
    ValueError
        When only one class is present.
    """
    report = binary_metrics(y, p, AnalysisSettings())
    report["ece_calibrated"] = report.pop("ece")
    report["ece_uncalibrated"] = expected_calibration_error(y, p_uncal)
    return report


def plot_roc(curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]], path: Path) -> None:
    """Write ROC curves (label -> (false-positive rates, true-positive rates, AUC)) to a PNG at ``path``.

    Raises
    ------
    OSError
        When the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.step(fpr, tpr, where="post", label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: npt.NDArray[np.int64], classes: tuple[str, ...], path: Path) -> None:
    """Write a confusion matrix (rows: truth, columns: prediction, in ``classes`` order) to a PNG at ``path``.

    Raises
    ------
    OSError
        When the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_classification(data_dir: Path, split: str, models_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Evaluate the classifier bundle in ``models_dir`` on ``split`` of the data under ``data_dir``.

    Parameters
    ----------
    data_dir : Path
        Shared data root (holding ``isic2017`` and/or ``isic-9class``) or one dataset folder.
    split : str
        ``val``, ``test`` or ``train``.
    models_dir : Path
        Folder holding ``classifier.pt`` / ``classifier.json``.
    out_dir : Path
        Where ``classification_metrics.json``, ``roc.png`` and ``confusion_matrix.png`` are written.

    Returns
    -------
    dict
        The metrics written to ``classification_metrics.json``.

    Raises
    ------
    ModelError
        When the model bundle cannot be loaded.
    PipelineError
        When the split is unknown or holds no labelled images.
    """
    if split not in ("train", "val", "test"):
        raise PipelineError(f"unknown split {split!r} (train, val or test)")
    bundle = load_classifier(Path(models_dir))
    seed = int(bundle.extra.get("split_seed", bundle.extra.get("seed", 0)))
    data_dir = Path(data_dir)
    if data_dir.name in ("isic2017", "isic-9class") and (data_dir.parent / "isic2017" / "labels.csv").is_file():
        # one training set named alone: its held-out rows depend on the other set (isic-9class rows that are
        # also isic2017 images were trained on as isic2017 rows), so the split is made as training made it
        both = load_samples([data_dir.parent], seed=seed, splits=(split,))
        samples = [s for s in both if s.source == data_dir.name]
    else:
        samples = load_samples([data_dir], seed=seed, splits=(split,))
    if not samples:
        raise PipelineError(f"no {split} images under {data_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = bundle.input_size

    def run(ss: list[Sample]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return batched_logits(
            bundle.model, eval_batch(ss, size, bundle.margin, (bundle.mean, bundle.std)), tta=bundle.tta
        )

    result: dict[str, Any] = {
        "model": bundle.identity.to_json(),
        "split": split,
        "temperatures": {"melanoma": bundle.temperature_melanoma, "diagnosis": bundle.temperature_diagnosis},
        "band_thresholds": {"benign_below": 0.15, "malignant_above": 0.85},
    }
    curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]] = {}
    s17 = [s for s in samples if s.source == "isic2017" and s.melanoma >= 0]
    s9 = [s for s in samples if s.source == "isic-9class" and s.diagnosis >= 0]
    if s17:
        z, _ = run(s17)
        y = np.array([s.melanoma for s in s17], dtype=np.int64)
        if len(np.unique(y)) == 2:
            p = sigmoid(z / bundle.temperature_melanoma)
            result["melanoma_isic2017"] = binary_report(y, p, sigmoid(z))
            fpr, tpr, _ = roc_curve(y, p)
            curves[f"ISIC 2017 {split} melanoma"] = (fpr, tpr, result["melanoma_isic2017"]["auc"])
    if s9:
        zm, zd = run(s9)
        yd = np.array([s.diagnosis for s in s9], dtype=np.int64)
        ym = (yd == CLASS_INDEX["MEL"]).astype(np.int64)
        if len(np.unique(ym)) == 2:
            pm = sigmoid(zm / bundle.temperature_melanoma)
            result["melanoma_9class"] = binary_report(ym, pm, sigmoid(zm))
            fpr, tpr, _ = roc_curve(ym, pm)
            curves[f"isic-9class {split} MEL vs rest"] = (fpr, tpr, result["melanoma_9class"]["auc"])
        pd = softmax(zd / bundle.temperature_diagnosis)
        pred = pd.argmax(axis=1)
        cm = confusion_matrix(yd, pred, len(DIAGNOSIS_CLASSES))
        recalls = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(DIAGNOSIS_CLASSES)}
        result["diagnosis_9class"] = {
            "n": len(yd),
            "classes": list(DIAGNOSIS_CLASSES),
            "balanced_accuracy": balanced_accuracy(yd, pred),
            "accuracy": float((pred == yd).mean()),
            "per_class_recall": recalls,
            "support": {c: int(cm[i].sum()) for i, c in enumerate(DIAGNOSIS_CLASSES)},
            "confusion_matrix": cm.tolist(),
            "ece_top_class_calibrated": expected_calibration_error(yd, pd),
            "ece_top_class_uncalibrated": expected_calibration_error(yd, softmax(zd)),
        }
        plot_confusion(cm, DIAGNOSIS_CLASSES, out_dir / "confusion_matrix.png")
    if curves:
        plot_roc(curves, out_dir / "roc.png")
    if len(result) <= 4:
        raise PipelineError(f"the {split} split holds no labelled images to evaluate")
    (out_dir / "classification_metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    logger.info("classification metrics written to %s", out_dir / "classification_metrics.json")
    return result
