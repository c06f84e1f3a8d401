"""Color Softcopy Presentation State: valid IOD (dciodvfy), outline within 1 px of the mask, references, text
placement beside the lesion, not analysable variant, refusals."""

from __future__ import annotations

import io
import itertools
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_output_cases import dciodvfy
from overlay_cases import (
    ANALYSED,
    PR_SERIES_UID,
    PR_SOP_UID,
    REASON,
    TEXT,
    TRACKING_UID,
    boundary_centres,
    component_at,
    lesion_bbox,
    max_feret_corners,
    nearest_distances,
    overlaps,
    sample_polyline,
    source_and_mask,
)

from dermnode.dicom_io.overlay_geometry import hausdorff_px, lesion_outline, place_text
from dermnode.dicom_io.presentation_state import (
    COLOR_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    CONTENT_LABEL,
    DIAMETER_LAYER,
    OUTLINE_LAYER,
    PR_SERIES_DESCRIPTION,
    TEXT_LAYER,
    build_presentation_state,
    decision_support_lines,
    presentation_icc_profile,
    srgb_icc_profile,
)
from dermnode.errors import OutputError

KINDS = ("small", "jpeg", "multiframe", "dermoscopy", "irregular")
Save = Callable[[pydicom.Dataset, str], Path]


def build(source: pydicom.Dataset, mask: np.ndarray | None, **text: object) -> pydicom.Dataset:
    return build_presentation_state(
        source,
        mask,
        series_instance_uid=PR_SERIES_UID,
        sop_instance_uid=PR_SOP_UID,
        series_number=9003,
        instance_number=1,
        manufacturer="dermnode test",
        device_serial_number="DN-0123456789ABCDEF",
        tracking_uid=TRACKING_UID,
        **(text or ANALYSED),  # type: ignore[arg-type]
    )


def annotation(pr: pydicom.Dataset, layer: str) -> pydicom.Dataset:
    found = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == layer]
    assert len(found) == 1, f"one annotation on layer {layer}"
    return found[0]


def graphic_points(pr: pydicom.Dataset, layer: str) -> np.ndarray:
    (obj,) = annotation(pr, layer).GraphicObjectSequence
    assert obj.GraphicType == "POLYLINE"
    assert obj.GraphicAnnotationUnits == "PIXEL"
    assert obj.GraphicDimensions == 2
    points = np.asarray(obj.GraphicData, dtype=np.float64).reshape(-1, 2)
    assert obj.NumberOfGraphicPoints == len(points)
    return points


@pytest.fixture(params=KINDS)
def written(request: pytest.FixtureRequest, save: Save) -> tuple[pydicom.Dataset, np.ndarray, pydicom.Dataset]:
    """(source, mask, presentation state read back from disk) for each kind of source."""
    source, mask = source_and_mask(request.param)
    path = save(build(source, mask), f"pr-{request.param}.dcm")
    return source, mask, pydicom.dcmread(path)


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_errors(kind: str, save: Save) -> None:
    source, mask = source_and_mask(kind)
    errors, warnings = dciodvfy(save(build(source, mask), "pr.dcm"))
    assert errors == []
    # only the empty (unknown) Laterality of a skin photograph is left as a warning
    assert all("Laterality" in w for w in warnings), warnings


@pytest.mark.parametrize("refused", [False, True])
def test_dcmtk_presentation_state_checker_passes(refused: bool, save: Save) -> None:
    checker = shutil.which("dcmpschk")
    if checker is None:
        pytest.skip("dcmpschk (DCMTK) is not installed")
    source, mask = source_and_mask("multiframe")
    text = {**TEXT, "not_analysable_reason": REASON} if refused else ANALYSED
    proc = subprocess.run([checker, str(save(build(source, mask, **text), "pr.dcm"))], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Test passed" in output, output
    assert not [line for line in output.splitlines() if line.startswith(("E:", "F:"))], output


def test_not_analysable_is_valid_and_says_why(save: Save) -> None:
    source, mask = source_and_mask("dermoscopy")
    path = save(build(source, mask, **TEXT, not_analysable_reason=REASON), "pr-refused.dcm")
    assert dciodvfy(path)[0] == []
    pr = pydicom.dcmread(path)
    assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [TEXT_LAYER]
    assert all("GraphicObjectSequence" not in a for a in pr.GraphicAnnotationSequence)
    text = " ".join(t.UnformattedTextValue for a in pr.GraphicAnnotationSequence for t in a.TextObjectSequence)
    assert text == f"not analysable: {REASON}"
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_outline_is_a_closed_polyline_within_1px_of_the_mask_boundary(written) -> None:
    source, mask, pr = written
    points = graphic_points(pr, OUTLINE_LAYER)
    assert np.array_equal(points[0], points[-1]), "closed: the last point repeats the first"
    assert 4 <= len(points) <= 300
    assert points.min() >= 0 and points[:, 0].max() <= source.Columns and points[:, 1].max() <= source.Rows
    centre = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    lesion = component_at(mask, int(centre[0]), int(centre[1]))
    boundary = boundary_centres(lesion)
    # every point of the drawn outline lies within 1 px of a boundary pixel centre ...
    assert nearest_distances(sample_polyline(points), boundary).max() <= 1.0 + 1e-9
    # ... and every boundary pixel lies within 1 px of the outline (it goes all the way round)
    assert nearest_distances(boundary, sample_polyline(points, 0.05)).max() <= 1.0 + 0.05
    # the vertices are boundary pixel centres themselves
    assert nearest_distances(points, boundary).max() < 1e-9


def test_irregular_lesion_is_simplified_below_the_point_limit() -> None:
    _, mask = source_and_mask("irregular")
    outline = lesion_outline(mask)
    assert len(outline.polyline) <= 300
    assert outline.hausdorff_px <= 1.0
    assert hausdorff_px(outline.polyline, outline.border) == pytest.approx(outline.hausdorff_px)
    # the satellite blob (largest component only) is not outlined
    assert outline.polyline[:, 0].min() > 0.2 * mask.shape[1]


def test_outline_and_text_reference_the_source_image_and_frame(written) -> None:
    source, _mask, pr = written
    assert pr.SOPClassUID == COLOR_SOFTCOPY_PRESENTATION_STATE_STORAGE
    assert pr.Modality == "PR"
    assert (pr.SOPInstanceUID, pr.SeriesInstanceUID) == (PR_SOP_UID, PR_SERIES_UID)
    assert pr.StudyInstanceUID == source.StudyInstanceUID
    assert (pr.PatientID, str(pr.PatientName)) == (source.PatientID, str(source.PatientName))
    assert pr.ContentLabel == CONTENT_LABEL
    assert "decision support" in pr.ContentDescription
    assert pr.SeriesDescription == PR_SERIES_DESCRIPTION
    assert pr.SpecificCharacterSet == "ISO_IR 192"
    assert bytes(pr.ICCProfile)[12:16] in (b"scnr", b"spac")
    (series,) = pr.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    multiframe = int(source.get("NumberOfFrames", 1)) > 1
    for ann in pr.GraphicAnnotationSequence:
        (ref,) = ann.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        if multiframe:
            assert ref.ReferencedFrameNumber == 1
        else:
            assert "ReferencedFrameNumber" not in ref
    (outline,) = annotation(pr, OUTLINE_LAYER).GraphicObjectSequence
    assert (outline.TrackingID, outline.TrackingUID) == ("lesion 1", TRACKING_UID)
    assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [OUTLINE_LAYER, DIAMETER_LAYER, TEXT_LAYER]


def test_diameter_joins_the_two_farthest_boundary_points(written) -> None:
    _source, mask, pr = written
    ends = graphic_points(pr, DIAMETER_LAYER)
    assert ends.shape == (2, 2)
    centre = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    lesion = component_at(mask, int(centre[0]), int(centre[1]))
    assert float(np.linalg.norm(ends[1] - ends[0])) == pytest.approx(max_feret_corners(lesion), abs=1e-3)


def test_text_says_band_probability_and_disclaimer_beside_the_lesion(written) -> None:
    source, mask, pr = written
    texts = annotation(pr, TEXT_LAYER).TextObjectSequence
    values = [t.UnformattedTextValue for t in texts]
    assert values == ["dermnode 0.1.0: indeterminate", "melanoma probability 62%", "decision support only"]
    lesion = lesion_bbox(mask)
    for t in texts:
        assert t.BoundingBoxAnnotationUnits == "PIXEL"
        assert t.BoundingBoxTextHorizontalJustification == "LEFT"
        box = (*t.BoundingBoxTopLeftHandCorner, *t.BoundingBoxBottomRightHandCorner)
        assert 0 <= box[0] < box[2] <= source.Columns and 0 <= box[1] < box[3] <= source.Rows
        assert not overlaps(box, lesion), f"text box {box} covers the lesion {lesion}"


def test_text_only_when_the_mask_is_empty_or_missing(save: Save) -> None:
    source, mask = source_and_mask("small")
    for m in (None, np.zeros_like(mask)):
        pr = pydicom.dcmread(save(build(source, m), "pr-empty.dcm"))
        assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [TEXT_LAYER]
        assert len(pr.GraphicAnnotationSequence[0].TextObjectSequence) == 3


def test_lines_without_a_classification() -> None:
    assert decision_support_lines("dermnode", "0.1.0") == ("dermnode 0.1.0", "decision support only")
    assert decision_support_lines("dermnode", "0.1.0", "benign", 0.004)[1] == "melanoma probability 0%"
    long = decision_support_lines("dermnode", "0.1.0", not_analysable_reason="x " * 60)
    assert long[0].startswith("not analysable: ") and all(len(line) <= 48 for line in long)


def test_text_goes_over_the_lesion_only_when_no_margin_is_left() -> None:
    block = place_text(("a", "b"), 100, 100, (0.0, 0.0, 100.0, 100.0))
    assert block.overlaps_lesion
    block = place_text(("a", "b"), 100, 100, (10.0, 10.0, 90.0, 60.0))
    assert not block.overlaps_lesion
    assert all(not overlaps(box, (10.0, 10.0, 90.0, 60.0)) for box in block.boxes)
    assert block.bbox[1] >= 60.0  # the largest margin: below the lesion


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"mask": np.zeros((10, 10), bool)}, OutputError),  # shape differs from the source
        ({"melanoma_probability": 1.5}, ValueError),
        ({"not_analysable_reason": "  "}, ValueError),
        ({"max_points": 4}, OutputError),  # an ellipse needs more than 3 vertices within 1 px
        ({"tolerance_px": 0.0}, ValueError),
        ({"series_number": 0}, OutputError),
    ],
)
def test_invalid_input_is_refused(change: dict[str, object], error: type[Exception]) -> None:
    source, mask = source_and_mask("small")
    kwargs: dict[str, object] = {
        "series_instance_uid": PR_SERIES_UID,
        "sop_instance_uid": PR_SOP_UID,
        "series_number": 9003,
        "instance_number": 1,
        "manufacturer": "dermnode test",
        **ANALYSED,
    }
    kwargs.update({k: v for k, v in change.items() if k != "mask"})
    with pytest.raises(error):
        build_presentation_state(source, change.get("mask", mask), **kwargs)  # type: ignore[arg-type]


def test_monochrome_source_is_refused() -> None:
    source, mask = source_and_mask("small")
    grey = source.copy()
    grey.SamplesPerPixel = 1
    with pytest.raises(OutputError, match="colour"):
        build(grey, mask)


def test_icc_profile_of_the_source_is_kept_as_an_input_profile(save: Save) -> None:
    from PIL import ImageCms

    source, mask = source_and_mask("small")
    assert presentation_icc_profile(source) == srgb_icc_profile()
    abstract = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # class 'abst': replaced
    source.ICCProfile = abstract
    assert presentation_icc_profile(source) == srgb_icc_profile()
    monitor = bytearray(srgb_icc_profile())
    monitor[12:16] = b"mntr"
    source.ICCProfile = bytes(monitor)
    kept = presentation_icc_profile(source)
    assert kept[12:16] == b"scnr" and kept[:12] == bytes(monitor[:12])
    pr = pydicom.dcmread(save(build(source, mask), "pr-icc.dcm"))
    assert bytes(pr.ICCProfile) == kept
    ImageCms.ImageCmsProfile(io.BytesIO(bytes(pr.ICCProfile)))  # still a valid profile


def _brute_directed(a: np.ndarray, b: np.ndarray, step: float = 0.2) -> float:
    """Directed sampled Hausdorff distance by brute force: every sample against every edge of ``b``."""
    a = np.vstack([a, a[:1]]) if not np.array_equal(a[0], a[-1]) else a
    b = np.vstack([b, b[:1]]) if not np.array_equal(b[0], b[-1]) else b
    starts, ends = b[:-1], b[1:]
    worst = 0.0
    for p, q in itertools.pairwise(a):
        n = max(1, int(np.ceil(np.linalg.norm(q - p) / step)))
        samples = p + np.linspace(0.0, 1.0, n + 1)[:, None] * (q - p)
        d = ends - starts
        len2 = np.maximum((d * d).sum(axis=1), 1e-300)
        t = np.clip(((samples[:, None, :] - starts) * d).sum(axis=2) / len2, 0.0, 1.0)
        nearest = starts + t[..., None] * d
        worst = max(worst, float(np.linalg.norm(samples[:, None, :] - nearest, axis=2).min(axis=1).max()))
    return worst


def test_hausdorff_matches_brute_force_near_and_far() -> None:
    """The vectorised check is exact: outlines within a pixel of their border, and polygons far apart (where the
    nearest edge is outside the first candidate window)."""
    rng = np.random.default_rng(7)
    _, mask = source_and_mask("irregular")
    outline = lesion_outline(mask)
    cases = [(outline.polyline, outline.border)]
    for _ in range(12):
        a = rng.uniform(0, 60, (int(rng.integers(2, 15)), 2))
        b = rng.uniform(0, 60, (int(rng.integers(2, 15)), 2)) + rng.uniform(-40, 40, 2)
        cases.append((a, b))
    for a, b in cases:
        expected = max(_brute_directed(a, b), _brute_directed(b, a))
        assert hausdorff_px(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert hausdorff_px([[1.0, 1.0]], [[4.0, 5.0]]) == pytest.approx(5.0)


def test_frame_filling_lesion_outline_is_exact() -> None:
    """A lesion that fills the frame gives outline edges as long as the image side, each beside hundreds of border
    edges: the check stays exact there (it once paired every sample of such an edge with all of them)."""
    mask = np.ones((120, 160), dtype=np.uint8)
    mask[:2, :3] = 0
    mask[60:63, 157:] = 0
    outline = lesion_outline(mask)
    assert outline.bbox == (0.0, 0.0, 160.0, 120.0)
    assert len(outline.polyline) < 20 and outline.hausdorff_px <= 1.0
    expected = max(_brute_directed(outline.polyline, outline.border), _brute_directed(outline.border, outline.polyline))
    assert outline.hausdorff_px == pytest.approx(expected, rel=1e-9, abs=1e-9)
    shifted = outline.polyline + np.array([0.0, 1.5])  # 1.5 px off the border: found by the candidate search
    assert hausdorff_px(shifted, outline.border) == pytest.approx(
        max(_brute_directed(shifted, outline.border), _brute_directed(outline.border, shifted)), rel=1e-9, abs=1e-9)
