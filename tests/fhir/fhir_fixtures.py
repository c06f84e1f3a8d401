"""Shared builders of the FHIR tests: a wrapped source image and analysis results of each kind."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.fhir.bundle import DerivedInstance
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

ISSUED = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
SR_UID = "1.2.826.0.1.3680043.8.498.9002.1"
SEG_UID = "1.2.826.0.1.3680043.8.498.9001.1"
SR_SERIES = "1.2.826.0.1.3680043.8.498.9002"
SEG_SERIES = "1.2.826.0.1.3680043.8.498.9001"
#: The presentation state and key image of a result (issue 18), as the pipeline passes them.
DERIVED = (
    DerivedInstance("1.2.826.0.1.3680043.8.498.9003.1", "1.2.840.10008.5.1.4.1.1.11.2",
                    "1.2.826.0.1.3680043.8.498.9003", "PR", 9003, "dermnode outline - decision support only"),
    DerivedInstance("1.2.826.0.1.3680043.8.498.9004.1", "1.2.840.10008.5.1.4.1.1.7",
                    "1.2.826.0.1.3680043.8.498.9004", "OT", 9004, "dermnode overlay — not for diagnosis"),
)
MODELS = (
    ModelIdentity("dermseg", "1.0.0", "a" * 64),
    ModelIdentity("dermcls", "2.1.0", "b" * 64),
)
KINDS = ("calibrated", "uncalibrated", "indeterminate", "not_analysable")


def make_source(calibrated: bool = True) -> Dataset:
    rgb = np.zeros((16, 16, 3), np.uint8)
    opts = WrapOptions(
        pixel_spacing_mm=0.02 if calibrated else None,
        patient_id="DERM0042",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.1.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1.1.1",
    )
    return wrap_rgb(rgb, opts)


def make_result(ds: Dataset, kind: str) -> AnalysisResult:
    calibrated = kind != "uncalibrated"
    spacing = PixelSpacing(0.02, 0.02, SpacingSource.PIXEL_SPACING) if calibrated else None
    src = SourceImage(
        np.zeros((16, 16, 3), np.uint8),
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        spacing,
    )
    if kind == "not_analysable":
        return AnalysisResult(
            src, AnalysisStatus.NOT_ANALYSABLE, "image out of focus", MODELS, QualityReport(False, "blur")
        )
    scale = 0.02 if calibrated else None
    m = Measurements(
        area_px=2500,
        area_mm2=2500 * scale * scale if scale else None,
        perimeter_px=190.0,
        perimeter_mm=190.0 * scale if scale else None,
        max_diameter_px=62.5,
        max_diameter_mm=62.5 * scale if scale else None,
        asymmetry=0.31,
        asymmetry_axes=1,
        border_irregularity=1.27,
        border_score=3,
        colors=("light brown", "dark brown", "blue-gray"),
        tds=4.65 if calibrated else None,
    )
    if kind == "indeterminate":
        cls = Classification(0.42, Band.INDETERMINATE, {"MEL": 0.38, "NV": 0.52, "SK": 0.1})
    else:
        cls = Classification(0.91, Band.MALIGNANT, {"MEL": 0.88, "NV": 0.07, "BCC": 0.05})
    return AnalysisResult(
        src, AnalysisStatus.ANALYSED, None, MODELS, QualityReport(True, None), measurements=m, classification=cls
    )


def overlay_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]
