"""Color Softcopy Presentation State (CSPS) drawing dermnode's finding on the source image.

Many reading stations cannot draw a DICOM SEG over an RGB photograph, but most PACS viewers apply a
presentation state. One CSPS per source image, in its own series of the source's study, references the image
(frame 1 of a multi-frame source) and carries, in three graphic layers:

* ``LESION_OUTLINE``: the lesion outline as a closed POLYLINE in PIXEL units (at most 300 points, within 1 px
  of the mask border; see :mod:`dermnode.dicom_io.overlay_geometry`);
* ``LESION_DIAMETER``: the maximum diameter as a 2-point POLYLINE;
* ``DERMNODE_TEXT``: the decision-support text (band, melanoma probability, "decision support only"), one
  text object per line, in bounding boxes (PIXEL units, left justified) beside the lesion's bounding box.

A not analysable image gets a presentation state with the single text ``"not analysable: <reason>"`` and no
graphics. Built with highdicom (``highdicom.pr.ColorSoftcopyPresentationState``), so the content is checked
when it is constructed. UIDs are the caller's: pass deterministic ones (see ``docs/dicom-conformance.md``).
"""

from __future__ import annotations

import functools
import io
import logging
import textwrap
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dermnode import __version__
from dermnode.dicom_io.overlay_geometry import (
    DEFAULT_MAX_POINTS,
    DEFAULT_TOLERANCE_PX,
    LesionOutline,
    TextBlock,
    lesion_outline,
    place_text,
)
from dermnode.dicom_io.reading import analysed_frame_numbers
from dermnode.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = [
    "COLOR_SOFTCOPY_PRESENTATION_STATE_STORAGE",
    "CONTENT_DESCRIPTION",
    "CONTENT_LABEL",
    "DIAMETER_LAYER",
    "DIAMETER_RGB",
    "LESION_TRACKING_ID",
    "OUTLINE_LAYER",
    "OUTLINE_RGB",
    "PR_SERIES_DESCRIPTION",
    "TEXT_LAYER",
    "TEXT_RGB",
    "build_presentation_state",
    "decision_support_lines",
    "overlay_content",
    "presentation_icc_profile",
    "series_laterality",
    "srgb_icc_profile",
]

#: Color Softcopy Presentation State Storage SOP Class.
COLOR_SOFTCOPY_PRESENTATION_STATE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.2")
#: Content Label (CS: capitals, digits, underscore, at most 16 characters).
CONTENT_LABEL = "DERMNODE_LESION"
#: Content Description (LO, at most 64 characters).
CONTENT_DESCRIPTION = "dermnode lesion outline - decision support only, not a diagnosis"
#: Default Series Description of the presentation state series (LO).
PR_SERIES_DESCRIPTION = "dermnode outline - decision support only"
#: Graphic layer names (CS, at most 16 characters).
OUTLINE_LAYER = "LESION_OUTLINE"
DIAMETER_LAYER = "LESION_DIAMETER"
TEXT_LAYER = "DERMNODE_TEXT"
#: Recommended display colours of the layers, sRGB (the key image burns the same colours in).
OUTLINE_RGB = (0, 255, 0)
DIAMETER_RGB = (255, 255, 0)
TEXT_RGB = (255, 255, 255)
#: Tracking identifier of the lesion (same text as the SR's Tracking Identifier).
LESION_TRACKING_ID = "lesion 1"
#: Longest text line before it is wrapped (the reason of a refusal can be long).
_WRAP_WIDTH = 48
_DISCLAIMER = "decision support only"


def _cielab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """The CIELab colour of an sRGB triplet (Graphic Layer Recommended Display CIELab Value)."""
    return hd.color.CIELabColor.from_rgb(*rgb)


@functools.lru_cache(maxsize=1)
def srgb_icc_profile() -> bytes:
    """An sRGB input ICC profile with a fixed creation date (equal inputs give byte-equal objects).

    DICOM wants an input (``scnr``) or colour space (``spac``) profile in the ICC Profile module (PS3.3
    C.11.15.1.1; highdicom checks it), and an ICC input profile may be matrix/TRC based. LittleCMS's built-in
    sRGB profile is a matrix/TRC display (``mntr``) profile; its device class is set to ``scnr``, which keeps the
    same transform (sRGB pixels to the PCS) and suits a camera image that is already sRGB.

    Returns
    -------
    bytes
        The profile (LittleCMS via Pillow), class ``scnr``, header date 2020-01-01, profile ID zero (not computed).
    """
    from PIL import ImageCms

    raw = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    raw[12:16] = b"scnr"  # profile/device class: input device
    raw[24:36] = bytes([0x07, 0xE4, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])  # dateTimeNumber: 2020-01-01 00:00:00
    raw[84:100] = bytes(16)  # profile ID: zero = not calculated (the date changed)
    ImageCms.ImageCmsProfile(io.BytesIO(bytes(raw)))  # still parses
    return bytes(raw)


def presentation_icc_profile(source: Dataset) -> bytes:
    """The ICC profile for a presentation state of ``source``: the source's own when it has one, else sRGB.

    The ICC Profile module of a presentation state wants an input (``scnr``) or colour space (``spac``) profile.
    Cameras often embed a display (``mntr``) profile; as in :func:`srgb_icc_profile` its device class is set to
    ``scnr`` (the transform is unchanged) and its profile ID, which covers the class, is zeroed. A profile of
    any other class, or one too short to have an ICC header, is replaced by :func:`srgb_icc_profile`.

    Parameters
    ----------
    source:
        The source image dataset (ICC Profile, or the one Optical Path Sequence item's).

    Returns
    -------
    bytes
        The profile.
    """
    raw: bytes | None = None
    if "ICCProfile" in source:
        raw = bytes(source.ICCProfile)
    else:
        optical = source.get("OpticalPathSequence")
        if optical and len(optical) == 1 and "ICCProfile" in optical[0]:
            raw = bytes(optical[0].ICCProfile)
    if raw is None:
        return srgb_icc_profile()
    profile_class = raw[12:16] if len(raw) >= 128 and raw[36:40] == b"acsp" else b""
    if profile_class in (b"scnr", b"spac"):
        return raw
    if profile_class == b"mntr":
        fixed = bytearray(raw)
        fixed[12:16] = b"scnr"
        fixed[84:100] = bytes(16)
        return bytes(fixed)
    logger.warning("source ICC profile of class %r is not usable in a presentation state: sRGB is used", profile_class)
    return srgb_icc_profile()


def series_laterality(source: Dataset) -> str:
    """Laterality for a derived series: the source's Laterality, else its Image Laterality R/L, else empty.

    Parameters
    ----------
    source:
        The source image dataset.

    Returns
    -------
    str
        ``"R"``, ``"L"`` or ``""`` (unknown: General Series Laterality is Type 2C).
    """
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def decision_support_lines(
    algorithm_name: str,
    algorithm_version: str,
    band: str | None = None,
    melanoma_probability: float | None = None,
    not_analysable_reason: str | None = None,
) -> tuple[str, ...]:
    """The text drawn beside the lesion (and burned into the key image).

    Parameters
    ----------
    algorithm_name, algorithm_version:
        Name and version of the analysis (e.g. ``"dermnode"``, ``"0.1.0"``).
    band:
        Melanoma risk band (``"benign"``, ``"indeterminate"``, ``"malignant"``), ``None`` without a
        classification.
    melanoma_probability:
        Calibrated melanoma probability in ``[0, 1]``, ``None`` without a classification.
    not_analysable_reason:
        Why the image was refused; when given, the only line is ``"not analysable: <reason>"``.

    Returns
    -------
    tuple of str
        ``("<name> <version>: <band>", "melanoma probability 62%", "decision support only")`` for an
        analysed image (without the band or probability parts when they are ``None``), or the refusal
        (wrapped at 48 characters).

    Raises
    ------
    ValueError
        When the probability is outside ``[0, 1]``, the name is empty or the reason is blank.
    """
    if not algorithm_name.strip():
        raise ValueError("algorithm_name must not be empty")
    if not_analysable_reason is not None:
        if not not_analysable_reason.strip():
            raise ValueError("a not analysable image needs a reason")
        return tuple(textwrap.wrap(f"not analysable: {' '.join(not_analysable_reason.split())}", _WRAP_WIDTH))
    if melanoma_probability is not None and not 0.0 <= melanoma_probability <= 1.0:
        raise ValueError(f"melanoma_probability must be within [0, 1], got {melanoma_probability}")
    head = f"{algorithm_name} {algorithm_version}".strip()
    lines = [f"{head}: {band}" if band else head]
    if melanoma_probability is not None:
        lines.append(f"melanoma probability {melanoma_probability * 100:.0f}%")
    lines.append(_DISCLAIMER)
    return tuple(line for chunk in lines for line in textwrap.wrap(chunk, _WRAP_WIDTH))


def overlay_content(
    rows: int,
    columns: int,
    lines: Sequence[str],
    mask: npt.ArrayLike | None,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
) -> tuple[LesionOutline | None, TextBlock]:
    """Outline (``None`` without a mask or with an empty one) and text placement for one image.

    Parameters
    ----------
    rows, columns:
        Size of the source image.
    lines:
        Text lines (:func:`decision_support_lines`).
    mask:
        ``(rows, columns)`` lesion mask or ``None``.
    max_points, tolerance_px:
        Limits of the outline (:func:`dermnode.dicom_io.overlay_geometry.lesion_outline`).

    Returns
    -------
    tuple
        ``(outline or None, text block)``.

    Raises
    ------
    OutputError
        When the mask's shape differs from the image or its outline cannot be simplified within the limits.
    """
    outline: LesionOutline | None = None
    if mask is not None:
        arr = np.asarray(mask)
        if arr.shape != (rows, columns):
            raise OutputError(f"mask shape {arr.shape} differs from the source image ({rows}, {columns})")
        if arr.any():
            outline = lesion_outline(arr, max_points=max_points, tolerance_px=tolerance_px)
        else:
            logger.info("empty lesion mask: the presentation state carries the text only")
    block = place_text(tuple(lines), rows, columns, None if outline is None else outline.bbox)
    return outline, block


def build_presentation_state(
    source: Dataset,
    mask: npt.ArrayLike | None,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    algorithm_name: str,
    algorithm_version: str,
    band: str | None = None,
    melanoma_probability: float | None = None,
    not_analysable_reason: str | None = None,
    manufacturer_model_name: str = "dermnode",
    software_versions: str | None = None,
    device_serial_number: str | None = None,
    institution_name: str | None = None,
    series_description: str = PR_SERIES_DESCRIPTION,
    tracking_uid: str | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
) -> hd.pr.ColorSoftcopyPresentationState:
    """Build the Color Softcopy Presentation State of one analysed (or refused) source image.

    Parameters
    ----------
    source:
        The source image dataset (colour: Samples per Pixel 3; single- or multi-frame; frame 1 is annotated).
        Patient, study and character set come from it.
    mask:
        ``(Rows, Columns)`` lesion mask of the source (non-zero = lesion), or ``None``. Ignored when
        ``not_analysable_reason`` is given. ``None`` or an empty mask for an analysed image gives the text
        alone.
    series_instance_uid, sop_instance_uid:
        UIDs of the presentation state (deterministic ones from the caller).
    series_number, instance_number:
        Series and instance numbers (positive).
    manufacturer:
        Manufacturer of the creating software (General Equipment).
    algorithm_name, algorithm_version:
        Shown in the first text line.
    band:
        Melanoma risk band, or ``None`` without a classification.
    melanoma_probability:
        Melanoma probability in ``[0, 1]``, or ``None``.
    not_analysable_reason:
        Reason of a refusal; makes this a "not analysable" presentation state (text only).
    manufacturer_model_name, software_versions, device_serial_number, institution_name:
        General Equipment of the creating software (``software_versions`` defaults to ``dermnode <version>``).
    series_description:
        Series Description (LO, at most 64 characters).
    tracking_uid:
        Tracking UID of the lesion (the SEG segment's and the SR group's); put on the outline with the
        Tracking ID ``"lesion 1"`` when given.
    max_points, tolerance_px:
        Limits of the outline: at most ``max_points`` points (closing point included) and a symmetric
        Hausdorff distance to the mask border of at most ``tolerance_px``.

    Returns
    -------
    highdicom.pr.ColorSoftcopyPresentationState
        The presentation state (Explicit VR Little Endian, Specific Character Set ISO_IR 192).

    Raises
    ------
    OutputError
        When the source is not a colour image or lacks patient/study attributes, the mask does not match
        the source or its outline cannot be simplified within the limits, or highdicom refuses a value.
    ValueError
        When the probability is outside ``[0, 1]``, a reason is blank or the limits are invalid.
    """
    try:
        rows, columns = int(source.Rows), int(source.Columns)
        samples = int(source.SamplesPerPixel)
    except (AttributeError, TypeError, ValueError) as exc:
        raise OutputError(f"the source has no usable image pixel attributes: {exc}") from exc
    if samples != 3:
        raise OutputError(
            f"a Color Softcopy Presentation State needs a colour source (Samples per Pixel 3), got {samples}"
        )
    lines = decision_support_lines(algorithm_name, algorithm_version, band, melanoma_probability, not_analysable_reason)
    refused = not_analysable_reason is not None
    outline, block = overlay_content(
        rows, columns, lines, None if refused else mask, max_points=max_points, tolerance_px=tolerance_px
    )
    frames = analysed_frame_numbers(source)
    frame = frames[0] if frames else None

    try:
        layers = [hd.pr.GraphicLayer(TEXT_LAYER, 3, "dermnode decision support text", _cielab(TEXT_RGB))]
        annotations = []
        if outline is not None:
            tracking = {"tracking_id": LESION_TRACKING_ID, "tracking_uid": tracking_uid} if tracking_uid else {}
            outline_object = hd.pr.GraphicObject(
                hd.pr.GraphicTypeValues.POLYLINE,
                outline.polyline,
                hd.pr.AnnotationUnitsValues.PIXEL,
                is_filled=False,
                **tracking,  # type: ignore[arg-type]
            )
            diameter_object = hd.pr.GraphicObject(
                hd.pr.GraphicTypeValues.POLYLINE, outline.diameter, hd.pr.AnnotationUnitsValues.PIXEL
            )
            outline_layer = hd.pr.GraphicLayer(OUTLINE_LAYER, 1, "dermnode lesion outline", _cielab(OUTLINE_RGB))
            diameter_layer = hd.pr.GraphicLayer(
                DIAMETER_LAYER, 2, "dermnode lesion maximum diameter", _cielab(DIAMETER_RGB)
            )
            layers = [outline_layer, diameter_layer, *layers]
            annotations += [
                hd.pr.GraphicAnnotation(
                    [source], outline_layer, referenced_frame_number=frame, graphic_objects=[outline_object]
                ),
                hd.pr.GraphicAnnotation(
                    [source], diameter_layer, referenced_frame_number=frame, graphic_objects=[diameter_object]
                ),
            ]
        text_objects = [
            hd.pr.TextObject(
                line,
                hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=box,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
            for line, box in zip(block.lines, block.boxes, strict=True)
        ]
        annotations.append(
            hd.pr.GraphicAnnotation([source], layers[-1], referenced_frame_number=frame, text_objects=text_objects)
        )
        pr = hd.pr.ColorSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions or f"dermnode {__version__}",
            device_serial_number=device_serial_number,  # type: ignore[arg-type]
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            graphic_annotations=annotations,
            graphic_layers=layers,
            institution_name=institution_name,
            icc_profile=presentation_icc_profile(source),
            series_description=series_description,
            specific_character_set="ISO_IR 192",
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise OutputError(f"cannot build the presentation state: {exc}") from exc
    # General Series Laterality is Type 2C (dciodvfy requires it here): the source's, else empty (unknown)
    pr.Laterality = series_laterality(source)
    logger.debug(
        "presentation state %s for %s: %s",
        sop_instance_uid,
        source.SOPInstanceUID,
        "not analysable" if refused else f"{0 if outline is None else len(outline.polyline)} outline points",
    )
    return pr
