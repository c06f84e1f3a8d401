"""Measurements on drawn shapes with a known physical size."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from dermnode.inference.measurements import (
    COLOR_NAMES,
    border_score,
    color_fractions,
    measure,
    tds_bounds,
)
from dermnode.vocabulary import PixelSpacing, SpacingSource

SKIN = (188, 163, 151)  # the reference skin colour: no white-balance change
SPACING = PixelSpacing(0.05, 0.05, SpacingSource.PIXEL_SPACING)


def _disc(h: int = 400, w: int = 400, r: int = 100, colour: tuple[int, int, int] = (100, 60, 30)):
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), r, 1, -1)
    m = mask.astype(bool)
    rgb = np.full((h, w, 3), SKIN, np.uint8)
    rgb[m] = colour
    return m, rgb


def test_disc_10mm_area_and_diameter() -> None:
    mask, rgb = _disc()
    m = measure(mask, rgb, SPACING)
    assert m.area_mm2 == pytest.approx(math.pi * 25.0, rel=0.01)
    assert m.max_diameter_mm == pytest.approx(10.0, rel=0.02)
    assert m.perimeter_mm == pytest.approx(math.pi * 10.0, rel=0.02)
    assert m.border_irregularity == pytest.approx(1.0, abs=0.05)
    assert m.asymmetry < 0.02
    assert m.asymmetry_axes == 0
    assert m.tds is None


def test_square_known_size() -> None:
    mask = np.zeros((300, 300), bool)
    mask[50:250, 50:250] = True  # 200 px = 10 mm side
    rgb = np.full((300, 300, 3), SKIN, np.uint8)
    rgb[mask] = (100, 60, 30)
    m = measure(mask, rgb, SPACING)
    assert m.area_px == 40000
    assert m.area_mm2 == pytest.approx(100.0, rel=1e-6)
    assert m.max_diameter_mm == pytest.approx(10.0 * math.sqrt(2), rel=0.02)
    assert m.perimeter_mm == pytest.approx(40.0, rel=0.03)
    assert m.border_irregularity == pytest.approx(4.0 / math.pi, rel=0.05)
    assert m.asymmetry_axes == 0


def test_anisotropic_spacing_ellipse_is_a_10mm_circle() -> None:
    # 200 px wide, 100 px high; columns 0.05 mm, rows 0.1 mm -> a 10 mm circle in physical space
    mask = np.zeros((200, 300), np.uint8)
    cv2.ellipse(mask, (150, 100), (100, 50), 0, 0, 360, 1, -1)
    m_ = mask.astype(bool)
    rgb = np.full((200, 300, 3), SKIN, np.uint8)
    spacing = PixelSpacing(0.1, 0.05, SpacingSource.PIXEL_SPACING)
    m = measure(m_, rgb, spacing)
    assert m.area_mm2 == pytest.approx(math.pi * 25.0, rel=0.02)
    assert m.max_diameter_mm == pytest.approx(10.0, rel=0.03)
    assert m.max_diameter_px == pytest.approx(200.0, rel=0.02)


def test_uncalibrated_has_no_mm() -> None:
    mask, rgb = _disc()
    m = measure(mask, rgb, None)
    assert m.area_mm2 is None and m.perimeter_mm is None and m.max_diameter_mm is None
    assert m.max_diameter_px == pytest.approx(200.0, rel=0.02)


def test_asymmetric_shape_scores_higher_than_disc() -> None:
    disc, rgb = _disc()
    blob = np.zeros_like(disc)
    blob[100:300, 100:170] = True
    blob[230:300, 100:320] = True
    blob[150:200, 170:260] = True
    a_disc = measure(disc, rgb, SPACING)
    a_blob = measure(blob, rgb, SPACING)
    assert a_blob.asymmetry > a_disc.asymmetry + 0.1
    assert a_blob.asymmetry_axes >= 1
    assert a_blob.border_irregularity > a_disc.border_irregularity


def test_border_score_sharp_vs_gradual() -> None:
    mask, rgb = _disc()
    sharp, flags = border_score(rgb, mask)
    assert sharp == 8 and all(flags)
    gradual, _ = border_score(cv2.GaussianBlur(rgb, (0, 0), 12), mask)
    assert gradual <= 2


@pytest.mark.parametrize(
    ("colour", "name"),
    [
        ((240, 240, 240), "white"),
        ((200, 40, 50), "red"),
        ((190, 140, 100), "light brown"),
        ((100, 60, 30), "dark brown"),
        ((100, 115, 140), "blue-gray"),
        ((20, 15, 15), "black"),
    ],
)
def test_colour_patches(colour: tuple[int, int, int], name: str) -> None:
    mask, rgb = _disc(colour=colour)
    fr = color_fractions(rgb, mask)
    assert set(fr) == set(COLOR_NAMES)
    assert fr[name] > 0.95
    assert measure(mask, rgb, SPACING).colors == (name,)


def test_colours_are_judged_relative_to_skin() -> None:
    # a brown lesion photographed with a strong pink cast: raw hue is red-ish, relative to the skin it is brown
    mask, rgb = _disc(colour=(120, 75, 55))
    cast = np.clip(rgb.astype(np.float64) * np.array([1.25, 0.95, 1.1]), 0, 255).astype(np.uint8)
    assert "dark brown" in measure(mask, cast, SPACING).colors
    assert "red" not in measure(mask, cast, SPACING).colors


def test_multicolour_lesion_and_min_fraction() -> None:
    mask, rgb = _disc()
    rgb[100:200, :][mask[100:200, :]] = (190, 140, 100)  # upper part light brown
    rgb[280:300, 190:210] = (20, 15, 15)  # tiny black dot: < 5% of the lesion
    m = measure(mask, rgb, SPACING)
    assert set(m.colors) == {"light brown", "dark brown"}
    lo, hi = tds_bounds(m)
    assert hi - lo == pytest.approx(2.0)


def test_empty_or_mismatched_mask_raises() -> None:
    with pytest.raises(ValueError):
        measure(np.zeros((10, 10), bool), np.zeros((10, 10, 3), np.uint8), None)
    with pytest.raises(ValueError):
        measure(np.ones((10, 10), bool), np.zeros((12, 10, 3), np.uint8), None)
