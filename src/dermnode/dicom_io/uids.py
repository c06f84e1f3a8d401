"""UIDs, SOP classes and transfer syntaxes dermnode uses.

Derived objects get deterministic UIDs (:func:`derived_uid`): the same source instance analysed by the same
models always yields the same SEG/SR UIDs, so a re-run or a retried delivery is idempotent in the archive.
"""

from __future__ import annotations

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
