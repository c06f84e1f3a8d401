"""Calibrated lesion classification: melanoma probability, confidence band and 9-class diagnosis.

:class:`Classifier` loads the ``classifier`` model (sha256-verified, on the runtime
:func:`~dermnode.inference.networks.load_network` chooses; its calibration values from
:mod:`dermnode.inference.classifier_spec`) and classifies the lesion crop:

1. crop = bounding box of the (predicted) mask + the manifest's margin (30 % for the shipped model) on every side,
   squared, resized to the network input size — the
   same function as at training time (:func:`~dermnode.inference.lesion_crop.lesion_crop_box` and
   :func:`~dermnode.inference.lesion_crop.warp_crop`); Shades-of-Gray colour constancy; normalisation;
2. logits averaged over the four flips (test-time augmentation; about 4x a single pass of a ~0.2 M parameter
   network on a 160 px crop, a few milliseconds);
3. temperature scaling (temperatures fitted on validation logits, stored in the manifest):
   ``p_melanoma = sigmoid(z_mel / T_mel)``, ``p_diagnosis = softmax(z_diag / T_diag)``;
4. band: with a band calibration (:mod:`dermnode.inference.calibration`; by default the file shipped beside the
   classifier, ``<name>.calibration.json``, or ``analysis.calibration``) the melanoma logit is first multiplied
   by the calibration's temperature factor and the band comes from its cut-offs, chosen for a stated miss rate,
   with the band's meaning in words; without one (``analysis.calibration = "none"`` or no file) :func:`band_for`
   applies ``band_benign_below`` / ``band_malignant_above``. ``benign`` below the lower cut-off, ``malignant``
   above the upper one, otherwise ``indeterminate`` (a probability exactly at a cut-off is indeterminate).

The melanoma probability comes from the dedicated binary head; the 9-class distribution from the diagnosis
head, so ``diagnosis_probabilities["MEL"]`` need not equal ``melanoma_probability``. Decision support only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dermnode.inference.calibration import BandCalibration, load_calibration
from dermnode.inference.classifier_spec import ClassifierSpec, classifier_logits, classifier_spec
from dermnode.inference.imaging import sigmoid_scalar, softmax
from dermnode.inference.lesion_crop import lesion_crop_box, preprocess_crop, warp_crop
from dermnode.inference.manifest import ModelManifest
from dermnode.inference.networks import load_network
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import Band, Classification, ModelIdentity

logger = logging.getLogger(__name__)


def band_for(probability: float, settings: AnalysisSettings) -> Band:
    """Confidence band of a melanoma probability.

    Parameters
    ----------
    probability : float
        Calibrated melanoma probability.
    settings : AnalysisSettings
        Supplies ``band_benign_below`` and ``band_malignant_above``.

    Returns
    -------
    Band
        ``BENIGN`` below the lower threshold, ``MALIGNANT`` above the upper one, else ``INDETERMINATE``.
    """
    if probability < settings.band_benign_below:
        return Band.BENIGN
    if probability > settings.band_malignant_above:
        return Band.MALIGNANT
    return Band.INDETERMINATE


def _band_calibration(
    models_dir: Path, name: str, settings: AnalysisSettings, model: ModelIdentity
) -> BandCalibration | None:
    """The band calibration ``settings.calibration`` selects (see the module docstring), checked against ``model``."""
    if settings.calibration == "none":
        return None
    if settings.calibration:
        return load_calibration(Path(settings.calibration), model)
    shipped = models_dir / f"{name}.calibration.json"
    return load_calibration(shipped, model) if shipped.is_file() else None


def _head_size(manifest: ModelManifest) -> int | None:
    """Size of the diagnosis head as the manifest's architecture arguments give it (``None``: not stated)."""
    n = manifest.arch_kwargs.get("n_classes")
    return int(n) if isinstance(n, int) else None


class Classifier:
    """Melanoma / diagnosis classifier on the lesion crop.

    Parameters
    ----------
    models_dir : Path
        Folder holding ``classifier.pt`` and ``classifier.json``.
    settings : AnalysisSettings, optional
        Band thresholds (defaults: 0.15 / 0.85).
    tta : bool, optional
        Average the logits over the four flips; default: as the manifest says (its calibration was fitted so).
    name : str
        Bundle name.

    Raises
    ------
    ModelError
        When the bundle is missing, corrupt or inconsistent, or the band calibration is unreadable or was made
        for another classifier.
    """

    def __init__(
        self,
        models_dir: Path,
        settings: AnalysisSettings | None = None,
        *,
        tta: bool | None = None,
        name: str = "classifier",
    ) -> None:
        self.settings = settings if settings is not None else AnalysisSettings()
        loaded = load_network(
            Path(models_dir), name, threads=self.settings.torch_threads, runtime=self.settings.network_runtime
        )
        self.network = loaded.network
        self.runtime = loaded.runtime
        self.bundle: ClassifierSpec = classifier_spec(loaded.manifest, _head_size(loaded.manifest))
        self.tta = self.bundle.tta if tta is None else tta
        self.calibration = _band_calibration(Path(models_dir), name, self.settings, self.bundle.identity)

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and sha256 of the loaded model."""
        return self.bundle.identity

    def crop(self, rgb: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.uint8]:
        """The network's input crop (uint8, before colour normalisation).

        Parameters
        ----------
        rgb : ndarray
            uint8 image (H, W, 3) at source resolution.
        mask : ndarray or None
            Boolean lesion mask (H, W); ``None`` or empty uses the largest centred square.

        Returns
        -------
        ndarray
            uint8 (S, S, 3).

        Raises
        ------
        ValueError
            When the image or the mask has the wrong shape.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
        if mask is not None and mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
        box = lesion_crop_box(mask, (rgb.shape[0], rgb.shape[1]), self.bundle.margin)
        return warp_crop(np.ascontiguousarray(rgb, dtype=np.uint8), box, self.bundle.input_size)

    def logits(
        self, rgb: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_] | None
    ) -> tuple[float, npt.NDArray[np.float64]]:
        """Uncalibrated logits ``(melanoma, diagnosis (K,))`` of one lesion.

        Parameters
        ----------
        rgb : ndarray
            uint8 image (H, W, 3).
        mask : ndarray or None
            Boolean lesion mask.

        Returns
        -------
        tuple
            Melanoma logit and diagnosis logits.

        Raises
        ------
        ValueError
            When the image or the mask has the wrong shape.
        """
        x = preprocess_crop(self.crop(rgb, mask), self.bundle.mean, self.bundle.std)[None]
        mel, diag = classifier_logits(self.network, x, tta=self.tta)
        return float(mel[0]), diag[0]

    def classify(self, rgb: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_] | None) -> Classification:
        """Calibrated probabilities and band for one lesion.

        Parameters
        ----------
        rgb : ndarray
            uint8 image (H, W, 3) at source resolution.
        mask : ndarray or None
            Boolean lesion mask (the predicted segmentation).

        Returns
        -------
        Classification
            Melanoma probability, band and the diagnosis distribution (sums to 1).

        Raises
        ------
        ValueError
            When the image or the mask has the wrong shape.
        """
        z_mel, z_diag = self.logits(rgb, mask)
        cal = self.calibration
        p_mel = sigmoid_scalar(z_mel / self.bundle.temperature_melanoma * (cal.temperature_factor if cal else 1.0))
        band = cal.band(p_mel) if cal is not None else band_for(p_mel, self.settings)
        z = z_diag / self.bundle.temperature_diagnosis
        p = softmax(z)
        probs = {c: float(v) for c, v in zip(self.bundle.classes, p, strict=True)}
        return Classification(
            melanoma_probability=float(p_mel),
            band=band,
            diagnosis_probabilities=probs,
            band_meaning=cal.meaning(band) if cal is not None else "",
            calibration=cal.identity_text() if cal is not None else "",
        )
