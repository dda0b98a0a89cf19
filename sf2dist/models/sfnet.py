"""SphereFace networks (Liu et al., CVPR 2017), the backbones of the SphereFace papers.

Four stages, each a stride-2 3x3 conv followed by residual units of two 3x3 convs, with
channels 64/128/256/512; the 4-layer net has only the four stride-2 convs, and 20, 36 and 64
conv layers use units [1, 2, 4, 1], [2, 4, 8, 2] and [3, 8, 16, 3]. The last map is
flattened into one FC layer, so the embedding keeps the face's spatial layout.

`norm` picks between two forms of every net:

- `batch` (the default): every conv is followed by BatchNorm (conv-BN-PReLU), as in the BN
  variants of the SphereFace2 authors' code, so that the nets are less sensitive to
  initialisation and share one training recipe with the other (BN) backbones. The convs drop
  their bias, since BN supplies the shift. PyTorch's default initialisation.
- `none`: the original nets, conv-PReLU with biased convs and no normalisation (the
  SphereFace2 paper's comparison table trains SFNet-20 this way). Without BN nothing rescales
  the activations, so these nets take the original Caffe initialisation, which is what makes
  them train: the stride-2 convs and the FC use Caffe's "xavier" filler, U(+-sqrt(3 / fan_in)),
  which keeps a layer's output about as large as its input (PReLU then roughly halves the
  second moment, so the four stages shrink it by about 0.5^4 and never blow it up); the
  residual convs are N(0, 0.01^2), so at init every unit adds only a few percent to its
  input and even the 64-layer net starts close to the 4-layer one instead of growing with
  depth. All biases start at 0 and the PReLU slopes at 0.25 (Caffe's and PyTorch's default).
"""
from __future__ import annotations

import torch
from torch import nn

from sf2dist.models.registry import check_images, check_positive_int, halved_size, register_backbone

STAGE_CHANNELS = (64, 128, 256, 512)
NORMS = ("batch", "none")
RESIDUAL_CONV_STD = 0.01  # the original nets' Gaussian filler for the residual units' convs


def check_norm(value: object) -> str:
    """`value` if it names a supported normalisation, else a `ValueError` listing them."""
    if not isinstance(value, str) or value not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {value!r}")
    return value


def _conv_prelu(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    """3x3 conv, then BatchNorm when `norm` is 'batch', then PReLU."""
    if norm == "batch":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.PReLU(out_channels)
    )


class SphereResidualUnit(nn.Module):
    """x + (conv-[BN-]PReLU twice)(x): the identity shortcut of SphereFace's residual units."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            _conv_prelu(channels, channels, 1, norm), _conv_prelu(channels, channels, 1, norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class SFNet(nn.Module):
    """Four stages of (stride-2 conv, residual units), then flatten and FC to the embedding."""

    def __init__(
        self, units_per_stage: tuple[int, ...], embedding_dim: int, input_size: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        self.norm = check_norm(norm)
        stages = []
        in_channels = 3
        for out_channels, num_units in zip(STAGE_CHANNELS, units_per_stage):
            units = [SphereResidualUnit(out_channels, norm) for _ in range(num_units)]
            stages.append(nn.Sequential(_conv_prelu(in_channels, out_channels, 2, norm), *units))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        final_size = halved_size(input_size, len(STAGE_CHANNELS))  # 7 for 112x112 images
        self.fc = nn.Linear(in_channels * final_size * final_size, embedding_dim)
        if norm == "none":
            self._init_as_the_original_nets()

    def _init_as_the_original_nets(self) -> None:
        """The Caffe fillers of the SphereFace release; see the module docstring for why."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Caffe's "xavier": U(+-sqrt(3 / fan_in)), i.e. PyTorch's Kaiming-uniform with gain 1.
                nn.init.kaiming_uniform_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SphereResidualUnit):
                for conv in module.modules():
                    if isinstance(conv, nn.Conv2d):
                        nn.init.normal_(conv.weight, std=RESIDUAL_CONV_STD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        return self.fc(self.stages(images).flatten(1))  # [B, embedding_dim]


@register_backbone("sfnet4")
def sfnet4(*, embedding_dim: int = 512, input_size: int = 112, norm: str = "batch") -> SFNet:
    """SphereFace-4: the four stride-2 convs only, no residual units."""
    return SFNet((0, 0, 0, 0), embedding_dim, input_size, norm)


@register_backbone("sfnet20")
def sfnet20(*, embedding_dim: int = 512, input_size: int = 112, norm: str = "batch") -> SFNet:
    """SphereFace-20: units [1, 2, 4, 1]."""
    return SFNet((1, 2, 4, 1), embedding_dim, input_size, norm)


@register_backbone("sfnet36")
def sfnet36(*, embedding_dim: int = 512, input_size: int = 112, norm: str = "batch") -> SFNet:
    """SphereFace-36: units [2, 4, 8, 2]."""
    return SFNet((2, 4, 8, 2), embedding_dim, input_size, norm)


@register_backbone("sfnet64")
def sfnet64(*, embedding_dim: int = 512, input_size: int = 112, norm: str = "batch") -> SFNet:
    """SphereFace-64: units [3, 8, 16, 3]."""
    return SFNet((3, 8, 16, 3), embedding_dim, input_size, norm)
