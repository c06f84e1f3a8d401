"""Dermoscopy artefacts: the black dermoscope frame (vignette), hair, and optional contrast enhancement.

* :func:`detect_frame` finds the dark frame/vignette as the dark regions connected to the image border;
  :func:`fill_frame` paints it with the surrounding skin colour (so it does not look like lesion).
* :func:`remove_hair_blackhat` is the classic recipe (grey level, black-hat with a 17x17 cross, threshold
  10, Telea inpainting radius 1); :func:`remove_hair_multiscale` is a stronger variant (black-hat with line
  structuring elements at several orientations and lengths, elongation filter, dilated mask, inpainting
  radius 3).
* :func:`apply_clahe` equalises the L channel of CIE Lab.
* :func:`remove_artefacts` applies everything selected by :class:`~dermnode.settings.AnalysisSettings`
  (``hair_removal`` "none" | "blackhat" | "multiscale", ``clahe``). It detects the frame and the hair; the
  inpainting of the hair (the costliest step: ~10-15 ms for a 768x576 image with a few percent of hair) is done
  when the cleaned image is first asked for, and :meth:`ArtefactResult.image_within` does it only around the
  lesion, the region the measurements read (the analyser's path; on the benchmark images a third of the hair
  pixels lie there).

All functions take and return ``(H, W, 3)`` uint8 RGB arrays and never modify their input. Large images
are analysed on a grid whose longer side is at most ``work_max_side`` pixels; masks are returned at full
resolution.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.inference.imaging import max_side_scale, median_u8, resize_by
from dermnode.settings import AnalysisSettings

logger = logging.getLogger(__name__)

HAIR_METHODS = ("none", "blackhat", "multiscale")
WORK_MAX_SIDE = 1024

RGBImage = npt.NDArray[np.uint8]
BoolMask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class FrameDetection:
    """Dark dermoscope frame: ``frame_mask`` is ``True`` on frame pixels; ``fraction`` of the image."""

    frame_mask: BoolMask
    fraction: float

    @property
    def valid_mask(self) -> BoolMask:
        """Pixels that show skin (the complement of the frame)."""
        out: BoolMask = ~self.frame_mask
        return out


@dataclass(frozen=True)
class HairRemovalResult:
    """Image with hair inpainted and the detected hair mask (full resolution)."""

    image: RGBImage
    hair_mask: BoolMask

    @property
    def hair_fraction(self) -> float:
        """Fraction of the image detected as hair."""
        return float(self.hair_mask.mean()) if self.hair_mask.size else 0.0


@dataclass(frozen=True)
class HairDetection:
    """Hair found by a method, before inpainting: the mask on the analysis grid (255 on hair) and how to inpaint.

    ``scale`` is the grid's size relative to the image (1.0: the image's own grid).
    """

    mask: npt.NDArray[np.uint8]
    scale: float
    inpaint_radius: float


@dataclass(frozen=True)
class ArtefactResult:
    """Output of :func:`remove_artefacts`: the frame and hair masks, the framed image and the cleaned image.

    ``framed`` has only the frame filled: what the networks see (they were trained on images with hair).
    ``image`` has the frame filled, the hair inpainted (and CLAHE if configured): for the measurements. It is
    computed on first use (Telea inpainting of every hair pixel was the largest cost of the artefact stage);
    :meth:`image_within` inpaints only the hair of a region, which is all the measurements read.
    """

    frame: FrameDetection
    hair_mask: BoolMask
    hair_method: str
    clahe: bool
    framed: RGBImage
    hair: HairDetection | None = None

    @functools.cached_property
    def image(self) -> RGBImage:
        """The framed image with every hair pixel inpainted (and CLAHE when configured)."""
        image = self.framed if self.hair is None else _inpaint(self.framed, self.hair)[0]
        return apply_clahe(image) if self.clahe else image

    def image_within(self, box: tuple[int, int, int, int], pad: int = 32) -> RGBImage:
        """The cleaned image, exact inside ``box``: hair inpainted only in ``box`` grown by ``pad`` pixels.

        Telea inpainting fills a hair pixel from the pixels within its radius, filled before it; a hair that
        crosses the edge of the grown box is filled from the same neighbours as in the whole image except
        within a few pixels of that edge, so the pixels of ``box`` get the values of :attr:`image` (checked on
        the ISIC 2017 val images: identical measurements). Pixels outside the grown box keep their hair.
        The whole :attr:`image` is returned when CLAHE is on (it equalises tiles of the whole image), for a grid
        other than the image's (images over ``work_max_side``), or when it was already computed.

        Parameters
        ----------
        box:
            ``(y0, y1, x0, x1)``: rows ``y0:y1`` and columns ``x0:x1`` that must be exact.
        pad:
            Margin, in pixels, inpainted around ``box``.

        Returns
        -------
        numpy.ndarray
            ``(H, W, 3)`` uint8 image.

        Raises
        ------
        ValueError
            When the box is empty or outside the image.
        """
        h, w = self.framed.shape[:2]
        y0, y1, x0, x1 = box
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"box {box} is empty or outside the {w}x{h} image")
        if self.hair is None and not self.clahe:
            return self.framed
        if self.clahe or self.hair is None or self.hair.scale != 1.0 or "image" in self.__dict__:
            return self.image
        gy0, gy1, gx0, gx1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
        sub_mask = self.hair.mask[gy0:gy1, gx0:gx1]
        if not sub_mask.any():
            return self.framed
        out = self.framed.copy()
        out[gy0:gy1, gx0:gx1] = cv2.inpaint(
            np.ascontiguousarray(self.framed[gy0:gy1, gx0:gx1]),
            np.ascontiguousarray(sub_mask),
            self.hair.inpaint_radius,
            cv2.INPAINT_TELEA,
        )
        return out


def _check_rgb(rgb: npt.NDArray[np.uint8]) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")


def _upsample_mask(mask: BoolMask, shape: tuple[int, int]) -> BoolMask:
    if mask.shape == shape:
        return mask
    up = cv2.resize(mask.astype(np.uint8) * 255, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    out: BoolMask = np.asarray(up) >= 128
    return out


def luminance(rgb: RGBImage) -> RGBImage:
    """Rec. 601 luma of an RGB image as uint8.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8.
    """
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def detect_frame(
    rgb: RGBImage,
    *,
    dark_threshold: int = 40,
    min_fraction: float = 0.005,
    margin_px: int = 2,
    work_max_side: int = WORK_MAX_SIDE,
) -> FrameDetection:
    """Detect the black dermoscope frame or vignette.

    Pixels darker than ``dark_threshold`` (luma, after a light blur) form candidate regions; thin dark
    structures (hair) are removed by a morphological opening; the regions that touch the image border and
    cover at least ``min_fraction`` of the image are the frame. The frame is grown by ``margin_px`` to
    cover its soft edge.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    dark_threshold:
        Luma (0..255) below which a pixel may belong to the frame.
    min_fraction:
        Smallest frame region kept, as a fraction of the image.
    margin_px:
        Dilation of the frame at working resolution.
    work_max_side:
        Longer side of the analysis grid.

    Returns
    -------
    FrameDetection
        Frame mask at full resolution and its area fraction (an all-``False`` mask when there is no frame).

    Raises
    ------
    ValueError
        When ``rgb`` is not an ``(H, W, 3)`` uint8 image.
    """
    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    scale = max_side_scale(rgb.shape, work_max_side)
    small = resize_by(rgb, scale, cv2.INTER_AREA)
    gray = np.asarray(cv2.GaussianBlur(luminance(small), (5, 5), 0), dtype=np.uint8)
    dark = (gray < dark_threshold).astype(np.uint8)
    k = max(3, round(min(gray.shape) * 0.01) | 1)
    dark = np.asarray(
        cv2.morphologyEx(dark, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))),
        dtype=np.uint8,
    )
    if not (dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any()):
        # the frame is made of dark regions touching the border: none there, no frame (most images; skips the
        # labelling of the whole grid)
        return FrameDetection(frame_mask=np.zeros((h, w), dtype=bool), fraction=0.0)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = [int(lab) for lab in border_labels if lab != 0 and stats[lab, cv2.CC_STAT_AREA] >= min_fraction * dark.size]
    frame = np.isin(labels, keep) if keep else np.zeros(dark.shape, dtype=bool)
    if keep and margin_px > 0:
        kk = 2 * margin_px + 1
        frame = (
            np.asarray(cv2.dilate(frame.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kk, kk)))) > 0
        )
    full = _upsample_mask(frame, (h, w))
    return FrameDetection(frame_mask=full, fraction=float(full.mean()))


def fill_frame(rgb: RGBImage, frame_mask: BoolMask) -> RGBImage:
    """Paint the frame with the median colour of the skin just inside it.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    frame_mask:
        ``(H, W)`` boolean frame mask (e.g. :attr:`FrameDetection.frame_mask`).

    Returns
    -------
    numpy.ndarray
        A copy of ``rgb`` with the frame filled (unchanged copy when the mask is empty or covers everything).

    Raises
    ------
    ValueError
        When the shapes do not match.
    """
    _check_rgb(rgb)
    if frame_mask.shape != rgb.shape[:2]:
        raise ValueError(f"frame mask shape {frame_mask.shape} does not match the image {rgb.shape[:2]}")
    out = rgb.copy()
    if not frame_mask.any() or frame_mask.all():
        return out
    k = max(3, round(min(frame_mask.shape) * 0.03) | 1)
    ring = (
        np.asarray(cv2.dilate(frame_mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))) > 0
    ) & ~frame_mask
    source = ring if ring.any() else ~frame_mask
    # per-channel medians from histograms (numpy.median's value, without sorting ~10^5 pixels per channel)
    colour = np.array([median_u8(np.ascontiguousarray(rgb[..., c])[source]) for c in range(3)])
    fill = np.empty_like(out)
    fill[...] = colour.astype(np.uint8)
    # cv2.copyTo under the mask: a boolean-indexed assignment of the 3-channel image costs several times more
    return np.asarray(cv2.copyTo(fill, frame_mask.astype(np.uint8), out), dtype=np.uint8)


def _inpaint(rgb: RGBImage, hair: HairDetection) -> tuple[RGBImage, BoolMask]:
    """Inpaint at working resolution and composite the inpainted pixels into the full image."""
    h, w = rgb.shape[:2]
    mask_small, scale, radius = hair.mask, hair.scale, hair.inpaint_radius
    full_mask = _upsample_mask(mask_small > 0, (h, w))
    if not full_mask.any():
        return rgb.copy(), full_mask
    if scale == 1.0:
        return np.asarray(cv2.inpaint(rgb, mask_small, radius, cv2.INPAINT_TELEA), dtype=np.uint8), full_mask
    small = resize_by(rgb, scale, cv2.INTER_AREA)
    filled = np.asarray(cv2.inpaint(small, mask_small, radius, cv2.INPAINT_TELEA), dtype=np.uint8)
    up = np.asarray(cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    out = rgb.copy()
    out[full_mask] = up[full_mask]
    return out, full_mask


def _blackhat_hair(
    rgb: RGBImage, kernel_size: int, threshold: int, inpaint_radius: float, work_max_side: int
) -> HairDetection:
    scale = max_side_scale(rgb.shape, work_max_side)
    small = resize_by(rgb, scale, cv2.INTER_AREA)
    gray = luminance(small)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (kernel_size, kernel_size))
    blackhat = np.asarray(cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel), dtype=np.uint8)
    mask = ((blackhat > threshold) * 255).astype(np.uint8)
    return HairDetection(mask=mask, scale=scale, inpaint_radius=inpaint_radius)


def _multiscale_hair(
    rgb: RGBImage, lengths: tuple[int, ...], n_angles: int, threshold: int, inpaint_radius: float, work_max_side: int
) -> HairDetection:
    scale = max_side_scale(rgb.shape, work_max_side)
    small = resize_by(rgb, scale, cv2.INTER_AREA)
    mask = hair_mask_multiscale(luminance(small), lengths=lengths, n_angles=n_angles, threshold=threshold)
    return HairDetection(mask=mask, scale=scale, inpaint_radius=inpaint_radius)


def detect_hair(rgb: RGBImage, method: str) -> HairDetection | None:
    """The hair mask of ``method`` (default parameters) on its analysis grid, not yet inpainted.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    method:
        ``"none"``, ``"blackhat"`` or ``"multiscale"``.

    Returns
    -------
    HairDetection or None
        ``None`` for ``"none"``.

    Raises
    ------
    ValueError
        When ``method`` is unknown or the image is not RGB uint8.
    """
    _check_rgb(rgb)
    if method == "none":
        return None
    if method == "blackhat":
        return _blackhat_hair(rgb, 17, 10, 1.0, WORK_MAX_SIDE)
    if method == "multiscale":
        return _multiscale_hair(rgb, (9, 17), 12, 12, 3.0, WORK_MAX_SIDE)
    raise ValueError(f"unknown hair removal method {method!r} (choose from {', '.join(HAIR_METHODS)})")


def remove_hair_blackhat(
    rgb: RGBImage,
    *,
    kernel_size: int = 17,
    threshold: int = 10,
    inpaint_radius: float = 1.0,
    work_max_side: int = WORK_MAX_SIDE,
) -> HairRemovalResult:
    """Classic hair removal: grey level, black-hat (cross kernel), threshold, Telea inpainting.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    kernel_size:
        Side of the cross-shaped structuring element.
    threshold:
        Black-hat response (grey levels) above which a pixel is hair.
    inpaint_radius:
        Telea inpainting radius in pixels.
    work_max_side:
        Longer side of the analysis grid.

    Returns
    -------
    HairRemovalResult
        Inpainted image and hair mask.

    Raises
    ------
    ValueError
        When ``rgb`` is not an ``(H, W, 3)`` uint8 image.
    """
    _check_rgb(rgb)
    image, full_mask = _inpaint(rgb, _blackhat_hair(rgb, kernel_size, threshold, inpaint_radius, work_max_side))
    return HairRemovalResult(image=image, hair_mask=full_mask)


def line_kernel(length: int, angle_deg: float) -> npt.NDArray[np.uint8]:
    """A one-pixel-wide line structuring element of ``length`` pixels at ``angle_deg`` degrees.

    Parameters
    ----------
    length:
        Line length in pixels (odd values centre the line).
    angle_deg:
        Orientation, counter-clockwise from the horizontal.

    Returns
    -------
    numpy.ndarray
        Square uint8 kernel with ones on the line.
    """
    size = length | 1
    kernel = np.zeros((size, size), np.uint8)
    c = size // 2
    dx = math.cos(math.radians(angle_deg)) * (length - 1) / 2.0
    dy = -math.sin(math.radians(angle_deg)) * (length - 1) / 2.0
    p1 = (round(c - dx), round(c - dy))
    p2 = (round(c + dx), round(c + dy))
    cv2.line(kernel, p1, p2, 1, 1)
    return kernel


@functools.lru_cache(maxsize=8)
def _line_kernels(lengths: tuple[int, ...], n_angles: int) -> tuple[npt.NDArray[np.uint8], ...]:
    """The structuring elements of :func:`hair_mask_multiscale`, built once (read-only arrays)."""
    kernels = [
        _compact_kernel(line_kernel(length, 180.0 * i / n_angles)) for length in lengths for i in range(n_angles)
    ]
    for k in kernels:
        k.setflags(write=False)
    return tuple(kernels)


def _compact_kernel(kernel: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A horizontal or vertical line kernel as a 1 x N or N x 1 one (OpenCV's fast rectangular path; same result).

    The line passes through the centre of the square kernel, so the cropped kernel's centre is the same pixel.
    """
    rows, cols = np.flatnonzero(kernel.any(axis=1)), np.flatnonzero(kernel.any(axis=0))
    if len(rows) == 1 and kernel[rows[0]].sum() == kernel.shape[1] and rows[0] == kernel.shape[0] // 2:
        return np.ascontiguousarray(kernel[rows[0] : rows[0] + 1])
    if len(cols) == 1 and kernel[:, cols[0]].sum() == kernel.shape[0] and cols[0] == kernel.shape[1] // 2:
        return np.ascontiguousarray(kernel[:, cols[0] : cols[0] + 1])
    return kernel


def hair_mask_multiscale(
    gray: npt.NDArray[np.uint8],
    *,
    lengths: tuple[int, ...] = (9, 17),
    n_angles: int = 12,
    threshold: int = 12,
    min_elongation: float = 3.0,
    dilate_px: int = 1,
) -> npt.NDArray[np.uint8]:
    """Hair mask from oriented black-hat responses (grey image at working resolution).

    For each line length and orientation the closing with a line element fills dark structures narrower
    than the line; the maximum black-hat over orientations and lengths marks thin dark curvilinear
    structures. Connected components that are not elongated (dots, globules, the lesion body) are dropped,
    and the mask is dilated to cover the hair's soft edge.

    Parameters
    ----------
    gray:
        ``(H, W)`` uint8 grey image.
    lengths:
        Line lengths in pixels.
    n_angles:
        Number of orientations over 180 degrees.
    threshold:
        Black-hat response above which a pixel is hair.
    min_elongation:
        Minimum ratio of the long to the short side of a component's rotated bounding box, unless the
        component is large and sparse (a hair network).
    dilate_px:
        Dilation radius of the final mask.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 mask, 255 on hair.
    """
    smooth = np.asarray(cv2.GaussianBlur(gray, (3, 3), 0), dtype=np.uint8)
    # a closing never darkens (closed >= smooth), so the largest black-hat is the largest closing minus smooth
    closed_max = smooth.copy()
    for k in _line_kernels(tuple(lengths), n_angles):
        cv2.max(closed_max, cv2.morphologyEx(smooth, cv2.MORPH_CLOSE, k), dst=closed_max)
    response = np.asarray(cv2.subtract(closed_max, smooth), dtype=np.uint8)
    raw = np.asarray(cv2.threshold(response, threshold, 1, cv2.THRESH_BINARY)[1], dtype=np.uint8)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    min_area = max(8, int(0.00002 * raw.size))
    area = stats[:, cv2.CC_STAT_AREA]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    big = area >= min_area
    big[0] = False
    sparse = big & (area < 0.25 * bw * bh) & (np.maximum(bw, bh) > 20)  # a curved hair or a network of hairs
    keep = sparse.copy()
    compact = big & ~sparse
    if compact.any():
        # elongation of the other components: the rotated bounding box of a component is that of its outer
        # contour (the same convex hull), so one contour pass replaces a pixel scan per component
        contours, hierarchy = cv2.findContours(raw, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        for contour, link in zip(contours, hierarchy[0], strict=True):
            if link[3] != -1:  # the boundary of a hole
                continue
            x, y = contour[0, 0]
            lab = int(labels[y, x])
            if not compact[lab]:
                continue
            (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
            long_side, short_side = max(rw, rh), max(1.0, min(rw, rh))
            keep[lab] = long_side / short_side >= min_elongation
    mask = np.asarray(keep.astype(np.uint8)[labels] * np.uint8(255), dtype=np.uint8)
    if dilate_px > 0:
        kk = 2 * dilate_px + 1
        mask = np.asarray(cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kk, kk))), dtype=np.uint8)
    return mask


def remove_hair_multiscale(
    rgb: RGBImage,
    *,
    lengths: tuple[int, ...] = (9, 17),
    n_angles: int = 12,
    threshold: int = 12,
    inpaint_radius: float = 3.0,
    work_max_side: int = WORK_MAX_SIDE,
) -> HairRemovalResult:
    """Stronger hair removal: oriented multi-scale black-hat, elongation filter, dilated mask, Telea radius 3.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    lengths, n_angles, threshold:
        See :func:`hair_mask_multiscale`.
    inpaint_radius:
        Telea inpainting radius in pixels.
    work_max_side:
        Longer side of the analysis grid.

    Returns
    -------
    HairRemovalResult
        Inpainted image and hair mask.

    Raises
    ------
    ValueError
        When ``rgb`` is not an ``(H, W, 3)`` uint8 image.
    """
    _check_rgb(rgb)
    hair = _multiscale_hair(rgb, lengths, n_angles, threshold, inpaint_radius, work_max_side)
    image, full_mask = _inpaint(rgb, hair)
    return HairRemovalResult(image=image, hair_mask=full_mask)


def remove_hair(rgb: RGBImage, method: str) -> HairRemovalResult:
    """Dispatch on the ``analysis.hair_removal`` setting.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    method:
        ``"none"``, ``"blackhat"`` or ``"multiscale"``.

    Returns
    -------
    HairRemovalResult
        For ``"none"`` a copy of the image and an empty mask.

    Raises
    ------
    ValueError
        When ``method`` is unknown or the image is not RGB uint8.
    """
    hair = detect_hair(rgb, method)
    if hair is None:
        return HairRemovalResult(image=rgb.copy(), hair_mask=np.zeros(rgb.shape[:2], dtype=bool))
    image, full_mask = _inpaint(rgb, hair)
    return HairRemovalResult(image=image, hair_mask=full_mask)


def apply_clahe(rgb: RGBImage, clip_limit: float = 2.0, tile_grid: int = 8) -> RGBImage:
    """Contrast-limited adaptive histogram equalisation of the L channel (CIE Lab).

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB.
    clip_limit:
        CLAHE clip limit.
    tile_grid:
        Tiles per side.

    Returns
    -------
    numpy.ndarray
        The enhanced RGB image.

    Raises
    ------
    ValueError
        When ``rgb`` is not an ``(H, W, 3)`` uint8 image.
    """
    _check_rgb(rgb)
    lab = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), dtype=np.uint8)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return np.asarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), dtype=np.uint8)


def remove_artefacts(rgb: RGBImage, settings: AnalysisSettings) -> ArtefactResult:
    """Frame detection and filling, hair removal and optional CLAHE, as configured.

    The frame is detected first and filled with skin colour, so it is neither taken for hair nor for
    lesion; hair is then detected with ``settings.hair_removal``; the result's ``image`` has it inpainted and,
    if ``settings.clahe``, the contrast equalised (computed on first use; :meth:`ArtefactResult.image_within`
    inpaints a region only). Hair detected inside the frame is discarded from ``hair_mask``.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB at source resolution.
    settings:
        Analysis settings (``hair_removal``, ``clahe``).

    Returns
    -------
    ArtefactResult
        Cleaned image, frame detection and hair mask.

    Raises
    ------
    ValueError
        When the image is not RGB uint8 or the hair removal method is unknown.
    """
    frame = detect_frame(rgb)
    framed = fill_frame(rgb, frame.frame_mask)
    hair = detect_hair(framed, settings.hair_removal)
    if hair is None:
        hair_mask = np.zeros(rgb.shape[:2], dtype=bool)
    else:
        hair_mask = _upsample_mask(hair.mask > 0, rgb.shape[:2]) & ~frame.frame_mask
    logger.debug(
        "artefacts: frame %.3f, hair %.3f (%s), clahe %s",
        frame.fraction,
        float(hair_mask.mean()),
        settings.hair_removal,
        settings.clahe,
    )
    return ArtefactResult(
        frame=frame,
        hair_mask=hair_mask,
        hair_method=settings.hair_removal,
        clahe=settings.clahe,
        framed=framed,
        hair=hair,
    )
