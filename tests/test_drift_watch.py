"""Drift watch in the service (issue 17 item 4): finished jobs feed one watch per process, keyed by the calling AE
title, and /metrics raises the flag for a device whose band mix shifts, not for one that keeps the calibration's.

The analysis itself is replaced by synthetic results (200 real analyses per device would take minutes); the job
processor, the job's calling AE title, the watch and the /metrics text are the service's own.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from dermnode import pipeline
from dermnode.drift import BANDS
from dermnode.inference.calibration import BandCalibration, load_calibration
from dermnode.metrics import StageMetrics, render_metrics
from dermnode.pipeline import JobProcessor
from dermnode.settings import DeliverySettings, Settings, StorageSettings
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    Band,
    Classification,
    ModelIdentity,
    QualityReport,
    SourceImage,
)
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import Job, JobQueue
from dermnode.workqueue.outbox import Outbox

MODEL = ModelIdentity("classifier", "2.0.0", "c" * 64)
EXPECTED = (0.45, 0.45, 0.10)  # benign, indeterminate, malignant on the calibration data


def _calibration(tmp_path: Path) -> BandCalibration:
    n = 1000
    bands = {
        b.value: {"n": round(f * n), "n_melanoma": 1, "fraction_of_lesions": f, "melanoma_rate": 0.1,
                  "fraction_of_melanomas": 0.3}
        for b, f in zip(BANDS, EXPECTED, strict=True)
    }
    doc = {
        "format": "dermnode-band-calibration/1", "name": "site A", "created": "2026-12-02T12:00:00+00:00",
        "model": MODEL.to_json(), "temperature_factor": 1.0, "max_miss": 0.02, "min_specificity": 0.95,
        "cutoffs": {"benign_below": 0.1, "malignant_above": 0.7}, "n_melanoma": 100, "n_other": 900,
        "missed_melanomas": 2, "miss_rate_upper95": 0.06, "bands": bands,
    }
    path = tmp_path / "site.calibration.json"
    path.write_text(json.dumps(doc))
    return load_calibration(path, MODEL)


def _result(i: int, band: Band | None) -> AnalysisResult:
    source = SourceImage(np.zeros((4, 4, 3), np.uint8), f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.77.1.7", "1.2.3",
                         "1.2.3.9", None)
    if band is None:
        return AnalysisResult(source, AnalysisStatus.NOT_ANALYSABLE, "blurred", (MODEL,), QualityReport(False, "x"))
    p = {Band.BENIGN: 0.05, Band.INDETERMINATE: 0.4, Band.MALIGNANT: 0.9}[band]
    return AnalysisResult(source, AnalysisStatus.ANALYSED, None, (MODEL,), QualityReport(True, None),
                          classification=Classification(p, band, {"MEL": p, "NV": 1 - p}))


class _Service:
    """A job processor as the service builds it, whose analysis returns the next queued synthetic result."""

    def __init__(self, tmp_path: Path, calibration: BandCalibration | None, monkeypatch: pytest.MonkeyPatch) -> None:
        settings = Settings(storage=StorageSettings(root=str(tmp_path / "var")))
        db = database_path(settings.storage_root)
        self.queue, self.outbox = JobQueue(db), Outbox(db, DeliverySettings())
        self.stages = StageMetrics()
        analyzer: Any = SimpleNamespace(classifier=SimpleNamespace(calibration=calibration), models=(MODEL,))
        self.processor = JobProcessor(settings, analyzer, self.outbox, self.stages)
        self.next: list[AnalysisResult] = []
        no_outputs = SimpleNamespace(dicom_objects=[], fhir_bundle=None)
        monkeypatch.setattr(pipeline, "read_dataset", lambda path: None)
        monkeypatch.setattr(pipeline, "analyse_dataset", lambda *a, **k: (self.next.pop(), no_outputs))
        self.n = 0

    def finish(self, calling_aet: str, band: Band | None) -> None:
        self.n += 1
        self.next.append(_result(self.n, band))
        job = Job(self.n, f"1.2.3.{self.n}", "1.2.840.10008.5.1.4.1.1.77.1.7", "1.2.3", Path("x.dcm"), calling_aet, 0)
        self.processor(job)

    def metrics(self) -> dict[str, float]:
        text = render_metrics(self.queue, self.outbox, self.stages)
        return {m[1]: float(m[2]) for m in re.finditer(r"^(dermnode_(?:drift|band)\w*(?:\{[^}]*\})?) (\S+)$", text,
                                                       re.MULTILINE)}


def _stream(fractions: tuple[float, float, float], n: int, seed: int) -> list[Band]:
    rng = np.random.default_rng(seed)
    return [BANDS[i] for i in rng.choice(3, size=n, p=fractions)]


def test_a_shifted_device_raises_the_flag_and_an_unshifted_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    service = _Service(tmp_path, _calibration(tmp_path), monkeypatch)
    caplog.set_level(logging.INFO)
    for old, new in zip(_stream(EXPECTED, 200, seed=1), _stream((0.10, 0.55, 0.35), 200, seed=2), strict=True):
        service.finish("SCOPE_OLD", old)
        service.finish("SCOPE_NEW", new)
    m = service.metrics()
    assert m['dermnode_drift_flag{device="SCOPE_NEW"}'] == 1
    assert m['dermnode_drift_flag{device="SCOPE_OLD"}'] == 0
    assert m['dermnode_drift_p_value{device="SCOPE_NEW"}'] < 1e-6
    assert m['dermnode_drift_p_value{device="SCOPE_OLD"}'] > 0.001
    assert m['dermnode_drift_window_results{device="SCOPE_NEW"}'] == 200
    assert m['dermnode_band_fraction{device="SCOPE_NEW",band="malignant"}'] > 0.25
    assert m['dermnode_band_fraction{device="SCOPE_OLD",band="malignant"}'] < 0.2
    assert m['dermnode_band_expected_fraction{band="benign"}'] == pytest.approx(0.45)
    assert 0.4 < m['dermnode_drift_mean_melanoma_probability{device="SCOPE_NEW"}'] < 0.6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "dermnode.drift"]
    assert len(warnings) == 1 and "SCOPE_NEW" in warnings[0], warnings


def test_only_classified_results_count_and_a_missing_calling_aet_is_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _Service(tmp_path, _calibration(tmp_path), monkeypatch)
    for band in (Band.BENIGN, None, Band.MALIGNANT):
        service.finish("", band)
    service.finish('A"B', Band.BENIGN)
    m = service.metrics()
    assert m['dermnode_drift_window_results{device="(unknown)"}'] == 2  # the not-analysable image has no band
    assert m['dermnode_drift_flag{device="(unknown)"}'] == 0  # too few results to judge
    assert m['dermnode_drift_window_results{device="A\\"B"}'] == 1  # label value escaped


def test_without_a_calibration_there_is_no_drift_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _Service(tmp_path, None, monkeypatch)
    service.finish("SCOPE", Band.MALIGNANT)
    assert service.processor.drift is None and service.stages.drift is None
    assert service.metrics() == {}
