"""Network runtimes: the shipped models on ONNX Runtime, verified files, clear refusals, no torch in the service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dermnode.errors import ModelError
from dermnode.inference.networks import OnnxNetwork, load_network

MODELS = Path(__file__).resolve().parents[2] / "models"


def _shipped_with_onnx() -> list[str]:
    return [p.stem for p in sorted(MODELS.glob("*.json"))
            if not p.name.endswith(".calibration.json") and json.loads(p.read_text()).get("onnx_sha256")]


def test_shipped_onnx_models_match_their_pytorch_weights() -> None:
    names = _shipped_with_onnx()
    assert "segmentation" in names, "the shipped segmentation model runs on ONNX Runtime"
    rng = np.random.default_rng(0)
    for name in names:
        onnx_net = load_network(MODELS, name)
        torch_net = load_network(MODELS, name, runtime="torch")
        assert isinstance(onnx_net.network, OnnxNetwork)
        assert onnx_net.identity == torch_net.identity  # the trained weights' identity, whichever runtime
        h, w = onnx_net.manifest.input_size
        x = rng.normal(0, 1, (2, 3, h, w)).astype(np.float32)
        for a, b in zip(onnx_net.network(x), torch_net.network(x), strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-3


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    for suffix in (".json", ".onnx", ".pt"):
        shutil.copy(MODELS / f"segmentation{suffix}", tmp_path / f"segmentation{suffix}")
    return tmp_path


def test_corrupt_or_missing_onnx_file_is_refused(copied: Path) -> None:
    data = bytearray((copied / "segmentation.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copied / "segmentation.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_network(copied, "segmentation")
    (copied / "segmentation.onnx").unlink()
    with pytest.raises(ModelError, match="is missing"):
        load_network(copied, "segmentation")
    assert load_network(copied, "segmentation", runtime="torch").runtime.startswith("torch ")  # the .pt still works


def test_onnx_required_of_a_model_without_it(copied: Path) -> None:
    manifest = json.loads((copied / "segmentation.json").read_text())
    del manifest["onnx_sha256"]
    (copied / "segmentation.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="has no ONNX file"):
        load_network(copied, "segmentation", runtime="onnx")
    assert load_network(copied, "segmentation").runtime.startswith("torch ")  # auto falls back
    with pytest.raises(ModelError, match="unknown network runtime"):
        load_network(copied, "segmentation", runtime="tensorflow")


def test_service_analyser_does_not_import_torch_when_every_model_has_onnx() -> None:
    """The point of the ONNX files: the service process never loads PyTorch (~700 MB resident with its CUDA
    libraries) when the models it uses ship with ONNX."""
    names = _shipped_with_onnx()
    if not {"segmentation", "classifier"} <= set(names):
        pytest.skip(f"not every default model ships as ONNX yet: {names}")
    code = ("import sys; from dermnode.inference.analyzer import Analyzer; from dermnode.settings import "
            "AnalysisSettings; a = Analyzer(AnalysisSettings()); print(sorted(m for m in sys.modules "
            "if m == 'torch' or m.startswith(('torch.', 'timm', 'segmentation_models_pytorch', 'torchvision'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout[-500:]


def test_model_cards_name_the_shipped_files_digests() -> None:
    """A reader of the card can check the files: the card of each default model quotes the SHA-256 of its weights
    and of its ONNX export, as the manifest records them."""
    for name in ("segmentation", "classifier"):
        manifest = json.loads((MODELS / f"{name}.json").read_text())
        card = (MODELS / f"{name}.md").read_text()
        assert manifest["sha256"] in card, f"{name}.md lacks the sha256 of {name}.pt"
        if manifest.get("onnx_sha256"):
            assert manifest["onnx_sha256"] in card, f"{name}.md lacks the sha256 of {name}.onnx"
