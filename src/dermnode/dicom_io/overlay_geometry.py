"""Geometry shared by the presentation state and the burned-in key image: outline, diameter, text placement.

All coordinates are in the DICOM *PIXEL* annotation space of the source image (PS3.3 C.10.5.1.2): the top left
corner of the top left pixel is ``(0.0, 0.0)``, its bottom right corner ``(1.0, 1.0)``, so the centre of pixel
``(row r, column c)`` is ``(c + 0.5, r + 0.5)`` and every coordinate lies within ``[0, Columns] x [0, Rows]``.
Points are ``(column, row)`` pairs, as in Graphic Data. OpenCV draws in array coordinates, where the integer
``(c, r)`` is the pixel centre: subtract 0.5 (:data:`PIXEL_TO_ARRAY`) before drawing.

* The **outline** is the outer border of the largest 8-connected component of the mask, traced through the
  centres of its border pixels (``cv2.findContours``), closed, and simplified with Douglas-Peucker
  (``cv2.approxPolyDP``) to at most ``max_points`` points. :func:`lesion_outline` measures the symmetric
  Hausdorff distance between the simplified polyline and the traced border and refuses a result above
  ``tolerance_px`` (1 px by default).
* The **maximum diameter** joins the two farthest corners of the pixels of that component (the Feret diameter
  as ``dermnode.inference.measurements`` measures it, so the line is as long as the SR's *Long axis* in pixels
  when the mask has one component).
* The **text block** (one box per line) goes into the largest free margin beside the bounding box of the whole
  mask, at the image corner farthest from the lesion, so it covers no lesion pixel whenever such a margin exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_POINTS",
    "DEFAULT_TOLERANCE_PX",
    "FONT",
    "PIXEL_TO_ARRAY",
    "LesionOutline",
    "TextBlock",
    "hausdorff_px",
    "lesion_outline",
    "place_text",
]

#: Upper bound of the outline's points (the closing point included).
DEFAULT_MAX_POINTS = 300
#: Largest allowed distance (pixels) between the simplified outline and the traced mask border, both ways.
DEFAULT_TOLERANCE_PX = 1.0
#: Douglas-Peucker tolerances tried in turn (pixels); the first one that gives few enough points is kept.
_EPSILONS = (0.5, 0.75, 1.0)
#: Step (pixels) at which polyline segments are sampled for the Hausdorff check.
_SAMPLE_STEP = 0.2
#: Subtract from PIXEL coordinates to get OpenCV array coordinates (pixel centres at integers).
PIXEL_TO_ARRAY = 0.5
#: Font of the burned-in text; also measures the text block (same layout in the PR and the key image).
FONT = cv2.FONT_HERSHEY_SIMPLEX
#: Stroke thickness of the font at scale 1 (scaled with the text).
_FONT_THICKNESS_AT_1 = 2

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LesionOutline:
    """Outline and maximum diameter of the lesion, in PIXEL coordinates.

    Attributes
    ----------
    polyline:
        ``(N, 2)`` closed polyline (first point repeated at the end), ``(column, row)``.
    diameter:
        ``(2, 2)`` end points of the maximum diameter.
    border:
        ``(M, 2)`` the traced border (centres of the border pixels, in order) the polyline approximates.
    hausdorff_px:
        Symmetric Hausdorff distance between ``polyline`` and ``border`` (closed polygons), pixels.
    epsilon_px:
        Douglas-Peucker tolerance that produced ``polyline``.
    bbox:
        ``(left, top, right, bottom)`` of the whole mask (all components), pixel edges.
    """

    polyline: FloatArray
    diameter: FloatArray
    border: FloatArray
    hausdorff_px: float
    epsilon_px: float
    bbox: tuple[float, float, float, float]

    @property
    def diameter_px(self) -> float:
        """Length of the maximum diameter in pixels."""
        return float(np.linalg.norm(self.diameter[1] - self.diameter[0]))


@dataclass(frozen=True)
class TextBlock:
    """Lines of text with their boxes, in PIXEL coordinates.

    Attributes
    ----------
    lines:
        The text, one entry per line.
    boxes:
        ``(left, top, right, bottom)`` of every line, stacked top to bottom, all of the same width.
    scale:
        OpenCV font scale that makes the lines fill their boxes (for burning them in).
    overlaps_lesion:
        ``True`` only when the lesion leaves no free margin, so the text had to go over it.
    """

    lines: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    scale: float
    overlaps_lesion: bool

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """The box around all lines."""
        return (self.boxes[0][0], self.boxes[0][1], self.boxes[-1][2], self.boxes[-1][3])


def _as_mask(mask: npt.ArrayLike, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.shape != shape:
        raise OutputError(f"mask shape {arr.shape} differs from the image ({shape[0]}, {shape[1]})")
    return (arr != 0).astype(np.uint8)


def _largest_component(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        raise OutputError("the mask is empty")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)


def _point_segment_distances(points: FloatArray, starts: FloatArray, ends: FloatArray) -> FloatArray:
    """Euclidean distance from ``points[i]`` to the segment ``starts[i]``-``ends[i]``, for every ``i``.

    All three arrays are ``(N, 2)``; the result is ``(N,)``.
    """
    d = ends - starts
    len2 = np.einsum("ij,ij->i", d, d)
    rel = points - starts
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(len2 > 0, np.einsum("ij,ij->i", rel, d) / np.where(len2 > 0, len2, 1.0), 0.0)
    t = np.clip(t, 0.0, 1.0)
    diff = rel - t[:, None] * d
    return np.asarray(np.sqrt(np.einsum("ij,ij->i", diff, diff)), dtype=np.float64)


#: Margin (pixels) of the first candidate search of :func:`_directed_hausdorff`: a sample is compared with the
#: segments whose bounding box comes within this distance of its own segment's box.
_NEAR_PX = 2.0
#: Largest number of (run, segment) box tests made at once (bounds the memory of one step).
_PAIRS_PER_STEP = 1 << 20
#: Samples of one edge that share one candidate search (a run spans at most ``(_RUN - 1) * sample_step`` px).
_RUN = 32


def _nearest_distances(samples: FloatArray, starts: FloatArray, ends: FloatArray) -> FloatArray:
    """Distance from every sample to the nearest of all the segments (the few samples far from every segment)."""
    out = np.empty(len(samples), dtype=np.float64)
    step = max(1, _PAIRS_PER_STEP // max(1, len(starts)))
    for i in range(0, len(samples), step):
        chunk = samples[i : i + step]
        pts = np.repeat(chunk, len(starts), axis=0)
        dist = _point_segment_distances(pts, np.tile(starts, (len(chunk), 1)), np.tile(ends, (len(chunk), 1)))
        out[i : i + step] = dist.reshape(len(chunk), len(starts)).min(axis=1)
    return out


def _directed_hausdorff(a: FloatArray, b: FloatArray, sample_step: float) -> float:
    """Largest distance from the closed polygon ``a`` (sampled every ``sample_step`` px) to the polygon ``b``.

    Every edge of ``a`` is sampled at ``ceil(length / sample_step) + 1`` evenly spaced points (its ends
    included). Each sample is first compared with the edges of ``b`` whose bounding box comes within
    :data:`_NEAR_PX` of the box of its run (up to :data:`_RUN` consecutive samples of its edge): any edge of
    ``b`` nearer than that to the sample is among them, so a distance up to :data:`_NEAR_PX` found there is the
    exact distance to ``b``. The few samples farther from
    every candidate (or with none) are measured against every edge of ``b``. All of it is vectorised (one
    NumPy pass over the candidate pairs, not a Python loop per edge), so a 1500-pixel border costs a few ms.
    """
    a_closed = np.vstack([a, a[:1]]) if not np.array_equal(a[0], a[-1]) else a
    b_closed = np.vstack([b, b[:1]]) if not np.array_equal(b[0], b[-1]) else b
    b_starts, b_ends = b_closed[:-1], b_closed[1:]
    p, q = a_closed[:-1], a_closed[1:]
    if len(p) == 0:  # ``a`` is a single point: a degenerate edge (its one sample is the point)
        p, q = a_closed[:1], a_closed[:1]
    if len(b_starts) == 0:  # ``b`` is a single point: a degenerate edge
        b_starts, b_ends = b_closed[:1], b_closed[:1]
    # the samples: edge e gives n_e + 1 points p + k/n_e (q - p), k = 0..n_e
    n = np.maximum(1, np.ceil(np.linalg.norm(q - p, axis=1) / sample_step).astype(np.int64))
    counts = n + 1
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    edge_of = np.repeat(np.arange(len(p)), counts)
    k = np.arange(int(counts.sum())) - first[edge_of]
    t = k / n[edge_of]
    samples = p[edge_of] + t[:, None] * (q - p)[edge_of]
    # the samples are grouped in runs of at most _RUN consecutive samples of one edge, and every run is compared
    # with the edges of b whose bounding box comes within _NEAR_PX of the run's own box. Short runs keep the pairs
    # few: a long edge of a (a lesion filling the frame has edges as long as the image side) is no longer paired
    # sample by sample with every edge of b along it (that cost 1 s and 250 MB for one 768 x 576 mask).
    runs_per_edge = (counts + _RUN - 1) // _RUN
    run_of = np.concatenate([[0], np.cumsum(runs_per_edge)[:-1]])[edge_of] + k // _RUN
    run_start = np.searchsorted(run_of, np.arange(int(runs_per_edge.sum())))
    run_end = np.append(run_start[1:], len(samples))
    run_count = run_end - run_start
    head, tail = samples[run_start], samples[run_end - 1]  # a run lies on one segment: its ends bound it
    a_lo, a_hi = np.minimum(head, tail) - _NEAR_PX, np.maximum(head, tail) + _NEAR_PX
    b_lo, b_hi = np.minimum(b_starts, b_ends), np.maximum(b_starts, b_ends)
    best = np.full(len(samples), np.inf)
    step = max(1, _PAIRS_PER_STEP // max(1, len(b_starts)))
    for r0 in range(0, len(run_start), step):  # runs x edges of b in bounded blocks
        lo, hi = a_lo[r0 : r0 + step], a_hi[r0 : r0 + step]
        near = ((b_hi[None, :, 0] >= lo[:, None, 0]) & (b_lo[None, :, 0] <= hi[:, None, 0])
                & (b_hi[None, :, 1] >= lo[:, None, 1]) & (b_lo[None, :, 1] <= hi[:, None, 1]))
        ra, eb = np.nonzero(near)
        ra = ra + r0
        if len(ra) == 0:
            continue
        # expand every (run of a, edge of b) pair to (sample of that run, edge of b) pairs
        per_pair = run_count[ra]
        pair_of = np.repeat(np.arange(len(ra)), per_pair)
        offsets = np.arange(int(per_pair.sum())) - np.repeat(np.cumsum(per_pair) - per_pair, per_pair)
        sample_idx = run_start[ra][pair_of] + offsets
        seg_idx = eb[pair_of]
        dist = _point_segment_distances(samples[sample_idx], b_starts[seg_idx], b_ends[seg_idx])
        np.minimum.at(best, sample_idx, dist)
    far = ~(best <= _NEAR_PX)  # no candidate, or none within the margin: the nearest edge may be elsewhere
    if far.any():
        best[far] = _nearest_distances(samples[far], b_starts, b_ends)
    return float(best.max())


def hausdorff_px(a: npt.ArrayLike, b: npt.ArrayLike, sample_step: float = _SAMPLE_STEP) -> float:
    """Symmetric Hausdorff distance between two closed polygons given as ``(N, 2)`` point arrays.

    Parameters
    ----------
    a, b:
        Vertices of the polygons (a repeated closing point is allowed).
    sample_step:
        Spacing (pixels) of the points sampled along the edges; the result is exact up to half of it.

    Returns
    -------
    float
        The larger of the two directed distances, in the units of the points.

    Raises
    ------
    ValueError
        When a polygon is empty or not an ``(N, 2)`` array, or ``sample_step`` is not positive.
    """
    pa = np.asarray(a, dtype=np.float64)
    pb = np.asarray(b, dtype=np.float64)
    for p in (pa, pb):
        if p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
            raise ValueError(f"expected a non-empty (N, 2) array, got shape {p.shape}")
    if sample_step <= 0:
        raise ValueError(f"sample_step must be positive, got {sample_step}")
    return max(_directed_hausdorff(pa, pb, sample_step), _directed_hausdorff(pb, pa, sample_step))


def _max_diameter(component: npt.NDArray[np.uint8], contour: npt.NDArray[np.int32]) -> FloatArray:
    """The two farthest pixel corners of ``component`` (PIXEL coordinates)."""
    hull = cv2.convexHull(contour).reshape(-1, 2).astype(np.float64)
    corners = np.vstack([hull + np.array(offset) for offset in ((0, 0), (1, 0), (0, 1), (1, 1))])
    corners = cv2.convexHull(corners.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    if len(corners) < 2:  # pragma: no cover - four corners of a pixel always give a hull of 4 points
        raise OutputError("degenerate lesion hull")
    d2 = ((corners[:, None, :] - corners[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    first, second = sorted((tuple(corners[i]), tuple(corners[j])))
    return np.array([first, second], dtype=np.float64)


def lesion_outline(
    mask: npt.ArrayLike,
    max_points: int = DEFAULT_MAX_POINTS,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
) -> LesionOutline:
    """Outline (closed, simplified) and maximum diameter of the largest component of ``mask``.

    Parameters
    ----------
    mask:
        ``(rows, columns)`` lesion mask; non-zero is lesion.
    max_points:
        Largest number of polyline points (the closing point included), at least 4.
    tolerance_px:
        Largest allowed symmetric Hausdorff distance between the polyline and the traced border, pixels.

    Returns
    -------
    LesionOutline
        The outline, its diameter and the verified distance.

    Raises
    ------
    OutputError
        When the mask is not 2-D or empty, or no Douglas-Peucker tolerance up to ``tolerance_px`` gives at
        most ``max_points`` points within ``tolerance_px`` of the border.
    ValueError
        When ``max_points`` < 4 or ``tolerance_px`` is not positive.
    """
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    if not tolerance_px > 0:
        raise ValueError(f"tolerance_px must be positive, got {tolerance_px}")
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise OutputError(f"the mask must be 2-D, got shape {arr.shape}")
    binary = _as_mask(arr, (arr.shape[0], arr.shape[1]))
    left, top, width, height = cv2.boundingRect(binary)  # of every lesion pixel (all components)
    if width == 0 or height == 0:
        raise OutputError("the mask is empty")
    bbox = (float(left), float(top), float(left + width), float(top + height))
    # components and border are traced in the box around the lesion, one background pixel wider where the image
    # allows (the same contours as in the whole image, in image coordinates through the offset), not the image
    x0, y0 = max(0, left - 1), max(0, top - 1)
    x1, y1 = min(binary.shape[1], left + width + 1), min(binary.shape[0], top + height + 1)
    component = _largest_component(np.ascontiguousarray(binary[y0:y1, x0:x1]))
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x0, y0))
    contour = np.asarray(max(contours, key=len), dtype=np.int32)
    border = contour.reshape(-1, 2).astype(np.float64) + 0.5

    epsilons = [e for e in _EPSILONS if e <= tolerance_px] or [tolerance_px]
    last_error = "no tolerance tried"
    for eps in epsilons:
        approx = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2).astype(np.float64) + 0.5
        polyline = np.vstack([approx, approx[:1]])
        if len(polyline) > max_points:
            last_error = f"{len(polyline)} points at a tolerance of {eps} px (limit {max_points})"
            continue
        distance = hausdorff_px(polyline, border)
        if distance > tolerance_px:
            last_error = f"{distance:.2f} px from the mask border at a tolerance of {eps} px"
            continue
        return LesionOutline(polyline, _max_diameter(component, contour), border, distance, eps, bbox)
    raise OutputError(f"cannot simplify the lesion outline within {tolerance_px} px: {last_error}")


def _text_size_at_1(lines: tuple[str, ...]) -> tuple[float, float]:
    """(width, height) of one line box at font scale 1: widest line, font height + descent, with padding."""
    widths, heights = [], []
    for line in lines:
        (w, h), baseline = cv2.getTextSize(line, FONT, 1.0, _FONT_THICKNESS_AT_1)
        widths.append(w)
        heights.append(h + baseline)
    pad = 6.0
    return max(widths) + 2 * pad, max(heights) + pad


def place_text(
    lines: tuple[str, ...] | list[str],
    rows: int,
    columns: int,
    avoid: tuple[float, float, float, float] | None = None,
) -> TextBlock:
    """Boxes for ``lines`` inside a ``rows`` x ``columns`` image, beside the region ``avoid``.

    The block goes into the largest of the four margins around ``avoid`` (above, below, left, right, each
    kept clear of it by a small gap), at the corner of that margin farthest from the centre of ``avoid``, and
    is scaled to fit the margin (a line is at most about 5 % of the smaller image side high). Without a margin
    (the region touches all four sides) the block goes to the image corner farthest from the region's centre,
    over the region, and ``overlaps_lesion`` is set.

    Parameters
    ----------
    lines:
        The text lines (not empty).
    rows, columns:
        Size of the image.
    avoid:
        ``(left, top, right, bottom)`` in PIXEL coordinates, or ``None`` to use the top left corner.

    Returns
    -------
    TextBlock
        One box per line, in PIXEL coordinates within the image.

    Raises
    ------
    ValueError
        When ``lines`` is empty or the image size is not positive.
    """
    text = tuple(lines)
    if not text or rows <= 0 or columns <= 0:
        raise ValueError(f"need at least one line and a positive image size, got {len(text)} lines, {rows}x{columns}")
    width_1, line_1 = _text_size_at_1(text)
    block_1 = (width_1, line_1 * len(text))
    edge = max(1.0, 0.01 * min(rows, columns))  # inset from the image border and gap to the lesion
    max_scale = max(0.05 * min(rows, columns), 8.0) / line_1
    inner = (edge, edge, columns - edge, rows - edge)

    regions: list[tuple[float, float, float, float]] = []
    overlaps = False
    if avoid is None:
        regions.append(inner)
        centre = (0.0, 0.0)
    else:
        left, top, right, bottom = avoid
        centre = ((left + right) / 2, (top + bottom) / 2)
        regions = [
            (inner[0], inner[1], inner[2], top - edge),  # above
            (inner[0], bottom + edge, inner[2], inner[3]),  # below
            (inner[0], inner[1], left - edge, inner[3]),  # left
            (right + edge, inner[1], inner[2], inner[3]),  # right
        ]
        regions = [r for r in regions if r[2] - r[0] > 1 and r[3] - r[1] > 1]
        if not regions:
            overlaps = True
            regions = [inner]
            logger.warning("the lesion leaves no free margin in a %dx%d image: the text covers it", rows, columns)

    def fit(region: tuple[float, float, float, float]) -> float:
        return min((region[2] - region[0]) / block_1[0], (region[3] - region[1]) / block_1[1], max_scale)

    best = max(regions, key=fit)
    scale = fit(best)
    bw, bh = block_1[0] * scale, block_1[1] * scale
    # the corner of the chosen region farthest from the lesion centre (the top left one without a lesion)
    corners = [(x, y) for x in (best[0], best[2] - bw) for y in (best[1], best[3] - bh)]
    if avoid is None:
        x0, y0 = corners[0]
    else:
        x0, y0 = max(corners, key=lambda c: (c[0] + bw / 2 - centre[0]) ** 2 + (c[1] + bh / 2 - centre[1]) ** 2)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    lh = line_1 * scale
    boxes = tuple(
        (round(x0, 2), round(y0 + i * lh, 2), round(min(x0 + bw, columns), 2), round(min(y0 + (i + 1) * lh, rows), 2))
        for i in range(len(text))
    )
    return TextBlock(text, boxes, scale, overlaps)
