"""The presentation state and the optional key image of one analysis result, with deterministic UIDs.

:func:`build_outline_objects` turns an :class:`~dermnode.vocabulary.AnalysisResult` into the objects that draw
the finding on the source image in viewers that show no SEG (``docs/dicom-conformance.md``, "Which viewer shows
what"):

* a Color Softcopy Presentation State (:func:`~dermnode.dicom_io.presentation_state.build_presentation_state`)
  for every analysed and every not analysable image when ``output.presentation_state`` is true;
* a Secondary Capture key image with the outline burned in (:func:`~dermnode.dicom_io.key_image.build_key_image`)
  when ``output.burned_in_image`` is true.

Their UIDs are derived like the SEG's and the SR's (:func:`~dermnode.dicom_io.uids.derived_uid`): the same source
analysed by the same models with the same settings always gives the same objects, so a retried delivery or a
re-run never duplicates them in the archive. An object that cannot be built does not stop the others: the
failure is returned (and logged) for ``result.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pydicom

from dermnode import __version__
from dermnode.dicom_io.key_image import build_key_image
from dermnode.dicom_io.presentation_state import build_presentation_state
from dermnode.dicom_io.seg import MODEL_NAME, device_serial_number, lesion_tracking_uid, model_digests
from dermnode.dicom_io.uids import derived_uid
from dermnode.errors import OutputError
from dermnode.settings import OutputSettings
from dermnode.vocabulary import UNDECODABLE_REASON, AnalysisResult, AnalysisStatus

logger = logging.getLogger(__name__)

__all__ = ["OutlineObjects", "build_outline_objects", "key_image_uids", "presentation_state_uids"]

#: Algorithm name shown in the first text line of the presentation state and the key image.
ALGORITHM_NAME = "dermnode"


@dataclass
class OutlineObjects:
    """What :func:`build_outline_objects` made.

    Attributes
    ----------
    presentation_state:
        The Color Softcopy Presentation State, or ``None`` (switched off, or it failed: see ``errors``).
    key_image:
        The Secondary Capture key image, or ``None`` (switched off, or it failed: see ``errors``).
    errors:
        ``"presentation_state"`` / ``"key_image"`` -> why that object was not built although it was asked for.
    """

    presentation_state: pydicom.Dataset | None = None
    key_image: pydicom.Dataset | None = None
    errors: dict[str, str] = field(default_factory=dict)


def presentation_state_uids(
    source: pydicom.Dataset, result: AnalysisResult, seg_sop_instance_uid: str | None, settings: OutputSettings,
    config_digest: str,
) -> tuple[str, str]:
    """``(SOP Instance UID, Series Instance UID)`` of the presentation state of ``result``.

    SOP: ``"pr"``, source SOP Instance UID, SEG SOP Instance UID (or ``no-seg``), model digests, settings digest.
    Series: ``"pr-series"``, Study Instance UID, series number, model digests, settings digest.
    """
    digests = model_digests(result.models)
    sop = derived_uid("pr", str(source.SOPInstanceUID), seg_sop_instance_uid or "no-seg", *digests, config_digest)
    series = derived_uid(
        "pr-series", str(source.StudyInstanceUID), str(settings.pr_series_number), *digests, config_digest
    )
    return str(sop), str(series)


def key_image_uids(
    source: pydicom.Dataset, result: AnalysisResult, seg_sop_instance_uid: str | None, settings: OutputSettings,
    config_digest: str,
) -> tuple[str, str]:
    """``(SOP Instance UID, Series Instance UID)`` of the key image of ``result`` (as for the presentation state,
    with ``"key-image"`` / ``"key-image-series"`` and ``output.key_image_series_number``)."""
    digests = model_digests(result.models)
    sop = derived_uid(
        "key-image", str(source.SOPInstanceUID), seg_sop_instance_uid or "no-seg", *digests, config_digest
    )
    series = derived_uid(
        "key-image-series", str(source.StudyInstanceUID), str(settings.key_image_series_number), *digests,
        config_digest,
    )
    return str(sop), str(series)


def _instance_number(source: pydicom.Dataset) -> int:
    try:
        return max(1, int(getattr(source, "InstanceNumber", None) or 1))
    except (TypeError, ValueError):
        return 1


def build_outline_objects(
    source: pydicom.Dataset,
    result: AnalysisResult,
    settings: OutputSettings,
    *,
    seg_sop_instance_uid: str | None,
    software_version: str,
    config_digest: str,
) -> OutlineObjects:
    """Build the presentation state and (when configured) the key image of ``result``.

    Parameters
    ----------
    source:
        The source image dataset (the one the result was computed from).
    result:
        The analysis result: analysed (outline, band, probability) or not analysable (the reason as text).
    settings:
        ``presentation_state``, ``burned_in_image``, their series numbers and descriptions, manufacturer,
        institution.
    seg_sop_instance_uid:
        The SEG written for the result (part of the UIDs), ``None`` when there is none.
    software_version:
        Software Versions of the objects.
    config_digest:
        :func:`~dermnode.dicom_io.uids.content_digest` of the settings used (part of the UIDs).

    Returns
    -------
    OutlineObjects
        The objects built; an object asked for but not built has its reason in ``errors`` (never raised: the
        SEG, SR and FHIR report go out without it).
    """
    out = OutlineObjects()
    if not (settings.presentation_state or settings.burned_in_image):
        return out
    analysed = result.status is AnalysisStatus.ANALYSED
    reason = None if analysed else (result.reason or result.quality.reason or "not analysable")
    cls = result.classification
    common = {
        "series_number": 0,  # replaced per object
        "instance_number": _instance_number(source),
        "manufacturer": settings.manufacturer,
        "algorithm_name": ALGORITHM_NAME,
        "algorithm_version": __version__,
        "band": None if cls is None or not analysed else cls.band.value,
        "melanoma_probability": None if cls is None or not analysed else float(cls.melanoma_probability),
        "not_analysable_reason": reason,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": software_version[:64],
        "device_serial_number": device_serial_number(result.models) if result.models else None,
        "institution_name": settings.institution_name[:64] or None,
    }
    mask = result.mask if analysed else None
    sop_uid = str(source.SOPInstanceUID)
    if settings.presentation_state:
        pr_sop, pr_series = presentation_state_uids(source, result, seg_sop_instance_uid, settings, config_digest)
        try:
            out.presentation_state = build_presentation_state(
                source,
                mask,
                **{**common, "series_number": settings.pr_series_number},  # type: ignore[arg-type]
                series_instance_uid=pr_series,
                sop_instance_uid=pr_sop,
                series_description=settings.pr_series_description[:64],
                tracking_uid=str(lesion_tracking_uid(sop_uid, result.models)) if analysed else None,
            )
        except (OutputError, ValueError) as exc:
            out.errors["presentation_state"] = str(exc)
            logger.error("no presentation state for %s: %s (SEG, SR and FHIR report go out without it)",
                         sop_uid, exc)
    if settings.burned_in_image:
        ki_sop, ki_series = key_image_uids(source, result, seg_sop_instance_uid, settings, config_digest)
        try:
            if result.reason == UNDECODABLE_REASON and not analysed:
                raise OutputError("the source pixels cannot be decoded: there is no image to burn the text into")
            out.key_image = build_key_image(
                source,
                mask,
                **{**common, "series_number": settings.key_image_series_number},  # type: ignore[arg-type]
                series_instance_uid=ki_series,
                sop_instance_uid=ki_sop,
                series_description=settings.key_image_series_description[:64],
                rgb=result.source.rgb,
            )
        except (OutputError, ValueError) as exc:
            out.errors["key_image"] = str(exc)
            logger.error("no key image for %s: %s (SEG, SR and FHIR report go out without it)", sop_uid, exc)
    return out
