"""The lesion crop a classifier sees, identical at training and inference time (no torch here).

1. crop box = bounding box of the lesion mask, enlarged by ``margin`` (20%) of its size on every side, then
   squared around its centre (side = the longer side); pixels outside the image are reflected; an empty or
   missing mask gives the largest centred square of the image (:func:`lesion_crop_box`);
2. resize to the network's input size (area interpolation when shrinking, linear when enlarging;
   :func:`warp_crop`, which also does the rotations and zooms of training augmentation);
3. Shades-of-Gray colour constancy (Minkowski p = 6), scale to [0, 1] and normalise with the network's mean/std
   (:func:`preprocess_crop`).
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.inference.imaging import shades_of_gray

#: Normalisation of the from-scratch ``dermnet`` classifiers (pretrained backbones carry their own).
MEAN = np.array([0.60, 0.50, 0.45], dtype=np.float32)
STD = np.array([0.20, 0.20, 0.20], dtype=np.float32)
#: Fraction of the lesion's bounding box added on every side of the crop.
DEFAULT_MARGIN = 0.2


def lesion_crop_box(
    mask: npt.NDArray[np.bool_] | None, shape: tuple[int, int], margin: float = DEFAULT_MARGIN
) -> tuple[float, float, float]:
    """Square crop box around the lesion.

    Parameters
    ----------
    mask : ndarray or None
        Boolean lesion mask (H, W); ``None`` or empty gives the largest centred square.
    shape : tuple of int
        ``(H, W)`` of the image.
    margin : float
        Fraction of the bounding-box size added on every side.

    Returns
    -------
    tuple of float
        ``(centre_x, centre_y, side)`` in pixels.
    """
    h, w = shape
    if mask is None or not mask.any():
        return (w - 1) / 2.0, (h - 1) / 2.0, float(min(h, w))
    ys, xs = np.nonzero(mask)
    y0, y1 = float(ys.min()), float(ys.max() + 1)
    x0, x1 = float(xs.min()), float(xs.max() + 1)
    side = max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)
    side = max(side, 8.0)
    return (x0 + x1) / 2.0 - 0.5, (y0 + y1) / 2.0 - 0.5, side


def warp_crop(
    rgb: npt.NDArray[np.uint8],
    box: tuple[float, float, float],
    out_size: int,
    *,
    angle_deg: float = 0.0,
    scale_x: float = 1.0,
    scale_y: float = 1.0,
) -> npt.NDArray[np.uint8]:
    """Extract the (optionally rotated / anisotropically scaled) square ``box`` resized to ``out_size``.

    Parameters
    ----------
    rgb : ndarray
        uint8 image (H, W, 3).
    box : tuple of float
        ``(centre_x, centre_y, side)`` from :func:`lesion_crop_box`.
    out_size : int
        Output side in pixels.
    angle_deg : float
        Rotation of the sampling grid (augmentation only).
    scale_x, scale_y : float
        Extra zoom along the output axes (augmentation only; > 1 zooms in).

    Returns
    -------
    ndarray
        uint8 crop (out_size, out_size, 3); outside pixels are reflected.
    """
    cx, cy, side = box
    s = out_size / side
    if angle_deg == 0.0 and scale_x == 1.0 and scale_y == 1.0:
        # plain crop + resize (area interpolation when shrinking gives an anti-aliased crop)
        half = side / 2.0
        x0 = int(np.floor(cx + 0.5 - half))
        y0 = int(np.floor(cy + 0.5 - half))
        n = round(side)
        h, w = rgb.shape[:2]
        pad_l, pad_t = max(0, -x0), max(0, -y0)
        pad_r, pad_b = max(0, x0 + n - w), max(0, y0 + n - h)
        if pad_l or pad_t or pad_r or pad_b:
            big = max(pad_l, pad_t, pad_r, pad_b)
            if big >= min(h, w):
                src = cv2.copyMakeBorder(rgb, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
            else:
                src = cv2.copyMakeBorder(rgb, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REFLECT_101)
            region = src[y0 + pad_t : y0 + pad_t + n, x0 + pad_l : x0 + pad_l + n]
        else:
            region = rgb[y0 : y0 + n, x0 : x0 + n]
        interp = cv2.INTER_AREA if n > out_size else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(region, (out_size, out_size), interpolation=interp))
    a = np.deg2rad(angle_deg)
    cos, sin = np.cos(a), np.sin(a)
    # output -> source: p_src = c + R @ diag(1/(s*sx), 1/(s*sy)) @ (p_out - o)
    o = (out_size - 1) / 2.0
    m_inv = np.array([[cos, -sin], [sin, cos]]) @ np.diag([1.0 / (s * scale_x), 1.0 / (s * scale_y)])
    t = np.array([cx, cy]) - m_inv @ np.array([o, o])
    m = np.hstack([m_inv, t[:, None]]).astype(np.float64)
    if s * min(scale_x, scale_y) < 0.5:
        # strong shrink: pre-blur to limit aliasing
        k = int(2 * round(0.5 / (s * min(scale_x, scale_y))) + 1)
        rgb = np.asarray(cv2.GaussianBlur(rgb, (k, k), 0), dtype=np.uint8)
    out = cv2.warpAffine(
        rgb,
        m,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return np.ascontiguousarray(out)


def preprocess_crop(
    crop: npt.NDArray[np.uint8],
    mean: npt.ArrayLike = MEAN,
    std: npt.ArrayLike = STD,
) -> npt.NDArray[np.float32]:
    """Colour-normalise a crop and return the CHW float32 network input.

    Parameters
    ----------
    crop : ndarray
        uint8 crop (S, S, 3).
    mean, std : array-like
        Per-channel normalisation of the colour-corrected 0..1 values (the network's own).

    Returns
    -------
    ndarray
        float32 (3, S, S).
    """
    x = (shades_of_gray(crop) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
