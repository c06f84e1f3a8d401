"""Training (tiny synthetic data set): export, resume, and evaluation outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dermnode.errors import ModelError
from dermnode.evaluation.segmentation import evaluate_segmentation
from dermnode.inference.registry import load_model_bundle
from dermnode.training.segmentation import augment, bce_dice_loss, train_segmentation

KW = {"widths": [4, 4, 8, 8, 8]}


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        img = np.full((64, 64, 3), (140, 160, 214), np.uint8)  # BGR skin
        mask = np.zeros((64, 64), np.uint8)
        c = (int(rng.integers(24, 40)), int(rng.integers(24, 40)))
        cv2.ellipse(mask, c, (int(rng.integers(8, 16)), int(rng.integers(8, 16))), 0, 0, 360, 255, -1)
        img[mask > 0] = (50, 72, 120)
        cv2.imwrite(str(root / "images" / f"IMG_{i}.jpg"), img)
        cv2.imwrite(str(root / "masks" / f"IMG_{i}.png"), mask)
        rows.append({"image_id": f"IMG_{i}", "split": "train" if i < 6 else "val"})
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_augment_keeps_alignment() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    img[mask > 0] = 255
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, m = augment(img, mask, 32, rng)
        assert x.shape == (32, 32, 3) and m.shape == (32, 32)
        assert x.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        if m.sum() > 10:
            assert x[m > 0].mean() > x[m == 0].mean() + 0.2


def test_loss_is_lower_for_good_prediction() -> None:
    import torch

    t = torch.zeros(1, 1, 8, 8)
    t[..., 2:6, 2:6] = 1
    good = bce_dice_loss((t * 2 - 1) * 6, t)
    bad = bce_dice_loss(-(t * 2 - 1) * 6, t)
    assert float(good) < 0.1 < float(bad)


def test_train_resume_export_and_evaluate(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = {"image_size": 32, "batch_size": 3, "seed": 1, "threads": 1, "arch_kwargs": KW}
    pt = train_segmentation(tiny_data, "lite_unet", out, epochs=1, resume=False, **common)
    assert pt == out / "segmentation.pt" and pt.is_file()
    assert (out / "checkpoint.pt").is_file() and (out / "training_curve.png").is_file()
    pt = train_segmentation(tiny_data, "lite_unet", out, epochs=2, resume=True, **common)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    bundle = load_model_bundle(out, "segmentation")
    assert bundle.manifest.input_size == (32, 32)
    assert bundle.manifest.arch == "lite_unet"
    # the export is the best epoch's EMA weights, and says so
    best = max(history, key=lambda h: h["val"]["dice"])
    assert bundle.manifest.extra["selected_epoch"] == best["epoch"]
    assert bundle.manifest.extra["val_metrics_during_training"]["dice"] == pytest.approx(best["val"]["dice"])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    for k, v in bundle.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, ck["best_state"][k].float(), atol=1e-2), k  # fp16 export of the best state
    doc = evaluate_segmentation(tiny_data, "val", out, tmp_path / "eval")
    assert doc["n_images"] == 2
    assert set(doc["mean"]) >= {"dice", "jaccard", "thresholded_jaccard", "sensitivity", "specificity"}
    assert (tmp_path / "eval" / "segmentation_metrics.json").is_file()
    assert (tmp_path / "eval" / "dice_histogram.png").is_file()


def test_extra_training_data_and_warm_start(tiny_data: Path, tmp_path: Path) -> None:
    common = {"image_size": 32, "batch_size": 3, "seed": 1, "threads": 1, "arch_kwargs": KW}
    first = tmp_path / "first"
    train_segmentation(tiny_data, "lite_unet", first, epochs=1, resume=False, **common)
    # a second folder of 48x48 images (another size) whose train rows join the training set
    extra = tmp_path / "extra"
    (extra / "images").mkdir(parents=True)
    (extra / "masks").mkdir()
    with open(extra / "labels.csv", "w", newline="") as fh:
        fh.write("image_id,split\n")
        for i in range(4):
            img = np.full((48, 48, 3), (140, 160, 214), np.uint8)
            mask = np.zeros((48, 48), np.uint8)
            cv2.circle(mask, (24, 24), 8 + i, 255, -1)
            img[mask > 0] = (50, 72, 120)
            cv2.imwrite(str(extra / "images" / f"X_{i}.jpg"), img)
            cv2.imwrite(str(extra / "masks" / f"X_{i}.png"), mask)
            fh.write(f"X_{i},{'train' if i < 3 else 'val'}\n")
    second = tmp_path / "second"
    train_segmentation(
        tiny_data, "lite_unet", second, epochs=1, resume=False, extra_train_dirs=[extra], init_from=first, **common
    )
    manifest = json.loads((second / "segmentation.json").read_text())
    expected = "data train split (6 images) + 3 images from extra; fine-tuned from first"
    assert manifest["extra"]["training_data"] == expected
    with pytest.raises(ModelError, match="differs"):
        train_segmentation(
            tiny_data, "lite_unet", tmp_path / "third", epochs=1, resume=False, init_from=first,
            **{**common, "arch_kwargs": {"widths": [4, 4, 8, 8, 16]}},
        )


def test_warm_start_begins_from_the_given_weights(tiny_data: Path, tmp_path: Path) -> None:
    import torch

    common = {"image_size": 32, "batch_size": 3, "seed": 1, "threads": 1, "arch_kwargs": KW}
    first = tmp_path / "first"
    train_segmentation(tiny_data, "lite_unet", first, epochs=1, resume=False, **common)
    start = load_model_bundle(first, "segmentation").module.state_dict()
    # lr 0: the weights cannot move, so the exported network is the starting one (BatchNorm statistics aside)
    second = tmp_path / "second"
    train_segmentation(tiny_data, "lite_unet", second, epochs=1, resume=False, init_from=first, lr=0.0, **common)
    after = load_model_bundle(second, "segmentation").module.state_dict()
    weights = [k for k in start if k.endswith("weight") and start[k].ndim == 4]
    assert weights and all(torch.equal(start[k], after[k]) for k in weights)
