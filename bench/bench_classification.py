"""CPU latency of the classifier on one lesion.

Usage::

    .venv/bin/python bench/bench_classification.py [--models models] [--threads 1] [--repeats 50]

Times ``Classifier.classify`` (crop + colour constancy + 4-flip TTA forward + calibration) on a 600x450 image
with a lesion mask, and the crop step alone, after a warm-up. Prints median and 90th percentile in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dermnode.inference.classification import Classifier


def _image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    h, w = 450, 600
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h / 2) / (h * 0.25)) ** 2 + ((xx - w / 2) / (w * 0.2)) ** 2 <= 1.0
    img = np.empty((h, w, 3), np.float64)
    img[...] = (214, 160, 140)
    img[mask] = (120, 72, 50)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=repo / "models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-tta", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clf = Classifier(args.models, tta=not args.no_tta)
    rgb, mask = _image()
    for _ in range(5):
        clf.classify(rgb, mask)
    total, crop = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        clf.crop(rgb, mask)
        t1 = time.perf_counter()
        clf.classify(rgb, mask)
        t2 = time.perf_counter()
        crop.append(1000 * (t1 - t0))
        total.append(1000 * (t2 - t1))
    res = {
        "model": clf.identity.to_json(),
        "threads": args.threads,
        "tta": not args.no_tta,
        "input_size": clf.bundle.input_size,
        "classify_ms_median": statistics.median(total),
        "classify_ms_p90": float(np.percentile(total, 90)),
        "crop_ms_median": statistics.median(crop),
    }
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
