"""Drift watch: a device whose band mix shifts is flagged; one that keeps the calibration's mix is not."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dermnode.drift import BANDS, DriftMonitor, chi_square_p_value
from dermnode.vocabulary import Band

EXPECTED = {Band.BENIGN: 0.45, Band.INDETERMINATE: 0.45, Band.MALIGNANT: 0.10}


def _stream(fractions: tuple[float, float, float], n: int, seed: int) -> list[Band]:
    rng = np.random.default_rng(seed)
    return [BANDS[i] for i in rng.choice(3, size=n, p=fractions)]


def test_unshifted_device_is_never_flagged() -> None:
    mon = DriftMonitor(EXPECTED)
    states = [mon.record("SCOPE_A", b, 0.3) for b in _stream((0.45, 0.45, 0.10), 600, seed=1)]
    assert not any(s.drifting for s in states)
    assert states[-1].n == 200  # the rolling window


def test_shifted_device_is_flagged_once_and_cleared(caplog: pytest.LogCaptureFixture) -> None:
    mon = DriftMonitor(EXPECTED)
    for b in _stream((0.45, 0.45, 0.10), 200, seed=2):
        mon.record("SCOPE_B", b, 0.3)
    caplog.set_level(logging.INFO, logger="dermnode.drift")
    shifted = [mon.record("SCOPE_B", b, 0.6) for b in _stream((0.10, 0.55, 0.35), 200, seed=3)]
    assert shifted[-1].drifting and shifted[-1].p_value < 1e-6
    assert shifted[-1].fractions[Band.MALIGNANT] > 0.25
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SCOPE_B" in warnings[0].getMessage()
    # the device is fixed: once the window holds the old mix again the flag clears (logged once)
    back = [mon.record("SCOPE_B", b, 0.3) for b in _stream((0.45, 0.45, 0.10), 200, seed=4)]
    assert not back[-1].drifting
    assert sum("back within" in r.getMessage() for r in caplog.records) == 1
    # another device is judged on its own window
    assert [s.device for s in mon.snapshot()] == ["SCOPE_B"]


def test_too_few_results_never_flag() -> None:
    mon = DriftMonitor(EXPECTED, min_count=50)
    states = [mon.record("X", Band.MALIGNANT, 0.99) for _ in range(49)]
    assert not any(s.drifting for s in states)
    assert mon.record("X", Band.MALIGNANT, 0.99).drifting


def test_chi_square() -> None:
    chi2, p = chi_square_p_value([45, 45, 10], [0.45, 0.45, 0.10])
    assert chi2 == 0.0 and p == pytest.approx(1.0)
    chi2, p = chi_square_p_value([10, 10, 80], [0.45, 0.45, 0.10])
    assert p < 1e-10
    assert chi_square_p_value([1, 0], [1.0, 0.0]) == (0.0, pytest.approx(1.0))
    assert chi_square_p_value([0, 1], [1.0, 0.0]) == (float("inf"), 0.0)
    with pytest.raises(ValueError):
        chi_square_p_value([0, 0], [0.5, 0.5])
