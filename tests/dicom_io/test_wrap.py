"""Photographs read for ``dermnode analyze`` / ``dermnode wrap``: every common PIL mode becomes RGB uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermnode.dicom_io.wrap import load_rgb, synthetic_dermoscopy
from dermnode.errors import DecodeError

RGB = synthetic_dermoscopy(60, 80)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rgb.png", lambda: Image.fromarray(RGB)),
        ("rgba.png", lambda: Image.fromarray(RGB).convert("RGBA")),
        ("cmyk.jpg", lambda: Image.fromarray(RGB).convert("CMYK")),
        ("rgb.tif", lambda: Image.fromarray(RGB)),
    ],
)
def test_colour_modes_keep_the_colours(tmp_path: Path, name: str, make) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    make().save(path)
    out = load_rgb(path)
    assert out.shape == RGB.shape and out.dtype == np.uint8
    tolerance = 40 if name.endswith(".jpg") else 0
    assert np.abs(out.astype(int) - RGB.astype(int)).mean() <= tolerance


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    """Pillow's convert('RGB') clips a 16-bit grey PNG at 255: the frame came out white."""
    grey8 = RGB[:, :, 0]
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)
    out = load_rgb(path)
    assert out.shape == RGB.shape
    np.testing.assert_array_equal(out[:, :, 0], grey8)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_32_bit_grey_is_scaled_by_its_maximum(tmp_path: Path) -> None:
    path = tmp_path / "grey32.tif"
    Image.fromarray(RGB[:, :, 0].astype(np.int32) * 1000).save(path)
    out = load_rgb(path)
    assert out.max() == 255 and out.min() < 255


def test_not_an_image_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(DecodeError, match="cannot read image"):
        load_rgb(path)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A camera JPEG stored sideways with Orientation = 6 is read upright, as viewers and OpenCV show it."""
    import cv2

    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(RGB).save(path, exif=exif, quality=95)
    out = load_rgb(path)
    shown = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert out.shape == (RGB.shape[1], RGB.shape[0], 3) == shown.shape
    assert np.abs(out.astype(int) - shown.astype(int)).mean() < 2
