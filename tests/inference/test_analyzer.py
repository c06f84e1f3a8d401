"""The joined analysis stages, in particular images larger than the analysis working size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dermnode.inference.analyzer import ANALYSIS_MAX_SIDE, Analyzer, working_copy
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import AnalysisStatus, PixelSpacing, SourceImage, SpacingSource
from synthetic import synthetic_dermoscopy


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(AnalysisSettings())


def _source(rgb: np.ndarray, spacing: PixelSpacing | None) -> SourceImage:
    return SourceImage(rgb, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.7", "1.2.3", "1.2.3.5", spacing)


def test_working_copy_keeps_small_images_and_scales_large_ones() -> None:
    small = np.zeros((600, 800, 3), np.uint8)
    spacing = PixelSpacing(0.02, 0.02, SpacingSource.PIXEL_SPACING)
    img, sp, scale = working_copy(small, spacing)
    assert img is small and sp == spacing and scale == 1.0
    big = np.zeros((3000, 4000, 3), np.uint8)
    img, sp, scale = working_copy(big, spacing)
    assert img.shape == (1536, ANALYSIS_MAX_SIDE, 3) and scale == ANALYSIS_MAX_SIDE / 4000
    assert sp is not None and sp.source is SpacingSource.PIXEL_SPACING
    assert sp.row_mm == pytest.approx(0.02 * 3000 / 1536) and sp.column_mm == pytest.approx(0.02 * 4000 / 2048)
    assert working_copy(big, None)[1] is None
    with pytest.raises(ValueError):
        working_copy(big, spacing, max_side=0)


def test_a_large_image_is_analysed_at_working_size_and_reported_at_source_size(analyzer: Analyzer) -> None:
    h, w = 2700, 3600  # 4:3, above ANALYSIS_MAX_SIDE
    rgb = synthetic_dermoscopy(h, w, seed=3)
    spacing = PixelSpacing(0.01, 0.01, SpacingSource.PIXEL_SPACING)
    result = analyzer.analyze(_source(rgb, spacing))
    assert result.status is AnalysisStatus.ANALYSED
    assert result.mask is not None and result.mask.shape == (h, w)
    assert result.probability_map is not None and result.probability_map.shape == (h, w)
    m = result.measurements
    assert m is not None
    # the drawn ellipse: semi-axes 0.22 h and 0.18 w
    true_area = math.pi * 0.22 * h * 0.18 * w
    assert m.area_px == int(result.mask.sum())
    assert m.area_px == pytest.approx(true_area, rel=0.06)
    assert m.area_mm2 == pytest.approx(m.area_px * 0.01 * 0.01)
    true_diameter = 2 * max(0.22 * h, 0.18 * w)
    assert m.max_diameter_px == pytest.approx(true_diameter, rel=0.06)
    assert m.max_diameter_mm == pytest.approx(true_diameter * 0.01, rel=0.06)
    assert m.perimeter_mm == pytest.approx(m.perimeter_px * 0.01, rel=0.02)
    # the same image analysed at a size below the limit gives the same physical answer
    small = synthetic_dermoscopy(h // 2, w // 2, seed=3)
    ref = analyzer.analyze(_source(small, PixelSpacing(0.02, 0.02, SpacingSource.PIXEL_SPACING)))
    assert ref.measurements is not None and ref.measurements.area_mm2 is not None and m.area_mm2 is not None
    assert m.area_mm2 == pytest.approx(ref.measurements.area_mm2, rel=0.04)
    assert m.asymmetry == pytest.approx(ref.measurements.asymmetry, abs=0.05)
