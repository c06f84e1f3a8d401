"""Export a trained model to ONNX, so that the service runs it on ONNX Runtime without torch.

:func:`export_onnx` loads ``<name>.pt`` (SHA-256 verified, float32 in eval mode), exports the network with the
PyTorch exporter (opset 17, batch/height/width dynamic, batch normalisation kept as its own operator so that every
stored weight is one of the trained float16 values), stores each float32 weight as float16 with a ``Cast`` back
to float32 in front of the graph (ONNX Runtime folds the casts when it loads the model: the computation is float32,
the file half the size), checks that ONNX Runtime gives PyTorch's outputs on random inputs (every shape the model
is used at), then writes ``<name>.onnx`` and records its SHA-256 as ``onnx_sha256`` in ``<name>.json``. The
model's identity (``sha256`` of the ``.pt`` file) does not change.

Needs ``torch`` and ``onnx`` (the ``train`` extra); the service needs only ``onnxruntime``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dermnode.errors import ModelError
from dermnode.inference.manifest import read_manifest
from dermnode.inference.networks import OnnxNetwork

logger = logging.getLogger(__name__)

__all__ = ["ONNX_OPSET", "TOLERANCE", "export_onnx"]

#: ONNX operator set of the exported graphs.
ONNX_OPSET = 17
#: Largest absolute difference allowed between PyTorch's and ONNX Runtime's outputs (logits) on the check inputs.
TOLERANCE = 1e-3
#: Float32 tensors with fewer elements stay float32 (scalars and shapes of the graph's own arithmetic).
_MIN_FP16_ELEMENTS = 16


def _store_float16(model: Any) -> int:
    """Replace every float32 weight by its float16 copy plus a ``Cast`` to float32; returns how many.

    Raises
    ------
    ModelError
        When a weight is not exactly a float16 value (it would change).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    kept, casts = [], []
    for tensor in graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype == np.float32 and value.size >= _MIN_FP16_ELEMENTS:
            half = value.astype(np.float16)
            if not np.array_equal(half.astype(np.float32), value):
                raise ModelError(f"weight {tensor.name} is not a float16 value: storing it so would change it")
            kept.append(numpy_helper.from_array(half, f"{tensor.name}__fp16"))
            casts.append(helper.make_node("Cast", [f"{tensor.name}__fp16"], [tensor.name], to=TensorProto.FLOAT,
                                          name=f"{tensor.name}__to_float32"))
        else:
            kept.append(tensor)
    nodes = list(graph.node)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend([*casts, *nodes])
    return len(casts)


def export_onnx(models_dir: Path, name: str, *, seed: int = 0) -> Path:
    """Write ``models_dir/<name>.onnx`` from ``<name>.pt`` and record its SHA-256 in ``<name>.json``.

    Parameters
    ----------
    models_dir:
        Folder of the model files.
    name:
        Model name (file stem).
    seed:
        Seed of the random check inputs.

    Returns
    -------
    pathlib.Path
        The ONNX file.

    Raises
    ------
    ModelError
        When the model cannot be loaded or exported, a weight is not a float16 value, ONNX Runtime's outputs
        differ from PyTorch's by more than :data:`TOLERANCE`, or the files cannot be written.
    """
    import onnx
    import torch

    from dermnode.inference.registry import load_model_bundle

    models_dir = Path(models_dir)
    bundle = load_model_bundle(models_dir, name)
    module = bundle.module.eval()
    h, w = bundle.manifest.input_size
    shapes = [(1, 3, h, w), (2, 3, h, w)]
    if bundle.manifest.extra.get("frame_follows_orientation") and h != w:
        shapes.append((1, 3, w, h))  # portrait images go in the turned frame
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*s, generator=generator) for s in shapes]
    with torch.inference_mode():
        first = module(inputs[0])
    n_out = len(first) if isinstance(first, tuple | list) else 1
    output_names = ["logits"] if n_out == 1 else (["melanoma", "diagnosis"] if n_out == 2 else
                                                   [f"output{i}" for i in range(n_out)])
    try:
        with tempfile.TemporaryDirectory(prefix="dermnode-onnx-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own deprecation and on folding
            exported = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(
                module, (inputs[0],), exported, dynamo=False, opset_version=ONNX_OPSET, input_names=["input"],
                output_names=output_names, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                              **{o: {0: "batch"} for o in output_names}},
            )
            model = onnx.load(str(exported))
        n_fp16 = _store_float16(model)
        onnx.checker.check_model(model)
    except ModelError:
        raise
    except Exception as exc:  # the exporter and the checker raise many types
        raise ModelError(f"cannot export model {name} to ONNX: {exc}") from exc
    data = model.SerializeToString()
    runtime = OnnxNetwork(data, threads=1, where=f"{name}.onnx")
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            ref = module(x)
        refs = ref if isinstance(ref, tuple | list) else (ref,)
        got = runtime(x.numpy())
        for r, g in zip(refs, got, strict=True):
            if tuple(r.shape) != g.shape:
                raise ModelError(f"ONNX output shape {g.shape} != PyTorch's {tuple(r.shape)} "
                                 f"for input {tuple(x.shape)}")
            worst = max(worst, float(np.abs(r.float().numpy() - g).max()))
    if worst > TOLERANCE:
        raise ModelError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE}) on model {name}")
    digest = hashlib.sha256(data).hexdigest()
    manifest_path = models_dir / f"{name}.json"
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        raw["onnx_sha256"] = digest
        out = models_dir / f"{name}.onnx"
        out.write_bytes(data)
        manifest_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot write the ONNX export of {name} to {models_dir}: {exc}") from exc
    read_manifest(models_dir, name)  # still a valid manifest
    logger.info("exported %s %s to ONNX (%d bytes, %d float16 weights, max |difference| %.1e, sha256 %s)",
                bundle.manifest.name, bundle.manifest.version, len(data), n_fp16, worst, digest[:12])
    return out
