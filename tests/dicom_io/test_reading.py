"""Decoding sources to RGB and finding the pixel size; malformed datasets fail with DecodeError only."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless

from dermnode.dicom_io.reading import decode_rgb, pixel_spacing, read_dataset, read_dicom_file, to_source_image
from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.errors import DecodeError
from dermnode.settings import DeviceCalibration
from dermnode.vocabulary import SpacingSource
from synthetic import synthetic_dermoscopy

RGB = synthetic_dermoscopy(40, 56)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


def test_native_rgb_is_exact() -> None:
    np.testing.assert_array_equal(decode_rgb(_roundtrip(wrap_rgb(RGB))), RGB)


def test_jpeg_baseline_ybr_422_decodes_close_to_source() -> None:
    out = decode_rgb(_roundtrip(wrap_rgb(RGB, WrapOptions(jpeg=True))))
    assert out.shape == RGB.shape and np.abs(out.astype(int) - RGB).mean() < 6


def test_rle_and_ybr_full_native() -> None:
    ds = wrap_rgb(RGB)
    ds.compress(RLELossless)
    np.testing.assert_array_equal(decode_rgb(_roundtrip(ds)), RGB)
    from pydicom.pixels import convert_color_space

    ds = wrap_rgb(RGB)
    ds.PixelData = convert_color_space(RGB, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    assert np.abs(decode_rgb(_roundtrip(ds)).astype(int) - RGB).max() <= 2


def test_monochrome_16bit_is_scaled_to_rgb() -> None:
    ds = wrap_rgb(RGB)
    gray = (RGB[..., 0].astype(np.uint16) * 16)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = gray.tobytes()
    out = decode_rgb(_roundtrip(ds))
    assert out.shape == RGB.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 2])


def test_palette_colour_is_expanded() -> None:
    ds = wrap_rgb(RGB)
    idx = (RGB[..., 0] // 16).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    del ds.PlanarConfiguration
    lut = (np.arange(256, dtype=np.uint16) * 257).tobytes()
    for c in ("Red", "Green", "Blue"):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{c}PaletteColorLookupTableData", lut)
    ds.PixelData = idx.tobytes()
    out = decode_rgb(_roundtrip(ds))
    assert out.shape == RGB.shape
    np.testing.assert_array_equal(out[..., 1], idx)


def test_spacing_precedence_and_calibration() -> None:
    ds = wrap_rgb(RGB, WrapOptions(pixel_spacing_mm=0.05))
    ds.ImagerPixelSpacing = ["0.1", "0.1"]
    sp = pixel_spacing(ds)
    assert sp is not None and sp.row_mm == 0.05 and sp.source is SpacingSource.PIXEL_SPACING
    del ds.PixelSpacing
    sp = pixel_spacing(ds)
    assert sp is not None and sp.row_mm == 0.1 and sp.source is SpacingSource.IMAGER_PIXEL_SPACING
    del ds.ImagerPixelSpacing
    assert pixel_spacing(ds) is None
    cal = DeviceCalibration(manufacturer="dermnode simulator", model="VIRTUAL DERMOSCOPE", pixel_spacing_mm=0.02)
    sp = pixel_spacing(ds, [cal])
    assert sp is not None and sp.column_mm == 0.02 and sp.source is SpacingSource.DEVICE_CALIBRATION
    ds.PixelSpacing = ["0", "-1"]  # invalid values are ignored, not trusted
    assert pixel_spacing(ds, [cal]) is not None and pixel_spacing(ds) is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: delattr(d, "PixelData"), "no Pixel Data"),
        (lambda d: setattr(d, "PixelData", d.PixelData[:100]), "pixel data is truncated .*truncated or not DICOM"),
        (lambda d: setattr(d, "Rows", 100000), "unsupported image size|cannot be decoded|truncated"),
        (lambda d: setattr(d, "SamplesPerPixel", 4), "Samples per Pixel"),
        (lambda d: delattr(d, "Rows"), "missing or invalid"),
    ],
)
def test_malformed_pixel_data_is_a_decode_error(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    ds = wrap_rgb(RGB)
    mutate(ds)
    with pytest.raises(DecodeError, match=message):
        decode_rgb(ds)


def test_missing_uid_is_a_decode_error() -> None:
    ds = wrap_rgb(RGB)
    del ds.StudyInstanceUID
    with pytest.raises(DecodeError, match="UID"):
        to_source_image(ds)


@pytest.mark.parametrize("uid", ["../../../escaped", "/tmp/escaped", "1.2.3/../4", "1." + "2" * 70])
def test_uid_that_is_not_a_uid_is_a_decode_error(uid: str) -> None:
    """The SOP Instance UID names the results folder (``dermnode analyze`` reads any file): never a path."""
    ds = wrap_rgb(RGB)
    ds.SOPInstanceUID = uid
    with pytest.raises(DecodeError, match="not a valid DICOM UID"):
        to_source_image(ds)


def test_unreadable_file_is_a_decode_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(DecodeError):
        read_dataset(p)


BASE = _roundtrip(wrap_rgb(RGB, WrapOptions(jpeg=True)))
BASE_BYTES = BytesIO()
BASE.save_as(BASE_BYTES, enforce_file_format=True)
ENCODED = BASE_BYTES.getvalue()
ATTRS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
         "PlanarConfiguration", "NumberOfFrames", "PhotometricInterpretation"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attr=st.sampled_from(ATTRS),
    value=st.one_of(st.integers(-5, 70000), st.sampled_from(["RGB", "YBR_FULL", "MONOCHROME1", "PALETTE COLOR", "X"])),
    cut=st.integers(0, len(BASE.PixelData)),
)
def test_fuzz_attribute_and_truncation_only_raise_decode_error(attr: str, value: object, cut: int) -> None:
    """Fuzz campaign (dataset level): wrong image attributes and truncated compressed data."""
    ds = copy.deepcopy(BASE)
    try:
        setattr(ds, attr, value)
    except (TypeError, ValueError, OverflowError):
        return
    ds.PixelData = ds.PixelData[:cut]
    try:
        out = to_source_image(ds)
    except DecodeError:
        return
    assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(132, len(ENCODED) - 1), data=st.binary(min_size=1, max_size=16))
def test_fuzz_byte_corruption_only_raises_decode_error(tmp_path_factory, pos: int, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Fuzz campaign (stream level): overwrite bytes anywhere after the preamble of a JPEG-encoded file."""
    blob = bytearray(ENCODED)
    blob[pos : pos + len(data)] = data
    path = tmp_path_factory.mktemp("fz") / "f.dcm"
    path.write_bytes(bytes(blob))
    try:
        out = to_source_image(read_dataset(path))
    except DecodeError:
        return
    assert out.rgb.dtype == np.uint8


def test_jpeg_header_with_another_size_is_refused_before_decoding(tmp_path: Path) -> None:
    """A corrupt frame header declaring 60000 x 60000 pixels is refused from the header: decoding it would
    allocate ~10 GB (the byte-corruption fuzz campaign once took the test process to 24 GB that way)."""
    blob = bytearray(ENCODED)
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    path = tmp_path / "f.dcm"
    path.write_bytes(bytes(blob))
    with pytest.raises(DecodeError, match=r"compressed frame is 60000x60000 pixels but Rows x Columns say"):
        to_source_image(read_dataset(path))


def test_codestream_size_reads_jpeg_and_jpeg2000_headers() -> None:
    from dermnode.dicom_io.reading import _codestream_size

    frame = next(generate_frames(BASE.PixelData, number_of_frames=1))
    assert _codestream_size(frame) == (int(BASE.Rows), int(BASE.Columns))
    siz = b"\xff\x4f\xff\x51" + b"\x00\x29\x00\x00" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big") + bytes(8)
    assert _codestream_size(siz) == (480, 640)
    assert _codestream_size(b"\x00\x01\x02") is None
    sof = frame.index(b"\xff\xc0")
    dnl = frame[: sof + 5] + b"\x00\x00" + frame[sof + 7 :]  # height 0: given by a DNL segment, not checked here
    assert _codestream_size(dnl) is None


def test_read_dicom_file_decides_by_content_not_by_name(tmp_path: Path) -> None:
    ds = wrap_rgb(RGB)
    with_header = tmp_path / "image.jpg"  # a DICOM file whatever its name
    ds.save_as(with_header, enforce_file_format=True)
    got = read_dicom_file(with_header)
    assert got is not None and got.SOPInstanceUID == ds.SOPInstanceUID
    headerless = tmp_path / "headerless"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    headerless.write_bytes(buf.getvalue()[132:])  # no preamble, no DICM
    got = read_dicom_file(headerless)
    assert got is not None and got.SOPInstanceUID == ds.SOPInstanceUID
    photo = tmp_path / "photo.dcm"  # not DICOM whatever its name
    from PIL import Image

    Image.fromarray(RGB).save(photo, format="PNG")
    assert read_dicom_file(photo) is None
    with pytest.raises(DecodeError, match="cannot read"):
        read_dicom_file(tmp_path / "missing.dcm")
