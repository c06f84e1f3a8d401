"""Coded concepts: real designators (SCT, not SRT), private codes only under the 99DERMNODE scheme, and every
concept documented in docs/dicom-conformance.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.sr.coding import Code

from dermnode.dicom_io import codes
from dermnode.vocabulary import Band

DOC = Path(__file__).resolve().parents[2] / "docs" / "dicom-conformance.md"


def all_codes() -> list[Code]:
    found: list[Code] = []
    for name in dir(codes):
        value = getattr(codes, name)
        if isinstance(value, Code):
            found.append(value)
    for enum_cls in (codes.BandCode, codes.MeasurementName, codes.Unit):
        found.extend(member.value for member in enum_cls)
    found.extend(codes.SUSPECTED_FINDING_CODES.values())
    return found


def test_every_isic_class_has_a_code() -> None:
    for cls in ("AK", "BCC", "DF", "MEL", "NV", "BKL", "SK", "SCC", "VASC"):
        code = codes.suspected_finding_code(cls)
        assert code is not None, cls
    assert codes.suspected_finding_code("mel") == codes.suspected_finding_code("MEL")
    assert codes.suspected_finding_code("UNKNOWN") is None


UNVERIFIED_OR_GROUPING = {codes.IsicClass.BKL, codes.IsicClass.VASC, codes.IsicClass.DF, codes.IsicClass.SK}


def test_clinical_findings_are_snomed_except_groupings_and_unverified() -> None:
    for cls, code in codes.SUSPECTED_FINDING_CODES.items():
        if cls in UNVERIFIED_OR_GROUPING:
            assert code.scheme_designator == codes.PRIVATE_SCHEME
            assert not code.value.isdigit(), "a private code must never look like a SNOMED CT code"
        else:
            assert code.scheme_designator == "SCT", cls
            assert code.value.isdigit(), cls
    values = [c.value for c in codes.SUSPECTED_FINDING_CODES.values()]
    assert len(set(values)) == len(values)


def test_bands_map_to_distinct_snomed_codes() -> None:
    band_codes = {band: codes.band_code(band) for band in Band}
    assert {c.value for c in band_codes.values()} == {"30807003", "280416009", "21594007"}
    assert all(c.scheme_designator == "SCT" for c in band_codes.values())


def test_designators_are_real_or_private() -> None:
    allowed = {"SCT", "DCM", "UCUM", "UMLS", codes.PRIVATE_SCHEME}
    for code in all_codes():
        assert code.scheme_designator in allowed, code
        assert code.scheme_designator != "SRT"
        if code.scheme_designator == codes.PRIVATE_SCHEME:
            assert not code.value.isdigit(), f"a private code must not look like a SNOMED CT id: {code}"
    assert codes.PRIVATE_SCHEME.startswith("99")


def test_units_are_ucum() -> None:
    assert {u.value.value for u in codes.Unit} == {"mm2", "mm", "{pixels}", "{square_pixels}", "1", "%"}
    assert all(u.value.scheme_designator == "UCUM" for u in codes.Unit)


def test_private_scheme_identification_item() -> None:
    item = codes.private_scheme_identification()
    assert item.CodingSchemeDesignator == codes.PRIVATE_SCHEME
    assert item.CodingSchemeName


@pytest.mark.skipif(not DOC.exists(), reason="docs/dicom-conformance.md missing")
def test_every_code_is_documented() -> None:
    text = DOC.read_text()
    for code in all_codes():
        assert f"`{code.value}`" in text, f"{code} is not in the code table of {DOC.name}"
