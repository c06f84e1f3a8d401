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
    assert queued == ["dicom:pacs:main"] * 3  # SEG, presentation state and SR, no FHIR delivery

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
    assert _process(tmp_path, settings, analyzer, ds, src) == ["dicom:pacs:main"] * 3 + ["fhir:fhir"]
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


def _truncated_jpeg_source(path: Path, patient_id: str = "MRN5") -> pydicom.Dataset:
    """A JPEG Baseline instance whose compressed frame is cut in half (no end-of-image marker)."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = wrap_rgb(synthetic_dermoscopy(240, 320), WrapOptions(patient_id=patient_id, jpeg=True))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_undecodable_image_is_reported_not_analysable_and_dead_lettered(tmp_path: Path, analyzer: Analyzer) -> None:
    """Issue 16 item 5: acknowledged, then undecodable: the PACS and the EHR get a "not analysable: image data could
    not be decoded" SR and FHIR report (and the overlay says so); the job stays dead-lettered for the administrator."""
    from dermnode.workqueue.workers import run_job

    src = tmp_path / "trunc.dcm"
    ds = _truncated_jpeg_source(src)
    settings = _settings(tmp_path)
    root = settings.storage_root
    root.mkdir(parents=True)
    queue = JobQueue(database_path(root))
    outbox = Outbox(database_path(root), settings.delivery)
    assert queue.enqueue(str(ds.SOPInstanceUID), str(ds.SOPClassUID), src)
    job = queue.claim("test")
    assert job is not None
    assert run_job(queue, job, JobProcessor(settings, analyzer, outbox))
    assert queue.get(str(ds.SOPInstanceUID))["state"] == "dead"
    (dead,) = queue.dead_letters()
    assert "could not be decoded" in dead["error"] and "truncated" in dead["error"]
    queued = sorted(f"{row['kind']}:{row['destination']}" for row in outbox.for_job(job.id))
    # SR, presentation state ("not analysable: image data could not be decoded") and FHIR report; no SEG
    assert queued == ["dicom:pacs:main", "dicom:pacs:main", "fhir:fhir"]

    out = root / "results" / str(ds.SOPInstanceUID)
    sr = pydicom.dcmread(out / "sr.dcm")
    texts = [str(it.TextValue) for it in _walk(sr.ContentSequence) if it.ValueType == "TEXT"]
    assert "Not analysable: image data could not be decoded." in texts
    assert sr.PatientID == "MRN5" and sr.StudyInstanceUID == ds.StudyInstanceUID
    bundle = json.loads((out / "diagnostic-report.json").read_text())
    (report,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert "Not analysable: image data could not be decoded" in report["conclusion"]
    assert report["status"] == "preliminary"
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "not_analysable" and doc["reason"] == "image data could not be decoded"
    assert (out / "overlay.png").is_file() and not (out / "seg.dcm").exists()


def test_unparseable_file_is_dead_lettered_without_outputs(tmp_path: Path, analyzer: Analyzer) -> None:
    """A spool file that is not DICOM at all names no patient or study: nothing can be reported, only dead-lettered."""
    from dermnode.workqueue.workers import run_job

    src = tmp_path / "garbage.dcm"
    src.write_bytes(b"not dicom" * 10)
    settings = _settings(tmp_path)
    root = settings.storage_root
    root.mkdir(parents=True)
    queue = JobQueue(database_path(root))
    outbox = Outbox(database_path(root), settings.delivery)
    assert queue.enqueue("1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.7", src)
    job = queue.claim("test")
    assert job is not None
    assert run_job(queue, job, JobProcessor(settings, analyzer, outbox))
    assert queue.get("1.2.3.4")["state"] == "dead"
    assert list(outbox.for_job(job.id)) == []


def _walk(items, found=None):  # type: ignore[no-untyped-def]
    found = [] if found is None else found
    for item in items:
        found.append(item)
        _walk(item.get("ContentSequence", []), found)
    return found
