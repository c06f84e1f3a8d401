"""TID 1500 Measurement Report (Comprehensive 3D SR) of one analysed dermoscopy image.

Content tree (highdicom templates):

- Measurement Report (TID 1500): language, observation context (device observer = dermnode; the subject is
  the patient of the Patient module, TID 1006 default), Procedure Reported = dermoscopic photography, an
  image library entry for the source image.
- Imaging Measurements: one Planar ROI measurement group (TID 1410) for the lesion, referencing segment 1 of
  the SEG and the source image, with algorithm identification (TID 4019) on the group and on every
  measurement: area, long axis (maximum diameter), perimeter (mm² / mm when calibrated, ``{square_pixels}`` /
  ``{pixels}`` otherwise), asymmetry, border irregularity, colour count, TDS, melanoma probability; qualitative
  evaluations: suspected finding (top diagnosis, SNOMED CT) and melanoma risk band.
- Qualitative Evaluations (TID 1500 row 12): TEXT "Comment" items with the decision-support disclaimer and the
  findings in words, the same sentences as the FHIR conclusion (:func:`dermnode.vocabulary.finding_statements`:
  melanoma probability and band, most likely class with its probability, size or "no physical calibration:
  measurements in pixels"; for a not analysable image "Not analysable: <reason>.").

A not analysable result yields a measurement group (TID 1501) without ROI reference, Finding or finding site,
whose only evaluation is "Analysis outcome = Not analysable", plus the reason as text; no SEG is referenced.
Preliminary Flag is PRELIMINARY for every report (decision support awaiting review). Numbers are rounded as
reported everywhere (:func:`dermnode.vocabulary.reported_length` and siblings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dermnode.dicom_io import codes
from dermnode.dicom_io.reading import analysed_frame_numbers
from dermnode.dicom_io.seg import (
    LESION_SEGMENT_NUMBER,
    MODEL_NAME,
    contributing_equipment,
    device_uid,
    lesion_tracking_uid,
    model_digests,
    segmentation_model,
)
from dermnode.dicom_io.uids import derived_uid
from dermnode.errors import OutputError
from dermnode.settings import OutputSettings
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    ModelIdentity,
    finding_statements,
    reported_area,
    reported_length,
    reported_probability,
    significant,
)

logger = logging.getLogger(__name__)

#: Comprehensive 3D SR Storage SOP Class.
COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")

#: Text of the disclaimer every report carries.
DISCLAIMER = (
    "Decision support only. This report was generated automatically by software (dermnode) and is not a "
    "diagnosis. Measurements, suspected finding and risk band must be reviewed by a qualified clinician "
    "together with the clinical context before any decision is taken."
)

#: DCM 121214 "Referenced Segmentation Frame": the IMAGE item whose frame number is dropped (see below).
_REFERENCED_SEGMENTATION_FRAME = ("121214", "DCM")


def _algorithm(model: ModelIdentity, manufacturer: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=model.version[:64],
        parameters=[f"sha256={model.sha256}"],
        manufacturer=manufacturer[:64] or None,
    )


def _pipeline_algorithm(
    models: Sequence[ModelIdentity], manufacturer: str, software_version: str
) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=MODEL_NAME,
        version=software_version[:64],
        parameters=[f"{m.name} {m.version} sha256={m.sha256}" for m in models],
        manufacturer=manufacturer[:64] or None,
    )


def _classifier_model(models: Sequence[ModelIdentity]) -> ModelIdentity:
    seg_model = segmentation_model(models)
    for m in models:
        if m is not seg_model:
            return m
    return seg_model


def _text(value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.COMMENT, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _measurements(
    result: AnalysisResult, seg_algo: hd.sr.AlgorithmIdentification, cls_algo: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    out: list[hd.sr.Measurement] = []
    names, units = codes.MeasurementName, codes.Unit

    def add(name: Code, value: float, unit: Code, algo: hd.sr.AlgorithmIdentification) -> None:
        out.append(hd.sr.Measurement(name=name, value=value, unit=unit, algorithm_id=algo))

    # values are rounded as reported everywhere (vocabulary.reported_*): 0.1 mm, 0.01 mm2, whole pixels,
    # 3 significant digits for probabilities and indices
    m = result.measurements
    if m is not None:
        if m.area_mm2 is not None:
            add(names.AREA.value, reported_area(m.area_mm2, millimetres=True), units.SQUARE_MILLIMETRE.value,
                seg_algo)
        else:
            add(names.AREA.value, int(m.area_px), units.SQUARE_PIXELS.value, seg_algo)
        for name, mm, px in (
            (names.MAX_DIAMETER, m.max_diameter_mm, m.max_diameter_px),
            (names.PERIMETER, m.perimeter_mm, m.perimeter_px),
        ):
            if mm is not None:
                add(name.value, reported_length(mm, millimetres=True), units.MILLIMETRE.value, seg_algo)
            else:
                add(name.value, reported_length(px, millimetres=False), units.PIXELS.value, seg_algo)
        add(names.ASYMMETRY.value, significant(m.asymmetry), units.NO_UNITS.value, seg_algo)
        add(names.BORDER_IRREGULARITY.value, significant(m.border_irregularity), units.NO_UNITS.value, seg_algo)
        add(names.COLOUR_COUNT.value, len(m.colors), units.NO_UNITS.value, seg_algo)
        if m.tds is not None:
            add(names.TDS.value, round(float(m.tds), 2), units.NO_UNITS.value, seg_algo)
    c = result.classification
    if c is not None:
        add(names.MELANOMA_PROBABILITY.value, reported_probability(c.melanoma_probability), units.NO_UNITS.value,
            cls_algo)
    return out


def _evaluations(result: AnalysisResult) -> list[hd.sr.QualitativeEvaluation]:
    out: list[hd.sr.QualitativeEvaluation] = []
    c = result.classification
    if c is None:
        return out
    finding = codes.suspected_finding_code(c.top_diagnosis)
    if finding is not None:
        out.append(hd.sr.QualitativeEvaluation(name=codes.SUSPECTED_FINDING, value=finding))
    out.append(hd.sr.QualitativeEvaluation(name=codes.RISK_BAND, value=codes.band_code(c.band)))
    return out


def _image_library(source: Dataset, presentation_state: Dataset | None = None) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one entry for the source image.

    Built by hand because highdicom 0.28.2's ``ImageLibrary`` does not know the Dermoscopic Photography
    Image Storage SOP Class (it raises ValueError for its modality). Descriptors (TID 1602): Modality at the
    group level. With a ``presentation_state``, the source's IMAGE item names it in the nested Referenced SOP
    Sequence of its Referenced SOP Sequence item (Image Reference Macro, PS3.3 Table 10-3: the softcopy
    presentation state to apply to the image; one item), so an SR viewer shows the image with the outline.
    """
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    modality = source.get("Modality") or "DMS"
    modality_code = codes.MODALITY_DERMOSCOPY if modality == "DMS" else Code(modality, "DCM", modality)
    group = hd.sr.ContainerContentItem(name=codes.IMAGE_LIBRARY_GROUP, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.MODALITY,
                value=modality_code,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            ),
            hd.sr.ImageContentItem(
                name=codes.SOURCE,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                referenced_frame_numbers=analysed_frame_numbers(source),
                relationship_type=contains,
            ),
        ]
    )
    if presentation_state is not None:
        applied = Dataset()
        applied.ReferencedSOPClassUID = presentation_state.SOPClassUID
        applied.ReferencedSOPInstanceUID = presentation_state.SOPInstanceUID
        group.ContentSequence[1].ReferencedSOPSequence[0].ReferencedSOPSequence = [applied]
    library = hd.sr.ContainerContentItem(name=codes.IMAGE_LIBRARY, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _drop_segment_frame_numbers(items: Sequence[Dataset]) -> int:
    """Remove Referenced Frame Number where a Referenced Segment Number is present (in place).

    In the SOP instance reference of an IMAGE content item, Referenced Frame Number and Referenced Segment
    Number are mutually exclusive (each is Type 1C, required only when the other is absent);
    highdicom's ReferencedSegmentationFrame writes both, which ``dciodvfy`` reports as an error. For a
    single-frame SEG the frame number adds nothing, so the segment number alone is kept.
    """
    dropped = 0
    for item in items:
        concept = item.get("ConceptNameCodeSequence")
        if (
            item.get("ValueType") == "IMAGE"
            and concept
            and (concept[0].CodeValue, concept[0].CodingSchemeDesignator) == _REFERENCED_SEGMENTATION_FRAME
        ):
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber
                    dropped += 1
        dropped += _drop_segment_frame_numbers(item.get("ContentSequence", []))
    return dropped


def _referenced_instances(items: Sequence[Dataset]) -> set[str]:
    """SOP Instance UIDs referenced by the IMAGE and COMPOSITE content items of ``items`` and their children."""
    found: set[str] = set()
    for item in items:
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            found.update(str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", []))
        found |= _referenced_instances(item.get("ContentSequence", []))
    return found


def _check_evidence(root: Dataset, evidence: Sequence[Dataset]) -> None:
    """Raise when the content tree under ``root`` references an instance that is not in ``evidence``.

    The check highdicom's SR constructor makes (it searches for IMAGE and COMPOSITE items), done here in one walk.

    Raises
    ------
    OutputError
        When a referenced instance is missing from the evidence.
    """
    missing = _referenced_instances(root.get("ContentSequence", [])) - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise OutputError(f"the report references instances that are not in its evidence: {sorted(missing)}")


def build_report(
    source: pydicom.Dataset,
    result: AnalysisResult,
    segmentation: hd.seg.Segmentation | None,
    settings: OutputSettings,
    *,
    software_version: str,
    config_digest: str = "",
    presentation_state: Dataset | None = None,
    key_image: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report of ``result``.

    Parameters
    ----------
    source:
        The analysed image (patient, study, and the image the report references).
    result:
        The analysis result.
    segmentation:
        The SEG built from ``result`` (:func:`dermnode.dicom_io.seg.build_segmentation`); ``None`` for a not
        analysable result (then no SEG is referenced), or when no SEG was written.
    settings:
        Output settings: SR series number/description, manufacturer, institution.
    software_version:
        dermnode's version, written to Software Versions and the algorithm identification.
    config_digest:
        :func:`~dermnode.dicom_io.uids.content_digest` of the settings used, so that other settings give
        other UIDs (the pipeline always passes it).
    presentation_state:
        The Color Softcopy Presentation State drawing the finding on the source
        (:mod:`dermnode.dicom_io.presentation_state`), or ``None``. It is named as the presentation state of the
        source's Image Library entry and listed in the Current Requested Procedure Evidence Sequence.
    key_image:
        The key image with the finding burned in (:mod:`dermnode.dicom_io.key_image`), or ``None``; listed in
        the Current Requested Procedure Evidence Sequence (TID 1500 has no content item for a derived picture).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The report; completion flag COMPLETE, verification flag UNVERIFIED, preliminary flag PRELIMINARY
        (decision support awaiting review; the FHIR DiagnosticReport is ``preliminary`` alike).

    Raises
    ------
    OutputError
        When the SEG or the source do not belong to the result, or highdicom rejects the content.
    """
    if source.SOPInstanceUID != result.source.sop_instance_uid:
        raise OutputError("the source dataset is not the image the result was computed from")
    analysed = result.status == AnalysisStatus.ANALYSED
    if not analysed:
        segmentation = None  # a not analysable result never references a SEG
    if segmentation is not None and segmentation.StudyInstanceUID != source.StudyInstanceUID:
        raise OutputError("the segmentation belongs to another study than the source image")
    if not result.models:
        raise OutputError("the analysis result names no model; cannot identify the algorithm")

    digests = model_digests(result.models)
    manufacturer = settings.manufacturer
    seg_algo = _algorithm(segmentation_model(result.models), manufacturer)
    cls_algo = _algorithm(_classifier_model(result.models), manufacturer)
    pipeline_algo = _pipeline_algorithm(result.models, manufacturer, software_version)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.OBSERVER_DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result.models),
            name=MODEL_NAME,
            manufacturer_name=manufacturer[:64] or None,
            model_name=MODEL_NAME,
        ),
    )
    # No subject context: TID 1006 defaults to the patient described by the Patient module (copied from
    # the source by highdicom).
    observation_context = hd.sr.ObservationContext(observer_device_context=observer)
    tracking = hd.sr.TrackingIdentifier(
        uid=lesion_tracking_uid(source.SOPInstanceUID, result.models), identifier="lesion 1"
    )
    finding_sites = [hd.sr.FindingSite(anatomic_location=codes.ANATOMIC_REGION_SKIN)]
    # the findings in words, the same sentences as the FHIR conclusion (vocabulary.finding_statements): for a
    # refused image "Not analysable: <reason>."; otherwise probability, top class, size or the pixels caveat
    texts = [_text(DISCLAIMER), *(_text(t) for t in finding_statements(result))]

    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    try:
        if not analysed:
            # no Finding (a refused frame may show no skin lesion at all, e.g. a screenshot) and no finding site:
            # only the outcome; the reason is the "Not analysable: ..." comment
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                algorithm_id=pipeline_algo,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=codes.ANALYSIS_OUTCOME, value=codes.NOT_ANALYSABLE)
                ],
            )
        elif segmentation is not None:
            reference = hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                frame_number=1,
                segment_number=LESION_SEGMENT_NUMBER,
                source_image=hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=source.SOPClassUID,
                    referenced_sop_instance_uid=source.SOPInstanceUID,
                    referenced_frame_numbers=analysed_frame_numbers(source),
                ),
            )
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=reference,
                finding_type=codes.FINDING_TYPE_SKIN_LESION,
                algorithm_id=pipeline_algo,
                finding_sites=finding_sites,
                measurements=_measurements(result, seg_algo, cls_algo) or None,
                qualitative_evaluations=_evaluations(result) or None,
            )
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=codes.FINDING_TYPE_SKIN_LESION,
                algorithm_id=pipeline_algo,
                finding_sites=finding_sites,
                measurements=_measurements(result, seg_algo, cls_algo) or None,
                qualitative_evaluations=_evaluations(result) or None,
            )
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=codes.PROCEDURE_DERMOSCOPY,
            imaging_measurements=[group],
        )
        # TID 1500 row 5 (Image Library) precedes the Imaging Measurements container.
        content = report[0].ContentSequence
        position = next((i for i, item in enumerate(content) if item.ValueType == "CONTAINER"), len(content))
        content.insert(position, _image_library(source, presentation_state))
        evaluations = hd.sr.ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        evaluations.ContentSequence = hd.sr.ContentSequence(texts)
        report[0].ContentSequence.append(evaluations)

        seg_uid = segmentation.SOPInstanceUID if segmentation is not None else "no-seg"
        sop_uid = derived_uid("sr", source.SOPInstanceUID, seg_uid, *digests, config_digest)
        series_uid = derived_uid(
            "sr-series", source.StudyInstanceUID, str(settings.sr_series_number), *digests, config_digest
        )
        try:
            instance_number = int(getattr(source, "InstanceNumber", None) or 1)
        except (TypeError, ValueError):
            instance_number = 1
        evidence: list[Dataset] = [source] if segmentation is None else [source, segmentation]
        for extra in (presentation_state, key_image):
            if extra is not None:
                if extra.StudyInstanceUID != source.StudyInstanceUID:
                    raise OutputError(f"{extra.SOPInstanceUID} belongs to another study than the source image")
                evidence.append(extra)
        _check_evidence(report[0], evidence)
        # highdicom's constructor deep-copies the whole content tree, converts the copy back into content items
        # and searches it twice for references (about three quarters of the SR's build time, none of it needed:
        # the tree was just built by highdicom's templates and its references were checked above). It gets the
        # root container without its children; the children are attached afterwards. Every piece of evidence is
        # recorded either way (all of it is in the source's study: Current Requested Procedure Evidence).
        root = report[0]
        children = root.ContentSequence
        root.ContentSequence = hd.sr.ContentSequence()
        try:
            sr = hd.sr.Comprehensive3DSR(
                evidence=evidence,
                content=report,
                series_instance_uid=series_uid,
                series_number=settings.sr_series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                is_complete=True,
                # decision support awaiting a clinician's review is not final: PRELIMINARY, like the FHIR report's
                # status "preliminary" (docs/dicom-conformance.md)
                is_final=False,
                is_verified=False,
                institution_name=settings.institution_name or None,
                contributing_equipment=[
                    contributing_equipment(result.models, settings, software_version, "AI dermoscopy report")
                ],
            )
        finally:
            root.ContentSequence = children
        sr.ContentSequence = children
        # what ``sr.content`` returns: the same tree (highdicom keeps a converted deep copy there)
        sr._content = hd.sr.ContentSequence([cast(hd.sr.ContentItem, root)], is_root=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"cannot build the measurement report: {exc}") from exc

    sr.SeriesDescription = settings.sr_series_description[:64]
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = software_version[:64]
    sr.DeviceUID = device_uid(result.models)
    schemes: list[Dataset] = list(sr.get("CodingSchemeIdentificationSequence", []))
    if not any(s.get("CodingSchemeDesignator") == codes.PRIVATE_SCHEME for s in schemes):
        schemes.append(codes.private_scheme_identification())
    sr.CodingSchemeIdentificationSequence = schemes  # pydicom stores a list as a Sequence
    dropped = _drop_segment_frame_numbers(sr.ContentSequence)
    logger.info(
        "built SR %s for source %s (%s, SEG %s, %d frame reference(s) reduced to segment references)",
        sop_uid,
        source.SOPInstanceUID,
        result.status.value,
        "none" if segmentation is None else segmentation.SOPInstanceUID,
        dropped,
    )
    return sr
