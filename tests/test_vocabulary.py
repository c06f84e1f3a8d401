"""The shared vocabulary: one source for the DICOM and the FHIR coding of the same concepts."""

from __future__ import annotations

from dermnode import vocabulary
from dermnode.dicom_io import codes as dicom_codes
from dermnode.fhir import codes as fhir_codes
from dermnode.inference.classifier_models import DIAGNOSIS_CLASSES as CLASSIFIER_CLASSES
from dermnode.inference.measurements import COLOR_NAMES


def test_diagnosis_classes_are_the_classifier_outputs_in_logit_order() -> None:
    assert vocabulary.DIAGNOSIS_CLASSES == ("AK", "BCC", "DF", "MEL", "NV", "BKL", "SK", "SCC", "VASC")
    assert CLASSIFIER_CLASSES == vocabulary.DIAGNOSIS_CLASSES
    assert set(vocabulary.DIAGNOSES) == set(vocabulary.IsicClass)
    assert set(vocabulary.DIAGNOSIS_CLASSES) >= vocabulary.MALIGNANT_CLASSES


def test_sr_and_fhir_code_each_diagnosis_with_the_same_snomed_concept() -> None:
    for label, diagnosis in vocabulary.DIAGNOSES.items():
        dicom = dicom_codes.SUSPECTED_FINDING_CODES[label]
        fhir = fhir_codes.diagnosis_class(label.value)
        if diagnosis.snomed is None:
            assert dicom.scheme_designator == dicom_codes.PRIVATE_SCHEME and fhir.snomed is None
            assert dicom.meaning == fhir.local.display == diagnosis.display
        else:
            assert (dicom.scheme_designator, dicom.value, dicom.meaning) == (
                "SCT",
                diagnosis.snomed.code,
                diagnosis.snomed.meaning,
            )
            assert fhir.snomed is not None and (fhir.snomed.code, fhir.snomed.display) == (dicom.value, dicom.meaning)
    assert dicom_codes.PROCEDURE_DERMOSCOPY.value == fhir_codes.REPORT_CODE_DERMOSCOPY.code == "446078004"


def test_colours_measured_are_the_colours_fhir_codes() -> None:
    assert COLOR_NAMES == vocabulary.DERMOSCOPIC_COLOURS
    assert [fhir_codes.colour_code(c).code for c in COLOR_NAMES] == list(fhir_codes.COLOUR_CODES)
    assert fhir_codes.colour_code("light brown").display == "Light brown"
