"""Lesion SEG: valid IOD (dciodvfy), pixel-exact round trip through highdicom, references, determinism."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from dicom_output_cases import MODELS, as_multiframe, dciodvfy, make_case

from dermnode.dicom_io.seg import SEGMENTATION_STORAGE, build_segmentation, device_uid
from dermnode.errors import OutputError
from dermnode.settings import OutputSettings
from dermnode.vocabulary import ModelIdentity

SETTINGS = OutputSettings(institution_name="Test Clinic")


def _mask_from(seg: hd.seg.Segmentation, source_uid: str) -> np.ndarray:
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_uid], segment_numbers=[1])
    return np.asarray(pixels)[0, :, :, 0]


def test_binary_seg_is_valid_and_round_trips(analysed_case, save) -> None:  # type: ignore[no-untyped-def]
    seg = build_segmentation(analysed_case.source, analysed_case.result, SETTINGS, software_version="0.1.0")
    path = save(seg, "seg.dcm")

    errors, _warnings = dciodvfy(path)
    assert errors == []

    back = hd.seg.segread(path)
    assert back.SOPClassUID == SEGMENTATION_STORAGE
    assert back.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert back.number_of_segments == 1
    mask = _mask_from(back, analysed_case.source.SOPInstanceUID)
    assert mask.dtype == np.bool_ or set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask.astype(bool), analysed_case.result.mask)

    # same study, own series, settings applied, derivation reference to the colour source
    assert back.StudyInstanceUID == analysed_case.source.StudyInstanceUID
    assert back.SeriesInstanceUID != analysed_case.source.SeriesInstanceUID
    assert back.SeriesNumber == SETTINGS.seg_series_number
    assert back.SeriesDescription == SETTINGS.seg_series_description
    assert back.FrameOfReferenceUID == analysed_case.source.FrameOfReferenceUID
    assert "PatientOrientation" in back
    refs = back.get_source_image_uids()
    assert (
        analysed_case.source.StudyInstanceUID,
        analysed_case.source.SeriesInstanceUID,
        analysed_case.source.SOPInstanceUID,
    ) in refs
    assert back.file_meta.TransferSyntaxUID.is_little_endian and not back.file_meta.TransferSyntaxUID.is_compressed

    desc = back.get_segment_description(1)
    assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert desc.segmented_property_type.value == "95324001"
    algo = desc.algorithm_identification[0]
    assert algo.AlgorithmName == "lesion-seg-unet"
    assert algo.AlgorithmVersion == "1.2.0"
    assert MODELS[0].sha256 in algo.AlgorithmParameters

    ours = [
        item
        for item in back.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and item.Manufacturer == SETTINGS.manufacturer
    ]
    assert len(ours) == 1
    assert ours[0].ManufacturerModelName == "dermnode"
    assert ours[0].SoftwareVersions == "0.1.0"
    assert back.DeviceUID == device_uid(MODELS)


def test_fractional_seg_holds_the_probability_map(save) -> None:  # type: ignore[no-untyped-def]
    case = make_case()
    settings = dataclasses.replace(SETTINGS, fractional_seg=True)
    seg = build_segmentation(case.source, case.result, settings, software_version="0.1.0")
    path = save(seg, "seg-fractional.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = hd.seg.segread(path)
    assert back.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    raw = np.asarray(back.pixel_array).reshape(case.result.mask.shape)
    expected = np.round(np.asarray(case.result.probability_map) * 255)
    assert np.abs(raw.astype(int) - expected.astype(int)).max() <= 1


def test_uids_are_deterministic_and_follow_the_models() -> None:
    case = make_case()
    a = build_segmentation(case.source, case.result, SETTINGS, software_version="0.1.0")
    b = build_segmentation(case.source, case.result, SETTINGS, software_version="0.1.0")
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.DeviceUID == b.DeviceUID

    other_models = (ModelIdentity("lesion-seg-unet", "1.3.0", "c3" * 32), MODELS[1])
    c = build_segmentation(
        case.source, dataclasses.replace(case.result, models=other_models), SETTINGS, software_version="0.1.0"
    )
    assert c.SOPInstanceUID != a.SOPInstanceUID
    assert c.DeviceUID != a.DeviceUID

    other_source = make_case(sop_instance_uid="1.2.826.0.1.3680043.8.498.424242.99")
    d = build_segmentation(other_source.source, other_source.result, SETTINGS, software_version="0.1.0")
    assert d.SOPInstanceUID != a.SOPInstanceUID
    assert d.SeriesInstanceUID == a.SeriesInstanceUID  # one dermnode SEG series per study and model set

    # other settings (e.g. hair removal changed the mask): other content, so never the same UIDs
    e = build_segmentation(case.source, case.result, SETTINGS, software_version="0.1.0", config_digest="other")
    assert e.SOPInstanceUID != a.SOPInstanceUID and e.SeriesInstanceUID != a.SeriesInstanceUID


def test_multiframe_source_references_its_analysed_frame(save) -> None:  # type: ignore[no-untyped-def]
    """A multi-frame source (Multi-frame True Colour SC is accepted): frame 1 is analysed and referenced."""
    case = make_case()
    source = as_multiframe(case.source, 3)
    seg = build_segmentation(source, case.result, SETTINGS, software_version="0.1.0")
    path = save(seg, "seg-multiframe.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = hd.seg.segread(path)
    assert back.NumberOfFrames == 1
    refs = [
        ref
        for frame in back.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for ref in derivation.SourceImageSequence
    ]
    assert [(r.ReferencedSOPInstanceUID, r.ReferencedFrameNumber) for r in refs] == [(source.SOPInstanceUID, 1)]
    np.testing.assert_array_equal(_mask_from(back, source.SOPInstanceUID).astype(bool), case.result.mask)
    single = build_segmentation(case.source, case.result, SETTINGS, software_version="0.1.0")
    first = single.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert "ReferencedFrameNumber" not in first  # a single-frame source is referenced as a whole


def test_not_analysable_result_has_no_segmentation(not_analysable_case) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OutputError, match="not_analysable"):
        build_segmentation(not_analysable_case.source, not_analysable_case.result, SETTINGS, software_version="0.1.0")


def test_missing_or_mismatched_mask_is_an_output_error() -> None:
    case = make_case()
    with pytest.raises(OutputError, match="no mask"):
        build_segmentation(case.source, dataclasses.replace(case.result, mask=None), SETTINGS, software_version="0.1.0")
    with pytest.raises(OutputError, match="shape"):
        build_segmentation(
            case.source,
            dataclasses.replace(case.result, mask=np.zeros((10, 10), bool)),
            SETTINGS,
            software_version="0.1.0",
        )
    other = make_case(sop_instance_uid="1.2.826.0.1.3680043.8.498.424242.98")
    with pytest.raises(OutputError, match="not the image"):
        build_segmentation(other.source, case.result, SETTINGS, software_version="0.1.0")


def test_empty_mask_and_jpeg_source(save) -> None:  # type: ignore[no-untyped-def]
    from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb

    case = make_case()
    empty = dataclasses.replace(case.result, mask=np.zeros_like(case.result.mask))
    path = save(build_segmentation(case.source, empty, SETTINGS, software_version="0.1.0"), "empty.dcm")
    assert dciodvfy(path)[0] == []
    assert not _mask_from(hd.seg.segread(path), case.source.SOPInstanceUID).any()

    jpeg_source = wrap_rgb(case.result.source.rgb, WrapOptions(jpeg=True, sop_instance_uid=case.source.SOPInstanceUID))
    path = save(build_segmentation(jpeg_source, case.result, SETTINGS, software_version="0.1.0"), "jpeg.dcm")
    assert dciodvfy(path)[0] == []
    np.testing.assert_array_equal(
        _mask_from(hd.seg.segread(path), case.source.SOPInstanceUID).astype(bool), case.result.mask
    )
