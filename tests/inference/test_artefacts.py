"""Artefact removal: black frame detection, hair removal on synthetic hair, CLAHE, settings dispatch."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from dermnode.inference.artefacts import (
    apply_clahe,
    detect_frame,
    fill_frame,
    line_kernel,
    remove_artefacts,
    remove_hair,
    remove_hair_blackhat,
    remove_hair_multiscale,
)
from dermnode.settings import AnalysisSettings

REPO = Path(__file__).resolve().parents[2]


def _data_root() -> Path:
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data"))


def _skin(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[...] = (214, 160, 140)
    inside = ((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0
    img[inside] = (150, 95, 70)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _with_hair(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = img.copy()
    truth = np.zeros(img.shape[:2], np.uint8)
    h, w = img.shape[:2]
    lines = [((0, 20), (w - 1, h - 40)), ((30, h - 1), (w - 60, 0)), ((0, h // 2), (w - 1, h // 2 + 15))]
    for p1, p2 in lines:
        cv2.line(out, p1, p2, (30, 20, 15), 2)
        cv2.line(truth, p1, p2, 1, 2)
    return out, truth.astype(bool)


def _vignette(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    outside = r > 1.0
    out = img.copy()
    out[outside] = (8, 6, 6)
    return out, outside


def test_frame_detected_on_synthetic_vignette() -> None:
    img, outside = _vignette(_skin())
    frame = detect_frame(img)
    assert frame.frame_mask.shape == outside.shape
    assert frame.fraction > 0.1
    # nearly all true frame pixels found, and the lesion/skin centre is untouched
    assert (frame.frame_mask & outside).sum() / outside.sum() > 0.97
    assert not frame.frame_mask[100:200, 150:250].any()
    assert (frame.frame_mask & ~outside).sum() / (~outside).sum() < 0.03
    assert (frame.valid_mask == ~frame.frame_mask).all()


def test_no_frame_and_dark_lesion_inside_not_frame() -> None:
    img = _skin()
    img[120:180, 170:230] = (10, 8, 8)  # very dark lesion, not touching the border
    frame = detect_frame(img)
    assert not frame.frame_mask.any()
    assert frame.fraction == 0.0


def test_fill_frame_uses_skin_colour() -> None:
    img, outside = _vignette(_skin())
    filled = fill_frame(img, detect_frame(img).frame_mask)
    assert filled[outside].mean() > 120  # no longer black
    assert (filled[150, 200] == img[150, 200]).all()
    assert img[0, 0].max() < 20  # input unchanged


@pytest.mark.parametrize("method", ["blackhat", "multiscale"])
def test_hair_removal_synthetic_lines(method: str) -> None:
    clean = _skin()
    hairy, truth = _with_hair(clean)
    res = remove_hair(hairy, method)
    assert res.image.shape == hairy.shape and res.image.dtype == np.uint8
    tol = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    recall = (res.hair_mask & truth).sum() / truth.sum()
    precision = (res.hair_mask & tol).sum() / max(1, res.hair_mask.sum())
    assert recall > 0.9
    assert precision > 0.8
    # the hair is gone: hair pixels are close to the clean image again
    before = np.abs(hairy.astype(float) - clean)[truth].mean()
    after = np.abs(res.image.astype(float) - clean)[truth].mean()
    assert after < before / 4


def test_hair_removal_none_and_unknown() -> None:
    img = _skin()
    res = remove_hair(img, "none")
    assert (res.image == img).all() and not res.hair_mask.any()
    with pytest.raises(ValueError):
        remove_hair(img, "laser")
    with pytest.raises(ValueError):
        remove_hair(img[..., 0], "blackhat")


def test_hair_free_image_barely_changed() -> None:
    img = _skin()
    for fn in (remove_hair_blackhat, remove_hair_multiscale):
        res = fn(img)
        assert res.hair_fraction < 0.01


def test_large_image_works_at_reduced_grid() -> None:
    clean = cv2.resize(_skin(), (1600, 1200), interpolation=cv2.INTER_LINEAR)
    hairy, truth = _with_hair(clean)
    res = remove_hair_multiscale(hairy)
    assert res.hair_mask.shape == truth.shape
    assert (res.hair_mask & truth).sum() / truth.sum() > 0.8


def test_line_kernel() -> None:
    k = line_kernel(9, 0)
    assert k.shape == (9, 9) and k[4].sum() == 9 and k.sum() == 9
    assert line_kernel(9, 90)[:, 4].sum() == 9


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float64)


def test_clahe_keeps_shape_and_raises_contrast() -> None:
    img = (np.full((64, 64, 3), 120, np.uint8) + np.random.default_rng(0).integers(0, 10, (64, 64, 3))).astype(np.uint8)
    out = apply_clahe(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    # a flat, low-contrast image: equalisation spreads its lightness several-fold (measured: L std 2.2 -> 11.2);
    # an identity "CLAHE" keeps the ratio at 1 and fails here
    assert _lab(out)[..., 0].std() > 3.0 * _lab(img)[..., 0].std()
    # only the lightness is equalised: the chroma (a*, b*) stays within rounding
    assert np.abs(_lab(out)[..., 1:] - _lab(img)[..., 1:]).mean() < 2.0


def test_clahe_stretches_a_narrow_lightness_range() -> None:
    ramp = np.tile(np.linspace(90, 150, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
    lightness = _lab(apply_clahe(ramp))[..., 0]
    before = _lab(ramp)[..., 0]
    assert np.ptp(lightness) > np.ptp(before) + 15  # measured: L 98..158 -> 104..187
    assert np.corrcoef(lightness.mean(axis=0), before.mean(axis=0))[0, 1] > 0.95  # the ramp stays a ramp


def test_remove_artefacts_applies_clahe_only_when_asked() -> None:
    img = (np.full((64, 64, 3), 120, np.uint8) + np.random.default_rng(0).integers(0, 10, (64, 64, 3))).astype(np.uint8)
    plain = remove_artefacts(img, AnalysisSettings(hair_removal="none", clahe=False))
    equalised = remove_artefacts(img, AnalysisSettings(hair_removal="none", clahe=True))
    assert not plain.clahe and equalised.clahe
    assert np.array_equal(equalised.image, apply_clahe(plain.image))
    assert not np.array_equal(equalised.image, plain.image)


def test_remove_artefacts_follows_settings() -> None:
    img, outside = _vignette(_skin())
    hairy, truth = _with_hair(img)
    res = remove_artefacts(hairy, AnalysisSettings(hair_removal="blackhat", clahe=True))
    assert res.hair_method == "blackhat" and res.clahe
    assert res.frame.fraction > 0.1
    assert not (res.hair_mask & res.frame.frame_mask).any()
    assert res.hair_mask[truth & ~outside].mean() > 0.8
    none = remove_artefacts(img, AnalysisSettings(hair_removal="none"))
    assert not none.hair_mask.any()


def test_hair_on_real_isic_image() -> None:
    root = _data_root() / "isic2017"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"real dermoscopy data not available at {root} (set DERMNODE_DATA)")
    bgr = cv2.imread(str(root / "images" / "ISIC_0000000.jpg"))
    clean = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (768, 576))
    hairy, truth = _with_hair(clean)
    for method in ("blackhat", "multiscale"):
        res = remove_hair(hairy, method)
        assert (res.hair_mask & truth).sum() / truth.sum() > 0.9


# ------------------------------------------------------------------ the fast paths equal the formulas (issue 12)


def _reference_hair_mask(gray: np.ndarray) -> np.ndarray:
    """hair_mask_multiscale as first written: black-hat per kernel and a pixel scan per component."""
    smooth = cv2.GaussianBlur(gray, (3, 3), 0)
    response = np.zeros_like(smooth)
    for length in (9, 17):
        for i in range(12):
            closed = cv2.morphologyEx(smooth, cv2.MORPH_CLOSE, line_kernel(length, 180.0 * i / 12))
            np.maximum(response, cv2.subtract(closed, smooth), out=response)
    raw = (response > 12).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    min_area = max(8, int(0.00002 * raw.size))
    for lab in range(1, n):
        area = int(stats[lab, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        bw, bh = int(stats[lab, cv2.CC_STAT_WIDTH]), int(stats[lab, cv2.CC_STAT_HEIGHT])
        if area < 0.25 * bw * bh and max(bw, bh) > 20:
            keep[lab] = True
            continue
        x0, y0 = int(stats[lab, cv2.CC_STAT_LEFT]), int(stats[lab, cv2.CC_STAT_TOP])
        ys, xs = np.nonzero(labels[y0 : y0 + bh, x0 : x0 + bw] == lab)
        (_, _), (rw, rh), _ = cv2.minAreaRect(np.column_stack([xs, ys]).astype(np.float32))
        keep[lab] = max(rw, rh) / max(1.0, min(rw, rh)) >= 3.0
    mask = (keep[labels] * 255).astype(np.uint8)
    return np.asarray(cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))), dtype=np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hair_mask_equals_the_per_component_scan(seed: int) -> None:
    from dermnode.inference.artefacts import hair_mask_multiscale, luminance

    hairy, _ = _with_hair(_skin(seed=seed))
    rng = np.random.default_rng(seed)
    for _ in range(40):  # dots, blobs and short strokes: components kept and dropped by the elongation test
        x, y = (int(v) for v in rng.integers(10, 380, 2))
        if rng.random() < 0.5:
            cv2.circle(hairy, (x, y % 290), int(rng.integers(1, 6)), (40, 30, 25), -1)
        else:
            cv2.line(hairy, (x, y % 290), (x + int(rng.integers(-15, 15)), y % 290 + 4), (35, 25, 20), 2)
    cv2.circle(hairy, (200, 150), 30, (200, 160, 140), 2)  # a ring: a component with a hole
    cv2.circle(hairy, (200, 150), 5, (30, 20, 15), -1)  # ... and one inside its hole
    gray = luminance(hairy)
    assert np.array_equal(hair_mask_multiscale(gray), _reference_hair_mask(gray))


def test_cleaned_image_is_inpainted_on_demand_and_exact_within_a_region() -> None:
    img, _ = _vignette(_skin(360, 480))
    hairy, _ = _with_hair(img)
    res = remove_artefacts(hairy, AnalysisSettings(hair_removal="multiscale"))
    expected = remove_hair(res.framed, "multiscale").image
    box = (100, 260, 150, 330)
    part = res.image_within(box)
    y0, y1, x0, x1 = box
    assert np.array_equal(part[y0:y1, x0:x1], expected[y0:y1, x0:x1])
    assert not np.array_equal(part, expected)  # hair far outside the box is left alone
    assert np.array_equal(res.image, expected)
    assert res.image_within(box) is res.image  # once the whole image exists it is used
    with pytest.raises(ValueError):
        res.image_within((10, 10, 0, 5))
    plain = remove_artefacts(hairy, AnalysisSettings(hair_removal="none"))
    assert np.array_equal(plain.image_within(box), plain.framed) and np.array_equal(plain.image, plain.framed)
