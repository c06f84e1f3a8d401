"""Pseudo-labels written by the shipped segmenter on unlabelled images."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from dermnode.inference.analyzer import SHIPPED_MODELS
from dermnode.training.pseudo_labels import write_pseudo_labels
from dermnode.training.segmentation import load_segmentation_split
from synthetic import synthetic_dermoscopy


def _ellipse(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0


def test_confident_outlines_are_kept_and_the_rest_rejected(tmp_path: Path) -> None:
    src = tmp_path / "unlabelled"
    src.mkdir()
    for i in range(2):
        rgb = synthetic_dermoscopy(180, 180, seed=i)
        cv2.imwrite(str(src / f"LES_{i}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(src / "SKIN.jpg"), np.full((180, 180, 3), (140, 160, 214), np.uint8))  # no lesion at all
    cv2.imwrite(str(src / "HELD_OUT.jpg"), cv2.cvtColor(synthetic_dermoscopy(180, 180), cv2.COLOR_RGB2BGR))
    (src / "BROKEN.jpg").write_bytes(b"not an image")
    out = tmp_path / "pseudo"
    summary = write_pseudo_labels(sorted(src.iterdir()), SHIPPED_MODELS, out, exclude_ids={"HELD_OUT"})

    assert summary.considered == 4 and summary.kept == 2
    assert summary.rejected["unreadable"] == 1 and sum(summary.rejected.values()) == 2
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [r["image_id"] for r in rows] == ["LES_0", "LES_1"] and {r["split"] for r in rows} == {"train"}
    for r in rows:
        link = out / "images" / f"{r['image_id']}.jpg"
        assert link.is_symlink() and link.resolve() == (src / f"{r['image_id']}.jpg").resolve()  # never copied
        mask = cv2.imread(str(out / "masks" / f"{r['image_id']}.png"), cv2.IMREAD_GRAYSCALE) > 127
        truth = _ellipse(180, 180)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    # the folder is a training set the loader reads
    data = load_segmentation_split(out, "train")
    assert data.ids == ["LES_0", "LES_1"] and data.masks.shape == (2, 180, 180)
