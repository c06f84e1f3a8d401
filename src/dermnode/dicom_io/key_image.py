"""Optional key image: a Secondary Capture copy of the source with dermnode's finding burned in.

For reading stations that show neither a SEG nor a presentation state, dermnode can add one derived image per
source (``output.burned_in_image``): the source pixels (frame 1) with the lesion outline, the maximum diameter
and the decision-support text drawn in the colours and at the places the presentation state uses
(:mod:`dermnode.dicom_io.presentation_state`), in its own series ("dermnode overlay — not for diagnosis") of the
source's study.

Secondary Capture Image Storage (PS3.3 A.8.1) is used: it has no acquisition modules, so nothing has to be
invented for a software-made picture, and ``dciodvfy`` validates it without errors. Modality ``OT``, Conversion
Type ``WSD`` (workstation), Image Type ``DERIVED\\SECONDARY``, Burned In Annotation ``YES``, a Source Image
Sequence item (with Purpose of Reference DCM 121322 *Source image for image processing operation*) naming the
source's SOP Class/Instance UIDs (and frame 1 of a multi-frame source), and the Patient and General Study
modules copied from the source. Lossy Image Compression stays ``01`` when the source was lossy compressed.
Specific Character Set is ``ISO_IR 192`` (UTF-8): the series description has an em dash, and patient names
copied from the source are decoded by pydicom and re-encoded in UTF-8.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from dermnode import __version__
from dermnode.dicom_io.overlay_geometry import FONT, PIXEL_TO_ARRAY, LesionOutline, TextBlock
from dermnode.dicom_io.presentation_state import (
    DIAMETER_RGB,
    OUTLINE_RGB,
    TEXT_RGB,
    decision_support_lines,
    overlay_content,
    series_laterality,
)
from dermnode.dicom_io.reading import analysed_frame_numbers, decode_rgb
from dermnode.dicom_io.uids import SECONDARY_CAPTURE_IMAGE_STORAGE
from dermnode.errors import DecodeError, OutputError

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_IMAGE_SERIES_DESCRIPTION",
    "build_key_image",
    "render_overlay",
]

#: Series Description of the key image series (LO; UTF-8 because of the em dash).
KEY_IMAGE_SERIES_DESCRIPTION = "dermnode overlay — not for diagnosis"
#: Derivation Description (ST).
DERIVATION_DESCRIPTION = (
    "Source image with the dermnode lesion outline, maximum diameter and decision-support text burned in. "
    "Decision support only, not for diagnosis."
)
#: Transfer syntaxes whose pixel data are lossy compressed.
_LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless})
#: 8-bit subpixel precision of the OpenCV drawing calls (coordinates are multiplied by 2**_SHIFT).
_SHIFT = 4


def _fixed(points: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
    """PIXEL coordinates to OpenCV fixed-point array coordinates."""
    return np.round((points - PIXEL_TO_ARRAY) * (1 << _SHIFT)).astype(np.int32)


def render_overlay(
    rgb: npt.NDArray[np.uint8],
    outline: LesionOutline | None,
    text: TextBlock,
) -> npt.NDArray[np.uint8]:
    """Draw the outline (green), the diameter (yellow) and the text (white, on its block darkened) on a copy.

    Lines are drawn without anti-aliasing, so every outline pixel has exactly :data:`OUTLINE_RGB`; their
    width grows with the image (1 px below 600 px on the shorter side, 2 px up to 999 px, and so on).

    Parameters
    ----------
    rgb:
        ``(rows, columns, 3)`` uint8 source pixels (not modified).
    outline:
        The outline and diameter, or ``None`` for text only.
    text:
        The text lines and their boxes (PIXEL coordinates).

    Returns
    -------
    numpy.ndarray
        A new ``(rows, columns, 3)`` uint8 array.

    Raises
    ------
    ValueError
        When ``rgb`` is not an ``(H, W, 3)`` uint8 array.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    out = np.ascontiguousarray(rgb.copy())
    rows, columns = out.shape[:2]
    thickness = max(1, round(min(rows, columns) / 400))
    if outline is not None:
        cv2.polylines(out, [_fixed(outline.polyline)], True, OUTLINE_RGB, thickness, cv2.LINE_8, _SHIFT)
        a, b = _fixed(outline.diameter)
        cv2.line(out, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), DIAMETER_RGB, thickness, cv2.LINE_8, _SHIFT)
    # text: white, anti-aliased, on the block's area darkened by half (readable on any skin tone, the image
    # stays visible); every pixel of the block is then at most 127 per channel except the text's
    left, top, right, bottom = (round(v) for v in text.bbox)
    region = out[max(0, top) : bottom, max(0, left) : right]
    region[...] = (region.astype(np.uint16) // 2).astype(np.uint8)
    stroke = max(1, round(2 * text.scale))
    for line, (box_left, box_top, _right, box_bottom) in zip(text.lines, text.boxes, strict=True):
        (_w, h), baseline = cv2.getTextSize(line, FONT, text.scale, stroke)
        x = round(box_left + 3 * text.scale)
        y = round(box_top + (box_bottom - box_top - h - baseline) / 2 + h)
        cv2.putText(out, line, (x, y), FONT, text.scale, TEXT_RGB, stroke, cv2.LINE_AA)
    return out


def _source_rgb(source: Dataset, rgb: npt.NDArray[np.uint8] | None) -> npt.NDArray[np.uint8]:
    if rgb is None:
        try:
            rgb = decode_rgb(source)
        except DecodeError as exc:
            raise OutputError(f"cannot decode the source pixels for the key image: {exc}") from exc
    if rgb.shape != (int(source.Rows), int(source.Columns), 3) or rgb.dtype != np.uint8:
        raise OutputError(
            f"source pixels {rgb.shape} {rgb.dtype} do not match the source ({source.Rows}, {source.Columns}, 3)"
        )
    return rgb


def _source_was_lossy(source: Dataset) -> bool:
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        return True
    meta = getattr(source, "file_meta", None)
    return meta is not None and meta.get("TransferSyntaxUID") in _LOSSY_SYNTAXES


def build_key_image(
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
    rgb: npt.NDArray[np.uint8] | None = None,
    manufacturer_model_name: str = "dermnode",
    software_versions: str | None = None,
    device_serial_number: str | None = None,
    institution_name: str | None = None,
    series_description: str = KEY_IMAGE_SERIES_DESCRIPTION,
    content_datetime: dt.datetime | None = None,
    max_points: int | None = None,
    tolerance_px: float | None = None,
) -> hd.SOPClass:
    """Build the Secondary Capture key image of one source image with the finding burned in.

    Parameters
    ----------
    source:
        The source image dataset (patient, study, UIDs; its pixels are decoded when ``rgb`` is ``None``).
    mask:
        ``(Rows, Columns)`` lesion mask (non-zero = lesion) or ``None``; ignored for a not analysable image.
    series_instance_uid, sop_instance_uid:
        UIDs of the key image (deterministic ones from the caller).
    series_number, instance_number:
        Series and instance numbers (positive).
    manufacturer:
        Manufacturer of the creating software (General Equipment).
    algorithm_name, algorithm_version, band, melanoma_probability, not_analysable_reason:
        The text, as for :func:`dermnode.dicom_io.presentation_state.build_presentation_state`.
    rgb:
        The decoded frame 1 of the source as ``(Rows, Columns, 3)`` uint8 RGB (the pipeline has it already).
    manufacturer_model_name, software_versions, device_serial_number, institution_name:
        General Equipment of the creating software (``software_versions`` defaults to ``dermnode <version>``).
    series_description:
        Series Description (LO, at most 64 characters).
    content_datetime:
        Content Date/Time (default: now). Not part of any UID.
    max_points, tolerance_px:
        Limits of the outline (defaults of :func:`dermnode.dicom_io.overlay_geometry.lesion_outline`).

    Returns
    -------
    highdicom.SOPClass
        Secondary Capture Image Storage, RGB, Explicit VR Little Endian, Burned In Annotation ``YES``.

    Raises
    ------
    OutputError
        When the source pixels cannot be decoded or do not match the source, the mask does not match or its
        outline cannot be simplified, or the attributes are refused.
    ValueError
        When the probability is outside ``[0, 1]`` or a reason is blank.
    """
    pixels = _source_rgb(source, rgb)
    rows, columns = pixels.shape[:2]
    lines = decision_support_lines(algorithm_name, algorithm_version, band, melanoma_probability, not_analysable_reason)
    refused = not_analysable_reason is not None
    limits: dict[str, float] = {}
    if max_points is not None:
        limits["max_points"] = max_points
    if tolerance_px is not None:
        limits["tolerance_px"] = tolerance_px
    outline, block = overlay_content(rows, columns, lines, None if refused else mask, **limits)  # type: ignore[arg-type]
    burned = render_overlay(pixels, outline, block)
    now = content_datetime or dt.datetime.now()

    try:
        image = hd.SOPClass(
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=SECONDARY_CAPTURE_IMAGE_STORAGE,
            instance_number=instance_number,
            modality="OT",
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            patient_id=source.get("PatientID"),
            patient_name=source.get("PatientName"),
            patient_birth_date=source.get("PatientBirthDate"),
            patient_sex=source.get("PatientSex"),
            accession_number=source.get("AccessionNumber"),
            study_id=source.get("StudyID"),
            study_date=source.get("StudyDate") or None,
            study_time=source.get("StudyTime") or None,
            referring_physician_name=source.get("ReferringPhysicianName"),
            series_description=series_description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions or f"dermnode {__version__}",
            device_serial_number=device_serial_number,
            institution_name=institution_name,
            content_date=now.date(),
            content_time=now.time().replace(microsecond=0),
            specific_character_set="ISO_IR 192",
        )
        image.copy_patient_and_study_information(source)
    except (AttributeError, TypeError, ValueError) as exc:
        raise OutputError(f"cannot build the key image: {exc}") from exc

    # General Series (Laterality Type 2C), SC Equipment
    image.Laterality = series_laterality(source)
    image.ConversionType = "WSD"
    # General Image
    image.PatientOrientation = source.get("PatientOrientation", "") or ""
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = DERIVATION_DESCRIPTION
    image.SourceImageSequence = [_source_image_item(source)]
    image.BurnedInAnnotation = "YES"
    if "RecognizableVisualFeatures" in source:
        image.RecognizableVisualFeatures = source.RecognizableVisualFeatures
    if _source_was_lossy(source):
        image.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio"):
            if keyword in source:
                image[keyword] = source[keyword]
    else:
        image.LossyImageCompression = "00"
    # Image Pixel
    image.Rows, image.Columns = rows, columns
    image.SamplesPerPixel = 3
    image.PhotometricInterpretation = "RGB"
    image.PlanarConfiguration = 0
    image.BitsAllocated, image.BitsStored, image.HighBit, image.PixelRepresentation = 8, 8, 7, 0
    image.PixelData = burned.tobytes()
    # ICC Profile (optional): the source's, so colours stay as the source shows them
    if "ICCProfile" in source:
        image.ICCProfile = source.ICCProfile
    logger.debug("key image %s for %s (%d text lines)", sop_instance_uid, source.SOPInstanceUID, len(block.lines))
    return image


def _source_image_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frames: Sequence[int] | None = analysed_frame_numbers(source)
    if frames:
        item.ReferencedFrameNumber = frames[0]
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept(purpose.value, purpose.scheme_designator, purpose.meaning)
    ]
    return item
