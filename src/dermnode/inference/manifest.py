"""Model manifests (``<name>.json``) and file digests: what every loader reads first, without torch.

The manifest names the model (name, version), its architecture, its input, its normalisation, model-specific
values (``extra``) and the SHA-256 of its files: ``sha256`` of the trained weights ``<name>.pt`` (the model's
identity in every output) and, when the model also ships as ``<name>.onnx`` (the same network exported for ONNX
Runtime), ``onnx_sha256``. See :mod:`dermnode.inference.registry` for the file layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dermnode.errors import ModelError


@dataclass(frozen=True)
class ModelManifest:
    """Contents of ``<name>.json``."""

    name: str
    version: str
    arch: str
    sha256: str
    input_size: tuple[int, int]  # (height, width) the network works at
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # normalisation of 0..1 RGB input
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    arch_module: str | None = None
    #: SHA-256 of ``<name>.onnx``, the same network for ONNX Runtime (:mod:`dermnode.inference.networks`); ``None``
    #: when the model has no ONNX file.
    onnx_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON document of the manifest (``normalisation`` nested as in the file format)."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["normalisation"] = {"mean": list(d.pop("mean")), "std": list(d.pop("std"))}
        for key in ("arch_module", "onnx_sha256"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "manifest") -> ModelManifest:
        """Parse a manifest document.

        Parameters
        ----------
        data:
            The decoded JSON object.
        where:
            File name used in error messages.

        Returns
        -------
        ModelManifest
            The parsed manifest.

        Raises
        ------
        ModelError
            When a required key is missing or has the wrong type.
        """
        try:
            norm = data.get("normalisation", {}) or {}
            size = data["input_size"]
            if isinstance(size, int):
                size = [size, size]
            mean = tuple(float(v) for v in norm.get("mean", (0.0, 0.0, 0.0)))
            std = tuple(float(v) for v in norm.get("std", (1.0, 1.0, 1.0)))
            if len(mean) != 3 or len(std) != 3 or len(size) != 2:
                raise ValueError("normalisation needs 3 values, input_size 2")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                arch=str(data["arch"]),
                sha256=str(data["sha256"]).lower(),
                input_size=(int(size[0]), int(size[1])),
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
                arch_kwargs=dict(data.get("arch_kwargs", {}) or {}),
                extra=dict(data.get("extra", {}) or {}),
                arch_module=data.get("arch_module"),
                onnx_sha256=str(data["onnx_sha256"]).lower() if data.get("onnx_sha256") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model manifest {where} is invalid: {exc!r}") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes.

    Parameters
    ----------
    path:
        The file.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(models_dir: Path, name: str) -> ModelManifest:
    """Read and parse ``models_dir/<name>.json``.

    Parameters
    ----------
    models_dir:
        Folder holding the model files.
    name:
        Model name.

    Returns
    -------
    ModelManifest
        The manifest.

    Raises
    ------
    ModelError
        When the manifest is missing, unreadable or invalid.
    """
    path = Path(models_dir) / f"{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model manifest {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model manifest {path} cannot be read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"model manifest {path} is not a JSON object")
    return ModelManifest.from_json(raw, where=str(path))


def read_verified(path: Path, sha256: str) -> bytes:
    """The bytes of a model file whose SHA-256 must be ``sha256`` (as its manifest records it).

    Parameters
    ----------
    path:
        The file (``<name>.pt`` or ``<name>.onnx``).
    sha256:
        The expected digest, 64 lowercase hex digits.

    Returns
    -------
    bytes
        The file's contents.

    Raises
    ------
    ModelError
        When the file is missing or unreadable, or its digest differs (a corrupt or replaced file).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file {path} is missing") from None
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelError(
            f"model file {path} does not match its manifest: sha256 {digest} != {sha256} (corrupt or replaced file)"
        )
    return data
