"""The analysis pipeline wired to its inputs and outputs.

Data flows one way: spooled file → decode → analysis stages (:class:`~dermnode.inference.analyzer.Analyzer`)
→ output objects (SEG, SR, FHIR bundle, result.json, overlay) → outbox. Every stage has typed inputs and
outputs; this module only joins them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dermnode import __version__
from dermnode.dicom_io.reading import read_dataset, to_source_image
from dermnode.dicom_io.seg import build_segmentation
from dermnode.dicom_io.sr import build_report
from dermnode.errors import OutputError
from dermnode.fhir.bundle import build_bundle
from dermnode.inference.analyzer import Analyzer
from dermnode.inference.overlay import encode_png, render_overlay
from dermnode.inference.types import AnalysisResult, AnalysisStatus
from dermnode.metrics import StageMetrics
from dermnode.outbox import Outbox
from dermnode.scp.queue import Job
from dermnode.scp.spool import atomic_write
from dermnode.scp.workers import Processor
from dermnode.settings import Settings

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = f"dermnode {__version__}"


@dataclass(frozen=True)
class OutputFiles:
    """Files written for one analysed source instance."""

    directory: Path
    result_json: Path
    overlay_png: Path
    sr: Path
    sr_sop_instance_uid: str
    fhir_bundle: Path
    fhir_key: str
    seg: Path | None = None
    seg_sop_instance_uid: str | None = None


def _save(ds: pydicom.Dataset, path: Path) -> None:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write(path, buf.getvalue())


def write_outputs(ds: pydicom.Dataset, result: AnalysisResult, settings: Settings, directory: Path) -> OutputFiles:
    """Build and write every output object of one result into ``directory``.

    The time spent is recorded as ``result.timings_ms["outputs"]`` (and so in ``result.json``).

    Raises
    ------
    OutputError
        When a DICOM or FHIR object cannot be built or validated.
    StorageError
        When a file cannot be written.
    """
    t_outputs = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    overlay = encode_png(render_overlay(result.source.rgb, result.mask))
    overlay_path = directory / "overlay.png"
    atomic_write(overlay_path, overlay)
    seg = None
    seg_path = None
    if result.status is AnalysisStatus.ANALYSED:
        seg = build_segmentation(ds, result, settings.output, software_version=SOFTWARE_VERSION)
        seg_path = directory / "seg.dcm"
        _save(seg, seg_path)
    sr = build_report(ds, result, seg, settings.output, software_version=SOFTWARE_VERSION)
    sr_path = directory / "sr.dcm"
    _save(sr, sr_path)
    bundle = build_bundle(
        ds,
        result,
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        seg_sop_instance_uid=None if seg is None else str(seg.SOPInstanceUID),
        overlay_png=overlay,
        settings=settings.fhir,
        sr_series_instance_uid=str(sr.SeriesInstanceUID),
        seg_series_instance_uid=None if seg is None else str(seg.SeriesInstanceUID),
        sr_sop_class_uid=str(sr.SOPClassUID),
    )
    bundle_path = directory / "diagnostic-report.json"
    atomic_write(bundle_path, json.dumps(bundle, indent=2).encode("utf-8"))
    result.timings_ms["outputs"] = round((time.perf_counter() - t_outputs) * 1000.0, 2)
    doc = result.to_json()
    doc["outputs"] = {
        "seg_sop_instance_uid": None if seg is None else str(seg.SOPInstanceUID),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
    }
    result_path = directory / "result.json"
    atomic_write(result_path, json.dumps(doc, indent=2).encode("utf-8"))
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
    )


def analyse_dataset(
    ds: pydicom.Dataset, analyzer: Analyzer, settings: Settings, results_root: Path, *, started: float | None = None
) -> tuple[AnalysisResult, OutputFiles]:
    """Decode, analyse and write the outputs of one instance under ``results_root/<SOPInstanceUID>/``.

    ``result.timings_ms`` gets ``decode`` (from ``started``, e.g. before the file was read) and ``outputs``
    besides the analysis stages.

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
    files = write_outputs(ds, result, settings, results_root / source.sop_instance_uid)
    return result, files


class JobProcessor:
    """What a worker runs for one received instance: analyse, write outputs, queue the deliveries."""

    def __init__(self, settings: Settings, analyzer: Analyzer, outbox: Outbox,
                 stage_metrics: StageMetrics | None = None) -> None:
        self.settings = settings
        self.stage_metrics = stage_metrics or StageMetrics()
        self.analyzer = analyzer
        self.outbox = outbox
        self.results_root = settings.storage_root / "results"

    def __call__(self, job: Job) -> str:
        started = time.perf_counter()
        ds = read_dataset(job.path)
        result, files = analyse_dataset(ds, self.analyzer, self.settings, self.results_root, started=started)
        timings = result.timings_ms
        objects = [(files.sr_sop_instance_uid, files.sr)]
        if files.seg is not None and files.seg_sop_instance_uid is not None:
            objects.insert(0, (files.seg_sop_instance_uid, files.seg))
        for dest in self.settings.pacs:
            for uid, path in objects:
                self.outbox.add(job.id, "dicom", f"pacs:{dest.name}", uid, path)
        if self.settings.fhir.base_url:
            self.outbox.add(job.id, "fhir", "fhir", files.fhir_key, files.fhir_bundle)
        self.stage_metrics.observe(timings, result.status.value)
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


def analyze_files(settings: Settings, files: Sequence[Path], out: Path) -> list[tuple[str, str]]:
    """Analyse DICOM files offline and write per-instance outputs under ``out/<SOPInstanceUID>/``.

    A file that cannot be read or decoded is reported (``error: ...``) and the others go on.

    Raises
    ------
    ModelError
        When the models cannot be loaded.
    """
    from dermnode.errors import DecodeError

    analyzer = Analyzer(settings.analysis)
    done: list[tuple[str, str]] = []
    for path in files:
        try:
            result, _ = analyse_dataset(read_dataset(path), analyzer, settings, out)
        except (DecodeError, OutputError) as exc:
            logger.error("%s: %s", path, exc)
            done.append((str(path), f"error: {exc}"))
            continue
        label = result.status.value
        if result.classification is not None:
            c = result.classification
            label += f" melanoma_probability={c.melanoma_probability:.3f} band={c.band.value} top={c.top_diagnosis}"
        elif result.reason:
            label += f" ({result.reason})"
        done.append((result.source.sop_instance_uid, label))
    return done
