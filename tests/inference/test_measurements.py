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


# ------------------------------------------------------------------ the fast paths equal the formulas (issue 12)


def _lesion_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy skin image with a multicoloured irregular lesion, and its mask."""
    rng = np.random.default_rng(seed)
    h, w = 300, 360
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - 150, xx - 170)
    radius = 80 + 15 * np.sin(3 * angle + seed) + 8 * np.cos(7 * angle)
    mask = np.hypot(yy - 150, xx - 170) <= radius
    img = np.empty((h, w, 3), np.float64)
    img[...] = (200 + 10 * seed % 30, 160, 145)
    img[mask] = (120, 80, 55)
    img[mask & (xx < 150)] = (60, 40, 35)
    img[mask & (yy < 120)] = (110, 115, 135)
    img += rng.normal(0, 12, img.shape)
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), 1.5)
    return np.asarray(img, dtype=np.uint8), mask


def _reference_colour_fractions(rgb: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The float64 per-pixel formulation of the colour rules (the module docstring), before the lookup tables."""
    from dermnode.inference.measurements import _bbox_crop, _lab, _resize_pair, _working_scale

    out = dict.fromkeys(COLOR_NAMES, 0.0)
    crop, cm = _bbox_crop(rgb, mask, 0.5)
    assert crop is not None
    r, m = _resize_pair(np.ascontiguousarray(crop), cm, _working_scale(cm, 384.0))
    r = _reference_skin_normalised(r, m)
    eq_d = math.sqrt(4.0 * float(m.sum()) / math.pi)
    k = round(0.01 * eq_d)
    if k >= 1:
        eroded = cv2.erode(m.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0
        if eroded.sum() >= 0.3 * m.sum():
            m = eroded
    lab = _lab(np.asarray(cv2.medianBlur(r, 3), dtype=np.uint8))[m]
    L, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    C = np.hypot(a, b)
    h = np.degrees(np.arctan2(b, a))
    free = np.ones(len(L), dtype=bool)
    rules = [
        ("white", (L >= 82) & (C < 18)),
        ("black", L < 22),
        ("blue-gray", (L >= 22) & (L < 70) & (b <= 2) & (a < 15)),
        ("red", (L >= 25) & (L < 80) & (C >= 30) & (h >= -20) & (h < 38)),
        ("dark brown", (L >= 22) & (L < 45) & (C >= 10) & (h >= 38) & (h < 90)),
        ("light brown", (L >= 45) & (L < 82) & (C >= 18) & (h >= 38) & (h < 90)),
    ]
    for name, rule in rules:
        hit = rule & free
        out[name] = float(hit.sum()) / len(L)
        free &= ~hit
    return out


def _reference_skin_normalised(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from dermnode.inference.measurements import REFERENCE_SKIN_RGB

    eq_d = math.sqrt(4.0 * float(mask.sum()) / math.pi)
    d_out = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    ring = (d_out > 0.1 * eq_d) & (d_out <= 0.5 * eq_d)
    px = rgb[ring]
    px = px[(px.max(axis=1) > 50) & (px.min(axis=1) < 250)]
    if len(px) < 50:
        return rgb
    skin = np.median(px, axis=0).astype(np.float64) + 1.0
    ref = np.asarray(REFERENCE_SKIN_RGB, dtype=np.float64)
    gain = np.clip(np.array([ref[0] / ref[1] * skin[1] / skin[0], 1.0, ref[2] / ref[1] * skin[1] / skin[2]]), 0.6, 1.6)
    return np.asarray(np.clip(rgb.astype(np.float64) * gain + 0.5, 0, 255), dtype=np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_colour_lookup_tables_equal_the_float_rules(seed: int) -> None:
    from dermnode.inference.measurements import color_fractions, skin_normalised

    rgb, mask = _lesion_image(seed)
    assert np.array_equal(skin_normalised(rgb, mask), _reference_skin_normalised(rgb, mask))
    assert color_fractions(rgb, mask) == _reference_colour_fractions(rgb, mask)


def test_colour_table_covers_every_8bit_lab_value() -> None:
    from dermnode.inference.measurements import _L_STAR, _colour_rule_hits, _colour_tables

    level_class, table = _colour_tables()
    rng = np.random.default_rng(5)
    lab8 = rng.integers(0, 256, size=(200_000, 3))
    lab8[:256, 0] = np.arange(256)  # every L
    L, a, b = _L_STAR[lab8[:, 0]], lab8[:, 1] - 128.0, lab8[:, 2] - 128.0
    expected = np.full(len(L), 6)
    free = np.ones(len(L), dtype=bool)
    for i, hit in enumerate(_colour_rule_hits(L, a, b)):
        expected[hit & free] = i
        free &= ~hit
    got = table[level_class[lab8[:, 0]], lab8[:, 1] << 8 | lab8[:, 2]]
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("n", [1, 2, 49, 50, 51, 1000])
def test_histogram_median_equals_numpy_median(n: int) -> None:
    from dermnode.inference.imaging import median_u8

    rng = np.random.default_rng(n)
    for _ in range(20):
        v = rng.integers(0, 256, size=n).astype(np.uint8)
        assert median_u8(v) == float(np.median(v))
    with pytest.raises(ValueError):
        median_u8(np.zeros(0, np.uint8))


def test_measurement_box_holds_every_pixel_measure_reads() -> None:
    from dermnode.inference.measurements import measurement_box

    rgb, mask = _lesion_image(1)
    y0, y1, x0, x1 = measurement_box(mask)
    scrambled = np.random.default_rng(0).integers(0, 256, rgb.shape).astype(np.uint8)
    scrambled[y0:y1, x0:x1] = rgb[y0:y1, x0:x1]  # anything may lie outside the box
    assert measure(mask, scrambled, None) == measure(mask, rgb, None)
    with pytest.raises(ValueError):
        measurement_box(np.zeros_like(mask))
