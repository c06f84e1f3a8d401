"""Lesion outline overlays for human review (FHIR attachment, reports).

An overlay is a picture for a person, not a measurement: it is drawn on a copy of the image reduced to at most
:data:`OVERLAY_MAX_SIDE` pixels on its longer side (the DICOM SEG keeps the mask at the source resolution). A
6000 x 4500 dermoscope image would otherwise give a ~15 MB PNG and a ~20 MB FHIR DiagnosticReport.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.errors import OutputError
from dermnode.inference.imaging import resize_by, resize_max_side

logger = logging.getLogger(__name__)

OUTLINE_RGB = (0, 255, 0)
LABEL = "decision support only"
#: Longer side, in pixels, of the overlays dermnode writes (smaller images are drawn at their own size).
OVERLAY_MAX_SIDE = 1024
#: Longer side, in pixels, below which the pipeline's overlay is enlarged before drawing, so that the label and a
#: notice stay legible and do not cover the whole picture of a small image (a 40 x 30 thumbnail).
OVERLAY_MIN_SIDE = 512
#: JPEG quality of the overlay attached to the FHIR report (about a tenth of the PNG's size, ~1 ms to encode).
OVERLAY_JPEG_QUALITY = 90


def _wrap(text: str, scale: float, width: int) -> list[str]:
    """``text`` split into lines no wider than ``width`` pixels at font ``scale``."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def draw_notice(out: npt.NDArray[np.uint8], notice: str) -> None:
    """Write ``notice`` (e.g. "NOT ANALYSABLE" and the reason) in white on a dark band across the middle, in place.

    Lines are wrapped to the picture's width; ``\n`` starts a new line.
    """
    h, w = out.shape[:2]
    scale = max(0.45, min(h, w) / 600.0)
    thickness = 2 if scale >= 0.9 else 1
    lines = _wrap(notice, scale, w - 24)
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    step = th + base + 6
    top = max(0, h // 2 - (step * len(lines)) // 2 - 8)
    bottom = min(h, top + step * len(lines) + 16)
    band = out[top:bottom]
    band[:] = (band.astype(np.uint16) * 3 // 10).astype(np.uint8)  # darken, keep a trace of the image
    y = top + 8 + th
    for line in lines:
        cv2.putText(out, line, (12, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        y += step


def render_overlay(
    rgb: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_] | None,
    *,
    color: tuple[int, int, int] = OUTLINE_RGB,
    thickness: int | None = None,
    label: str | None = LABEL,
    max_side: int | None = OVERLAY_MAX_SIDE,
    min_side: int | None = None,
    notice: str | None = None,
) -> npt.NDArray[np.uint8]:
    """Draw the lesion outline (and a small label) on a copy of the image.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB image.
    mask:
        ``(H, W)`` boolean lesion mask; ``None`` or empty draws no outline.
    color:
        Outline colour (RGB).
    thickness:
        Outline width in pixels; default 2 px, 3 px for images wider than 1500 px.
    label:
        Text written in the top-left corner; ``None`` for none.
    max_side:
        Reduce the image (area interpolation) and the mask so that the longer side is at most this many pixels
        before drawing; ``None`` draws at the source size.
    min_side:
        Enlarge the image (cubic) and the mask (nearest) so that the longer side is at least this many pixels
        before drawing (e.g. :data:`OVERLAY_MIN_SIDE`); ``None``: never enlarged.
    notice:
        Text written across the middle of the picture (:func:`draw_notice`), e.g. "NOT ANALYSABLE" and the
        reason of a refused image; ``None`` for none.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB overlay, ``(H, W)`` scaled by ``max_side / max(H, W)`` when that is below 1 (or
        by ``min_side / max(H, W)`` when that is above 1).

    Raises
    ------
    ValueError
        When the image is not RGB uint8 or the mask shape differs.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if mask is not None and mask.shape != (h, w):
        raise ValueError(f"mask shape {mask.shape} does not match the image {(h, w)}")
    if max_side is not None and max(h, w) > max_side:
        out, scale = resize_max_side(rgb, max_side, cv2.INTER_AREA)
        if mask is not None:
            mask = resize_by(mask.astype(np.float32), scale, cv2.INTER_AREA) >= 0.5
        h, w = out.shape[:2]
    elif min_side is not None and max(h, w) < min_side:
        factor = min_side / max(h, w)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        out = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC), dtype=np.uint8)
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        h, w = out.shape[:2]
    else:
        out = np.ascontiguousarray(rgb).copy()
    if thickness is None:
        thickness = 3 if max(h, w) > 1500 else 2
    if mask is not None:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, thickness, lineType=cv2.LINE_AA)
    if label:
        scale = max(0.4, min(h, w) / 900.0)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x0, y0 = 4, 4
        cv2.rectangle(out, (x0, y0), (x0 + tw + 6, y0 + th + base + 6), (0, 0, 0), -1)
        cv2.putText(out, label, (x0 + 3, y0 + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    if notice:
        draw_notice(out, notice)
    return out


def encode_png(arr: npt.NDArray[np.uint8]) -> bytes:
    """Encode an RGB (``(H, W, 3)``) or grey (``(H, W)``) uint8 array as PNG.

    Parameters
    ----------
    arr:
        Image to encode (RGB channel order).

    Returns
    -------
    bytes
        PNG file contents.

    Raises
    ------
    OutputError
        When the array cannot be encoded.
    """
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise OutputError(f"cannot encode an array of {arr.dtype} {arr.shape} as PNG")
    bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise OutputError("PNG encoding failed")
    return bytes(buf.tobytes())


def encode_jpeg(arr: npt.NDArray[np.uint8], quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    """Encode an RGB (``(H, W, 3)``) or grey (``(H, W)``) uint8 array as baseline JPEG.

    A picture for a person (the overlay attached to the FHIR report): lossy, about a tenth of the PNG's size and
    a twentieth of its encoding time; the lossless PNG stays in the results folder.

    Parameters
    ----------
    arr:
        Image to encode (RGB channel order).
    quality:
        JPEG quality, 1-100.

    Returns
    -------
    bytes
        JPEG file contents.

    Raises
    ------
    OutputError
        When the array cannot be encoded or ``quality`` is out of range.
    """
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise OutputError(f"cannot encode an array of {arr.dtype} {arr.shape} as JPEG")
    if not 1 <= quality <= 100:
        raise OutputError(f"JPEG quality must be within 1-100, got {quality}")
    bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OutputError("JPEG encoding failed")
    return bytes(buf.tobytes())
