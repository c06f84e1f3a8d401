"""Evaluation of the shipped segmentation model on a labelled split (e.g. ISIC 2017 val).

The model is run exactly as in production (:class:`~dermnode.inference.segmentation.Segmenter`, with its
post-processing, at the images' own resolution); metrics are computed per image and averaged
(:mod:`dermnode.evaluation.segmentation_metrics`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dermnode.evaluation.segmentation_metrics import mean_scores, score_masks
from dermnode.inference.artefacts import remove_artefacts, remove_hair
from dermnode.inference.overlay import render_overlay
from dermnode.inference.registry import load_model_bundle
from dermnode.inference.segmentation import Segmenter
from dermnode.settings import AnalysisSettings
from dermnode.training.segmentation import load_segmentation_split

logger = logging.getLogger(__name__)

MODEL_NAME = "segmentation"


def save_segmentation_figures(
    out_dir: Path,
    per_image: list[dict[str, Any]],
    examples: list[tuple[str, npt.NDArray[np.uint8]]],
) -> None:
    """Write ``dice_histogram.png`` (from ``per_image[i]["dice"]``) and, when ``examples`` (title, RGB image)
    are given, ``segmentation_examples.png`` into ``out_dir``.

    Raises
    ------
    OSError
        When a file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = [r["dice"] for r in per_image]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(dice, bins=[float(b) for b in np.linspace(0, 1, 41)], color="tab:blue")
    ax.axvline(float(np.mean(dice)), color="k", ls="--", label=f"mean {np.mean(dice):.3f}")
    ax.set_xlabel("per-image Dice")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "dice_histogram.png", dpi=100)
    plt.close(fig)
    if examples:
        fig, axes = plt.subplots(1, len(examples), figsize=(3 * len(examples), 3.3))
        for axis, (title, img) in zip(np.atleast_1d(axes), examples, strict=True):
            axis.imshow(img)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "segmentation_examples.png", dpi=100)
        plt.close(fig)


def evaluate_segmentation(
    data_dir: Path,
    split: str,
    models_dir: Path,
    out_dir: Path,
    *,
    hair_removal: str = "none",
    artefacts: bool = False,
    clahe: bool = False,
    tta: bool | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``models_dir/segmentation.*`` on one split and write the results.

    Writes ``out_dir/segmentation_metrics.json`` (mean and per-image metrics, model identity),
    ``out_dir/dice_histogram.png`` and ``out_dir/segmentation_examples.png`` (best, median and worst
    images with predicted outline in green and ground truth in blue).

    Parameters
    ----------
    data_dir:
        Folder with ``labels.csv`` (``image_id``, ``split``), ``images/<id>.jpg`` and ``masks/<id>.png``.
    split:
        Split to evaluate (``"val"`` for ISIC 2017; ``"all"`` for every image of ``labels.csv``).
    models_dir:
        Folder holding ``segmentation.pt`` and ``segmentation.json``.
    out_dir:
        Output folder (created if needed).
    hair_removal:
        Hair removal applied before segmentation (``"none"``, ``"blackhat"``, ``"multiscale"``).
    artefacts:
        Run the production preprocessing instead (:func:`~dermnode.inference.artefacts.remove_artefacts`:
        frame detection and filling, hair removal ``hair_removal``, CLAHE if ``clahe``) and pass the frame's
        complement to the segmenter as valid mask, as the analyser does.
    clahe:
        With ``artefacts``: apply CLAHE.
    tta:
        Override the manifest's flip test-time augmentation.
    limit:
        Evaluate only the first ``limit`` images.

    Returns
    -------
    dict
        The document written to ``segmentation_metrics.json``; its ``"mean"`` holds ``dice``,
        ``jaccard``, ``thresholded_jaccard``, ``pixel_accuracy``, ``sensitivity`` and ``specificity``.

    Raises
    ------
    dermnode.errors.ModelError
        When the model cannot be loaded.
    FileNotFoundError
        When the data files are missing.
    ValueError
        When the split is empty or the hair removal method is unknown.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_model_bundle(Path(models_dir), MODEL_NAME)
    segmenter = Segmenter(bundle, tta=tta)
    data = load_segmentation_split(Path(data_dir), split, limit)
    per_image: list[dict[str, Any]] = []
    scores = []
    masks_pred: list[npt.NDArray[np.bool_]] = []
    t0 = time.perf_counter()
    for image_id, rgb, gt in zip(data.ids, data.images, data.masks, strict=True):
        if artefacts:
            cleaned = remove_artefacts(rgb, AnalysisSettings(hair_removal=hair_removal, clahe=clahe))
            pred = segmenter.segment(cleaned.image, cleaned.frame.valid_mask).mask
        else:
            image = remove_hair(rgb, hair_removal).image if hair_removal != "none" else rgb
            pred = segmenter.segment(image).mask
        s = score_masks(pred, gt.astype(bool))
        scores.append(s)
        masks_pred.append(pred)
        per_image.append({"image_id": image_id, **s.to_json()})
    seconds = time.perf_counter() - t0
    mean = mean_scores(scores).to_json()
    doc: dict[str, Any] = {
        "model": bundle.identity.to_json(),
        "data_dir": str(data_dir),
        "split": split,
        "n_images": len(per_image),
        "image_size": list(data.masks.shape[1:]),
        "hair_removal": hair_removal,
        "artefacts": artefacts,
        "clahe": clahe,
        "tta": segmenter.tta,
        "threshold": segmenter.threshold,
        "mean": mean,
        "median_dice": float(np.median([r["dice"] for r in per_image])),
        "fraction_jaccard_below_0_65": float(np.mean([r["jaccard"] < 0.65 for r in per_image])),
        "seconds_per_image": seconds / len(per_image),
        "per_image": per_image,
    }
    (out_dir / "segmentation_metrics.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    order = np.argsort([r["dice"] for r in per_image])
    picks = [("worst", int(order[0])), ("median", int(order[len(order) // 2])), ("best", int(order[-1]))]
    examples = []
    for tag, i in picks:
        img = render_overlay(data.images[i], data.masks[i].astype(bool), color=(0, 80, 255), label=None)
        img = render_overlay(img, masks_pred[i], color=(0, 255, 0), label=None)
        examples.append((f"{tag}: {data.ids[i]} Dice {per_image[i]['dice']:.3f}", img))
    save_segmentation_figures(out_dir, per_image, examples)
    logger.info(
        "segmentation %s on %s (%d images): Dice %.4f Jaccard %.4f thresholded Jaccard %.4f",
        bundle.identity.version,
        split,
        len(per_image),
        mean["dice"],
        mean["jaccard"],
        mean["thresholded_jaccard"],
    )
    return doc
