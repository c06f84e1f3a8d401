"""The analysis pipeline wired to its inputs and outputs.

Data flows one way: spooled file → decode → analysis stages (:class:`~dermnode.inference.analyzer.Analyzer`)
→ output objects (SEG, SR, FHIR bundle, result.json, overlay) → outbox. Every stage has typed inputs and
outputs; this module only joins them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from dermnode import __version__
from dermnode.dicom_io.outline_objects import build_outline_objects
from dermnode.dicom_io.reading import expand_inputs, read_dataset, read_dicom_file, to_source_image
from dermnode.dicom_io.seg import build_segmentation
from dermnode.dicom_io.sr import build_report
from dermnode.dicom_io.uids import content_digest, derived_uid, is_valid_uid
from dermnode.drift import DeviceDrift, DriftMonitor
from dermnode.errors import DecodeError, OutputError, StorageError
from dermnode.fhir.bundle import DerivedInstance, build_bundle, encode_bundle, has_patient_id
from dermnode.inference.analyzer import Analyzer
from dermnode.inference.calibration import BandCalibration
from dermnode.inference.overlay import OVERLAY_MIN_SIDE, encode_jpeg, encode_png, render_overlay
from dermnode.metrics import StageMetrics
from dermnode.settings import Settings
from dermnode.vocabulary import (
    UNDECODABLE_REASON,
    AnalysisResult,
    AnalysisStatus,
    ModelIdentity,
    QualityReport,
    SourceImage,
    format_percent,
    not_analysable_statement,
)
from dermnode.workqueue.jobs import Job
from dermnode.workqueue.outbox import Outbox
from dermnode.workqueue.workers import Processor

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = f"dermnode {__version__}"

#: Patient ID and name given to a photograph analysed by ``dermnode analyze``: it carries no identity.
PHOTOGRAPH_PATIENT_ID = "UNKNOWN"
PHOTOGRAPH_PATIENT_NAME = "Unidentified^"  # one-component name; the caret makes that explicit (PS3.5 6.2.1)


@dataclass(frozen=True)
class OutputFiles:
    """Files written for one analysed source instance."""

    directory: Path
    result_json: Path
    overlay_png: Path
    sr: Path
    sr_sop_instance_uid: str
    fhir_key: str
    fhir_bundle: Path | None = None  # None: no report could name a subject (the source has no Patient ID)
    seg: Path | None = None
    seg_sop_instance_uid: str | None = None
    presentation_state: Path | None = None
    presentation_state_sop_instance_uid: str | None = None
    key_image: Path | None = None
    key_image_sop_instance_uid: str | None = None

    @property
    def dicom_objects(self) -> list[tuple[str, Path]]:
        """``(SOP Instance UID, file)`` of every DICOM object for the PACS, in sending order: the objects the SR
        references first (SEG, presentation state, key image), the SR last."""
        objects = [
            (self.seg_sop_instance_uid, self.seg),
            (self.presentation_state_sop_instance_uid, self.presentation_state),
            (self.key_image_sop_instance_uid, self.key_image),
        ]
        out = [(uid, path) for uid, path in objects if uid is not None and path is not None]
        out.append((self.sr_sop_instance_uid, self.sr))
        return out


#: File names of the presentation state and the key image in a results folder.
PRESENTATION_STATE_FILE = "pr.dcm"
KEY_IMAGE_FILE = "key-image.dcm"


def _uid_or_none(ds: pydicom.Dataset | None) -> str | None:
    return None if ds is None else str(ds.SOPInstanceUID)


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` encoded as a DICOM file (preamble, file meta)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


#: Threads that encode the overlay PNG beside the DICOM builders (``cv2.imencode`` releases the GIL) and run the
#: fsyncs of one output folder together (the file system commits them in one journal transaction instead of
#: one after another). Shared by every worker thread of the process; threads are started when first needed.
_OUTPUT_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dermnode-outputs")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(directory: Path) -> list[Path]:
    """Create ``directory`` (and missing parents) owner-only; the folders that were created, innermost first."""
    created: list[Path] = []
    folder = directory
    while not folder.is_dir():
        created.append(folder)
        folder = folder.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return created


class _DurableFolder:
    """Write the files of one output folder so that each is complete or absent after a crash, with few fsyncs.

    Every file is written to a temporary name in the folder and, with ``fsync``, ``fsync``-ed; the fsyncs of
    the files of one :meth:`stage` call run in parallel threads, so that the file system commits them together
    instead of one journal commit after another. :meth:`commit` renames every staged file into place and then
    ``fsync``-s the folder once (and the parent of every folder created for it, so that the folder's own entry
    is durable too). Only after :meth:`commit` returns is every file durable under its final name; deliveries
    are queued after that. Without ``fsync`` (``storage.fsync = false``) files are only written and renamed: a
    crash may lose them. Files and temporary files are owner-only (they hold PHI).
    """

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self.created: list[Path] = []
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def make(self) -> None:
        """Create the folder (and missing parents), owner-only.

        Raises
        ------
        StorageError
            When the folder cannot be created.
        """
        try:
            self.created = _make_folder(self.directory)
        except OSError as exc:
            raise StorageError(f"cannot create {self.directory}: {exc.strerror or exc}") from exc

    def _write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def stage(self, files: Sequence[tuple[str, bytes]]) -> None:
        """Write ``(name, data)`` files to temporary names (and fsync them, in parallel).

        Raises
        ------
        StorageError
            When a file cannot be written; the temporary files of this folder are removed.
        """
        pending = [(self.directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp",
                    self.directory / name, data) for name, data in files]
        self._staged.extend((tmp, final) for tmp, final, _ in pending)
        try:
            if self.fsync and len(pending) > 1:
                futures = [_OUTPUT_THREADS.submit(self._write, tmp, data) for tmp, _, data in pending]
                errors = [f.exception() for f in futures]  # wait for every write before any cleanup
                for error in errors:
                    if error is not None:
                        raise error
            else:
                for tmp, _, data in pending:
                    self._write(tmp, data)
        except OSError as exc:
            self.discard()
            raise StorageError(f"cannot write into {self.directory}: {exc.strerror or exc}") from exc

    def commit(self) -> None:
        """Rename every staged file into place, then make the names durable (one folder fsync).

        Raises
        ------
        StorageError
            When a rename or an fsync fails.
        """
        try:
            for tmp, final in self._staged:
                os.replace(tmp, final)
            self._staged.clear()
            if self.fsync:
                # the new names in the folder; a folder made for these outputs, in its parent
                for folder in dict.fromkeys([self.directory, *(c.parent for c in self.created)]):
                    _fsync_path(folder)
        except OSError as exc:
            self.discard()
            raise StorageError(f"cannot write into {self.directory}: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Remove the temporary files not yet renamed."""
        for tmp, _ in self._staged:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                logger.warning("could not remove temporary file %s", tmp)
        self._staged.clear()


def write_outputs(
    ds: pydicom.Dataset, result: AnalysisResult, settings: Settings, directory: Path, *,
    source_file: str | None = None,
) -> OutputFiles:
    """Build and write every output object of one result into ``directory``.

    The time spent is recorded as ``result.timings_ms["outputs"]`` (and so in ``result.json``): everything but
    writing ``result.json`` itself. When ``source_file`` is given (``dermnode analyze``: the input path as
    given), ``result.json`` records it as ``source_file``. Besides SEG and SR, the presentation state (``pr.dcm``,
    ``output.presentation_state``) and the key image (``key-image.dcm``, ``output.burned_in_image``) are written;
    one of those that cannot be built is logged and named under ``outputs.errors`` in ``result.json`` instead of
    failing the job. The UIDs of every object depend on the settings their content depends on
    (:func:`~dermnode.dicom_io.uids.content_digest`), so a re-run with other settings never reuses a UID. A
    source without Patient ID gets SEG, SR and result.json but no FHIR bundle (a report needs a subject):
    ``OutputFiles.fhir_bundle`` is ``None`` and ``result.json`` says why.

    The overlay is drawn once, at most :data:`~dermnode.inference.overlay.OVERLAY_MAX_SIDE` pixels on its longer
    side: ``overlay.png`` (lossless; encoded in a thread while the DICOM objects are built) and, attached to the
    FHIR report, the same picture as JPEG. The FHIR bundle is validated and serialised once. With
    ``storage.fsync`` every file is durable when this returns: each is written to a temporary name and fsynced
    (in parallel), then all are renamed and the folder is fsynced once; without it nothing is fsynced.

    Raises
    ------
    OutputError
        When a DICOM or FHIR object cannot be built or validated.
    StorageError
        When a file cannot be written.
    """
    t_outputs = time.perf_counter()
    folder = _DurableFolder(directory, fsync=settings.storage.fsync)
    folder.make()
    notice = None
    if result.status is AnalysisStatus.NOT_ANALYSABLE:  # said on the picture too, not only in the SR and FHIR
        notice = "NOT ANALYSABLE\n" + not_analysable_statement(result.reason or result.quality.reason)
    picture = render_overlay(result.source.rgb, result.mask, min_side=OVERLAY_MIN_SIDE, notice=notice)
    png: Future[bytes] = _OUTPUT_THREADS.submit(encode_png, picture)  # C code without the GIL, beside the builders
    files: list[tuple[str, bytes]] = []  # (file name, contents)
    seg = None
    seg_path = None
    digest = content_digest(settings.analysis, settings.output)
    if result.status is AnalysisStatus.ANALYSED:
        seg = build_segmentation(
            ds, result, settings.output, software_version=SOFTWARE_VERSION, config_digest=digest
        )
        seg_path = directory / "seg.dcm"
        files.append((seg_path.name, _dicom_bytes(seg)))
    # the outline for viewers that show no SEG: a presentation state (and a key image when configured); one that
    # cannot be built is logged and recorded in result.json, the other outputs still go out
    outline = build_outline_objects(
        ds, result, settings.output, seg_sop_instance_uid=None if seg is None else str(seg.SOPInstanceUID),
        software_version=SOFTWARE_VERSION, config_digest=digest,
    )
    pr_path = ki_path = None
    if outline.presentation_state is not None:
        pr_path = directory / PRESENTATION_STATE_FILE
        files.append((pr_path.name, _dicom_bytes(outline.presentation_state)))
    if outline.key_image is not None:
        ki_path = directory / KEY_IMAGE_FILE
        files.append((ki_path.name, _dicom_bytes(outline.key_image)))
    sr = build_report(
        ds, result, seg, settings.output, software_version=SOFTWARE_VERSION, config_digest=digest,
        presentation_state=outline.presentation_state, key_image=outline.key_image,
    )
    sr_path = directory / "sr.dcm"
    files.append((sr_path.name, _dicom_bytes(sr)))
    derived = [
        DerivedInstance(
            sop_instance_uid=str(obj.SOPInstanceUID), sop_class_uid=str(obj.SOPClassUID),
            series_instance_uid=str(obj.SeriesInstanceUID), modality=str(obj.Modality),
            series_number=int(obj.SeriesNumber), series_description=str(obj.get("SeriesDescription", "")),
        )
        for obj in (outline.presentation_state, outline.key_image)
        if obj is not None
    ]
    bundle_path: Path | None = None
    no_bundle_reason = None
    if has_patient_id(ds):
        attach = settings.fhir.include_overlay and result.status is AnalysisStatus.ANALYSED
        bundle = encode_bundle(build_bundle(
            ds,
            result,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            seg_sop_instance_uid=None if seg is None else str(seg.SOPInstanceUID),
            overlay_jpeg=encode_jpeg(picture) if attach else None,  # about a tenth of the PNG
            settings=settings.fhir,
            sr_series_instance_uid=str(sr.SeriesInstanceUID),
            seg_series_instance_uid=None if seg is None else str(seg.SeriesInstanceUID),
            sr_sop_class_uid=str(sr.SOPClassUID),
            derived_instances=derived,
        ))
        bundle_path = directory / "diagnostic-report.json"
        files.append((bundle_path.name, bundle))
    else:
        no_bundle_reason = "the source image has no Patient ID: a FHIR report cannot name its subject"
        logger.warning("no FHIR report for %s: %s (SEG and SR are still written)",
                       result.source.sop_instance_uid, no_bundle_reason)
    overlay_path = directory / "overlay.png"
    files.insert(0, (overlay_path.name, png.result()))
    # every file but result.json written (and fsynced) now, so that the outputs time includes it; renamed below
    folder.stage(files)
    try:
        result.timings_ms["outputs"] = round((time.perf_counter() - t_outputs) * 1000.0, 2)
        doc = result.to_json()
        doc["outputs"] = {
            "seg_sop_instance_uid": None if seg is None else str(seg.SOPInstanceUID),
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "fhir_bundle": None if bundle_path is None else bundle_path.name,
            "presentation_state_sop_instance_uid": _uid_or_none(outline.presentation_state),
            "key_image_sop_instance_uid": _uid_or_none(outline.key_image),
            "files": sorted([name for name, _ in files] + ["result.json"]),
        }
        if outline.errors:
            doc["outputs"]["errors"] = dict(outline.errors)
        if no_bundle_reason is not None:
            doc["outputs"]["fhir_bundle_reason"] = no_bundle_reason
        if source_file is not None:
            doc["source_file"] = source_file
        result_path = directory / "result.json"
        folder.stage([(result_path.name, json.dumps(doc, indent=2).encode("utf-8"))])
        # every file complete (and, with storage.fsync, on disk) under its temporary name: now the final names, made
        # durable by one fsync of the folder; only then may the caller queue deliveries of these files
        folder.commit()
    except BaseException:
        folder.discard()  # no temporary file is left behind, whatever failed
        raise
    return OutputFiles(
        directory=directory,
        result_json=result_path,
        overlay_png=overlay_path,
        sr=sr_path,
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        fhir_bundle=bundle_path,
        fhir_key=f"DiagnosticReport/{result.source.sop_instance_uid}",
        seg=seg_path,
        seg_sop_instance_uid=None if seg is None else str(seg.SOPInstanceUID),
        presentation_state=pr_path,
        presentation_state_sop_instance_uid=_uid_or_none(outline.presentation_state),
        key_image=ki_path,
        key_image_sop_instance_uid=_uid_or_none(outline.key_image),
    )


def analyse_dataset(
    ds: pydicom.Dataset, analyzer: Analyzer, settings: Settings, results_root: Path, *, started: float | None = None,
    source_file: str | None = None,
) -> tuple[AnalysisResult, OutputFiles]:
    """Decode, analyse and write the outputs of one instance under ``results_root/<SOPInstanceUID>/``.

    ``result.timings_ms`` gets ``decode`` (from ``started``, e.g. before the file was read) and ``outputs``
    besides the analysis stages. ``source_file`` is passed on to :func:`write_outputs`.

    Raises
    ------
    DecodeError
        When the pixel data cannot be decoded or a required UID is missing.
    OutputError
        When an output object cannot be built.
    StorageError
        When an output file cannot be written.
    """
    t_start = time.perf_counter() if started is None else started
    source = to_source_image(ds, settings.analysis.calibrations)
    decode_ms = (time.perf_counter() - t_start) * 1000.0
    result = analyzer.analyze(source)
    result.timings_ms["decode"] = round(decode_ms, 2)
    files = write_outputs(ds, result, settings, results_root / source.sop_instance_uid, source_file=source_file)
    return result, files


#: Longer side of the grey picture that stands for an image whose pixels cannot be decoded (overlay only).
_UNDECODABLE_CANVAS_SIDE = 640


def undecodable_result(ds: pydicom.Dataset, models: tuple[ModelIdentity, ...]) -> AnalysisResult | None:
    """The *not analysable* result of an instance whose pixel data cannot be decoded, or ``None``.

    Its reason is :data:`~dermnode.vocabulary.UNDECODABLE_REASON`; the "image" is a plain grey picture with the
    aspect ratio of Rows x Columns (for the overlay's notice only: nothing is analysed). ``None`` when the header
    does not name the instance, series and study with valid UIDs: then no report can reference it.
    """
    try:
        uids = [str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    except AttributeError:
        return None
    if not all(is_valid_uid(u) for u in uids):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        rows = cols = 0
    if rows > 0 and cols > 0:
        scale = _UNDECODABLE_CANVAS_SIDE / max(rows, cols)
        rows, cols = max(8, round(rows * scale)), max(8, round(cols * scale))
    else:
        rows, cols = 480, _UNDECODABLE_CANVAS_SIDE
    source = SourceImage(
        rgb=np.full((rows, cols, 3), 96, np.uint8),
        sop_instance_uid=uids[0],
        sop_class_uid=uids[1],
        study_instance_uid=uids[2],
        series_instance_uid=uids[3],
        spacing=None,
    )
    return AnalysisResult(
        source, AnalysisStatus.NOT_ANALYSABLE, UNDECODABLE_REASON, models, QualityReport(False, UNDECODABLE_REASON)
    )


#: The device name of the drift watch for an instance whose association carried no calling AE title.
UNKNOWN_DEVICE = "(unknown)"


def drift_monitor(calibration: BandCalibration | None) -> DriftMonitor | None:
    """The drift watch for ``calibration``'s band fractions; ``None`` without a calibration (nothing to compare)."""
    if calibration is None:
        return None
    expected = {band: facts.fraction_of_lesions for band, facts in calibration.bands.items()}
    try:
        return DriftMonitor(expected)
    except ValueError as exc:  # a calibration whose bands hold no lesions: no expectation to test against
        logger.warning("no drift watch: band calibration %s: %s", calibration.identity_text(), exc)
        return None


def record_drift(monitor: DriftMonitor | None, calling_aet: str, result: AnalysisResult) -> DeviceDrift | None:
    """Add a finished job's band and melanoma probability to the drift watch of the device that sent it.

    Only classified results count (a not-analysable image has no band). The watch never fails a job: an error in
    it is logged.
    """
    c = result.classification
    if monitor is None or c is None:
        return None
    try:
        return monitor.record(calling_aet.strip() or UNKNOWN_DEVICE, c.band, c.melanoma_probability)
    except Exception:
        logger.exception("drift watch: cannot record the result of %s", result.source.sop_instance_uid)
        return None


class JobProcessor:
    """What a worker runs for one received instance: analyse, write outputs, queue the deliveries.

    An instance whose pixel data cannot be decoded (it was acknowledged: its header parsed) still gets a
    *not analysable* SR and FHIR report ("image data could not be decoded") so that the clinician is told, and
    then fails with :class:`~dermnode.errors.DecodeError`: the job is dead-lettered for the administrator.
    """

    def __init__(self, settings: Settings, analyzer: Analyzer, outbox: Outbox,
                 stage_metrics: StageMetrics | None = None) -> None:
        self.settings = settings
        self.stage_metrics = stage_metrics or StageMetrics()
        self.analyzer = analyzer
        # one drift watch per process, shared with /metrics through the stage metrics
        if self.stage_metrics.drift is None:
            self.stage_metrics.drift = drift_monitor(analyzer.classifier.calibration)
        self.drift = self.stage_metrics.drift
        self.outbox = outbox
        self.results_root = settings.storage_root / "results"

    def _queue_deliveries(self, job: Job, files: OutputFiles) -> int:
        # one delivery per DICOM object and destination, keyed by its (deterministic) SOP Instance UID, all queued
        # in one transaction: a delivery thread woken by the commit finds the job's objects together (one
        # association per PACS); returns how many deliveries the job has (queued now or already)
        items: list[tuple[int | None, str, str, str, Path]] = [
            (job.id, "dicom", f"pacs:{dest.name}", uid, path)
            for dest in self.settings.pacs
            for uid, path in files.dicom_objects
        ]
        if self.settings.fhir.base_url and files.fhir_bundle is not None:
            items.append((job.id, "fhir", "fhir", files.fhir_key, files.fhir_bundle))
        self.outbox.add_all(items)
        return len(items)

    def _report_undecodable(self, job: Job, ds: pydicom.Dataset, error: DecodeError) -> DecodeError:
        """Write and queue the not-analysable report of an undecodable instance; the error to dead-letter it with."""
        result = undecodable_result(ds, self.analyzer.models)
        if result is None:
            return error
        files = write_outputs(ds, result, self.settings, self.results_root / result.source.sop_instance_uid)
        queued = self._queue_deliveries(job, files)
        logger.warning("%s: %s (%s); a not-analysable report was written%s", result.source.sop_instance_uid,
                       UNDECODABLE_REASON, error, f" and queued for {queued} delivery(ies)" if queued else "")
        return DecodeError(
            f"{UNDECODABLE_REASON}: {error}; a not-analysable report was written"
            + (" and queued for delivery" if queued else "")
        )

    def __call__(self, job: Job) -> str:
        started = time.perf_counter()
        ds = read_dataset(job.path)
        try:
            result, files = analyse_dataset(ds, self.analyzer, self.settings, self.results_root, started=started)
        except DecodeError as exc:
            raise self._report_undecodable(job, ds, exc) from exc
        timings = result.timings_ms
        self._queue_deliveries(job, files)
        self.stage_metrics.observe(timings, result.status.value)
        record_drift(self.drift, job.calling_aet, result)
        logger.info("analysed %s: %s %s (%s)", result.source.sop_instance_uid, result.status.value,
                    result.reason or "", ", ".join(f"{k}={v:.0f}ms" for k, v in timings.items()))
        return result.status.value


def build_processor(settings: Settings, outbox: Outbox, stage_metrics: StageMetrics | None = None) -> Processor:
    """The job processor the workers run; loads and verifies the shipped models.

    Raises
    ------
    ModelError
        When a model file is missing, corrupt or does not match its manifest.
    PipelineError
        When the start-up self-test fails.
    """
    processor = JobProcessor(settings, Analyzer(settings.analysis), outbox, stage_metrics)
    self_test(processor.analyzer, settings)
    if processor.drift is not None:
        expected = ", ".join(f"{b.value} {f:.0%}" for b, f in processor.drift.expected.items())
        logger.info("drift watch on: per calling AE title, the last %d results' band mix against the calibration's "
                    "(%s); flagged when p < %g over at least %d results", processor.drift.window, expected,
                    processor.drift.alpha, processor.drift.min_count)
    else:
        logger.info("drift watch off: no band calibration to compare with")
    return processor


def self_test(analyzer: Analyzer, settings: Settings) -> None:
    """Run one synthetic image through every stage and output builder before the service accepts work.

    This loads everything that is loaded lazily (codecs, highdicom, FHIR models), so the first real image is
    not slowed down, and proves that the installed stack can build valid outputs.

    Raises
    ------
    PipelineError
        When the synthetic image cannot be analysed or its outputs cannot be built.
    """
    import tempfile

    from dermnode.dicom_io.wrap import WrapOptions, synthetic_dermoscopy, wrap_rgb
    from dermnode.errors import PipelineError

    options = WrapOptions(patient_id="SELFTEST", patient_name="Self^Test", pixel_spacing_mm=0.05)
    ds = wrap_rgb(synthetic_dermoscopy(240, 320), options)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="dermnode-selftest-") as tmp:
            result, _ = analyse_dataset(ds, analyzer, settings, Path(tmp))
    except Exception as exc:
        raise PipelineError(f"start-up self-test failed: {type(exc).__name__}: {exc}") from exc
    logger.info("start-up self-test passed (%s, %.0f ms)", result.status.value, (time.perf_counter() - t0) * 1000)


def wrap_photograph(path: Path) -> pydicom.Dataset:
    """Wrap the photograph at ``path`` in memory as a Dermoscopic Photography Image for analysis.

    The pixels are stored natively (RGB, not re-encoded), so they are exactly the photograph's. Study, Series
    and SOP Instance UIDs are derived from the sha256 of the file's bytes: the same photograph always gets the
    same UIDs, and so the same output folder and SEG/SR UIDs. No Pixel Spacing is set (a photograph's scale is
    unknown: measurements stay in pixels) and the patient is :data:`PHOTOGRAPH_PATIENT_ID` /
    :data:`PHOTOGRAPH_PATIENT_NAME`.

    Parameters
    ----------
    path:
        Any image file Pillow can open (JPEG, PNG, TIFF, BMP, ...); the first frame is used.

    Returns
    -------
    pydicom.Dataset
        The wrapped instance, with file meta.

    Raises
    ------
    DecodeError
        When the file cannot be read or is not an image Pillow can decode.
    """
    from PIL import Image

    from dermnode.dicom_io.wrap import WrapOptions, load_rgb, wrap_rgb

    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        rgb = load_rgb(path)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"cannot read image {path}: {exc}") from exc
    except OSError as exc:
        raise DecodeError(f"cannot read {path}: {exc}") from exc
    sha = digest.hexdigest()
    options = WrapOptions(
        patient_id=PHOTOGRAPH_PATIENT_ID,
        patient_name=PHOTOGRAPH_PATIENT_NAME,
        pixel_spacing_mm=None,
        jpeg=False,
        study_instance_uid=derived_uid("photograph-study", sha),
        series_instance_uid=derived_uid("photograph-series", sha),
        sop_instance_uid=derived_uid("photograph-instance", sha),
        manufacturer="unknown",
        model_name="photograph imported by dermnode analyze",
    )
    return wrap_rgb(rgb, options)


def load_source(path: Path) -> pydicom.Dataset:
    """Read one input of ``dermnode analyze``: a DICOM file, else a photograph wrapped in memory.

    DICOM is recognised by content, not by the file name (:func:`~dermnode.dicom_io.reading.read_dicom_file`):
    the ``DICM`` prefix at offset 128, or a dataset pydicom can read without them (SOP Class and Instance UIDs
    present). Anything else is read as a photograph (:func:`wrap_photograph`).

    Parameters
    ----------
    path:
        The input file.

    Returns
    -------
    pydicom.Dataset
        The source instance, with file meta.

    Raises
    ------
    DecodeError
        When the file cannot be read, is a corrupt DICOM file, or is neither DICOM nor a readable image.
    """
    ds = read_dicom_file(path)
    if ds is not None:
        return ds
    return wrap_photograph(path)


@dataclass(frozen=True)
class InputOutcome:
    """What ``dermnode analyze`` did with one input file.

    Attributes
    ----------
    path:
        The input as given (a file of an expanded folder: that file).
    sop_instance_uid:
        The instance analysed; ``None`` when the file could not be read.
    status:
        ``"analysed"``, ``"not_analysable"`` (outputs written, with the reason) or ``"failed"`` (no outputs).
    detail:
        Probability, band and top class; the reason; or the error.
    """

    path: str
    sop_instance_uid: str | None
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def analyze_files(settings: Settings, files: Sequence[Path], out: Path) -> list[InputOutcome]:
    """Analyse files offline and write per-instance outputs under ``out/<SOPInstanceUID>/``.

    Each input is a DICOM file or a photograph (:func:`load_source`); a folder stands for the files directly
    inside it (:func:`~dermnode.dicom_io.reading.expand_inputs`). ``result.json`` records the input path as given
    as ``source_file``. A file that cannot be read or decoded is reported (status ``failed``) and the others go on.

    Returns
    -------
    list of InputOutcome
        One per input file, in order.

    Raises
    ------
    ModelError
        When the models cannot be loaded.
    """
    analyzer = Analyzer(settings.analysis)
    done: list[InputOutcome] = []
    inputs: list[Path] = []
    for given in files:
        try:
            inputs.extend(expand_inputs([given]))
        except OSError as exc:
            logger.error("%s: %s", given, exc)
            done.append(InputOutcome(str(given), None, "failed", f"cannot list folder: {exc}"))
    for path in inputs:
        try:
            result, _ = analyse_dataset(load_source(path), analyzer, settings, out, source_file=str(path))
        except (DecodeError, OutputError) as exc:
            logger.debug("%s: %s", path, exc)
            done.append(InputOutcome(str(path), None, "failed", str(exc)))
            continue
        if result.classification is not None:
            c = result.classification
            detail = (f"melanoma probability {format_percent(c.melanoma_probability)} ({c.band.value} band), "
                      f"most likely {c.top_diagnosis} ({format_percent(c.diagnosis_probabilities[c.top_diagnosis])})")
        else:
            detail = result.reason or ""
        if result.measurements is not None and result.source.spacing is None:
            detail += "; no pixel spacing: measurements in pixels"
        done.append(InputOutcome(str(path), result.source.sop_instance_uid, result.status.value, detail))
    return done
