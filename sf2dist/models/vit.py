"""arcface_torch's Vision Transformers under its names: vit_t/s/b/l/h and the WebFace42M variants.

Module names and shapes follow insightface's recognition/arcface_torch/backbones/vit.py, so a
`backbone.pth` trained there loads with `load_state_dict(strict=True)` and gives the same
embeddings in eval mode. What sets these apart from an ImageNet ViT: 9x9 patches (12x12 = 144
tokens at 112x112, the last 4 pixel rows and columns unused), no class token, ReLU6 in the MLP,
no qkv bias, and an embedding from all tokens (flatten, Linear, BN, Linear, BN) instead of a
pooled token. In training, a random `mask_ratio` of the tokens skips the blocks and comes back
as a learned mask token before the embedding layers.

arcface_torch runs the qkv and MLP projections under `autocast(True)` and the attention scores
in float32 whatever its fp16 flag; here the engine's `engine.precision` sets autocast for the
whole step and no module turns it on. The attention is `scaled_dot_product_attention`, whose
fused kernels keep the scores and the softmax in float32 under fp16/bf16.
Written with plain torch (no timm: it would pull torchvision and replace the CPU torch build).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sf2dist.models.registry import check_images, check_positive_int, register_backbone

PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4


def check_fraction(argument: str, value: object) -> float:
    """`value` as a float if it is in [0, 1), else a `ValueError` naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{argument} must be a fraction in [0, 1), got {value!r}")
    return float(value)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero each sample's branch with probability `p` and scale the rest by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping `patch_size` patches, each projected to `width` by one strided conv (`proj`)."""

    def __init__(self, input_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, num_patches, width]


class Attention(nn.Module):
    """Multi-head self-attention: one `qkv` projection without bias, scaled dot product, output `proj`."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, tokens, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as there
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """fc1 - ReLU6 - fc2 (arcface_torch's choice of ReLU6 over GELU)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch under DropPath."""

    def __init__(self, width: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        # Registered in arcface_torch's order, so the state_dict lists its keys in the same order.
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(width, MLP_RATIO * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Patch embedding plus `pos_embed`, `depth` blocks, `norm`, and the `feature` layers to the embedding.

    Drop path grows linearly over the blocks from 0 to `drop_path`. `mask_token` is in the
    state_dict whatever `mask_ratio` is; with `mask_ratio` 0 it is never used and so frozen
    (a parameter that never gets a gradient would stop DDP). `activation_checkpointing`
    (arcface_torch's `using_checkpoint`) keeps only each block's input in training and runs the
    block again in backward: activation memory of one block instead of all, for about a third
    more compute; the random drop-path draws are replayed, so the gradients are the same.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        embedding_dim: int,
        input_size: int,
        drop_path: float,
        mask_ratio: float,
        patch_size: int = PATCH_SIZE,
        num_heads: int = NUM_HEADS,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be true or false, got {activation_checkpointing!r}")
        self.activation_checkpointing = activation_checkpointing
        self.input_size = check_positive_int("input_size", input_size)
        check_positive_int("embedding_dim", embedding_dim)
        if input_size < patch_size:
            raise ValueError(f"input_size must be at least the patch size {patch_size}, got {input_size}")
        self.mask_ratio = check_fraction("mask_ratio", mask_ratio)
        drop_path = check_fraction("drop_path", drop_path)
        self.patch_embed = PatchEmbed(input_size, patch_size, width)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        rates = torch.linspace(0.0, drop_path, depth, device="cpu").tolist()  # float32 steps, as there
        self.blocks = nn.ModuleList(Block(width, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(width * num_patches, width, bias=False),
            nn.BatchNorm1d(width, eps=2e-5),
            nn.Linear(width, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # arcface_torch's initialisation: truncated normal (std 0.02) for the Linear weights and
        # the position embedding, normal for the mask token; the patch conv keeps torch's default.
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.mask_ratio == 0.0:
            self.mask_token.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size)
        x = self.patch_embed(images) + self.pos_embed  # [B, N, width]
        masking = self.training and self.mask_ratio > 0.0
        if masking:
            batch, tokens, width = x.shape
            kept = int(tokens * (1.0 - self.mask_ratio))
            # Per image, a random subset of `kept` token positions; arcface_torch masks 10% whatever
            # its mask_ratio (it only tests mask_ratio > 0), here the ratio is the one asked for.
            positions = torch.rand(batch, tokens, device=x.device).argsort(dim=1)[:, :kept]
            positions = positions.unsqueeze(-1).expand(-1, -1, width)  # [B, kept, width]
            x = x.gather(1, positions)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.norm(x)
        if masking:
            # The kept tokens back at their positions, the mask token (not normalised) everywhere else.
            x = self.mask_token.to(x.dtype).expand(batch, tokens, width).scatter(1, positions, x)
        return self.feature(x.flatten(1))  # [B, embedding_dim]


def _register(name: str, width: int, depth: int, drop_path: float, mask_ratio: float, recompute: bool,
              note: str) -> None:
    default_drop_path, default_mask_ratio, default_recompute = drop_path, mask_ratio, recompute

    def build(
        *,
        embedding_dim: int = 512,
        input_size: int = 112,
        drop_path: float = default_drop_path,
        mask_ratio: float = default_mask_ratio,
        activation_checkpointing: bool = default_recompute,
    ) -> VisionTransformer:
        return VisionTransformer(width, depth, embedding_dim, input_size, drop_path, mask_ratio,
                                 activation_checkpointing=activation_checkpointing)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"arcface_torch {name}: width {width}, {depth} blocks of {NUM_HEADS} heads{note}."
    register_backbone(name)(build)


# name: width, depth, drop path, mask ratio, activation checkpointing, as arcface_torch's get_model
# builds them (9x9 patches, 8 heads; it checkpoints vit_b, vit_l and vit_h).
VIT_VARIANTS = {
    "vit_t": (256, 12, 0.1, 0.1, False, ""),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False, "; WebFace42M"),
    "vit_s": (512, 12, 0.1, 0.1, False, ""),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False, "; WebFace42M"),
    "vit_b": (512, 24, 0.1, 0.1, True, ""),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True, "; WebFace42M"),
    # arcface_torch's get_model has no plain vit_l: this is its WebFace42M vit_l's architecture
    # with the drop path and mask ratio of vit_t/s/b.
    "vit_l": (768, 24, 0.1, 0.1, True, "; same weights as vit_l_dp005_mask_005"),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True, "; WebFace42M"),
    "vit_h": (1024, 48, 0.1, 0.0, True, "; WebFace42M"),
}
for _name, (_width, _depth, _drop_path, _mask_ratio, _recompute, _note) in VIT_VARIANTS.items():
    _register(_name, _width, _depth, _drop_path, _mask_ratio, _recompute, _note)
