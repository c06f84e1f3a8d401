"""Drift watch: does each device's mix of bands still look like the data the cut-offs were chosen on?

A new dermoscope, a changed white balance or a firmware update moves the melanoma probabilities (the robustness
run in ``docs/robustness.md`` saw 30 of 148 cases change band under a gamma shift) long before anyone notices a
missed melanoma. :class:`DriftMonitor` keeps, per device (the calling AE title of the association that sent the
image), a rolling window of the last ``window`` results and compares the window's band counts with the band
fractions of the active calibration (:class:`~dermnode.inference.calibration.BandCalibration`) by Pearson's
chi-square goodness-of-fit test with 2 degrees of freedom. When the window holds at least ``min_count`` results
and the test's p-value falls below ``alpha`` (default 0.001, i.e. a false alarm about once in a thousand full
windows of an unchanged device), the device is flagged: a warning is logged once when the flag is raised and
once when it clears, and the state is exported in ``/metrics``.

The expectation is the calibration data's case mix. A clinic whose case mix differs (fewer melanomas, say) will
see the flag until it calibrates on its own images with ``dermnode calibrate``, which is the point: the cut-offs'
promises were measured on that mix.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from scipy.stats import chi2 as chi2_dist  # imported with the module: the first job must not pay ~1 s for it

from dermnode.vocabulary import Band

logger = logging.getLogger(__name__)

BANDS = (Band.BENIGN, Band.INDETERMINATE, Band.MALIGNANT)


@dataclass(frozen=True)
class DeviceDrift:
    """The drift state of one device."""

    device: str
    n: int
    fractions: dict[Band, float]
    mean_probability: float
    chi2: float
    p_value: float
    drifting: bool


def chi_square_p_value(observed: list[int], expected_fractions: list[float]) -> tuple[float, float]:
    """Pearson's chi-square goodness-of-fit statistic and p-value (``len - 1`` degrees of freedom).

    Parameters
    ----------
    observed:
        Counts per category.
    expected_fractions:
        Expected fraction per category (summing to 1); a category with an expected fraction of 0 is merged
        into the statistic only when observed (it makes the statistic infinite, p = 0).

    Returns
    -------
    tuple of float
        ``(chi2, p_value)``.

    Raises
    ------
    ValueError
        When the lengths differ or nothing was observed.
    """
    if len(observed) != len(expected_fractions):
        raise ValueError("observed and expected differ in length")
    n = sum(observed)
    if n <= 0:
        raise ValueError("nothing observed")
    chi2 = 0.0
    for o, f in zip(observed, expected_fractions, strict=True):
        e = n * f
        if e <= 0:
            if o > 0:
                return float("inf"), 0.0
            continue
        chi2 += (o - e) ** 2 / e
    return chi2, float(chi2_dist.sf(chi2, len(observed) - 1))


class DriftMonitor:
    """Rolling band statistics per device, compared with the calibration's expectation (thread-safe).

    Parameters
    ----------
    expected:
        Expected fraction of lesions per band (from the calibration data).
    window:
        Results kept per device.
    min_count:
        Results needed before a device can be flagged.
    alpha:
        p-value below which the mix counts as drifted.
    """

    def __init__(
        self, expected: dict[Band, float], *, window: int = 200, min_count: int = 50, alpha: float = 0.001
    ) -> None:
        total = sum(expected.get(b, 0.0) for b in BANDS)
        if total <= 0:
            raise ValueError("expected band fractions must sum to more than 0")
        self.expected = {b: expected.get(b, 0.0) / total for b in BANDS}
        self.window, self.min_count, self.alpha = window, min_count, alpha
        self._results: dict[str, deque[tuple[Band, float]]] = {}
        self._flagged: set[str] = set()
        self._lock = threading.Lock()

    def record(self, device: str, band: Band, probability: float) -> DeviceDrift:
        """Add one analysed result of ``device`` and return the device's state (logs when the flag changes)."""
        with self._lock:
            q = self._results.setdefault(device, deque(maxlen=self.window))
            q.append((band, probability))
            state = self._state(device, q)
            was = device in self._flagged
            if state.drifting and not was:
                self._flagged.add(device)
                logger.warning(
                    "band mix of device %r departs from the calibration (chi2 %.1f, p %.2g over the last %d results: "
                    "%s): check the dermoscope and its settings, or recalibrate with `dermnode calibrate`",
                    device, state.chi2, state.p_value, state.n,
                    ", ".join(f"{b.value} {state.fractions[b]:.0%} (expected {self.expected[b]:.0%})" for b in BANDS),
                )
            elif was and not state.drifting:
                self._flagged.discard(device)
                logger.info("band mix of device %r is back within the calibration's expectation", device)
            return state

    def _state(self, device: str, q: deque[tuple[Band, float]]) -> DeviceDrift:
        n = len(q)
        counts = [sum(1 for b, _ in q if b is band) for band in BANDS]
        chi2, p = chi_square_p_value(counts, [self.expected[b] for b in BANDS])
        return DeviceDrift(
            device=device,
            n=n,
            fractions={b: c / n for b, c in zip(BANDS, counts, strict=True)},
            mean_probability=sum(p_ for _, p_ in q) / n,
            chi2=chi2,
            p_value=p,
            drifting=n >= self.min_count and p < self.alpha,
        )

    def snapshot(self) -> list[DeviceDrift]:
        """The state of every device seen, sorted by device name."""
        with self._lock:
            return [self._state(d, q) for d, q in sorted(self._results.items()) if q]
