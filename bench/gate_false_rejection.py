"""False-rejection rate of the quality gate on every real dermoscopy image in the shared data.

Usage::

    .venv/bin/python bench/gate_false_rejection.py [--data ../shared/data] [--out runs/gate_frr.json]

Every image under ``isic2017/images``, ``isic-9class/images`` and ``ham10000-sample/images`` is a real,
usable dermoscopy image, so every rejection is a false rejection. Prints the rate per dataset and overall,
the rejection reasons, and percentiles of each gate score (used to set the thresholds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from dermnode.inference.quality import assess_quality

DATASETS = ("isic2017", "isic-9class", "ham10000-sample")


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    default = Path(os.environ.get("DERMNODE_DATA", repo.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--out", type=Path, default=repo / "runs" / "gate_frr.json")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    results: dict[str, dict[str, object]] = {}
    all_scores: dict[str, list[float]] = {}
    rejected_total = 0
    total = 0
    t0 = time.time()
    for name in DATASETS:
        files = sorted((args.data / name / "images").glob("*.jpg"))
        if not files:
            continue
        reasons: Counter[str] = Counter()
        examples: list[str] = []
        for f in files:
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                reasons["unreadable"] += 1
                continue
            rep = assess_quality(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            for k, v in rep.scores.items():
                all_scores.setdefault(k, []).append(v)
            if not rep.usable:
                reasons[str(rep.reason)] += 1
                if len(examples) < 20:
                    examples.append(f.name)
        n_rej = sum(reasons.values())
        results[name] = {
            "images": len(files),
            "rejected": n_rej,
            "false_rejection_rate": n_rej / len(files),
            "reasons": dict(reasons),
            "examples": examples,
        }
        rejected_total += n_rej
        total += len(files)
        print(f"{name}: {n_rej}/{len(files)} rejected ({100 * n_rej / len(files):.2f}%) {dict(reasons)}")
    if total == 0:
        print(f"no images under {args.data}", file=sys.stderr)
        return 2
    pct = {
        k: {p: float(np.percentile(v, p)) for p in (0, 0.5, 1, 2, 5, 50, 95, 98, 99, 99.5, 100)}
        for k, v in all_scores.items()
    }
    summary = {
        "images": total,
        "rejected": rejected_total,
        "false_rejection_rate": rejected_total / total,
        "per_dataset": results,
        "score_percentiles": pct,
        "seconds_per_image": (time.time() - t0) / total,
    }
    for k, v in pct.items():
        print(f"  {k:14s} " + " ".join(f"p{p}={x:.3f}" for p, x in v.items()))
    print(f"overall false-rejection rate: {rejected_total}/{total} = {100 * rejected_total / total:.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
