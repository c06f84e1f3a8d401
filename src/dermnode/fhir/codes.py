"""Code systems and codes used in dermnode's FHIR output.

Every standard code here was checked against a published source; ``docs/fhir.md`` has the table with the
source of each. Where no standard code fits (the algorithm's own scores, the probability band, the ISIC class
labels), codes come from dermnode's local code systems under :data:`LOCAL_BASE`. These are documented in
``docs/fhir.md`` and never pretend to be LOINC or SNOMED CT.

A diagnosis class whose SNOMED CT mapping has not been verified is sent with its local ISIC class code only
(``snomed`` is ``None``); a receiver can map it with a ConceptMap once terminology review has confirmed a code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dermnode.vocabulary import DERMOSCOPIC_COLOURS, DIAGNOSES, PROCEDURE_DERMOSCOPY

logger = logging.getLogger(__name__)

# --- Code system URIs --------------------------------------------------------------------------------------
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: ``system`` of an Identifier holding a DICOM UID as ``urn:oid:<uid>`` (FHIR ImagingStudy convention).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: ``system`` of an Identifier whose value is itself a URI (``urn:uuid:...``, ``urn:oid:...``).
URI_SYSTEM = "urn:ietf:rfc:3986"

#: Base of dermnode's local code and naming systems (``.example`` is reserved: it never resolves).
LOCAL_BASE = "https://dermnode.example/fhir"
LOCAL_MEASUREMENTS = f"{LOCAL_BASE}/CodeSystem/measurements"
LOCAL_BAND = f"{LOCAL_BASE}/CodeSystem/melanoma-probability-band"
LOCAL_DIAGNOSIS = f"{LOCAL_BASE}/CodeSystem/isic-diagnosis-class"
LOCAL_COLOUR = f"{LOCAL_BASE}/CodeSystem/dermoscopic-colour"
LOCAL_REPORT = f"{LOCAL_BASE}/CodeSystem/report"
#: Identifier system of one trained model, value = the SHA-256 of its weights file.
MODEL_SHA256_SYSTEM = f"{LOCAL_BASE}/NamingSystem/model-sha256"
#: Identifier system of an algorithm release, value = SHA-256 over the sorted model SHA-256s.
ALGORITHM_RELEASE_SYSTEM = f"{LOCAL_BASE}/NamingSystem/algorithm-release"
#: Default Patient identifier system when neither Issuer of Patient ID nor the settings give one.
DEFAULT_PATIENT_ID_SYSTEM = f"{LOCAL_BASE}/NamingSystem/dicom-patient-id"


@dataclass(frozen=True)
class Code:
    """One coding: system, code and display."""

    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        """The FHIR ``Coding`` as a JSON dict."""
        return {"system": self.system, "code": self.code, "display": self.display}

    def concept(self, text: str | None = None) -> dict[str, object]:
        """A ``CodeableConcept`` with this single coding (and ``text`` when given)."""
        out: dict[str, object] = {"coding": [self.coding()]}
        if text:
            out["text"] = text
        return out


# --- Report and categories ---------------------------------------------------------------------------------
#: LOINC 18748-4 "Diagnostic imaging study" (Document Ontology; the generic imaging report code).
REPORT_CODE = Code(LOINC, "18748-4", "Diagnostic imaging study")
#: SNOMED CT 446078004 "Dermoscopic photography (procedure)": the dermoscopy code of the report, shared with the
#: SR's Procedure Reported (DICOM PS3.16, pydicom codedict ``SCT.DermoscopicPhotography``).
REPORT_CODE_DERMOSCOPY = Code(SNOMED, PROCEDURE_DERMOSCOPY.code, PROCEDURE_DERMOSCOPY.meaning)
#: Local refinement of the report code (sent as a further coding).
REPORT_CODE_LOCAL = Code(LOCAL_REPORT, "dermoscopy-ai-report", "Dermoscopy AI analysis report")
#: Observation category "imaging" (also used as the DiagnosticReport category, see docs/fhir.md).
CATEGORY_IMAGING = Code(OBSERVATION_CATEGORY, "imaging", "Imaging")

# --- Observation codes (local: no LOINC/SNOMED CT observable fits an algorithm's output) -------------------
MELANOMA_PROBABILITY = Code(LOCAL_MEASUREMENTS, "melanoma-probability", "AI melanoma probability")
MELANOMA_BAND = Code(LOCAL_MEASUREMENTS, "melanoma-probability-band", "AI melanoma probability band")
TOP_DIAGNOSIS = Code(LOCAL_MEASUREMENTS, "top-diagnosis", "AI most likely lesion class")
CLASS_PROBABILITY = Code(LOCAL_MEASUREMENTS, "class-probability", "AI lesion class probability")
LESION_AREA = Code(LOCAL_MEASUREMENTS, "lesion-area", "Lesion area")
LESION_AREA_PX = Code(LOCAL_MEASUREMENTS, "lesion-area-pixels", "Lesion area in image pixels")
MAX_DIAMETER = Code(LOCAL_MEASUREMENTS, "lesion-max-diameter", "Lesion maximum diameter")
MAX_DIAMETER_PX = Code(LOCAL_MEASUREMENTS, "lesion-max-diameter-pixels", "Lesion maximum diameter in pixels")
ASYMMETRY = Code(LOCAL_MEASUREMENTS, "asymmetry-index", "Lesion asymmetry index (0 symmetric .. 1)")
ASYMMETRY_AXES = Code(LOCAL_MEASUREMENTS, "asymmetry-axes", "Number of asymmetric axes (ABCD A score)")
BORDER_IRREGULARITY = Code(
    LOCAL_MEASUREMENTS, "border-irregularity", "Border compactness index P^2/(4 pi A), 1 for a circle"
)
BORDER_SCORE = Code(LOCAL_MEASUREMENTS, "border-score", "Abrupt border segments (ABCD B score 0..8)")
COLOUR_COUNT = Code(LOCAL_MEASUREMENTS, "colour-count", "Number of dermoscopic colours (ABCD C score)")
COLOUR_PRESENT = Code(LOCAL_MEASUREMENTS, "colour-present", "Dermoscopic colour present")
TDS = Code(LOCAL_MEASUREMENTS, "total-dermoscopy-score", "Total Dermoscopy Score (Stolz ABCD rule)")

# --- Probability band --------------------------------------------------------------------------------------
BAND_CODES: dict[str, Code] = {
    "benign": Code(LOCAL_BAND, "benign", "Low melanoma probability (below the benign threshold)"),
    "indeterminate": Code(LOCAL_BAND, "indeterminate", "Indeterminate melanoma probability"),
    "malignant": Code(LOCAL_BAND, "malignant", "High melanoma probability (above the malignant threshold)"),
}

# --- Dermoscopic colours (the six colours of the ABCD rule) ------------------------------------------------
def _colour_key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-").replace("grey", "gray")


#: Local code per colour: ``light-brown`` / "Light brown" for the vocabulary's ``"light brown"``.
COLOUR_CODES: dict[str, Code] = {
    _colour_key(name): Code(LOCAL_COLOUR, _colour_key(name), name.capitalize()) for name in DERMOSCOPIC_COLOURS
}


def colour_code(name: str) -> Code:
    """The local code of a dermoscopic colour name (``"light brown"``, ``"light_brown"`` are accepted)."""
    key = _colour_key(name)
    return COLOUR_CODES.get(key, Code(LOCAL_COLOUR, key, name))


# --- Diagnosis classes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiagnosisClass:
    """An ISIC diagnosis class with its local code and, where verified, its SNOMED CT concept."""

    local: Code
    snomed: Code | None

    def concept(self) -> dict[str, object]:
        """``CodeableConcept``: SNOMED CT coding first (when mapped), then the local class code."""
        codings = [c.coding() for c in (self.snomed, self.local) if c is not None]
        return {"coding": codings, "text": self.local.display}


def _cls(code: str, display: str, snomed: tuple[str, str] | None) -> DiagnosisClass:
    return DiagnosisClass(Code(LOCAL_DIAGNOSIS, code, display), None if snomed is None else Code(SNOMED, *snomed))


#: Local class code and, where verified, SNOMED CT concept of each class (:data:`dermnode.vocabulary.DIAGNOSES`,
#: one source of truth for SR and FHIR); AKIEC (ISIC 2018's name of AK) is an alias.
DIAGNOSIS_CODES: dict[str, DiagnosisClass] = {
    label.value: _cls(label.value, d.display, None if d.snomed is None else (d.snomed.code, d.snomed.meaning))
    for label, d in DIAGNOSES.items()
}
DIAGNOSIS_CODES["AKIEC"] = DIAGNOSIS_CODES["AK"]


def diagnosis_class(label: str) -> DiagnosisClass:
    """The coding of an ISIC class label; unknown labels get a local code only."""
    found = DIAGNOSIS_CODES.get(label.upper())
    if found is None:
        logger.debug("no code table entry for diagnosis class %r; sending the local code only", label)
        return DiagnosisClass(Code(LOCAL_DIAGNOSIS, label, label), None)
    return found


# --- UCUM units --------------------------------------------------------------------------------------------
UNIT_PERCENT = ("%", "%")
UNIT_ONE = ("1", "1")
UNIT_MM = ("mm", "mm")
UNIT_MM2 = ("mm2", "mm2")
#: UCUM annotations (dimensionless; ASCII 33-126 without braces or space, UCUM allows no exponent on an
#: annotation): a length in image pixels, and an area counted in pixels (distinct, so a receiver never reads an
#: area as a length); the same codes as the DICOM SR.
UNIT_PIXELS = ("{pixels}", "pixels")
UNIT_SQUARE_PIXELS = ("{square_pixels}", "square pixels")
UNIT_SCORE = ("{score}", "score")


def quantity(value: float, unit: tuple[str, str], decimals: int | None = None) -> dict[str, object]:
    """A UCUM ``Quantity``; ``unit`` is ``(ucum code, human readable unit)``."""
    v: float = round(float(value), decimals) if decimals is not None else float(value)
    return {"value": v, "unit": unit[1], "system": UCUM, "code": unit[0]}
