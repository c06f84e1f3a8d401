"""The held-out validation images of the training data as one labelled folder.

The classifier's model selection and calibration use two validation sets: the official ISIC 2017 ``val`` split
and the seeded 15 % of the isic-9class ``train`` rows that :func:`dermnode.training.classification.load_samples`
holds out (``split_seed``). :func:`write_heldout_folder` writes both into one folder in the layout
``dermnode evaluate`` and ``dermnode calibrate`` read (``images/``, ``masks/`` where known, ``labels.csv`` with
``image_id``, ``split = val``, ``melanoma``, ``diagnosis``, ``source``), with the ISIC 2017 images returned to
their original aspect ratio (the shared copies are stretched to 256x256), so that the production analyser sees
them as a dermoscope would send them. No training image is ever written there.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
import numpy as np

from dermnode.training.classification import CLASS_INDEX, load_samples

logger = logging.getLogger(__name__)
_CLASSES = {v: k for k, v in CLASS_INDEX.items()}


def write_heldout_folder(data_root: Path, out_dir: Path, *, split_seed: int = 0) -> int:
    """Write the validation images of ``isic2017`` and ``isic-9class`` under ``data_root`` to ``out_dir``.

    Parameters
    ----------
    data_root:
        The shared data folder (holding ``isic2017`` and ``isic-9class``).
    out_dir:
        Output folder (created); existing files of the same names are replaced.
    split_seed:
        Seed of the isic-9class train/val split (the training run's ``split_seed``).

    Returns
    -------
    int
        Number of images written.

    Raises
    ------
    dermnode.errors.PipelineError
        When the data cannot be read.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    samples = load_samples([Path(data_root)], seed=split_seed, splits=("val",))
    rows = []
    for s in samples:
        cv2.imwrite(str(out_dir / "images" / f"{s.image_id}.png"), cv2.cvtColor(s.rgb, cv2.COLOR_RGB2BGR))
        if s.mask is not None:
            cv2.imwrite(str(out_dir / "masks" / f"{s.image_id}.png"), np.where(s.mask, 255, 0).astype(np.uint8))
        rows.append(
            {
                "image_id": s.image_id,
                "split": "val",
                "source": s.source,
                "melanoma": s.melanoma if s.melanoma >= 0 else "",
                "diagnosis": _CLASSES.get(s.diagnosis, ""),
            }
        )
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "split", "source", "melanoma", "diagnosis"])
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d held-out images to %s", len(rows), out_dir)
    return len(rows)
