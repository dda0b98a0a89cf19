"""SphereFace residual networks (Liu et al., CVPR 2017), the backbones of the SphereFace papers.

Four stages, each a stride-2 3x3 conv followed by residual units of two 3x3 convs, with
channels 64/128/256/512; 20 conv layers use units [1, 2, 4, 1], 64 use [3, 8, 16, 3]. The
last map is flattened into one FC layer, so the embedding keeps the face's spatial layout.

Choice: the 2017 nets had no normalisation; here every conv is followed by BatchNorm
(conv-BN-PReLU), as in the BN variants of the SphereFace2 authors' code, so that these nets
are less sensitive to initialisation and share one training recipe with the other (BN)
backbones. The convs drop their bias, since BN supplies the shift.
"""
from __future__ import annotations

import torch
from torch import nn

from sf2dist.models.registry import check_images, check_positive_int, halved_size, register_backbone

STAGE_CHANNELS = (64, 128, 256, 512)


def _conv_bn_prelu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels),
    )


class SphereResidualUnit(nn.Module):
    """x + (conv-BN-PReLU twice)(x): the identity shortcut of SphereFace's residual units."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(_conv_bn_prelu(channels, channels, 1), _conv_bn_prelu(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class SFNet(nn.Module):
    """Four stages of (stride-2 conv, residual units), then flatten and FC to the embedding."""

    def __init__(self, units_per_stage: tuple[int, ...], embedding_dim: int, input_size: int) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        stages = []
        in_channels = 3
        for out_channels, num_units in zip(STAGE_CHANNELS, units_per_stage):
            units = [SphereResidualUnit(out_channels) for _ in range(num_units)]
            stages.append(nn.Sequential(_conv_bn_prelu(in_channels, out_channels, 2), *units))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        final_size = halved_size(input_size, len(STAGE_CHANNELS))  # 7 for 112x112 images
        self.fc = nn.Linear(in_channels * final_size * final_size, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        return self.fc(self.stages(images).flatten(1))  # [B, embedding_dim]


@register_backbone("sfnet20")
def sfnet20(*, embedding_dim: int = 512, input_size: int = 112) -> SFNet:
    """SphereFace-20: units [1, 2, 4, 1]."""
    return SFNet((1, 2, 4, 1), embedding_dim, input_size)


@register_backbone("sfnet64")
def sfnet64(*, embedding_dim: int = 512, input_size: int = 112) -> SFNet:
    """SphereFace-64: units [3, 8, 16, 3]."""
    return SFNet((3, 8, 16, 3), embedding_dim, input_size)
