"""What a two-headed lesion classifier's manifest says beyond its weights, and its logits on any runtime.

A classifier (``models/classifier.*``) has two outputs: ``melanoma`` (one logit) and ``diagnosis`` (K logits over
``classes``). Its manifest's ``extra`` holds the temperatures fitted on validation logits, the class list, the crop
margin and whether inference averages the four flips (:class:`ClassifierSpec`, :func:`classifier_spec`). The
logits come from :func:`classifier_logits` through any :class:`~dermnode.inference.networks.Network` (ONNX
Runtime or PyTorch), so nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dermnode.errors import ModelError
from dermnode.inference.lesion_crop import DEFAULT_MARGIN, MEAN, STD
from dermnode.inference.manifest import ModelManifest
from dermnode.inference.networks import Network
from dermnode.vocabulary import DIAGNOSIS_CLASSES, ModelIdentity

__all__ = ["ClassifierSpec", "classifier_logits", "classifier_spec"]


@dataclass(frozen=True)
class ClassifierSpec:
    """Calibration and pre-processing of a classifier, read from its manifest.

    Attributes
    ----------
    identity:
        Name, version and SHA-256 of the trained weights.
    input_size:
        Side of the square input crop.
    margin:
        Crop margin (fraction of the lesion's bounding box on every side).
    temperature_melanoma, temperature_diagnosis:
        Temperatures dividing the logits.
    classes:
        Diagnosis classes in the order of the diagnosis head.
    extra:
        The manifest's ``extra``.
    mean, std:
        Normalisation of the colour-corrected 0..1 crop.
    tta:
        Whether the logits are averaged over the four flips (the temperatures were fitted so).
    """

    identity: ModelIdentity
    input_size: int
    margin: float
    temperature_melanoma: float
    temperature_diagnosis: float
    classes: tuple[str, ...] = field(default=DIAGNOSIS_CLASSES)
    extra: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = (float(MEAN[0]), float(MEAN[1]), float(MEAN[2]))
    std: tuple[float, float, float] = (float(STD[0]), float(STD[1]), float(STD[2]))
    tta: bool = True


def classifier_spec(manifest: ModelManifest, n_classes: int | None = None) -> ClassifierSpec:
    """Read and check a classifier's calibration values.

    Parameters
    ----------
    manifest:
        The classifier's manifest.
    n_classes:
        Size of the network's diagnosis head, when known (checked against the class list).

    Returns
    -------
    ClassifierSpec
        The values inference needs besides the network.

    Raises
    ------
    ModelError
        When a value is invalid, a temperature is not positive, the class list does not fit the head, or the
        input is not square.
    """
    name = manifest.name
    ex = manifest.extra
    try:
        temps = ex.get("temperatures", {})
        t_mel = float(temps.get("melanoma", 1.0))
        t_diag = float(temps.get("diagnosis", 1.0))
        classes = tuple(str(c) for c in ex.get("classes", DIAGNOSIS_CLASSES))
        margin = float(ex.get("margin", DEFAULT_MARGIN))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"classifier manifest of {name} has invalid calibration values: {exc}") from exc
    if not (t_mel > 0 and t_diag > 0):
        raise ModelError(f"classifier {name}: temperatures must be positive")
    if n_classes is not None and len(classes) != n_classes:
        raise ModelError(f"classifier {name}: {len(classes)} classes but the head has {n_classes}")
    h, w = manifest.input_size
    if h != w:
        raise ModelError(f"classifier {name}: input_size must be square, got {h}x{w}")
    return ClassifierSpec(
        identity=ModelIdentity(name=manifest.name, version=manifest.version, sha256=manifest.sha256),
        input_size=int(h),
        margin=margin,
        temperature_melanoma=t_mel,
        temperature_diagnosis=t_diag,
        classes=classes,
        extra=dict(ex),
        mean=manifest.mean,
        std=manifest.std,
        tta=str(ex.get("tta", "mean logits over 4 flips")) != "none",
    )


def classifier_logits(
    network: Network, batch: npt.NDArray[np.float32], *, tta: bool = True
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Raw (uncalibrated) logits of a batch of pre-processed crops.

    With ``tta`` the logits are averaged over the four flips (identity, horizontal, vertical, both), run as one
    batch.

    Parameters
    ----------
    network:
        The classifier: outputs ``(melanoma (N, 1) or (N,), diagnosis (N, K))``.
    batch:
        float32 ``(N, 3, S, S)`` from :func:`~dermnode.inference.lesion_crop.preprocess_crop`.
    tta:
        Average over the flips.

    Returns
    -------
    tuple of ndarray
        ``(melanoma_logits (N,), diagnosis_logits (N, K))`` as float64.

    Raises
    ------
    ModelError
        When the network does not give two outputs.
    """
    x = np.ascontiguousarray(batch, dtype=np.float32)
    n = x.shape[0]
    views = [x, x[..., ::-1], x[:, :, ::-1, :], x[:, :, ::-1, ::-1]] if tta else [x]
    outputs = network(np.concatenate(views, axis=0) if len(views) > 1 else x)
    if len(outputs) != 2:
        raise ModelError(f"a classifier gives 2 outputs (melanoma, diagnosis), this one gave {len(outputs)}")
    mel = outputs[0].reshape(len(views), n).astype(np.float64).mean(axis=0)
    diag = outputs[1].reshape(len(views), n, -1).astype(np.float64).mean(axis=0)
    return mel, diag
