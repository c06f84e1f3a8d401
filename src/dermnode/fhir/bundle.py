"""Build the FHIR transaction Bundle that reports one analysis (decision support only).

The bundle holds, in this order: a conditional-create ``Patient`` (identifier only), the algorithm ``Device``,
the ``ImagingStudy`` (unless ``fhir.imaging_study_resource`` is off), one ``Observation`` per finding and the
``DiagnosticReport``. Every entry is ``POST`` with ``ifNoneExist`` on a deterministic business identifier and
every ``fullUrl`` is a ``urn:uuid:`` derived (uuid5) from the source SOP Instance UID and the entry's role, so
rebuilding the bundle gives the same JSON and re-posting it after a lost answer never duplicates a resource.

The design choices (where the algorithm Device goes in R4/R5, how Observations are traced to the DICOM SR, why
the Patient is a conditional create) are documented in ``docs/fhir.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError
from pydicom.dataset import Dataset

from dermnode import __version__
from dermnode.errors import OutputError
from dermnode.fhir import codes as C
from dermnode.settings import FhirSettings
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    Band,
    Measurements,
    ModelIdentity,
    finding_statements,
    reported_area,
    reported_length,
    reported_percent,
    significant,
)

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

#: Namespace of the uuid5 ``fullUrl``s and generated identifiers.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://dermnode.example/fhir/bundle")
#: Every conclusion carries this phrase.
DISCLAIMER = "decision support only, not a diagnosis"
#: Status of every DiagnosticReport and Observation dermnode writes: decision support awaiting a clinician's
#: review is not final (the DICOM SR's Preliminary Flag is PRELIMINARY alike; see docs/fhir.md).
REPORT_STATUS = "preliminary"
_deprecation_logged: list[bool] = [False]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # what dermnode writes (TID 1500)
_MODALITY_DISPLAY = {
    "DMS": "Dermoscopy",
    "XC": "External-camera Photography",
    "OT": "Other",
    "SEG": "Segmentation",
    "SR": "SR Document",
    "PR": "Presentation State",
}
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DA = re.compile(r"^(\d{4})(\d{2})?(\d{2})?$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_TZ = re.compile(r"^([+-])(\d{2})(\d{2})$")


@dataclass(frozen=True)
class DerivedInstance:
    """A further DICOM object dermnode made for the source (presentation state, key image), for the ImagingStudy.

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, series_instance_uid:
        Its UIDs.
    modality:
        Its Modality (``PR``, ``OT``); a DICOM DCM code.
    series_number:
        Its Series Number, or ``None``.
    series_description:
        Its Series Description (empty: none).
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None = None
    series_description: str = ""


def _uuid(source_uid: str, role: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, f"{source_uid}|{role}"))


def _urn(source_uid: str, role: str) -> str:
    return f"urn:uuid:{_uuid(source_uid, role)}"


def escape_search_token(text: str, *, percent: bool = False) -> str:
    """Escape FHIR search special characters (``\\ | , $``); with ``percent``, also percent-encode for a query."""
    for ch in ("\\", "|", ",", "$"):
        text = text.replace(ch, "\\" + ch)
    return quote(text, safe=":/.-_~") if percent else text



def _if_none_exist(identifier: JsonDict) -> str:
    system, value = (escape_search_token(identifier[k], percent=True) for k in ("system", "value"))
    return f"identifier={system}|{value}"


def _models_digest(models: Sequence[ModelIdentity]) -> str:
    return hashlib.sha256("|".join(sorted(m.sha256 for m in models)).encode()).hexdigest()


# --- DICOM -> FHIR value helpers ---------------------------------------------------------------------------
def has_patient_id(ds: Dataset) -> bool:
    """Whether ``ds`` names its patient (Patient ID, Type 2, may legally be empty): a report needs a subject."""
    return bool(str(ds.get("PatientID", "") or "").strip())


def _patient_identifier(ds: Dataset, settings: FhirSettings) -> JsonDict:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        raise OutputError("the source image has no Patient ID: the report cannot name its subject")
    system = ""
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if issuer.lower().startswith("urn:oid:"):
        issuer = issuer[8:]
    if _OID.match(issuer):
        system = f"urn:oid:{issuer}"
    else:
        for item in ds.get("IssuerOfPatientIDQualifiersSequence", None) or []:
            uid = str(item.get("UniversalEntityID", "") or "").strip()
            if item.get("UniversalEntityIDType", "") == "ISO" and _OID.match(uid):
                system = f"urn:oid:{uid}"
    system = system or settings.patient_identifier_system or C.DEFAULT_PATIENT_ID_SYSTEM
    return {"system": system, "value": patient_id}


def _tz(offset: str) -> str | None:
    m = _TZ.match(offset.strip())
    return None if m is None else f"{m.group(1)}{m.group(2)}:{m.group(3)}"


def _fhir_datetime(date: str, time: str, offset: str | None) -> str | None:
    """FHIR ``dateTime`` from DICOM DA/TM and an optional ``+hhmm`` offset.

    FHIR requires a time zone whenever a time is given, so without an offset only the date is kept.
    """
    dm = _DA.match(date.strip())
    if dm is None:
        return None
    year, month, day = dm.groups()
    if month is None:
        return year
    if day is None:
        return f"{year}-{month}"
    out = f"{year}-{month}-{day}"
    tm = _TM.match(time.strip()) if time else None
    tz = _tz(offset) if offset else None
    if tm is None or tz is None:
        return out
    hh, mm, ss, frac = tm.groups()
    return f"{out}T{hh}:{mm or '00'}:{ss or '00'}{(frac or '')[:4]}{tz}"


def effective_datetime(ds: Dataset) -> str | None:
    """The acquisition time of ``ds`` as a FHIR ``dateTime``, or ``None`` when the dataset has no date.

    Uses Acquisition DateTime, else Content Date/Time, else Study Date/Time. The time zone comes from the DT
    value's own offset, else Timezone Offset From UTC (0008,0201); without either only the date is returned.

    Parameters
    ----------
    ds:
        The source DICOM dataset.

    Returns
    -------
    str or None
        ``YYYY-MM-DDThh:mm:ss[.fff]+hh:mm``, ``YYYY-MM-DD`` (no time zone known) or ``None``.
    """
    default_tz = str(ds.get("TimezoneOffsetFromUTC", "") or "") or None
    adt = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if adt:
        offset = default_tz
        for sign in ("+", "-"):
            if sign in adt:
                adt, off = adt.split(sign, 1)
                offset = sign + off
        value = _fhir_datetime(adt[:8], adt[8:], offset)
        if value is not None:
            return value
    for date_kw, time_kw in (("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
        date = str(ds.get(date_kw, "") or "").strip()
        if date:
            value = _fhir_datetime(date, str(ds.get(time_kw, "") or ""), default_tz)
            if value is not None:
                return value
    return None


def _instant(when: dt.datetime) -> str:
    """``when`` as a FHIR instant, written as the fhir.resources models write it (UTC as ``Z``, microseconds when
    there are any), so that the bundle dermnode writes is the models' own serialisation of it."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    text = when.isoformat(timespec="microseconds" if when.microsecond else "seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# --- Resources ---------------------------------------------------------------------------------------------
class _Builder:
    """Holds the shared context of one bundle build."""

    def __init__(
        self,
        source: Dataset,
        result: AnalysisResult,
        settings: FhirSettings,
        sr_uid: str | None,
        seg_uid: str | None,
        issued: dt.datetime,
    ) -> None:
        self.ds = source
        self.result = result
        self.settings = settings
        self.r5 = settings.version == "R5"
        self.sr_uid = sr_uid
        self.seg_uid = seg_uid
        self.src_uid = result.source.sop_instance_uid
        self.digest = _models_digest(result.models)
        self.issued = _instant(issued)
        self.effective = effective_datetime(source)
        self.entries: list[JsonDict] = []
        self.patient_ref: JsonDict = {}
        self.device_ref: JsonDict = {}
        self.study_ref: JsonDict = {}
        # Namespace of the Observation identifiers: the SR instance when there is one, else a uuid5 name.
        self.obs_system = f"urn:oid:{sr_uid}" if sr_uid else _urn(self.src_uid, f"observations|{self.digest}")

    def add(self, role: str, resource: JsonDict, identifier: JsonDict) -> JsonDict:
        full_url = _urn(self.src_uid, role)
        self.entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {
                    "method": "POST",
                    "url": resource["resourceType"],
                    "ifNoneExist": _if_none_exist(identifier),
                },
            }
        )
        return {"reference": full_url}

    # Patient: conditional create by identifier (identifier only: demographics stay with the MPI).
    def patient(self) -> None:
        ident = _patient_identifier(self.ds, self.settings)
        self.patient_ref = self.add("patient", {"resourceType": "Patient", "identifier": [ident]}, ident)

    def device(self) -> None:
        models = self.result.models
        release = {"system": C.ALGORITHM_RELEASE_SYSTEM, "value": self.digest}
        identifiers: list[JsonDict] = [release]
        versions: list[JsonDict] = [{"type": {"text": "dermnode software"}, "value": __version__}]
        for m in models:
            identifiers.append(
                {
                    "type": {"text": f"{m.name} {m.version} weights SHA-256"},
                    "system": C.MODEL_SHA256_SYSTEM,
                    "value": m.sha256,
                }
            )
            versions.append({"type": {"text": m.name}, "value": m.version})
        name = "dermnode dermoscopy analysis (decision support)"
        resource: JsonDict = {
            "resourceType": "Device",
            "identifier": identifiers,
            "status": "active",
            "manufacturer": "dermnode project",
            "version": versions,
        }
        if self.r5:
            resource["name"] = [{"value": name, "type": "user-friendly-name"}]
        else:
            resource["deviceName"] = [{"name": name, "type": "user-friendly-name"}]
        self.device_ref = self.add("device", resource, release)

    def _modality(self, code: str) -> JsonDict:
        return {"system": C.DICOM_DCM, "code": code, "display": _MODALITY_DISPLAY.get(code, code)}

    def _modality_value(self, code: str) -> JsonDict:
        coding = self._modality(code)
        return {"coding": [coding]} if self.r5 else coding

    def imaging_study(
        self, seg_series_uid: str | None, sr_series_uid: str | None, sr_class: str,
        derived: Sequence[DerivedInstance] = (),
    ) -> None:
        study_uid = self.result.source.study_instance_uid
        ident = {"system": C.DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}
        if not self.settings.imaging_study_resource:
            self.study_ref = {"type": "ImagingStudy", "identifier": ident}
            return
        src = self.result.source
        src_modality = str(self.ds.get("Modality", "") or "OT")
        instance: JsonDict = {
            "uid": src.sop_instance_uid,
            "sopClass": {"system": C.URI_SYSTEM, "code": f"urn:oid:{src.sop_class_uid}"},
        }
        if self.ds.get("InstanceNumber") is not None:
            instance["number"] = int(self.ds.InstanceNumber)
        series: list[JsonDict] = [
            {"uid": src.series_instance_uid, "modality": self._modality_value(src_modality), "instance": [instance]}
        ]
        if self.ds.get("SeriesNumber") is not None:
            series[0]["number"] = int(self.ds.SeriesNumber)
        for uid, series_uid, modality, sop_class in (
            (self.seg_uid, seg_series_uid, "SEG", SEGMENTATION_STORAGE),
            (self.sr_uid, sr_series_uid, "SR", sr_class),
        ):
            if uid and series_uid:
                series.append(
                    {
                        "uid": series_uid,
                        "modality": self._modality_value(modality),
                        "instance": [
                            {"uid": uid, "sopClass": {"system": C.URI_SYSTEM, "code": f"urn:oid:{sop_class}"}}
                        ],
                    }
                )
            elif uid:
                logger.debug("%s instance %s not listed in ImagingStudy: its series UID is unknown", modality, uid)
        for d in derived:  # presentation state, key image: each in its own series
            entry: JsonDict = {
                "uid": d.series_instance_uid,
                "modality": self._modality_value(d.modality),
                "instance": [{
                    "uid": d.sop_instance_uid,
                    "sopClass": {"system": C.URI_SYSTEM, "code": f"urn:oid:{d.sop_class_uid}"},
                }],
            }
            if d.series_number is not None:
                entry["number"] = d.series_number
            if d.series_description:
                entry["description"] = d.series_description
            series.append(entry)
        modalities = list(
            dict.fromkeys(s["modality"]["coding"][0]["code"] if self.r5 else s["modality"]["code"] for s in series)
        )
        resource: JsonDict = {
            "resourceType": "ImagingStudy",
            "identifier": [ident],
            "status": "available",
            "modality": [self._modality_value(m) for m in modalities],
            "subject": self.patient_ref,
            "numberOfSeries": len(series),
            "numberOfInstances": sum(len(s["instance"]) for s in series),
            "series": series,
        }
        if self.effective:
            resource["started"] = self.effective
        self.study_ref = self.add("imaging-study", resource, ident)

    def observation(self, key: str, code: C.Code, body: JsonDict) -> JsonDict:
        ident = {"system": self.obs_system, "value": key}
        resource: JsonDict = {
            "resourceType": "Observation",
            "identifier": [ident],
            "status": REPORT_STATUS,
            "category": [C.CATEGORY_IMAGING.concept()],
            "code": code.concept(),
            "subject": self.patient_ref,
            "issued": self.issued,
            "device": self.device_ref,
            "derivedFrom": [self.study_ref],
        }
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        resource.update(body)
        return self.add(f"observation|{key}", resource, ident)

    def observations(self) -> list[JsonDict]:
        refs: list[JsonDict] = []
        cls = self.result.classification
        if cls is not None:
            refs.append(
                self.observation(
                    "melanoma-probability",
                    C.MELANOMA_PROBABILITY,
                    {"valueQuantity": C.quantity(reported_percent(cls.melanoma_probability), C.UNIT_PERCENT)},
                )
            )
            band = C.BAND_CODES[Band(cls.band).value]
            refs.append(self.observation("melanoma-band", C.MELANOMA_BAND, {"valueCodeableConcept": band.concept()}))
            components = []
            for label, p in sorted(cls.diagnosis_probabilities.items(), key=lambda kv: (-kv[1], kv[0])):
                dc = C.diagnosis_class(label)
                comp_code = C.Code(
                    C.LOCAL_MEASUREMENTS, f"class-probability-{label}", f"AI probability of {dc.local.display}"
                )
                components.append(
                    {
                        "code": comp_code.concept(),
                        "valueQuantity": C.quantity(reported_percent(p), C.UNIT_PERCENT),
                    }
                )
            refs.append(
                self.observation(
                    "top-diagnosis",
                    C.TOP_DIAGNOSIS,
                    {"valueCodeableConcept": C.diagnosis_class(cls.top_diagnosis).concept(), "component": components},
                )
            )
        if self.result.measurements is not None:
            refs.extend(self._measurement_observations(self.result.measurements))
        return refs

    def _measurement_observations(self, m: Measurements) -> list[JsonDict]:
        refs: list[JsonDict] = []
        absent = {
            "dataAbsentReason": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                        "code": "unknown",
                        "display": "Unknown",
                    }
                ],
                "text": "image not calibrated: physical size unknown (pixel value in component)",
            }
        }
        # rounded as reported everywhere (vocabulary.reported_*): 0.01 mm2 / 0.1 mm, whole pixels
        area_mm2 = None if m.area_mm2 is None else reported_area(m.area_mm2, millimetres=True)
        diameter_mm = None if m.max_diameter_mm is None else reported_length(m.max_diameter_mm, millimetres=True)
        for key, code, px_code, mm_value, px_value, unit, px_unit in (
            ("lesion-area", C.LESION_AREA, C.LESION_AREA_PX, area_mm2, int(m.area_px), C.UNIT_MM2,
             C.UNIT_SQUARE_PIXELS),
            ("lesion-max-diameter", C.MAX_DIAMETER, C.MAX_DIAMETER_PX, diameter_mm,
             reported_length(m.max_diameter_px, millimetres=False), C.UNIT_MM, C.UNIT_PIXELS),
        ):
            body: JsonDict = {"valueQuantity": C.quantity(mm_value, unit)} if mm_value is not None else dict(absent)
            body["component"] = [{"code": px_code.concept(), "valueQuantity": C.quantity(px_value, px_unit)}]
            refs.append(self.observation(key, code, body))
        refs.append(
            self.observation(
                "asymmetry",
                C.ASYMMETRY,
                {
                    "valueQuantity": C.quantity(significant(m.asymmetry), C.UNIT_ONE),
                    "component": [{"code": C.ASYMMETRY_AXES.concept(), "valueInteger": int(m.asymmetry_axes)}],
                },
            )
        )
        refs.append(
            self.observation(
                "border-irregularity",
                C.BORDER_IRREGULARITY,
                {
                    "valueQuantity": C.quantity(significant(m.border_irregularity), C.UNIT_ONE),
                    "component": [{"code": C.BORDER_SCORE.concept(), "valueInteger": int(m.border_score)}],
                },
            )
        )
        colour_body: JsonDict = {"valueInteger": len(m.colors)}
        if m.colors:
            colour_body["component"] = [
                {"code": C.COLOUR_PRESENT.concept(), "valueCodeableConcept": C.colour_code(c).concept()}
                for c in m.colors
            ]
        refs.append(self.observation("colours", C.COLOUR_COUNT, colour_body))
        if m.tds is not None:
            refs.append(self.observation("tds", C.TDS, {"valueQuantity": C.quantity(m.tds, C.UNIT_SCORE, 2)}))
        return refs

    def conclusion(self) -> str:
        """The conclusion: the disclaimer, then the same sentences as the SR's comments
        (:func:`~dermnode.vocabulary.finding_statements`), then the call for review."""
        parts = [f"Automated dermoscopy analysis ({DISCLAIMER}).", *finding_statements(self.result)]
        parts.append("Results must be confirmed by a qualified clinician.")
        return " ".join(parts)

    def report(self, results: list[JsonDict], overlay: bytes | None, overlay_type: str = "image/png") -> None:
        r = self.result
        if self.sr_uid:
            ident = {"system": C.DICOM_UID_SYSTEM, "value": f"urn:oid:{self.sr_uid}"}
        else:
            ident = {"system": C.URI_SYSTEM, "value": _urn(self.src_uid, f"report|{self.digest}")}
        # every report awaits a clinician's review: preliminary, for every band and for a refused image, like the
        # SR's Preliminary Flag; fhir.preliminary_when_indeterminate is deprecated (it can no longer make a
        # report final, which would contradict the SR)
        status = REPORT_STATUS
        if not self.settings.preliminary_when_indeterminate and not _deprecation_logged[0]:
            _deprecation_logged[0] = True
            logger.warning(
                "fhir.preliminary_when_indeterminate = false is deprecated and ignored: every report is "
                "'preliminary' (decision support awaiting review), as the DICOM SR's Preliminary Flag"
            )
        cls = r.classification
        resource: JsonDict = {
            "resourceType": "DiagnosticReport",
            "identifier": [ident],
            "status": status,
            "category": [C.CATEGORY_IMAGING.concept()],
            "code": {
                "coding": [C.REPORT_CODE.coding(), C.REPORT_CODE_DERMOSCOPY.coding(), C.REPORT_CODE_LOCAL.coding()],
                "text": f"Dermoscopy AI analysis ({DISCLAIMER})",
            },
            "subject": self.patient_ref,
            "issued": self.issued,
            "conclusion": self.conclusion(),
        }
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        resource["study" if self.r5 else "imagingStudy"] = [self.study_ref]
        if results:
            resource["result"] = results
        if r.status is AnalysisStatus.ANALYSED and cls is not None:
            resource["conclusionCode"] = [C.diagnosis_class(cls.top_diagnosis).concept()]
        if overlay and self.settings.include_overlay and r.status is AnalysisStatus.ANALYSED:
            resource["presentedForm"] = [
                {
                    "contentType": overlay_type,
                    "data": base64.b64encode(overlay).decode("ascii"),
                    "title": f"Lesion segmentation overlay ({DISCLAIMER})",
                    "hash": base64.b64encode(hashlib.sha1(overlay).digest()).decode("ascii"),
                    "size": len(overlay),
                }
            ]
        self.add("report", resource, ident)


def _validate(bundle: JsonDict, version: str) -> None:
    """Validate ``bundle`` with the fhir.resources model of ``version``: the one validation of a bundle.

    Raises
    ------
    OutputError
        When the model rejects the bundle.
    """
    from fhir.resources.bundle import Bundle as BundleR5
    from fhir.resources.R4B.bundle import Bundle as BundleR4B

    model_cls: Any = BundleR5 if version == "R5" else BundleR4B
    try:
        model_cls.model_validate(bundle)
    except (ValidationError, ValueError, TypeError) as exc:
        raise OutputError(f"the FHIR {version} bundle failed model validation: {exc}") from exc


def build_bundle(
    source: Dataset,
    result: AnalysisResult,
    *,
    sr_sop_instance_uid: str | None,
    seg_sop_instance_uid: str | None,
    overlay_png: bytes | None = None,
    settings: FhirSettings,
    issued: dt.datetime | None = None,
    sr_series_instance_uid: str | None = None,
    seg_series_instance_uid: str | None = None,
    sr_sop_class_uid: str = COMPREHENSIVE_3D_SR_STORAGE,
    derived_instances: Sequence[DerivedInstance] = (),
    overlay_jpeg: bytes | None = None,
) -> JsonDict:
    """Build the transaction Bundle reporting ``result`` for the FHIR version in ``settings.version``.

    Parameters
    ----------
    source:
        The source DICOM dataset (patient, study and acquisition attributes are read from it).
    result:
        The analysis result.
    sr_sop_instance_uid, seg_sop_instance_uid:
        SOP Instance UIDs of the DICOM SR and SEG written for this result, or ``None`` when not produced.
        The SR UID becomes the DiagnosticReport identifier and the namespace of the Observation identifiers.
    overlay_png:
        PNG overlay of the segmentation, attached as ``presentedForm`` (``image/png``) when
        ``settings.include_overlay`` and no ``overlay_jpeg`` is given.
    settings:
        FHIR settings (version, patient identifier system, ImagingStudy and preliminary options).
    issued:
        Report time (default: now, UTC); pass a fixed value to get byte-identical rebuilds.
    sr_series_instance_uid, seg_series_instance_uid:
        Series of the SR and SEG; when given (with the instance UID) they are listed in the ImagingStudy.
    sr_sop_class_uid:
        SOP Class of the SR (default: Comprehensive 3D SR Storage, what dermnode writes).
    derived_instances:
        The presentation state and key image written for the result: each is listed in the ImagingStudy as an
        instance of its own series (nothing when ``fhir.imaging_study_resource`` is off).
    overlay_jpeg:
        JPEG overlay, attached as ``presentedForm`` (``image/jpeg``) instead of ``overlay_png`` when given (what
        the pipeline attaches: a tenth of the PNG's size).

    Returns
    -------
    dict
        The Bundle as a JSON-compatible dict (R4-compatible JSON, validated with the R4B models, or R5).

    Raises
    ------
    OutputError
        When the source has no Patient ID, the version is unknown or the bundle fails model validation.
    """
    if settings.version not in ("R4", "R5"):
        raise OutputError(f"unsupported FHIR version {settings.version!r} (R4 or R5)")
    when = issued or dt.datetime.now(dt.UTC)
    b = _Builder(source, result, settings, sr_sop_instance_uid, seg_sop_instance_uid, when)
    b.patient()
    if result.status is AnalysisStatus.ANALYSED:
        b.device()
    b.imaging_study(seg_series_instance_uid, sr_series_instance_uid, sr_sop_class_uid, derived_instances)
    results = b.observations() if result.status is AnalysisStatus.ANALYSED else []
    if overlay_jpeg is not None:
        b.report(results, overlay_jpeg, "image/jpeg")
    else:
        b.report(results, overlay_png, "image/png")
    bundle: JsonDict = {
        "resourceType": "Bundle",
        "identifier": {"system": C.URI_SYSTEM, "value": _urn(b.src_uid, f"bundle|{b.digest}")},
        "type": "transaction",
        "timestamp": b.issued,
        "entry": b.entries,
    }
    _validate(bundle, settings.version)
    logger.info(
        "built FHIR %s transaction bundle for %s: %d entries, report %s",
        settings.version,
        b.src_uid,
        len(b.entries),
        b.entries[-1]["resource"]["status"],
    )
    return bundle


def encode_bundle(bundle: JsonDict) -> bytes:
    """The bundle of :func:`build_bundle` as the UTF-8 JSON file the pipeline writes and the outbox posts.

    :func:`build_bundle` validated it once (by the fhir.resources models) and it is used as built: serialised once
    (compact ``json.dumps``), no model serialisation, no parse and re-serialisation.

    Parameters
    ----------
    bundle:
        What :func:`build_bundle` returned.

    Returns
    -------
    bytes
        The bundle's JSON text, UTF-8.
    """
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
