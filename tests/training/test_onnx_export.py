"""ONNX export of trained models: same outputs as PyTorch, float16-exact weights, manifest and identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dermnode.errors import ModelError
from dermnode.inference.classification import Classifier
from dermnode.inference.classifier_models import DermNet, save_classifier
from dermnode.inference.networks import OnnxNetwork, TorchNetwork, load_network
from dermnode.inference.registry import build_architecture, save_model_bundle, sha256_file
from dermnode.inference.segmentation import Segmenter
from dermnode.settings import AnalysisSettings
from dermnode.training.onnx_export import _store_float16, export_onnx

KWARGS = {"widths": [8, 8, 8, 8, 8]}


def _segmenter_files(folder: Path, **extra: object) -> Path:
    torch.manual_seed(0)
    net = build_architecture("lite_unet", KWARGS)
    save_model_bundle(net, folder, name="toy", version="0.0.1", arch="lite_unet", arch_kwargs=KWARGS,
                      input_size=(64, 96), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      extra={"threshold": 0.5, **extra})
    return folder


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (200, 150, 130), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2] = (90, 60, 50)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def test_segmentation_export_matches_pytorch(tmp_path: Path) -> None:
    folder = _segmenter_files(tmp_path, frame_follows_orientation=True, tta=True)
    identity_before = json.loads((folder / "toy.json").read_text())["sha256"]
    out = export_onnx(folder, "toy")
    manifest = json.loads((folder / "toy.json").read_text())
    assert out == folder / "toy.onnx" and manifest["onnx_sha256"] == sha256_file(out)
    assert manifest["sha256"] == identity_before == sha256_file(folder / "toy.pt")  # identity unchanged
    onnx_net = load_network(folder, "toy")  # auto: the ONNX file is there
    torch_net = load_network(folder, "toy", runtime="torch")
    assert isinstance(onnx_net.network, OnnxNetwork) and onnx_net.runtime.startswith("onnxruntime ")
    assert isinstance(torch_net.network, TorchNetwork) and torch_net.runtime.startswith("torch ")
    assert onnx_net.identity == torch_net.identity
    for shape in ((300, 400), (400, 300)):  # landscape, and portrait in the turned frame (dynamic height/width)
        rgb = _rgb(*shape)
        p_onnx = Segmenter(onnx_net).predict_probability(rgb)
        p_torch = Segmenter(torch_net).predict_probability(rgb)
        assert p_onnx.shape == p_torch.shape == ((64, 96) if shape[0] < shape[1] else (96, 64))
        assert np.abs(p_onnx - p_torch).max() < 1e-4
    # the export is reproducible: the same bytes from the same weights
    export_onnx(folder, "toy")
    assert sha256_file(folder / "toy.onnx") == manifest["onnx_sha256"]


def test_float16_storage_keeps_the_trained_values(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    folder = _segmenter_files(tmp_path)
    export_onnx(folder, "toy")
    model = onnx.load(str(folder / "toy.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = torch.load(folder / "toy.pt", weights_only=True)
    halves = [v for v in stored.values() if v.dtype == np.float16]
    assert len(halves) >= len([v for v in state.values() if v.is_floating_point() and v.numel() >= 16]) // 2
    conv = state["enc.0.0.weight"] if "enc.0.0.weight" in state else next(
        v for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    assert any(v.shape == tuple(conv.shape) and np.array_equal(v, conv.numpy()) for v in halves)
    # a weight that is not a float16 value is refused rather than rounded
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [32])],
        [numpy_helper.from_array(np.full(32, 0.1, np.float32), "w")]))
    with pytest.raises(ModelError, match="not a float16 value"):
        _store_float16(bad)


def test_classifier_export_gives_the_same_classification(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = DermNet("dermnet-xs").eval()
    save_classifier(net, tmp_path, input_size=64, temperatures=(1.3, 0.9), version="0.0.2", tta=True)
    rgb = _rgb(240, 320, seed=3)
    mask = np.zeros(rgb.shape[:2], bool)
    mask[80:160, 110:210] = True
    on_torch = Classifier(tmp_path, AnalysisSettings(network_runtime="torch")).classify(rgb, mask)
    export_onnx(tmp_path, "classifier")
    clf = Classifier(tmp_path)  # auto: ONNX Runtime now
    assert clf.runtime.startswith("onnxruntime ")
    on_onnx = clf.classify(rgb, mask)
    assert on_onnx.melanoma_probability == pytest.approx(on_torch.melanoma_probability, abs=1e-5)
    for c, p in on_torch.diagnosis_probabilities.items():
        assert on_onnx.diagnosis_probabilities[c] == pytest.approx(p, abs=1e-5)
    assert on_onnx.band == on_torch.band


def test_new_weights_drop_the_old_export(tmp_path: Path) -> None:
    folder = _segmenter_files(tmp_path)
    export_onnx(folder, "toy")
    _segmenter_files(folder)  # retrained: new .pt and manifest
    assert not (folder / "toy.onnx").exists()
    assert "onnx_sha256" not in json.loads((folder / "toy.json").read_text())
    assert isinstance(load_network(folder, "toy").network, TorchNetwork)
