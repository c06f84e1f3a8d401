"""Network cost of the shipped models (issue: <= 60 ms segmentation + classification on 1 thread).

Usage::

    .venv/bin/python bench/model_cost.py [--models DIR ...] [--threads 1] [--repeats 30] [--out FILE]

For each models folder: the segmentation network at its working size (the frame for a 4:3 768x576 image, with
its test-time augmentation if the manifest asks for it) and the classifier network at its input size (with its
TTA), timed alone (no pre/post-processing), median and 90th percentile over ``--repeats`` runs after warm-up;
parameters, weight-file size; and one torchvision resnet18 forward at 224 px timed in the same run as a
machine-independent yardstick. Writes a JSON document (default ``bench/results/model-cost-<UTC time>.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from dermnode.inference.classifier_models import load_classifier, predict_logits
from dermnode.inference.registry import load_model_bundle
from dermnode.inference.segmentation import Segmenter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_segmentation import timeit  # noqa: E402  (the same warm-up + median/p90 timing)


def cost(models: Path, repeats: int, seg_name: str, cls_name: str) -> dict[str, Any]:
    seg_bundle = load_model_bundle(models, seg_name)
    seg = Segmenter(seg_bundle)
    h, w = seg.working_size(576, 768)
    x = torch.randn(2 if seg.tta else 1, 3, h, w).contiguous(memory_format=torch.channels_last)
    module = seg_bundle.module.to(memory_format=torch.channels_last)

    def run_seg() -> None:
        with torch.inference_mode():
            module(x)

    clf = load_classifier(models, cls_name)
    s = clf.input_size
    crop = torch.randn(1, 3, s, s).numpy()
    cls_model = clf.model.to(memory_format=torch.channels_last)

    def run_cls() -> None:
        predict_logits(cls_model, crop, tta=clf.tta)

    seg_t, cls_t = timeit(run_seg, repeats), timeit(run_cls, repeats)
    return {
        "models": str(models),
        "segmentation": {
            "identity": seg_bundle.identity.to_json(),
            "arch": seg_bundle.manifest.arch,
            "input": [h, w],
            "tta": seg.tta,
            "parameters": sum(p.numel() for p in module.parameters()),
            "file_bytes": (models / f"{seg_name}.pt").stat().st_size,
            **seg_t,
        },
        "classifier": {
            "identity": clf.identity.to_json(),
            "input": s,
            "tta": clf.tta,
            "parameters": sum(p.numel() for p in cls_model.parameters()),
            "file_bytes": (models / f"{cls_name}.pt").stat().st_size,
            **cls_t,
        },
        "networks_median_ms": seg_t["median_ms"] + cls_t["median_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, action="append", help="models folder (repeatable; default models/)")
    ap.add_argument("--names", nargs=2, action="append", metavar=("SEG", "CLS"),
                    help="model file stems per --models (default segmentation classifier)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folders = args.models or [REPO / "models"]
    names = args.names or [["segmentation", "classifier"]] * len(folders)
    import torchvision

    resnet = torchvision.models.resnet18().eval()
    xr = torch.randn(1, 3, 224, 224)

    def run_resnet() -> None:
        with torch.inference_mode():
            resnet(xr)

    doc: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "torch": torch.__version__,
        "resnet18_224_ms": timeit(run_resnet, args.repeats),
        "runs": [cost(m, args.repeats, n[0], n[1]) for m, n in zip(folders, names, strict=True)],
    }
    out = args.out or REPO / "bench" / "results" / f"model-cost-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
