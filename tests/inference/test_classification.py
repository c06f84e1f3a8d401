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


def test_shipped_classifier_ranks_melanomas_above_benign_lesions() -> None:
    """The shipped weights, not just valid numbers: on ISIC 2017 val lesions (ground-truth masks) the melanomas
    get a clearly higher mean probability than the benign lesions, which the diagnosis head mostly calls benign."""
    import csv

    import cv2

    from synthetic import data_root

    models = REPO / "models"
    data = data_root() / "isic2017"
    if not (models / "classifier.json").is_file():
        pytest.skip("no shipped classifier in models/")
    if not (data / "labels.csv").is_file():
        pytest.skip(f"shared data not found at {data}")
    with open(data / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    mel = [r for r in rows if r["melanoma_isic2017"] == "1"][:12]
    nv = [r for r in rows if r["melanoma_isic2017"] == "0"][:12]
    clf = Classifier(models)

    def probs(group: list[dict[str, str]]) -> list[tuple[float, str]]:
        out = []
        for r in group:
            rgb = cv2.cvtColor(cv2.imread(str(data / "images" / f"{r['image_id']}.jpg")), cv2.COLOR_BGR2RGB)
            mask = cv2.imread(str(data / "masks" / f"{r['image_id']}.png"), cv2.IMREAD_GRAYSCALE) > 127
            c = clf.classify(rgb, mask)
            out.append((c.melanoma_probability, c.top_diagnosis))
        return out

    p_mel, p_nv = probs(mel), probs(nv)
    assert len(p_mel) == len(p_nv) == 12
    assert np.mean([p for p, _ in p_mel]) > np.mean([p for p, _ in p_nv]) + 0.1
    assert sum(top in ("NV", "BKL", "SK", "DF", "VASC") for _, top in p_nv) >= 8


def test_ensemble_bundle_roundtrip(tmp_path: Path) -> None:
    from dermnode.inference.classifier_models import DermNetEnsemble
    from dermnode.inference.networks import TorchNetwork

    torch.manual_seed(1)
    ens = DermNetEnsemble(["dermnet-xs", "dermnet-xs"]).eval()
    save_classifier(ens, tmp_path, input_size=64, temperatures=(1.0, 1.0), version="0.0.1")
    clf = Classifier(tmp_path)
    assert isinstance(clf.network, TorchNetwork) and isinstance(clf.network.module, DermNetEnsemble)  # no .onnx
    assert clf.runtime.startswith("torch ")
    rgb, mask = _lesion()
    x = torch.randn(2, 3, 64, 64)
    mel, diag = ens(x)
    m0, d0 = ens.members[0](x)
    m1, d1 = ens.members[1](x)
    assert torch.allclose(mel, (m0 + m1) / 2, atol=1e-5) and torch.allclose(diag, (d0 + d1) / 2, atol=1e-5)
    c = clf.classify(rgb, mask)
    assert sum(c.diagnosis_probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def _calibration_doc(model: dict[str, str], benign: float, malignant: float, factor: float) -> dict[str, object]:
    facts = {"n": 10, "n_melanoma": 1, "fraction_of_lesions": 0.1, "melanoma_rate": 0.1, "fraction_of_melanomas": 0.02}
    return {
        "format": "dermnode-band-calibration/1", "name": "test site", "created": "2026-12-02T00:00:00+00:00",
        "model": model, "temperature_factor": factor, "max_miss": 0.02, "min_specificity": 0.95,
        "cutoffs": {"benign_below": benign, "malignant_above": malignant}, "n_melanoma": 50, "n_other": 200,
        "missed_melanomas": 1, "miss_rate_upper95": 0.1,
        "bands": {"benign": facts, "indeterminate": facts, "malignant": facts},
    }


def test_band_calibration_beside_the_model_sets_cutoffs_temperature_and_meaning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_net = DermNet("dermnet-xs").eval()
    with torch.no_grad():
        model_net.melanoma_head.bias.fill_(2.0)  # a clearly non-zero logit, so the temperature factor shows
    save_classifier(model_net, tmp_path, variant="dermnet-xs", input_size=64, temperatures=(1.5, 2.0), version="0.0.1")
    tiny_bundle = tmp_path
    rgb, mask = _lesion()
    plain = Classifier(tiny_bundle)
    z, _ = plain.logits(rgb, mask)
    p_plain = plain.classify(rgb, mask).melanoma_probability
    ident = plain.identity
    model = {"name": ident.name, "version": ident.version, "sha256": ident.sha256}
    # cut-offs placed around the refitted probability: the band must follow the file, not the settings
    p_cal = float(1 / (1 + np.exp(-z / 1.5 * 0.5)))
    doc = _calibration_doc(model, benign=min(p_cal + 0.01, 1.0), malignant=min(p_cal + 0.02, 1.0), factor=0.5)
    (tiny_bundle / "classifier.calibration.json").write_text(json.dumps(doc))
    c = Classifier(tiny_bundle).classify(rgb, mask)
    assert c.melanoma_probability == pytest.approx(p_cal, rel=1e-6)
    assert abs(p_cal - p_plain) > 0.05
    assert c.band is Band.BENIGN
    assert c.band_meaning.startswith("Low suspicion") and "1 in 50 melanomas" in c.band_meaning
    assert c.calibration.startswith("test site (2026-12-02")
    # "none" ignores the file
    off = Classifier(tiny_bundle, AnalysisSettings(calibration="none")).classify(rgb, mask)
    assert off.melanoma_probability == pytest.approx(p_plain) and off.band_meaning == "" and off.calibration == ""
    # a calibration made for another classifier stops the start
    doc["model"] = {**model, "sha256": "0" * 64}
    other = tiny_bundle / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="recalibrate"):
        Classifier(tiny_bundle, AnalysisSettings(calibration=str(other)))
