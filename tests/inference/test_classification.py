"""Classifier: bundle verification, valid calibrated outputs, band thresholds, shared crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dermnode.errors import ModelError
from dermnode.inference.classification import Classifier, band_for
from dermnode.inference.classifier_models import (
    DIAGNOSIS_CLASSES,
    DermNet,
    lesion_crop_box,
    save_classifier,
    warp_crop,
)
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import Band
from synthetic import synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = DermNet("dermnet-xs").eval()
    save_classifier(model, tmp_path, variant="dermnet-xs", input_size=64, temperatures=(1.5, 2.0), version="0.0.1")
    return tmp_path


def _lesion() -> tuple[np.ndarray, np.ndarray]:
    rgb = synthetic_dermoscopy(300, 400)
    yy, xx = np.mgrid[0:300, 0:400]
    mask = ((yy - 150) / (300 * 0.22)) ** 2 + ((xx - 200) / (400 * 0.18)) ** 2 <= 1.0
    return rgb, mask


def test_band_thresholds() -> None:
    s = AnalysisSettings()
    assert band_for(0.0, s) is Band.BENIGN
    assert band_for(0.1499, s) is Band.BENIGN
    assert band_for(0.15, s) is Band.INDETERMINATE
    assert band_for(0.5, s) is Band.INDETERMINATE
    assert band_for(0.85, s) is Band.INDETERMINATE
    assert band_for(0.8501, s) is Band.MALIGNANT
    custom = AnalysisSettings(band_benign_below=0.3, band_malignant_above=0.6)
    assert band_for(0.2, custom) is Band.BENIGN and band_for(0.7, custom) is Band.MALIGNANT


def test_classify_outputs_valid_probabilities(tiny_bundle: Path) -> None:
    clf = Classifier(tiny_bundle)
    rgb, mask = _lesion()
    c = clf.classify(rgb, mask)
    assert 0.0 <= c.melanoma_probability <= 1.0
    assert set(c.diagnosis_probabilities) == set(DIAGNOSIS_CLASSES)
    assert sum(c.diagnosis_probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in c.diagnosis_probabilities.values())
    assert c.band is band_for(c.melanoma_probability, AnalysisSettings())
    assert c.top_diagnosis in DIAGNOSIS_CLASSES
    assert clf.identity.name == "classifier" and len(clf.identity.sha256) == 64
    # the temperature is applied: p = sigmoid(z / T)
    z, _ = clf.logits(rgb, mask)
    assert c.melanoma_probability == pytest.approx(1 / (1 + np.exp(-z / 1.5)), rel=1e-6)
    # a missing mask falls back to the centred square
    assert 0.0 <= clf.classify(rgb, None).melanoma_probability <= 1.0


def test_band_follows_settings(tiny_bundle: Path) -> None:
    rgb, mask = _lesion()
    p = Classifier(tiny_bundle).classify(rgb, mask).melanoma_probability
    always_malignant = AnalysisSettings(band_benign_below=0.0, band_malignant_above=0.0)
    if p > 0.0:
        assert Classifier(tiny_bundle, always_malignant).classify(rgb, mask).band is Band.MALIGNANT
    always_benign = AnalysisSettings(band_benign_below=1.0, band_malignant_above=1.0)
    assert Classifier(tiny_bundle, always_benign).classify(rgb, mask).band is Band.BENIGN


def test_corrupt_or_missing_bundle_raises(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(ModelError):
        Classifier(tmp_path_factory.mktemp("empty"))
    pt = tiny_bundle / "classifier.pt"
    data = bytearray(pt.read_bytes())
    data[-10] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        Classifier(tiny_bundle)


def test_invalid_temperature_raises(tiny_bundle: Path) -> None:
    js = tiny_bundle / "classifier.json"
    man = json.loads(js.read_text())
    man["extra"]["temperatures"]["melanoma"] = 0.0
    js.write_text(json.dumps(man))
    with pytest.raises(ModelError):
        Classifier(tiny_bundle)


def test_crop_box_is_square_with_margin() -> None:
    mask = np.zeros((300, 400), bool)
    mask[100:200, 150:210] = True  # 100 x 60 box
    cx, cy, side = lesion_crop_box(mask, mask.shape, 0.2)
    assert side == pytest.approx(100 * 1.4)
    assert (cx, cy) == pytest.approx((179.5, 149.5))
    crop = warp_crop(np.zeros((300, 400, 3), np.uint8), (cx, cy, side), 64)
    assert crop.shape == (64, 64, 3)
    # box partly outside the image is padded, not an error
    assert warp_crop(np.zeros((300, 400, 3), np.uint8), (5.0, 5.0, 100.0), 32).shape == (32, 32, 3)


def test_shipped_classifier_if_present() -> None:
    models = REPO / "models"
    if not (models / "classifier.json").is_file():
        pytest.skip("no shipped classifier in models/")
    clf = Classifier(models)
    rgb, mask = _lesion()
    c = clf.classify(rgb, mask)
    assert sum(c.diagnosis_probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= c.melanoma_probability <= 1.0


def test_ensemble_bundle_roundtrip(tmp_path: Path) -> None:
    from dermnode.inference.classifier_models import DermNetEnsemble

    torch.manual_seed(1)
    ens = DermNetEnsemble(["dermnet-xs", "dermnet-xs"]).eval()
    save_classifier(ens, tmp_path, input_size=64, temperatures=(1.0, 1.0), version="0.0.1")
    clf = Classifier(tmp_path)
    assert isinstance(clf.bundle.model, DermNetEnsemble)
    rgb, mask = _lesion()
    x = torch.randn(2, 3, 64, 64)
    mel, diag = ens(x)
    m0, d0 = ens.members[0](x)
    m1, d1 = ens.members[1](x)
    assert torch.allclose(mel, (m0 + m1) / 2, atol=1e-5) and torch.allclose(diag, (d0 + d1) / 2, atol=1e-5)
    c = clf.classify(rgb, mask)
    assert sum(c.diagnosis_probabilities.values()) == pytest.approx(1.0, abs=1e-6)
