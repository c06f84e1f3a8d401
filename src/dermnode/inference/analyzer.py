"""The analysis stages of one source image, joined: gate → artefacts → segmentation → measurements →
classification.

Each stage is a typed function of its own module; :class:`Analyzer` holds the loaded models and runs the
stages in order, timing each one. The segmentation and classification networks get the image as they were
trained on it (with its hair; the dermoscope frame filled and masked out): artefact removal (hair inpainting) serves the
measurements of colour and border only. A failed gate or an empty segmentation ends the analysis with status
``not_analysable`` and a reason; no diagnosis is produced then.

Images larger than :data:`ANALYSIS_MAX_SIDE` on their longer side (dermoscopes send up to ~6000 px) are analysed
on a copy reduced to that size (area interpolation; pixel spacing scaled to match), which is finer than any
stage needs (the segmentation network works at 160-256 px, the classifier crop at 160 px). The mask and the
probability map are returned at the source resolution; ``area_px`` counts the source-resolution mask's pixels
(so ``area_mm2`` agrees with the DICOM SEG) and the other pixel lengths are converted to source pixels. Without
the reduction a 6000 x 4500 image took several seconds and ~0.6 GB more memory (hair inpainting, crops,
measurements at 27 megapixels).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.errors import ModelError
from dermnode.inference.artefacts import remove_artefacts
from dermnode.inference.classification import Classifier
from dermnode.inference.imaging import resize_max_side
from dermnode.inference.measurements import measure, measurement_box
from dermnode.inference.networks import load_network
from dermnode.inference.quality import assess_quality
from dermnode.inference.segmentation import Segmenter
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import (
    AnalysisResult,
    AnalysisStatus,
    Measurements,
    ModelIdentity,
    PixelSpacing,
    SourceImage,
)

logger = logging.getLogger(__name__)

#: The models shipped inside the package (package data: found from a wheel install as from a checkout).
SHIPPED_MODELS = Path(str(importlib.resources.files("dermnode") / "models"))
#: Longer side, in pixels, above which an image is analysed on a reduced copy (see the module docstring).
ANALYSIS_MAX_SIDE = 2048


def working_copy(
    rgb: npt.NDArray[np.uint8], spacing: PixelSpacing | None, max_side: int = ANALYSIS_MAX_SIDE
) -> tuple[npt.NDArray[np.uint8], PixelSpacing | None, float]:
    """The image the stages work on: ``rgb`` itself, or a copy reduced to ``max_side`` on its longer side.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 source image.
    spacing:
        Source pixel spacing (``None`` when uncalibrated).
    max_side:
        Longer side of the working copy.

    Returns
    -------
    tuple
        ``(image, spacing of the image, scale)`` where ``scale`` = working size / source size (1.0: no copy).

    Raises
    ------
    ValueError
        When ``max_side`` is not positive.
    """
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    small, scale = resize_max_side(rgb, max_side, cv2.INTER_AREA)
    if scale == 1.0:
        return rgb, spacing, 1.0
    (h, w), (sh, sw) = rgb.shape[:2], small.shape[:2]
    sy, sx = sh / h, sw / w
    scaled = None
    if spacing is not None:
        scaled = dataclasses.replace(spacing, row_mm=spacing.row_mm / sy, column_mm=spacing.column_mm / sx)
    return small, scaled, scale


def _to_source(
    shape: tuple[int, int], mask: npt.NDArray[np.bool_], probability: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    h, w = shape
    prob = np.asarray(cv2.resize(probability, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    up = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(up >= 0.5, dtype=bool), prob


def _measurements_in_source_pixels(
    m: Measurements, source_mask: npt.NDArray[np.bool_], spacing: PixelSpacing | None, scale: float
) -> Measurements:
    area_px = int(np.count_nonzero(source_mask))
    return dataclasses.replace(
        m,
        area_px=area_px,
        area_mm2=area_px * spacing.row_mm * spacing.column_mm if spacing is not None else None,
        perimeter_px=m.perimeter_px / scale,
        max_diameter_px=m.max_diameter_px / scale,
    )


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
        segmentation = load_network(
            directory, settings.segmentation_model, threads=settings.torch_threads, runtime=settings.network_runtime,
            channels_last=True,
        )
        self.segmenter = Segmenter(segmentation)
        self.classifier = Classifier(directory, settings, name=settings.classifier_model)
        if settings.torch_threads > 0 and "torch" in sys.modules:  # a model runs on PyTorch (or torch was loaded)
            import torch

            torch.set_num_threads(settings.torch_threads)
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

        image, spacing, scale = working_copy(source.rgb, source.spacing)
        quality = assess_quality(image)
        lap("gate")
        if not quality.usable:
            return AnalysisResult(source, AnalysisStatus.NOT_ANALYSABLE, quality.reason, self.models, quality,
                                  timings_ms=timings)
        cleaned = remove_artefacts(image, self.settings)
        lap("artefacts")
        # the networks see the image as they were trained on it (hair included: removing it cost the segmenter
        # 0.017 Dice and the classifier 0.007 AUC on ISIC 2017 val). The segmenter gets the dermoscope frame as it
        # is and masked out of the lesion (filling it cost 0.045 Dice under a round field, 0.016 under the combined
        # device shift, nothing without a frame: docs/robustness.md); the classifier gets the frame filled (a black
        # round field in its crop raised the 2.0.0 melanoma probability by up to 0.5). Hair removal serves the
        # measurements (colours, border) only.
        seg = self.segmenter.segment(image, cleaned.frame.valid_mask)
        mask, probability = seg.mask, seg.probability
        if scale != 1.0:
            mask, probability = _to_source(source.rgb.shape[:2], seg.mask, seg.probability)
        lap("segmentation")
        if seg.empty or not mask.any():
            return AnalysisResult(source, AnalysisStatus.NOT_ANALYSABLE, "no lesion found in the image",
                                  self.models, quality, probability_map=probability, timings_ms=timings)
        # hair is inpainted only where the measurements read (the lesion and its surroundings), not everywhere
        measurements = measure(seg.mask, cleaned.image_within(measurement_box(seg.mask)), spacing)
        if scale != 1.0:
            measurements = _measurements_in_source_pixels(measurements, mask, source.spacing, scale)
        lap("measurements")
        classification = self.classifier.classify(cleaned.framed, seg.mask)
        lap("classification")
        return AnalysisResult(
            source=source,
            status=AnalysisStatus.ANALYSED,
            reason=None,
            models=self.models,
            quality=quality,
            mask=mask,
            probability_map=probability,
            measurements=measurements,
            classification=classification,
            timings_ms=timings,
        )
