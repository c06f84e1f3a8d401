"""``dermnode calibrate`` (issue 17 item 3) and the ``dermnode train`` flags that reach the training functions."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from dermnode import cli
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    Band,
    Classification,
    ModelIdentity,
    QualityReport,
    SourceImage,
)
from synthetic import synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DERMNODE_ANALYSIS__MODELS_DIR") or REPO / "models")
needs_models = pytest.mark.skipif(
    not (MODELS / "segmentation.json").is_file() or not (MODELS / "classifier.json").is_file(),
    reason="shipped models not found",
)


def dermnode(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dermnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _small_clinic(root: Path, n: int = 10) -> Path:
    """``n`` synthetic photographs with labels.csv (no split column), 3 of them melanomas."""
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "diagnosis"])
        writer.writeheader()
        for i in range(n):
            image_id = f"IMG_{i:02d}"
            rgb = synthetic_dermoscopy(240, 320, seed=i)
            cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            writer.writerow({"image_id": image_id, "diagnosis": "MEL" if i % 3 == 0 and i < 9 else "NV"})
    return root


class _Scorer:
    """The analyser with its networks replaced: every photograph is analysed, the melanoma probability is the
    image's mean red fraction (the folder, labels.csv, decoding, per_image.csv and the cut-off rule stay real)."""

    models = (ModelIdentity("segmentation", "0", "0" * 64), ModelIdentity("classifier", "0", "1" * 64))
    classifier = SimpleNamespace(calibration=None)

    def __init__(self, settings: Any) -> None:
        assert settings.calibration == "none"  # calibrate fits on the raw probabilities

    def analyze(self, source: SourceImage) -> AnalysisResult:
        rgb = source.rgb.astype(float)
        p = float(np.clip(rgb[..., 0].mean() / (rgb.sum(axis=-1).mean() + 1e-6), 0.01, 0.99))
        band = Band.BENIGN if p < 0.15 else Band.MALIGNANT if p > 0.85 else Band.INDETERMINATE
        return AnalysisResult(source, AnalysisStatus.ANALYSED, None, self.models, QualityReport(True, None),
                              classification=Classification(p, band, {"MEL": p, "NV": 1 - p}))


def test_calibrate_on_too_few_cases_says_how_many_melanomas_are_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dermnode.evaluation import pipeline

    monkeypatch.setattr(pipeline, "Analyzer", _Scorer)
    data = _small_clinic(tmp_path / "clinic")
    out = tmp_path / "site.calibration.json"
    rc = cli.main(["calibrate", "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("dermnode: error:")]
    assert len(errors) == 1, err
    assert "3 melanomas cannot support a miss rate of 2.0%: at least 50 are needed" in errors[0]
    assert "split all" in errors[0]  # no split column: every row
    assert not out.exists()


@needs_models
def test_calibrate_with_the_shipped_models_refuses_without_a_traceback(tmp_path: Path) -> None:
    """The real command in its own process: ten photographs never support a calibration."""
    data = _small_clinic(tmp_path / "clinic")
    res = dermnode("calibrate", "--data", str(data), "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dermnode: error:")]
    # "N melanomas ... at least 50 are needed", or nothing to fit on when the segmenter finds no lesion in the
    # synthetic photographs
    assert len(errors) == 1 and ("at least 50 are needed" in errors[0] or "nothing to measure" in errors[0])


def test_calibrate_refuses_a_missing_folder(tmp_path: Path) -> None:
    res = dermnode("calibrate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_calibrate_prints_cutoffs_bands_and_how_to_use_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dermnode.evaluation import calibrate as calibrate_module

    seen: dict[str, Any] = {}

    def fake(data_dir: Path, split: str, settings: Any, out_file: Path, **kwargs: Any) -> dict[str, Any]:
        seen.update(data_dir=data_dir, split=split, settings=settings, out_file=out_file, **kwargs)
        bands = {b: {"n": 10, "n_melanoma": 1, "fraction_of_lesions": f, "melanoma_rate": r,
                     "fraction_of_melanomas": 0.1}
                 for b, f, r in (("benign", 0.45, 0.004), ("indeterminate", 0.4, 0.2), ("malignant", 0.15, 0.6))}
        return {"name": "clinic A", "n_melanoma": 120, "n_other": 400, "temperature_factor": 0.8,
                "cutoffs": {"benign_below": 0.0412, "malignant_above": 0.7, "benign_below_ci": [0.03, 0.05],
                            "malignant_above_ci": [0.6, 0.8]},
                "missed_melanomas": 2, "miss_rate": 2 / 120, "miss_rate_upper95": 0.052, "max_miss": 0.02,
                "specificity": 0.951, "bands": bands}

    monkeypatch.setattr(calibrate_module, "calibrate", fake)
    (tmp_path / "clinic").mkdir()
    out = tmp_path / "site.json"
    rc = cli.main(["calibrate", "--data", str(tmp_path / "clinic"), "--out", str(out), "--name", "clinic A",
                   "--max-miss", "0.01", "--split", "all"])
    text = capsys.readouterr().out
    assert rc == 0
    assert seen["split"] == "all" and seen["name"] == "clinic A" and seen["max_miss"] == 0.01
    assert seen["min_specificity"] == 0.95 and seen["out_file"] == out
    assert "0.0412" in text and "95 % CI 0.0300-0.0500" in text and "95 % CI 0.6000-0.8000" in text
    assert "2 of 120" in text and "upper bound 5.2%" in text
    assert "indeterminate" in text and "40.0%" in text and "60.0%" in text
    assert f'analysis.calibration = "{out.resolve()}"' in text


def test_cli_defaults_agree_with_the_band_rule() -> None:
    from dermnode.evaluation.bands import DEFAULT_MAX_MISS, DEFAULT_MIN_SPECIFICITY

    assert (cli.DEFAULT_MAX_MISS, cli.DEFAULT_MIN_SPECIFICITY) == (DEFAULT_MAX_MISS, DEFAULT_MIN_SPECIFICITY)


# --- dermnode train ----------------------------------------------------------------------------------------------
def _capture(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> dict[str, Any]:
    import importlib

    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Path:
        seen.update(args=args, **kwargs)
        return Path("exported.json")

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen


def test_train_segmentation_flags_reach_the_training_function(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = _capture(monkeypatch, "dermnode.training.segmentation", "train_segmentation")
    rc = cli.main(["train", "segmentation", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch",
                   "smp_unet", "--frame", "192", "256", "--no-pretrained", "--lr", "1e-3", "--time-budget", "600",
                   "--version", "2.1.0"])
    assert rc == 0
    assert seen["frame"] == (192, 256) and seen["pretrained"] is False and seen["lr"] == 1e-3
    assert seen["time_budget_s"] == 600 and seen["version"] == "2.1.0" and seen["args"][1] == "smp_unet"

    seen = _capture(monkeypatch, "dermnode.training.segmentation", "train_segmentation")
    assert cli.main(["train", "segmentation", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert seen["frame"] is None and seen["pretrained"] is True and seen["time_budget_s"] is None
    assert "lr" not in seen and "version" not in seen  # the function's own defaults


def test_train_classification_flags_reach_the_training_function(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _capture(monkeypatch, "dermnode.training.classification", "train_classification")
    rc = cli.main(["train", "classification", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch",
                   "tf_efficientnet_lite0", "--no-pretrained", "--no-tta", "--lr", "5e-4", "--version", "2.0.0"])
    assert rc == 0
    assert seen["pretrained"] is False and seen["tta"] is False and seen["lr"] == 5e-4 and seen["version"] == "2.0.0"

    seen = _capture(monkeypatch, "dermnode.training.classification", "train_classification")
    assert cli.main(["train", "classification", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch",
                     "dermnet-xs"]) == 0
    assert seen["pretrained"] is True and seen["tta"] is True and "lr" not in seen and "version" not in seen


def test_train_classification_refuses_segmentation_only_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _capture(monkeypatch, "dermnode.training.classification", "train_classification")
    rc = cli.main(["train", "classification", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch",
                   "dermnet-xs", "--frame", "192", "256"])
    assert rc == 2 and not seen
    assert "--frame" in capsys.readouterr().err
