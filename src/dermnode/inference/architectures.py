"""Neural network architectures shipped with dermnode.

Every architecture is registered under a short name with
:func:`dermnode.inference.registry.register_architecture`; a model manifest names the architecture
(``"arch"``) and its constructor keyword arguments (``"arch_kwargs"``), and
:func:`dermnode.inference.registry.load_model_bundle` rebuilds the module from them.

Architectures here
------------------
``lite_unet``
    A compact U-Net for binary lesion segmentation built from depthwise-separable convolutions
    (:class:`LiteUNet`). About 0.4 M parameters at the default width; one 256x256 image runs in a few tens
    of milliseconds on two CPU cores.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dermnode.inference.registry import register_architecture

logger = logging.getLogger(__name__)


class ConvBNAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` (the convolution has no bias)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SeparableBlock(nn.Module):
    """Two depthwise-separable 3x3 convolutions with a residual connection.

    Parameters
    ----------
    cin, cout:
        Input and output channels.
    stride:
        Stride of the first depthwise convolution (2 halves the resolution).
    dilation:
        Dilation of the second depthwise convolution (enlarges the receptive field cheaply).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.dw1 = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin)
        )
        self.pw1 = ConvBNAct(cin, cout, kernel=1)
        self.dw2 = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, groups=cout, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.pw2 = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        if stride == 1 and cin == cout:
            self.skip: nn.Module = nn.Identity()
        else:
            layers: list[nn.Module] = []
            if stride != 1:
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True))
            layers += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.skip = nn.Sequential(*layers)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw1(self.dw1(x))
        y = self.pw2(self.dw2(y))
        return self.act(y + self.skip(x))


class LiteUNet(nn.Module):
    """Compact U-Net with depthwise-separable residual blocks, one output logit per pixel.

    The input height and width must be multiples of 32 (five stride-2 stages). The output has the
    input's spatial size.

    Parameters
    ----------
    widths:
        Channels of the five encoder stages (strides 2, 4, 8, 16, 32).
    in_channels:
        Input channels (3 for RGB).
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = (16, 32, 48, 96, 160), in_channels: int = 3) -> None:
        super().__init__()
        w = list(widths)
        if len(w) != 5:
            raise ValueError("LiteUNet needs exactly five stage widths")
        self.stem = nn.Sequential(ConvBNAct(in_channels, w[0], stride=2), SeparableBlock(w[0], w[0]))
        self.enc2 = nn.Sequential(SeparableBlock(w[0], w[1], stride=2), SeparableBlock(w[1], w[1]))
        self.enc3 = nn.Sequential(SeparableBlock(w[1], w[2], stride=2), SeparableBlock(w[2], w[2]))
        self.enc4 = nn.Sequential(SeparableBlock(w[2], w[3], stride=2), SeparableBlock(w[3], w[3], dilation=2))
        self.enc5 = nn.Sequential(
            SeparableBlock(w[3], w[4], stride=2),
            SeparableBlock(w[4], w[4], dilation=2),
            SeparableBlock(w[4], w[4], dilation=4),
        )
        # global context: image-level pooling added back to the bottleneck (cheap ASPP-like term)
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w[4], w[4], 1), nn.Sigmoid())
        self.dec4 = SeparableBlock(w[4] + w[3], w[3])
        self.dec3 = SeparableBlock(w[3] + w[2], w[2])
        self.dec2 = SeparableBlock(w[2] + w[1], w[1])
        self.dec1 = SeparableBlock(w[1] + w[0], w[0])
        self.head = nn.Sequential(ConvBNAct(w[0] + in_channels, w[0]), nn.Conv2d(w[0], 1, 1))

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)  # /2
        s2 = self.enc2(s1)  # /4
        s3 = self.enc3(s2)  # /8
        s4 = self.enc4(s3)  # /16
        s5 = self.enc5(s4)  # /32
        s5 = s5 * self.context(s5)
        d = self.dec4(self._up_cat(s5, s4))
        d = self.dec3(self._up_cat(d, s3))
        d = self.dec2(self._up_cat(d, s2))
        d = self.dec1(self._up_cat(d, s1))
        d = self._up_cat(d, x)
        out: torch.Tensor = self.head(d)
        return out


@register_architecture("lite_unet")
def build_lite_unet(widths: list[int] | None = None, in_channels: int = 3) -> nn.Module:
    """Build a :class:`LiteUNet` (registered as ``"lite_unet"``).

    Parameters
    ----------
    widths:
        Five stage widths; default ``(16, 32, 48, 96, 160)``.
    in_channels:
        Input channels.

    Returns
    -------
    torch.nn.Module
        The untrained network.
    """
    return LiteUNet(tuple(widths) if widths is not None else (16, 32, 48, 96, 160), in_channels=in_channels)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: ``(mean, std)`` on 0..1 RGB that the TensorFlow EfficientNet-Lite weights expect: ``(x - 127) / 128``.
EFFICIENTNET_LITE_NORMALISATION: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (127 / 255,) * 3,
    (128 / 255,) * 3,
)

#: Encoders of :func:`build_smp_unet` and the normalisation of 0..1 RGB their pretrained weights expect.
SMP_ENCODERS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "tu-tf_efficientnet_lite0": EFFICIENTNET_LITE_NORMALISATION,
}


@register_architecture("smp_unet")
def build_smp_unet(
    encoder: str = "tu-tf_efficientnet_lite0", decoder_channels: list[int] | None = None, in_channels: int = 3
) -> nn.Module:
    """A segmentation-models-pytorch U-Net (one output logit per pixel), registered as ``"smp_unet"``.

    Parameters
    ----------
    encoder:
        smp encoder name (a key of :data:`SMP_ENCODERS`); timm encoders are spelled ``tu-<timm name>``.
    decoder_channels:
        Channels of the five decoder stages; default ``(48, 32, 24, 16, 8)``, sized for a CPU.
    in_channels:
        Input channels.

    Returns
    -------
    torch.nn.Module
        The untrained network (no weights are downloaded: pretrained encoders are loaded at training time).

    Raises
    ------
    ValueError
        When ``encoder`` is not listed.
    """
    if encoder not in SMP_ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r} (known: {', '.join(SMP_ENCODERS)})")
    import segmentation_models_pytorch as smp  # runtime dependency of this architecture only

    channels = tuple(decoder_channels) if decoder_channels is not None else (48, 32, 24, 16, 8)
    module: nn.Module = smp.Unet(
        encoder_name=encoder, encoder_weights=None, decoder_channels=channels, in_channels=in_channels, classes=1
    )
    return module
