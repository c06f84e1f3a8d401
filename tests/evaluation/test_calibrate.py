"""Calibration documents: refitted temperature, cut-offs for the stated miss rate, read back by the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermnode.errors import ModelError
from dermnode.evaluation.bands import TooFewCasesError
from dermnode.evaluation.calibrate import calibration_document
from dermnode.inference.calibration import load_calibration
from dermnode.vocabulary import Band, ModelIdentity

MODEL = {"name": "classifier", "version": "9.9.9", "sha256": "ab" * 32}


def _overconfident(n_mel: int, n_other: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(1.0, 1.0, n_mel), rng.normal(-1.0, 1.0, n_other)])
    y = np.concatenate([np.ones(n_mel, int), np.zeros(n_other, int)])
    return 1 / (1 + np.exp(-3.0 * z)), y  # logits three times too large


def test_document_refits_temperature_and_reads_back(tmp_path: Path) -> None:
    p, y = _overconfident(120, 480)
    doc = calibration_document(p, y, MODEL, name="clinic A", data={"folder": "x"})
    # the true log-likelihood ratio of N(+1, 1) vs N(-1, 1) is 2 z: the factor that undoes 3 z is about 2 / 3
    assert doc["temperature_factor"] == pytest.approx(2 / 3, rel=0.2)
    z = np.log(p / (1 - p))

    def nll(factor: float) -> float:
        q = 1 / (1 + np.exp(-z * factor))
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    best = nll(doc["temperature_factor"])
    assert best < nll(1.0) and all(best <= nll(f) + 1e-4 for f in np.linspace(0.2, 2.0, 37))
    assert doc["missed_melanomas"] == 2  # floor(2 % of 120)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    cal = load_calibration(path, ModelIdentity(**MODEL))
    assert cal.band(cal.benign_below - 1e-9) is Band.BENIGN
    assert cal.band(cal.malignant_above + 1e-9) is Band.MALIGNANT
    assert cal.band((cal.benign_below + cal.malignant_above) / 2) is Band.INDETERMINATE
    assert "1 in 60 melanomas (2 of 120)" in cal.meaning(Band.BENIGN)
    assert "clinic A" in cal.meaning(Band.MALIGNANT) and len(cal.sha256) == 64


def test_too_few_melanomas_refused() -> None:
    p, y = _overconfident(30, 300)
    with pytest.raises(TooFewCasesError, match="at least 50"):
        calibration_document(p, y, MODEL, name="small", data={})


def test_calibration_for_another_model_or_broken_file_is_refused(tmp_path: Path) -> None:
    p, y = _overconfident(60, 200)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibration_document(p, y, MODEL, name="x", data={})))
    with pytest.raises(ModelError, match="recalibrate"):
        load_calibration(path, ModelIdentity(name="classifier", version="1.0.0", sha256="cd" * 32))
    doc = json.loads(path.read_text())
    doc["cutoffs"]["benign_below"] = 0.9
    doc["cutoffs"]["malignant_above"] = 0.1
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="invalid"):
        load_calibration(path)
    path.write_text("{}")
    with pytest.raises(ModelError, match="not a dermnode-band-calibration/1"):
        load_calibration(path)
    with pytest.raises(ModelError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")
