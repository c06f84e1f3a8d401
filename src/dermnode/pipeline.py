"""The analysis pipeline wired to its inputs and outputs.

Data flows one way: spooled file → decode → analysis stages (``dermnode.inference``) → output objects (SEG, SR,
FHIR bundle, result.json, overlay) → outbox. Every stage has typed inputs and outputs; this module only joins
them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from dermnode.errors import ModelError
from dermnode.outbox import Deliverer
from dermnode.scp.workers import Processor
from dermnode.settings import Settings

logger = logging.getLogger(__name__)


def build_processor(settings: Settings) -> Processor:
    """The job processor the workers run; loads and verifies the shipped models.

    Raises
    ------
    ModelError
        When a model file is missing, corrupt or does not match its manifest.
    """
    raise ModelError("the analysis models are not available yet")


def build_deliverers(settings: Settings) -> dict[str, Deliverer]:
    """Delivery functions by kind for the configured destinations."""
    return {}


def analyze_files(settings: Settings, files: Sequence[Path], out: Path) -> list[tuple[str, str]]:
    """Analyse DICOM files offline and write per-instance outputs under ``out``.

    Raises
    ------
    ModelError
        When the models cannot be loaded.
    """
    raise ModelError("the analysis models are not available yet")
