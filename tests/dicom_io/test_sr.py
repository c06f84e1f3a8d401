"""TID 1500 report: valid IOD (dciodvfy), DCMTK parses it, highdicom reads it, references resolve."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import pydicom
from dicom_output_cases import MODELS, as_multiframe, dciodvfy, dsrdump, make_case

from dermnode.dicom_io import codes
from dermnode.dicom_io.seg import build_segmentation, device_uid
from dermnode.dicom_io.sr import COMPREHENSIVE_3D_SR_STORAGE, DISCLAIMER, build_report
from dermnode.settings import OutputSettings
from dermnode.vocabulary import AnalysisStatus

SETTINGS = OutputSettings()


def _items(items, found=None):  # type: ignore[no-untyped-def]
    """All content items of a content tree, depth first."""
    found = [] if found is None else found
    for item in items:
        found.append(item)
        _items(item.get("ContentSequence", []), found)
    return found


def _named(ds: pydicom.Dataset, value: str, scheme: str) -> list[pydicom.Dataset]:
    return [
        it
        for it in _items(ds.ContentSequence)
        if "ConceptNameCodeSequence" in it
        and (it.ConceptNameCodeSequence[0].CodeValue, it.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        == (value, scheme)
    ]


def _validate(path: Path) -> None:
    errors, _warnings = dciodvfy(path)
    assert errors == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout


def test_report_of_an_analysed_image(analysed_case, save) -> None:  # type: ignore[no-untyped-def]
    source, result = analysed_case.source, analysed_case.result
    seg = build_segmentation(source, result, SETTINGS, software_version="0.1.0")
    sr = build_report(source, result, seg, SETTINGS, software_version="0.1.0")
    seg_path, sr_path = save(seg, "seg.dcm"), save(sr, "sr.dcm")
    _validate(sr_path)

    back = hd.sr.srread(sr_path)
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesNumber == SETTINGS.sr_series_number
    assert back.SeriesDescription == SETTINGS.sr_series_description
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.PreliminaryFlag == "PRELIMINARY"  # decision support awaiting review, as the FHIR report
    assert back.PatientID == source.PatientID
    assert back.DeviceUID == device_uid(MODELS)

    groups = back.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.reference_type.value == "121214"  # Referenced Segmentation Frame

    # SR -> SEG instance + segment number -> source image
    (ref_item,) = _named(back, "121214", "DCM")
    ref = ref_item.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == seg.SOPClassUID
    assert ref.ReferencedSegmentNumber == 1
    assert "ReferencedFrameNumber" not in ref  # mutually exclusive with the segment number (dciodvfy error)
    seg_back = hd.seg.segread(seg_path)
    assert seg_back.get_segment_description(int(ref.ReferencedSegmentNumber)).segment_label == "Lesion"
    (source_item,) = _named(back, "121233", "DCM")
    assert source_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    source_uids = (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    assert source_uids in seg_back.get_source_image_uids()
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}

    # measurements: mm when calibrated, pixels otherwise; probability only with a classification
    measured = {m.name.value: m for m in group.get_measurements()}
    calibrated = result.measurements.area_mm2 is not None
    assert measured["42798000"].unit.value == ("mm2" if calibrated else "{square_pixels}")
    assert measured["103339001"].unit.value == ("mm" if calibrated else "{pixels}")
    expected_area = result.measurements.area_mm2 if calibrated else result.measurements.area_px
    assert abs(measured["42798000"].value - expected_area) < 1e-6
    assert measured["NCOLOURS"].value == 2
    assert measured["TDS"].value == result.measurements.tds
    assert "ASYMMETRY" in measured and "BORDERIREG" not in measured and "BORDERIRREG" in measured
    for item in _items(back.ContentSequence):  # TID 4019 on every measurement and on the group
        concept = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        if item.ValueType == "NUM" or concept == "125007":  # Measurement Group
            names = [c.ConceptNameCodeSequence[0].CodeValue for c in item.ContentSequence]
            assert "111001" in names and "111003" in names

    evaluations = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
    if result.classification is None:
        assert "MELPROB" not in measured
        assert evaluations == {}
    else:
        assert measured["MELPROB"].value == result.classification.melanoma_probability
        assert measured["MELPROB"].unit.value == "1"
        assert evaluations["111023"].value == "1162635006"  # top diagnosis MEL -> malignant melanoma
        assert evaluations["RISKBAND"].value == "280416009"  # indeterminate

    texts = [it.TextValue for it in _items(back.ContentSequence) if it.ValueType == "TEXT"]
    assert DISCLAIMER in texts
    (procedure,) = _named(back, "121058", "DCM")
    assert procedure.ConceptCodeSequence[0].CodeValue == codes.PROCEDURE_DERMOSCOPY.value
    schemes = {s.CodingSchemeDesignator for s in back.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME in schemes


def test_report_of_a_not_analysable_image(not_analysable_case, save) -> None:  # type: ignore[no-untyped-def]
    source, result = not_analysable_case.source, not_analysable_case.result
    sr = build_report(source, result, None, SETTINGS, software_version="0.1.0")
    path = save(sr, "sr-na.dcm")
    _validate(path)
    back = hd.sr.srread(path)
    assert _named(back, "121214", "DCM") == []  # no SEG reference
    texts = [it.TextValue for it in _items(back.ContentSequence) if it.ValueType == "TEXT"]
    assert DISCLAIMER in texts
    assert any(t.startswith("Not analysable: ") and result.reason in t for t in texts)
    (outcome,) = _named(back, "OUTCOME", codes.PRIVATE_SCHEME)
    assert outcome.ConceptCodeSequence[0].CodeValue == "NOTANALYSABLE"
    (library_source,) = _named(back, "260753009", "SCT")
    assert library_source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    evidence = [
        inst.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    ]
    assert evidence == [source.SOPInstanceUID]


def test_not_analysable_report_ignores_a_passed_segmentation() -> None:
    analysed = make_case()
    seg = build_segmentation(analysed.source, analysed.result, SETTINGS, software_version="0.1.0")
    na = make_case(status=AnalysisStatus.NOT_ANALYSABLE)
    sr = build_report(na.source, na.result, seg, SETTINGS, software_version="0.1.0")
    assert _named(sr, "121214", "DCM") == []


def test_report_uids_are_deterministic() -> None:
    case = make_case()
    seg = build_segmentation(case.source, case.result, SETTINGS, software_version="0.1.0")
    a = build_report(case.source, case.result, seg, SETTINGS, software_version="0.1.0")
    b = build_report(case.source, case.result, seg, SETTINGS, software_version="0.1.0")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    tracking_a = _named(a, "112040", "DCM")[0].UID
    assert tracking_a == _named(b, "112040", "DCM")[0].UID
    assert tracking_a == seg.SegmentSequence[0].TrackingUID  # the SEG segment and the SR group track one lesion
    other = dataclasses.replace(case.result, models=(MODELS[0], dataclasses.replace(MODELS[1], sha256="c3" * 32)))
    c = build_report(case.source, other, seg, SETTINGS, software_version="0.1.0")
    assert c.SOPInstanceUID != a.SOPInstanceUID
    d = build_report(case.source, case.result, seg, SETTINGS, software_version="0.1.0", config_digest="other")
    assert d.SOPInstanceUID != a.SOPInstanceUID and d.SeriesInstanceUID != a.SeriesInstanceUID


def test_report_of_a_multiframe_source_names_the_analysed_frame(save) -> None:  # type: ignore[no-untyped-def]
    case = make_case()
    source = as_multiframe(case.source, 2)
    seg = build_segmentation(source, case.result, SETTINGS, software_version="0.1.0")
    sr = build_report(source, case.result, seg, SETTINGS, software_version="0.1.0")
    _validate(save(sr, "sr-multiframe.dcm"))
    images = [
        item
        for item in _items(sr.ContentSequence)
        if item.ValueType == "IMAGE" and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    ]
    assert images, "the report references its source image"
    assert all(item.ReferencedSOPSequence[0].ReferencedFrameNumber == 1 for item in images)


def test_uncoded_top_diagnosis_is_left_out() -> None:
    case = make_case()
    cls = dataclasses.replace(case.result.classification, diagnosis_probabilities={"XYZ": 0.9, "MEL": 0.1})
    result = dataclasses.replace(case.result, classification=cls)
    sr = build_report(case.source, result, None, SETTINGS, software_version="0.1.0")
    assert _named(sr, "111023", "DCM") == []
    assert len(_named(sr, "RISKBAND", codes.PRIVATE_SCHEME)) == 1


def test_report_content_is_the_written_tree_and_references_need_evidence(analysed_case) -> None:  # type: ignore[no-untyped-def]
    """``sr.content`` is the tree that is written (highdicom is given the root only, see build_report); an IMAGE
    item referencing an instance that is not in the evidence is refused."""
    import pytest

    from dermnode.dicom_io.sr import _check_evidence
    from dermnode.errors import OutputError

    source, result = analysed_case.source, analysed_case.result
    seg = build_segmentation(source, result, SETTINGS, software_version="0.1.0")
    sr = build_report(source, result, seg, SETTINGS, software_version="0.1.0")
    (root,) = sr.content
    assert root.ContentSequence is sr.ContentSequence and len(sr.ContentSequence) > 3
    assert root.ConceptNameCodeSequence == sr.ConceptNameCodeSequence
    _check_evidence(root, [source, seg])
    with pytest.raises(OutputError, match="not in its evidence"):
        _check_evidence(root, [source])  # the SEG is referenced
