"""Coded concepts used in the SEG and SR objects dermnode writes.

Standard concepts come from ``pydicom.sr.codedict.codes`` (generated from DICOM PS3.16) where they exist, so
their values and meanings match the standard. SNOMED CT concepts use the ``SCT`` designator (never the
retired ``SRT``). Where no standard concept fits, a private coding scheme (:data:`PRIVATE_SCHEME`, "99" prefix
per PS3.16 section 8.1) is used and declared in the Coding Scheme Identification Sequence of every object
that uses it; its meanings are documented here and in ``docs/dicom-conformance.md``. No private concept
imitates a SNOMED CT or DCM code.
"""

from __future__ import annotations

import enum
import logging

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dermnode import vocabulary
from dermnode.vocabulary import Band, IsicClass

logger = logging.getLogger(__name__)

#: Coding Scheme Designator of dermnode's private concepts (PS3.16 8.1: private designators start with "99").
PRIVATE_SCHEME = "99DERMNODE"
PRIVATE_SCHEME_NAME = "dermnode private concepts"
PRIVATE_SCHEME_ORGANIZATION = "dermnode project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --------------------------------------------------------------------------------------------- segmentation
#: Segmented Property Category (CID 7150): SCT 49755003 "Morphologically Abnormal Structure".
SEGMENTED_PROPERTY_CATEGORY: Code = codes.SCT.MorphologicallyAbnormalStructure
#: Segmented Property Type: SCT 95324001 "Skin lesion".
SEGMENTED_PROPERTY_TYPE: Code = codes.SCT.SkinLesion
#: Anatomic region of the segment and finding site of the measurements: SCT 39937001 "Skin".
ANATOMIC_REGION_SKIN: Code = codes.SCT.Skin
#: Algorithm Family (CID 7162): DCM 123110 "Artificial Intelligence".
ALGORITHM_FAMILY_AI: Code = codes.DCM.ArtificialIntelligence
#: Purpose of Reference of the Contributing Equipment item (CID 7005): DCM 109102 "Processing Equipment".
PURPOSE_PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment

# ----------------------------------------------------------------------------------------------- SR concepts
#: Procedure Reported of the TID 1500 report: SCT 446078004 "Dermoscopic photography".
PROCEDURE_DERMOSCOPY = Code(
    value=vocabulary.PROCEDURE_DERMOSCOPY.code,
    scheme_designator=vocabulary.PROCEDURE_DERMOSCOPY.scheme,
    meaning=vocabulary.PROCEDURE_DERMOSCOPY.meaning,
)
#: Finding type of the measurement group: SCT 95324001 "Skin lesion".
FINDING_TYPE_SKIN_LESION: Code = codes.SCT.SkinLesion
#: Concept name of the suspected diagnosis: DCM 111023 "Differential Diagnosis/Impression".
SUSPECTED_FINDING: Code = codes.DCM.DifferentialDiagnosisImpression
#: Observer Type of the device observer context (TID 1002): DCM 121007 "Device".
OBSERVER_DEVICE: Code = codes.DCM.Device
#: Concept name of free-text remarks (disclaimer, reason not analysable): DCM 121106 "Comment".
COMMENT: Code = codes.DCM.Comment
#: TID 1500 row 12 container of report-level qualitative evaluations: UMLS C0034375.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: TID 1600 Image Library concepts (DCM 111028, DCM 126200, DCM 121139, SCT 260753009) and the DMS modality.
IMAGE_LIBRARY: Code = codes.DCM.ImageLibrary
IMAGE_LIBRARY_GROUP: Code = codes.DCM.ImageLibraryGroup
MODALITY: Code = codes.DCM.Modality
SOURCE = Code("260753009", "SCT", "Source")
MODALITY_DERMOSCOPY: Code = codes.DCM.Dermoscopy

#: Concept name of the melanoma risk band (no standard concept: private).
RISK_BAND = _private("RISKBAND", "Melanoma risk band")
#: Concept name of the analysis outcome of a not analysable image (private).
ANALYSIS_OUTCOME = _private("OUTCOME", "Analysis outcome")
#: Value of :data:`ANALYSIS_OUTCOME` when the quality gate rejected the image (private).
NOT_ANALYSABLE = _private("NOTANALYSABLE", "Not analysable")


class BandCode(enum.Enum):
    """Coded values of the melanoma risk band: SNOMED CT concepts of PS3.16 CID 6063."""

    BENIGN = Code("30807003", "SCT", "Benign")
    INDETERMINATE = Code("280416009", "SCT", "Indeterminate result")
    MALIGNANT = Code("21594007", "SCT", "Malignant")


_BAND_CODES: dict[Band, BandCode] = {
    Band.BENIGN: BandCode.BENIGN,
    Band.INDETERMINATE: BandCode.INDETERMINATE,
    Band.MALIGNANT: BandCode.MALIGNANT,
}


def band_code(band: Band) -> Code:
    """The coded value of a melanoma risk band.

    Parameters
    ----------
    band:
        The band of the classification.

    Returns
    -------
    pydicom.sr.coding.Code
        SCT Benign / Indeterminate result / Malignant.

    Raises
    ------
    KeyError
        When ``band`` is not a :class:`~dermnode.vocabulary.Band`.
    """
    return _BAND_CODES[Band(band)].value


def _diagnosis_code(isic_class: IsicClass) -> Code:
    diagnosis = vocabulary.DIAGNOSES[isic_class]
    if diagnosis.snomed is not None:
        return Code(diagnosis.snomed.code, diagnosis.snomed.scheme, diagnosis.snomed.meaning)
    return _private(isic_class.value, diagnosis.display)


#: Suspected-finding value per ISIC class, from :data:`dermnode.vocabulary.DIAGNOSES` (the single source of truth
#: for both the SR and the FHIR report): its SNOMED CT concept where verified, else a private concept named after
#: the class (BKL and VASC are ISIC groupings; the DF and SK concepts await terminology review); see
#: docs/dicom-conformance.md for the source of each code.
SUSPECTED_FINDING_CODES: dict[IsicClass, Code] = {c: _diagnosis_code(c) for c in IsicClass}


def suspected_finding_code(isic_class: str) -> Code | None:
    """The coded suspected finding for an ISIC class code (case-insensitive).

    Parameters
    ----------
    isic_class:
        Class code such as ``"MEL"`` or ``"nv"``.

    Returns
    -------
    pydicom.sr.coding.Code or None
        The concept, or ``None`` for a class dermnode has no code for.
    """
    try:
        return SUSPECTED_FINDING_CODES[IsicClass(isic_class.upper())]
    except ValueError:
        logger.warning("no coded concept for classifier class %r", isic_class)
        return None


class MeasurementName(enum.Enum):
    """Concept names of the lesion measurements (TID 1419 / TID 300 measurement rows)."""

    AREA = codes.SCT.Area  # SCT 42798000, CID 7469
    MAX_DIAMETER = codes.SCT.LongAxis  # SCT 103339001 "Long axis", CID 7470
    PERIMETER = codes.SCT.Perimeter  # SCT 131191004, CID 7470
    ASYMMETRY = _private("ASYMMETRY", "Asymmetry index")
    BORDER_IRREGULARITY = _private("BORDERIRREG", "Border irregularity index")
    COLOUR_COUNT = _private("NCOLOURS", "Number of dermoscopic colours")
    TDS = _private("TDS", "Total Dermoscopy Score")
    MELANOMA_PROBABILITY = _private("MELPROB", "Melanoma probability")


class Unit(enum.Enum):
    """UCUM units of the measurements."""

    SQUARE_MILLIMETRE = codes.UCUM.SquareMillimeter  # mm2
    MILLIMETRE = Code("mm", "UCUM", "millimeter")
    PIXELS = Code("{pixels}", "UCUM", "pixels")
    #: An area counted in pixels: a UCUM annotation (ASCII 33-126, no space; UCUM allows no exponent on an
    #: annotation, so ``{pixels}2`` is not valid) distinct from the pixel length ``{pixels}``.
    SQUARE_PIXELS = Code("{square_pixels}", "UCUM", "square pixels")
    NO_UNITS = codes.UCUM.NoUnits  # "1"
    PERCENT = codes.UCUM.Percent  # "%"


def private_scheme_identification() -> Dataset:
    """An item of the Coding Scheme Identification Sequence (0008,0110) declaring :data:`PRIVATE_SCHEME`.

    Returns
    -------
    pydicom.dataset.Dataset
        The sequence item.
    """
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item
