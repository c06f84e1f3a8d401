"""What the reading clinician sees: the SR, the FHIR report, result.json and the overlay of one image agree.

Issue 16, items 1-4: one report status in SR and FHIR, the same caveats and top diagnosis in both, numbers
rounded alike to what they support, and a refused image said to be not analysable everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from dicom_output_cases import make_case

from dermnode.inference.overlay import render_overlay
from dermnode.pipeline import write_outputs
from dermnode.settings import Settings
from dermnode.vocabulary import AnalysisResult, AnalysisStatus, Band, Classification

SETTINGS = Settings()


def _items(items, found=None):  # type: ignore[no-untyped-def]
    found = [] if found is None else found
    for item in items:
        found.append(item)
        _items(item.get("ContentSequence", []), found)
    return found


def _texts(sr: pydicom.Dataset) -> list[str]:
    return [str(it.TextValue) for it in _items(sr.ContentSequence) if it.ValueType == "TEXT"]


def _nums(sr: pydicom.Dataset) -> dict[str, tuple[str, str]]:
    """Concept code -> (value as written, UCUM unit code) of every NUM item."""
    out = {}
    for it in _items(sr.ContentSequence):
        if it.ValueType == "NUM":
            mv = it.MeasuredValueSequence[0]
            out[it.ConceptNameCodeSequence[0].CodeValue] = (
                str(mv.NumericValue),
                mv.MeasurementUnitsCodeSequence[0].CodeValue,
            )
    return out


def _write(tmp_path: Path, result: AnalysisResult, source: pydicom.Dataset, name: str = "out") -> Path:
    files = write_outputs(source, result, SETTINGS, tmp_path / name)
    assert files.fhir_bundle is not None
    return files.directory


def _report(directory: Path) -> dict:  # type: ignore[type-arg]
    bundle = json.loads((directory / "diagnostic-report.json").read_text())
    (dr,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    return dr  # type: ignore[no-any-return]


def _observations(directory: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    bundle = json.loads((directory / "diagnostic-report.json").read_text())
    return {
        e["resource"]["identifier"][0]["value"]: e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }


def _classified(p: float, band: Band) -> Classification:
    return Classification(p, band, {"MEL": p, "NV": 1.0 - p})


@pytest.mark.parametrize(
    ("probability", "band"),
    [(0.05, Band.BENIGN), (0.43, Band.INDETERMINATE), (0.93, Band.MALIGNANT), (None, None)],
)
def test_sr_and_fhir_report_status_agree_preliminary(
    tmp_path: Path, probability: float | None, band: Band | None
) -> None:
    """Item 1: decision support awaiting review is PRELIMINARY in the SR and ``preliminary`` in FHIR, every band,
    and for a refused image too."""
    if probability is None:
        case = make_case(status=AnalysisStatus.NOT_ANALYSABLE)
        result = case.result
    else:
        assert band is not None
        case = make_case()
        result = dataclasses.replace(case.result, classification=_classified(probability, band))
    directory = _write(tmp_path, result, case.source)
    sr = pydicom.dcmread(directory / "sr.dcm")
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert _report(directory)["status"] == "preliminary"
    assert all(o["status"] == "preliminary" for o in _observations(directory).values())


def test_preliminary_setting_off_no_longer_makes_a_final_report(tmp_path: Path) -> None:
    """``fhir.preliminary_when_indeterminate = false`` is deprecated: it cannot make FHIR disagree with the SR."""
    case = make_case()
    settings = dataclasses.replace(SETTINGS, fhir=dataclasses.replace(SETTINGS.fhir,
                                                                     preliminary_when_indeterminate=False))
    files = write_outputs(case.source, case.result, settings, tmp_path / "off")
    assert files.fhir_bundle is not None
    assert _report(files.directory)["status"] == "preliminary"
    assert pydicom.dcmread(files.sr).PreliminaryFlag == "PRELIMINARY"


def test_sr_carries_the_calibration_caveat_and_the_top_diagnosis(tmp_path: Path) -> None:
    """Item 2: what the FHIR conclusion says (no calibration, top diagnosis with its probability) is in the SR."""
    case = make_case(spacing_mm=None)
    directory = _write(tmp_path, case.result, case.source)
    texts = _texts(pydicom.dcmread(directory / "sr.dcm"))
    conclusion = _report(directory)["conclusion"]
    caveat = [t for t in texts if "no physical calibration" in t and "pixels" in t]
    assert caveat, texts
    assert caveat[0] in conclusion
    top = [t for t in texts if "Most likely lesion class: Melanoma (62.0%)" in t]
    assert top, texts
    assert top[0] in conclusion
    calibrated = make_case(spacing_mm=0.05)
    directory = _write(tmp_path, calibrated.result, calibrated.source, "calibrated")
    assert not [t for t in _texts(pydicom.dcmread(directory / "sr.dcm")) if "no physical calibration" in t]


def test_numbers_are_rounded_alike_in_sr_fhir_and_result_json(tmp_path: Path) -> None:
    """Item 3: 0.1 mm, 0.01 mm2, 3 significant digits for probabilities, in all three outputs."""
    case = make_case(spacing_mm=0.05)
    m = dataclasses.replace(
        case.result.measurements, max_diameter_mm=9.38939827678004, area_mm2=41.238761234,
        perimeter_mm=27.4444444, asymmetry=0.123456789, border_irregularity=1.0812345,
    )
    cls = Classification(0.06806897796152, Band.BENIGN, {"MEL": 0.06806897796152, "NV": 0.93193102203848})
    result = dataclasses.replace(case.result, measurements=m, classification=cls)
    directory = _write(tmp_path, result, case.source)
    nums = _nums(pydicom.dcmread(directory / "sr.dcm"))
    assert nums["103339001"] == ("9.4", "mm")  # long axis
    assert nums["42798000"] == ("41.24", "mm2")  # area
    assert nums["131191004"] == ("27.4", "mm")  # perimeter
    assert nums["MELPROB"] == ("0.0681", "1")
    assert nums["ASYMMETRY"][0] == "0.123"
    obs = _observations(directory)
    assert obs["lesion-max-diameter"]["valueQuantity"]["value"] == 9.4
    assert obs["lesion-area"]["valueQuantity"]["value"] == 41.24
    assert obs["melanoma-probability"]["valueQuantity"]["value"] == 6.81
    doc = json.loads((directory / "result.json").read_text())
    assert doc["measurements"]["max_diameter_mm"] == 9.4
    assert doc["measurements"]["area_mm2"] == 41.24
    assert doc["measurements"]["perimeter_mm"] == 27.4
    assert doc["classification"]["melanoma_probability"] == 0.0681
    assert doc["classification"]["diagnosis_probabilities"] == {"MEL": 0.0681, "NV": 0.932}
    assert "Melanoma probability 6.81%" in _report(directory)["conclusion"]


def test_pixel_area_has_its_own_unit(tmp_path: Path) -> None:
    """Item 3: an uncalibrated area is a whole number of pixels, in a UCUM unit distinct from pixel lengths."""
    case = make_case(spacing_mm=None)
    m = dataclasses.replace(case.result.measurements, max_diameter_px=64.4321, perimeter_px=250.5123)
    directory = _write(tmp_path, dataclasses.replace(case.result, measurements=m), case.source)
    nums = _nums(pydicom.dcmread(directory / "sr.dcm"))
    area_value, area_unit = nums["42798000"]
    assert float(area_value) == case.result.measurements.area_px
    assert (float(nums["103339001"][0]), nums["103339001"][1]) == (64, "{pixels}")  # whole pixels
    assert (float(nums["131191004"][0]), nums["131191004"][1]) == (251, "{pixels}")
    assert area_unit != "{pixels}" and area_unit.startswith("{") and area_unit.endswith("}") and " " not in area_unit
    obs = _observations(directory)
    (area_px,) = obs["lesion-area"]["component"]
    assert area_px["valueQuantity"]["code"] == area_unit
    (diameter_px,) = obs["lesion-max-diameter"]["component"]
    assert diameter_px["valueQuantity"]["code"] == "{pixels}" and diameter_px["valueQuantity"]["value"] == 64
    doc = json.loads((directory / "result.json").read_text())
    assert doc["measurements"]["max_diameter_px"] == 64 and doc["measurements"]["perimeter_px"] == 251


def test_a_refused_image_is_not_analysable_in_sr_fhir_and_picture(tmp_path: Path) -> None:
    """Item 4: no "Finding = Skin lesion" for a refused image; "not analysable" and the reason everywhere."""
    case = make_case(status=AnalysisStatus.NOT_ANALYSABLE)
    reason = case.result.reason
    assert reason
    directory = _write(tmp_path, case.result, case.source)
    sr = pydicom.dcmread(directory / "sr.dcm")
    findings = [
        it for it in _items(sr.ContentSequence)
        if "ConceptNameCodeSequence" in it and it.ConceptNameCodeSequence[0].CodeValue == "121071"  # Finding
    ]
    assert all(f.ConceptCodeSequence[0].CodeValue != "95324001" for f in findings)  # not "Skin lesion"
    assert any(t.startswith("Not analysable") and reason in t for t in _texts(sr))
    conclusion = _report(directory)["conclusion"]
    assert "Not analysable" in conclusion and reason in conclusion
    picture = cv2.cvtColor(cv2.imread(str(directory / "overlay.png")), cv2.COLOR_BGR2RGB)
    plain = render_overlay(case.result.source.rgb, None)
    assert picture.shape[0] >= plain.shape[0]
    if picture.shape == plain.shape:
        assert not np.array_equal(picture, plain)
    # the notice is written in white-on-dark text over the middle of the picture, not only the corner label
    h = picture.shape[0]
    middle = picture[h // 3: 2 * h // 3]
    assert (middle.min(axis=2) > 230).sum() > 50 and (middle.max(axis=2) < 40).sum() > 0.2 * middle[..., 0].size


def test_band_meaning_and_calibration_travel_into_sr_fhir_and_result_json(tmp_path: Path) -> None:
    """Issue 17: what the band means and which calibration produced it, in words, in all three outputs."""
    case = make_case(spacing_mm=0.05)
    meaning = "Low suspicion: in validation (site X), 1 in 62 melanomas fell in this band."
    cal = "site X (2026-12-02T00:00:00+00:00, sha256 0123456789ab)"
    cls = Classification(0.05, Band.BENIGN, {"MEL": 0.05, "NV": 0.95}, band_meaning=meaning, calibration=cal)
    directory = _write(tmp_path, dataclasses.replace(case.result, classification=cls), case.source)
    texts = _texts(pydicom.dcmread(directory / "sr.dcm"))
    conclusion = _report(directory)["conclusion"]
    assert meaning in texts and meaning in conclusion
    assert any(cal in t for t in texts) and cal in conclusion
    doc = json.loads((directory / "result.json").read_text())
    assert doc["classification"]["band_meaning"] == meaning and doc["classification"]["calibration"] == cal
