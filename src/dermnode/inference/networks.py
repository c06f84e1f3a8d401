"""The network runtimes: ONNX Runtime for the shipped models, PyTorch for the others.

A model that ships ``<name>.onnx`` beside ``<name>.pt`` (its manifest records ``onnx_sha256``; written by
``dermnode export-onnx``) runs on ONNX Runtime: the same network and the same float16-stored weights, computed in
float32 by a runtime that is smaller and faster on a CPU than PyTorch (measured for the shipped models:
``docs/performance.md``), so the service does not need to import torch at all. A model without an ONNX file
(a freshly trained one, or a pinned older version) runs on PyTorch, imported only then. Both give the same
outputs up to float32 rounding (the export checks this, ``tests/inference/test_networks.py`` too).

:func:`load_network` chooses by ``runtime``: ``"auto"`` (ONNX when the model has it), ``"onnx"`` (required) or
``"torch"``. The model's identity in every output is that of its trained weights (the ``.pt`` file's SHA-256),
whichever runtime computes it; :attr:`LoadedNetwork.runtime` says which one did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dermnode.errors import ModelError
from dermnode.inference.manifest import ModelManifest, read_manifest, read_verified
from dermnode.vocabulary import ModelIdentity

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "LoadedNetwork", "Network", "OnnxNetwork", "TorchNetwork", "load_network"]

#: Accepted values of ``runtime`` (``analysis.network_runtime``).
RUNTIMES = ("auto", "onnx", "torch")

FloatArray = npt.NDArray[np.float32]


class Network(Protocol):
    """A loaded network: a float32 NCHW batch in, its outputs (in the network's order) out."""

    def __call__(self, batch: FloatArray) -> list[FloatArray]:
        """Run the network on ``batch``; returns every output as a float32 array."""
        ...


class OnnxNetwork:
    """A network on ONNX Runtime (CPU).

    Parameters
    ----------
    data:
        The ``.onnx`` file's bytes (already verified).
    threads:
        Intra-op threads (0: ONNX Runtime's default).
    where:
        File name for error messages.

    Raises
    ------
    ModelError
        When ONNX Runtime is not installed or cannot load the file.
    """

    def __init__(self, data: bytes, threads: int = 1, where: str = "model") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelError(f"{where}: onnxruntime is not installed ({exc})") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: ORT's warnings are not the service's
        try:
            self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for an invalid graph
            raise ModelError(f"{where} cannot be loaded by ONNX Runtime: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{where} has {len(inputs)} inputs, expected 1")
        self._input = inputs[0].name
        self.output_shapes: list[tuple[Any, ...]] = [tuple(o.shape) for o in self._session.get_outputs()]

    def __call__(self, batch: FloatArray) -> list[FloatArray]:
        """Run the network on a float32 NCHW batch."""
        outputs = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outputs]


class TorchNetwork:
    """A :class:`torch.nn.Module` behind the :class:`Network` call (its train/eval mode is left as it is).

    Parameters
    ----------
    module:
        The network (float32; in eval mode for inference).
    channels_last:
        Convert the module and its inputs to channels-last memory (faster depthwise convolutions on a CPU).
    """

    def __init__(self, module: Any, *, channels_last: bool = False) -> None:
        import torch

        self._torch = torch
        self.module = module.to(memory_format=torch.channels_last) if channels_last else module
        self._channels_last = channels_last

    def __call__(self, batch: FloatArray) -> list[FloatArray]:
        """Run the module on a float32 NCHW batch."""
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.module(x)
        outs: Sequence[Any] = out if isinstance(out, tuple | list) else (out,)
        return [np.ascontiguousarray(o.float().numpy(), dtype=np.float32) for o in outs]


@dataclass(frozen=True)
class LoadedNetwork:
    """A verified network ready to run, with what every output must say about it.

    Attributes
    ----------
    network:
        The callable network.
    identity:
        Name, version and the SHA-256 of the trained weights (``<name>.pt``).
    manifest:
        The model's manifest.
    runtime:
        ``"onnxruntime <version>"`` or ``"torch <version>"``.
    """

    network: Network
    identity: ModelIdentity
    manifest: ModelManifest
    runtime: str


def load_network(
    models_dir: Path, name: str, *, threads: int = 1, runtime: str = "auto", channels_last: bool = False
) -> LoadedNetwork:
    """Load and verify the model ``models_dir/<name>`` on the runtime ``runtime`` chooses.

    Parameters
    ----------
    models_dir:
        Folder of the model files.
    name:
        Model name (file stem).
    threads:
        Intra-op threads of the runtime (0: its default; PyTorch's are set by the analyser for the process).
    runtime:
        ``"auto"``: ONNX Runtime when the manifest names an ONNX file, else PyTorch; ``"onnx"``: ONNX Runtime
        (an error when the model has no ONNX file); ``"torch"``: PyTorch.
    channels_last:
        PyTorch only: channels-last memory (see :class:`TorchNetwork`).

    Returns
    -------
    LoadedNetwork
        The network, its identity, manifest and runtime.

    Raises
    ------
    ModelError
        When a file is missing, unreadable or does not match its manifest's SHA-256, ``runtime`` is unknown,
        ``"onnx"`` is asked of a model without an ONNX file, or the runtime cannot load the network.
    """
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown network runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
    models_dir = Path(models_dir)
    manifest = read_manifest(models_dir, name)
    identity = ModelIdentity(name=manifest.name, version=manifest.version, sha256=manifest.sha256)
    use_onnx = runtime == "onnx" or (runtime == "auto" and manifest.onnx_sha256 is not None)
    if use_onnx:
        if manifest.onnx_sha256 is None:
            raise ModelError(
                f"model {name} has no ONNX file (its manifest has no onnx_sha256): run `dermnode export-onnx` "
                "or set analysis.network_runtime = \"torch\""
            )
        import onnxruntime as ort

        path = models_dir / f"{name}.onnx"
        network: Network = OnnxNetwork(read_verified(path, manifest.onnx_sha256), threads, where=str(path))
        label = f"onnxruntime {ort.__version__}"
    else:
        import torch

        from dermnode.inference.registry import load_model_bundle

        bundle = load_model_bundle(models_dir, name)
        network = TorchNetwork(bundle.module, channels_last=channels_last)
        label = f"torch {torch.__version__}"
    logger.info("model %s %s runs on %s (sha256 %s)", manifest.name, manifest.version, label, manifest.sha256[:12])
    return LoadedNetwork(network=network, identity=identity, manifest=manifest, runtime=label)
