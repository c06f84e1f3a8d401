"""The vocabulary shared by the analysis, the DICOM writers and the FHIR builders, in one neutral place.

* the typed inputs and outputs of the analysis pipeline stages: the contract between the pipeline
  (``dermnode.inference``), the DICOM writers (``dermnode.dicom_io``) and the FHIR builders (``dermnode.fhir``).
  They carry no DICOM or FHIR objects, only plain values, so each side can be tested on its own;
* the concepts both outputs code: the melanoma probability :class:`Band`, the ISIC diagnosis classes
  (:class:`IsicClass`, :data:`DIAGNOSIS_CLASSES`, :data:`DIAGNOSES` with their verified SNOMED CT concept), the
  dermoscopic colours and the procedure (:data:`PROCEDURE_DERMOSCOPY`).

How each side writes a concept (a pydicom ``Code``, a FHIR ``Coding``) stays in ``dicom_io/codes.py`` and
``fhir/codes.py``. This module imports nothing from dermnode.
"""

from __future__ import annotations

import decimal
import enum
import math
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


class IsicClass(enum.StrEnum):
    """Diagnostic classes of the ISIC challenges that the classifier may output."""

    AK = "AK"
    BCC = "BCC"
    DF = "DF"
    MEL = "MEL"
    NV = "NV"
    BKL = "BKL"
    SK = "SK"
    SCC = "SCC"
    VASC = "VASC"


#: The classifier's diagnosis classes, in the order of its 9 logits.
DIAGNOSIS_CLASSES: tuple[str, ...] = tuple(c.value for c in IsicClass)

#: The malignant diagnosis classes (melanoma, basal and squamous cell carcinoma, actinic keratosis).
MALIGNANT_CLASSES: frozenset[str] = frozenset({"MEL", "BCC", "SCC", "AK"})


@dataclass(frozen=True)
class Concept:
    """A coded concept as plain values: ``scheme`` (``"SCT"`` for SNOMED CT), ``code`` and ``meaning``."""

    scheme: str
    code: str
    meaning: str


#: SNOMED CT 446078004 "Dermoscopic photography": the procedure of the SR and the code of the FHIR report.
PROCEDURE_DERMOSCOPY = Concept("SCT", "446078004", "Dermoscopic photography")


@dataclass(frozen=True)
class Diagnosis:
    """One ISIC diagnosis class: its display name and, where verified, its SNOMED CT concept."""

    label: IsicClass
    display: str
    snomed: Concept | None


#: Diagnosis classes and their concepts: the single source of truth for both the SR and the FHIR report.
#: SNOMED CT is used only where the concept is verified (DICOM PS3.16 via pydicom's code dictionary, or a
#: SNOMED CT browser); BKL and VASC are ISIC groupings without a single SNOMED CT concept, and the DF and SK
#: concepts could not be verified offline, so those four have none until terminology review (the SR codes them
#: with a private concept, FHIR with the local class code only); see docs/dicom-conformance.md for the source
#: of each code.
DIAGNOSES: dict[IsicClass, Diagnosis] = {
    d.label: d
    for d in (
        Diagnosis(IsicClass.MEL, "Melanoma", Concept("SCT", "1162635006", "Malignant melanoma")),
        Diagnosis(IsicClass.NV, "Melanocytic nevus", Concept("SCT", "400096001", "Melanocytic nevus")),
        Diagnosis(IsicClass.BCC, "Basal cell carcinoma", Concept("SCT", "254701007", "Basal cell carcinoma of skin")),
        Diagnosis(
            IsicClass.SCC, "Squamous cell carcinoma", Concept("SCT", "254651007", "Squamous cell carcinoma of skin")
        ),
        Diagnosis(IsicClass.AK, "Actinic keratosis", Concept("SCT", "201101007", "Actinic keratosis")),
        Diagnosis(IsicClass.DF, "Dermatofibroma", None),
        Diagnosis(IsicClass.SK, "Seborrheic keratosis", None),
        Diagnosis(IsicClass.BKL, "Benign keratosis-like lesion", None),
        Diagnosis(IsicClass.VASC, "Vascular lesion", None),
    )
}

#: The six dermoscopic colours of the ABCD rule, as :attr:`Measurements.colors` names them.
DERMOSCOPIC_COLOURS: tuple[str, ...] = ("white", "red", "light brown", "dark brown", "blue-gray", "black")


# --- Reported precision: one place for result.json, the SR and the FHIR report -----------------------------
#: Lengths are reported to 0.1 mm (the mask border is uncertain by about a pixel, 0.02-0.1 mm on a dermoscope)
#: or to whole pixels; areas to 0.01 mm2 or whole pixels; probabilities and dimensionless indices to 3
#: significant digits (a calibrated probability is not known better than that).
LENGTH_DECIMALS_MM = 1
AREA_DECIMALS_MM2 = 2
SIGNIFICANT_DIGITS = 3


def significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits, as the shortest float (``0.06806897`` -> ``0.0681``)."""
    v = float(value)
    if not math.isfinite(v) or v == 0.0:
        return v
    return float(f"{v:.{digits}g}")


def _round_half_up(value: float, decimals: int) -> float:
    """``value`` to ``decimals`` places, halves away from zero as a reader expects (1.25 mm -> 1.3 mm)."""
    v = float(value)
    if not math.isfinite(v):
        return v
    quantum = decimal.Decimal(1).scaleb(-decimals)
    return float(decimal.Decimal(repr(v)).quantize(quantum, rounding=decimal.ROUND_HALF_UP))


def reported_length(value: float, *, millimetres: bool) -> float | int:
    """A length as reported: to 0.1 mm, or to a whole pixel (an ``int``); halves round up."""
    return _round_half_up(value, LENGTH_DECIMALS_MM) if millimetres else int(_round_half_up(value, 0))


def reported_area(value: float, *, millimetres: bool) -> float | int:
    """An area as reported: to 0.01 mm2, or a whole number of pixels (an ``int``); halves round up."""
    return _round_half_up(value, AREA_DECIMALS_MM2) if millimetres else int(_round_half_up(value, 0))


def reported_probability(p: float) -> float:
    """A probability (0..1) as reported: 3 significant digits."""
    return significant(p)


def reported_percent(p: float) -> float:
    """A probability (0..1) as a percentage with the same 3 significant digits (``0.0681`` -> ``6.81``)."""
    return significant(float(p) * 100.0)


def format_percent(p: float) -> str:
    """``reported_percent`` as text: ``"6.81%"``, ``"62.0%"``, ``"100%"``."""
    v = reported_percent(p)
    text = f"{v:#.{SIGNIFICANT_DIGITS}g}".rstrip(".") if v < 100 else f"{v:.0f}"
    return f"{text}%"


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

    @property
    def calibrated(self) -> bool:
        """Whether physical sizes are known (else every size is in pixels)."""
        return self.area_mm2 is not None and self.max_diameter_mm is not None

    def to_json(self) -> dict[str, Any]:
        """The measurements as reported (rounded like the SR and the FHIR report, see :func:`reported_length`)."""

        def mm(v: float | None, area: bool = False) -> float | int | None:
            if v is None:
                return None
            return reported_area(v, millimetres=True) if area else reported_length(v, millimetres=True)

        return {
            "area_px": int(self.area_px),
            "area_mm2": mm(self.area_mm2, area=True),
            "perimeter_px": reported_length(self.perimeter_px, millimetres=False),
            "perimeter_mm": mm(self.perimeter_mm),
            "max_diameter_px": reported_length(self.max_diameter_px, millimetres=False),
            "max_diameter_mm": mm(self.max_diameter_mm),
            "asymmetry": significant(self.asymmetry),
            "asymmetry_axes": self.asymmetry_axes,
            "border_irregularity": significant(self.border_irregularity),
            "border_score": self.border_score,
            "colors": list(self.colors),
            "tds": None if self.tds is None else round(float(self.tds), 2),
        }


@dataclass(frozen=True)
class Classification:
    """Calibrated classifier outputs."""

    melanoma_probability: float
    band: Band
    diagnosis_probabilities: dict[str, float]  # ISIC class code (e.g. "MEL", "NV") -> probability
    band_meaning: str = ""  # what the band meant on the calibration data, in words a clinician reads
    calibration: str = ""  # which band calibration produced it: "name (date, sha256 prefix)"; empty: fixed cut-offs

    @property
    def top_diagnosis(self) -> str:
        return max(self.diagnosis_probabilities, key=lambda k: self.diagnosis_probabilities[k])

    def to_json(self) -> dict[str, Any]:
        """The classification as reported (probabilities to 3 significant digits, like the SR and FHIR)."""
        return {
            "melanoma_probability": reported_probability(self.melanoma_probability),
            "band": self.band.value,
            "band_meaning": self.band_meaning,
            "calibration": self.calibration,
            "diagnosis_probabilities": {k: reported_probability(v) for k, v in self.diagnosis_probabilities.items()},
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


# --- What a report says in words: one text for the SR comments and the FHIR conclusion ---------------------
#: The caveat of an image without physical calibration.
NO_CALIBRATION_CAVEAT = "The image has no physical calibration: measurements are in pixels only."
#: The reason given for an instance whose pixel data cannot be decoded after it was acknowledged.
UNDECODABLE_REASON = "image data could not be decoded"


def not_analysable_statement(reason: str | None) -> str:
    """``"Not analysable: <reason>."``: the one wording of a refused image (SR, FHIR, overlay)."""
    text = (reason or "unspecified reason").strip().rstrip(".")
    return f"Not analysable: {text}."


def finding_statements(result: AnalysisResult) -> list[str]:
    """The sentences that state the findings of ``result`` in words, for the SR and the FHIR conclusion alike.

    A not analysable result gives :func:`not_analysable_statement` and the advice to assess the lesion
    clinically. An analysed one gives the melanoma probability and band, what the band meant on the calibration
    data and which calibration produced it (when a band calibration is active), the most likely class with its
    probability, the size (calibrated) or :data:`NO_CALIBRATION_CAVEAT`. Numbers are rounded as reported.
    """
    if result.status is AnalysisStatus.NOT_ANALYSABLE:
        return [
            not_analysable_statement(result.reason or result.quality.reason),
            "No AI result is available for this lesion; assess it clinically (or acquire the image again).",
        ]
    out: list[str] = []
    c = result.classification
    if c is not None:
        top = c.top_diagnosis
        try:
            top_name = DIAGNOSES[IsicClass(top.upper())].display
        except ValueError:
            top_name = top
        out.append(f"Melanoma probability {format_percent(c.melanoma_probability)} ({Band(c.band).value} band).")
        if c.band_meaning:
            out.append(c.band_meaning)
        if c.calibration:
            out.append(f"Band cut-offs from calibration {c.calibration}.")
        out.append(f"Most likely lesion class: {top_name} ({format_percent(c.diagnosis_probabilities[top])}).")
    m = result.measurements
    if m is not None:
        if m.calibrated:
            assert m.area_mm2 is not None and m.max_diameter_mm is not None
            out.append(
                f"Lesion area {reported_area(m.area_mm2, millimetres=True):.2f} mm2, maximum diameter "
                f"{reported_length(m.max_diameter_mm, millimetres=True):.1f} mm."
            )
        else:
            out.append(NO_CALIBRATION_CAVEAT)
    return out
