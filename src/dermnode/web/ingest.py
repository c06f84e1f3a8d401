"""Uploads from the console: through the same durable spool and job queue as a C-STORE, never a side path.

A photograph (JPEG or PNG) is wrapped as a Dermoscopic Photography Image with
:func:`dermnode.dicom_io.wrap.wrap_file`, exactly as ``dermnode wrap`` does (native RGB, the patient ID and
optional pixel spacing from the form). A DICOM file is checked as the Store SCP checks a C-STORE: a storage SOP
class and transfer syntax the SCP accepts, valid and consistent UIDs. Then :func:`store_instance` stores it through
the SCP's own write path, :func:`dermnode.scp.store.store_and_queue`: free-space check, duplicate check,
:meth:`Spool.store` (temporary file, fsync, rename) and :meth:`JobQueue.enqueue` (or :meth:`JobQueue.requeue_dead`
for an instance whose job was dead-lettered).

Whether a photo shows skin is decided where it is for every C-STORE: by the quality gate of the analysis. A photo
that is not a dermoscopy image is stored, analysed and reported *not analysable* with the gate's reason, which
the result page shows.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from PIL import Image

from dermnode.dicom_io.reading import MAX_PIXELS
from dermnode.dicom_io.uids import ACCEPTED_STORAGE_CLASSES, ACCEPTED_TRANSFER_SYNTAXES, is_valid_uid
from dermnode.dicom_io.wrap import WrapOptions, wrap_file
from dermnode.errors import DecodeError, InsufficientSpaceError, StorageError
from dermnode.scp.spool import Spool
from dermnode.scp.store import StoreOutcome, store_and_queue
from dermnode.workqueue.jobs import JobQueue

logger = logging.getLogger(__name__)
audit = logging.getLogger("dermnode.audit")

#: The calling AE title recorded on jobs that came from the console (``dermnode status`` shows it).
CALLING_AET = "WEB-CONSOLE"
#: Photograph formats accepted for wrapping.
PHOTO_FORMATS = {"JPEG": "JPEG", "PNG": "PNG"}
MAX_PATIENT_ID = 64  # VR LO


@dataclass(frozen=True)
class Accepted:
    filename: str
    sop_instance_uid: str
    note: str


@dataclass(frozen=True)
class Refused:
    filename: str
    reason: str


Outcome = Accepted | Refused


def check_patient_id(value: str) -> str | None:
    """The reason a patient ID is unusable (``None``: fine). It becomes the DICOM Patient ID (VR LO)."""
    if len(value) > MAX_PATIENT_ID:
        return f"the patient ID is longer than {MAX_PATIENT_ID} characters"
    if "\\" in value or not value.isprintable():
        return "the patient ID has a backslash or a control character"
    return None


def parse_pixel_spacing(text: str) -> tuple[float | None, str | None]:
    """The optional pixel spacing of the form in mm (``(value, None)``) or why it is refused (``(None, reason)``)."""
    text = text.strip().replace(",", ".")
    if not text:
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, f"pixel spacing {text!r} is not a number (millimetres per pixel, e.g. 0.02)"
    if not 0.0001 <= value <= 10.0:
        return None, f"pixel spacing {value} mm is outside 0.0001 to 10 mm per pixel"
    return value, None


#: What the console tells the user for each outcome of :func:`~dermnode.scp.store.store_and_queue`.
NOTES = {
    StoreOutcome.STORED: "stored and queued",
    StoreOutcome.DUPLICATE: "already received: stored once, not processed again",
    StoreOutcome.DUPLICATE_CONCURRENT: "already received (concurrently): stored once",
    StoreOutcome.REQUEUED: "received again after it was dead-lettered: stored and re-queued",
    StoreOutcome.REQUEUED_CONCURRENT: "stored once",
}


def store_instance(
    spool: Spool,
    queue: JobQueue,
    sop_instance_uid: str,
    sop_class_uid: str,
    study_instance_uid: str,
    encoded: bytes,
    *,
    peer: str,
) -> str:
    """Spool and queue one parsed instance with the Store SCP's write path
    (:func:`~dermnode.scp.store.store_and_queue`); returns what happened, for the user.

    Raises
    ------
    InsufficientSpaceError
        When free disk space is below ``storage.min_free_mb``.
    StorageError
        When the spool or the state database cannot be written.
    """
    outcome, _path = store_and_queue(
        spool, queue, sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid, data=encoded, calling_aet=CALLING_AET, peer=peer,
    )
    return NOTES[outcome]


class Ingest:
    """Accepts uploaded files for one storage root.

    Parameters
    ----------
    spool, queue:
        The service's spool and job queue (the same objects the Store SCP writes to).
    work_dir:
        An owner-only folder for wrapping photographs (under ``storage.root``: the files hold PHI).
    max_bytes:
        Largest accepted file.
    """

    def __init__(self, spool: Spool, queue: JobQueue, work_dir: Path, max_bytes: int) -> None:
        self.spool = spool
        self.queue = queue
        self.work_dir = work_dir
        self.max_bytes = max_bytes

    def accept(
        self, filename: str, data: bytes, *, patient_id: str, pixel_spacing_mm: float | None, user: str, client: str
    ) -> Outcome:
        """Check one uploaded file, wrap it if it is a photograph, and store and queue it."""
        shown = Path(filename or "upload").name[:200] or "upload"
        peer = f"web:{user}@{client}"
        if not data:
            return Refused(shown, "the file is empty")
        if len(data) > self.max_bytes:
            return Refused(
                shown,
                f"too large: {len(data) / 1_048_576:.1f} MB, the limit is {self.max_bytes / 1_048_576:.0f} MB "
                "(web.max_upload_mb)",
            )
        try:
            if len(data) > 132 and data[128:132] == b"DICM":
                outcome = self._dicom(shown, data, patient_id=patient_id, peer=peer)
            else:
                outcome = self._photo(shown, data, patient_id=patient_id, pixel_spacing_mm=pixel_spacing_mm, peer=peer)
        except InsufficientSpaceError as exc:
            logger.error("refusing an upload: %s", exc)
            outcome = Refused(shown, "the node is low on disk space: try again later (nothing was stored)")
        except StorageError as exc:
            logger.error("refusing an upload, not stored: %s", exc)
            outcome = Refused(shown, "the spool or the job queue could not be written (nothing was stored)")
        except OSError as exc:  # a full or read-only disk under the upload work folder, the wrap, the spool
            logger.error("refusing an upload, not written: %s", exc)
            outcome = Refused(shown, "the upload could not be written (nothing was stored)")
        if isinstance(outcome, Accepted):
            audit.info("web upload by %s from %s sop_instance=%s: %s", user, client, outcome.sop_instance_uid,
                       outcome.note)
        else:
            audit.warning("web upload by %s from %s refused: %s", user, client, outcome.reason)
        return outcome

    def _dicom(self, shown: str, data: bytes, *, patient_id: str, peer: str) -> Outcome:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.walk(lambda _ds, _elem: None)  # parse every element now, as the SCP does before it answers
            sop_uid = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
            study_uid = str(ds.StudyInstanceUID)
            str(ds.SeriesInstanceUID)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            meta_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", sop_uid))
        except AttributeError as exc:
            return Refused(shown, f"DICOM file without a required attribute: {exc}")
        except Exception as exc:  # a malformed file can raise anything from pydicom's parser
            return Refused(shown, f"the DICOM file cannot be parsed: {type(exc).__name__}")
        if sop_class not in ACCEPTED_STORAGE_CLASSES:
            return Refused(shown, f"SOP class {sop_class} is not an image this node analyses (dermoscopic, VL photo "
                                  "or secondary capture)")
        if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
            return Refused(shown, f"transfer syntax {syntax} is not one this node accepts")
        if not is_valid_uid(sop_uid) or not is_valid_uid(study_uid):
            return Refused(shown, "the SOP Instance or Study Instance UID is not a valid DICOM UID")
        if meta_uid != sop_uid:
            return Refused(shown, "the file meta and the dataset name different SOP Instance UIDs")
        if patient_id and str(ds.get("PatientID", "")) != patient_id:
            return Refused(shown, "the patient ID entered is not the Patient ID in this DICOM file (nothing stored)")
        note = store_instance(self.spool, self.queue, sop_uid, sop_class, study_uid, data, peer=peer)
        return Accepted(shown, sop_uid, note)

    def _photo(
        self, shown: str, data: bytes, *, patient_id: str, pixel_spacing_mm: float | None, peer: str
    ) -> Outcome:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
                width, height = probe.size
        except Image.DecompressionBombError:
            return Refused(shown, "the image has too many pixels")
        except (OSError, ValueError):
            return Refused(shown, "not an image: only JPEG or PNG photographs and DICOM files are accepted")
        if fmt not in PHOTO_FORMATS:
            return Refused(shown, f"{fmt or 'this'} image format is not accepted: JPEG or PNG photographs, or DICOM")
        if width * height > MAX_PIXELS:
            return Refused(shown, f"the image is too large: {width} x {height} pixels (at most {MAX_PIXELS:,})")
        if not patient_id:
            return Refused(shown, "a patient ID is required for a photograph (a DICOM file carries its own)")
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=self.work_dir))
        try:
            image = tmp / f"photo.{fmt.lower()}"
            image.write_bytes(data)
            out = tmp / "photo.dcm"
            options = WrapOptions(patient_id=patient_id, patient_name="", pixel_spacing_mm=pixel_spacing_mm)
            try:
                ds = wrap_file(image, out, options)  # as `dermnode wrap IMAGE --out OUT --patient-id ...`
            except DecodeError:
                return Refused(shown, "the photograph cannot be decoded (truncated or corrupt file)")
            encoded = out.read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sop_uid = str(ds.SOPInstanceUID)
        note = store_instance(
            self.spool, self.queue, sop_uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID), encoded, peer=peer
        )
        return Accepted(shown, sop_uid, f"photograph wrapped as a Dermoscopic Photography image; {note}")
