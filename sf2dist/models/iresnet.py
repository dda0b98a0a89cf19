"""Improved ResNets (IR-18/50/100) of ArcFace (Deng et al., CVPR 2019), the usual FR backbone.

Compared with an ImageNet ResNet: a 3x3 stride-1 stem keeps the 112x112 resolution for the
first stage, the residual branch is BN-conv-BN-PReLU-conv-BN with the stride on its second
conv, and the output block is BN-dropout-FC-BN (the paper's option "E") so the spatial
layout of the last 7x7 map reaches the embedding instead of being averaged away.
"""
from __future__ import annotations

import torch
from torch import nn

from sf2dist.models.registry import check_dropout, check_images, check_positive_int, halved_size, register_backbone

STAGE_CHANNELS = (64, 128, 256, 512)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """Residual unit BN-conv-BN-PReLU-conv(stride)-BN, with a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            _conv3x3(in_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            _conv3x3(out_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IResNet(nn.Module):
    """Stem, four stride-2 stages of `IRBlock`s, and the BN-dropout-FC-BN embedding layer."""

    def __init__(self, blocks_per_stage: tuple[int, ...], embedding_dim: int, input_size: int, dropout: float) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        in_channels = STAGE_CHANNELS[0]
        self.stem = nn.Sequential(_conv3x3(3, in_channels), nn.BatchNorm2d(in_channels), nn.PReLU(in_channels))
        stages = []
        for out_channels, num_blocks in zip(STAGE_CHANNELS, blocks_per_stage):
            blocks = [IRBlock(in_channels, out_channels, stride=2)]
            blocks += [IRBlock(out_channels, out_channels, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        final_size = halved_size(input_size, len(STAGE_CHANNELS))  # 7 for 112x112 images
        self.output_norm = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(in_channels * final_size * final_size, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        # The final BN's scale is fixed at 1, as in the implementations behind the published
        # IR numbers (MXNet's fix_gamma, arcface_torch); it is kept in the state_dict.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        x = self.stages(self.stem(images))
        x = self.dropout(self.output_norm(x)).flatten(1)
        return self.features(self.fc(x))  # [B, embedding_dim]


@register_backbone("iresnet18")
def iresnet18(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IR-18: blocks [2, 2, 2, 2]."""
    return IResNet((2, 2, 2, 2), embedding_dim, input_size, dropout)


@register_backbone("iresnet50")
def iresnet50(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IR-50: blocks [3, 4, 14, 3], about 43.6M parameters at 512-d."""
    return IResNet((3, 4, 14, 3), embedding_dim, input_size, dropout)


@register_backbone("iresnet100")
def iresnet100(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IR-100: blocks [3, 13, 30, 3], about 65.2M parameters at 512-d."""
    return IResNet((3, 13, 30, 3), embedding_dim, input_size, dropout)
