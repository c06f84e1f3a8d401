"""Reading and decoding source instances into :class:`~dermnode.vocabulary.SourceImage`.

Any accepted source (RGB, YBR_FULL, YBR_FULL_422, palette colour, monochrome; native, deflated, JPEG,
JPEG-LS, JPEG 2000 or RLE encoded) is decoded to an RGB uint8 array. Multi-frame sources are analysed on their
first frame. The physical pixel size comes from Pixel Spacing, then Imager Pixel Spacing, then the per-device
calibration table (Manufacturer + Manufacturer's Model Name) in the configuration.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dermnode.dicom_io.uids import is_valid_uid
from dermnode.errors import DecodeError
from dermnode.settings import DeviceCalibration
from dermnode.vocabulary import PixelSpacing, SourceImage, SpacingSource

logger = logging.getLogger(__name__)

#: Refuse to decode images larger than this many pixels per frame (a hostile Rows x Columns).
MAX_PIXELS = 80_000_000
#: What a file with a DICOM prefix that cannot be read whole is called (a copy cut short, or bytes that only
#: start like DICOM).
TRUNCATED_OR_NOT_DICOM = "truncated or not DICOM"

#: Extensions of files in an input folder that are never images (skipped when a folder is expanded).
NOT_IMAGES: frozenset[str] = frozenset(
    {".md", ".txt", ".csv", ".tsv", ".json", ".xml", ".html", ".pdf", ".yaml", ".yml", ".toml", ".log", ".zip"}
)


def expand_inputs(paths: Sequence[Path], skipped: dict[Path, list[str]] | None = None) -> list[Path]:
    """The input files of ``dermnode analyze`` and ``dermnode send``: a folder stands for the files directly in it.

    A folder is expanded non-recursively to its files (not its sub-folders), sorted by name, hidden files
    (name starting with ``.``) and documents that are never images (:data:`NOT_IMAGES`: ``.md``, ``.csv``, ...,
    e.g. a dataset's README and labels) skipped; files without an extension stay (DICOM files often have none).
    Any path given as a file is kept as given (a missing or unreadable file is reported later).

    Parameters
    ----------
    paths:
        Files and folders as given on the command line.
    skipped:
        When given, receives per folder the names of the entries that were skipped (sub-folders included).

    Returns
    -------
    list of pathlib.Path
        The files, in order.

    Raises
    ------
    OSError
        When a folder cannot be listed.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside: list[Path] = []
            left: list[str] = []
            for p in sorted(path.iterdir()):
                if not p.name.startswith(".") and p.is_file() and p.suffix.lower() not in NOT_IMAGES:
                    inside.append(p)
                else:
                    left.append(p.name + ("/" if p.is_dir() else ""))
            if skipped is not None:
                skipped[path] = left
            if not inside:
                logger.warning("%s: no files to read in this folder (skipped: %s)", path, ", ".join(left) or "none")
            files.extend(inside)
        else:
            files.append(path)
    return files


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file (with file meta) from the spool or the command line.

    pydicom's warnings about malformed data are logged at DEBUG, never printed.

    Raises
    ------
    DecodeError
        When the file is missing, or is cut short or not a parseable DICOM file ("truncated or not DICOM").
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
            ds.walk(lambda _ds, _elem: None)  # parse every element now, not lazily somewhere later
        except FileNotFoundError as exc:
            raise DecodeError(f"cannot read {path}: {exc.strerror}") from exc
        except Exception as exc:  # pydicom's lazy parser raises many types on malformed data
            raise DecodeError(
                f"{path.name} is {TRUNCATED_OR_NOT_DICOM} (cannot be parsed: {type(exc).__name__}: {exc})"
            ) from exc
    for w in caught:
        logger.debug("%s: pydicom: %s", path.name, w.message)
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise DecodeError(f"{path.name} is {TRUNCATED_OR_NOT_DICOM} (no SOP Class/Instance UID could be read)")
    return ds


def read_dicom_file(path: Path) -> Dataset | None:
    """The dataset in ``path`` when the file holds DICOM, else ``None``: the one test of "is this DICOM".

    DICOM is recognised by content, not by the file name: the ``DICM`` prefix at offset 128 (read with
    :func:`read_dataset`), or a dataset pydicom can read without the preamble and prefix
    (:func:`read_headerless_dataset`). ``None`` means "not DICOM" (e.g. a photograph).

    Raises
    ------
    DecodeError
        When the file cannot be read, or is DICOM but cannot be parsed.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DecodeError(f"cannot read {path}: {exc}") from exc
    if head[128:132] == b"DICM":
        return read_dataset(path)
    return read_headerless_dataset(path)


def read_headerless_dataset(path: Path) -> Dataset | None:
    """``path`` read as a DICOM dataset without the 128-byte preamble and ``DICM`` prefix, else ``None``.

    Only a dataset with SOP Class and Instance UIDs counts (pydicom reads almost any bytes when forced). A
    missing Transfer Syntax UID is set from the encoding the dataset was read with.

    Raises
    ------
    DecodeError
        When the start of the file is such a dataset but the whole file cannot be parsed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            probe = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            if "SOPClassUID" not in probe or "SOPInstanceUID" not in probe:
                return None
        except Exception:  # pydicom raises many types on bytes that are not DICOM: try it as a photograph
            return None
        try:
            ds = pydicom.dcmread(path, force=True)
            ds.walk(lambda _ds, _elem: None)  # parse every element now, not lazily somewhere later
        except Exception as exc:
            raise DecodeError(f"cannot parse DICOM file {path.name}: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif little is False:
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def analysed_frame_numbers(ds: Dataset) -> list[int] | None:
    """Frame numbers of ``ds`` that dermnode analyses, for references to it: ``[1]`` for a multi-frame source.

    ``None`` for a single-frame image, whose references carry no frame number. A Number of Frames that is not
    an integer counts as one frame (decoding reads the first frame either way).
    """
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return None
    return [1] if frames > 1 else None


def _decimal_pair(value: object) -> tuple[float, float] | None:
    try:
        seq = list(value)  # type: ignore[call-overload]
        row, col = float(seq[0]), float(seq[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(row) and np.isfinite(col)) or row <= 0 or col <= 0:
        return None
    return row, col


def pixel_spacing(ds: Dataset, calibrations: Sequence[DeviceCalibration] = ()) -> PixelSpacing | None:
    """Physical pixel size of ``ds`` in mm, or ``None`` when it is not known."""
    for keyword, source in (
        ("PixelSpacing", SpacingSource.PIXEL_SPACING),
        ("ImagerPixelSpacing", SpacingSource.IMAGER_PIXEL_SPACING),
    ):
        if keyword in ds:
            pair = _decimal_pair(ds.get(keyword))
            if pair is not None:
                return PixelSpacing(pair[0], pair[1], source)
            logger.warning("ignoring invalid %s in source instance", keyword)
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().lower()
    model = str(ds.get("ManufacturerModelName", "") or "").strip().lower()
    for cal in calibrations:
        same = cal.manufacturer.strip().lower() == manufacturer and cal.model.strip().lower() == model
        if same and cal.pixel_spacing_mm > 0:
            return PixelSpacing(cal.pixel_spacing_mm, cal.pixel_spacing_mm, SpacingSource.DEVICE_CALIBRATION)
    return None


def _to_uint8(arr: npt.NDArray[np.generic], bits_stored: int) -> npt.NDArray[np.uint8]:
    if arr.dtype == np.uint8:
        return arr.astype(np.uint8, copy=False)
    a = arr.astype(np.float64)
    if bits_stored > 8:
        a = a / float(2**bits_stored - 1) * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def decode_rgb(ds: Dataset) -> npt.NDArray[np.uint8]:
    """Decode the first frame of ``ds`` to an ``(rows, columns, 3)`` RGB uint8 array.

    Raises
    ------
    DecodeError
        When there is no pixel data, the image attributes are inconsistent or too large, or the compressed
        data cannot be decoded.
    """
    if "PixelData" not in ds:
        raise DecodeError("the instance has no Pixel Data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.SamplesPerPixel)
        photometric = str(ds.PhotometricInterpretation).strip()
        bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(f"missing or invalid image pixel attribute: {exc}") from exc
    if rows <= 0 or cols <= 0 or rows * cols > MAX_PIXELS:
        raise DecodeError(f"unsupported image size {rows}x{cols} (limit {MAX_PIXELS} pixels)")
    if spp not in (1, 3):
        raise DecodeError(f"unsupported Samples per Pixel {spp}")
    check_pixel_data_complete(ds)
    try:
        # pydicom converts YBR_FULL / YBR_FULL_422 to RGB itself (as_rgb=True), native or compressed.
        arr = pixel_array(ds, index=0)
    except Exception as exc:  # pydicom raises many types for corrupt/undecodable pixel data
        raise DecodeError(f"pixel data cannot be decoded ({photometric}): {exc}") from exc
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise DecodeError(f"palette colour lookup failed: {exc}") from exc
        bits_stored = 16 if arr.dtype != np.uint8 else 8
    if arr.ndim == 2:
        arr = np.repeat(_to_uint8(arr, bits_stored)[..., None], 3, axis=2)
        if photometric == "MONOCHROME1":
            arr = 255 - arr
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[:2] != (rows, cols):
        raise DecodeError(f"decoded pixel array has unexpected shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr, bits_stored))


def check_pixel_data_complete(ds: Dataset) -> None:
    """Refuse pixel data that was cut short: native data shorter than its first frame, or a compressed first frame
    without its end marker (:func:`_check_end_of_image`).

    Raises
    ------
    DecodeError
        When the first frame is incomplete (the message says "truncated").
    """
    if "PixelData" not in ds:
        return
    _check_end_of_image(ds)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if isinstance(tsyntax, UID) and tsyntax.is_encapsulated:
        return
    try:
        rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
        bits = int(ds.BitsAllocated)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    except (AttributeError, TypeError, ValueError):
        return  # decode_rgb reports the missing attribute
    per_pixel = 2 if photometric.endswith("_422") else spp * ((bits + 7) // 8)
    expected = rows * cols * per_pixel if bits >= 8 else (rows * cols * spp + 7) // 8
    have = len(ds.PixelData)
    if have < expected:
        raise DecodeError(
            f"pixel data is truncated ({have} of the {expected} bytes of the first frame): the file is "
            f"{TRUNCATED_OR_NOT_DICOM}"
        )


def _check_end_of_image(ds: Dataset) -> None:
    """A JPEG (ISO 10918) or JPEG 2000 frame must end with its EOI/EOC marker ``FF D9`` and declare the image size
    of Rows x Columns.

    libjpeg silently fills a truncated stream with grey, so a cut-off image would be analysed as if it were
    whole; the marker check catches it before decoding. The size check keeps a corrupt frame header from making
    the decoder allocate gigabytes.

    Raises
    ------
    DecodeError
        When the first frame lacks the end marker or its header declares another size than Rows x Columns.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        return
    try:
        encapsulated = isinstance(tsyntax, UID) and tsyntax.is_encapsulated
    except ValueError as exc:  # not a transfer syntax UID at all
        raise DecodeError(f"invalid Transfer Syntax UID {str(tsyntax)[:64]!r}") from exc
    if not isinstance(tsyntax, UID):
        raise DecodeError(f"invalid Transfer Syntax UID {str(tsyntax)[:64]!r}")
    if not encapsulated or tsyntax == RLELossless:
        return
    try:
        nr_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = next(generate_frames(ds.PixelData, number_of_frames=nr_frames))
    except Exception as exc:
        raise DecodeError(f"encapsulated pixel data cannot be split into frames: {exc}") from exc
    if not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DecodeError("compressed frame is truncated (no end-of-image marker)")
    size = _codestream_size(frame)
    if size is not None:
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            return  # decode_rgb reports the missing attribute
        if size != (rows, cols):
            # the decoder would allocate the stream's own size (up to 65535 x 65535 x 3 bytes from a few corrupt
            # header bytes) before the shape check after decoding could refuse it
            raise DecodeError(
                f"compressed frame is {size[0]}x{size[1]} pixels but Rows x Columns say {rows}x{cols}"
            )


#: Start-of-frame markers of ISO 10918 (JPEG) and ISO 14495 (JPEG-LS, FF F7) streams.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a JPEG / JPEG-LS / JPEG 2000 frame header declares, ``None`` when it has none we read.

    JPEG and JPEG-LS: the first start-of-frame segment before the scan (height, width; ``None`` for a height of 0,
    which a DNL segment after the scan gives); JPEG 2000: the SIZ segment after SOC (``Ysiz - YOsiz``,
    ``Xsiz - XOsiz``).
    """
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:  # JPEG 2000 codestream: SOC, SIZ
        xsiz, ysiz, xo, yo = (int.from_bytes(frame[i : i + 4], "big") for i in (8, 12, 16, 20))
        return max(0, ysiz - yo), max(0, xsiz - xo)
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            if i + 9 > len(frame):
                return None
            height = int.from_bytes(frame[i + 5 : i + 7], "big")
            if height == 0:  # the height comes later, in a DNL segment: not read here
                return None
            return height, int.from_bytes(frame[i + 7 : i + 9], "big")
        if marker == 0xDA:  # start of scan without a frame header
            return None
        i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
    return None


def to_source_image(ds: Dataset, calibrations: Sequence[DeviceCalibration] = ()) -> SourceImage:
    """Decode ``ds`` and collect the identifiers the outputs need.

    Raises
    ------
    DecodeError
        When a required UID is missing or not a valid UID, or the pixel data cannot be decoded.
    """
    try:
        sop_uid = str(ds.SOPInstanceUID)
        sop_class = str(ds.SOPClassUID)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
    except AttributeError as exc:
        raise DecodeError(f"source instance lacks a required UID: {exc}") from exc
    for name, uid in (("SOP Instance", sop_uid), ("Study Instance", study_uid), ("Series Instance", series_uid)):
        if not is_valid_uid(uid):  # the SOP Instance UID names the results folder: never a path
            raise DecodeError(f"source {name} UID {uid!r:.80} is not a valid DICOM UID (digits and dots, <= 64)")
    return SourceImage(
        rgb=decode_rgb(ds),
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        spacing=pixel_spacing(ds, calibrations),
    )
