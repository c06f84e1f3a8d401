"""Shared image and score helpers: Shades-of-Gray, resize to a maximum side, sigmoid/softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dermnode.inference.imaging import (
    max_side_scale,
    resize_by,
    resize_max_side,
    shades_of_gray,
    sigmoid,
    sigmoid_scalar,
    softmax,
)


def test_shades_of_gray_maps_a_colour_cast_to_grey() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(60, 180, (40, 50, 1)).repeat(3, axis=2)
    cast = np.clip(grey * np.array([1.2, 1.0, 0.8]), 0, 255).astype(np.uint8)  # warm cast
    out = shades_of_gray(cast)
    assert out.dtype == np.float32 and out.shape == cast.shape and out.min() >= 0.0 and out.max() <= 1.0
    means = out.reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 0.01 < np.ptp(cast.reshape(-1, 3).mean(axis=0) / 255.0)


def test_shades_of_gray_gain_limits_and_mask() -> None:
    img = np.zeros((10, 10, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 240, 60, 12  # gains 0.43 (red) and 8.7 (blue) before the clip
    wide = shades_of_gray(img, gain_limits=(0.5, 2.0))
    mild = shades_of_gray(img, gain_limits=(0.6, 1.6))
    x = img[0, 0].astype(np.float32) / 255.0
    assert wide[0, 0, 2] == pytest.approx(x[2] * 2.0) and mild[0, 0, 2] == pytest.approx(x[2] * 1.6)
    assert wide[0, 0, 0] == pytest.approx(x[0] * 0.5) and mild[0, 0, 0] == pytest.approx(x[0] * 0.6)
    # the illuminant is estimated on the masked pixels only; an empty mask means every pixel
    half = img.copy()
    half[:, 5:] = 128
    left = np.zeros((10, 10), bool)
    left[:, :5] = True
    assert np.array_equal(shades_of_gray(half, mask=left)[:, :5], wide[:, :5])
    assert np.array_equal(shades_of_gray(half, mask=np.zeros((10, 10), bool)), shades_of_gray(half))


def test_resize_to_a_maximum_side() -> None:
    a = np.zeros((300, 1000, 3), np.uint8)
    small, scale = resize_max_side(a, 500)
    assert small.shape == (150, 500, 3) and scale == 0.5 and small.dtype == np.uint8
    same, one = resize_max_side(a, 1000)
    assert same is a and one == 1.0
    assert max_side_scale((3000, 10), 600) == 0.2
    assert resize_by(np.zeros((7, 3), np.float32), 0.1).shape == (1, 1)  # never below one pixel


def test_sigmoid_and_softmax() -> None:
    assert sigmoid(np.array([0.0]))[0] == 0.5
    assert sigmoid_scalar(0.0) == 0.5 and sigmoid_scalar(2.0) == 1.0 / (1.0 + math.exp(-2.0))
    z32 = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], np.float32)
    p = softmax(z32)
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0)
    assert p[1, 0] == 1.0  # stable for large logits
    assert np.allclose(p[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    assert np.array_equal(softmax(z32[0]), p[0])  # 1-D: along the only axis


def test_shades_of_gray_u8_is_the_float_path_rounded() -> None:
    from dermnode.inference.imaging import shades_of_gray, shades_of_gray_gains, shades_of_gray_u8

    rng = np.random.default_rng(3)
    img = np.clip(rng.normal((150, 120, 180), 40, (120, 160, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros(img.shape[:2], bool)
    mask[20:100, 30:140] = True
    for m, limits in ((None, (0.5, 2.0)), (mask, (0.6, 1.6)), (np.zeros_like(mask), (0.6, 1.6))):
        ref = np.asarray(np.clip(shades_of_gray(img, gain_limits=limits, mask=m) * 255.0 + 0.5, 0, 255), np.uint8)
        got = shades_of_gray_u8(img, gain_limits=limits, mask=m)
        # the gains come from float64 histograms instead of float32 means: equal up to a rare rounding step
        assert np.abs(got.astype(int) - ref).max() <= 1
        assert (got == ref).mean() > 0.999
        assert shades_of_gray_gains(img, gain_limits=limits, mask=m).dtype == np.float32
