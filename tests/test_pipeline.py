"""The pipeline's output step and job processor: what is written and queued for one received instance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydicom
import pytest

from dermnode.dicom_io.uids import content_digest
from dermnode.dicom_io.wrap import WrapOptions, synthetic_dermoscopy, wrap_rgb
from dermnode.inference.analyzer import Analyzer
from dermnode.pipeline import JobProcessor, analyse_dataset
from dermnode.settings import PacsDestination, Settings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Outbox


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(Settings().analysis)


def _source(path: Path, patient_id: str) -> pydicom.Dataset:
    ds = wrap_rgb(synthetic_dermoscopy(240, 320), WrapOptions(patient_id=patient_id, pixel_spacing_mm=0.05))
    ds.save_as(path, enforce_file_format=True)
    return ds


def _settings(tmp_path: Path, **analysis: object) -> Settings:
    s = Settings()
    return dataclasses.replace(
        s,
        storage=dataclasses.replace(s.storage, root=str(tmp_path / "var"), fsync=False),
        analysis=dataclasses.replace(s.analysis, **analysis),
        pacs=(PacsDestination(name="main"),),
        fhir=dataclasses.replace(
            s.fhir, base_url="http://127.0.0.1:9/fhir", patient_identifier_system="http://hospital.example/mrn"
        ),
    )


def _process(tmp_path: Path, settings: Settings, analyzer: Analyzer, ds: pydicom.Dataset, path: Path) -> list[str]:
    """Run the job processor on ``path`` and return the kinds of the deliveries it queued."""
    root = settings.storage_root
    root.mkdir(parents=True, exist_ok=True)
    queue = JobQueue(database_path(root))
    outbox = Outbox(database_path(root), settings.delivery)
    assert queue.enqueue(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
    job = queue.claim("test")
    assert job is not None
    assert JobProcessor(settings, analyzer, outbox)(job) == "analysed"
    return sorted(f"{row['kind']}:{row['destination']}" for row in outbox.for_job(job.id))


def test_source_without_patient_id_still_reaches_the_pacs(tmp_path: Path, analyzer: Analyzer) -> None:
    """Patient ID is Type 2 (may be empty): SEG and SR are written and queued; no FHIR report without a subject."""
    src = tmp_path / "anonymous.dcm"
    ds = _source(src, patient_id="")
    settings = _settings(tmp_path)
    queued = _process(tmp_path, settings, analyzer, ds, src)
    assert queued == ["dicom:pacs:main", "dicom:pacs:main"]  # SEG and SR, no FHIR delivery

    out = settings.storage_root / "results" / str(ds.SOPInstanceUID)
    assert (out / "seg.dcm").is_file() and (out / "sr.dcm").is_file()
    assert not (out / "diagnostic-report.json").exists()
    doc = json.loads((out / "result.json").read_text())
    assert doc["outputs"]["fhir_bundle"] is None
    assert "no Patient ID" in doc["outputs"]["fhir_bundle_reason"]


def test_source_with_patient_id_queues_every_delivery(tmp_path: Path, analyzer: Analyzer) -> None:
    src = tmp_path / "named.dcm"
    ds = _source(src, patient_id="MRN123")
    settings = _settings(tmp_path)
    assert _process(tmp_path, settings, analyzer, ds, src) == ["dicom:pacs:main", "dicom:pacs:main", "fhir:fhir"]
    doc = json.loads((settings.storage_root / "results" / str(ds.SOPInstanceUID) / "result.json").read_text())
    assert doc["outputs"]["fhir_bundle"] == "diagnostic-report.json"
    assert "fhir_bundle_reason" not in doc["outputs"]


def test_output_uids_follow_the_settings_that_shape_the_content(tmp_path: Path, analyzer: Analyzer) -> None:
    """Re-running with other analysis settings must give new SEG/SR UIDs; the same settings the same UIDs."""
    ds = _source(tmp_path / "s.dcm", patient_id="MRN1")
    base = _settings(tmp_path)
    runs = {
        "a": base,
        "a-again": base,
        "blackhat": _settings(tmp_path, hair_removal="blackhat"),
        "bands": _settings(tmp_path, band_benign_below=0.2),
        "threads": _settings(tmp_path, torch_threads=2),  # cannot change the content
    }
    uids = {}
    for name, settings in runs.items():
        _, files = analyse_dataset(ds, analyzer, settings, tmp_path / name)
        uids[name] = (files.seg_sop_instance_uid, files.sr_sop_instance_uid)
    assert uids["a"] == uids["a-again"] == uids["threads"]
    assert uids["blackhat"][0] != uids["a"][0] and uids["blackhat"][1] != uids["a"][1]
    assert uids["bands"][1] != uids["a"][1]
    assert content_digest(base.analysis, base.output) != content_digest(
        runs["bands"].analysis, runs["bands"].output
    )
