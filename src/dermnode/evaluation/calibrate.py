"""``dermnode calibrate``: refit the melanoma temperature and the band cut-offs on a clinic's labelled images.

The production analyser runs on every image of the folder (exactly as :func:`dermnode.evaluation.pipeline.
evaluate_pipeline` does for ``dermnode evaluate``), without any band calibration. The melanoma probabilities of
the analysed images with a melanoma label are turned back into logits, a temperature factor is fitted on them
(negative log-likelihood), and the cut-offs are chosen on the refitted probabilities for the stated miss rate
(:func:`dermnode.evaluation.bands.choose_cutoffs`). The file it writes is read by the service
(:mod:`dermnode.inference.calibration`) when ``analysis.calibration`` points at it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dermnode.evaluation.bands import DEFAULT_MAX_MISS, DEFAULT_MIN_SPECIFICITY, choose_cutoffs
from dermnode.evaluation.classification_metrics import expected_calibration_error, fit_temperature
from dermnode.evaluation.pipeline import evaluate_pipeline
from dermnode.inference.calibration import FORMAT
from dermnode.inference.imaging import logit, sigmoid
from dermnode.settings import AnalysisSettings

logger = logging.getLogger(__name__)


def calibration_document(
    probabilities: np.ndarray,
    melanoma: np.ndarray,
    model: dict[str, str],
    *,
    name: str,
    data: dict[str, Any],
    max_miss: float = DEFAULT_MAX_MISS,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
    refit_temperature: bool = True,
) -> dict[str, Any]:
    """The calibration file's content for uncalibrated melanoma probabilities of labelled lesions.

    Parameters
    ----------
    probabilities:
        Melanoma probabilities from the model with its own temperature and no band calibration.
    melanoma:
        1 for melanoma, 0 otherwise.
    model:
        ``{"name", "version", "sha256"}`` of the classifier.
    name:
        Name of the calibration (site, device, date ...).
    data:
        Description of the images (folder, split, counts) stored with it.
    max_miss, min_specificity:
        The promises of the benign and malignant cut-offs.
    refit_temperature:
        Fit a temperature factor on these data (else keep the model's calibration, factor 1).

    Returns
    -------
    dict
        The ``dermnode-band-calibration/1`` document.

    Raises
    ------
    dermnode.evaluation.bands.TooFewCasesError
        When the data cannot support the stated miss rate or specificity.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(melanoma).astype(int)
    z = logit(p)
    factor = 1.0 / fit_temperature(z, y) if refit_temperature else 1.0
    p_cal = sigmoid(z * factor)
    cut = choose_cutoffs(p_cal, y, max_miss=max_miss, min_specificity=min_specificity)
    doc = cut.to_json()
    bands = {b["band"]: {k: v for k, v in b.items() if k != "band"} for b in doc.pop("bands")}
    return {
        "format": FORMAT,
        "name": name,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "model": model,
        "temperature_factor": factor,
        "max_miss": max_miss,
        "min_specificity": min_specificity,
        "cutoffs": {
            "benign_below": doc.pop("benign_below"),
            "malignant_above": doc.pop("malignant_above"),
            "benign_below_ci": doc.pop("benign_below_ci"),
            "malignant_above_ci": doc.pop("malignant_above_ci"),
        },
        **{k: v for k, v in doc.items() if k not in ("max_miss", "min_specificity")},
        "bands": bands,
        "ece_before": expected_calibration_error(y, p),
        "ece_after": expected_calibration_error(y, p_cal),
        "data": data,
    }


def calibrate(
    data_dir: Path,
    split: str,
    settings: AnalysisSettings,
    out_file: Path,
    *,
    name: str | None = None,
    max_miss: float = DEFAULT_MAX_MISS,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the analyser on a labelled folder and write a band calibration file for it.

    Parameters
    ----------
    data_dir:
        Labelled folder in the layout ``dermnode evaluate`` reads (``images/``, ``labels.csv``).
    split:
        ``split`` value to use (``"all"``: every row).
    settings:
        ``[analysis]`` settings of the service (models, pre-processing); any band calibration in them is
        ignored.
    out_file:
        The calibration file to write.
    name:
        Name of the calibration (default: the folder's name and the date).
    max_miss, min_specificity:
        The promises of the cut-offs.
    work_dir:
        Where the analyser's per-image results go (default: a temporary folder).

    Returns
    -------
    dict
        The written document.

    Raises
    ------
    dermnode.evaluation.bands.TooFewCasesError
        When the labelled images cannot support the stated miss rate (the message says how many melanomas would
        be needed).
    dermnode.errors.PipelineError
        When the folder holds no images or labels.
    """
    raw_settings = dataclasses.replace(settings, calibration="none")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(work_dir) if work_dir is not None else Path(tmp)
        doc = evaluate_pipeline(Path(data_dir), split, raw_settings, out)
        with open(out / "per_image.csv", newline="", encoding="utf-8") as fh:
            rows = [
                r
                for r in csv.DictReader(fh)
                if r.get("melanoma_probability") not in (None, "") and r.get("melanoma_label") in ("0", "1")
            ]
    p = np.array([float(r["melanoma_probability"]) for r in rows])
    y = np.array([int(r["melanoma_label"]) for r in rows])
    classifier = next((m for m in doc["models"] if m["name"] == "classifier"), doc["models"][-1])
    today = dt.date.today().isoformat()
    result = calibration_document(
        p,
        y,
        {k: str(classifier[k]) for k in ("name", "version", "sha256")},
        name=name or f"{Path(data_dir).name} {today}",
        data={
            "folder": str(data_dir),
            "split": doc.get("split_evaluated", split),
            "coverage": doc["coverage"],
            "n_scored": len(rows),
        },
        max_miss=max_miss,
        min_specificity=min_specificity,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "calibration %s: benign below %.4f, malignant above %.4f on %d melanomas / %d others",
        out_file,
        result["cutoffs"]["benign_below"],
        result["cutoffs"]["malignant_above"],
        result["n_melanoma"],
        result["n_other"],
    )
    return result
