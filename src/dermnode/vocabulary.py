"""Typed inputs and outputs of the analysis pipeline stages.

These dataclasses are the contract between the pipeline (``dermnode.inference``), the DICOM writers
(``dermnode.dicom_io``) and the FHIR builders (``dermnode.fhir``). They carry no DICOM or FHIR objects, only
plain values, so each side can be tested on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class AnalysisStatus(enum.StrEnum):
    """Outcome of the analysis of one source image."""

    ANALYSED = "analysed"
    NOT_ANALYSABLE = "not_analysable"


class Band(enum.StrEnum):
    """Confidence band of the melanoma probability (thresholds from ``analysis.band_*``)."""

    BENIGN = "benign"
    INDETERMINATE = "indeterminate"
    MALIGNANT = "malignant"


class SpacingSource(enum.StrEnum):
    """Where the physical pixel size came from."""

    PIXEL_SPACING = "PixelSpacing"
    IMAGER_PIXEL_SPACING = "ImagerPixelSpacing"
    DEVICE_CALIBRATION = "DeviceCalibration"


@dataclass(frozen=True)
class ModelIdentity:
    """Identity of one trained model (IHE AIR algorithm identification)."""

    name: str
    version: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class PixelSpacing:
    """Physical size of one pixel in millimetres (row spacing, column spacing)."""

    row_mm: float
    column_mm: float
    source: SpacingSource


@dataclass(frozen=True)
class SourceImage:
    """A decoded source instance: RGB pixels plus the identifiers the outputs need."""

    rgb: npt.NDArray[np.uint8]  # (rows, columns, 3)
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    spacing: PixelSpacing | None
    frame_number: int = 1


@dataclass(frozen=True)
class QualityReport:
    """Result of the quality and suitability gate."""

    usable: bool
    reason: str | None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurements:
    """Lesion measurements on the final mask. ``*_mm*`` values are ``None`` when the image is uncalibrated."""

    area_px: int
    area_mm2: float | None
    perimeter_px: float
    perimeter_mm: float | None
    max_diameter_px: float
    max_diameter_mm: float | None
    asymmetry: float  # 0 (symmetric) .. 1; fraction of non-overlapping area averaged over the two axes
    asymmetry_axes: int  # 0, 1 or 2 axes of asymmetry (ABCD "A" score)
    border_irregularity: float  # compactness index P^2 / (4 pi A); 1 for a circle
    border_score: int  # ABCD "B" score 0..8 (abrupt border segments)
    colors: tuple[str, ...]  # subset of the six dermoscopic colours
    tds: float | None  # Total Dermoscopy Score (Stolz) where defined

    def to_json(self) -> dict[str, Any]:
        return {
            "area_px": self.area_px,
            "area_mm2": self.area_mm2,
            "perimeter_px": self.perimeter_px,
            "perimeter_mm": self.perimeter_mm,
            "max_diameter_px": self.max_diameter_px,
            "max_diameter_mm": self.max_diameter_mm,
            "asymmetry": self.asymmetry,
            "asymmetry_axes": self.asymmetry_axes,
            "border_irregularity": self.border_irregularity,
            "border_score": self.border_score,
            "colors": list(self.colors),
            "tds": self.tds,
        }


@dataclass(frozen=True)
class Classification:
    """Calibrated classifier outputs."""

    melanoma_probability: float
    band: Band
    diagnosis_probabilities: dict[str, float]  # ISIC class code (e.g. "MEL", "NV") -> probability

    @property
    def top_diagnosis(self) -> str:
        return max(self.diagnosis_probabilities, key=lambda k: self.diagnosis_probabilities[k])

    def to_json(self) -> dict[str, Any]:
        return {
            "melanoma_probability": self.melanoma_probability,
            "band": self.band.value,
            "diagnosis_probabilities": dict(self.diagnosis_probabilities),
            "top_diagnosis": self.top_diagnosis,
        }


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the pipeline found about one source image.

    ``mask`` is a boolean array at source resolution, ``probability_map`` a float32 array in [0, 1] of the
    same shape (for a fractional SEG). Both are ``None`` when the image is not analysable.
    """

    source: SourceImage
    status: AnalysisStatus
    reason: str | None
    models: tuple[ModelIdentity, ...]
    quality: QualityReport
    mask: npt.NDArray[np.bool_] | None = None
    probability_map: npt.NDArray[np.float32] | None = None
    measurements: Measurements | None = None
    classification: Classification | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` document written by ``dermnode analyze``."""
        spacing = self.source.spacing
        return {
            "sop_instance_uid": self.source.sop_instance_uid,
            "study_instance_uid": self.source.study_instance_uid,
            "series_instance_uid": self.source.series_instance_uid,
            "status": self.status.value,
            "reason": self.reason,
            "decision_support_only": True,
            "models": [m.to_json() for m in self.models],
            "pixel_spacing_mm": (
                None
                if spacing is None
                else {"row": spacing.row_mm, "column": spacing.column_mm, "source": spacing.source.value}
            ),
            "quality": {"usable": self.quality.usable, "reason": self.quality.reason, **self.quality.scores},
            "measurements": None if self.measurements is None else self.measurements.to_json(),
            "classification": None if self.classification is None else self.classification.to_json(),
            "timings_ms": dict(self.timings_ms),
        }
