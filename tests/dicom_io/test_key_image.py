"""Burned-in key image: valid Secondary Capture (dciodvfy), outline pixels on the mask boundary, derived-image
references, patient/study of the source, own series, Burned In Annotation YES."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_output_cases import dciodvfy
from overlay_cases import (
    ANALYSED,
    KI_SERIES_UID,
    KI_SOP_UID,
    REASON,
    TEXT,
    boundary_centres,
    component_at,
    nearest_distances,
    source_and_mask,
)

from dermnode.dicom_io.key_image import KEY_IMAGE_SERIES_DESCRIPTION, build_key_image, render_overlay
from dermnode.dicom_io.overlay_geometry import place_text
from dermnode.dicom_io.presentation_state import OUTLINE_RGB, decision_support_lines, overlay_content
from dermnode.dicom_io.reading import decode_rgb
from dermnode.dicom_io.uids import SECONDARY_CAPTURE_IMAGE_STORAGE
from dermnode.errors import OutputError

KINDS = ("small", "jpeg", "multiframe", "dermoscopy", "irregular")
Save = Callable[[pydicom.Dataset, str], Path]


def build(source: pydicom.Dataset, mask: np.ndarray | None, **text: object) -> pydicom.Dataset:
    return build_key_image(
        source,
        mask,
        series_instance_uid=KI_SERIES_UID,
        sop_instance_uid=KI_SOP_UID,
        series_number=9004,
        instance_number=1,
        manufacturer="dermnode test",
        device_serial_number="DN-0123456789ABCDEF",
        **(text or ANALYSED),  # type: ignore[arg-type]
    )


def lesion_of(mask: np.ndarray) -> np.ndarray:
    centre = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    return component_at(mask, int(centre[0]), int(centre[1]))


def outline_pixels(rgb: np.ndarray) -> np.ndarray:
    """PIXEL coordinates (centres) of the pixels painted in the outline colour."""
    rows, cols = np.nonzero(np.all(rgb == OUTLINE_RGB, axis=2))
    return np.column_stack([cols, rows]).astype(np.float64) + 0.5


@pytest.fixture(params=KINDS)
def written(request: pytest.FixtureRequest, save: Save) -> tuple[pydicom.Dataset, np.ndarray, pydicom.Dataset]:
    """(source, mask, key image read back from disk) for each kind of source."""
    source, mask = source_and_mask(request.param)
    path = save(build(source, mask), f"ki-{request.param}.dcm")
    return source, mask, pydicom.dcmread(path)


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_errors(kind: str, save: Save) -> None:
    source, mask = source_and_mask(kind)
    errors, warnings = dciodvfy(save(build(source, mask), "ki.dcm"))
    assert errors == []
    assert all("Laterality" in w for w in warnings), warnings


def test_burned_outline_pixels_lie_on_the_mask_boundary(written) -> None:
    _source, mask, ki = written
    boundary = boundary_centres(lesion_of(mask))
    green = outline_pixels(ki.pixel_array)
    assert len(green) > 0.5 * len(boundary)
    # every outline pixel is within 2 px of the boundary, and the outline goes all the way round
    assert nearest_distances(green, boundary).max() <= 2.0
    assert nearest_distances(boundary, green).max() <= 2.0


def test_only_the_overlay_changes_the_pixels(written) -> None:
    source, mask, ki = written
    original = decode_rgb(source)
    changed = np.any(ki.pixel_array != original, axis=2)
    lines = decision_support_lines(**ANALYSED)  # type: ignore[arg-type]
    outline, block = overlay_content(source.Rows, source.Columns, lines, mask)
    assert outline is not None
    allowed = np.zeros_like(changed)
    left, top, right, bottom = block.bbox
    allowed[max(0, int(top) - 2) : int(bottom) + 3, max(0, int(left) - 2) : int(right) + 3] = True
    rows, cols = np.nonzero(changed & ~allowed)
    pts = np.column_stack([cols, rows]).astype(np.float64) + 0.5
    a, b = outline.diameter
    along = np.clip(((pts - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
    to_diameter = np.linalg.norm(pts - (a + along[:, None] * (b - a)), axis=1)
    to_boundary = nearest_distances(pts, boundary_centres(lesion_of(mask)))
    assert np.all((to_diameter <= 2.0) | (to_boundary <= 2.0))
    # the text block is darkened (at most 127 per channel) and the text on it is bright
    block_pixels = ki.pixel_array[int(top) + 1 : int(bottom) - 1, int(left) + 1 : int(right) - 1].reshape(-1, 3)
    assert (block_pixels.min(axis=1) > 127).any()
    assert np.median(block_pixels.max(axis=1)) <= 127


def test_derived_image_attributes(written) -> None:
    source, _mask, ki = written
    assert ki.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert (ki.SOPInstanceUID, ki.SeriesInstanceUID) == (KI_SOP_UID, KI_SERIES_UID)
    assert ki.SeriesInstanceUID != source.SeriesInstanceUID
    assert ki.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert str(ki.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert ki.BurnedInAnnotation == "YES"
    assert list(ki.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ki.SpecificCharacterSet == "ISO_IR 192"
    assert ki.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION == "dermnode overlay — not for diagnosis"
    assert (ki.Rows, ki.Columns, ki.SamplesPerPixel, ki.PhotometricInterpretation) == (
        source.Rows,
        source.Columns,
        3,
        "RGB",
    )
    (ref,) = ki.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    if int(source.get("NumberOfFrames", 1)) > 1:
        assert ref.ReferencedFrameNumber == 1
    else:
        assert "ReferencedFrameNumber" not in ref
    lossy = source.file_meta.TransferSyntaxUID.is_compressed and source.PhotometricInterpretation != "RGB"
    assert ki.LossyImageCompression == ("01" if lossy else "00")
    assert "not for diagnosis" in ki.DerivationDescription


def test_series_description_survives_a_round_trip_in_utf8(save: Save) -> None:
    source, mask = source_and_mask("small")
    path = save(build(source, mask), "ki.dcm")
    raw = path.read_bytes()
    assert "dermnode overlay — not for diagnosis".encode() in raw


def test_not_analysable_key_image_has_text_but_no_outline(save: Save) -> None:
    source, mask = source_and_mask("dermoscopy")
    path = save(build(source, mask, **TEXT, not_analysable_reason=REASON), "ki-refused.dcm")
    assert dciodvfy(path)[0] == []
    ki = pydicom.dcmread(path)
    assert len(outline_pixels(ki.pixel_array)) == 0
    changed = np.any(ki.pixel_array != decode_rgb(source), axis=2)
    block = place_text(decision_support_lines(**TEXT, not_analysable_reason=REASON), source.Rows, source.Columns)
    left, top, right, bottom = block.bbox
    rows, cols = np.nonzero(changed)
    assert changed.any()
    assert rows.min() >= top - 2 and rows.max() <= bottom + 2 and cols.min() >= left - 2 and cols.max() <= right + 2


def test_rgb_of_the_wrong_shape_is_refused() -> None:
    source, mask = source_and_mask("small")
    with pytest.raises(OutputError):
        build_key_image(
            source,
            mask,
            rgb=np.zeros((5, 5, 3), np.uint8),
            series_instance_uid=KI_SERIES_UID,
            sop_instance_uid=KI_SOP_UID,
            series_number=9004,
            instance_number=1,
            manufacturer="dermnode test",
            **ANALYSED,  # type: ignore[arg-type]
        )


def test_render_does_not_modify_its_input() -> None:
    source, mask = source_and_mask("small")
    rgb = decode_rgb(source)
    before = rgb.copy()
    outline, block = overlay_content(source.Rows, source.Columns, ("x",), mask)
    out = render_overlay(rgb, outline, block)
    assert np.array_equal(rgb, before) and not np.array_equal(out, rgb)
