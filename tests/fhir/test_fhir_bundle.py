"""Transaction Bundle content for R4 (R4B models) and R5."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fhir.resources.bundle import Bundle as BundleR5
from fhir.resources.R4B.bundle import Bundle as BundleR4B
from fhir_fixtures import (
    DERIVED,
    ISSUED,
    KINDS,
    SEG_SERIES,
    SEG_UID,
    SR_SERIES,
    SR_UID,
    make_result,
    make_source,
    overlay_png,
    resources,
)

from dermnode.errors import OutputError
from dermnode.fhir import codes as C
from dermnode.fhir.bundle import DISCLAIMER, build_bundle, effective_datetime
from dermnode.settings import FhirSettings


def build(kind: str, version: str = "R4", **overrides: Any) -> dict[str, Any]:
    ds = make_source(calibrated=kind != "uncalibrated")
    settings = FhirSettings(**{"version": version, **overrides.pop("settings", {})})
    kwargs: dict[str, Any] = {
        "sr_sop_instance_uid": SR_UID,
        "seg_sop_instance_uid": SEG_UID,
        "overlay_png": overlay_png(),
        "settings": settings,
        "issued": ISSUED,
        "sr_series_instance_uid": SR_SERIES,
        "seg_series_instance_uid": SEG_SERIES,
    }
    kwargs.update(overrides)
    return build_bundle(ds, make_result(ds, kind), **kwargs)


def report(bundle: dict[str, Any]) -> dict[str, Any]:
    (dr,) = resources(bundle, "DiagnosticReport")
    return dr


def observation(bundle: dict[str, Any], code: C.Code) -> dict[str, Any]:
    (obs,) = [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == code.code]
    return obs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", ["R4", "R5"])
def test_every_bundle_parses_with_its_models(kind: str, version: str) -> None:
    bundle = build(kind, version)
    model = (BundleR5 if version == "R5" else BundleR4B).model_validate(bundle)
    assert model.type == "transaction"
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for entry in bundle["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["ifNoneExist"].startswith("identifier=")
    dr = report(bundle)
    assert DISCLAIMER in dr["conclusion"]
    assert ("study" in dr) == (version == "R5") and ("imagingStudy" in dr) == (version == "R4")


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("kind", ["calibrated", "not_analysable"])
def test_presentation_state_and_key_image_are_series_of_the_imaging_study(kind: str, version: str) -> None:
    """Issue 18: the presentation state and key image are listed in the ImagingStudy, each in its own series with
    its SOP class, number and description; the bundle still validates."""
    bundle = build(kind, version, derived_instances=DERIVED)
    (BundleR5 if version == "R5" else BundleR4B).model_validate(bundle)
    (study,) = resources(bundle, "ImagingStudy")
    series = {s["uid"]: s for s in study["series"]}
    for d in DERIVED:
        entry = series[d.series_instance_uid]
        modality = entry["modality"]["coding"][0] if version == "R5" else entry["modality"]
        assert modality["code"] == d.modality
        assert entry["number"] == d.series_number and entry["description"] == d.series_description
        (instance,) = entry["instance"]
        assert instance == {"uid": d.sop_instance_uid, "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                     "code": f"urn:oid:{d.sop_class_uid}"}}
    assert study["numberOfSeries"] == len(study["series"])
    assert study["numberOfInstances"] == sum(len(s["instance"]) for s in study["series"])
    codes = {c["coding"][0]["code"] if version == "R5" else c["code"] for c in study["modality"]}
    assert {"PR", "OT"} <= codes
    # without the ImagingStudy resource nothing is listed, and nothing breaks
    plain = build(kind, version, derived_instances=DERIVED, settings={"imaging_study_resource": False})
    assert resources(plain, "ImagingStudy") == []


def test_rebuild_is_identical() -> None:
    assert build("calibrated") == build("calibrated")
    assert build("calibrated", "R5") == build("calibrated", "R5")


def test_calibrated_content() -> None:
    bundle = build("calibrated")
    dr = report(bundle)
    assert dr["status"] == "preliminary"  # decision support awaiting review (issue 16 item 1)
    assert dr["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{SR_UID}"}]
    assert dr["code"]["coding"][0] == C.REPORT_CODE.coding()
    assert dr["conclusionCode"][0]["coding"][0] == {
        "system": C.SNOMED,
        "code": "1162635006",
        "display": "Malignant melanoma",
    }
    assert len(dr["result"]) == len(resources(bundle, "Observation")) == 9
    prob = observation(bundle, C.MELANOMA_PROBABILITY)
    assert prob["valueQuantity"] == {"value": 91.0, "unit": "%", "system": C.UCUM, "code": "%"}
    assert prob["identifier"] == [{"system": f"urn:oid:{SR_UID}", "value": "melanoma-probability"}]
    assert prob["status"] == "preliminary"
    assert prob["device"]["reference"] == resources_url(bundle, "Device")
    assert prob["derivedFrom"][0]["reference"] == resources_url(bundle, "ImagingStudy")
    assert prob["subject"]["reference"] == resources_url(bundle, "Patient")
    area = observation(bundle, C.LESION_AREA)
    assert area["valueQuantity"]["code"] == "mm2" and area["valueQuantity"]["value"] == pytest.approx(1.0)
    assert area["component"][0]["valueQuantity"]["code"] == "{square_pixels}"
    diam = observation(bundle, C.MAX_DIAMETER)
    assert diam["valueQuantity"]["code"] == "mm" and diam["valueQuantity"]["value"] == 1.3  # 1.25 mm to 0.1 mm
    top = observation(bundle, C.TOP_DIAGNOSIS)
    assert [c["valueQuantity"]["value"] for c in top["component"]] == [88.0, 7.0, 5.0]
    colours = observation(bundle, C.COLOUR_COUNT)
    assert colours["valueInteger"] == 3
    assert {c["valueCodeableConcept"]["coding"][0]["code"] for c in colours["component"]} == {
        "light-brown",
        "dark-brown",
        "blue-gray",
    }
    assert observation(bundle, C.TDS)["valueQuantity"]["value"] == pytest.approx(4.65)
    (study,) = resources(bundle, "ImagingStudy")
    assert {s["modality"]["code"] for s in study["series"]} == {"DMS", "SEG", "SR"}
    assert study["numberOfInstances"] == 3
    form = dr["presentedForm"][0]
    assert form["contentType"] == "image/png" and base64.b64decode(form["data"]) == overlay_png()


def resources_url(bundle: dict[str, Any], rtype: str) -> str:
    (url,) = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]
    return url


def test_uncalibrated_sizes_only_in_pixels() -> None:
    bundle = build("uncalibrated")
    for code, unit in ((C.LESION_AREA, "{square_pixels}"), (C.MAX_DIAMETER, "{pixels}")):
        obs = observation(bundle, code)
        assert "valueQuantity" not in obs
        assert obs["dataAbsentReason"]["coding"][0]["code"] == "unknown"
        assert obs["component"][0]["valueQuantity"]["code"] == unit
    assert not [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == C.TDS.code]
    assert "pixels" in report(bundle)["conclusion"]


def test_indeterminate_is_preliminary_even_when_configured_otherwise() -> None:
    """fhir.preliminary_when_indeterminate is deprecated: every report is preliminary, as the SR (item 1)."""
    assert report(build("indeterminate"))["status"] == "preliminary"
    bundle = build("indeterminate", settings={"preliminary_when_indeterminate": False})
    assert report(bundle)["status"] == "preliminary"
    band = observation(bundle, C.MELANOMA_BAND)
    assert band["valueCodeableConcept"]["coding"][0]["code"] == "indeterminate"
    # NV (top class) is sent with its SNOMED CT code and the local ISIC class code.
    codings = report(bundle)["conclusionCode"][0]["coding"]
    assert [c["system"] for c in codings] == [C.SNOMED, C.LOCAL_DIAGNOSIS]


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_not_analysable(version: str) -> None:
    bundle = build("not_analysable", version)
    dr = report(bundle)
    assert dr["status"] == "preliminary"
    assert "Not analysable: image out of focus" in dr["conclusion"]
    assert "result" not in dr and "conclusionCode" not in dr and "presentedForm" not in dr
    assert resources(bundle, "Observation") == []


def test_options_overlay_and_study_reference() -> None:
    bundle = build("calibrated", settings={"include_overlay": False, "imaging_study_resource": False})
    dr = report(bundle)
    assert "presentedForm" not in dr
    assert resources(bundle, "ImagingStudy") == []
    ref = dr["imagingStudy"][0]
    assert ref["type"] == "ImagingStudy"
    assert ref["identifier"]["system"] == "urn:dicom:uid"
    assert ref["identifier"]["value"].startswith("urn:oid:")
    assert report(build("calibrated", overlay_png=None)).get("presentedForm") is None


def test_without_sr_identifiers_are_still_deterministic() -> None:
    a = build("calibrated", sr_sop_instance_uid=None, seg_sop_instance_uid=None)
    assert a == build("calibrated", sr_sop_instance_uid=None, seg_sop_instance_uid=None)
    assert report(a)["identifier"][0]["value"].startswith("urn:uuid:")
    (study,) = resources(a, "ImagingStudy")
    assert len(study["series"]) == 1


def test_patient_identifier_system() -> None:
    ds = make_source()
    result = make_result(ds, "calibrated")

    def patient_ident(settings: FhirSettings) -> dict[str, str]:
        bundle = build_bundle(
            ds, result, sr_sop_instance_uid=None, seg_sop_instance_uid=None, overlay_png=None, settings=settings
        )
        (patient,) = resources(bundle, "Patient")
        return dict(patient["identifier"][0])

    assert patient_ident(FhirSettings()) == {"system": C.DEFAULT_PATIENT_ID_SYSTEM, "value": "DERM0042"}
    assert patient_ident(FhirSettings(patient_identifier_system="http://hospital.example/mrn"))["system"] == (
        "http://hospital.example/mrn"
    )
    ds.IssuerOfPatientID = "2.16.840.1.113883.3.1"
    assert patient_ident(FhirSettings())["system"] == "urn:oid:2.16.840.1.113883.3.1"
    ds.PatientID = "A|B"
    bundle = build_bundle(
        ds, result, sr_sop_instance_uid=None, seg_sop_instance_uid=None, overlay_png=None, settings=FhirSettings()
    )
    assert bundle["entry"][0]["request"]["ifNoneExist"].endswith("|A%5C%7CB")
    ds.PatientID = ""
    with pytest.raises(OutputError):
        build_bundle(
            ds, result, sr_sop_instance_uid=None, seg_sop_instance_uid=None, overlay_png=None, settings=FhirSettings()
        )


def test_effective_datetime() -> None:
    ds = make_source()
    ds.AcquisitionDateTime = "20240229153000.123+0100"
    assert effective_datetime(ds) == "2024-02-29T15:30:00.123+01:00"
    ds.AcquisitionDateTime = "20240229153000"
    assert effective_datetime(ds) == "2024-02-29"  # no time zone known: date only (FHIR needs a zone)
    ds.TimezoneOffsetFromUTC = "-0500"
    assert effective_datetime(ds) == "2024-02-29T15:30:00-05:00"
    del ds.AcquisitionDateTime
    ds.ContentDate, ds.ContentTime = "20230102", "0304"
    assert effective_datetime(ds) == "2023-01-02T03:04:00-05:00"
    del ds.ContentDate
    ds.StudyDate, ds.StudyTime = "20220101", ""
    assert effective_datetime(ds) == "2022-01-01"


def test_unsupported_version_raises() -> None:
    with pytest.raises(OutputError):
        build("calibrated", settings={"version": "STU3"})


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_encode_bundle_is_the_validated_json_of_build_bundle(version: str) -> None:
    """The file the pipeline writes: the same bundle as build_bundle, validated once, serialised once (compact)."""
    import json

    from dermnode.fhir.bundle import encode_bundle

    ds = make_source(calibrated=True)
    kwargs: dict[str, Any] = {
        "sr_sop_instance_uid": SR_UID, "seg_sop_instance_uid": SEG_UID, "overlay_png": overlay_png(),
        "settings": FhirSettings(version=version), "issued": ISSUED,
    }
    result = make_result(ds, "calibrated")
    bundle = build_bundle(ds, result, **kwargs)
    data = encode_bundle(bundle)
    assert isinstance(data, bytes) and b"\n" not in data
    assert json.loads(data) == bundle == build_bundle(ds, result, **kwargs)


def test_jpeg_overlay_is_attached_as_jpeg() -> None:
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(64)) + b"\xff\xd9"
    dr = report(build("calibrated", overlay_jpeg=jpeg))
    (form,) = dr["presentedForm"]
    assert form["contentType"] == "image/jpeg" and base64.b64decode(form["data"]) == jpeg
    assert form["size"] == len(jpeg)
    # not attached when the settings say so
    assert "presentedForm" not in report(build("calibrated", overlay_jpeg=jpeg,
                                               settings={"include_overlay": False}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("imaging_study", [True, False])
def test_bundle_is_what_its_models_would_write(kind: str, version: str, imaging_study: bool) -> None:
    """The bundle is validated once and then written as built, not re-serialised by the models: so it must be
    exactly the models' own serialisation of it (no None, instants as the models write them)."""
    import datetime as dt
    import json

    model = BundleR5 if version == "R5" else BundleR4B
    for issued in (ISSUED, dt.datetime(2026, 12, 2, 19, 3, 27, 123456, tzinfo=dt.UTC)):
        bundle = build(kind, version, derived_instances=DERIVED, issued=issued,
                       settings={"imaging_study_resource": imaging_study})
        assert json.loads(model.model_validate(bundle).model_dump_json(exclude_none=True)) == bundle
