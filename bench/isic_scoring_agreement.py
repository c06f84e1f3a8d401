"""Agreement of dermnode's evaluation metrics with the ISIC Challenge's own scorer (``isic-challenge-scoring``).

Usage::

    python3 -m venv /tmp/isicscore-venv
    /tmp/isicscore-venv/bin/pip install isic-challenge-scoring==5.6.0 'pandas==2.2.3'
    .venv/bin/python bench/isic_scoring_agreement.py [--data ../shared/data] [--models models]
        [--isic-python /tmp/isicscore-venv/bin/python] [--out bench/results/isic-scoring-agreement-<date>.json]

The ISIC package lives in its own virtualenv (it needs an older pandas and must not disturb the project's
``.venv``); it is called through a subprocess, on files in the challenge formats, as a challenge submission
would be scored. pandas is pinned below 3 (2.2.3 tested): version 5.6.0 calls ``DataFrame.applymap``, removed in
pandas 3.0, so its classification scorer fails on a current pandas.

What is scored (the shipped models in ``models/``, the same inference paths as ``dermnode evaluate``):

1. **Segmentation** — ISIC 2017 official validation split (150 images): the shipped segmenter
   (:class:`~dermnode.inference.segmentation.Segmenter`, no hair removal / artefact step, as
   :func:`dermnode.evaluation.segmentation.evaluate_segmentation` by default) writes 0/255 PNG masks to a temporary
   folder; dermnode's per-image and mean metrics (:mod:`dermnode.evaluation.segmentation_metrics`) are compared
   with ``isic-challenge-scoring segmentation TRUTH_DIR PRED_DIR`` (ground truth: the official mask files,
   linked, not copied, into a temporary folder) and with the package's per-image values.
2. **Melanoma** — ISIC 2017 val, classifier on ground-truth-mask crops with flip TTA and temperature scaling
   (the path of :func:`dermnode.evaluation.classification.evaluate_classification`). Challenge CSV layout with
   two mutually exclusive columns ``MEL`` (p) and ``NOT_MEL`` (1 - p); dermnode's AUC and balanced accuracy at
   p >= 0.5 are compared with the package's ``MEL`` AUC and aggregate balanced accuracy.
3. **9-class diagnosis** (ISIC 2019 layout, one column per class, softmax probabilities) on the isic-9class
   ``val`` (held-out 15 % of train rows, seed of the model) and ``test`` rows: dermnode's balanced accuracy of
   the arg-max and its one-vs-rest AUC per class against the package's aggregate balanced accuracy and
   per-category AUC; plus the melanoma head's MEL-vs-rest AUC on those rows.

Writes a JSON document (every pair of values and the absolute difference, the tie counts that matter for the
definitions, and the definitional notes) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-9  # beyond this an absolute difference is a disagreement, not floating-point noise

# Run inside the ISIC virtualenv: the package's own per-image segmentation metrics (its CLI prints only the
# macro averages), built from its own loader, threshold (> 128) and confusion matrix.
ISIC_PER_IMAGE = r"""
import json, pathlib, sys
from isic_challenge_scoring import metrics
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from isic_challenge_scoring.load_image import iter_image_pairs
out = {}
for pair in iter_image_pairs(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])):
    cm = create_binary_confusion_matrix(
        truth_binary_values=pair.truth_image > 128,
        prediction_binary_values=pair.prediction_image > 128,
        name=pair.image_id,
    )
    out[pair.image_id] = {
        "accuracy": float(metrics.binary_accuracy(cm)),
        "sensitivity": float(metrics.binary_sensitivity(cm)),
        "specificity": float(metrics.binary_specificity(cm)),
        "jaccard": float(metrics.binary_jaccard(cm)),
        "threshold_jaccard": float(metrics.binary_threshold_jaccard(cm, threshold=0.65)),
        "dice": float(metrics.binary_dice(cm)),
    }
print(json.dumps(out))
"""

# Run inside the ISIC virtualenv: the package's own CSV parsing and multi-class balanced accuracy, on every column
# (its classification command cannot score a truth column without positives; see multiclass_agreement).
ISIC_BALANCED_ACCURACY = r"""
import json, sys
from isic_challenge_scoring import metrics
from isic_challenge_scoring.load_csv import parse_csv, parse_truth_csv, sort_rows, validate_rows
with open(sys.argv[1]) as t, open(sys.argv[2]) as p:
    truth, weights = parse_truth_csv(t)
    pred = parse_csv(p, truth.columns)
validate_rows(truth, pred)
sort_rows(truth)
sort_rows(pred)
weights = weights.sort_index()
print(json.dumps({"balanced_accuracy": float(metrics.balanced_multiclass_accuracy(truth, pred, weights.score_weight))}))
"""

# dermnode metric name -> isic-challenge-scoring segmentation metric name
SEG_PAIRS = {
    "dice": "dice",
    "jaccard": "jaccard",
    "thresholded_jaccard": "threshold_jaccard",
    "pixel_accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}

NOTES = {
    "segmentation_binarisation": (
        "isic-challenge-scoring reads each PNG as 8-bit greyscale and counts a pixel as lesion when its value "
        "is > 128; dermnode's score_masks takes a boolean mask as is and thresholds uint8 0..255 at > 127 (0/1 "
        "arrays at > 0). The two differ only for pixels of exactly 128, which 0/255 masks (the official ISIC "
        "2017 masks and dermnode's predictions) never have. dermnode's loader (load_segmentation_split) "
        "thresholds the ground truth at > 127 too."
    ),
    "segmentation_empty_masks": (
        "Both score an image whose truth and prediction are both empty as Dice = Jaccard = 1, sensitivity = 1 "
        "when the truth is empty, specificity = 1 when there is no background; an empty prediction against a "
        "non-empty truth is 0 in both. No ISIC 2017 val mask is empty, so these branches are not exercised "
        "by the data (they are identical in code)."
    ),
    "thresholded_jaccard": (
        "Both: per-image Jaccard if >= 0.65, else 0 (ISIC 2018 Task 1), then the mean over images; the "
        "comparison is >= in both, so a Jaccard of exactly 0.65 is kept by both."
    ),
    "segmentation_averaging": (
        "Both macro-average: metrics per image, then the unweighted mean over images (no pooled/micro "
        "confusion matrix)."
    ),
    "auc": (
        "Both call sklearn.metrics.roc_auc_score (ties count 1/2, no sample weights here since every truth "
        "row has weight 1); the package computes it per category column, one-vs-rest."
    ),
    "balanced_accuracy": (
        "dermnode: sklearn.metrics.balanced_accuracy_score, the mean recall over the classes present in the "
        "truth (a predicted class absent from the truth is ignored). Binary melanoma: the prediction is "
        "p >= 0.5. isic-challenge-scoring: arg-max of the probability columns, a row with several equal "
        "maxima is 'undecided' (always wrong), then the mean over truth columns of TP / (truth count), "
        "columns without truth rows give NaN and are skipped by the mean. Same value unless a row has tied "
        "maxima (binary: p exactly 0.5, where dermnode predicts melanoma and ISIC predicts nothing); the tie "
        "counts are reported."
    ),
    "per_category_threshold": (
        "The package's per-category sensitivity/specificity/accuracy call a category positive when its "
        "probability is > 0.5 (strict), dermnode's balanced accuracy at p >= 0.5; the package's aggregate "
        "balanced accuracy (compared here) uses the arg-max, not 0.5."
    ),
    "not_compared": (
        "ISIC-only: auc_sens_80 (partial AUC above 80 % sensitivity, un-normalised), average precision, PPV, "
        "NPV, per-category Dice. dermnode-only: sensitivity at 80/95 % specificity, ECE, bootstrap CI of the "
        "AUC. These have no counterpart on the other side and are listed for information only."
    ),
}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _pair(dermnode_value: float | None, isic_value: float | None) -> dict[str, Any]:
    if dermnode_value is None or isic_value is None or not np.isfinite(isic_value):
        return {"dermnode": dermnode_value, "isic": isic_value, "abs_diff": None}
    return {
        "dermnode": float(dermnode_value),
        "isic": float(isic_value),
        "abs_diff": abs(float(dermnode_value) - float(isic_value)),
    }


def run_isic_cli(isic_python: Path, args: list[str]) -> dict[str, Any]:
    """``isic-challenge-scoring -o json ARGS`` in the ISIC virtualenv; its JSON answer."""
    cmd = [str(isic_python), "-m", "isic_challenge_scoring", "-o", "json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def isic_version(isic_python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in "
        "('isic-challenge-scoring', 'pandas', 'numpy', 'scikit-learn', 'pillow')}))"
    )
    proc = subprocess.run([str(isic_python), "-c", code], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(proc.stdout)
    return versions


# ---------------------------------------------------------------------------------------------------------
# segmentation


def segmentation_agreement(data: Path, models: Path, isic_python: Path, work: Path) -> dict[str, Any]:
    from dermnode.evaluation.segmentation_metrics import mean_scores, score_masks
    from dermnode.inference.registry import load_model_bundle
    from dermnode.inference.segmentation import Segmenter
    from dermnode.training.segmentation import load_segmentation_split

    d17 = data / "isic2017"
    bundle = load_model_bundle(models, "segmentation")
    segmenter = Segmenter(bundle)
    split = load_segmentation_split(d17, "val")
    truth_dir, pred_dir = work / "seg_truth", work / "seg_pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    per_image: dict[str, dict[str, float]] = {}
    scores = []
    t0 = time.perf_counter()
    for image_id, rgb, gt in zip(split.ids, split.images, split.masks, strict=True):
        pred = segmenter.segment(rgb).mask
        s = score_masks(pred, gt.astype(bool))
        scores.append(s)
        per_image[image_id] = s.to_json()
        Image.fromarray(pred.astype(np.uint8) * 255, mode="L").save(pred_dir / f"{image_id}_segmentation.png")
        # the official mask file itself (a link into the read-only data folder, never a copy in the repo)
        os.symlink((d17 / "masks" / f"{image_id}.png").resolve(), truth_dir / f"{image_id}_segmentation.png")
    seconds = time.perf_counter() - t0
    mean = mean_scores(scores).to_json()

    official = run_isic_cli(isic_python, ["segmentation", str(truth_dir), str(pred_dir)])
    script = work / "isic_per_image.py"
    script.write_text(ISIC_PER_IMAGE)
    proc = subprocess.run(
        [str(isic_python), str(script), str(truth_dir), str(pred_dir)], capture_output=True, text=True, check=True
    )
    isic_per_image: dict[str, dict[str, float]] = json.loads(proc.stdout)
    if set(isic_per_image) != set(per_image):
        raise RuntimeError("the ISIC scorer saw other images than dermnode")

    macro = official["macro_average"]
    metrics = {name: _pair(mean[name], macro[isic_name]) for name, isic_name in SEG_PAIRS.items()}
    per_image_max_diff = {
        name: max(abs(per_image[i][name] - isic_per_image[i][isic_name]) for i in per_image)
        for name, isic_name in SEG_PAIRS.items()
    }
    gt_empty = sum(int(not split.masks[k].any()) for k in range(len(split.ids)))
    pred_empty = sum(int(Image.open(pred_dir / f"{i}_segmentation.png").getbbox() is None) for i in split.ids)
    return {
        "data": "isic2017 val",
        "n_images": len(per_image),
        "model": bundle.identity.to_json(),
        "tta": segmenter.tta,
        "threshold": segmenter.threshold,
        "seconds_inference": seconds,
        "metrics_mean": metrics,
        "per_image_max_abs_diff": per_image_max_diff,
        "isic_overall_threshold_jaccard": official["overall"],
        "images_below_0_65_jaccard": sum(int(v["jaccard"] < 0.65) for v in per_image.values()),
        "empty_truth_masks": gt_empty,
        "empty_predicted_masks": pred_empty,
    }


# ---------------------------------------------------------------------------------------------------------
# classification


def _write_csv(path: Path, ids: list[str], columns: list[str], values: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", *columns])
        for iid, row in zip(ids, values, strict=True):
            w.writerow([iid, *(repr(float(v)) for v in row)])


def _ties(p: np.ndarray) -> int:
    """Rows whose maximum probability is reached by more than one column (ISIC 'undecided')."""
    return int(((p == p.max(axis=1, keepdims=True)).sum(axis=1) > 1).sum())


def binary_agreement(
    name: str, ids: list[str], y: np.ndarray, p: np.ndarray, isic_python: Path, work: Path
) -> dict[str, Any]:
    from dermnode.evaluation.classification_metrics import balanced_accuracy, roc_auc

    truth = np.stack([y, 1 - y], axis=1).astype(np.float64)
    pred = np.stack([p, 1.0 - p], axis=1)
    tf, pf = work / f"{name}_truth.csv", work / f"{name}_pred.csv"
    _write_csv(tf, ids, ["MEL", "NOT_MEL"], truth)
    _write_csv(pf, ids, ["MEL", "NOT_MEL"], pred)
    bacc = run_isic_cli(isic_python, ["classification", str(tf), str(pf), "-m", "balanced_accuracy"])
    mel = bacc["per_category"]
    return {
        "n": len(ids),
        "n_positive": int(y.sum()),
        "metrics": {
            "auc": _pair(roc_auc(y, p), mel["auc"]["MEL"]),
            "balanced_accuracy_at_0.5": _pair(
                balanced_accuracy(y, (p >= 0.5).astype(np.int64)), bacc["aggregate"]["balanced_accuracy"]
            ),
        },
        "rows_with_p_exactly_0.5": int((p == 0.5).sum()),
        "isic_only": {
            "auc_sens_80": mel["auc_sens_80"]["MEL"],
            "ap": mel["ap"]["MEL"],
            "sensitivity_p_gt_0.5": mel["sensitivity"]["MEL"],
            "specificity_p_gt_0.5": mel["specificity"]["MEL"],
        },
    }


def multiclass_agreement(
    name: str, ids: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str], isic_python: Path, work: Path
) -> dict[str, Any]:
    """9-class agreement. The package's classification command fails on a truth column without a positive row
    (its ``auc_above_sensitivity`` interpolates on an empty ROC segment: "array of sample points is empty"), so:
    its balanced-accuracy function is called on all columns (its CSV parsers and
    ``metrics.balanced_multiclass_accuracy``, through :data:`ISIC_BALANCED_ACCURACY`), and the command itself on
    the columns of the classes present (per-category AUC, and the aggregate balanced accuracy of the arg-max
    over those columns, compared with dermnode's balanced accuracy of the same arg-max)."""
    from dermnode.evaluation.classification_metrics import balanced_accuracy, roc_auc

    truth = np.eye(len(classes))[y]
    tf, pf = work / f"{name}_truth.csv", work / f"{name}_pred.csv"
    _write_csv(tf, ids, classes, truth)
    _write_csv(pf, ids, classes, probs)
    script = work / "isic_balanced_accuracy.py"
    script.write_text(ISIC_BALANCED_ACCURACY)
    proc = subprocess.run([str(isic_python), str(script), str(tf), str(pf)], capture_output=True, text=True, check=True)
    isic_bacc_all = float(json.loads(proc.stdout)["balanced_accuracy"])

    present = [k for k in range(len(classes)) if (y == k).any()]
    absent = [classes[k] for k in range(len(classes)) if k not in present]
    if absent:
        remap = {k: j for j, k in enumerate(present)}
        yr = np.array([remap[k] for k in y], dtype=np.int64)
        cols = [classes[k] for k in present]
        tf, pf = work / f"{name}_present_truth.csv", work / f"{name}_present_pred.csv"
        _write_csv(tf, ids, cols, np.eye(len(present))[yr])
        _write_csv(pf, ids, cols, probs[:, present])
    isic = run_isic_cli(isic_python, ["classification", str(tf), str(pf), "-m", "auc"])
    per_class: dict[str, Any] = {}
    for k in present:
        c = classes[k]
        yk = (y == k).astype(np.int64)
        per_class[c] = {"support": int(yk.sum()), **_pair(roc_auc(yk, probs[:, k]), isic["per_category"]["auc"][c])}
    metrics = {
        "balanced_accuracy": _pair(balanced_accuracy(y, probs.argmax(axis=1)), isic_bacc_all),
        "macro_auc": _pair(float(np.mean([v["dermnode"] for v in per_class.values()])), isic["macro_average"]["auc"]),
    }
    if absent:
        restricted = np.array(present)[probs[:, present].argmax(axis=1)]
        metrics[f"balanced_accuracy_argmax_over_{len(present)}_present_classes"] = _pair(
            balanced_accuracy(y, restricted), isic["aggregate"]["balanced_accuracy"]
        )
    return {
        "n": len(ids),
        "classes_without_truth_rows": absent,
        "rows_with_tied_maximum": _ties(probs),
        "rows_predicted_as_absent_class": int(np.isin(probs.argmax(axis=1), [classes.index(c) for c in absent]).sum()),
        "metrics": metrics,
        "per_class_auc": per_class,
    }


def classification_agreement(data: Path, models: Path, isic_python: Path, work: Path) -> dict[str, Any]:
    from dermnode.inference.classifier_models import load_classifier
    from dermnode.training.classification import CLASS_INDEX, batched_logits, eval_batch, load_samples
    from dermnode.vocabulary import DIAGNOSIS_CLASSES

    bundle = load_classifier(models)
    seed = int(bundle.extra.get("split_seed", bundle.extra.get("seed", 0)))
    out: dict[str, Any] = {
        "model": bundle.identity.to_json(),
        "temperatures": {"melanoma": bundle.temperature_melanoma, "diagnosis": bundle.temperature_diagnosis},
    }
    classes = list(DIAGNOSIS_CLASSES)
    t0 = time.perf_counter()
    for split in ("val", "test"):
        samples = load_samples([data], seed=seed, splits=(split,))
        s17 = [s for s in samples if s.source == "isic2017" and s.melanoma >= 0]
        s9 = [s for s in samples if s.source == "isic-9class" and s.diagnosis >= 0]
        if s17:
            z, _ = batched_logits(bundle.model, eval_batch(s17, bundle.input_size, bundle.margin), tta=True)
            y = np.array([s.melanoma for s in s17], dtype=np.int64)
            p = _sigmoid(z / bundle.temperature_melanoma)
            out[f"melanoma_isic2017_{split}"] = binary_agreement(
                f"mel17_{split}", [s.image_id for s in s17], y, p, isic_python, work
            )
        if s9:
            zm, zd = batched_logits(bundle.model, eval_batch(s9, bundle.input_size, bundle.margin), tta=True)
            ids = [s.image_id for s in s9]
            yd = np.array([s.diagnosis for s in s9], dtype=np.int64)
            pd = _softmax(zd / bundle.temperature_diagnosis)
            out[f"diagnosis_9class_{split}"] = multiclass_agreement(
                f"diag9_{split}", ids, yd, pd, classes, isic_python, work
            )
            ym = (yd == CLASS_INDEX["MEL"]).astype(np.int64)
            if 0 < ym.sum() < len(ym):
                out[f"melanoma_head_9class_{split}"] = binary_agreement(
                    f"mel9_{split}", ids, ym, _sigmoid(zm / bundle.temperature_melanoma), isic_python, work
                )
    out["seconds_inference"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------------------


def _rows(doc: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    rows: list[tuple[str, str, Any, Any, Any]] = []
    seg = doc["segmentation"]
    for name, v in seg["metrics_mean"].items():
        rows.append(
            (
                f"segmentation ISIC 2017 val (n={seg['n_images']})",
                f"mean {name}",
                v["dermnode"],
                v["isic"],
                v["abs_diff"],
            )
        )
    for key, block in doc["classification"].items():
        if not isinstance(block, dict) or "metrics" not in block:
            continue
        for name, v in block["metrics"].items():
            rows.append((f"{key} (n={block['n']})", name, v["dermnode"], v["isic"], v["abs_diff"]))
        for c, v in block.get("per_class_auc", {}).items():
            rows.append(
                (
                    f"{key} (n={block['n']})",
                    f"AUC {c} (support {v['support']})",
                    v["dermnode"],
                    v["isic"],
                    v["abs_diff"],
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--isic-python", type=Path, default=Path("/tmp/isicscore-venv/bin/python"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    if not (args.data / "isic2017" / "labels.csv").is_file():
        print(f"no ISIC 2017 data under {args.data}", file=sys.stderr)
        return 2
    if not args.isic_python.is_file():
        print(
            f"{args.isic_python} missing: install isic-challenge-scoring into its own venv (see --help)",
            file=sys.stderr,
        )
        return 2
    import torch

    torch.set_num_threads(args.threads)
    import dermnode

    now = dt.datetime.now(dt.UTC)
    out = args.out or REPO / "bench" / "results" / f"isic-scoring-agreement-{now:%Y%m%d}.json"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="isic-agreement-") as tmp:
        work = Path(tmp)
        doc: dict[str, Any] = {
            "created": now.isoformat(timespec="seconds"),
            "git_commit": commit,
            "dermnode_version": getattr(dermnode, "__version__", None),
            "isic_scoring_env": isic_version(args.isic_python),
            "tolerance": TOLERANCE,
            "command": "python bench/isic_scoring_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        doc["segmentation"] = segmentation_agreement(args.data, args.models, args.isic_python, work)
        doc["classification"] = classification_agreement(args.data, args.models, args.isic_python, work)
    rows = _rows(doc)
    diffs = [r[4] for r in rows if r[4] is not None]
    diffs += list(doc["segmentation"]["per_image_max_abs_diff"].values())
    doc["max_abs_diff"] = max(diffs)
    doc["agree"] = bool(max(diffs) <= TOLERANCE)
    doc["definitions"] = NOTES
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    def fmt(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) and v < 1e-3 else f"{v:.6f}")

    width = max(len(r[0]) + len(r[1]) for r in rows) + 3
    print(f"{'what':<{width}} {'dermnode':>10} {'isic':>10} {'|diff|':>10}")
    for task, name, a, b, d in rows:
        print(f"{task + ' / ' + name:<{width}} {fmt(a):>10} {fmt(b):>10} {fmt(d):>10}")
    print(f"segmentation per-image max |diff|: {doc['segmentation']['per_image_max_abs_diff']}")
    print(f"max |diff| overall {doc['max_abs_diff']:.3g}: {'AGREE' if doc['agree'] else 'DISAGREE'}; written to {out}")
    return 0 if doc["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
