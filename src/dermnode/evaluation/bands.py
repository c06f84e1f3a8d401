"""Triage band cut-offs chosen for a stated miss rate, with bootstrap confidence intervals.

The melanoma probability is cut into three bands: ``benign`` (p below the benign cut-off), ``malignant``
(p above the malignant cut-off) and ``indeterminate`` in between. The cut-offs are not round numbers but
promises measured on held-out data:

* the **benign cut-off** is the highest threshold below which at most ``max_miss`` (2 %) of the melanomas fall:
  with ``n`` melanomas, ``k = floor(max_miss * n)`` of them may lie below it, so it is the ``(k+1)``-th
  smallest melanoma probability (exactly ``k`` melanomas are strictly below);
* the **malignant cut-off** is the lowest threshold above which the non-melanomas keep a specificity of at least
  ``min_specificity`` (95 %): with ``m`` non-melanomas, ``j = floor((1 - min_specificity) * m)`` of them may lie
  above it, so it is the ``(j+1)``-th largest non-melanoma probability (exactly ``j`` lie strictly above).

A miss rate of 2 % can only be stated when it rests on enough melanomas: with fewer than ``1 / max_miss`` (50)
no melanoma at all may fall below the cut-off and the promise is not supported by the data
(:class:`TooFewCasesError` says how many are needed). Every report carries the exact (Clopper-Pearson) 95 %
upper bound of the miss rate, so a reader sees how much the promise rests on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_MAX_MISS = 0.02
DEFAULT_MIN_SPECIFICITY = 0.95


class TooFewCasesError(ValueError):
    """The labelled set cannot support the stated miss rate or specificity."""


@dataclass(frozen=True)
class BandStats:
    """What one band holds on the data the cut-offs were chosen on."""

    band: str
    n: int
    n_melanoma: int
    fraction_of_lesions: float
    melanoma_rate: float  # melanomas in the band / lesions in the band
    fraction_of_melanomas: float  # melanomas in the band / all melanomas


@dataclass(frozen=True)
class Cutoffs:
    """Chosen cut-offs, their bootstrap 95 % intervals and what they rest on."""

    benign_below: float
    malignant_above: float
    benign_below_ci: tuple[float, float]
    malignant_above_ci: tuple[float, float]
    max_miss: float
    min_specificity: float
    n_melanoma: int
    n_other: int
    missed_melanomas: int  # melanomas strictly below the benign cut-off
    miss_rate: float
    miss_rate_upper95: float  # exact one-sided 95 % upper bound (Clopper-Pearson)
    specificity: float
    benign_fraction_of_benign_lesions: float
    bands: tuple[BandStats, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON document (lists for tuples)."""
        d = asdict(self)
        d["benign_below_ci"] = list(self.benign_below_ci)
        d["malignant_above_ci"] = list(self.malignant_above_ci)
        d["bands"] = [asdict(b) for b in self.bands]
        return d


def minimum_melanomas(max_miss: float) -> int:
    """Fewest melanomas on which a miss rate of ``max_miss`` can be stated (``ceil(1 / max_miss)``)."""
    return math.ceil(1.0 / max_miss - 1e-9)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound of a binomial proportion with ``k`` events in ``n`` trials.

    Parameters
    ----------
    k, n : int
        Events and trials (``0 <= k <= n``, ``n > 0``).
    confidence : float
        One-sided confidence level.

    Returns
    -------
    float
        The upper bound.

    Raises
    ------
    ValueError
        When the counts are impossible.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"invalid counts k={k}, n={n}")
    if k == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


def _raw_cutoffs(
    p_mel: npt.NDArray[np.float64], p_other: npt.NDArray[np.float64], max_miss: float, min_specificity: float
) -> tuple[float, float]:
    k = math.floor(max_miss * len(p_mel) + 1e-9)
    j = math.floor((1.0 - min_specificity) * len(p_other) + 1e-9)
    benign = float(np.sort(p_mel)[k])
    malignant = float(np.sort(p_other)[::-1][j])
    return benign, malignant


def band_of(p: npt.NDArray[np.float64], benign_below: float, malignant_above: float) -> npt.NDArray[np.str_]:
    """Band names of probabilities ``p`` (``benign`` below, ``malignant`` above, ``indeterminate`` between)."""
    out = np.full(p.shape, "indeterminate", dtype="<U13")
    out[p < benign_below] = "benign"
    out[p > malignant_above] = "malignant"
    return out


def choose_cutoffs(
    probabilities: npt.ArrayLike,
    melanoma: npt.ArrayLike,
    *,
    max_miss: float = DEFAULT_MAX_MISS,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> Cutoffs:
    """Choose the benign and malignant cut-offs (see the module docstring) and describe the bands.

    Parameters
    ----------
    probabilities : array-like
        Calibrated melanoma probabilities of held-out lesions.
    melanoma : array-like
        1 for melanoma, 0 otherwise.
    max_miss : float
        Largest fraction of melanomas allowed in the benign band.
    min_specificity : float
        Smallest specificity of the malignant band.
    n_bootstrap : int
        Bootstrap resamples (cases drawn with replacement) for the 95 % intervals of the cut-offs.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    Cutoffs
        Cut-offs, intervals, the miss rate with its upper bound, and per-band statistics.

    Raises
    ------
    TooFewCasesError
        With fewer melanomas than :func:`minimum_melanomas` or fewer non-melanomas than
        ``ceil(1 / (1 - min_specificity))``; the message says how many are needed.
    ValueError
        When the inputs differ in length or hold probabilities outside [0, 1].
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(melanoma).astype(int)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError("probabilities and labels must be 1-D arrays of one length")
    if p.size and (p.min() < 0 or p.max() > 1 or not np.isfinite(p).all()):
        raise ValueError("probabilities must lie in [0, 1]")
    p_mel, p_other = p[y == 1], p[y == 0]
    need_mel = minimum_melanomas(max_miss)
    need_other = minimum_melanomas(1.0 - min_specificity)
    if len(p_mel) < need_mel:
        raise TooFewCasesError(
            f"{len(p_mel)} melanomas cannot support a miss rate of {max_miss:.1%}: at least {need_mel} are needed "
            f"(so that one missed melanoma is {max_miss:.1%} of them)"
        )
    if len(p_other) < need_other:
        raise TooFewCasesError(
            f"{len(p_other)} non-melanomas cannot support a specificity of {min_specificity:.0%}: "
            f"at least {need_other} are needed"
        )
    benign, malignant = _raw_cutoffs(p_mel, p_other, max_miss, min_specificity)
    benign = min(benign, malignant)  # a model that separates well leaves no indeterminate band, never overlaps
    rng = np.random.default_rng(seed)
    boot_b, boot_m = [], []
    for _ in range(n_bootstrap):
        bm = p_mel[rng.integers(0, len(p_mel), len(p_mel))]
        bo = p_other[rng.integers(0, len(p_other), len(p_other))]
        b, m = _raw_cutoffs(bm, bo, max_miss, min_specificity)
        boot_b.append(min(b, m))
        boot_m.append(m)
    bands = band_of(p, benign, malignant)
    stats = []
    for name in ("benign", "indeterminate", "malignant"):
        inside = bands == name
        n_in, mel_in = int(inside.sum()), int((inside & (y == 1)).sum())
        stats.append(
            BandStats(
                band=name,
                n=n_in,
                n_melanoma=mel_in,
                fraction_of_lesions=n_in / len(p),
                melanoma_rate=mel_in / n_in if n_in else 0.0,
                fraction_of_melanomas=mel_in / len(p_mel),
            )
        )
    missed = int((p_mel < benign).sum())
    return Cutoffs(
        benign_below=benign,
        malignant_above=malignant,
        benign_below_ci=(float(np.percentile(boot_b, 2.5)), float(np.percentile(boot_b, 97.5))),
        malignant_above_ci=(float(np.percentile(boot_m, 2.5)), float(np.percentile(boot_m, 97.5))),
        max_miss=max_miss,
        min_specificity=min_specificity,
        n_melanoma=len(p_mel),
        n_other=len(p_other),
        missed_melanomas=missed,
        miss_rate=missed / len(p_mel),
        miss_rate_upper95=clopper_pearson_upper(missed, len(p_mel)),
        specificity=float((p_other <= malignant).mean()),
        benign_fraction_of_benign_lesions=float((p_other < benign).mean()),
        bands=tuple(stats),
    )
