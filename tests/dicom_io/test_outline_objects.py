"""The presentation state and key image of a result (issue 18 phase 2): deterministic UIDs, shared lesion tracking
UID and device serial number with the SEG, the SR's references to them (dciodvfy, dsrdump), multi-frame frame 1,
failures reported instead of raised."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from dicom_output_cases import as_multiframe, dciodvfy, dsrdump, make_case

from dermnode.dicom_io.outline_objects import build_outline_objects, key_image_uids, presentation_state_uids
from dermnode.dicom_io.seg import build_segmentation, device_serial_number, lesion_tracking_uid
from dermnode.dicom_io.sr import build_report
from dermnode.errors import OutputError
from dermnode.settings import OutputSettings
from dermnode.vocabulary import AnalysisStatus

SETTINGS = OutputSettings(burned_in_image=True)


def _items(items, found=None):  # type: ignore[no-untyped-def]
    found = [] if found is None else found
    for item in items:
        found.append(item)
        _items(item.get("ContentSequence", []), found)
    return found


def _build(case, settings: OutputSettings = SETTINGS, digest: str = "d"):  # type: ignore[no-untyped-def]
    seg = None
    if case.result.status is AnalysisStatus.ANALYSED:
        seg = build_segmentation(case.source, case.result, settings, software_version="0.1.0", config_digest=digest)
    objects = build_outline_objects(
        case.source, case.result, settings, seg_sop_instance_uid=None if seg is None else str(seg.SOPInstanceUID),
        software_version="dermnode 0.1.0", config_digest=digest,
    )
    return seg, objects


@pytest.mark.parametrize("multiframe", [False, True])
def test_sr_references_presentation_state_and_key_image(analysed_case, save, multiframe: bool) -> None:  # type: ignore[no-untyped-def]
    case = analysed_case
    if multiframe:
        case = dataclasses.replace(case, source=as_multiframe(case.source))
    seg, objects = _build(case)
    sop_uid = case.source.SOPInstanceUID
    pr, ki = objects.presentation_state, objects.key_image
    assert pr is not None and ki is not None and objects.errors == {}
    sr = build_report(case.source, case.result, seg, SETTINGS, software_version="0.1.0", presentation_state=pr,
                      key_image=ki)
    for obj, name in ((pr, "pr.dcm"), (ki, "key-image.dcm"), (sr, "sr.dcm")):
        errors, _ = dciodvfy(save(obj, name))
        assert errors == [], name
    dump = dsrdump(save(sr, "sr.dcm"))
    assert dump.returncode == 0 and "CSPS" in dump.stdout  # DCMTK sees the presentation state of the source
    # the presentation state of the source image in the Image Library entry
    (source_item,) = [it for it in _items(sr.ContentSequence)
                      if it.ValueType == "IMAGE" and it.ConceptNameCodeSequence[0].CodeMeaning == "Source"]
    (ref,) = source_item.ReferencedSOPSequence
    (applied,) = ref.ReferencedSOPSequence
    assert (applied.ReferencedSOPClassUID, applied.ReferencedSOPInstanceUID) == (pr.SOPClassUID, pr.SOPInstanceUID)
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {case.source.SOPInstanceUID, seg.SOPInstanceUID, pr.SOPInstanceUID, ki.SOPInstanceUID}
    # the same lesion and device as the SEG
    (outline_annotation,) = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "LESION_OUTLINE"]
    assert outline_annotation.GraphicObjectSequence[0].TrackingUID == seg.SegmentSequence[0].TrackingUID
    assert seg.SegmentSequence[0].TrackingUID == lesion_tracking_uid(case.source.SOPInstanceUID, case.result.models)
    assert pr.DeviceSerialNumber == ki.DeviceSerialNumber == seg.DeviceSerialNumber
    assert pr.DeviceSerialNumber == device_serial_number(case.result.models)
    # the analysed frame of a multi-frame source: frame 1 (every annotation names it)
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == sop_uid
    for annotation in pr.GraphicAnnotationSequence:
        (image_ref,) = annotation.ReferencedImageSequence
        assert image_ref.ReferencedSOPInstanceUID == sop_uid
        if multiframe:
            assert image_ref.ReferencedFrameNumber == 1
        else:
            assert "ReferencedFrameNumber" not in image_ref
    if multiframe:
        assert ki.SourceImageSequence[0].ReferencedFrameNumber == 1
        assert source_item.ReferencedSOPSequence[0].ReferencedFrameNumber == 1


def test_uids_are_deterministic_and_follow_content() -> None:
    case = make_case()
    seg, first = _build(case)
    _, again = _build(case)
    _, other = _build(case, digest="other settings")
    assert first.presentation_state is not None and again.presentation_state is not None
    assert first.key_image is not None and again.key_image is not None
    assert other.presentation_state is not None and other.key_image is not None
    assert first.presentation_state.SOPInstanceUID == again.presentation_state.SOPInstanceUID
    assert first.key_image.SOPInstanceUID == again.key_image.SOPInstanceUID
    assert first.presentation_state.SOPInstanceUID != other.presentation_state.SOPInstanceUID
    assert first.key_image.SeriesInstanceUID != other.key_image.SeriesInstanceUID
    uids = {*presentation_state_uids(case.source, case.result, str(seg.SOPInstanceUID), SETTINGS, "d"),
            *key_image_uids(case.source, case.result, str(seg.SOPInstanceUID), SETTINGS, "d")}
    assert uids == {first.presentation_state.SOPInstanceUID, first.presentation_state.SeriesInstanceUID,
                    first.key_image.SOPInstanceUID, first.key_image.SeriesInstanceUID}


def test_not_analysable_result_gets_both_with_the_reason(save) -> None:  # type: ignore[no-untyped-def]
    case = make_case(status=AnalysisStatus.NOT_ANALYSABLE)
    _, objects = _build(case)
    pr, ki = objects.presentation_state, objects.key_image
    assert pr is not None and ki is not None
    texts = [t.UnformattedTextValue for a in pr.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    assert " ".join(texts).startswith("not analysable: ")
    assert dciodvfy(save(pr, "pr.dcm"))[0] == [] and dciodvfy(save(ki, "ki.dcm"))[0] == []
    sr = build_report(case.source, case.result, None, SETTINGS, software_version="0.1.0", presentation_state=pr,
                      key_image=ki)
    assert dciodvfy(save(sr, "sr.dcm"))[0] == []


def test_switched_off_and_failures_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case()
    _, none = _build(case, OutputSettings(presentation_state=False, burned_in_image=False))
    assert none.presentation_state is None and none.key_image is None and none.errors == {}
    _, pr_only = _build(case, OutputSettings())
    assert pr_only.presentation_state is not None and pr_only.key_image is None

    from dermnode.dicom_io import outline_objects

    def refuse(*args: object, **kwargs: object) -> None:
        raise OutputError("refused by the test")

    monkeypatch.setattr(outline_objects, "build_key_image", refuse)
    _, failed = _build(case)
    assert failed.presentation_state is not None and failed.key_image is None
    assert failed.errors == {"key_image": "refused by the test"}


def test_sr_refuses_an_object_of_another_study() -> None:
    case = make_case()
    seg, objects = _build(case)
    assert objects.presentation_state is not None
    other = copy.deepcopy(objects.presentation_state)  # (highdicom shares the study's elements with the source)
    other.StudyInstanceUID = "1.2.3.4"
    assert case.source.StudyInstanceUID != "1.2.3.4"
    with pytest.raises(OutputError, match="another study"):
        build_report(case.source, case.result, seg, SETTINGS, software_version="0.1.0", presentation_state=other)
