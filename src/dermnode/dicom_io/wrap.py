"""The modality simulator: wrap a photograph as a Dermoscopic Photography Image (modality DMS).

The result conforms to the Dermoscopic Photography Image IOD (PS3.3 A.32.11); ``dciodvfy`` from dicom3tools
reports no errors on it. JPEG Baseline output is YBR_FULL_422 as PS3.5 8.2.1 requires for lossy JPEG.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dermnode import __version__
from dermnode.dicom_io.uids import DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, UID_PREFIX
from dermnode.errors import DecodeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrapOptions:
    """Patient/study attributes of a simulated dermoscopy acquisition."""

    patient_id: str = "DERM0001"
    patient_name: str = "Test^Patient"
    pixel_spacing_mm: float | None = None
    jpeg: bool = False
    jpeg_quality: int = 92
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str = ""
    manufacturer: str = "dermnode simulator"
    model_name: str = "virtual dermoscope"


def synthetic_dermoscopy(h: int = 300, w: int = 400, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A simulated dermoscopy image: skin-toned background, a darker brown elliptical lesion (semi-axes
    0.22 h and 0.18 w) in the middle with a soft border (Gaussian, sigma 1.2 % of the shorter side, as a real
    lesion's border fades; the lesion is the region above half contrast), a mottled texture (5 % brightness
    variation) and mild Gaussian noise. Used by the start-up self-test, tests and benchmarks. (The pretrained
    segmenter does not outline a flat, razor-sharp painted ellipse, which no dermoscope shows.)
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0).astype(np.float64)
    inside = cv2.GaussianBlur(inside, (0, 0), 0.012 * min(h, w))
    skin = np.array([214.0, 160.0, 140.0])
    lesion = np.array([120.0, 72.0, 50.0])
    img = skin * (1.0 - inside[..., None]) + lesion * inside[..., None]
    texture = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)), (0, 0), 0.012 * min(h, w) + 0.5)
    img *= 1.0 + 0.05 * (texture / max(float(texture.std()), 1e-9))[..., None]  # mottled skin and pigment
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def load_rgb(path: Path) -> npt.NDArray[np.uint8]:
    """Read a JPEG/PNG/TIFF/BMP photograph as an RGB uint8 array.

    The EXIF Orientation of a camera JPEG is applied. Pillow's ``convert("RGB")`` clips 16-bit and 32-bit grey
    images at 255 (a 16-bit PNG becomes a white frame), so those are scaled to 8 bits by their bit depth first
    (``I;16``: >> 8; ``I``/``F``: by the image's own maximum).

    Raises
    ------
    DecodeError
        When the file cannot be read as an image.
    """
    try:
        with Image.open(path) as raw:
            # the orientation a viewer (and OpenCV, which read the training images) shows: a camera JPEG
            # may store its pixels sideways with an EXIF Orientation tag
            im = ImageOps.exif_transpose(raw)
            if im.mode.startswith("I;16"):
                grey = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if im.mode in ("I", "F"):
                values = np.asarray(im, dtype=np.float64)
                top = float(values.max()) if values.size else 0.0
                scale = 255.0 / top if top > 255.0 else 1.0
                grey = np.clip(values * scale, 0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot read image {path}: {exc}") from exc


def encode_jpeg_baseline(rgb: npt.NDArray[np.uint8], quality: int = 92) -> bytes:
    """Encode RGB pixels as a JPEG Baseline (process 1) frame, YCbCr 4:2:2 subsampled, no JFIF APP0.

    Raises
    ------
    ValueError
        When the quality is outside 1..100.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    buf = io.BytesIO()
    # subsampling=1 is 4:2:2 in Pillow; baseline (not progressive), Huffman-coded 8-bit.
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality, subsampling=1, optimize=False)
    return buf.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def wrap_rgb(rgb: npt.NDArray[np.uint8], options: WrapOptions | None = None) -> Dataset:
    """Build a Dermoscopic Photography Image dataset (with file meta) around ``rgb``.

    Parameters
    ----------
    rgb:
        ``(rows, columns, 3)`` uint8 pixels.
    options:
        Patient, UID and encoding choices.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset ready for ``save_as(..., enforce_file_format=True)``.

    Raises
    ------
    ValueError
        When ``rgb`` is not an (H, W, 3) uint8 array.
    """
    opts = options or WrapOptions()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = UID(opts.sop_instance_uid or generate_uid(prefix=UID_PREFIX))

    ds = Dataset()
    # Patient, General Study
    ds.PatientName = opts.patient_name
    ds.PatientID = opts.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = opts.study_instance_uid or generate_uid(prefix=UID_PREFIX)
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = opts.accession_number
    # General Series + Dermoscopic Photography Series
    ds.Modality = "DMS"
    ds.SeriesInstanceUID = opts.series_instance_uid or generate_uid(prefix=UID_PREFIX)
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.Laterality = ""
    # Frame of Reference (mandatory in this IOD, PS3.3 A.32.11.3)
    ds.FrameOfReferenceUID = generate_uid(prefix=UID_PREFIX, entropy_srcs=[sop_uid, "for"])
    ds.PositionReferenceIndicator = ""
    # General Equipment + Enhanced General Equipment
    ds.Manufacturer = opts.manufacturer
    ds.ManufacturerModelName = opts.model_name
    ds.DeviceSerialNumber = "SIM-0001"
    ds.SoftwareVersions = f"dermnode {__version__}"
    # General Image, General Acquisition
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "01" if opts.jpeg else "00"
    if opts.jpeg:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    # Dermoscopic Photography Image module
    ds.AnatomicRegionSequence = Sequence([_code("39937001", "SCT", "Skin structure")])
    ds.AcquisitionContextSequence = Sequence()
    # Type 2 attributes of the Dermoscopic Image module: unknown for a simulated acquisition
    ds.LightSourcePolarization = ""
    ds.EmitterColorTemperature = None
    ds.ContactMethod = ""
    ds.OpticalMagnificationFactor = None
    # Image Pixel
    rows, cols = rgb.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if opts.pixel_spacing_mm is not None:
        ds.PixelSpacing = [f"{opts.pixel_spacing_mm:.6g}", f"{opts.pixel_spacing_mm:.6g}"]
    # SOP Common
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.ImplementationClassUID = UID(UID_PREFIX + "1")
    meta.ImplementationVersionName = f"DERMNODE_{__version__}"[:16]
    ds.file_meta = meta
    if opts.jpeg:
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        frame = encode_jpeg_baseline(rgb, opts.jpeg_quality)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompressionRatio = round(rgb.nbytes / len(frame), 2)
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = rgb.tobytes()
    return ds


def wrap_file(image: Path, out: Path, options: WrapOptions | None = None) -> Dataset:
    """Wrap the photograph at ``image`` and write the DICOM file to ``out``.

    Raises
    ------
    DecodeError
        When the photograph cannot be read.
    """
    ds = wrap_rgb(load_rgb(image), options)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    logger.info("wrote %s (%s)", out, ds.file_meta.TransferSyntaxUID.name)
    return ds
