"""UIDs, SOP classes and transfer syntaxes dermnode uses.

Derived objects get deterministic UIDs (:func:`derived_uid`): the same source instance analysed by the same
models with the same settings (:func:`content_digest`) always yields the same SEG/SR UIDs, so a re-run or a
retried delivery is idempotent in the archive, and different content never shares a UID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from dermnode.settings import AnalysisSettings, OutputSettings

#: DICOM UID syntax (PS3.5 §9.1): digits and dots, components not empty, at most 64 characters.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` has the DICOM UID syntax (PS3.5 §9.1), so it is safe in a file name.

    Only digits and single dots, at most 64 characters. A leading zero in a multi-digit component, forbidden by
    the standard, is tolerated: some devices send such UIDs and they are harmless in a path.
    """
    return len(uid) <= UID_MAX_LENGTH and _UID_RE.fullmatch(uid) is not None


#: UID root of dermnode-generated UIDs (pydicom's root: no organisation root is registered for this project).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.7")
VL_PHOTOGRAPHIC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.4")
VERIFICATION = UID("1.2.840.10008.1.1")

#: Storage SOP classes the Store SCP accepts (a dermatology workflow's images).
ACCEPTED_STORAGE_CLASSES: tuple[UID, ...] = (
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE,
    VL_PHOTOGRAPHIC_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
)

#: Transfer syntaxes the Store SCP accepts; everything else is refused at negotiation.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def derived_uid(*parts: str) -> UID:
    """A deterministic UID under :data:`UID_PREFIX` derived from ``parts`` (hash based)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=list(parts))


#: Analysis settings that cannot change an output's content (model identity is hashed separately).
_CONTENT_NEUTRAL_ANALYSIS_KEYS = frozenset({"models_dir", "torch_threads"})


def content_digest(analysis: AnalysisSettings, output: OutputSettings) -> str:
    """SHA-256 (hex) of the settings the SEG/SR content depends on, for :func:`derived_uid`.

    Hair removal, CLAHE, the band thresholds and the device calibrations change the mask or the reported
    values, and the output settings change series numbers and descriptive attributes: an instance analysed
    again with other settings must not reuse a SOP Instance UID (PS3.3 C.12.1.1.1). Where the weights are read
    from and the thread count do not change the content and are left out.
    """
    doc = {k: v for k, v in dataclasses.asdict(analysis).items() if k not in _CONTENT_NEUTRAL_ANALYSIS_KEYS}
    doc["output"] = dataclasses.asdict(output)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode("utf-8")).hexdigest()
