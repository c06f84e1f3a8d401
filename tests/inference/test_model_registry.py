"""Model files: export, verified loading, refusal of missing/corrupt/mismatching files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dermnode.errors import ModelError
from dermnode.inference.registry import (
    available_architectures,
    load_model_bundle,
    save_model_bundle,
    sha256_file,
)

KWARGS = {"widths": [8, 8, 8, 8, 8]}


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    from dermnode.inference.registry import build_architecture

    torch.manual_seed(0)
    net = build_architecture("lite_unet", KWARGS)
    save_model_bundle(
        net,
        tmp_path,
        name="toy",
        version="0.0.1",
        arch="lite_unet",
        arch_kwargs=KWARGS,
        input_size=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        extra={"threshold": 0.4},
    )
    return tmp_path


def test_roundtrip(exported: Path) -> None:
    bundle = load_model_bundle(exported, "toy")
    manifest = json.loads((exported / "toy.json").read_text())
    assert manifest["sha256"] == sha256_file(exported / "toy.pt")
    assert bundle.identity.name == "toy" and bundle.identity.version == "0.0.1"
    assert bundle.identity.sha256 == manifest["sha256"]
    assert bundle.manifest.input_size == (64, 64)
    assert bundle.manifest.extra["threshold"] == 0.4
    assert not bundle.module.training
    assert all(p.dtype == torch.float32 for p in bundle.module.parameters())
    out = bundle.module(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    # stored as float16
    state = torch.load(exported / "toy.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert "lite_unet" in available_architectures()


def test_missing_weights(exported: Path) -> None:
    (exported / "toy.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model_bundle(exported, "toy")


def test_missing_manifest(exported: Path) -> None:
    (exported / "toy.json").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model_bundle(exported, "toy")


def test_corrupted_weights(exported: Path) -> None:
    data = bytearray((exported / "toy.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (exported / "toy.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model_bundle(exported, "toy")


def test_hash_mismatch_in_manifest(exported: Path) -> None:
    doc = json.loads((exported / "toy.json").read_text())
    doc["sha256"] = "0" * 64
    (exported / "toy.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_model_bundle(exported, "toy")


def test_invalid_manifest_and_unknown_arch(exported: Path) -> None:
    doc = json.loads((exported / "toy.json").read_text())
    (exported / "toy.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read"):
        load_model_bundle(exported, "toy")
    doc["arch"] = "no_such_arch"
    (exported / "toy.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="unknown model architecture"):
        load_model_bundle(exported, "toy")
    del doc["version"]
    (exported / "toy.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="invalid"):
        load_model_bundle(exported, "toy")


def test_weights_of_other_architecture(exported: Path) -> None:
    doc = json.loads((exported / "toy.json").read_text())
    doc["arch_kwargs"] = {"widths": [16, 16, 16, 16, 16]}
    (exported / "toy.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="do not fit"):
        load_model_bundle(exported, "toy")


@pytest.mark.parametrize("module", ["dermnode.training.segmentation", "dermnode.evaluation.runner", "os"])
def test_manifest_may_import_runtime_code_only(exported: Path, module: str) -> None:
    path = exported / "toy.json"
    doc = json.loads(path.read_text())
    doc["arch_module"] = module
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"outside dermnode\.inference"):
        load_model_bundle(exported, "toy")
