"""arcface_torch's convolutional networks under its names: r18/r34/r50/r100/r200, mbf, mbf_large.

Every module name and shape follows insightface's recognition/arcface_torch/backbones
(iresnet.py, mobilefacenet.py), so a `backbone.pth` trained there loads here with
`load_state_dict(strict=True)` and gives the same embeddings in eval mode. The mbf
initialisation is theirs; the r-networks' is not (see `ArcFaceIResNet`).

The r-networks are the same architecture as sf2dist's own `iresnet18/50/100` (`iresnet.py`)
with arcface_torch's module names. Those keep their names, so old sf2dist checkpoints load as
before; `arcface_keys_from_iresnet` renames an iresnet state_dict for the r-network of the same
depth. arcface_torch wraps these forwards in `autocast(fp16)`; here the engine chooses the
precision (`engine.precision`) and no module turns autocast on by itself.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from sf2dist.models.registry import check_dropout, check_images, check_positive_int, halved_size, register_backbone

IRESNET_CHANNELS = (64, 128, 256, 512)
# sf2dist iresnet name -> the r-network with the same blocks per stage (see arcface_keys_from_iresnet).
IRESNET_TO_ARCFACE = {"iresnet18": "r18", "iresnet50": "r50", "iresnet100": "r100"}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """arcface_torch's residual unit bn1-conv1-bn2-prelu-conv2(stride)-bn3; `downsample` when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ArcFaceIResNet(nn.Module):
    """conv1-bn1-prelu stem, `layer1..4` of `IBasicBlock`s (each starting with stride 2), bn2-dropout-fc-features."""

    def __init__(self, blocks_per_stage: tuple[int, ...], embedding_dim: int, input_size: int, dropout: float) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        in_channels = IRESNET_CHANNELS[0]
        self.conv1 = _conv3x3(3, in_channels)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.prelu = nn.PReLU(in_channels)
        for index, (out_channels, num_blocks) in enumerate(zip(IRESNET_CHANNELS, blocks_per_stage), start=1):
            blocks = [IBasicBlock(in_channels, out_channels, stride=2)]
            blocks += [IBasicBlock(out_channels, out_channels, stride=1) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = out_channels
        final_size = halved_size(input_size, len(IRESNET_CHANNELS))  # 7 for 112x112 images
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(in_channels * final_size * final_size, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        # arcface_torch draws every conv weight from N(0, 0.1): each 3x3 conv then multiplies the
        # scale by about 0.1 * sqrt(9 * channels) (5x at 256 channels), so in eval mode, where an
        # untrained BN does not normalise, r100/r200 overflow to inf before any training. torch's
        # default init is kept instead, as sf2dist's iresnet does; trained weights are unaffected.
        # Scale of the embedding BN fixed at 1 and kept in the state_dict, as in arcface_torch.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))  # [B, embedding_dim]


def arcface_keys_from_iresnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An sf2dist `iresnet18/50/100` state_dict under the key names of `r18/r50/r100` (same tensors).

    A key that is not an iresnet key raises a `ValueError` naming it.
    """
    residual = ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")
    renamed = {}
    for key, tensor in state_dict.items():
        if match := re.fullmatch(r"stem\.([012])\.(.+)", key):
            new = f"{('conv1', 'bn1', 'prelu')[int(match[1])]}.{match[2]}"
        elif match := re.fullmatch(r"stages\.(\d+)\.(\d+)\.residual\.([0-5])\.(.+)", key):
            new = f"layer{int(match[1]) + 1}.{match[2]}.{residual[int(match[3])]}.{match[4]}"
        elif match := re.fullmatch(r"stages\.(\d+)\.(\d+)\.shortcut\.([01])\.(.+)", key):
            new = f"layer{int(match[1]) + 1}.{match[2]}.downsample.{match[3]}.{match[4]}"
        elif match := re.fullmatch(r"output_norm\.(.+)", key):
            new = f"bn2.{match[1]}"
        elif re.fullmatch(r"(fc|features)\..+", key):
            new = key
        else:
            raise ValueError(
                f"{key!r} is not a key of an sf2dist iresnet state_dict; cannot rename it for arcface_torch"
            )
        renamed[new] = tensor
    return renamed


@register_backbone("r18")
def r18(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceIResNet:
    """arcface_torch r18: blocks [2, 2, 2, 2]."""
    return ArcFaceIResNet((2, 2, 2, 2), embedding_dim, input_size, dropout)


@register_backbone("r34")
def r34(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceIResNet:
    """arcface_torch r34: blocks [3, 4, 6, 3]."""
    return ArcFaceIResNet((3, 4, 6, 3), embedding_dim, input_size, dropout)


@register_backbone("r50")
def r50(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceIResNet:
    """arcface_torch r50: blocks [3, 4, 14, 3]."""
    return ArcFaceIResNet((3, 4, 14, 3), embedding_dim, input_size, dropout)


@register_backbone("r100")
def r100(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceIResNet:
    """arcface_torch r100: blocks [3, 13, 30, 3]."""
    return ArcFaceIResNet((3, 13, 30, 3), embedding_dim, input_size, dropout)


@register_backbone("r200")
def r200(*, embedding_dim: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceIResNet:
    """arcface_torch r200: blocks [6, 26, 60, 6]."""
    return ArcFaceIResNet((6, 26, 60, 6), embedding_dim, input_size, dropout)


class ConvUnit(nn.Module):
    """conv-BN, with PReLU unless `linear`, held as `.layers` (arcface_torch's ConvBlock / LinearBlock)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        linear: bool = False,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthwiseUnit(nn.Module):
    """1x1 to `hidden` channels - 3x3 depthwise (stride) - linear 1x1 to `out_channels` (arcface_torch's DepthWise).

    Unlike MobileNetV2's expansion t, `hidden` is an absolute width (128/256/512 in mbf and mbf_large
    alike), so in mbf_large's first stages the "expansion" narrows 256 channels to 128.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(in_channels, hidden),
            ConvUnit(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvUnit(hidden, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """`num_blocks` stride-1 residual `DepthwiseUnit`s of constant width, as `.layers` (arcface_torch's Residual)."""

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthwiseUnit(channels, channels, hidden, stride=1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EmbeddingHead(nn.Module):
    """Global depthwise conv over the whole last map, then Linear and BN1d to the embedding (arcface_torch's GDC)."""

    def __init__(self, channels: int, map_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(channels, channels, map_size, groups=channels, linear=True, padding=0),
            nn.Flatten(),
            nn.Linear(channels, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ArcFaceMobileFaceNet(nn.Module):
    """arcface_torch's MobileFaceNet: `layers` (stem and four stages), `conv_sep` to 512 channels, `features` (GDC).

    `blocks` are the residual units of the four stages and `scale` multiplies the 64/128 widths:
    mbf (1, 4, 6, 2) x2, mbf_large (2, 8, 12, 4) x4. With a first-stage count of 1 the stage is a
    plain grouped conv instead of a residual stack, as there.
    """

    def __init__(self, blocks: tuple[int, int, int, int], scale: int, embedding_dim: int, input_size: int) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        narrow, wide = 64 * scale, 128 * scale
        first_stage: nn.Module = (
            ConvUnit(narrow, narrow, 3, groups=64) if blocks[0] == 1 else ResidualStack(narrow, blocks[0], hidden=128)
        )
        self.layers = nn.ModuleList(
            [
                ConvUnit(3, narrow, 3, stride=2),
                first_stage,
                DepthwiseUnit(narrow, narrow, hidden=128, stride=2, residual=False),
                ResidualStack(narrow, blocks[1], hidden=128),
                DepthwiseUnit(narrow, wide, hidden=256, stride=2, residual=False),
                ResidualStack(wide, blocks[2], hidden=256),
                DepthwiseUnit(wide, wide, hidden=512, stride=2, residual=False),
                ResidualStack(wide, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvUnit(wide, 512)
        self.features = EmbeddingHead(512, halved_size(input_size, 4), embedding_dim)  # 7x7 map at 112x112
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        x = images
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))  # [B, embedding_dim]


@register_backbone("mbf")
def mbf(*, embedding_dim: int = 512, input_size: int = 112) -> ArcFaceMobileFaceNet:
    """arcface_torch mbf: MobileFaceNet with blocks (1, 4, 6, 2), widths x2."""
    return ArcFaceMobileFaceNet((1, 4, 6, 2), 2, embedding_dim, input_size)


@register_backbone("mbf_large")
def mbf_large(*, embedding_dim: int = 512, input_size: int = 112) -> ArcFaceMobileFaceNet:
    """arcface_torch mbf_large: MobileFaceNet with blocks (2, 8, 12, 4), widths x4."""
    return ArcFaceMobileFaceNet((2, 8, 12, 4), 4, embedding_dim, input_size)
