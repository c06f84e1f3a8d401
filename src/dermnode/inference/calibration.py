"""Band calibration files: the cut-offs of the melanoma probability and what each band means.

A calibration file (JSON, written by ``dermnode calibrate`` or shipped beside the classifier as
``classifier.calibration.json``) holds the benign and malignant cut-offs chosen for a stated miss rate on
held-out labelled images, a temperature factor refitted on those images, and per band what it held there. The
service reads it at start-up, checks that it was made for the loaded classifier (same sha256), and every result
carries the band's meaning in words and the calibration's identity (name, date, sha256 of the file).

Format ``dermnode-band-calibration/1``::

    {"format": "dermnode-band-calibration/1", "name": "...", "created": "2026-12-02T12:00:00+00:00",
     "model": {"name": "classifier", "version": "2.0.0", "sha256": "..."},
     "temperature_factor": 1.0,            # the melanoma logit, already divided by the model's temperature,
                                           # is multiplied by this factor before the sigmoid
     "max_miss": 0.02, "min_specificity": 0.95,
     "cutoffs": {"benign_below": 0.05, "malignant_above": 0.6, "benign_below_ci": [..], "malignant_above_ci": [..]},
     "n_melanoma": 90, "n_other": 400, "missed_melanomas": 1, "miss_rate_upper95": 0.05,
     "bands": {"benign": {"n": .., "n_melanoma": .., "fraction_of_lesions": .., "melanoma_rate": ..,
                          "fraction_of_melanomas": ..}, "indeterminate": {...}, "malignant": {...}},
     "data": {...}}                        # free description of the images it rests on
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermnode.errors import ModelError
from dermnode.vocabulary import Band, ModelIdentity

FORMAT = "dermnode-band-calibration/1"


@dataclass(frozen=True)
class BandFacts:
    """What one band held on the calibration data."""

    n: int
    n_melanoma: int
    fraction_of_lesions: float
    melanoma_rate: float
    fraction_of_melanomas: float


@dataclass(frozen=True)
class BandCalibration:
    """A loaded calibration file.

    Parameters
    ----------
    name, created, sha256:
        Identity of the calibration (``sha256`` of the file's bytes).
    model:
        The classifier it was made for.
    temperature_factor:
        Multiplier of the temperature-scaled melanoma logit.
    benign_below, malignant_above:
        The cut-offs.
    max_miss, min_specificity:
        The promises the cut-offs were chosen for.
    n_melanoma, n_other, missed_melanomas, miss_rate_upper95:
        What the promise rests on.
    bands:
        Per-band facts on the calibration data.
    """

    name: str
    created: str
    sha256: str
    model: ModelIdentity
    temperature_factor: float
    benign_below: float
    malignant_above: float
    max_miss: float
    min_specificity: float
    n_melanoma: int
    n_other: int
    missed_melanomas: int
    miss_rate_upper95: float
    bands: dict[Band, BandFacts]

    def band(self, probability: float) -> Band:
        """The band of a calibrated melanoma probability."""
        if probability < self.benign_below:
            return Band.BENIGN
        if probability > self.malignant_above:
            return Band.MALIGNANT
        return Band.INDETERMINATE

    def meaning(self, band: Band) -> str:
        """What ``band`` means, in words a clinician reads (one sentence, numbers from the calibration data)."""
        f = self.bands[band]
        where = f"in validation ({self.name}: {self.n_melanoma} melanomas, {self.n_other} other lesions)"
        if band is Band.BENIGN:
            share = (
                f"1 in {round(self.n_melanoma / f.n_melanoma)} melanomas ({f.n_melanoma} of {self.n_melanoma})"
                if f.n_melanoma
                else f"none of the {self.n_melanoma} melanomas"
            )
            return (
                f"Low suspicion: {where}, {share} fell in this band, which held {f.fraction_of_lesions:.0%} of "
                f"all lesions. It does not exclude melanoma."
            )
        if band is Band.MALIGNANT:
            return (
                f"High suspicion: {where}, {f.melanoma_rate:.0%} of the lesions in this band were melanomas "
                f"({f.fraction_of_melanomas:.0%} of all melanomas); {self.min_specificity:.0%} of the other "
                f"lesions stayed below it."
            )
        return (
            f"Indeterminate: {where}, {f.fraction_of_lesions:.0%} of lesions fell in this band and "
            f"{f.melanoma_rate:.0%} of them were melanomas; the image alone does not settle it."
        )

    def identity_text(self) -> str:
        """``name (created, sha256 prefix)`` for reports."""
        return f"{self.name} ({self.created}, sha256 {self.sha256[:12]})"


def _facts(raw: Any) -> BandFacts:
    return BandFacts(
        n=int(raw["n"]),
        n_melanoma=int(raw["n_melanoma"]),
        fraction_of_lesions=float(raw["fraction_of_lesions"]),
        melanoma_rate=float(raw["melanoma_rate"]),
        fraction_of_melanomas=float(raw["fraction_of_melanomas"]),
    )


def load_calibration(path: Path, model: ModelIdentity | None = None) -> BandCalibration:
    """Read and check a calibration file.

    Parameters
    ----------
    path:
        The JSON file.
    model:
        The loaded classifier; when given, the calibration must have been made for it (same sha256).

    Returns
    -------
    BandCalibration
        The calibration.

    Raises
    ------
    ModelError
        When the file is missing, unreadable, of another format, inconsistent (cut-offs outside [0, 1] or
        crossed, bands missing) or made for another classifier.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = json.loads(data)
    except FileNotFoundError:
        raise ModelError(f"band calibration {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"band calibration {path} cannot be read: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelError(f"band calibration {path} is not a {FORMAT} file")
    try:
        m = raw["model"]
        cut = raw["cutoffs"]
        cal = BandCalibration(
            name=str(raw["name"]),
            created=str(raw["created"]),
            sha256=hashlib.sha256(data).hexdigest(),
            model=ModelIdentity(name=str(m["name"]), version=str(m["version"]), sha256=str(m["sha256"])),
            temperature_factor=float(raw.get("temperature_factor", 1.0)),
            benign_below=float(cut["benign_below"]),
            malignant_above=float(cut["malignant_above"]),
            max_miss=float(raw["max_miss"]),
            min_specificity=float(raw["min_specificity"]),
            n_melanoma=int(raw["n_melanoma"]),
            n_other=int(raw["n_other"]),
            missed_melanomas=int(raw["missed_melanomas"]),
            miss_rate_upper95=float(raw["miss_rate_upper95"]),
            bands={Band(k): _facts(v) for k, v in raw["bands"].items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"band calibration {path} is invalid: {exc!r}") from exc
    if not 0.0 <= cal.benign_below <= cal.malignant_above <= 1.0:
        raise ModelError(f"band calibration {path}: cut-offs {cal.benign_below} / {cal.malignant_above} are invalid")
    missing = sorted(b.value for b in set(Band) - set(cal.bands))
    if missing:
        raise ModelError(f"band calibration {path} lacks the bands {missing}")
    if not cal.temperature_factor > 0:
        raise ModelError(f"band calibration {path}: temperature_factor must be positive")
    if model is not None and model.sha256 != cal.model.sha256:
        raise ModelError(
            f"band calibration {path} was made for {cal.model.name} {cal.model.version} "
            f"(sha256 {cal.model.sha256[:12]}), not for the loaded {model.name} {model.version} "
            f"(sha256 {model.sha256[:12]}): recalibrate with `dermnode calibrate`"
        )
    return cal
