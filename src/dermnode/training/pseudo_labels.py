"""Pseudo-labels: lesion masks predicted by a trained segmenter on unlabelled dermoscopy images.

Semi-supervised ("self-training" / noisy-student) use of images that have no ground-truth mask: the shipped
segmenter (the *teacher*, flip TTA and production post-processing) outlines the lesion of every image, confident
outlines are kept, and a *student* is trained on the labelled set plus these masks with the usual strong
augmentation (:func:`dermnode.training.segmentation.train_segmentation`, ``extra_train_dirs``).

Selection (per image)
    * the quality gate accepts the image (:func:`~dermnode.inference.quality.assess_quality`);
    * the mask covers between :data:`MIN_AREA_FRACTION` and :data:`MAX_AREA_FRACTION` of the image;
    * *uncertainty*: pixels whose teacher probability lies in ``(0.2, 0.8)``, divided by the mask area, is at
      most ``max_uncertainty`` (default :data:`MAX_UNCERTAINTY`): a sharp outline, not a guess.

Output folder (laid out like ``../shared/data/isic2017``, so the training loader reads it)
    ``labels.csv`` (``image_id``, ``split`` = ``train``, ``uncertainty``, ``area_fraction``), ``masks/<id>.png``
    and ``images/<id>.jpg`` as **symbolic links** to the source images (the images are never copied).
    Images whose id is in ``exclude_ids`` (e.g. every ISIC 2017 id, so that no validation image leaks into
    training) are skipped.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermnode.inference.quality import assess_quality
from dermnode.inference.registry import load_model_bundle
from dermnode.inference.segmentation import Segmenter, postprocess

logger = logging.getLogger(__name__)

MIN_AREA_FRACTION = 0.01
MAX_AREA_FRACTION = 0.90
MAX_UNCERTAINTY = 0.25


@dataclass(frozen=True)
class PseudoLabelSummary:
    """What :func:`write_pseudo_labels` did."""

    considered: int
    kept: int
    rejected: dict[str, int]
    out_dir: Path


def write_pseudo_labels(
    images: Iterable[Path],
    models_dir: Path,
    out_dir: Path,
    *,
    exclude_ids: Iterable[str] = (),
    max_uncertainty: float = MAX_UNCERTAINTY,
) -> PseudoLabelSummary:
    """Predict, select and write pseudo-label masks for ``images``.

    Parameters
    ----------
    images:
        Image files (JPEG/PNG); the file stem is the image id.
    models_dir:
        Folder with the teacher ``segmentation.pt`` / ``segmentation.json``.
    out_dir:
        Output folder (see the module docstring); created, and an existing ``labels.csv`` is replaced.
    exclude_ids:
        Image ids never to label (held-out or labelled images).
    max_uncertainty:
        Largest accepted ratio of uncertain pixels to mask pixels.

    Returns
    -------
    PseudoLabelSummary
        Counts of considered, kept and rejected images (by reason).

    Raises
    ------
    ModelError
        When the teacher model cannot be loaded.
    OSError
        When the output cannot be written.
    """
    teacher = Segmenter(load_model_bundle(Path(models_dir), "segmentation"), tta=True)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    excluded = set(exclude_ids)
    rows: list[dict[str, str]] = []
    rejected: dict[str, int] = {}
    considered = 0

    def reject(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    for path in sorted(Path(p) for p in images):
        image_id = path.stem
        if image_id in excluded:
            continue
        considered += 1
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            reject("unreadable")
            continue
        rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        if not assess_quality(rgb).usable:
            reject("quality gate")
            continue
        prob_small = teacher.predict_probability(rgb)
        h, w = rgb.shape[:2]
        prob = np.asarray(cv2.resize(prob_small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
        mask = postprocess(prob, teacher.threshold)
        area = float(mask.mean())
        if not MIN_AREA_FRACTION <= area <= MAX_AREA_FRACTION:
            reject("lesion area out of range")
            continue
        uncertainty = float(((prob > 0.2) & (prob < 0.8)).sum() / max(1, int(mask.sum())))
        if uncertainty > max_uncertainty:
            reject("uncertain outline")
            continue
        cv2.imwrite(str(out_dir / "masks" / f"{image_id}.png"), mask.astype(np.uint8) * 255)
        link = out_dir / "images" / f"{image_id}.jpg"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path.resolve())
        rows.append(
            {
                "image_id": image_id,
                "split": "train",
                "uncertainty": f"{uncertainty:.4f}",
                "area_fraction": f"{area:.4f}",
            }
        )
    with (out_dir / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "split", "uncertainty", "area_fraction"])
        writer.writeheader()
        writer.writerows(rows)
    summary = PseudoLabelSummary(considered=considered, kept=len(rows), rejected=rejected, out_dir=out_dir)
    logger.info("pseudo-labels: kept %d of %d images (rejected: %s)", len(rows), considered, rejected)
    return summary
