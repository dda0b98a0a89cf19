"""`smallcnn`: a four-layer CNN for CPU demos and tests.

At 112x112 it costs 15.4M multiply-adds with 128-d embeddings (the demo setting), 17.8M at
512-d.

It has the same interface as the real backbones, so the training loop, checkpoints and
evaluation can be exercised end to end in seconds on a laptop.
"""
from __future__ import annotations

import torch
from torch import nn

from sf2dist.models.registry import check_images, check_positive_int, halved_size, register_backbone

NUM_BLOCKS = 4


class SmallCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks (width, 2x, 4x, 8x channels), then Linear and BN."""

    def __init__(self, embedding_dim: int, input_size: int, width: int, input_pool: int = 1) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        check_positive_int("width", width)
        check_positive_int("input_pool", input_pool)
        # Averaging the input over input_pool x input_pool blocks first makes every layer
        # input_pool^2 times cheaper: the CPU demo trains at 56x56 from 112x112 shards.
        layers: list[nn.Module] = [nn.AvgPool2d(input_pool)] if input_pool > 1 else []
        in_channels = 3
        for block in range(NUM_BLOCKS):
            out_channels = width * 2**block
            kernel = 5 if block == 0 else 3  # a wider first kernel sees more of the face at full resolution
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        final_size = halved_size(input_size // input_pool, NUM_BLOCKS)  # 7 for 112x112 images
        self.fc = nn.Linear(in_channels * final_size * final_size, embedding_dim)
        self.output_norm = nn.BatchNorm1d(embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        return self.output_norm(self.fc(self.features(images).flatten(1)))  # [B, embedding_dim]


@register_backbone("smallcnn")
def smallcnn(*, embedding_dim: int = 512, input_size: int = 112, width: int = 16, input_pool: int = 1) -> SmallCNN:
    """The small CNN; `width` is the first block's channel count, doubled at each block;
    `input_pool` average-pools the images by that factor first."""
    return SmallCNN(embedding_dim, input_size, width, input_pool)
