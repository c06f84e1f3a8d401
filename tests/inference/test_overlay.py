"""Overlay rendering and PNG encoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dermnode.errors import OutputError
from dermnode.inference.overlay import encode_png, render_overlay


def test_outline_drawn_on_boundary_only() -> None:
    img = np.full((120, 160, 3), 200, np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    out = render_overlay(img, mask, label=None)
    changed = (out != img).any(axis=2)
    assert changed[30, 60] and changed[60, 40]  # on the outline
    assert not changed[60, 80]  # interior untouched
    assert not changed[5, 5]
    assert (img == 200).all()  # input unchanged
    green = out[changed]
    assert (green[:, 1] > green[:, 0]).mean() > 0.9


def test_label_and_empty_mask() -> None:
    img = np.full((200, 300, 3), 200, np.uint8)
    out = render_overlay(img, np.zeros((200, 300), bool))
    assert (out[:30, :150] != 200).any()  # label box
    assert (out[100:, :] == 200).all()
    with pytest.raises(ValueError):
        render_overlay(img, np.zeros((10, 10), bool))


def test_encode_png_roundtrip() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert (back == rgb).all()
    grey = encode_png(rgb[..., 0].copy())
    assert cv2.imdecode(np.frombuffer(grey, np.uint8), cv2.IMREAD_UNCHANGED).shape == (20, 30)
    with pytest.raises(OutputError):
        encode_png(rgb.astype(np.float32))  # type: ignore[arg-type]


def test_large_images_are_drawn_reduced_to_the_overlay_size() -> None:
    img = np.full((3000, 4000, 3), 180, np.uint8)
    mask = np.zeros((3000, 4000), bool)
    mask[1000:2000, 1500:2500] = True
    out = render_overlay(img, mask, label=None)
    assert out.shape == (768, 1024, 3)  # longer side OVERLAY_MAX_SIDE, aspect ratio kept
    changed = (out != 180).any(axis=2)
    ys, xs = np.nonzero(changed)
    # the outline sits where the mask's border lands after scaling by 1024 / 4000
    assert abs(ys.min() - 1000 * 0.256) <= 3 and abs(xs.max() - 2500 * 0.256) <= 3
    full = render_overlay(img[:300, :400], mask[:300, :400], max_side=None)
    assert full.shape == (300, 400, 3)
    assert render_overlay(img, None, max_side=2000).shape == (1500, 2000, 3)


def test_encode_jpeg_roundtrip_and_size() -> None:
    from dermnode.inference.overlay import encode_jpeg

    img = np.full((300, 400, 3), 180, np.uint8)
    mask = np.zeros((300, 400), bool)
    mask[80:220, 100:300] = True
    picture = render_overlay(img, mask)
    data = encode_jpeg(picture)
    assert data[:2] == b"\xff\xd8"
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert back.shape == picture.shape
    assert np.abs(back.astype(int) - picture.astype(int)).mean() < 3
    with pytest.raises(OutputError):
        encode_jpeg(picture, quality=0)
    with pytest.raises(OutputError):
        encode_jpeg(picture.astype(np.float32))  # type: ignore[arg-type]


def test_overlay_of_a_large_image_is_capped_at_1024_px() -> None:
    from dermnode.inference.overlay import OVERLAY_MAX_SIDE, OVERLAY_MIN_SIDE

    img = np.full((3000, 4000, 3), 120, np.uint8)
    out = render_overlay(img, np.zeros((3000, 4000), bool), min_side=OVERLAY_MIN_SIDE)
    assert max(out.shape[:2]) == OVERLAY_MAX_SIDE == 1024 and out.shape[:2] == (768, 1024)
