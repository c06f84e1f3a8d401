"""Lesion classifier: architecture, the shared crop/pre-processing, and the model bundle (save/load).

Architecture ``dermnet-s`` (default): a small MobileNet-like CNN trained from scratch.

* stem: 3x3 conv stride 2 -> BN -> SiLU
* stages of depthwise-separable residual blocks (3x3 depthwise conv -> BN -> SiLU -> 1x1 pointwise conv -> BN
  [-> SiLU]); a block with stride 2 or a channel change has no identity shortcut
* global average pooling -> dropout -> two linear heads: ``melanoma`` (1 logit) and ``diagnosis``
  (9 logits over :data:`DIAGNOSIS_CLASSES`).

Pre-processing (identical at training and inference time, see :func:`lesion_crop_box`, :func:`warp_crop` and
:func:`preprocess_crop`):

1. crop box = bounding box of the lesion mask, enlarged by ``margin`` (20%) of its size on every side, then
   squared around its centre (side = the longer side); pixels outside the image are reflected; an empty or
   missing mask gives the largest centred square of the image;
2. resize to ``input_size`` (area interpolation when shrinking, linear when enlarging);
3. Shades-of-Gray colour constancy (Minkowski p = 6): every channel is scaled so that its p-norm mean equals
   the grey value, which removes most device/illumination colour casts;
4. scale to [0, 1] and normalise with fixed mean/std (:data:`MEAN`, :data:`STD`).

Model bundle: stored with the project's generic registry (:mod:`dermnode.inference.registry`):
``<models_dir>/classifier.pt`` (float16 ``state_dict``) and ``<models_dir>/classifier.json`` (manifest: name,
version, ``arch = "dermnet"`` with ``arch_kwargs.variant`` (or ``"dermnet_ensemble"`` with
``arch_kwargs.variants``: logits averaged over members), input_size, normalisation, sha256 of the ``.pt`` file;
``extra`` holds the temperatures, the class list, the crop margin and validation metrics).
:func:`load_classifier` verifies the sha256 before loading and raises :class:`~dermnode.errors.ModelError` when a
file is missing, corrupt or inconsistent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dermnode.errors import ModelError
from dermnode.inference.architectures import EFFICIENTNET_LITE_NORMALISATION
from dermnode.inference.classifier_spec import ClassifierSpec, classifier_logits, classifier_spec
from dermnode.inference.lesion_crop import (  # re-exported: training and evaluation import them from here
    DEFAULT_MARGIN,
    MEAN,
    STD,
    lesion_crop_box,
    preprocess_crop,
    warp_crop,
)
from dermnode.inference.networks import TorchNetwork
from dermnode.inference.registry import load_model_bundle, register_architecture, save_model_bundle
from dermnode.vocabulary import DIAGNOSIS_CLASSES

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "DEFAULT_MARGIN",
    "DIAGNOSIS_CLASSES",
    "MEAN",
    "STD",
    "TIMM_BACKBONES",
    "ClassifierBundle",
    "ClassifierNet",
    "DermNet",
    "DermNetEnsemble",
    "TimmTwoHead",
    "build_classifier",
    "classifier_normalisation",
    "lesion_crop_box",
    "load_classifier",
    "n_diagnosis_classes",
    "predict_logits",
    "preprocess_crop",
    "save_classifier",
    "warp_crop",
]


# arch name -> (stem channels, [(out_channels, stride, repeats), ...])
ARCHS: dict[str, tuple[int, list[tuple[int, int, int]]]] = {
    "dermnet-xs": (16, [(24, 2, 1), (48, 2, 2), (96, 2, 2), (160, 2, 2)]),
    "dermnet-s": (24, [(32, 2, 1), (64, 2, 2), (128, 2, 3), (192, 2, 2)]),
    "dermnet-m": (32, [(48, 2, 2), (96, 2, 3), (160, 2, 3), (256, 2, 2)]),
}


class _DSBlock(nn.Module):
    """Depthwise-separable residual block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.dw(x)))
        y = self.bn2(self.pw(y))
        if self.residual:
            y = y + x
        return self.act(y)


class DermNet(nn.Module):
    """Small two-headed dermoscopy classifier.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHS`.
    n_classes : int
        Number of diagnosis classes.
    dropout : float
        Dropout before the heads.

    Raises
    ------
    ValueError
        When ``arch`` is unknown.
    """

    def __init__(self, arch: str = "dermnet-s", n_classes: int = len(DIAGNOSIS_CLASSES), dropout: float = 0.2) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown classifier architecture {arch!r} (known: {', '.join(ARCHS)})")
        self.variant = arch
        stem, stages = ARCHS[arch]
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.SiLU(inplace=True),
        ]
        cin = stem
        for cout, stride, repeats in stages:
            for r in range(repeats):
                layers.append(_DSBlock(cin, cout, stride if r == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.melanoma_head = nn.Linear(cin, 1)
        self.diagnosis_head = nn.Linear(cin, n_classes)
        self.n_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(melanoma_logit (N,), diagnosis_logits (N, K))``."""
        f = self.dropout(torch.flatten(self.pool(self.features(x)), 1))
        return self.melanoma_head(f).squeeze(1), self.diagnosis_head(f)


class DermNetEnsemble(nn.Module):
    """Average of the logits of several :class:`DermNet` members (e.g. runs with different seeds).

    Parameters
    ----------
    variants : list of str
        Architecture of each member.
    n_classes : int
        Number of diagnosis classes.

    Raises
    ------
    ValueError
        When ``variants`` is empty or names an unknown architecture.
    """

    def __init__(self, variants: list[str], n_classes: int = len(DIAGNOSIS_CLASSES)) -> None:
        super().__init__()
        if not variants:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList([DermNet(v, n_classes=n_classes) for v in variants])
        self.variants = list(variants)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the member-averaged ``(melanoma_logit (N,), diagnosis_logits (N, K))``."""
        outs = [m(x) for m in self.members]
        mel = torch.stack([o[0] for o in outs]).mean(0)
        diag = torch.stack([o[1] for o in outs]).mean(0)
        return mel, diag


#: Networks from timm with two heads. ``normalisation`` is what their pretrained weights expect on 0..1 RGB
#: (EfficientNet-Lite from TensorFlow: ``(x - 127) / 128`` on 0..255 values).
TIMM_BACKBONES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "tf_efficientnet_lite0": EFFICIENTNET_LITE_NORMALISATION,
    "tf_efficientnet_lite2": EFFICIENTNET_LITE_NORMALISATION,
}


class TimmTwoHead(nn.Module):
    """A timm image backbone (pooled features) with the melanoma and diagnosis heads of :class:`DermNet`.

    Parameters
    ----------
    backbone : str
        A timm model name listed in :data:`TIMM_BACKBONES`.
    n_classes : int
        Number of diagnosis classes.
    dropout : float
        Dropout before the heads.

    Raises
    ------
    ValueError
        When ``backbone`` is not listed.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", n_classes: int = len(DIAGNOSIS_CLASSES),
                 dropout: float = 0.3) -> None:
        super().__init__()
        if backbone not in TIMM_BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(TIMM_BACKBONES)})")
        import timm  # runtime dependency of this architecture only

        self.variant = backbone
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        n = int(getattr(self.backbone, "num_features"))  # noqa: B009 (timm's attribute, untyped for mypy)
        self.dropout = nn.Dropout(dropout)
        self.melanoma_head = nn.Linear(n, 1)
        self.diagnosis_head = nn.Linear(n, n_classes)
        self.n_features = n
        for head in (self.melanoma_head, self.diagnosis_head):
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)

    @property
    def normalisation(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean, std)`` on 0..1 RGB expected by the backbone."""
        return TIMM_BACKBONES[self.variant]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(melanoma_logit (N,), diagnosis_logits (N, K))``."""
        f = self.dropout(self.backbone(x))
        return self.melanoma_head(f).squeeze(1), self.diagnosis_head(f)


ClassifierNet = DermNet | DermNetEnsemble | TimmTwoHead


def build_classifier(arch: str, n_classes: int = len(DIAGNOSIS_CLASSES)) -> DermNet | TimmTwoHead:
    """An untrained classifier: a ``dermnet-*`` variant or a timm backbone of :data:`TIMM_BACKBONES`.

    Parameters
    ----------
    arch : str
        Variant or backbone name.
    n_classes : int
        Number of diagnosis classes.

    Returns
    -------
    DermNet or TimmTwoHead
        The network.

    Raises
    ------
    ValueError
        When ``arch`` is unknown.
    """
    if arch in TIMM_BACKBONES:
        return TimmTwoHead(arch, n_classes=n_classes)
    return DermNet(arch, n_classes=n_classes)


def classifier_normalisation(model: nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` on 0..1 RGB of a classifier's input (:data:`MEAN`/:data:`STD` for DermNets)."""
    if isinstance(model, TimmTwoHead):
        return model.normalisation
    return (float(MEAN[0]), float(MEAN[1]), float(MEAN[2])), (float(STD[0]), float(STD[1]), float(STD[2]))


def n_diagnosis_classes(model: nn.Module) -> int:
    """Number of diagnosis logits of a :class:`DermNet` or :class:`DermNetEnsemble`.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier network.

    Returns
    -------
    int
        Size of the diagnosis head.

    Raises
    ------
    TypeError
        When ``model`` is neither.
    """
    if isinstance(model, DermNet | TimmTwoHead):
        return int(model.diagnosis_head.out_features)
    if isinstance(model, DermNetEnsemble):
        return int(model.n_classes)
    raise TypeError(f"{type(model).__name__} is not a dermnet classifier")


# ---------------------------------------------------------------------------------------------------------
# bundle (stored with the project's generic model registry, see dermnode.inference.registry)


@register_architecture("timm_two_head")
def build_timm_two_head(
    backbone: str = "tf_efficientnet_lite0", n_classes: int = len(DIAGNOSIS_CLASSES)
) -> TimmTwoHead:
    """Registry constructor of :class:`TimmTwoHead`.

    Parameters
    ----------
    backbone : str
        timm model name (see :data:`TIMM_BACKBONES`).
    n_classes : int
        Number of diagnosis classes.

    Returns
    -------
    TimmTwoHead
        The untrained network.
    """
    return TimmTwoHead(backbone, n_classes=n_classes)


@register_architecture("dermnet")
def build_dermnet(variant: str = "dermnet-s", n_classes: int = len(DIAGNOSIS_CLASSES)) -> DermNet:
    """Registry constructor of :class:`DermNet`.

    Parameters
    ----------
    variant : str
        One of :data:`ARCHS`.
    n_classes : int
        Number of diagnosis classes.

    Returns
    -------
    DermNet
        A freshly initialised network.

    Raises
    ------
    ValueError
        When ``variant`` is unknown.
    """
    return DermNet(variant, n_classes=n_classes)


@register_architecture("dermnet_ensemble")
def build_dermnet_ensemble(variants: list[str], n_classes: int = len(DIAGNOSIS_CLASSES)) -> DermNetEnsemble:
    """Registry constructor of :class:`DermNetEnsemble`.

    Parameters
    ----------
    variants : list of str
        Architecture of each member.
    n_classes : int
        Number of diagnosis classes.

    Returns
    -------
    DermNetEnsemble
        A freshly initialised ensemble.

    Raises
    ------
    ValueError
        When ``variants`` is empty or unknown.
    """
    return DermNetEnsemble(list(variants), n_classes=n_classes)


@dataclass(frozen=True, kw_only=True)
class ClassifierBundle(ClassifierSpec):
    """A classifier loaded on PyTorch (training, evaluation): the module and its :class:`ClassifierSpec`."""

    model: ClassifierNet


def save_classifier(
    model: ClassifierNet,
    models_dir: Path,
    *,
    variant: str | None = None,
    input_size: int,
    temperatures: tuple[float, float],
    version: str,
    extra: dict[str, Any] | None = None,
    name: str = "classifier",
    margin: float = DEFAULT_MARGIN,
    tta: bool = True,
) -> Path:
    """Write ``<name>.pt`` (float16 state_dict) and ``<name>.json`` (manifest with sha256).

    Parameters
    ----------
    model : DermNet or DermNetEnsemble
        Trained model.
    models_dir : Path
        Output folder (created).
    variant : str, optional
        Architecture variant (``dermnet-s`` ...); default: the model's own.
    input_size : int
        Input crop side.
    temperatures : tuple of float
        ``(melanoma, diagnosis)`` temperatures.
    version : str
        Model version.
    extra : dict, optional
        Further manifest values (validation metrics ...), stored under ``extra``.
    name : str
        Bundle name.
    margin : float
        Crop margin to use at inference.
    tta : bool
        Whether inference averages the logits over the four flips (the temperatures must be fitted the same way).

    Returns
    -------
    Path
        The manifest path.

    Raises
    ------
    ModelError
        When the files cannot be written.
    """
    ex: dict[str, Any] = dict(extra or {})
    ex.update(
        {
            "temperatures": {"melanoma": float(temperatures[0]), "diagnosis": float(temperatures[1])},
            "classes": list(DIAGNOSIS_CLASSES),
            "margin": float(margin),
            "colour_constancy": "shades_of_gray_p6",
            "tta": "mean logits over 4 flips" if tta else "none",
        }
    )
    if isinstance(model, TimmTwoHead):
        arch = "timm_two_head"
        arch_kwargs: dict[str, Any] = {"backbone": model.variant, "n_classes": n_diagnosis_classes(model)}
    elif isinstance(model, DermNetEnsemble):
        arch = "dermnet_ensemble"
        arch_kwargs = {"variants": model.variants, "n_classes": model.n_classes}
    else:
        arch = "dermnet"
        arch_kwargs = {"variant": variant or model.variant, "n_classes": len(DIAGNOSIS_CLASSES)}
    save_model_bundle(
        model,
        Path(models_dir),
        name=name,
        version=version,
        arch=arch,
        arch_kwargs=arch_kwargs,
        input_size=(input_size, input_size),
        mean=classifier_normalisation(model)[0],
        std=classifier_normalisation(model)[1],
        extra=ex,
        arch_module="dermnode.inference.classifier_models",
    )
    return Path(models_dir) / f"{name}.json"


def load_classifier(models_dir: Path, name: str = "classifier") -> ClassifierBundle:
    """Load and verify the classifier bundle ``<models_dir>/<name>.{pt,json}``.

    Parameters
    ----------
    models_dir : Path
        Folder holding the bundle.
    name : str
        Bundle name.

    Returns
    -------
    ClassifierBundle
        The model in eval mode (float32) with its calibration parameters.

    Raises
    ------
    ModelError
        When a file is missing, the manifest is invalid, the sha256 does not match, or the weights do not
        fit the declared architecture.
    """
    bundle = load_model_bundle(Path(models_dir), name)
    if not isinstance(bundle.module, DermNet | DermNetEnsemble | TimmTwoHead):
        raise ModelError(f"model {name} is a {type(bundle.module).__name__}, not a two-headed classifier")
    spec = classifier_spec(bundle.manifest, n_diagnosis_classes(bundle.module))
    return ClassifierBundle(model=bundle.module, **{f.name: getattr(spec, f.name) for f in fields(spec)})


# ---------------------------------------------------------------------------------------------------------
# inference helpers shared by training (calibration), evaluation and the Classifier


def predict_logits(
    model: nn.Module, batch: npt.NDArray[np.float32], *, tta: bool = True
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Raw (uncalibrated) logits for a batch of pre-processed crops.

    With ``tta`` the logits are averaged over the four flips (identity, horizontal, vertical, both).

    Parameters
    ----------
    model : DermNet or DermNetEnsemble
        Model in eval mode.
    batch : ndarray
        float32 (N, 3, S, S) from :func:`preprocess_crop`.
    tta : bool
        Average over flips.

    Returns
    -------
    tuple of ndarray
        ``(melanoma_logits (N,), diagnosis_logits (N, K))`` as float64.
    """
    return classifier_logits(TorchNetwork(model), batch, tta=tta)
