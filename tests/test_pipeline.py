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


# --- issue 18: presentation state and key image ---------------------------------------------------------------
def _dciodvfy_errors(path: Path) -> list[str]:
    import shutil
    import subprocess
    import sys

    local = Path(sys.executable).parent / "dciodvfy"
    binary = str(local) if local.exists() else shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def _with_output(settings: Settings, **output: object) -> Settings:
    return dataclasses.replace(settings, output=dataclasses.replace(settings.output, **output))


def _blank_source(path: Path) -> pydicom.Dataset:
    import numpy as np

    ds = wrap_rgb(np.full((300, 400, 3), 128, np.uint8), WrapOptions(patient_id="MRN9", pixel_spacing_mm=0.05))
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.mark.parametrize("kind", ["analysed", "not_analysable"])
def test_presentation_state_and_key_image_are_written_queued_and_valid(
    tmp_path: Path, analyzer: Analyzer, kind: str
) -> None:
    """Every analysed and every refused image gets pr.dcm (and key-image.dcm with output.burned_in_image): dciodvfy
    finds no error in them nor in the SR that references them; they are queued for the PACS like SEG and SR."""
    src = tmp_path / "src.dcm"
    ds = _source(src, patient_id="MRN7") if kind == "analysed" else _blank_source(src)
    settings = _with_output(_settings(tmp_path), burned_in_image=True)
    root = settings.storage_root
    root.mkdir(parents=True)
    queue = JobQueue(database_path(root))
    outbox = Outbox(database_path(root), settings.delivery)
    assert queue.enqueue(str(ds.SOPInstanceUID), str(ds.SOPClassUID), src)
    job = queue.claim("test")
    assert job is not None
    assert JobProcessor(settings, analyzer, outbox)(job) == kind

    out = root / "results" / str(ds.SOPInstanceUID)
    doc = json.loads((out / "result.json").read_text())["outputs"]
    pr, ki, sr = (pydicom.dcmread(out / n) for n in ("pr.dcm", "key-image.dcm", "sr.dcm"))
    expected = {"overlay.png", "pr.dcm", "key-image.dcm", "sr.dcm", "diagnostic-report.json", "result.json"}
    if kind == "analysed":
        expected.add("seg.dcm")
    assert set(doc["files"]) == expected == {p.name for p in out.iterdir()}
    assert doc["presentation_state_sop_instance_uid"] == pr.SOPInstanceUID
    assert doc["key_image_sop_instance_uid"] == ki.SOPInstanceUID
    # queued: one delivery per DICOM object (keyed by its SOP Instance UID) and the FHIR bundle
    rows = outbox.for_job(job.id)
    dicom_keys = [r["object_key"] for r in rows if r["kind"] == "dicom"]
    objects = [pr.SOPInstanceUID, ki.SOPInstanceUID, sr.SOPInstanceUID]
    if kind == "analysed":
        objects.insert(0, doc["seg_sop_instance_uid"])
    assert dicom_keys == objects  # referenced objects first, the SR last
    assert [r["kind"] for r in rows].count("fhir") == 1
    # valid objects, in the source's study, each in its own series
    for name in ("pr.dcm", "key-image.dcm", "sr.dcm"):
        assert _dciodvfy_errors(out / name) == [], name
    assert pr.StudyInstanceUID == ki.StudyInstanceUID == ds.StudyInstanceUID
    assert (pr.SeriesNumber, ki.SeriesNumber) == (9003, 9004)
    assert len({pr.SeriesInstanceUID, ki.SeriesInstanceUID, sr.SeriesInstanceUID, ds.SeriesInstanceUID}) == 4
    ref = pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ki.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID and ki.BurnedInAnnotation == "YES"
    text = " ".join(t.UnformattedTextValue for a in pr.GraphicAnnotationSequence
                    for t in a.get("TextObjectSequence", []))
    layers = {a.GraphicLayer for a in pr.GraphicAnnotationSequence}
    if kind == "analysed":
        assert "decision support only" in text and "melanoma probability" in text
        assert {"LESION_OUTLINE", "LESION_DIAMETER"} <= layers
        seg = pydicom.dcmread(out / "seg.dcm")
        (annotation,) = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "LESION_OUTLINE"]
        (outline,) = annotation.GraphicObjectSequence
        tracking = seg.SegmentSequence[0].TrackingUID
        assert outline.TrackingUID == tracking  # the lesion of the SEG and the SR
    else:
        assert text.startswith("not analysable: ") and layers == {"DERMNODE_TEXT"}
    # the SR names the presentation state with the source image, and both objects as evidence
    library = [it for it in _walk(sr.ContentSequence)
               if it.ValueType == "IMAGE" and it.ConceptNameCodeSequence[0].CodeMeaning == "Source"]
    assert library[0].ReferencedSOPSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pr.SOPInstanceUID
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert {pr.SOPInstanceUID, ki.SOPInstanceUID, ds.SOPInstanceUID} <= evidence
    # FHIR: both listed in the ImagingStudy
    bundle = json.loads((out / "diagnostic-report.json").read_text())
    (study,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    listed = {i["uid"] for s in study["series"] for i in s["instance"]}
    assert {pr.SOPInstanceUID, ki.SOPInstanceUID} <= listed


def test_outline_object_uids_are_deterministic(tmp_path: Path, analyzer: Analyzer) -> None:
    """A re-run (or a retried delivery) gives the same presentation state and key image UIDs; other settings that
    shape the content give other UIDs; queuing again adds no delivery."""
    ds = _source(tmp_path / "s.dcm", patient_id="MRN1")
    base = _with_output(_settings(tmp_path), burned_in_image=True)
    uids = {}
    for name, settings in {"a": base, "a-again": base, "bands": _with_output(base, pr_series_number=9103)}.items():
        _, files = analyse_dataset(ds, analyzer, settings, tmp_path / name)
        uids[name] = (files.presentation_state_sop_instance_uid, files.key_image_sop_instance_uid)
        assert None not in uids[name]
    assert uids["a"] == uids["a-again"]
    assert not set(uids["a"]) & set(uids["bands"])
    # the outbox keys deliveries by SOP Instance UID: the same objects queued twice are one delivery each
    root = base.storage_root
    root.mkdir(parents=True)
    outbox = Outbox(database_path(root), base.delivery)
    _, files = analyse_dataset(ds, analyzer, base, root / "results")
    processor = JobProcessor(base, analyzer, outbox)
    job = JobQueue(database_path(root))
    assert job.enqueue(str(ds.SOPInstanceUID), str(ds.SOPClassUID), tmp_path / "s.dcm")
    claimed = job.claim("test")
    assert claimed is not None
    processor._queue_deliveries(claimed, files)
    processor._queue_deliveries(claimed, files)
    assert len(outbox.for_job(claimed.id)) == 5  # SEG, PR, key image, SR; FHIR


def test_an_outline_object_that_cannot_be_built_does_not_fail_the_job(
    tmp_path: Path, analyzer: Analyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OutputError building the presentation state is logged and named in result.json; SEG, key image, SR and
    FHIR report are still written and queued, and the SR does not name a presentation state."""
    from dermnode.dicom_io import outline_objects
    from dermnode.errors import OutputError

    def refuse(*args: object, **kwargs: object) -> None:
        raise OutputError("simulated: no outline")

    monkeypatch.setattr(outline_objects, "build_presentation_state", refuse)
    src = tmp_path / "src.dcm"
    ds = _source(src, patient_id="MRN8")
    settings = _with_output(_settings(tmp_path), burned_in_image=True)
    queued = _process(tmp_path, settings, analyzer, ds, src)
    assert queued == ["dicom:pacs:main"] * 3 + ["fhir:fhir"]  # SEG, key image, SR; FHIR
    out = settings.storage_root / "results" / str(ds.SOPInstanceUID)
    doc = json.loads((out / "result.json").read_text())["outputs"]
    assert doc["errors"] == {"presentation_state": "simulated: no outline"}
    assert doc["presentation_state_sop_instance_uid"] is None and not (out / "pr.dcm").exists()
    assert (out / "key-image.dcm").is_file()
    sr = pydicom.dcmread(out / "sr.dcm")
    assert not any("ReferencedSOPSequence" in ref for it in _walk(sr.ContentSequence)
                   for ref in it.get("ReferencedSOPSequence", []))


def test_presentation_state_can_be_switched_off(tmp_path: Path, analyzer: Analyzer) -> None:
    src = tmp_path / "src.dcm"
    ds = _source(src, patient_id="MRN6")
    settings = _with_output(_settings(tmp_path), presentation_state=False)
    assert _process(tmp_path, settings, analyzer, ds, src) == ["dicom:pacs:main"] * 2 + ["fhir:fhir"]
    out = settings.storage_root / "results" / str(ds.SOPInstanceUID)
    assert not (out / "pr.dcm").exists() and not (out / "key-image.dcm").exists()


# --- issue 12: the outputs stage: overlay size, one bundle validation, durable writes with few fsyncs ------------
def _analysed(tmp_path: Path, analyzer: Analyzer, rows: int = 240, cols: int = 320) -> tuple[pydicom.Dataset, object]:
    from dermnode.dicom_io.reading import to_source_image

    ds = wrap_rgb(synthetic_dermoscopy(rows, cols), WrapOptions(patient_id="MRN12", pixel_spacing_mm=0.05))
    result = analyzer.analyze(to_source_image(ds, Settings().analysis.calibrations))
    return ds, result


def _with_fsync(settings: Settings, fsync: bool) -> Settings:
    return dataclasses.replace(settings, storage=dataclasses.replace(settings.storage, fsync=fsync))


def _record_fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Log every ``os.fsync`` (of a file or a folder, by name) and ``os.replace``, in order, from every thread."""
    import os
    import stat
    import threading

    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        real_fsync(fd)
        with lock:
            events.append((f"fsync-{kind}", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: object, dst: object) -> None:
        real_replace(src, dst)  # type: ignore[arg-type]
        with lock:
            events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_outputs_are_durable_with_one_folder_fsync(tmp_path: Path, analyzer: Analyzer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.fsync on: every file is fsynced under its temporary name before any rename, and after the renames
    the output folder is fsynced once (with the parents of the folders made for it); no temporary file is left."""
    from dermnode.pipeline import write_outputs

    ds, result = _analysed(tmp_path, analyzer)
    settings = _with_fsync(_settings(tmp_path), True)
    events = _record_fsyncs_and_renames(monkeypatch)
    out = tmp_path / "results" / str(ds.SOPInstanceUID)  # results/ and the instance folder are both new
    files = write_outputs(ds, result, settings, out)  # type: ignore[arg-type]

    names = {p.name for p in out.iterdir()}
    assert names == {"overlay.png", "seg.dcm", "pr.dcm", "sr.dcm", "diagnostic-report.json", "result.json"}
    assert files.fhir_bundle is not None
    file_syncs = [path for kind, path in events if kind == "fsync-file"]
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    dir_syncs = [(i, path) for i, (kind, path) in enumerate(events) if kind == "fsync-dir"]
    assert len(file_syncs) == len(names) == len(renames)  # each file once, under its temporary name
    assert all(Path(p).name.startswith(".") and p.endswith(".tmp") for p in file_syncs)
    assert max(i for i, (kind, _) in enumerate(events) if kind == "fsync-file") < min(renames)
    assert all(i > max(renames) for i, _ in dir_syncs)  # the names are made durable after the last rename
    assert [p for _, p in dir_syncs] == [str(out), str(out.parent), str(tmp_path)]  # folder, then new entries


def test_outputs_are_not_fsynced_when_storage_fsync_is_off(tmp_path: Path, analyzer: Analyzer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from dermnode.pipeline import write_outputs

    ds, result = _analysed(tmp_path, analyzer)
    events = _record_fsyncs_and_renames(monkeypatch)
    out = tmp_path / "out"
    write_outputs(ds, result, _with_fsync(_settings(tmp_path), False), out)  # type: ignore[arg-type]
    assert [kind for kind, _ in events if kind.startswith("fsync")] == []
    assert len([kind for kind, _ in events if kind == "rename"]) == len(list(out.iterdir())) == 6
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_temporary_file(tmp_path: Path, analyzer: Analyzer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dermnode.errors import StorageError
    from dermnode.pipeline import write_outputs

    ds, result = _analysed(tmp_path, analyzer)
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if str(dst).endswith("sr.dcm"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="No space left"):
        write_outputs(ds, result, _with_fsync(_settings(tmp_path), True), out)  # type: ignore[arg-type]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_fhir_bundle_is_validated_once_and_written_as_validated(tmp_path: Path, analyzer: Analyzer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fhir.resources.R4B.bundle import Bundle as BundleR4B

    from dermnode.pipeline import write_outputs

    ds, result = _analysed(tmp_path, analyzer)
    calls: list[int] = []
    real = BundleR4B.model_validate

    def counting(obj: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(obj, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BundleR4B, "model_validate", staticmethod(counting))
    files = write_outputs(ds, result, _settings(tmp_path), tmp_path / "out")  # type: ignore[arg-type]
    assert len(calls) == 1
    assert files.fhir_bundle is not None
    text = files.fhir_bundle.read_text()
    monkeypatch.undo()
    assert json.loads(BundleR4B.model_validate(json.loads(text)).model_dump_json(exclude_none=True)) == json.loads(text)


def test_overlay_is_capped_and_attached_as_jpeg_while_the_seg_keeps_full_resolution(
    tmp_path: Path, analyzer: Analyzer
) -> None:
    """Issue 12: overlay.png at most 1024 px on its longer side (a 1500 x 2000 source); the FHIR report carries the
    same picture as JPEG; the SEG keeps the source's resolution."""
    import base64

    import cv2
    import numpy as np

    from dermnode.inference.overlay import OVERLAY_MAX_SIDE
    from dermnode.pipeline import write_outputs

    ds, result = _analysed(tmp_path, analyzer, rows=1500, cols=2000)
    files = write_outputs(ds, result, _settings(tmp_path), tmp_path / "out")  # type: ignore[arg-type]
    png = cv2.imread(str(files.overlay_png))
    assert png.shape[:2] == (768, OVERLAY_MAX_SIDE)
    assert files.seg is not None
    seg = pydicom.dcmread(files.seg)
    assert (seg.Rows, seg.Columns) == (1500, 2000)
    assert files.fhir_bundle is not None
    bundle = json.loads(files.fhir_bundle.read_text())
    (report,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    (form,) = report["presentedForm"]
    data = base64.b64decode(form["data"])
    assert form["contentType"] == "image/jpeg" and form["size"] == len(data) and data[:2] == b"\xff\xd8"
    jpeg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg.shape == png.shape
    assert np.abs(jpeg.astype(int) - png.astype(int)).mean() < 3  # the same picture
    assert len(data) < files.overlay_png.stat().st_size / 3
