"""``dermnode evaluate``: the shipped models measured on a labelled folder.

A folder laid out like ``../shared/data/<set>`` (``images/``, ``masks/``, ``labels.csv``) is evaluated in one
of two ways, and the metrics are written to ``metrics.json`` in the output folder, beside the per-task files and
PNGs:

* the training sets (``isic2017``, ``isic-9class`` or the data root holding them): each network on its own, as
  the model cards report it — segmentation when there are masks (:mod:`~dermnode.evaluation.segmentation`),
  classification on ground-truth lesion crops (:mod:`~dermnode.evaluation.classification`);
* any other folder (another clinic, another dermoscope), or any folder with ``task="pipeline"``: the whole
  production analyser on every image, classification on the *predicted* lesion
  (:mod:`~dermnode.evaluation.pipeline`), metrics under ``"pipeline"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dermnode.errors import PipelineError
from dermnode.evaluation.classification import evaluate_classification
from dermnode.evaluation.pipeline import evaluate_pipeline
from dermnode.evaluation.segmentation import evaluate_segmentation
from dermnode.inference.analyzer import models_dir
from dermnode.settings import Settings
from dermnode.training.classification import is_training_dataset

logger = logging.getLogger(__name__)


def evaluate(data_dir: Path, split: str, settings: Settings, out_dir: Path, *, task: str = "all") -> dict[str, Any]:
    """Evaluate segmentation and/or classification and write ``out_dir/metrics.json``.

    Parameters
    ----------
    data_dir:
        The labelled folder.
    split:
        Split to evaluate (``"all"``: every row; a folder without a ``split`` column is evaluated whole).
    settings:
        Settings (models folder, analysis options).
    out_dir:
        Output folder.
    task:
        ``"all"``, ``"segmentation"``, ``"classification"`` or ``"pipeline"`` (the production analyser end to
        end; also what ``"all"`` does on a folder that is not one of the training sets).

    Returns
    -------
    dict
        The document written to ``metrics.json``.

    Raises
    ------
    PipelineError
        When the folder has nothing the requested task can be evaluated on.
    ModelError
        When a model cannot be loaded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    directory = models_dir(settings.analysis)
    metrics: dict[str, Any] = {"data": str(data_dir), "split": split}
    if task == "pipeline" or (task == "all" and not is_training_dataset(data_dir)):
        metrics["pipeline"] = evaluate_pipeline(data_dir, split, settings.analysis, out_dir)
        metrics["split"] = metrics["pipeline"].get("split_evaluated", split)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
        return metrics
    if task in ("all", "segmentation") and (data_dir / "masks").is_dir():
        metrics["segmentation"] = evaluate_segmentation(
            data_dir, split, directory, out_dir, hair_removal=settings.analysis.hair_removal
        )
    if task in ("all", "classification"):
        try:
            metrics["classification"] = evaluate_classification(data_dir, split, directory, out_dir)
        except PipelineError as exc:
            if task == "classification":
                raise
            logger.warning("classification not evaluated: %s", exc)
    if "segmentation" not in metrics and "classification" not in metrics:
        raise PipelineError(f"nothing to evaluate in {data_dir} for task {task!r} (no masks or labels)")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
    return metrics
