"""Hair-mask quality of the hair removal methods on synthetic hair drawn over real ISIC 2017 images.

Usage::

    .venv/bin/python bench/hair_mask_quality.py [--data ../shared/data/isic2017] [--n 40] [--out runs/hair]

Each image (official val split, upscaled to 768x576, the usual 4:3 aspect) receives 6-14 random dark hairs
(quadratic Bezier curves, 2-5 px wide, anti-aliased, dark brown to black). For every method the pixel
precision, recall and F1 of the detected hair mask against the drawn hair are reported, strictly and with a
2-pixel tolerance (a detection within 2 px of drawn hair is a true positive; a drawn pixel within 2 px of a
detection is found). Real hair already present in the images counts as a false positive, so precision is a
lower bound. The inpainting error is the mean absolute RGB difference to the hair-free image inside the
drawn hair (``hair_mae``) and outside it (``outside_mae``, damage done to hair-free skin/lesion).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from dermnode.inference.artefacts import HairRemovalResult, remove_hair

REPO = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data")) / "isic2017"


def draw_hair(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw random hairs; returns the hairy image and the boolean hair mask."""
    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(6, 15))):
        p0, p1, p2 = (rng.uniform([0, 0], [w, h]) for _ in range(3))
        t = np.linspace(0, 1, 200)[:, None]
        pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.int32)
        width = int(rng.integers(2, 6))
        layer = np.zeros((h, w), np.uint8)
        cv2.polylines(layer, [pts], False, 255, width, lineType=cv2.LINE_AA)
        alpha = layer.astype(np.float32)[..., None] / 255.0 * rng.uniform(0.8, 1.0)
        colour = np.array([rng.uniform(15, 60), rng.uniform(10, 45), rng.uniform(5, 35)], np.float32)
        out = out * (1 - alpha) + colour * alpha
        mask |= (layer >= 128).astype(np.uint8)
    return np.clip(out, 0, 255).astype(np.uint8), mask.astype(bool)


def prf(pred: np.ndarray, truth: np.ndarray, tol: int) -> tuple[float, float]:
    if tol > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tol + 1, 2 * tol + 1))
        truth_d = cv2.dilate(truth.astype(np.uint8), k) > 0
        pred_d = cv2.dilate(pred.astype(np.uint8), k) > 0
    else:
        truth_d, pred_d = truth, pred
    precision = float((pred & truth_d).sum() / max(1, pred.sum()))
    recall = float((truth & pred_d).sum() / max(1, truth.sum()))
    return precision, recall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "hair")
    args = ap.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    with open(args.data / "labels.csv", newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh) if r["split"] == "val"][: args.n]
    rng = np.random.default_rng(args.seed)
    methods = ("blackhat", "multiscale")
    acc: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for image_id in ids:
        bgr = cv2.imread(str(args.data / "images" / f"{image_id}.jpg"))
        clean = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (768, 576), interpolation=cv2.INTER_CUBIC)
        hairy, truth = draw_hair(clean, rng)
        for m in methods:
            t0 = time.perf_counter()
            res: HairRemovalResult = remove_hair(hairy, m)
            ms = (time.perf_counter() - t0) * 1000
            clean_fp = remove_hair(clean, m).hair_mask.mean()
            p0, r0 = prf(res.hair_mask, truth, 0)
            p2, r2 = prf(res.hair_mask, truth, 2)
            diff = np.abs(res.image.astype(np.float32) - clean.astype(np.float32)).mean(axis=2)
            base = np.abs(hairy.astype(np.float32) - clean.astype(np.float32)).mean(axis=2)
            for key, v in (
                ("precision", p0),
                ("recall", r0),
                ("precision_tol2", p2),
                ("recall_tol2", r2),
                ("hair_mae", float(diff[truth].mean())),
                ("hair_mae_without_removal", float(base[truth].mean())),
                ("outside_mae", float(diff[~truth].mean())),
                ("mask_fraction_on_hairless_image", float(clean_fp)),
                ("ms_768x576", ms),
            ):
                acc[m].setdefault(key, []).append(v)
    summary: dict[str, dict[str, float]] = {}
    for m in methods:
        s = {k: float(np.mean(v)) for k, v in acc[m].items()}
        for suffix in ("", "_tol2"):
            p, r = s[f"precision{suffix}"], s[f"recall{suffix}"]
            s[f"f1{suffix}"] = 2 * p * r / max(1e-9, p + r)
        summary[m] = s
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"n_images": len(ids), "size": [576, 768], "seed": args.seed, "methods": summary}
    (args.out / "hair_mask_quality.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
