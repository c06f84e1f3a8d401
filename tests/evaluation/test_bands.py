"""Band cut-offs: the stated miss rate and specificity are met exactly on the data they were chosen on."""

from __future__ import annotations

import numpy as np
import pytest

from dermnode.evaluation.bands import (
    TooFewCasesError,
    band_of,
    choose_cutoffs,
    clopper_pearson_upper,
    minimum_melanomas,
)


def _scores(n_mel: int, n_other: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.beta(5, 2, n_mel), rng.beta(2, 5, n_other)])
    y = np.concatenate([np.ones(n_mel, int), np.zeros(n_other, int)])
    return p, y


def test_cutoffs_hit_the_stated_miss_rate_and_specificity() -> None:
    p, y = _scores(200, 800)
    c = choose_cutoffs(p, y, n_bootstrap=200)
    mel, other = p[y == 1], p[y == 0]
    assert int((mel < c.benign_below).sum()) == 4 == c.missed_melanomas  # floor(2 % of 200)
    # the highest such threshold: any higher melanoma probability would let a fifth melanoma through
    assert np.sort(mel)[4] == c.benign_below
    assert int((other > c.malignant_above).sum()) == 40  # floor(5 % of 800)
    assert c.specificity == pytest.approx(0.95)
    assert c.benign_below_ci[0] <= c.benign_below <= c.benign_below_ci[1]
    assert c.malignant_above_ci[0] <= c.malignant_above <= c.malignant_above_ci[1]
    assert sum(b.n for b in c.bands) == 1000
    assert sum(b.fraction_of_melanomas for b in c.bands) == pytest.approx(1.0)
    benign = next(b for b in c.bands if b.band == "benign")
    assert benign.fraction_of_melanomas == pytest.approx(0.02)
    assert c.miss_rate == pytest.approx(0.02)
    assert 0.02 < c.miss_rate_upper95 < 0.06


def test_too_few_melanomas_are_refused_with_the_number_needed() -> None:
    p, y = _scores(49, 500)
    with pytest.raises(TooFewCasesError, match=r"49 melanomas .* at least 50"):
        choose_cutoffs(p, y)
    assert minimum_melanomas(0.02) == 50
    p, y = _scores(60, 10)
    with pytest.raises(TooFewCasesError, match="at least 20"):
        choose_cutoffs(p, y)


def test_band_of_and_bounds() -> None:
    bands = band_of(np.array([0.01, 0.5, 0.99]), 0.1, 0.9)
    assert bands.tolist() == ["benign", "indeterminate", "malignant"]
    assert clopper_pearson_upper(0, 150) == pytest.approx(0.0198, abs=2e-4)  # the rule of three, exactly
    with pytest.raises(ValueError):
        clopper_pearson_upper(3, 2)


def test_a_separating_model_leaves_no_overlap() -> None:
    p = np.concatenate([np.linspace(0.8, 1.0, 60), np.linspace(0.0, 0.2, 60)])
    y = np.concatenate([np.ones(60, int), np.zeros(60, int)])
    c = choose_cutoffs(p, y, n_bootstrap=50)
    assert c.benign_below <= c.malignant_above
    assert c.missed_melanomas <= 1
