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
8. ``skin_frac < 0.55`` or ``foreign_frac > 0.20`` -> "colours are not those of skin; not a dermoscopy image"

Blur is judged on a 256-px copy, i.e. relative to the frame size: a frame whose detail is washed out at the
scale of the whole field of view is rejected, whatever the sensor resolution.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.inference.imaging import resize_by, resize_max_side, shades_of_gray
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
    """Shades-of-Gray (p = 6) white balance estimated on the non-vignette pixels, gains clipped to [0.6, 1.6]."""
    x = shades_of_gray(work, p=6.0, gain_limits=QUALITY_GAIN_LIMITS, mask=body)
    return np.asarray(np.clip(x * 255.0 + 0.5, 0, 255), dtype=np.uint8)


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
    grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
    hsv = cv2.cvtColor(work, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hue = hsv[..., 0] * (360.0 / 256.0)
    sat = hsv[..., 1] / 255.0
    val = hsv[..., 2] / 255.0
    dark = val < VIGNETTE_V
    body = ~dark
    n_body = max(int(body.sum()), 1)

    # skin colours are judged after a mild Shades-of-Gray correction (dermoscopes often have a blue cast)
    hsv_c = cv2.cvtColor(_colour_corrected(work, body), cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hue_c = hsv_c[..., 0] * (360.0 / 256.0)
    sat_c = hsv_c[..., 1] / 255.0
    skin = (((hue_c >= 330.0) | (hue_c < 60.0)) & (sat_c >= 0.05) & (sat_c <= 0.85)) | (sat_c < 0.2)
    # foreign colours are judged on the raw image: strongly saturated green/cyan/blue/purple (a white balance
    # would neutralise a uniformly green photo)
    foreign = (hue >= 75.0) & (hue < 300.0) & (sat >= 0.45)

    g = grey.astype(np.float64)
    grey_var = float(g.var())
    sharpness = _sharpness(work)

    keep = ~(cv2.cvtColor(near, cv2.COLOR_RGB2HSV_FULL)[..., 2] < VIGNETTE_V * 255) & ~(near >= 250).all(axis=2)
    near_body = near[keep]
    if len(near_body) >= 0.02 * keep.size:
        codes = (
            near_body[:, 0].astype(np.int64) << 16 | near_body[:, 1].astype(np.int64) << 8 | near_body[:, 2]
        )
        counts = np.bincount(np.unique(codes, return_inverse=True)[1])
        flat = float(np.sort(counts)[-8:].sum()) / len(codes)
    else:
        flat = 1.0
    edges = cv2.Canny(grey, 100, 200)
    clipped = (work >= 250).all(axis=2)
    mid = body & ~clipped
    achrom = sat < 0.04
    return {
        "grey_std": float(np.sqrt(grey_var)),
        "mean_v": float(val.mean()),
        "field_mean_v": float(val[body].mean()) if body.any() else 0.0,
        "mean_luma": float(g.mean()) / 255.0,
        "dark_frac": float(dark.mean()),
        "bright_frac": float((work >= 250).all(axis=2).mean()),
        "sharpness": sharpness,
        "skin_frac": float((skin & body).sum()) / n_body,
        "foreign_frac": float((foreign & body).sum()) / n_body,
        "flat_frac": flat,
        "edge_density": float((edges > 0).mean()),
        "achromatic_frac": float((achrom & mid).sum()) / max(int(mid.sum()), 1),
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
    elif s["skin_frac"] < MIN_SKIN_FRAC or s["foreign_frac"] > MAX_FOREIGN_FRAC:
        reason = "colours are not those of skin; not a dermoscopy image"
    if reason is not None:
        logger.info("quality gate rejected the image: %s", reason)
    return QualityReport(usable=reason is None, reason=reason, scores=s)
