"""Model files on disk: saving, verifying and loading trained networks.

A model named ``<name>`` lives in a models folder as three files:

``<name>.pt``
    The weights: a ``torch.save``-d ``state_dict`` with floating-point tensors stored as float16.
``<name>.json``
    The manifest (:class:`ModelManifest`): ``name``, ``version``, ``arch`` (a name registered with
    :func:`register_architecture`), ``arch_kwargs``, ``input_size`` ([height, width]), ``sha256`` (of the
    ``.pt`` file), ``normalisation`` (``{"mean": [...], "std": [...]}`` on 0..1 RGB) and ``extra`` (free
    model-specific values, e.g. ``{"threshold": 0.5}``).
``<name>.md``
    The model card (human readable; not read by the code).

Typical use (any model, segmentation or classification)::

    from dermnode.inference.registry import load_model_bundle
    bundle = load_model_bundle(models_dir, "segmentation")  # raises ModelError if anything is wrong
    bundle.module          # torch.nn.Module, float32, eval mode
    bundle.identity        # ModelIdentity(name, version, sha256) for the outputs
    bundle.manifest.extra  # model-specific values

and to export a trained network::

    save_model_bundle(module, out_dir, name="classifier", version="1.0.0", arch="my_arch",
                      arch_kwargs={...}, input_size=(224, 224), mean=(...), std=(...), extra={...})

New architectures register a constructor with ``@register_architecture("my_arch")``. Built-in
architectures (:mod:`dermnode.inference.architectures`) are registered on first load; a manifest may also name an
``arch_module`` inside the ``dermnode`` package that is imported before the lookup.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from dermnode.errors import ModelError
from dermnode.inference.manifest import ModelManifest, read_manifest, read_verified, sha256_file
from dermnode.vocabulary import ModelIdentity

__all__ = [
    "ModelBundle",
    "ModelManifest",
    "available_architectures",
    "build_architecture",
    "load_model_bundle",
    "read_manifest",
    "register_architecture",
    "save_model_bundle",
    "sha256_file",
]

logger = logging.getLogger(__name__)

ArchConstructor = Callable[..., nn.Module]
_ARCHITECTURES: dict[str, ArchConstructor] = {}
_BUILTIN_MODULES = ("dermnode.inference.architectures",)

F = TypeVar("F", bound=ArchConstructor)


def register_architecture(name: str) -> Callable[[F], F]:
    """Decorator registering a constructor ``(**arch_kwargs) -> nn.Module`` under ``name``.

    Parameters
    ----------
    name:
        Architecture name written to manifests (``"arch"``).

    Returns
    -------
    Callable
        The decorator; it returns the constructor unchanged.

    Raises
    ------
    ValueError
        When another constructor is already registered under ``name``.
    """

    def decorator(fn: F) -> F:
        existing = _ARCHITECTURES.get(name)
        if existing is not None and existing is not fn and existing.__qualname__ != fn.__qualname__:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = fn
        return fn

    return decorator


def _import_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def available_architectures() -> list[str]:
    """Sorted names of all registered architectures (built-ins included)."""
    _import_builtins()
    return sorted(_ARCHITECTURES)


def build_architecture(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Construct an untrained network of a registered architecture.

    Parameters
    ----------
    arch:
        Registered architecture name.
    arch_kwargs:
        Keyword arguments of its constructor.

    Returns
    -------
    torch.nn.Module
        The new network.

    Raises
    ------
    ModelError
        When ``arch`` is unknown or the constructor rejects the arguments.
    """
    _import_builtins()
    ctor = _ARCHITECTURES.get(arch)
    if ctor is None:
        raise ModelError(f"unknown model architecture {arch!r} (known: {', '.join(sorted(_ARCHITECTURES))})")
    try:
        return ctor(**dict(arch_kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build architecture {arch!r} with {dict(arch_kwargs or {})}: {exc}") from exc


@dataclass(frozen=True)
class ModelBundle:
    """A loaded, verified model: the network (float32, eval mode), its identity and its manifest."""

    module: nn.Module
    identity: ModelIdentity
    manifest: ModelManifest


def save_model_bundle(
    module: nn.Module,
    out_dir: Path,
    *,
    name: str,
    version: str,
    arch: str,
    input_size: tuple[int, int],
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
    std: tuple[float, float, float] = (1.0, 1.0, 1.0),
    arch_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    arch_module: str | None = None,
) -> Path:
    """Export ``module`` as ``out_dir/<name>.pt`` (float16 state_dict) plus ``out_dir/<name>.json``.

    The model card (``<name>.md``) is not written here.

    Parameters
    ----------
    module:
        The trained network.
    out_dir:
        Destination folder (created if needed).
    name, version, arch, input_size, mean, std, arch_kwargs, extra, arch_module:
        Manifest fields, see :class:`ModelManifest`.

    Returns
    -------
    pathlib.Path
        Path of the written ``.pt`` file.

    Raises
    ------
    ModelError
        When the files cannot be written.
    """
    state = {
        k: (v.detach().to("cpu").half() if v.is_floating_point() else v.detach().to("cpu")).contiguous()
        for k, v in module.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    manifest = ModelManifest(
        name=name,
        version=version,
        arch=arch,
        sha256=digest,
        input_size=(int(input_size[0]), int(input_size[1])),
        mean=mean,
        std=std,
        arch_kwargs=dict(arch_kwargs or {}),
        extra=dict(extra or {}),
        arch_module=arch_module,
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        pt = out_dir / f"{name}.pt"
        pt.write_bytes(data)
        (out_dir / f"{name}.onnx").unlink(missing_ok=True)  # an export of earlier weights (the manifest drops it)
        (out_dir / f"{name}.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot write model {name} to {out_dir}: {exc}") from exc
    logger.info("exported model %s %s (%d bytes, sha256 %s)", name, version, len(data), digest)
    return pt


def load_model_bundle(models_dir: Path, name: str) -> ModelBundle:
    """Load and verify ``models_dir/<name>.pt`` described by ``models_dir/<name>.json``.

    The SHA-256 of the weights file must equal the manifest's ``sha256``; the state dict must match the
    architecture exactly. The returned network is float32 and in eval mode.

    Parameters
    ----------
    models_dir:
        Folder holding ``<name>.pt`` and ``<name>.json``.
    name:
        Model name (file stem).

    Returns
    -------
    ModelBundle
        The network, its :class:`~dermnode.vocabulary.ModelIdentity` and its manifest.

    Raises
    ------
    ModelError
        When a file is missing or unreadable, the hash does not match, the architecture is unknown or the
        weights do not fit it. The service must refuse to start then.
    """
    models_dir = Path(models_dir)
    manifest = read_manifest(models_dir, name)
    pt = models_dir / f"{name}.pt"
    data = read_verified(pt, manifest.sha256)
    if manifest.arch_module is not None:
        if not manifest.arch_module.startswith("dermnode.inference."):
            # only runtime code may be imported by a manifest (never training or evaluation code, nor anything else)
            raise ModelError(f"model {name}: arch_module {manifest.arch_module!r} is outside dermnode.inference")
        try:
            importlib.import_module(manifest.arch_module)
        except ImportError as exc:
            raise ModelError(f"model {name}: cannot import {manifest.arch_module}: {exc}") from exc
    module = build_architecture(manifest.arch, manifest.arch_kwargs)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ModelError(f"model weights {pt} cannot be decoded: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"model weights {pt} do not hold a state_dict")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"model weights {pt} do not fit architecture {manifest.arch}: {exc}") from exc
    module.float().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    identity = ModelIdentity(name=manifest.name, version=manifest.version, sha256=manifest.sha256)
    logger.info("loaded model %s %s (sha256 %s)", manifest.name, manifest.version, manifest.sha256[:12])
    return ModelBundle(module=module, identity=identity, manifest=manifest)
