"""Per-image time budget of the analysis (gate, artefacts, segmentation, measurements, classification, outputs).

Usage::

    .venv/bin/python bench/analysis_budget.py [budget] [--images 20] [--repeats 3] [--threads 1] [--top 25]
        [--out bench/results/analysis_budget.md]
    .venv/bin/python bench/analysis_budget.py quality --out runs/speed-baseline [--size native|768x576]
    .venv/bin/python bench/analysis_budget.py compare BEFORE_DIR AFTER_DIR [--md FILE]

``budget`` (the default) wraps real dermoscopy photographs (``bench/common.py``: HAM10000 sample and ISIC 2017
val, resized to 768x576) as DICOM with a Patient ID and runs :func:`dermnode.pipeline.analyse_dataset` on each
(decode, every analysis stage, then every output: overlay, SEG, presentation state, SR, FHIR bundle, result.json),
``--repeats`` times per image after one warm-up pass. The stage times are those the analyser and
:func:`~dermnode.pipeline.write_outputs` record in ``result.timings_ms``. A torchvision resnet18 forward at 224 px
(random weights: the cost does not depend on them) is timed in the same process with the same thread count,
interleaved with the pipeline runs so that load from other processes hits both alike. The table gives per stage
the median, its budget and its share; the total is also given as a multiple of the resnet18 median (target: at
most 6x, issue 12). A cProfile of the whole per-image call (one pass over the images) follows, top functions by
cumulative and by own time. Writes markdown (``--out``) and the same numbers as JSON beside it.

``quality`` runs the production :class:`~dermnode.inference.analyzer.Analyzer` on the 150 ISIC 2017 val images
(native 256x256, or upscaled to 768x576 with ``--size 768x576`` as the speed benchmark sees them) and writes one
CSV row per image: status, Dice against the ground truth, every measurement, the eight border rise widths and
the six colour fractions behind the B and C scores, the gate scores, the frame and hair fractions and the
classifier's melanoma probability. ``compare`` reads two such folders and gives per feature the mean relative
change and the worst one (integer scores: how many images changed), as markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import dataclasses
import io
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import data_root, source_images  # noqa: E402

from dermnode.evaluation.segmentation_metrics import score_masks  # noqa: E402
from dermnode.inference.analyzer import Analyzer  # noqa: E402
from dermnode.inference.measurements import border_rise_widths, color_fractions  # noqa: E402
from dermnode.settings import AnalysisSettings, Settings  # noqa: E402
from dermnode.vocabulary import AnalysisStatus, SourceImage  # noqa: E402

STAGES = ("decode", "gate", "artefacts", "segmentation", "measurements", "classification", "outputs")
#: Budget of each stage as a multiple of one resnet18 forward (224 px) timed in the same run: they add up to the
#: target of issue 12 (the whole per-image call, outputs included, at most 6x resnet18).
BUDGET_X: dict[str, float] = {
    "decode": 0.1,
    "gate": 0.3,
    "artefacts": 0.5,
    "segmentation": 1.2,
    "measurements": 0.4,
    "classification": 0.8,
    "outputs": 2.7,
}
TARGET_MULTIPLE = 6.0
COLOURS = ("white", "red", "light brown", "dark brown", "blue-gray", "black")


# --------------------------------------------------------------------------------------------------- quality


def _val_ids(root: Path) -> list[str]:
    with (root / "labels.csv").open(newline="") as fh:
        return [r["image_id"] for r in csv.DictReader(fh) if r["split"] == "val"]


def quality(out: Path, size: str, limit: int | None) -> Path:
    """Per-image analysis values of the ISIC 2017 val images (see the module docstring); returns the CSV path."""
    root = data_root() / "isic2017"
    ids = _val_ids(root)[:limit]
    settings = AnalysisSettings()
    analyzer = Analyzer(settings)
    rows: list[dict[str, Any]] = []
    for image_id in ids:
        bgr = cv2.imread(str(root / "images" / f"{image_id}.jpg"), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if size != "native":
            w, h = (int(v) for v in size.split("x"))
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC)
        source = SourceImage(rgb=rgb, sop_instance_uid=image_id, sop_class_uid="", study_instance_uid="",
                             series_instance_uid="", spacing=None)
        result = analyzer.analyze(source)
        row: dict[str, Any] = {"image_id": image_id, "status": result.status.value}
        for k, v in sorted(result.quality.scores.items()):
            row[f"q_{k}"] = v
        gt = cv2.imread(str(root / "masks" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        mask = result.mask if result.mask is not None else np.zeros(rgb.shape[:2], bool)
        pred = cv2.resize(mask.astype(np.uint8), (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        row["dice"] = score_masks(pred, gt >= 128).dice
        m = result.measurements
        if result.status is AnalysisStatus.ANALYSED and m is not None and result.classification is not None:
            row.update(
                area_px=m.area_px, perimeter_px=m.perimeter_px, max_diameter_px=m.max_diameter_px,
                asymmetry=m.asymmetry, asymmetry_axes=m.asymmetry_axes, border_irregularity=m.border_irregularity,
                border_score=m.border_score, n_colors=len(m.colors), colors="|".join(m.colors),
                melanoma_probability=result.classification.melanoma_probability,
            )
            # the continuous values behind the B and C scores, on the same inputs as measure() sees them
            from dermnode.inference.artefacts import remove_artefacts

            cleaned = remove_artefacts(rgb, settings)
            row["hair_fraction"] = float(cleaned.hair_mask.mean())
            row["frame_fraction"] = cleaned.frame.fraction
            for i, wdt in enumerate(border_rise_widths(cleaned.image, mask)):
                row[f"rise_{i}"] = wdt
            for name, frac in color_fractions(cleaned.image, mask).items():
                row[f"colour_{name.replace(' ', '_')}"] = frac
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"per_image_{size}.csv"
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    dice = [float(r["dice"]) for r in rows]
    print(f"{path}: {len(rows)} images, {sum(r['status'] == 'analysed' for r in rows)} analysed, "
          f"mean Dice {np.mean(dice):.4f}")
    return path


_INTEGER_FEATURES = ("area_px", "asymmetry_axes", "border_score", "n_colors")


def _read(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["image_id"]: r for r in csv.DictReader(fh)}


def _pct(x: float) -> str:
    """A relative change as a percentage: 0, a fixed-point value, or the tiny ones (float rounding) as 1e-x %."""
    if x == 0.0:
        return "0"
    return f"{100 * x:.3f} %" if 100 * x >= 0.001 else f"{100 * x:.0e} %"


def compare(before: Path, after: Path) -> str:
    """Markdown table: per feature, mean relative change and the worst image (see the module docstring)."""
    lines: list[str] = []
    for b_path in sorted(before.glob("per_image_*.csv")):
        a_path = after / b_path.name
        if not a_path.is_file():
            continue
        b, a = _read(b_path), _read(a_path)
        ids = [i for i in b if i in a]
        status_changed = sum(b[i]["status"] != a[i]["status"] for i in ids)
        both = [i for i in ids if b[i]["status"] == a[i]["status"] == "analysed"]
        features = [k for k in b[ids[0]] if k not in ("image_id", "status", "colors")]
        lines += [
            f"#### ISIC 2017 val, {b_path.stem.removeprefix('per_image_')} ({len(ids)} images, {len(both)} analysed "
            f"in both, status changed: {status_changed})",
            "",
            "| feature | mean before | mean after | mean relative change | worst relative change | images changed |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        colour_sets = sum(b[i].get("colors", "") != a[i].get("colors", "") for i in both)
        for f in features:
            sel = both if not f.startswith("q_") and f != "dice" else ids
            pairs = []
            for i in sel:
                try:
                    x, y = float(b[i][f]), float(a[i][f])
                except (KeyError, ValueError):
                    continue
                pairs.append((x, y))  # inf (a border sector without contrast) == inf counts as unchanged
            if not pairs:
                continue
            finite = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            rel = [abs(y - x) / max(abs(x), 1e-9) if x != y else 0.0 for x, y in finite]
            changed = sum(x != y for x, y in pairs)
            mb = np.mean([x for x, _ in finite]) if finite else float("nan")
            ma = np.mean([y for _, y in finite]) if finite else float("nan")
            # a relative change of a mean of values near 0 (colour fractions) is read on the mean
            mean_rel = abs(ma - mb) / max(abs(mb), 1e-9)
            lines.append(
                f"| {f} | {mb:.5g} | {ma:.5g} | {_pct(mean_rel)} | {_pct(max(rel, default=0.0))} "
                f"| {changed}/{len(pairs)} |"
            )
        lines += ["", f"Colour sets (the reported C) changed on {colour_sets} of {len(both)} images.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- budget


def _resnet18(threads: int) -> Any:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def budget(
    n_images: int, repeats: int, threads: int, top: int, out: Path, before: Path | None = None,
    append: list[Path] | None = None, label: str = "",
) -> dict[str, Any]:
    """Time every stage of the per-image call and a resnet18 forward in one run; write markdown + JSON."""
    from common import write_dicoms

    from dermnode.dicom_io.reading import read_dicom_file
    from dermnode.pipeline import analyse_dataset

    images, origin = source_images(n_images)
    base = Settings()  # the service defaults (outputs, fsync) with the thread count of this run
    settings = dataclasses.replace(base, analysis=dataclasses.replace(base.analysis, torch_threads=threads))
    analyzer = Analyzer(settings.analysis)
    resnet = _resnet18(threads)
    work = Path(tempfile.mkdtemp(prefix="analysis-budget-"))
    files = write_dicoms(work / "in", len(images), jpeg=False, images=images)
    datasets = [read_dicom_file(f.path) for f in files]
    results_root = work / "results"

    def one(i: int) -> dict[str, float]:
        ds = datasets[i]
        c0 = time.process_time()
        t0 = time.perf_counter()
        result, _ = analyse_dataset(ds, analyzer, settings, results_root, started=t0)
        total = (time.perf_counter() - t0) * 1000.0
        cpu = (time.process_time() - c0) * 1000.0
        return {**result.timings_ms, "total": total, "cpu": cpu,
                "status": float(result.status is AnalysisStatus.ANALYSED)}

    for i in range(len(datasets)):  # warm-up: first calls, page cache
        one(i)
        resnet()
    per_stage: dict[str, list[float]] = {s: [] for s in (*STAGES, "total", "cpu")}
    resnet_ms: list[float] = []
    resnet_cpu_ms: list[float] = []
    analysed = 0
    for _ in range(repeats):
        for i in range(len(datasets)):
            t = one(i)
            analysed += int(t["status"])
            for s in per_stage:
                per_stage[s].append(float(t.get(s, 0.0)))
            for _ in range(2):
                c0 = time.process_time()
                t0 = time.perf_counter()
                resnet()
                resnet_ms.append((time.perf_counter() - t0) * 1000.0)
                resnet_cpu_ms.append((time.process_time() - c0) * 1000.0)
    med = {s: statistics.median(v) for s, v in per_stage.items()}
    r18 = statistics.median(resnet_ms)
    r18_cpu = statistics.median(resnet_cpu_ms)
    # profile of one pass of the whole per-image call
    prof = cProfile.Profile()
    prof.enable()
    for i in range(len(datasets)):
        one(i)
    prof.disable()
    buf_cum, buf_own = io.StringIO(), io.StringIO()
    pstats.Stats(prof, stream=buf_cum).strip_dirs().sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof, stream=buf_own).strip_dirs().sort_stats("tottime").print_stats(top)

    budget_ms = {k: v * r18 for k, v in BUDGET_X.items()}
    budget_total = sum(budget_ms.values())
    stage_sum = sum(med[s] for s in STAGES)
    lines = [
        "## Per-image analysis budget (768x576)",
        "",
        f"{origin}; {len(datasets)} images x {repeats} passes ({analysed} analysed results of "
        f"{repeats * len(datasets)}), torch threads {threads}, `analyse_dataset` (decode, analysis, all outputs) "
        f"with the shipped models and default settings. resnet18 (224 px, 1 image) median **{r18:.1f} ms**, "
        f"timed interleaved in the same process. Load average at the end: {os.getloadavg()[0]:.1f} "
        f"({os.cpu_count()} CPUs; other processes share the machine).",
        "",
        "| stage | median ms | budget ms | share of stage sum | x resnet18 | budget x resnet18 | within |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in STAGES:
        lines.append(f"| {s} | {med[s]:.1f} | {budget_ms[s]:.0f} | {100 * med[s] / stage_sum:.0f} % "
                     f"| {med[s] / r18:.2f} | {BUDGET_X[s]:.1f} | {'yes' if med[s] <= budget_ms[s] else '**no**'} |")
    lines += [
        f"| **sum of stage medians** | **{stage_sum:.1f}** | {budget_total:.0f} | 100 % | **{stage_sum / r18:.2f}** "
        f"| {sum(BUDGET_X.values()):.1f} | {'yes' if stage_sum <= budget_total else '**no**'} |",
        f"| median per-image call (measured) | {med['total']:.1f} | | | **{med['total'] / r18:.2f}** |",
        f"| CPU time of the call (all threads) vs resnet18's CPU time ({r18_cpu:.1f} ms) | {med['cpu']:.1f} | | "
        f"| {med['cpu'] / r18_cpu:.2f} |",
        "",
        f"Target: at most {TARGET_MULTIPLE:.0f}x resnet18 = {TARGET_MULTIPLE * r18:.0f} ms in this run; "
        f"measured {med['total'] / r18:.2f}x (wall) and {med['cpu'] / r18_cpu:.2f}x (CPU time, which other "
        "processes on the machine disturb less). Each stage's budget is a multiple of resnet18 (column 'budget x "
        "resnet18'), so it carries over to another machine; the stage times are those `result.json` records "
        "(`timings_ms`). With a 2-core host shared by other work, wall times swing by 2-5x between runs: compare the "
        "multiples of the same run.",
        "",
        *(_before_after(json.loads(before.read_text()), med, r18, r18_cpu) if before is not None else []),
        *(text for path in (append or []) for text in (path.read_text(), "")),
        f"### cProfile of one pass ({len(datasets)} per-image calls), top {top} by cumulative time",
        "",
        "```",
        buf_cum.getvalue().strip(),
        "```",
        "",
        f"### Top {top} by own time",
        "",
        "```",
        buf_own.getvalue().strip(),
        "```",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    doc = {
        "label": label,
        "origin": origin,
        "images": len(datasets),
        "repeats": repeats,
        "threads": threads,
        "loadavg": os.getloadavg()[0],
        "resnet18_median_ms": r18,
        "resnet18_cpu_median_ms": r18_cpu,
        "median_ms": med,
        "budget_x_resnet18": BUDGET_X,
        "total_multiple_of_resnet18": med["total"] / r18,
        "cpu_multiple_of_resnet18_cpu": med["cpu"] / r18_cpu,
        "stage_sum_multiple_of_resnet18": stage_sum / r18,
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(lines[:18 + len(STAGES)]))
    return doc


def _before_after(doc: dict[str, Any], med: dict[str, float], r18: float, r18_cpu: float) -> list[str]:
    """Rows comparing this run with an earlier one's JSON (each as ms and as a multiple of its own resnet18)."""
    b18, b18_cpu = float(doc["resnet18_median_ms"]), float(doc["resnet18_cpu_median_ms"])
    bmed = doc["median_ms"]
    lines = [
        f"### Before / after ({doc.get('label') or 'before'}: resnet18 {b18:.1f} ms in its run, load average "
        f"{doc.get('loadavg', float('nan')):.1f}; this run: {r18:.1f} ms)",
        "",
        "| stage | before ms | after ms | before x resnet18 | after x resnet18 |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in (*STAGES, "total"):
        lines.append(f"| {s} | {bmed[s]:.1f} | {med[s]:.1f} | {bmed[s] / b18:.2f} | {med[s] / r18:.2f} |")
    lines += [
        f"| CPU time of the call (x resnet18's CPU time) | {bmed['cpu']:.1f} | {med['cpu']:.1f} "
        f"| {bmed['cpu'] / b18_cpu:.2f} | {med['cpu'] / r18_cpu:.2f} |",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("budget")
    q = sub.add_parser("quality")
    c = sub.add_parser("compare")
    for p in (ap, b):
        p.add_argument("--images", type=int, default=20)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads of the analyser and of resnet18 (default 1: the service's default; "
                       "2 threads stall when other processes load the 2-core machine)")
        p.add_argument("--top", type=int, default=25)
        p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "analysis_budget.md")
        p.add_argument("--label", default="", help="name of this run in the JSON (e.g. a commit)")
        p.add_argument("--before", type=Path, default=None, help="JSON of an earlier run: before/after table")
        p.add_argument("--append", type=Path, action="append", default=None,
                       help="markdown appended before the profile (compare's output, notes); repeatable")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--size", default="native", help="native or WxH (e.g. 768x576)")
    q.add_argument("--limit", type=int, default=None)
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "quality":
        quality(args.out, args.size, args.limit)
    elif args.cmd == "compare":
        text = compare(args.before, args.after)
        print(text)
        if args.md is not None:
            args.md.write_text(text + "\n")
    else:
        budget(args.images, args.repeats, args.threads, args.top, args.out, args.before, args.append,
               args.label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
