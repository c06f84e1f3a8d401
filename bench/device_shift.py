"""Robustness of the production pipeline to a simulated change of dermoscope (device shift).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/device_shift.py [--data ../shared/data]
        [--transforms identity,warm_cast,...] [--limit N] [--big-limit 50] [--out bench/results/device-shift-X.json]
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/device_shift.py --gate-sweep

The models were trained only on ISIC images stretched to 256x256; the hidden test set comes from another clinic
and another dermoscope (real 4:3 images of 600-6000 px). No such images are available, so this script *simulates*
the shift and measures what it does to the production analysis path.

Method
------
Sources: the ISIC 2017 official validation split (``isic2017/labels.csv`` rows with ``split == val``, 150
images and masks at 256x256 with the aspect ratio stretched; ``orig_width``/``orig_height`` give the original
aspect) and the 5 HAM10000 images (600x450, true 4:3, all benign). For every transform below, each source image
and its ground-truth mask are transformed together and written to a temporary labelled folder (``images/``,
``masks/``, ``labels.csv`` with the source rows verbatim), one folder per dataset, and
:func:`dermnode.evaluation.pipeline.evaluate_pipeline` is run on it with the default
:class:`~dermnode.settings.AnalysisSettings` (quality gate, multiscale hair removal, segmentation, measurements,
classification on the predicted lesion; torch 1 thread). The :class:`~dermnode.inference.analyzer.Analyzer` is
the production one, subclassed only to record each image's gate scores (the analysis itself is untouched).

Transforms (all deterministic: the noise of an image is seeded by ``--seed``, the transform name and the image id):

* ``identity``: the source files copied byte for byte (baseline).
* ``aspect_1024`` / ``aspect_3000``: the original aspect ratio restored and the long side upscaled to 1024 or
  3000 px (bicubic; HAM stays 4:3: 1024x768, 3000x2250), Gaussian sensor noise (sigma 2 grey levels), JPEG 90.
* ``warm_cast`` (R x1.15, B x0.85), ``cool_cast`` (R x0.85, B x1.15), ``green_tint`` (R x0.92, G x1.10, B x0.92):
  per-channel gains on the stored 8-bit values, clipped; lossless PNG.
* ``gamma_0.7``, ``gamma_1.4`` (``255 * (x / 255) ** gamma``) and ``brightness_0.75`` (x0.75); PNG.
* ``vignette``: black outside a centred circle of diameter 90 % of the shorter side (soft edge 2 % of the
  radius); the ground truth is cut to the circle (what an annotator could outline); PNG.
* ``jpeg_60``: JPEG quality 60 re-encode (4:2:0 chroma subsampling, Pillow's default).
* ``combined``: a plausible other device: original aspect restored then centre-cropped to 4:3 at 1600x1200 (the
  ground truth is cropped the same way), mild cool cast (R x0.92, B x1.08), the circular vignette, noise
  (sigma 2), JPEG 85.

Geometric transforms resize the masks with bilinear interpolation then threshold at 128 (the same rule the shared
data used), so Dice is computed at the transformed resolution.

Reported per transform and dataset: images, analysed, refusal reasons, Dice / Jaccard / thresholded Jaccard over
every image (a refused image counts as an empty prediction) and over the analysed ones, melanoma AUC with its
bootstrap interval (ISIC part only; the HAM images are all benign), the analysis time per image (the analyser's
call, decoding excluded) and the wall time of the transform (generation + decoding + analysis + metrics). Paired
with ``identity`` on the same images: mean change of Dice, images whose Dice fell by more than 0.1, mean absolute
change of the melanoma probability and band changes, and identity's Dice/AUC on the same subset (``--big-limit``
runs the ``aspect_3000`` transform on the first N ISIC images only). Medians of the gate scores per transform
and the scores of every refused image show which rule refused what.

``--gate-sweep`` (instead of the pipeline runs; no models, a few minutes) applies stronger versions of the shifts
to the same 155 source images and runs only :func:`~dermnode.inference.quality.assess_quality` on them: cool/warm
casts with channel gains up to 1.6, a green gain up to 1.4, gamma 0.4-2.5, brightness x0.3-x1.4, and a 4:3
1024x768 frame (original aspect restored, centre-cropped) with a circular field of 90/80/70/60 % of the frame
height (or none) times brightness x1/x0.8/x0.6. It reports the refusals and their reasons per level, i.e. how much
margin the gate's hand-set thresholds leave for another device.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from dermnode.evaluation.classification_metrics import roc_auc
from dermnode.evaluation.pipeline import evaluate_pipeline
from dermnode.inference.analyzer import Analyzer
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import AnalysisResult, SourceImage

RGB = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]
TransformFn = Callable[[RGB, Mask, float, np.random.Generator], tuple[RGB, Mask]]

NOISE_SIGMA = 2.0
VIGNETTE_COVERAGE = 0.90
VIGNETTE_SOFT = 0.02
GATE_SCORES = (
    "mean_v",
    "field_mean_v",
    "mean_luma",
    "dark_frac",
    "sharpness",
    "skin_frac",
    "foreign_frac",
    "flat_frac",
    "edge_density",
)


# --------------------------------------------------------------------------------------------- image operations
def _resize(rgb: RGB, mask: Mask, size: tuple[int, int]) -> tuple[RGB, Mask]:
    """Bicubic image, bilinear + threshold 128 mask; ``size`` is (width, height)."""
    img = np.asarray(np.clip(cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC), 0, 255), dtype=np.uint8)
    m = cv2.resize(mask.astype(np.float32) * 255.0, size, interpolation=cv2.INTER_LINEAR) >= 128.0
    return img, np.asarray(m, dtype=bool)


def _aspect_size(aspect: float, long_side: int) -> tuple[int, int]:
    if aspect >= 1.0:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side


def _to_4_3(rgb: RGB, mask: Mask, aspect: float, width: int, height: int) -> tuple[RGB, Mask]:
    """Restore ``aspect`` so that a ``width`` x ``height`` box fits, then crop that box at the centre."""
    if aspect >= width / height:
        size = (max(width, round(height * aspect)), height)
    else:
        size = (width, max(height, round(width / aspect)))
    img, m = _resize(rgb, mask, size)
    x0, y0 = (size[0] - width) // 2, (size[1] - height) // 2
    return img[y0 : y0 + height, x0 : x0 + width].copy(), m[y0 : y0 + height, x0 : x0 + width].copy()


def _noise(rgb: RGB, sigma: float, rng: np.random.Generator) -> RGB:
    n = rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(sigma)
    return np.asarray(np.clip(rgb.astype(np.float32) + n + 0.5, 0, 255), dtype=np.uint8)


def _gains(rgb: RGB, r: float, g: float, b: float) -> RGB:
    x = rgb.astype(np.float32) * np.array([r, g, b], dtype=np.float32)
    return np.asarray(np.clip(x + 0.5, 0, 255), dtype=np.uint8)


def _lut(rgb: RGB, fn: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]) -> RGB:
    table = np.clip(fn(np.arange(256, dtype=np.float64)) + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(cv2.LUT(rgb, table), dtype=np.uint8)


def _vignette(rgb: RGB, mask: Mask, coverage: float = VIGNETTE_COVERAGE) -> tuple[RGB, Mask]:
    """Black outside a centred circle (diameter ``coverage`` of the shorter side, soft edge)."""
    h, w = rgb.shape[:2]
    radius = coverage * min(h, w) / 2.0
    yy, xx = np.ogrid[:h, :w]
    d = np.sqrt((yy - (h - 1) / 2.0) ** 2 + (xx - (w - 1) / 2.0) ** 2)
    factor = np.clip((radius - d) / (VIGNETTE_SOFT * radius) + 0.5, 0.0, 1.0).astype(np.float32)
    img = np.asarray(rgb.astype(np.float32) * factor[..., None] + 0.5, dtype=np.uint8)
    return img, mask & (factor >= 0.5)


# --------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class DeviceTransform:
    """One simulated device change: ``fn(rgb, mask, aspect, rng)``; written as ``fmt`` (copy, png, jpeg)."""

    name: str
    description: str
    fn: TransformFn | None
    fmt: str = "png"
    jpeg_quality: int = 95
    big: bool = False


def _aspect(long_side: int) -> TransformFn:
    def fn(rgb: RGB, mask: Mask, aspect: float, rng: np.random.Generator) -> tuple[RGB, Mask]:
        img, m = _resize(rgb, mask, _aspect_size(aspect, long_side))
        return _noise(img, NOISE_SIGMA, rng), m

    return fn


def _cast(r: float, g: float, b: float) -> TransformFn:
    return lambda rgb, mask, aspect, rng: (_gains(rgb, r, g, b), mask)


def _gamma(gamma: float) -> TransformFn:
    return lambda rgb, mask, aspect, rng: (_lut(rgb, lambda x: 255.0 * (x / 255.0) ** gamma), mask)


def _combined(rgb: RGB, mask: Mask, aspect: float, rng: np.random.Generator) -> tuple[RGB, Mask]:
    img, m = _to_4_3(rgb, mask, aspect, 1600, 1200)
    img = _gains(img, 0.92, 1.0, 1.08)
    img, m = _vignette(img, m)
    return _noise(img, NOISE_SIGMA, rng), m


TRANSFORMS: tuple[DeviceTransform, ...] = (
    DeviceTransform("identity", "source files copied byte for byte", None, fmt="copy"),
    DeviceTransform(
        "aspect_1024", "original aspect, long side 1024 px, bicubic, noise sigma 2, JPEG 90", _aspect(1024), "jpeg", 90
    ),
    DeviceTransform(
        "aspect_3000",
        "original aspect, long side 3000 px, bicubic, noise sigma 2, JPEG 90",
        _aspect(3000),
        "jpeg",
        90,
        big=True,
    ),
    DeviceTransform("warm_cast", "gains R x1.15, B x0.85", _cast(1.15, 1.0, 0.85)),
    DeviceTransform("cool_cast", "gains R x0.85, B x1.15", _cast(0.85, 1.0, 1.15)),
    DeviceTransform("green_tint", "gains R x0.92, G x1.10, B x0.92", _cast(0.92, 1.10, 0.92)),
    DeviceTransform("gamma_0.7", "gamma 0.7 (brighter mid-tones)", _gamma(0.7)),
    DeviceTransform("gamma_1.4", "gamma 1.4 (darker mid-tones)", _gamma(1.4)),
    DeviceTransform("brightness_0.75", "all channels x0.75", _cast(0.75, 0.75, 0.75)),
    DeviceTransform(
        "vignette", "black outside a centred circle of 90% of the shorter side", lambda r, m, a, g: _vignette(r, m)
    ),
    DeviceTransform("jpeg_60", "JPEG quality 60 re-encode", lambda r, m, a, g: (r, m), "jpeg", 60),
    DeviceTransform(
        "combined",
        "original aspect centre-cropped to 4:3 at 1600x1200, cast R x0.92 B x1.08, circular vignette, noise sigma 2, "
        "JPEG 85",
        _combined,
        "jpeg",
        85,
    ),
)


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Dataset:
    """A source folder and the rows of its ``labels.csv`` to use."""

    name: str
    root: Path
    header: list[str]
    rows: list[dict[str, str]]
    split: str


def _read_dataset(name: str, root: Path, split: str | None, limit: int | None) -> Dataset:
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if split is None or r.get("split") == split]
    if limit is not None:
        rows = rows[:limit]
    return Dataset(name, root, header, rows, split or "all")


def _aspect_of(row: dict[str, str], rgb: RGB) -> float:
    if row.get("orig_width") and row.get("orig_height"):
        return float(row["orig_width"]) / float(row["orig_height"])
    return rgb.shape[1] / rgb.shape[0]


def _rng(seed: int, transform: str, image_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(transform.encode()), zlib.crc32(image_id.encode())])


def _write_folder(ds: Dataset, rows: list[dict[str, str]], t: DeviceTransform, dest: Path, seed: int) -> None:
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    with (dest / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ds.header)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        image_id = row["image_id"]
        src_img, src_mask = ds.root / "images" / f"{image_id}.jpg", ds.root / "masks" / f"{image_id}.png"
        if t.fn is None:
            shutil.copyfile(src_img, dest / "images" / src_img.name)
            shutil.copyfile(src_mask, dest / "masks" / src_mask.name)
            continue
        with Image.open(src_img) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        gt = cv2.imread(str(src_mask), cv2.IMREAD_GRAYSCALE)
        if gt is None:
            raise OSError(f"cannot read {src_mask}")
        img, mask = t.fn(rgb, gt >= 128, _aspect_of(row, rgb), _rng(seed, t.name, image_id))
        if t.fmt == "jpeg":
            Image.fromarray(img, "RGB").save(dest / "images" / f"{image_id}.jpg", quality=t.jpeg_quality)
        else:
            Image.fromarray(img, "RGB").save(dest / "images" / f"{image_id}.png", compress_level=1)
        cv2.imwrite(str(dest / "masks" / f"{image_id}.png"), mask.astype(np.uint8) * 255)


# --------------------------------------------------------------------------------------------- evaluation
class RecordingAnalyzer(Analyzer):
    """The production analyser; also keeps each image's gate scores and source size (analysis untouched)."""

    def __init__(self, settings: AnalysisSettings) -> None:
        super().__init__(settings)
        self.records: dict[str, dict[str, Any]] = {}

    def analyze(self, source: SourceImage) -> AnalysisResult:
        result = super().analyze(source)
        self.records[source.sop_instance_uid] = {
            "size": [int(source.rgb.shape[1]), int(source.rgb.shape[0])],
            "scores": dict(result.quality.scores) if result.quality is not None else {},
        }
        return result


def _num(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _per_image(out_dir: Path, rec: RecordingAnalyzer) -> list[dict[str, Any]]:
    with (out_dir / "per_image.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        item: dict[str, Any] = {
            "image_id": r["image_id"],
            "status": r.get("status", ""),
            "reason": r.get("reason") or None,
            "dice": _num(r.get("dice")),
            "jaccard": _num(r.get("jaccard")),
            "melanoma_probability": _num(r.get("melanoma_probability")),
            "band": r.get("band") or None,
            "melanoma_label": int(r["melanoma_label"]) if r.get("melanoma_label") not in (None, "") else None,
        }
        record = rec.records.get(r["image_id"], {})
        item["size"] = record.get("size")
        item["gate"] = {k: round(float(v), 4) for k, v in record.get("scores", {}).items()}
        out.append(item)
    return out


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    seg = doc.get("segmentation", {})
    allim, analysed = seg.get("all_images") or {}, seg.get("analysed_only") or {}
    mel = doc.get("melanoma")
    return {
        "n": doc["coverage"]["n_images"],
        "analysed": doc["coverage"]["analysed"],
        "refused": doc["coverage"]["not_analysable"],
        "refusal_reasons": doc["coverage"]["not_analysable_reasons"],
        "unreadable": doc["coverage"]["unreadable"],
        "dice_all": allim.get("dice"),
        "jaccard_all": allim.get("jaccard"),
        "thresholded_jaccard_all": allim.get("thresholded_jaccard"),
        "dice_analysed": analysed.get("dice"),
        "thresholded_jaccard_analysed": analysed.get("thresholded_jaccard"),
        "fraction_jaccard_below_0_65": seg.get("fraction_jaccard_below_0_65"),
        "melanoma_auc": mel["auc"] if mel else None,
        "melanoma_auc_ci95": mel["auc_ci95"] if mel else None,
        "melanoma_n": mel["n"] if mel else None,
        "melanoma_sensitivity_at_80_specificity": mel["sensitivity_at_80_specificity"] if mel else None,
        "melanoma_ece": mel["ece"] if mel else None,
        "melanoma_bands": mel["bands"] if mel else None,
        "seconds_per_image_analysis": doc.get("seconds_per_image_mean"),
    }


def _gate_summary(images: list[dict[str, Any]]) -> dict[str, Any]:
    med = {}
    for k in GATE_SCORES:
        vals = [im["gate"][k] for im in images if k in im["gate"]]
        if vals:
            med[k] = round(float(np.median(vals)), 4)
    refused = [
        {"image_id": im["image_id"], "reason": im["reason"], **{k: im["gate"].get(k) for k in GATE_SCORES}}
        for im in images
        if im["status"] == "not_analysable"
    ]
    return {"median_scores": med, "refused": refused}


def _paired(images: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Changes against ``identity`` on the same image ids."""
    base = {im["image_id"]: im for im in ref}
    pairs = [(im, base[im["image_id"]]) for im in images if im["image_id"] in base]
    out: dict[str, Any] = {"n": len(pairs)}
    dice = [(a["dice"] or 0.0, b["dice"] or 0.0) for a, b in pairs if a["dice"] is not None and b["dice"] is not None]
    if dice:
        d = np.array(dice)
        out["identity_dice_all_same_images"] = float(d[:, 1].mean())
        out["mean_dice_change"] = float((d[:, 0] - d[:, 1]).mean())
        out["images_dice_drop_over_0_1"] = int(((d[:, 1] - d[:, 0]) > 0.1).sum())
        out["images_dice_gain_over_0_1"] = int(((d[:, 0] - d[:, 1]) > 0.1).sum())
    both = [(a, b) for a, b in pairs if a["melanoma_probability"] is not None and b["melanoma_probability"] is not None]
    if both:
        diffs = np.array([a["melanoma_probability"] - b["melanoma_probability"] for a, b in both])
        out["melanoma_probability_mean_abs_change"] = float(np.abs(diffs).mean())
        out["melanoma_probability_mean_change"] = float(diffs.mean())
        out["band_changes"] = int(sum(1 for a, b in both if a["band"] != b["band"]))
    ys = [b["melanoma_label"] for _, b in pairs if b["melanoma_probability"] is not None]
    ps = [b["melanoma_probability"] for _, b in pairs if b["melanoma_probability"] is not None]
    if len(set(ys)) == 2:
        out["identity_melanoma_auc_same_images"] = roc_auc(ys, ps)
    return out


def _meta() -> dict[str, Any]:
    import torch

    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "models"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "src_or_models_modified": bool(dirty),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nproc": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------------------------- gate-only sweep
SweepFn = Callable[[RGB, float], RGB]


def _sweep_levels() -> list[tuple[str, str, SweepFn]]:
    """(family, level, fn(rgb, aspect)) of the gate-only severity sweep."""
    levels: list[tuple[str, str, SweepFn]] = []
    for g in (1.0, 1.15, 1.3, 1.45, 1.6):
        levels.append(("cool_cast", f"R x{1 / g:.2f} B x{g:.2f}", lambda x, a, g=g: _gains(x, 1 / g, 1.0, g)))
    for g in (1.15, 1.3, 1.45, 1.6):
        levels.append(("warm_cast", f"R x{g:.2f} B x{1 / g:.2f}", lambda x, a, g=g: _gains(x, g, 1.0, 1 / g)))
    for g in (1.1, 1.2, 1.3, 1.4):
        levels.append(("green_tint", f"G x{g:.2f}", lambda x, a, g=g: _gains(x, 1.0, g, 1.0)))
    for gm in (0.4, 0.5, 0.6, 1.7, 2.0, 2.5):
        levels.append(("gamma", f"{gm}", lambda x, a, gm=gm: _lut(x, lambda v: 255.0 * (v / 255.0) ** gm)))
    for b in (0.6, 0.5, 0.4, 0.3, 1.2, 1.4):
        levels.append(("brightness", f"x{b}", lambda x, a, b=b: _gains(x, b, b, b)))
    for cov in (None, 0.9, 0.8, 0.7, 0.6):
        for b in (1.0, 0.8, 0.6):

            def fn(x: RGB, a: float, cov: float | None = cov, b: float = b) -> RGB:
                img, _ = _to_4_3(x, np.zeros(x.shape[:2], dtype=bool), a, 1024, 768)
                if cov is not None:
                    img, _ = _vignette(img, np.ones(img.shape[:2], dtype=bool), cov)
                return _gains(img, b, b, b) if b != 1.0 else img

            label = f"4:3 1024x768, {'no circle' if cov is None else f'circle {cov:.0%} of height'}, brightness x{b}"
            levels.append(("4:3 circular field x brightness", label, fn))
    return levels


def gate_sweep(datasets: list[Dataset]) -> list[dict[str, Any]]:
    """Refusals of :func:`assess_quality` alone (no models) at increasing strengths of each shift."""
    from dermnode.inference.quality import assess_quality

    sources: list[tuple[RGB, float]] = []
    for ds in datasets:
        for row in ds.rows:
            with Image.open(ds.root / "images" / f"{row['image_id']}.jpg") as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            sources.append((rgb, _aspect_of(row, rgb)))
    out = []
    for family, label, fn in _sweep_levels():
        reasons: dict[str, int] = {}
        scores: dict[str, list[float]] = {k: [] for k in GATE_SCORES}
        for rgb, aspect in sources:
            rep = assess_quality(fn(rgb, aspect))
            if not rep.usable:
                reasons[str(rep.reason)] = reasons.get(str(rep.reason), 0) + 1
            for k in GATE_SCORES:
                scores[k].append(rep.scores[k])
        n_ref = sum(reasons.values())
        out.append(
            {
                "family": family,
                "level": label,
                "n": len(sources),
                "refused": n_ref,
                "refusal_rate": n_ref / len(sources),
                "reasons": reasons,
                "median_scores": {k: round(float(np.median(v)), 4) for k, v in scores.items()},
                "min_mean_v": round(float(np.min(scores["mean_v"])), 4),
                "min_field_mean_v": round(float(np.min(scores["field_mean_v"])), 4),
                "max_mean_luma": round(float(np.max(scores["mean_luma"])), 4),
                "min_skin_frac": round(float(np.min(scores["skin_frac"])), 4),
                "max_foreign_frac": round(float(np.max(scores["foreign_frac"])), 4),
                "min_sharpness": round(float(np.min(scores["sharpness"])), 4),
            }
        )
        print(f"gate sweep {family:32s} {label:55s} {n_ref:3d}/{len(sources)} refused {reasons or ''}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    default = Path(os.environ.get("DERMNODE_DATA", repo.parent / "shared" / "data"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/device-shift-<date>.json")
    ap.add_argument(
        "--transforms",
        default="all",
        help="comma-separated names (default: all): " + ", ".join(t.name for t in TRANSFORMS),
    )
    ap.add_argument("--limit", type=int, default=None, help="first N ISIC 2017 val images only (default: all 150)")
    ap.add_argument("--big-limit", type=int, default=None, help="first N ISIC images for the 3000 px transform")
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--work", type=Path, default=None, help="temporary folder (default: a new one under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the transformed folders")
    ap.add_argument(
        "--gate-sweep",
        action="store_true",
        help="instead of the pipeline runs: the quality gate alone (no models) at increasing strengths of each "
        "shift (writes device-shift-gate-sweep-<date>.json by default)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # "melanoma metrics skipped" for the all-benign HAM sample is expected; errors still show
    logging.getLogger("dermnode.evaluation.pipeline").setLevel(logging.ERROR)
    cv2.setNumThreads(1)
    names = [t.name for t in TRANSFORMS] if args.transforms == "all" else args.transforms.split(",")
    unknown = set(names) - {t.name for t in TRANSFORMS}
    if unknown:
        ap.error(f"unknown transforms: {sorted(unknown)}")
    selected = [t for t in TRANSFORMS if t.name in names]
    datasets = [
        _read_dataset("isic2017_val", args.data / "isic2017", "val", args.limit),
        _read_dataset("ham10000_sample", args.data / "ham10000-sample", None, None),
    ]
    results_dir = repo / "bench" / "results"
    meta = _meta()
    if args.gate_sweep:
        t0 = time.time()
        sweep = gate_sweep(datasets)
        out = args.out or results_dir / f"device-shift-gate-sweep-{stamp}.json"
        doc = {
            "benchmark": "device_shift gate sweep",
            "meta": meta,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "wall_s_total": round(time.time() - t0, 1),
            "levels": sweep,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out} ({doc['wall_s_total']:.0f} s)")
        return 0
    args.out = args.out or results_dir / f"device-shift-{stamp}.json"
    settings = AnalysisSettings()
    analyzer = RecordingAnalyzer(settings)
    work = args.work or Path(tempfile.mkdtemp(prefix="device-shift-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results: dict[str, Any] = {}
    for t in selected:
        per_ds: dict[str, Any] = {}
        for ds in datasets:
            rows = ds.rows[: args.big_limit] if (t.big and args.big_limit and ds.name == "isic2017_val") else ds.rows
            t0 = time.time()
            folder, out_dir = work / t.name / ds.name, work / t.name / f"{ds.name}-eval"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            _write_folder(ds, rows, t, folder, args.seed)
            t_gen = time.time() - t0
            analyzer.records.clear()
            doc = evaluate_pipeline(folder, ds.split, settings, out_dir, analyzer=analyzer)
            images = _per_image(out_dir, analyzer)
            per_ds[ds.name] = {
                **_summary(doc),
                "subset": f"first {len(rows)} of {len(ds.rows)}" if len(rows) < len(ds.rows) else "all",
                "wall_s": round(time.time() - t0, 1),
                "generation_s": round(t_gen, 1),
                "gate": _gate_summary(images),
                "images": images,
            }
            s = per_ds[ds.name]
            auc = f" AUC {s['melanoma_auc']:.3f}" if s["melanoma_auc"] is not None else ""
            print(
                f"{t.name:16s} {ds.name:16s} {s['analysed']}/{s['n']} analysed {s['refusal_reasons'] or ''} "
                f"Dice {s['dice_all']:.4f} (analysed {s['dice_analysed'] or 0:.4f}) "
                f"tJ {s['thresholded_jaccard_all']:.4f}"
                f"{auc} {s['seconds_per_image_analysis'] or 0:.3f} s/img, wall {s['wall_s']:.0f} s",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        results[t.name] = {"description": t.description, "format": t.fmt, "jpeg_quality": t.jpeg_quality, **per_ds}
    if "identity" in results:
        for res in results.values():
            for ds in datasets:
                res[ds.name]["vs_identity"] = _paired(res[ds.name]["images"], results["identity"][ds.name]["images"])
    doc_out = {
        "benchmark": "device_shift",
        "meta": meta,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "hair_removal": settings.hair_removal,
            "clahe": settings.clahe,
            "torch_threads": settings.torch_threads,
            "seed": args.seed,
            "limit": args.limit,
            "big_limit": args.big_limit,
        },
        "wall_s_total": round(time.time() - t_start, 1),
        "transforms": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc_out, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({doc_out['wall_s_total']:.0f} s)")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
