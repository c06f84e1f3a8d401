"""Quality and suitability gate: is this frame a usable dermoscopy image?

:func:`assess_quality` computes a few cheap image statistics and applies the rules below, in order; the first
failing rule gives the (short, human-readable) reason. Every statistic is returned in ``QualityReport.scores``.

The image is first reduced to a working copy whose longer side is :data:`WORK_SIDE` (512) pixels (area
interpolation; nearest-neighbour for the exact-colour statistic), so every threshold is independent of the
source resolution (600 to 6000 px devices). Pixels darker than ``V < 0.12`` (HSV value) are treated as the
dermoscope's dark vignette and excluded from the colour statistics.

=================  ==========================================================================================
score              definition
=================  ==========================================================================================
``grey_std``       standard deviation of the grey levels (0..255) of the whole frame
``mean_v``         mean HSV value (0..1) of the whole frame (reported, not used by a rule)
``field_mean_v``   mean HSV value (0..1) of the non-vignette pixels (``V >= 0.12``), i.e. of the dermoscope's
                   field of view: a circular field inside a black 4:3 frame is not "dark" for its black corners
``mean_luma``      mean grey level (0..1, Rec. 601 luma) of the whole frame: unlike V (the brightest channel) it
                   does not read a saturated red channel of a warm-cast device as overexposure
``dark_frac``      fraction of pixels with ``V < 0.12``
``bright_frac``    fraction of pixels with all channels ``>= 250`` (clipped highlights)
``sharpness``      variance of the Laplacian of a grey copy of at most 256 px (the scale of the images the
                   threshold was set on; sigma 1 Gaussian pre-filter removes JPEG/sensor noise) divided by the
                   grey variance (so it is contrast-invariant), times 1000; both over the field of view
                   (non-vignette pixels, eroded by 3 px) when it covers at least 20 % of the frame: the black
                   surround of a circular field and its edge would otherwise dominate the grey variance (a 4:3
                   frame with a circular field scored ~1.2 instead of ~17)
``skin_frac``      among non-vignette pixels, after a Shades-of-Gray white balance (p = 6, gains clipped to
                   [0.6, 1.6]; dermoscopes often have a blue cast): fraction whose colour is skin/lesion-like: hue in
                   [330, 360) or [0, 60) degrees with saturation in [0.05, 0.85], or a low-saturation grey-
                   blue/grey (``S < 0.2``; blue-gray and white dermoscopic structures, pale skin)
``foreign_frac``   among non-vignette pixels of the raw image: fraction of clearly non-skin colours (hue in
                   [75, 300) with ``S >= 0.45``: green, cyan, saturated blue, purple). Judged before the white
                   balance on purpose: the balance would turn a uniformly green photo grey (see
                   docs/robustness.md for the price: a strong blue cast, B/R gain ratio above ~2, is refused)
``object_frac``    fraction of the non-vignette pixels covered by *peripheral objects* (a sticker, a ruler
                   label, cloth, a finger at the edge of the field; see below)
``core_skin_frac`` ``skin_frac`` over the *core field*: the non-vignette pixels less the peripheral objects, with
                   the white balance estimated on the core field; equal to ``skin_frac`` when there is no object
                   or the objects cover more than :data:`MAX_OBJECT_FRAC` (1/3) of the field
``core_foreign_frac`` ``foreign_frac`` over the core field (the same fallback)
``flat_frac``      fraction of the pixels that are neither vignette-dark nor clipped white (all channels
                   ``>= 250``) covered by the 8 most frequent *exact* RGB values (photos have sensor noise;
                   screenshots and documents are made of flat colours); 1 when fewer than 2% of the pixels
                   remain (a frame made only of black and white)
``achromatic_frac`` among pixels neither vignette-dark nor clipped white: fraction with HSV saturation
                   ``< 0.04`` (anti-aliased grey text of a document)
``edge_density``   fraction of Canny edge pixels (thresholds 100/200) in the working copy
=================  ==========================================================================================

Before any statistic, the frame must be at least :data:`MIN_IMAGE_SIDE_PX` (128) pixels on its shorter side, else
"image too small (W x H pixels; at least 128 px on the shorter side are needed)". The segmentation network works at
160-192 px and the classifier crop at 128-160 px: below 128 px the lesion is upsampled from too few pixels (a
40 x 30 thumbnail was analysed as a 0.8 % melanoma probability). Dermoscopes send 600 px or more; 180-256 px
archive images (ISIC) are real dermoscopy and pass. At a typical dermoscope field of view of 10-25 mm across the
shorter side, 128 px is a pixel size of 0.08-0.2 mm.

Rules (thresholds measured on the real ISIC 2017, ISIC 9-class and HAM10000 images, see
``bench/gate_false_rejection.py``):

1. ``field_mean_v < 0.15`` or ``dark_frac > 0.85`` -> "image too dark"
2. ``grey_std < 4`` -> "blank or uniform frame"
3. ``sharpness < 0.35`` -> "image too blurred"
4. ``achromatic_frac > 0.98`` with ``bright_frac <= 0.30`` (not a white page) -> "image has no colour (greyscale
   or monochrome); dermoscopy analysis needs a colour image" (the real images reach at most 0.91; a greyscale copy,
   JPEG or not, scores 1.0). Judged before the flat-colour rule: a greyscale photo has at most 256 distinct
   colours, so its ``flat_frac`` is high
5. ``flat_frac > 0.50``, or ``achromatic_frac > 0.90`` with ``bright_frac + dark_frac > 0.30`` (grey text on a
   white or black page) -> "looks like a screenshot or document, not a dermoscopy photograph"
6. ``bright_frac > 0.50`` or ``mean_luma > 0.95`` -> "image overexposed"
7. ``edge_density > 0.32`` -> "too much fine high-contrast detail (text or pattern), not dermoscopy"
8. (``skin_frac < 0.55`` or ``foreign_frac > 0.20``) and (``core_skin_frac < 0.55`` or ``core_foreign_frac >
   0.20``) -> "colours are not those of skin; not a dermoscopy image": the colours fail over the whole field and
   over the core field

Peripheral objects (rule 8). A dermoscopy image is centred on the lesion; stickers, ruler labels, cloth or a
finger lie at the edge of the field. Such an object is not what the analysis reads, and judged over the whole field
its colours refused 13 of the 2150 real ISIC 2017 images (blue, green or orange stickers, pink cloth: 20-29 % of
the field). On the raw working copy, the non-vignette pixels whose colour is foreign or not skin-like (the two
per-pixel rules above, before any white balance) are opened with a 5 x 5 square (:data:`OBJECT_OPEN_PX`: hair, thin
ink lines and noise do not join regions) and split into 8-connected regions. A region is a peripheral object when
it touches the edge of the field (the frame border or the dark vignette), does not contain the frame's centre
pixel, and its centroid lies outside the centred ellipse whose axes are half the frame's width and height
(:data:`CENTRAL_RADIUS`: the central 50 %, where the lesion is). Objects are set aside only while they cover at
most a third of the field (:data:`MAX_OBJECT_FRAC`), so the core field keeps at least two thirds of it and the rule
still needs at least 0.55 x 2/3 = 37 % of the whole field in skin colours. A non-skin photograph (foliage, cloth or
a screen filling the frame) is one region containing the centre: nothing is set aside and it is refused as before;
so is a skin field with a foreign object over its centre. The core field has its own white balance: a saturated
object pulls the Shades-of-Gray (p = 6, close to max-RGB) estimate, and turned the skin around pink cloth
yellow-green (ISIC_0012127: ``skin_frac`` 0.32, ``core_skin_frac`` 0.94). The whole-field test is kept as an
alternative, so the rule refuses nothing the whole-field rule accepted: under an extreme warm cast the most
saturated red skin at the edge can itself be taken for an object, and the core field's weaker correction then
leaves the skin too saturated.

Blur is judged on a 256-px copy, i.e. relative to the frame size: a frame whose detail is washed out at the
scale of the whole field of view is rejected, whatever the sensor resolution.
"""

from __future__ import annotations

import functools
import logging
import math

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.inference.imaging import resize_by, resize_max_side, shades_of_gray_u8
from dermnode.vocabulary import QualityReport

logger = logging.getLogger(__name__)

WORK_SIDE = 512
VIGNETTE_V = 0.12

MIN_GREY_STD = 4.0
MIN_FIELD_MEAN_V = 0.15
MAX_DARK_FRAC = 0.85
MAX_BRIGHT_FRAC = 0.50
MAX_MEAN_LUMA = 0.95
MAX_FLAT_FRAC = 0.50
MAX_ACHROMATIC_FRAC = 0.90
#: Above this ``achromatic_frac`` the frame has no colour at all (real images: at most 0.91).
MAX_ACHROMATIC_FRAC_COLOUR = 0.98
#: Minimum shorter side, in pixels, of a frame the gate accepts (see the module docstring).
MIN_IMAGE_SIDE_PX = 128
MIN_DOC_BLACK_WHITE = 0.30
MAX_EDGE_DENSITY = 0.32
MIN_SKIN_FRAC = 0.55
MAX_FOREIGN_FRAC = 0.20
#: A non-skin region whose centroid lies outside this centred ellipse (semi-axes as a fraction of the half-width and
#: half-height: 0.5 is the central 50 % of the width and height) may be a peripheral object (module docstring).
CENTRAL_RADIUS = 0.5
#: Peripheral objects are set aside from the colour statistics only while they cover at most this much of the field.
MAX_OBJECT_FRAC = 1.0 / 3.0
#: Side (working-copy pixels) of the square opening applied to the non-skin mask before finding objects.
OBJECT_OPEN_PX = 5
MIN_SHARPNESS = 0.35
MIN_FIELD_FOR_SHARPNESS = 0.20
#: Gains of the mild white balance the skin-colour check runs after (milder than the classifier's).
QUALITY_GAIN_LIMITS: tuple[float, float] = (0.6, 1.6)
SHARPNESS_SIDE = 256


def _work_copies(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(area-resized copy, nearest-resized copy) with the longer side at most WORK_SIDE."""
    area, s = resize_max_side(rgb, WORK_SIDE, cv2.INTER_AREA)
    return area, resize_by(rgb, s, cv2.INTER_NEAREST)


def _colour_corrected(work: npt.NDArray[np.uint8], body: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Shades-of-Gray (p = 6) white balance estimated on the non-vignette pixels, gains clipped to [0.6, 1.6].

    The values of :func:`~dermnode.inference.imaging.shades_of_gray` followed by the rounding to uint8, through a
    per-channel lookup table (the illuminant from 256-bin histograms of the ``body`` pixels).
    """
    return shades_of_gray_u8(work, p=6.0, gain_limits=QUALITY_GAIN_LIMITS, mask=body)


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, npt.NDArray[np.bool_]]:
    """Lookup tables of the per-pixel rules over 8-bit HSV (``hue * 256 + saturation`` or one channel).

    Each is the rule of the module docstring evaluated, with the same float32 expressions as on an image, on
    every 8-bit value, so that an image's classes are one table look-up per pixel.
    """
    levels = np.arange(256, dtype=np.float32)
    hue = levels * (360.0 / 256.0)
    frac = levels / 255.0
    h = np.repeat(hue, 256)  # index: hue_byte * 256 + saturation_byte
    sat = np.tile(frac, 256)
    return {
        "dark": np.asarray(frac < VIGNETTE_V),
        "achromatic": np.asarray(frac < 0.04),
        "skin": np.asarray((((h >= 330.0) | (h < 60.0)) & (sat >= 0.05) & (sat <= 0.85)) | (sat < 0.2)),
        "foreign": np.asarray((h >= 75.0) & (h < 300.0) & (sat >= 0.45)),
    }


def _lookup(table: npt.NDArray[np.bool_], channel: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """``table[channel]`` for a 256-entry boolean table (OpenCV's LUT: several times faster than indexing)."""
    lut = table.astype(np.uint8)
    return np.asarray(cv2.LUT(np.ascontiguousarray(channel), lut), dtype=np.uint8).view(np.bool_)


def _hue_sat_code(hsv: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint16]:
    return np.asarray((hsv[..., 0].astype(np.uint16) << 8) | hsv[..., 1], dtype=np.uint16)


def _top_colours_fraction(rgb: npt.NDArray[np.uint8], keep: npt.NDArray[np.bool_], top: int = 8) -> float:
    """Fraction of the ``keep`` pixels covered by their ``top`` most frequent exact RGB values."""
    # one uint32 per pixel (R, G, B and a constant alpha byte): an exact colour code without a boolean index of
    # the 3-channel image (~10x slower)
    codes = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)).view(np.uint32)[..., 0][keep]
    codes.sort()
    starts = np.flatnonzero(np.concatenate(([True], codes[1:] != codes[:-1])))
    counts = np.diff(np.append(starts, len(codes)))
    if len(counts) > top:
        counts = np.partition(counts, len(counts) - top)[-top:]
    return float(counts.sum()) / len(codes)


def _peripheral_objects(body: npt.NDArray[np.bool_], non_skin: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of the non-skin regions at the edge of the field, away from its centre (see the module docstring).

    ``non_skin`` is opened with an :data:`OBJECT_OPEN_PX` square and split into 8-connected regions; a region is
    kept when it touches the frame border or the vignette (``~body``), does not contain the centre pixel, and its
    centroid lies outside the centred ellipse of relative radius :data:`CENTRAL_RADIUS`.
    """
    h, w = body.shape
    kernel = np.ones((OBJECT_OPEN_PX, OBJECT_OPEN_PX), np.uint8)
    cand = cv2.morphologyEx((non_skin & body).view(np.uint8), cv2.MORPH_OPEN, kernel)
    n, labels, _, centroids = cv2.connectedComponentsWithStats(cand, connectivity=8)
    if n <= 1:
        return np.zeros_like(body)
    edge = cv2.dilate((~body).view(np.uint8), np.ones((3, 3), np.uint8)).view(np.bool_)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    touching = np.zeros(n, np.bool_)
    touching[labels[edge]] = True
    u = (centroids[:, 0] + 0.5 - w / 2) / (w / 2)
    v = (centroids[:, 1] + 0.5 - h / 2) / (h / 2)
    peripheral = touching & (u * u + v * v >= CENTRAL_RADIUS**2)
    peripheral[0] = False
    peripheral[labels[h // 2, w // 2]] = False
    return np.asarray(peripheral[labels], dtype=np.bool_)


def _mean_std(grey: npt.NDArray[np.uint8]) -> tuple[float, float]:
    """Mean and standard deviation of a uint8 image, from its histogram."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    n = float(grey.size)
    mean = float(hist @ levels) / n
    return mean, math.sqrt(float(hist @ (levels - mean) ** 2) / n)


def _sharpness(work: npt.NDArray[np.uint8]) -> float:
    """Laplacian-variance / grey-variance ratio (x 1000) on a copy of at most :data:`SHARPNESS_SIDE` pixels.

    The threshold was set on the 180-256 px ISIC images; the same content at 512 px scores 2-3x lower, so a
    600-6000 px device image is judged at the scale the threshold was measured at. Over the field of view
    (non-vignette pixels, eroded by 3 px) when it covers at least :data:`MIN_FIELD_FOR_SHARPNESS` of the frame.
    """
    work, _ = resize_max_side(work, SHARPNESS_SIDE, cv2.INTER_AREA)
    g = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY).astype(np.float64)
    lap = cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 1.0), cv2.CV_64F)
    body = cv2.cvtColor(work, cv2.COLOR_RGB2HSV_FULL)[..., 2] >= VIGNETTE_V * 255
    field = cv2.erode(body.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    if field.mean() >= MIN_FIELD_FOR_SHARPNESS:
        return 1000.0 * float(lap[field].var()) / max(float(g[field].var()), 1e-6)
    return 1000.0 * float(lap.var()) / max(float(g.var()), 1e-6)


def quality_scores(rgb: npt.NDArray[np.uint8]) -> dict[str, float]:
    """Compute the gate statistics (see the module docstring).

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).

    Returns
    -------
    dict
        Score name -> value.

    Raises
    ------
    ValueError
        When ``rgb`` is not an (H, W, 3) uint8 array.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 8:
        raise ValueError(f"expected an (H, W, 3) uint8 image of at least 8x8 pixels, got {rgb.shape} {rgb.dtype}")
    work, near = _work_copies(np.ascontiguousarray(rgb))
    tables = _tables()
    grey = np.asarray(cv2.cvtColor(work, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    hsv = np.asarray(cv2.cvtColor(work, cv2.COLOR_RGB2HSV_FULL), dtype=np.uint8)
    val8 = hsv[..., 2]
    dark = _lookup(tables["dark"], val8)
    body = ~dark
    n_body_px = int(np.count_nonzero(body))
    n_body = max(n_body_px, 1)
    hue_sat = _hue_sat_code(hsv)
    # foreign colours are judged on the raw image: strongly saturated green/cyan/blue/purple (a white balance
    # would neutralise a uniformly green photo)
    foreign = tables["foreign"][hue_sat]

    # skin colours are judged after a mild Shades-of-Gray correction (dermoscopes often have a blue cast)
    hsv_c = np.asarray(cv2.cvtColor(_colour_corrected(work, body), cv2.COLOR_RGB2HSV_FULL), dtype=np.uint8)
    skin = tables["skin"][_hue_sat_code(hsv_c)]
    skin_frac = float(np.count_nonzero(skin & body)) / n_body
    foreign_frac = float(np.count_nonzero(foreign & body)) / n_body

    # the core field: the field of view less peripheral objects (stickers, cloth at the edge) while they cover at
    # most MAX_OBJECT_FRAC of it, with its own white balance (a saturated object pulls the estimate)
    objects = _peripheral_objects(body, foreign | ~tables["skin"][hue_sat])
    n_object_px = int(np.count_nonzero(objects))
    core_skin_frac, core_foreign_frac = skin_frac, foreign_frac
    if 0 < n_object_px <= MAX_OBJECT_FRAC * n_body_px:
        core = body & ~objects
        n_core = max(int(np.count_nonzero(core)), 1)
        hsv_core = np.asarray(cv2.cvtColor(_colour_corrected(work, core), cv2.COLOR_RGB2HSV_FULL), dtype=np.uint8)
        core_skin_frac = float(np.count_nonzero(tables["skin"][_hue_sat_code(hsv_core)] & core)) / n_core
        core_foreign_frac = float(np.count_nonzero(foreign & core)) / n_core

    mean_grey, grey_std = _mean_std(grey)
    sharpness = _sharpness(work)

    near_clipped = cv2.min(cv2.min(near[..., 0], near[..., 1]), near[..., 2]) >= 250
    near_val = np.asarray(cv2.cvtColor(near, cv2.COLOR_RGB2HSV_FULL), dtype=np.uint8)[..., 2]
    keep = ~_lookup(tables["dark"], near_val) & ~near_clipped
    n_keep = int(np.count_nonzero(keep))
    flat = _top_colours_fraction(near, keep) if n_keep >= 0.02 * keep.size and n_keep > 0 else 1.0
    edges = cv2.Canny(grey, 100, 200)
    clipped = cv2.min(cv2.min(work[..., 0], work[..., 1]), work[..., 2]) >= 250
    mid = body & ~clipped
    achrom = _lookup(tables["achromatic"], hsv[..., 1])
    val_sum = float(val8.sum(dtype=np.int64))
    return {
        "grey_std": grey_std,
        "mean_v": val_sum / 255.0 / val8.size,
        "field_mean_v": float(val8.sum(where=body, dtype=np.int64)) / 255.0 / n_body_px if n_body_px else 0.0,
        "mean_luma": mean_grey / 255.0,
        "dark_frac": float(np.count_nonzero(dark)) / dark.size,
        "bright_frac": float(np.count_nonzero(clipped)) / clipped.size,
        "sharpness": sharpness,
        "skin_frac": skin_frac,
        "foreign_frac": foreign_frac,
        "object_frac": float(n_object_px) / n_body,
        "core_skin_frac": core_skin_frac,
        "core_foreign_frac": core_foreign_frac,
        "flat_frac": flat,
        "edge_density": float(np.count_nonzero(edges)) / edges.size,
        "achromatic_frac": float(np.count_nonzero(achrom & mid)) / max(int(np.count_nonzero(mid)), 1),
    }


def assess_quality(rgb: npt.NDArray[np.uint8]) -> QualityReport:
    """Decide whether a frame is a usable dermoscopy image.

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3) at source resolution.

    Returns
    -------
    QualityReport
        ``usable`` with ``reason = None``, or not usable with a short reason; ``scores`` holds every
        statistic.

    Raises
    ------
    ValueError
        When ``rgb`` is not an (H, W, 3) uint8 image.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    reason: str | None = None
    if min(h, w) < MIN_IMAGE_SIDE_PX:
        reason = f"image too small ({w}x{h} pixels; at least {MIN_IMAGE_SIDE_PX} px on the shorter side are needed)"
        logger.info("quality gate rejected the image: %s", reason)
        return QualityReport(usable=False, reason=reason, scores={"width_px": float(w), "height_px": float(h)})
    s = quality_scores(rgb)
    if s["field_mean_v"] < MIN_FIELD_MEAN_V or s["dark_frac"] > MAX_DARK_FRAC:
        reason = "image too dark"
    elif s["grey_std"] < MIN_GREY_STD:
        reason = "blank or uniform frame"
    elif s["sharpness"] < MIN_SHARPNESS:
        reason = "image too blurred"
    elif s["achromatic_frac"] > MAX_ACHROMATIC_FRAC_COLOUR and s["bright_frac"] <= MIN_DOC_BLACK_WHITE:
        reason = "image has no colour (greyscale or monochrome); dermoscopy analysis needs a colour image"
    elif s["flat_frac"] > MAX_FLAT_FRAC or (
        s["achromatic_frac"] > MAX_ACHROMATIC_FRAC and s["bright_frac"] + s["dark_frac"] > MIN_DOC_BLACK_WHITE
    ):
        reason = "looks like a screenshot or document, not a dermoscopy photograph"
    elif s["bright_frac"] > MAX_BRIGHT_FRAC or s["mean_luma"] > MAX_MEAN_LUMA:
        reason = "image overexposed"
    elif s["edge_density"] > MAX_EDGE_DENSITY:
        reason = "too much fine high-contrast detail (text or pattern), not dermoscopy"
    elif (s["skin_frac"] < MIN_SKIN_FRAC or s["foreign_frac"] > MAX_FOREIGN_FRAC) and (
        s["core_skin_frac"] < MIN_SKIN_FRAC or s["core_foreign_frac"] > MAX_FOREIGN_FRAC
    ):
        reason = "colours are not those of skin; not a dermoscopy image"
    if reason is not None:
        logger.info("quality gate rejected the image: %s", reason)
    return QualityReport(usable=reason is None, reason=reason, scores=s)
