"""Lesion measurements on a binary mask: size, shape, ABCD features, colours.

All formulas (also in ``docs/measurements.md``):

Geometry (``mask`` at source resolution; ``sx = column spacing``, ``sy = row spacing`` in mm/pixel):

* **area** ``A_px = number of mask pixels``; ``A_mm2 = A_px * sx * sy``.
* **perimeter** — length of the outer boundary of every connected component: the contour through the centres of
  the boundary pixels (OpenCV, 8-connected), smoothed with a circular Gaussian of sigma 1 px along the contour
  (removes the staircase bias of chain codes), as a closed polygon. In mm each contour vertex is first mapped to
  ``(x * sx, y * sy)``, so anisotropic spacing is exact.
* **maximum Feret diameter** — the largest distance between two points of the convex hull of the mask, where
  every boundary pixel contributes its four corners (so a digital disc of diameter ``D`` pixels measures ``D``).
  In mm the hull vertices are mapped to ``(x * sx, y * sy)`` before the (exhaustive) pairwise search; an affine
  map keeps the hull a hull, so the maximum is exact for anisotropic pixels.
* **asymmetry** — the mask is first resampled to square pixels when ``sx != sy`` (and reduced to an equivalent
  diameter of at most 512 px; the fractions are scale-invariant). Centroid ``c`` and principal
  axes ``u1, u2`` (eigenvectors of the second-moment matrix). For each axis the mask is mirrored about the line
  through ``c`` along that axis (``p' = c + (2 u u^T - I)(p - c)``) and the non-overlap fraction
  ``a_k = 1 - |M ∩ M'_k| / |M|`` (0 = symmetric, 1 = no overlap) is computed. ``asymmetry = (a_1 + a_2) / 2``;
  ``asymmetry_axes`` = number of axes with ``a_k > ASYMMETRY_AXIS_THRESHOLD`` (0.10) — the ABCD "A" score.
* **border irregularity** — compactness ``P^2 / (4 pi A_c)`` with ``P`` the smoothed perimeter and ``A_c`` the
  area enclosed by the same smoothed contours (1 for a circle, larger for irregular borders).
* **border score** (ABCD "B", 0..8) — the image is cropped around the lesion and resampled so that the lesion's
  equivalent diameter ``D_eq = sqrt(4 A / pi)`` is at most 256 px; ``L*`` (CIELAB lightness, Gaussian sigma 1)
  is averaged in 16 bins of signed distance to the mask border covering ``[-0.15 D_eq, +0.15 D_eq]`` (negative
  inside), separately in 8 sectors of 45 degrees around the centroid. In each sector, with ``L_in`` / ``L_out``
  the mean of the 3 innermost / outermost bins and ``C = L_out - L_in``, the 20% and 80% crossings of the
  (monotone envelope of the) profile give the rise width ``x80 - x20``. The sector border is an **abrupt
  cut-off** when ``C >= 8`` (a visible lesion/skin step) and the rise width is ``<= 0.08 D_eq``
  (``BORDER_ABRUPT_RISE``). ``border_score`` = number of abrupt sectors. The 0.08 threshold was chosen on
  ISIC 2017 training images (median rise width 0.086 D_eq; mean score 2.9 for melanomas vs 1.8 for benign
  lesions on a 215-image subsample); a sharp synthetic edge measures about 0.015, a Gaussian edge of
  sigma = 6% of the diameter about 0.10. Because the mask need not sit exactly on the edge, the profile
  (not the mask outline) locates the transition.

Colours (the six dermoscopic colours of the ABCD rule). Colours are judged relative to the surrounding skin: the
image is first white-balanced so that the median skin colour in the ring ``0.1 D_eq < d <= 0.5 D_eq`` outside the
mask has the chromaticity of the reference skin ``REFERENCE_SKIN_RGB = (188, 163, 151)`` (the median skin colour
of ISIC 2017 training images): ``R`` and ``B`` are scaled so that the skin's ``R/G`` and ``B/G`` match, gains
clipped to [0.6, 1.6] (:func:`skin_normalised`; skipped when fewer than 50 skin pixels are visible). This
removes device colour casts (e.g. the pink cast of HAM10000 images, which otherwise turns brown nevi "red").
Pixels inside the mask (eroded by 1% of the equivalent
diameter to skip the boundary blend) are then converted to CIELAB (D65, ``L*`` 0..100) after a 3x3 median filter;
with chroma ``C* = sqrt(a*^2 + b*^2)`` and hue ``h = atan2(b*, a*)`` in degrees, each pixel gets the first
matching label:

====================  ===============================================================
white                 ``L* >= 82`` and ``C* < 18``
black                 ``L* < 22``
blue-gray             ``22 <= L* < 70``, ``b* <= 2`` and ``a* < 15``
red                   ``25 <= L* < 80``, ``C* >= 30`` and ``-20 <= h < 38``
dark brown            ``22 <= L* < 45``, ``C* >= 10`` and ``38 <= h < 90``
light brown           ``45 <= L* < 82``, ``C* >= 18`` and ``38 <= h < 90``
====================  ===============================================================

A colour is *present* when at least ``COLOR_MIN_FRACTION`` (5%) of the lesion pixels carry it.

TDS (Stolz): ``TDS = 1.3 A + 0.1 B + 0.5 C + 0.5 D`` with ``A`` = asymmetry_axes, ``B`` = border_score,
``C`` = number of colours and ``D`` = number of differential structures (network, structureless areas, dots,
globules, streaks; 1..5). ``D`` is **not measured** by dermnode, so ``Measurements.tds`` is ``None``;
:func:`tds_bounds` gives the interval of TDS values compatible with the measured A, B, C for ``D`` in 1..5.
"""

from __future__ import annotations

import functools
import logging
import math

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.inference.imaging import median_u8, resize_by
from dermnode.vocabulary import DERMOSCOPIC_COLOURS, Measurements, PixelSpacing

logger = logging.getLogger(__name__)

ASYMMETRY_AXIS_THRESHOLD = 0.10
COLOR_MIN_FRACTION = 0.05
BORDER_MIN_CONTRAST = 8.0
BORDER_ABRUPT_RISE = 0.08
BORDER_PROFILE_REACH = 0.15
REFERENCE_SKIN_RGB = (188, 163, 151)  # median skin colour around the lesions of ISIC 2017 training images
COLOR_NAMES: tuple[str, ...] = DERMOSCOPIC_COLOURS

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


def _outer_contours(mask: BoolArray) -> list[FloatArray]:
    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1, 2).astype(np.float64) for c in contours]


def _smooth_closed(pts: FloatArray, sigma: float = 1.0) -> FloatArray:
    n = len(pts)
    if n < 5:
        return pts
    r = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    ext = np.concatenate([pts[-r:], pts, pts[:r]])
    out = np.stack([np.convolve(ext[:, i], k, mode="valid") for i in range(2)], axis=1)
    return out[:n]


def _poly_length(pts: FloatArray) -> float:
    if len(pts) < 2:
        return 0.0
    d = np.diff(np.vstack([pts, pts[:1]]), axis=0)
    return float(np.sqrt((d**2).sum(axis=1)).sum())


def _poly_area(pts: FloatArray) -> float:
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _corner_hull(contours: list[FloatArray]) -> FloatArray:
    """Convex hull of the four corners of every contour pixel (the outer contours of the mask)."""
    pts = np.vstack(contours)
    corners = np.vstack([pts + np.array(o) for o in ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))])
    return np.asarray(cv2.convexHull(corners.astype(np.float32)).reshape(-1, 2), dtype=np.float64)


def _hull_diameter(hull: FloatArray, sx: float, sy: float) -> float:
    """Largest distance between two hull points, with x scaled by sx and y by sy."""
    if len(hull) < 2:
        return 0.0
    h = hull * np.array([sx, sy])
    d2 = ((h[:, None, :] - h[None, :, :]) ** 2).sum(axis=2)
    return float(np.sqrt(d2.max()))


def _max_feret(mask: BoolArray, sx: float, sy: float) -> float:
    """Largest distance between hull points of the pixel corners, with x scaled by sx and y by sy."""
    return _hull_diameter(_corner_hull(_outer_contours(mask)), sx, sy)


def _isotropic(mask: BoolArray, sx: float, sy: float) -> BoolArray:
    """Resample ``mask`` to square pixels (the finer spacing) when the spacing is anisotropic."""
    if abs(sx - sy) <= 0.01 * max(sx, sy):
        return mask
    h, w = mask.shape
    s = min(sx, sy)
    nw, nh = max(1, round(w * sx / s)), max(1, round(h * sy / s))
    out = cv2.resize(mask.astype(np.uint8) * 255, (nw, nh), interpolation=cv2.INTER_LINEAR) >= 128
    return np.asarray(out, dtype=bool)


def asymmetry_scores(mask: BoolArray) -> tuple[float, float]:
    """Non-overlap fractions after mirroring about the major and the minor principal axis.

    Parameters
    ----------
    mask : ndarray
        Boolean mask (square pixels).

    Returns
    -------
    tuple of float
        ``(a_major, a_minor)``, each in [0, 1].

    Raises
    ------
    ValueError
        When the mask is empty.
    """
    if not mask.any():
        raise ValueError("empty mask")
    _, mask = _bbox_crop(None, mask, 0.0)
    scale = _working_scale(mask, 512.0)  # the non-overlap fraction is scale-invariant
    if scale < 0.999:
        small = resize_by(mask.astype(np.uint8) * 255, scale, cv2.INTER_AREA)
        mask = np.asarray(small >= 128, dtype=bool)
        if not mask.any():
            raise ValueError("empty mask")
    ys, xs = np.nonzero(mask)
    n = len(xs)
    cx, cy = xs.mean(), ys.mean()
    cov = np.cov(np.vstack([xs - cx, ys - cy])) if n > 1 else np.eye(2)
    _, vecs = np.linalg.eigh(cov)
    axes = [vecs[:, 1], vecs[:, 0]]  # major, minor
    # Only mirrored pixels that land on the mask count, so the canvas is the mask's own box (no padding): a
    # mirrored pixel outside it could not overlap. Destination pixels inside the mask read their mirror image.
    m = mask.astype(np.uint8)
    c = np.array([cx, cy])
    out = []
    for u in axes:
        r = 2.0 * np.outer(u, u) - np.eye(2)
        t = c - r @ c
        aff = np.hstack([r, t[:, None]])
        mirrored = cv2.warpAffine(m, aff, (m.shape[1], m.shape[0]), flags=cv2.INTER_NEAREST)
        overlap = int(np.count_nonzero(mirrored[mask]))
        out.append(1.0 - overlap / n)
    return float(np.clip(out[0], 0, 1)), float(np.clip(out[1], 0, 1))


#: CIELAB ``L*`` (0..100, float64) of each 8-bit OpenCV ``L`` value (``L * 100 / 255``).
_L_STAR: FloatArray = np.arange(256, dtype=np.float64) * (100.0 / 255.0)


def _lab(rgb: npt.NDArray[np.uint8]) -> FloatArray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float64)
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab


def _lightness(rgb: npt.NDArray[np.uint8]) -> FloatArray:
    """``L*`` (float64, 0..100) of an RGB image: the 8-bit Lab ``L`` through :data:`_L_STAR` (as :func:`_lab`)."""
    return _L_STAR[cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 0]]


def _bbox(mask: BoolArray, margin: float) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the mask bounding box enlarged by ``margin`` of its size (+4 px) on every side."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    py = int(margin * (y1 - y0)) + 4
    px = int(margin * (x1 - x0)) + 4
    return max(0, y0 - py), min(mask.shape[0], y1 + py), max(0, x0 - px), min(mask.shape[1], x1 + px)


def _bbox_crop(
    rgb: npt.NDArray[np.uint8] | None, mask: BoolArray, margin: float
) -> tuple[npt.NDArray[np.uint8] | None, BoolArray]:
    """Crop to the mask bounding box enlarged by ``margin`` of its size (+4 px) on every side."""
    y0, y1, x0, x1 = _bbox(mask, margin)
    return (None if rgb is None else rgb[y0:y1, x0:x1]), mask[y0:y1, x0:x1]


#: Margin (fraction of the lesion's bounding box) of the widest crop the measurements read: the colours'.
COLOUR_CROP_MARGIN = 0.5
BORDER_CROP_MARGIN = 0.3


def measurement_box(mask: BoolArray) -> tuple[int, int, int, int]:
    """The region of the image :func:`measure` reads for a lesion mask (the pixels outside it do not matter).

    Parameters
    ----------
    mask : ndarray
        Boolean lesion mask (H, W), not empty.

    Returns
    -------
    tuple of int
        ``(y0, y1, x0, x1)``: rows ``y0:y1``, columns ``x0:x1`` (the colour crop, the widest).

    Raises
    ------
    ValueError
        When the mask is empty.
    """
    if not mask.any():
        raise ValueError("empty mask")
    return _bbox(mask, max(COLOUR_CROP_MARGIN, BORDER_CROP_MARGIN))


def _working_scale(mask: BoolArray, target_diameter: float = 256.0) -> float:
    eq_d = math.sqrt(4.0 * float(mask.sum()) / math.pi)
    return min(1.0, target_diameter / max(eq_d, 1.0)) if eq_d > 0 else 1.0


def _resize_pair(
    rgb: npt.NDArray[np.uint8], mask: BoolArray, scale: float
) -> tuple[npt.NDArray[np.uint8], BoolArray]:
    if scale >= 0.999:
        return rgb, mask
    r = resize_by(rgb, scale, cv2.INTER_AREA)
    m = resize_by(mask.astype(np.uint8) * 255, scale, cv2.INTER_AREA) >= 128
    return r, np.asarray(m, dtype=bool)


def border_score(rgb: npt.NDArray[np.uint8], mask: BoolArray) -> tuple[int, list[bool]]:
    """ABCD border score: number of the 8 sectors whose border is an abrupt cut-off.

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).
    mask : ndarray
        Boolean lesion mask (H, W).

    Returns
    -------
    tuple
        ``(score 0..8, per-sector flags)``.
    """
    flags = [s <= BORDER_ABRUPT_RISE for s in border_rise_widths(rgb, mask)]
    return int(sum(flags)), flags


def border_rise_widths(rgb: npt.NDArray[np.uint8], mask: BoolArray) -> list[float]:
    """Per-sector 20-80% lightness rise width across the border, as a fraction of the equivalent diameter.

    ``inf`` marks a sector without a clear lesion/skin contrast or without enough pixels.

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).
    mask : ndarray
        Boolean lesion mask (H, W).

    Returns
    -------
    list of float
        Eight values (sectors of 45 degrees counter-clockwise in image coordinates from the +x axis).
    """
    inf = float("inf")
    if not mask.any():
        return [inf] * 8
    crop, cm = _bbox_crop(rgb, mask, BORDER_CROP_MARGIN)
    assert crop is not None
    r, m = _resize_pair(np.ascontiguousarray(crop), cm, _working_scale(cm))
    if not m.any():
        return [inf] * 8
    L = cv2.GaussianBlur(_lightness(r), (0, 0), 1.0)
    mu8 = m.astype(np.uint8)
    sd = np.where(m, -cv2.distanceTransform(mu8, cv2.DIST_L2, 5), cv2.distanceTransform(1 - mu8, cv2.DIST_L2, 5))
    eq_d = math.sqrt(4.0 * float(m.sum()) / math.pi)
    reach = max(6.0, BORDER_PROFILE_REACH * eq_d)
    n_bins = 16
    bw = 2.0 * reach / n_bins
    ys, xs = np.nonzero(m)
    cx, cy = xs.mean(), ys.mean()
    # only the pixels of the band around the border enter a profile: sector and bin of those, one bincount for
    # the 8 x 16 (sector, bin) cells (each cell sums the same pixels in the same order as a per-sector pass would)
    band = (sd > -reach) & (sd <= reach)
    by, bx = np.nonzero(band)
    sector = ((np.degrees(np.arctan2(by - cy, bx - cx)) + 360.0) % 360.0 // 45.0).astype(np.int64)
    bins = np.clip(((sd[band] + reach) / bw).astype(np.int64), 0, n_bins - 1)
    cell = sector * n_bins + bins
    counts = np.bincount(cell, minlength=8 * n_bins).reshape(8, n_bins)
    sums = np.bincount(cell, weights=L[band], minlength=8 * n_bins).reshape(8, n_bins)
    centres = -reach + bw * (np.arange(n_bins) + 0.5)
    out = []
    for s in range(8):
        cnt = counts[s]
        if (cnt < 3).any():
            out.append(inf)  # lesion at the image edge or too small
            continue
        prof = sums[s] / cnt
        lin, lout = prof[:3].mean(), prof[-3:].mean()
        c = lout - lin
        if c < BORDER_MIN_CONTRAST:
            out.append(inf)
            continue
        # monotone envelope from inside to outside, then the 20% and 80% crossings (linear interpolation)
        env = np.maximum.accumulate(prof)
        x20 = float(np.interp(lin + 0.2 * c, env, centres))
        x80 = float(np.interp(lin + 0.8 * c, env, centres))
        out.append(max(0.0, x80 - x20) / eq_d)
    return out


def skin_normalised(rgb: npt.NDArray[np.uint8], mask: BoolArray) -> npt.NDArray[np.uint8]:
    """White-balance the image so that the surrounding skin has the reference skin chromaticity.

    The skin colour is the median RGB of the ring ``0.1 D_eq < d <= 0.5 D_eq`` outside the mask (pixels with
    ``max(RGB) > 50`` and not clipped). Red and blue are scaled so that ``R/G`` and ``B/G`` of the skin equal
    those of :data:`REFERENCE_SKIN_RGB` (green, hence most of the lightness, is kept); gains are clipped to
    [0.6, 1.6]. Without at least 50 ring pixels the image is returned unchanged.

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).
    mask : ndarray
        Boolean lesion mask.

    Returns
    -------
    ndarray
        The normalised uint8 image.
    """
    eq_d = math.sqrt(4.0 * float(mask.sum()) / math.pi)
    d_out = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    ring = (d_out > 0.1 * eq_d) & (d_out <= 0.5 * eq_d)
    rgb = np.ascontiguousarray(rgb)
    channels = cv2.split(rgb)
    hi = cv2.max(cv2.max(channels[0], channels[1]), channels[2])
    lo = cv2.min(cv2.min(channels[0], channels[1]), channels[2])
    ring &= (hi > 50) & (lo < 250)
    n = int(np.count_nonzero(ring))
    if n < 50:
        return rgb
    # the median of 8-bit values from a 256-bin histogram (the mean of the two middle values for an even count,
    # as numpy.median), and the gains applied through a per-channel lookup table: the same values as
    # numpy.median and the float64 multiply of the whole image, in a fraction of the time
    skin = np.array([median_u8(ch[ring]) for ch in channels]) + 1.0
    ref = np.asarray(REFERENCE_SKIN_RGB, dtype=np.float64)
    gain = np.array([ref[0] / ref[1] * skin[1] / skin[0], 1.0, ref[2] / ref[1] * skin[1] / skin[2]])
    gain = np.clip(gain, 0.6, 1.6)
    levels = np.arange(256, dtype=np.float64)[:, None]
    lut = np.asarray(np.clip(levels * gain + 0.5, 0, 255), dtype=np.uint8).reshape(1, 256, 3)
    return np.asarray(cv2.LUT(rgb, lut), dtype=np.uint8)


def color_fractions(rgb: npt.NDArray[np.uint8], mask: BoolArray) -> dict[str, float]:
    """Fraction of lesion pixels carrying each of the six dermoscopic colours (rules in the module docstring).

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).
    mask : ndarray
        Boolean lesion mask.

    Returns
    -------
    dict
        Colour name -> fraction of the (eroded) lesion pixels in [0, 1].
    """
    out = dict.fromkeys(COLOR_NAMES, 0.0)
    if not mask.any():
        return out
    crop, cm = _bbox_crop(rgb, mask, COLOUR_CROP_MARGIN)
    assert crop is not None
    r, m = _resize_pair(np.ascontiguousarray(crop), cm, _working_scale(cm, 384.0))
    r = skin_normalised(r, m)
    eq_d = math.sqrt(4.0 * float(m.sum()) / math.pi)
    k = round(0.01 * eq_d)
    if k >= 1:
        eroded = cv2.erode(m.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0
        if eroded.sum() >= 0.3 * m.sum():
            m = eroded
    if not m.any():
        return out
    lesion_rgb = np.ascontiguousarray(cv2.medianBlur(r, 3)[m]).reshape(-1, 1, 3)  # Lab of the lesion pixels only
    lab8 = np.asarray(cv2.cvtColor(lesion_rgb, cv2.COLOR_RGB2LAB), dtype=np.uint8).reshape(-1, 3)
    level_class, ab_class = _colour_tables()
    ab = lab8[:, 1].astype(np.intp) << 8 | lab8[:, 2]
    counts = np.bincount(ab_class[level_class[lab8[:, 0]], ab], minlength=len(_COLOUR_RULES) + 1)
    n = float(len(lab8))
    for i, name in enumerate(_COLOUR_RULES):
        out[name] = float(counts[i]) / n
    return out


#: The colour rules in the order they claim a pixel (a pixel takes the first that holds).
_COLOUR_RULES: tuple[str, ...] = ("white", "black", "blue-gray", "red", "dark brown", "light brown")


def _colour_rule_hits(
    L: FloatArray, a: FloatArray, b: FloatArray  # noqa: N803 (CIELAB names)
) -> list[BoolArray]:
    """Each colour rule of the module docstring on ``L*, a*, b*`` arrays, in :data:`_COLOUR_RULES` order."""
    C = np.hypot(a, b)
    h = np.degrees(np.arctan2(b, a))
    return [
        (L >= 82) & (C < 18),
        L < 22,
        (L >= 22) & (L < 70) & (b <= 2) & (a < 15),
        (L >= 25) & (L < 80) & (C >= 30) & (h >= -20) & (h < 38),
        (L >= 22) & (L < 45) & (C >= 10) & (h >= 38) & (h < 90),
        (L >= 45) & (L < 82) & (C >= 18) & (h >= 38) & (h < 90),
    ]


@functools.lru_cache(maxsize=1)
def _colour_tables() -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint8]]:
    """Lookup tables of the colour rules over 8-bit Lab: ``(level class of L (256,), class (levels, a << 8 | b))``.

    The rules depend on ``L*`` only through its comparisons with their thresholds, so the 256 ``L`` values fall
    into a few levels; for each level and each of the 65536 ``(a, b)`` pairs the table holds the index of the
    first rule that holds (``len(_COLOUR_RULES)``: none), evaluated with the same float64 expressions as on the
    pixels. A lesion's classes are then one table look-up per pixel.
    """
    L = _L_STAR
    thresholds = (22.0, 25.0, 45.0, 70.0, 80.0, 82.0)
    signature = np.stack([np.greater_equal(L, t) for t in thresholds], axis=1)
    _, first, level_class = np.unique(signature, axis=0, return_index=True, return_inverse=True)
    ab = np.arange(65536)
    a = (ab >> 8).astype(np.float64) - 128.0
    b = (ab & 255).astype(np.float64) - 128.0
    table = np.full((len(first), 65536), len(_COLOUR_RULES), dtype=np.uint8)
    for k, level in enumerate(first):
        free = np.ones(65536, dtype=bool)
        for i, hit in enumerate(_colour_rule_hits(np.full(65536, L[level]), a, b)):
            hit &= free
            table[k, hit] = i
            free &= ~hit
    return np.asarray(level_class, dtype=np.intp).reshape(256), table


def tds_bounds(m: Measurements) -> tuple[float, float]:
    """Range of the Stolz TDS compatible with the measured A, B, C when D (structures, 1..5) is unknown.

    Parameters
    ----------
    m : Measurements
        Measurements of one lesion.

    Returns
    -------
    tuple of float
        ``(TDS with D = 1, TDS with D = 5)``.
    """
    base = 1.3 * m.asymmetry_axes + 0.1 * m.border_score + 0.5 * len(m.colors)
    return base + 0.5, base + 2.5


def measure(
    mask: npt.NDArray[np.bool_], rgb: npt.NDArray[np.uint8], spacing: PixelSpacing | None
) -> Measurements:
    """Measure a lesion (see the module docstring for every formula).

    Parameters
    ----------
    mask : ndarray
        Boolean lesion mask (H, W) at source resolution.
    rgb : ndarray
        uint8 image (H, W, 3).
    spacing : PixelSpacing or None
        Physical pixel size; ``None`` leaves every ``*_mm*`` value ``None``.

    Returns
    -------
    Measurements
        The measurements (``tds`` is ``None``: differential structures are not measured).

    Raises
    ------
    ValueError
        When the mask is empty or its shape does not match the image.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {rgb.shape}")
    area_px = int(mask.sum())
    if area_px == 0:
        raise ValueError("cannot measure an empty mask")
    sx = spacing.column_mm if spacing is not None else 1.0
    sy = spacing.row_mm if spacing is not None else 1.0

    outer = _outer_contours(mask)  # once: perimeter, enclosed area and both Feret diameters use them
    contours = [_smooth_closed(c) for c in outer]
    perim_px = sum(_poly_length(c) for c in contours)
    enclosed = sum(_poly_area(c) for c in contours)
    perim_mm = sum(_poly_length(c * np.array([sx, sy])) for c in contours) if spacing is not None else None
    compact = perim_px**2 / (4.0 * math.pi * enclosed) if enclosed > 0 else float("inf")
    if not math.isfinite(compact):
        compact = perim_px**2 / (4.0 * math.pi * area_px)

    hull = _corner_hull(outer)
    feret_px = _hull_diameter(hull, 1.0, 1.0)
    feret_mm = _hull_diameter(hull, sx, sy) if spacing is not None else None

    a_major, a_minor = asymmetry_scores(_isotropic(mask, sx, sy))
    axes = int(a_major > ASYMMETRY_AXIS_THRESHOLD) + int(a_minor > ASYMMETRY_AXIS_THRESHOLD)
    b_score, _ = border_score(rgb, mask)
    fractions = color_fractions(rgb, mask)
    colors = tuple(c for c in COLOR_NAMES if fractions[c] >= COLOR_MIN_FRACTION)
    return Measurements(
        area_px=area_px,
        area_mm2=area_px * sx * sy if spacing is not None else None,
        perimeter_px=float(perim_px),
        perimeter_mm=float(perim_mm) if perim_mm is not None else None,
        max_diameter_px=float(feret_px),
        max_diameter_mm=float(feret_mm) if feret_mm is not None else None,
        asymmetry=float((a_major + a_minor) / 2.0),
        asymmetry_axes=axes,
        border_irregularity=float(compact),
        border_score=b_score,
        colors=colors,
        tds=None,
    )
