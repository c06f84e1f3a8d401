"""CPU latency of the shipped segmenter on a 768x576 image.

Usage::

    .venv/bin/python bench/bench_segmentation.py [--models models] [--threads 1 2] [--repeats 30]

Reports median and 90th percentile wall time of ``Segmenter.segment`` (preprocessing, network, upsampling
and post-processing at source resolution) and of the network alone, per torch thread count, plus the
artefact-removal steps. Input: an ISIC 2017 val image upscaled to 768x576 when ``../shared/data`` is
present, else a synthetic lesion (latency does not depend on content much).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dermnode.inference.artefacts import detect_frame, remove_hair_blackhat, remove_hair_multiscale
from dermnode.inference.registry import load_model_bundle
from dermnode.inference.segmentation import Segmenter

REPO = Path(__file__).resolve().parents[1]


def test_image() -> tuple[np.ndarray, str]:
    root = Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data")) / "isic2017"
    path = root / "images" / "ISIC_0001769.jpg"
    if path.is_file():
        bgr = cv2.imread(str(path))
        return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (768, 576), interpolation=cv2.INTER_CUBIC), path.name
    yy, xx = np.mgrid[0:576, 0:768]
    img = np.full((576, 768, 3), (214, 160, 140), np.uint8)
    img[((yy - 288) / 130) ** 2 + ((xx - 384) / 140) ** 2 <= 1] = (120, 72, 50)
    return img, "synthetic"


def timeit(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bundle = load_model_bundle(args.models, "segmentation")
    seg = Segmenter(bundle)
    img, source = test_image()
    result: dict[str, Any] = {
        "model": bundle.identity.to_json(),
        "input": f"{source} 768x576",
        "working_size": list(bundle.manifest.input_size),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "segment": {},
        "network_only": {},
    }
    for n in args.threads:
        torch.set_num_threads(n)
        result["segment"][str(n)] = timeit(lambda: seg.segment(img), args.repeats)
        result["network_only"][str(n)] = timeit(lambda: seg.predict_probability(img), args.repeats)
    result["detect_frame"] = timeit(lambda: detect_frame(img), args.repeats)
    result["hair_blackhat"] = timeit(lambda: remove_hair_blackhat(img), args.repeats)
    result["hair_multiscale"] = timeit(lambda: remove_hair_multiscale(img), max(5, args.repeats // 3))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
