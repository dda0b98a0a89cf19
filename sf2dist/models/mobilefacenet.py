"""MobileFaceNet (Chen et al., 2018): about 1M parameters, for mobile and fast experiments.

MobileNetV2 bottlenecks with PReLU, and a global depthwise conv (GDConv) over the whole
last map instead of average pooling, because face embeddings need the position-dependent
weighting that averaging throws away.
"""
from __future__ import annotations

import torch
from torch import nn

from sf2dist.models.registry import check_images, check_positive_int, halved_size, register_backbone

# (expansion t, output channels c, repeats n, stride s of the first repeat), paper Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
STRIDE2_LAYERS = 4  # the stem conv and three bottleneck groups halve the map: 112 -> 7


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, prelu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if prelu:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 expand - 3x3 depthwise (stride) - linear 1x1 project; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.block = nn.Sequential(
            _conv_bn(in_channels, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            _conv_bn(hidden, out_channels, 1, prelu=False),
        )
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """Stem, bottlenecks, 1x1 conv to 512, GDConv, linear projection and BN to the embedding."""

    def __init__(self, embedding_dim: int, input_size: int) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        layers: list[nn.Module] = [_conv_bn(3, 64, 3, stride=2), _conv_bn(64, 64, 3, groups=64)]
        in_channels = 64
        for expansion, out_channels, repeats, stride in BOTTLENECKS:
            for repeat in range(repeats):
                layers.append(Bottleneck(in_channels, out_channels, expansion, stride if repeat == 0 else 1))
                in_channels = out_channels
        layers.append(_conv_bn(in_channels, 512, 1))
        self.features = nn.Sequential(*layers)
        final_size = halved_size(input_size, STRIDE2_LAYERS)  # 7 for 112x112 images
        # GDConv: one kxk depthwise filter per channel covering the whole map (linear, no PReLU).
        self.gdconv = nn.Sequential(nn.Conv2d(512, 512, final_size, groups=512, bias=False), nn.BatchNorm2d(512))
        # The paper's "linear 1x1 conv" on the 1x1 map, written as the Linear layer it is.
        self.projection = nn.Linear(512, embedding_dim, bias=False)
        self.output_norm = nn.BatchNorm1d(embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        x = self.gdconv(self.features(images)).flatten(1)  # [B, 512]
        return self.output_norm(self.projection(x))  # [B, embedding_dim]


@register_backbone("mobilefacenet")
def mobilefacenet(*, embedding_dim: int = 512, input_size: int = 112) -> MobileFaceNet:
    """MobileFaceNet; about 1.0M parameters at 128-d (the paper's size), 1.2M at 512-d."""
    return MobileFaceNet(embedding_dim, input_size)
