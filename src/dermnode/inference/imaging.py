"""Small image and score helpers shared by the runtime stages (and by training and evaluation).

* :func:`shades_of_gray` — Shades-of-Gray colour constancy (Finlayson & Trezzi 2004): the illuminant is the
  Minkowski ``p``-norm mean of each channel (``p = 6``), every channel is scaled so that its estimate equals the
  mean of the three, with the gains clipped to ``gain_limits``. The classifier uses gains in [0.5, 2.0] on the
  whole crop; the quality gate judges skin colour after a milder correction ([0.6, 1.6]) estimated on the
  non-vignette pixels only. :func:`shades_of_gray_u8` gives the same correction rounded to uint8 through a lookup
  table (the gate's path).
* :func:`max_side_scale`, :func:`resize_by`, :func:`resize_max_side` — "reduce so that the longer side is at
  most N pixels" with one rounding rule for the output size.
* :func:`sigmoid`, :func:`sigmoid_scalar`, :func:`softmax` — probabilities from logits.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar, cast

import cv2
import numpy as np
import numpy.typing as npt

S = TypeVar("S", bound=np.generic)
F = TypeVar("F", bound=np.floating)

#: Gain limits of the classifier's colour constancy.
CLASSIFIER_GAIN_LIMITS: tuple[float, float] = (0.5, 2.0)


def shades_of_gray(
    rgb: npt.NDArray[np.uint8],
    *,
    p: float = 6.0,
    gain_limits: tuple[float, float] = CLASSIFIER_GAIN_LIMITS,
    mask: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.float32]:
    """Shades-of-Gray colour constancy.

    Parameters
    ----------
    rgb:
        uint8 image ``(H, W, 3)``.
    p:
        Minkowski norm order.
    gain_limits:
        ``(low, high)`` clip of the per-channel gains.
    mask:
        ``(H, W)`` pixels the illuminant is estimated on; ``None`` or an empty mask: every pixel.

    Returns
    -------
    ndarray
        float32 image in [0, 1] with the illuminant estimate mapped to grey.
    """
    x = rgb.astype(np.float32) / 255.0
    pixels = x[mask] if mask is not None and mask.any() else x.reshape(-1, 3)
    illum = np.power(np.mean(np.power(pixels, p), axis=0), 1.0 / p) + 1e-6
    gain = np.clip(illum.mean() / illum, gain_limits[0], gain_limits[1])
    return np.clip(x * gain[None, None, :], 0.0, 1.0).astype(np.float32)


def shades_of_gray_gains(
    rgb: npt.NDArray[np.uint8],
    *,
    p: float = 6.0,
    gain_limits: tuple[float, float] = CLASSIFIER_GAIN_LIMITS,
    mask: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.float32]:
    """The per-channel gains of :func:`shades_of_gray`, from 256-bin histograms of the (masked) pixels.

    The Minkowski mean of a channel is ``sum_v hist[v] (v / 255)^p / n``: the same estimate as the mean over the
    pixels (in float64 instead of float32, so it may differ in the last float32 bits), without a float copy
    of the image.

    Parameters
    ----------
    rgb:
        uint8 image ``(H, W, 3)``.
    p:
        Minkowski norm order.
    gain_limits:
        ``(low, high)`` clip of the per-channel gains.
    mask:
        ``(H, W)`` pixels the illuminant is estimated on; ``None`` or an empty mask: every pixel.

    Returns
    -------
    ndarray
        float32 gains ``(3,)``.
    """
    img = np.ascontiguousarray(rgb)
    m = None if mask is None or not mask.any() else np.asarray(mask, dtype=np.uint8)
    weights = (np.arange(256, dtype=np.float64) / 255.0) ** p
    illum = np.empty(3, dtype=np.float64)
    for c in range(3):
        hist = cv2.calcHist([img], [c], m, [256], [0, 256]).ravel().astype(np.float64)
        illum[c] = float(hist @ weights) / max(float(hist.sum()), 1.0)
    est = np.power(illum, 1.0 / p) + 1e-6
    return np.asarray(np.clip(est.mean() / est, gain_limits[0], gain_limits[1]), dtype=np.float32)


def shades_of_gray_u8(
    rgb: npt.NDArray[np.uint8],
    *,
    p: float = 6.0,
    gain_limits: tuple[float, float] = CLASSIFIER_GAIN_LIMITS,
    mask: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.uint8]:
    """:func:`shades_of_gray` rounded to uint8 (``clip(x * 255 + 0.5)``), through a per-channel lookup table.

    Same parameters as :func:`shades_of_gray` (gains from :func:`shades_of_gray_gains`); about 1 ms for a
    512 x 384 image instead of ~15 ms for the float path.

    Returns
    -------
    ndarray
        uint8 image ``(H, W, 3)``.
    """
    gain = shades_of_gray_gains(rgb, p=p, gain_limits=gain_limits, mask=mask)
    levels = np.arange(256, dtype=np.float32) / 255.0
    x = np.clip(levels[:, None] * gain[None, :], 0.0, 1.0).astype(np.float32)
    lut = np.asarray(np.clip(x * 255.0 + 0.5, 0, 255), dtype=np.uint8).reshape(1, 256, 3)
    return np.asarray(cv2.LUT(np.ascontiguousarray(rgb), lut), dtype=np.uint8)


def median_u8(values: npt.NDArray[np.generic]) -> float:
    """``numpy.median`` of uint8 values (1-D), from their 256-bin histogram: the same value, without a sort.

    For an even count it is the mean of the two middle values, as :func:`numpy.median`.

    Raises
    ------
    ValueError
        When ``values`` is empty.
    """
    n = len(values)
    if n == 0:
        raise ValueError("median of no values")
    cum = np.cumsum(np.bincount(np.asarray(values, dtype=np.uint8), minlength=256))
    upper = int(np.searchsorted(cum, n // 2, side="right"))  # the (n // 2)-th smallest, 0-based
    if n % 2:
        return float(upper)
    lower = int(np.searchsorted(cum, n // 2 - 1, side="right"))
    return (lower + upper) / 2.0


def max_side_scale(shape: tuple[int, ...], max_side: float) -> float:
    """The factor (at most 1) that brings the longer side of an ``(H, W, ...)`` shape down to ``max_side``."""
    return min(1.0, max_side / max(shape[0], shape[1]))


def resize_by(a: npt.NDArray[S], scale: float, interpolation: int = cv2.INTER_AREA) -> npt.NDArray[S]:
    """``a`` resized by ``scale`` (output sides rounded, at least 1 pixel); ``a`` itself when ``scale`` is 1.

    Parameters
    ----------
    a:
        ``(H, W)`` or ``(H, W, C)`` image.
    scale:
        Factor applied to both sides.
    interpolation:
        OpenCV interpolation flag.

    Returns
    -------
    ndarray
        The resized image, same dtype.
    """
    if scale == 1.0:
        return a
    h, w = a.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(cast(Any, a), size, interpolation=interpolation), dtype=a.dtype)


def resize_max_side(
    a: npt.NDArray[S], max_side: float, interpolation: int = cv2.INTER_AREA
) -> tuple[npt.NDArray[S], float]:
    """``a`` reduced so that its longer side is at most ``max_side`` (never enlarged).

    Returns
    -------
    tuple
        ``(image, scale)``; ``scale`` is 1.0 (and the image ``a`` itself) when it already fits.
    """
    scale = max_side_scale(a.shape, max_side)
    return resize_by(a, scale, interpolation), scale


def sigmoid(z: npt.NDArray[F]) -> npt.NDArray[F]:
    """Logistic function ``1 / (1 + exp(-z))``, element-wise, in the input's float precision."""
    out: npt.NDArray[F] = 1.0 / (1.0 + np.exp(-z))
    return out


def logit(p: npt.ArrayLike, eps: float = 1e-6) -> npt.NDArray[np.float64]:
    """Inverse of :func:`sigmoid`: ``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    out: npt.NDArray[np.float64] = np.log(q / (1.0 - q))
    return out


def sigmoid_scalar(z: float) -> float:
    """Logistic function of one number (``math.exp``: the classifier's melanoma probability)."""
    return 1.0 / (1.0 + math.exp(-z))


def softmax(z: npt.NDArray[F], axis: int = -1) -> npt.NDArray[F]:
    """Softmax along ``axis`` (shifted by the maximum for stability), in the input's float precision."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    out: npt.NDArray[F] = e / e.sum(axis=axis, keepdims=True)
    return out
