"""Paired round-field check: the production analyser on ISIC 2017 val images with and without a black round field.

Usage::

    .venv/bin/python bench/vignette_pair.py [--data ../shared/data]

For each of the 150 val images: the melanoma probability of the image as stored and of the same image with the
``vignette`` transform of ``bench/device_shift.py`` (black outside a centred circle of 90 % of the shorter side).
Prints the mean change of the probability, the mean absolute change, the melanoma AUC of both, and the number of
non-melanomas above the malignant cut-off of the active band calibration.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_shift import _vignette

from dermnode.evaluation.classification_metrics import roc_auc
from dermnode.evaluation.pipeline import load_source
from dermnode.inference.analyzer import Analyzer
from dermnode.settings import AnalysisSettings

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = args.data / "isic2017"
    with open(d / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    settings = AnalysisSettings()
    analyzer = Analyzer(settings)
    probs: dict[str, list[float]] = {"identity": [], "vignette": []}
    labels = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            rgb = cv2.cvtColor(cv2.imread(str(d / "images" / f"{r['image_id']}.jpg")), cv2.COLOR_BGR2RGB)
            gt = cv2.imread(str(d / "masks" / f"{r['image_id']}.png"), cv2.IMREAD_GRAYSCALE) > 127
            for name, img in (("identity", rgb), ("vignette", _vignette(rgb, gt)[0])):
                f = Path(tmp) / f"{name}.png"
                cv2.imwrite(str(f), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                c = analyzer.analyze(load_source(f, settings, r["image_id"])).classification
                probs[name].append(c.melanoma_probability if c is not None else float("nan"))
            labels.append(int(r["melanoma_isic2017"]))
    a, b, y = np.array(probs["identity"]), np.array(probs["vignette"]), np.array(labels)
    ok = ~np.isnan(a) & ~np.isnan(b)
    cal = analyzer.classifier.calibration
    cut = cal.malignant_above if cal is not None else settings.band_malignant_above
    print(f"paired images {int(ok.sum())}; mean change {np.mean((b - a)[ok]):+.3f}, mean |change| "
          f"{np.mean(np.abs(b - a)[ok]):.3f}; melanoma AUC {roc_auc(y[ok], a[ok]):.3f} -> {roc_auc(y[ok], b[ok]):.3f}; "
          f"non-melanomas above {cut:.3f}: {int(((a > cut) & (y == 0)).sum())} -> {int(((b > cut) & (y == 0)).sum())}")


if __name__ == "__main__":
    main()
