"""The analysis stages of one source image, joined: gate → artefacts → segmentation → measurements →
classification.

Each stage is a typed function of its own module; :class:`Analyzer` holds the loaded models and runs the
stages in order, timing each one. A failed gate or an empty segmentation ends the analysis with status
``not_analysable`` and a reason; no diagnosis is produced then.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dermnode.errors import ModelError
from dermnode.inference.artefacts import remove_artefacts
from dermnode.inference.classification import Classifier
from dermnode.inference.measurements import measure
from dermnode.inference.quality import assess_quality
from dermnode.inference.registry import load_model_bundle
from dermnode.inference.segmentation import Segmenter
from dermnode.inference.types import AnalysisResult, AnalysisStatus, ModelIdentity, SourceImage
from dermnode.settings import AnalysisSettings

logger = logging.getLogger(__name__)

SHIPPED_MODELS = Path(__file__).resolve().parents[3] / "models"


def models_dir(settings: AnalysisSettings) -> Path:
    """The configured models folder, or the one shipped with dermnode."""
    return Path(settings.models_dir) if settings.models_dir else SHIPPED_MODELS


class Analyzer:
    """Loaded models plus the stage sequence.

    Parameters
    ----------
    settings:
        ``[analysis]`` settings.

    Raises
    ------
    ModelError
        When a model is missing, corrupt or does not match its manifest (the service refuses to start).
    """

    def __init__(self, settings: AnalysisSettings) -> None:
        self.settings = settings
        directory = models_dir(settings)
        if not directory.is_dir():
            raise ModelError(f"models folder {directory} does not exist")
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.segmenter = Segmenter(load_model_bundle(directory, "segmentation"))
        self.classifier = Classifier(directory, settings)
        self.models: tuple[ModelIdentity, ...] = (self.segmenter.identity, self.classifier.identity)
        logger.info(
            "models loaded: %s",
            ", ".join(f"{m.name} {m.version} sha256:{m.sha256[:12]}" for m in self.models),
        )

    def analyze(self, source: SourceImage) -> AnalysisResult:
        """Run every stage on ``source``; never raises for an unusable image (that is a result)."""
        timings: dict[str, float] = {}
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round((now - t) * 1000.0, 2)
            t = now

        quality = assess_quality(source.rgb)
        lap("gate")
        if not quality.usable:
            return AnalysisResult(source, AnalysisStatus.NOT_ANALYSABLE, quality.reason, self.models, quality,
                                  timings_ms=timings)
        cleaned = remove_artefacts(source.rgb, self.settings)
        lap("artefacts")
        seg = self.segmenter.segment(cleaned.image, cleaned.frame.valid_mask)
        lap("segmentation")
        if seg.empty:
            return AnalysisResult(source, AnalysisStatus.NOT_ANALYSABLE, "no lesion found in the image",
                                  self.models, quality, probability_map=seg.probability, timings_ms=timings)
        measurements = measure(seg.mask, cleaned.image, source.spacing)
        lap("measurements")
        classification = self.classifier.classify(cleaned.image, seg.mask)
        lap("classification")
        return AnalysisResult(
            source=source,
            status=AnalysisStatus.ANALYSED,
            reason=None,
            models=self.models,
            quality=quality,
            mask=seg.mask,
            probability_map=seg.probability,
            measurements=measurements,
            classification=classification,
            timings_ms=timings,
        )
