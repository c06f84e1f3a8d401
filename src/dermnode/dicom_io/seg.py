"""DICOM Segmentation (SEG) of the lesion mask.

One SEG instance per analysed source image: same study, its own series, one segment (the lesion), binary or
fractional (probability) pixels. The SEG references the single-frame colour source through the derivation
image path (Source Image Sequence in the Derivation Image Functional Group), so SEG pixel (r, c) is source
pixel (r, c). All UIDs are derived deterministically from the source SOP Instance UID and the models' sha256
digests (:func:`dermnode.dicom_io.uids.derived_uid`): analysing the same image with the same models twice
yields the same SEG, which a PACS stores once.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian

from dermnode.dicom_io import codes
from dermnode.dicom_io.reading import analysed_frame_numbers
from dermnode.dicom_io.uids import SECONDARY_CAPTURE_IMAGE_STORAGE, derived_uid
from dermnode.errors import OutputError
from dermnode.settings import OutputSettings
from dermnode.vocabulary import AnalysisResult, AnalysisStatus, ModelIdentity

logger = logging.getLogger(__name__)

#: Segmentation Storage SOP Class.
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
#: Number of the one segment of every dermnode SEG.
LESION_SEGMENT_NUMBER = 1
#: Label of the lesion segment.
LESION_SEGMENT_LABEL = "Lesion"
#: Model Name of the contributing / creating equipment.
MODEL_NAME = "dermnode"


def model_digests(models: Sequence[ModelIdentity]) -> list[str]:
    """The sorted sha256 digests of ``models`` (the part of every derived UID that identifies the models).

    Parameters
    ----------
    models:
        Identities of the models that produced a result.

    Returns
    -------
    list of str
        Sorted digests (sorted so the order the pipeline lists the models in does not matter).
    """
    return sorted(m.sha256 for m in models)


def device_uid(models: Sequence[ModelIdentity]) -> UID:
    """The Device UID of dermnode as processing equipment: changes whenever any model changes.

    Parameters
    ----------
    models:
        Identities of the models that produced a result.

    Returns
    -------
    pydicom.uid.UID
        A deterministic UID derived from the model digests.
    """
    return derived_uid("dermnode-device", *model_digests(models))


def device_serial_number(models: Sequence[ModelIdentity]) -> str:
    """A short serial number identifying the model set (first 16 hex digits of a digest of the digests).

    Parameters
    ----------
    models:
        Identities of the models that produced a result.

    Returns
    -------
    str
        ``"DN-"`` followed by 16 hexadecimal digits.
    """
    digest = hashlib.sha256("|".join(model_digests(models)).encode("ascii")).hexdigest()
    return f"DN-{digest[:16].upper()}"


def lesion_tracking_uid(source_sop_instance_uid: str, models: Sequence[ModelIdentity]) -> UID:
    """Tracking UID of the lesion, shared by the SEG segment and the SR measurement group.

    Parameters
    ----------
    source_sop_instance_uid:
        SOP Instance UID of the analysed image.
    models:
        Identities of the models that produced the result.

    Returns
    -------
    pydicom.uid.UID
        A deterministic UID.
    """
    return derived_uid("lesion", source_sop_instance_uid, *model_digests(models))


def segmentation_model(models: Sequence[ModelIdentity]) -> ModelIdentity:
    """The model that produced the mask: the first whose name mentions segmentation, else the first.

    Parameters
    ----------
    models:
        Identities of the models that produced a result.

    Returns
    -------
    ModelIdentity
        The segmentation model.

    Raises
    ------
    OutputError
        When ``models`` is empty.
    """
    if not models:
        raise OutputError("the analysis result names no model; cannot identify the algorithm")
    for m in models:
        if "seg" in m.name.lower() or "unet" in m.name.lower():
            return m
    return models[0]


def algorithm_identification(models: Sequence[ModelIdentity], manufacturer: str) -> hd.AlgorithmIdentificationSequence:
    """Segment algorithm identification: name/version of the segmentation model, every model's sha256.

    Parameters
    ----------
    models:
        Identities of the models that produced the result.
    manufacturer:
        Algorithm source (``output.manufacturer``).

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        Family DCM 123110 "Artificial Intelligence".

    Raises
    ------
    OutputError
        When ``models`` is empty.
    """
    seg_model = segmentation_model(models)
    parameters = {f"{m.name}.sha256": m.sha256 for m in models}
    return hd.AlgorithmIdentificationSequence(
        name=seg_model.name[:64],
        family=codes.ALGORITHM_FAMILY_AI,
        version=seg_model.version[:64],
        source=manufacturer[:64] or None,
        parameters=parameters,
    )


def contributing_equipment(
    models: Sequence[ModelIdentity], settings: OutputSettings, software_version: str, description: str
) -> hd.ContributingEquipment:
    """Contributing Equipment item (IHE AIR) describing dermnode as processing equipment.

    Parameters
    ----------
    models:
        Identities of the models that produced the result.
    settings:
        Output settings (manufacturer, institution).
    software_version:
        dermnode's version.
    description:
        Contribution Description.

    Returns
    -------
    highdicom.ContributingEquipment
        Its Device Serial Number identifies the model set. The Device UID (0018,1002) is not part of the
        Contributing Equipment Sequence in the standard (dciodvfy warns about it there), so it goes into the
        General Equipment module of the object instead (:func:`device_uid`).
    """
    return hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.PURPOSE_PROCESSING_EQUIPMENT,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_version,
        device_serial_number=device_serial_number(models),
        institution_name=settings.institution_name or None,
        contribution_description=description[:64],
    )


def _single_frame_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``source`` posing as a single-frame Secondary Capture (its pixels are never read).

    highdicom 0.28 refuses a multi-frame source without a frame of reference and treats the multi-frame SC
    classes as enhanced images with functional groups; the view lets it build the derivation from the
    attributes it copies, and :func:`_restore_source_references` puts the real SOP class and the analysed frame
    back. The view has its own element dictionary, so ``source`` is left unchanged.
    """
    view = pydicom.Dataset()
    view.update(source)
    view.file_meta = source.file_meta
    view.add_new(0x00080016, "UI", SECONDARY_CAPTURE_IMAGE_STORAGE)  # SOP Class UID
    view.add_new(0x00280008, "IS", 1)  # Number of Frames
    return view


def _restore_source_references(ds: pydicom.Dataset, source: pydicom.Dataset, frames: list[int]) -> None:
    """Reference ``source`` with its own SOP class everywhere, and by ``frames`` in Source Image Sequences.

    Referenced Frame Number is Type 1C there: required when the source is multi-frame and not every frame is
    meant (only frame 1 was analysed). Items of a Source Image Sequence are replaced by copies, as highdicom may
    share one item between several sequences (the Referenced Series Sequence has no frame numbers).
    """
    for element in ds:
        if element.VR != "SQ":
            continue
        for index, item in enumerate(element.value):
            if item.get("ReferencedSOPInstanceUID") == source.SOPInstanceUID:
                if element.keyword == "SourceImageSequence":
                    item = copy.deepcopy(item)
                    item.ReferencedFrameNumber = frames
                    element.value[index] = item
                item.ReferencedSOPClassUID = source.SOPClassUID
            _restore_source_references(item, source, frames)


def build_segmentation(
    source: pydicom.Dataset, result: AnalysisResult, settings: OutputSettings, *, software_version: str,
    config_digest: str = "",
) -> hd.seg.Segmentation:
    """Build the lesion SEG of ``result`` for the source image ``source``.

    Parameters
    ----------
    source:
        The analysed colour image (its attributes provide patient, study and frame of reference; its pixel
        data is not read). Of a multi-frame source, frame 1 is the analysed one and the one referenced.
    result:
        The analysis result with a mask (and a probability map for a fractional SEG).
    settings:
        Output settings: series number/description, manufacturer, institution, ``fractional_seg``.
    software_version:
        dermnode's version, written to Software Versions.
    config_digest:
        :func:`~dermnode.dicom_io.uids.content_digest` of the settings used, so that other settings give
        other UIDs (the pipeline always passes it).

    Returns
    -------
    highdicom.seg.Segmentation
        A SEG in Explicit VR Little Endian, BINARY, or FRACTIONAL (PROBABILITY, 8 bit) when
        ``settings.fractional_seg`` and the result has a probability map.

    Raises
    ------
    OutputError
        When the result is not analysable, has no mask, its mask does not match the source's size, or
        highdicom rejects the input.
    """
    if result.status != AnalysisStatus.ANALYSED:
        raise OutputError(f"no segmentation for a result that is {result.status.value}: {result.reason}")
    if result.mask is None:
        raise OutputError("the analysis result has no mask")
    mask = np.asarray(result.mask)
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise OutputError(f"mask shape {mask.shape} does not match the source image {shape}")
    if source.SOPInstanceUID != result.source.sop_instance_uid:
        raise OutputError("the source dataset is not the image the result was computed from")

    digests = model_digests(result.models)
    fractional = settings.fractional_seg and result.probability_map is not None
    if settings.fractional_seg and not fractional:
        logger.warning("fractional SEG requested but the result has no probability map; writing BINARY")
    if fractional:
        assert result.probability_map is not None
        prob = np.asarray(result.probability_map, dtype=np.float32)
        if prob.shape != shape:
            raise OutputError(f"probability map shape {prob.shape} does not match the source image {shape}")
        pixels = np.clip(prob, 0.0, 1.0)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = mask.astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY

    sop_uid = derived_uid("seg", source.SOPInstanceUID, seg_type.value, *digests, config_digest)
    series_uid = derived_uid(
        "seg-series", source.StudyInstanceUID, str(settings.seg_series_number), seg_type.value, *digests,
        config_digest,
    )
    description = hd.seg.SegmentDescription(
        segment_number=LESION_SEGMENT_NUMBER,
        segment_label=LESION_SEGMENT_LABEL,
        segmented_property_category=codes.SEGMENTED_PROPERTY_CATEGORY,
        segmented_property_type=codes.SEGMENTED_PROPERTY_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(result.models, settings.manufacturer),
        tracking_uid=lesion_tracking_uid(source.SOPInstanceUID, result.models),
        tracking_id="lesion 1",
        anatomic_regions=[codes.ANATOMIC_REGION_SKIN],
    )
    try:
        instance_number = int(getattr(source, "InstanceNumber", None) or 1)
    except (TypeError, ValueError):
        instance_number = 1
    frames = analysed_frame_numbers(source)
    # highdicom refuses a multi-frame source without a frame of reference (e.g. Multi-frame True Colour SC):
    # give it frame 1's view (the attributes it copies do not depend on the frame count) and add the frame
    # number to the derivation references below.
    hd_source = source if frames is None else _single_frame_view(source)
    try:
        seg = hd.seg.Segmentation(
            source_images=[hd_source],
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=[description],
            series_instance_uid=series_uid,
            series_number=settings.seg_series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=settings.manufacturer,
            manufacturer_model_name=MODEL_NAME,
            software_versions=software_version,
            device_serial_number=device_serial_number(result.models),
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=255,
            content_description="AI lesion segmentation (decision support only)",
            content_label="LESION",
            content_creator_name=None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=False,
            contributing_equipment=[
                contributing_equipment(result.models, settings, software_version, "AI lesion segmentation")
            ],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"cannot build the segmentation: {exc}") from exc

    seg.SeriesDescription = settings.seg_series_description[:64]
    # General Equipment (Type 3): the UID of dermnode as a device; changes when any model changes.
    seg.DeviceUID = device_uid(result.models)
    # highdicom copies Pixel Spacing into a Pixel Measures functional group, but a photographic source has
    # no Slice Thickness, which that macro then requires (Type 1C). The group is only required when plane
    # position/orientation are present (they are not, for a derivation-image SEG), so leave it out.
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared and "SliceThickness" not in shared.PixelMeasuresSequence[0]:
        del shared.PixelMeasuresSequence
    if settings.institution_name:
        seg.InstitutionName = settings.institution_name[:64]
    # General Image: Patient Orientation is Type 2C, required when the image has no Image Orientation
    # (Patient); the derivation path of a photographic source has none. Copy the source's (may be empty).
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")
    # Source Image Sequence: Referenced Frame Number is Type 1C, required when the source is multi-frame and
    # the reference is not to all of its frames; only frame 1 was analysed.
    if frames is not None:
        _restore_source_references(seg, source, frames)
    logger.info(
        "built %s SEG %s for source %s (%d lesion pixels)",
        seg_type.value,
        sop_uid,
        source.SOPInstanceUID,
        int(mask.sum()),
    )
    return seg
