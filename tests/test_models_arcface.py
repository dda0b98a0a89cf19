"""arcface_torch's networks (r*, mbf*, vit_*): names, state_dict layout, parameter counts, numerics.

The reference key sets below are written from reading insightface's
recognition/arcface_torch/backbones (iresnet.py, mobilefacenet.py, vit.py, __init__.py's
get_model), as architecture descriptions that generate every key and shape; they never call
sf2dist's modules. The numerical references are small functional implementations (torch.nn.functional
over the state_dict's tensors), so a module that loads a backbone.pth must also compute what
arcface_torch computes with it.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from sf2dist.models import (
    ARCFACE_TORCH_BACKBONES,
    arcface_keys_from_iresnet,
    backbone_spec,
    create_backbone,
    list_backbones,
)
from sf2dist.models.arcface import IRESNET_TO_ARCFACE, DepthwiseUnit, IBasicBlock
from sf2dist.models.vit import Block, DropPath, PatchEmbed

# --- the architectures, as arcface_torch's get_model builds them --------------------------------

# name: ("iresnet", blocks per stage) | ("mbf", blocks per stage, width scale) | ("vit", width, depth)
ARCHITECTURES = {
    "r18": ("iresnet", (2, 2, 2, 2)),
    "r34": ("iresnet", (3, 4, 6, 3)),
    "r50": ("iresnet", (3, 4, 14, 3)),
    "r100": ("iresnet", (3, 13, 30, 3)),
    "r200": ("iresnet", (6, 26, 60, 6)),
    "mbf": ("mbf", (1, 4, 6, 2), 2),
    "mbf_large": ("mbf", (2, 8, 12, 4), 4),
    "vit_t": ("vit", 256, 12),
    "vit_t_dp005_mask0": ("vit", 256, 12),
    "vit_s": ("vit", 512, 12),
    "vit_s_dp005_mask_0": ("vit", 512, 12),
    "vit_b": ("vit", 512, 24),
    "vit_b_dp005_mask_005": ("vit", 512, 24),
    "vit_l": ("vit", 768, 24),  # not in get_model: vit_l_dp005_mask_005's architecture
    "vit_l_dp005_mask_005": ("vit", 768, 24),
    "vit_h": ("vit", 1024, 48),
}
# The ViTs' training settings in get_model: (drop path rate, mask ratio); all 9x9 patches, 8 heads.
VIT_TRAINING = {  # drop path, mask ratio, activation checkpointing (get_model's using_checkpoint)
    "vit_t": (0.1, 0.1, False),
    "vit_t_dp005_mask0": (0.05, 0.0, False),
    "vit_s": (0.1, 0.1, False),
    "vit_s_dp005_mask_0": (0.05, 0.0, False),
    "vit_b": (0.1, 0.1, True),
    "vit_b_dp005_mask_005": (0.05, 0.05, True),
    "vit_l": (0.1, 0.1, True),
    "vit_l_dp005_mask_005": (0.05, 0.05, True),
    "vit_h": (0.1, 0.0, True),
}
# Parameters at 512-d and 112x112, worked out from the descriptions above: e.g. vit_t has
# 12 blocks x (12 w^2 + 10 w) + patch conv 243 w + w + pos 144 w + mask w + norm 2 w
# + feature (144 w^2 + 2 w + 512 w + 1024) with w = 256 -> 19,137,792.
PARAMETER_COUNTS = {
    "r18": 24_025_600,
    "r34": 34_139_328,
    "r50": 43_590_848,
    "r100": 65_156_160,
    "r200": 118_833_920,
    "mbf": 2_059_520,
    "mbf_large": 6_314_880,
    "vit_t": 19_137_792,
    "vit_t_dp005_mask0": 19_137_792,
    "vit_s": 76_023_296,
    "vit_s_dp005_mask_0": 76_023_296,
    "vit_b": 113_833_472,
    "vit_b_dp005_mask_005": 113_833_472,
    "vit_l": 255_684_352,
    "vit_l_dp005_mask_005": 255_684_352,
    "vit_h": 756_393_984,
}
SMALL = ["r18", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0"]  # run forward/backward at 112
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_keys(prefix: str, channels: int) -> dict[str, tuple]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def iresnet_keys(blocks: tuple[int, ...], embedding_dim: int = 512, final_size: int = 7) -> dict[str, tuple]:
    """iresnet.py: conv1/bn1/prelu stem; layer1-4 of IBasicBlock (bn1 conv1 bn2 prelu conv2 bn3,
    downsample = 1x1 conv + BN on each layer's first block, which has stride 2); bn2, fc, features."""
    keys = {"conv1.weight": (64, 3, 3, 3), **batch_norm_keys("bn1", 64), "prelu.weight": (64,)}
    in_channels = 64
    for stage, (channels, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for index in range(count):
            block = f"layer{stage}.{index}"
            keys |= batch_norm_keys(f"{block}.bn1", in_channels)
            keys[f"{block}.conv1.weight"] = (channels, in_channels, 3, 3)
            keys |= batch_norm_keys(f"{block}.bn2", channels)
            keys[f"{block}.prelu.weight"] = (channels,)
            keys[f"{block}.conv2.weight"] = (channels, channels, 3, 3)
            keys |= batch_norm_keys(f"{block}.bn3", channels)
            if index == 0:
                keys[f"{block}.downsample.0.weight"] = (channels, in_channels, 1, 1)
                keys |= batch_norm_keys(f"{block}.downsample.1", channels)
            in_channels = channels
    keys |= batch_norm_keys("bn2", 512)
    keys |= {"fc.weight": (embedding_dim, 512 * final_size**2), "fc.bias": (embedding_dim,)}
    return keys | batch_norm_keys("features", embedding_dim)


def mbf_keys(blocks: tuple[int, ...], scale: int, embedding_dim: int = 512) -> dict[str, tuple]:
    """mobilefacenet.py: ConvBlock/LinearBlock = .layers(conv, BN[, PReLU]); DepthWise = .layers of
    1x1 ConvBlock to `groups` channels, 3x3 depthwise ConvBlock, 1x1 LinearBlock; Residual = .layers
    of DepthWise; GDC = .layers(7x7 depthwise LinearBlock, Flatten, Linear, BN1d)."""
    keys: dict[str, tuple] = {}

    def conv(prefix, in_channels, out_channels, kernel, groups=1, prelu=True):
        keys[f"{prefix}.layers.0.weight"] = (out_channels, in_channels // groups, kernel, kernel)
        keys.update(batch_norm_keys(f"{prefix}.layers.1", out_channels))
        if prelu:
            keys[f"{prefix}.layers.2.weight"] = (out_channels,)

    def depthwise(prefix, in_channels, out_channels, groups):
        conv(f"{prefix}.layers.0", in_channels, groups, 1)
        conv(f"{prefix}.layers.1", groups, groups, 3, groups=groups)
        conv(f"{prefix}.layers.2", groups, out_channels, 1, prelu=False)

    def residual(prefix, channels, count, groups):
        for index in range(count):
            depthwise(f"{prefix}.layers.{index}", channels, channels, groups)

    narrow, wide = 64 * scale, 128 * scale
    conv("layers.0", 3, narrow, 3)
    if blocks[0] == 1:
        conv("layers.1", narrow, narrow, 3, groups=64)
    else:
        residual("layers.1", narrow, blocks[0], 128)
    depthwise("layers.2", narrow, narrow, 128)
    residual("layers.3", narrow, blocks[1], 128)
    depthwise("layers.4", narrow, wide, 256)
    residual("layers.5", wide, blocks[2], 256)
    depthwise("layers.6", wide, wide, 512)
    residual("layers.7", wide, blocks[3], 256)
    conv("conv_sep", wide, 512, 1)
    conv("features.layers.0", 512, 512, 7, groups=512, prelu=False)
    keys["features.layers.2.weight"] = (embedding_dim, 512)
    return keys | batch_norm_keys("features.layers.3", embedding_dim)


def vit_keys(width: int, depth: int, embedding_dim: int = 512, patches: int = 144) -> dict[str, tuple]:
    """vit.py: patch_embed.proj (9x9 conv with bias), pos_embed, mask_token, blocks (norm1, attn.qkv
    without bias, attn.proj, norm2, mlp.fc1/fc2 with 4x hidden), norm, feature (Linear, BN, Linear, BN)."""
    keys = {
        "pos_embed": (1, patches, width),
        "mask_token": (1, 1, width),
        "patch_embed.proj.weight": (width, 3, 9, 9),
        "patch_embed.proj.bias": (width,),
    }
    for index in range(depth):
        block = f"blocks.{index}"
        keys |= {
            f"{block}.norm1.weight": (width,),
            f"{block}.norm1.bias": (width,),
            f"{block}.attn.qkv.weight": (3 * width, width),
            f"{block}.attn.proj.weight": (width, width),
            f"{block}.attn.proj.bias": (width,),
            f"{block}.norm2.weight": (width,),
            f"{block}.norm2.bias": (width,),
            f"{block}.mlp.fc1.weight": (4 * width, width),
            f"{block}.mlp.fc1.bias": (4 * width,),
            f"{block}.mlp.fc2.weight": (width, 4 * width),
            f"{block}.mlp.fc2.bias": (width,),
        }
    keys |= {"norm.weight": (width,), "norm.bias": (width,), "feature.0.weight": (width, width * patches)}
    keys |= batch_norm_keys("feature.1", width)
    keys["feature.2.weight"] = (embedding_dim, width)
    return keys | batch_norm_keys("feature.3", embedding_dim)


def reference_keys(name: str) -> dict[str, tuple]:
    kind, *arguments = ARCHITECTURES[name]
    return {"iresnet": iresnet_keys, "mbf": mbf_keys, "vit": vit_keys}[kind](*arguments)


def parameters_in(keys: dict[str, tuple]) -> int:
    return sum(math.prod(shape) for key, shape in keys.items() if not key.endswith(BUFFERS))


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    """Built without memory or initialisation cost: shapes and names only."""
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


def images(batch: int, size: int = 112, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- names, layout, sizes ---------------------------------------------------------------------


def test_every_arcface_torch_name_is_registered_and_listed():
    get_model_names = (
        "r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large",
        "vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
        "vit_l_dp005_mask_005", "vit_h",
    )
    assert set(ARCFACE_TORCH_BACKBONES) == {*get_model_names, "vit_l"} == set(ARCHITECTURES)
    assert set(ARCFACE_TORCH_BACKBONES) <= set(list_backbones())
    assert {"iresnet18", "iresnet50", "iresnet100", "mobilefacenet", "smallcnn", "sfnet20"} <= set(list_backbones())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_state_dict_keys_and_shapes_are_arcface_torchs(name):
    model = on_meta(name)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == reference_keys(name)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parameter_counts(name):
    assert parameters_in(reference_keys(name)) == PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in on_meta(name).parameters()) == PARAMETER_COUNTS[name]


def test_parameter_counts_agree_with_published_sizes():
    # arcface_torch's model zoo and the ArcFace paper: IR-50 43.6M, IR-100 65.2M at 512-d.
    assert PARAMETER_COUNTS["r50"] == pytest.approx(43.6e6, rel=0.01)
    assert PARAMETER_COUNTS["r100"] == pytest.approx(65.2e6, rel=0.01)
    # The same blocks as sf2dist's own iresnets, under other names.
    for old, new in (("iresnet18", "r18"), ("iresnet50", "r50"), ("iresnet100", "r100")):
        assert sum(p.numel() for p in on_meta(old).parameters()) == PARAMETER_COUNTS[new]


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES if name.startswith("vit")])
def test_vit_training_settings_are_get_models(name):
    drop_path, mask_ratio, recompute = VIT_TRAINING[name]
    model = on_meta(name)
    assert backbone_spec(model)["kwargs"] == {
        "embedding_dim": 512, "input_size": 112, "drop_path": drop_path, "mask_ratio": mask_ratio,
        "activation_checkpointing": recompute,
    }
    # stochastic depth rises linearly over the blocks from 0 (no DropPath on the first) to drop_path
    rates = [getattr(block.drop_path, "p", 0.0) for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(drop_path)
    assert rates == pytest.approx(torch.linspace(0, drop_path, len(rates)).tolist())
    # unused without masking, so frozen (DDP refuses parameters that never get a gradient)
    assert model.mask_token.requires_grad == (mask_ratio > 0)


def test_frozen_parameters():
    assert [n for n, p in on_meta("r50").named_parameters() if not p.requires_grad] == ["features.weight"]
    assert all(p.requires_grad for p in on_meta("mbf").parameters())
    assert [n for n, p in on_meta("vit_h").named_parameters() if not p.requires_grad] == ["mask_token"]


@pytest.mark.parametrize("name", SMALL)
def test_small_networks_train_and_embed_112x112_images(name):
    torch.manual_seed(0)
    model = create_backbone(name).train()
    embeddings = model(images(2))
    assert embeddings.shape == (2, 512) and torch.isfinite(embeddings).all()
    (embeddings * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    with torch.no_grad():
        assert model.eval()(images(2)).shape == (2, 512)


@pytest.mark.parametrize("name", ["r100", "r200"])
def test_deep_r_networks_give_finite_embeddings_in_eval_mode_before_training(name):
    """arcface_torch's N(0, 0.1) conv init overflows here (BN running stats still 1): not used."""
    torch.manual_seed(0)
    with torch.no_grad():
        embeddings = create_backbone(name, input_size=32).eval()(images(2, 32))
    assert torch.isfinite(embeddings).all()


def test_bad_vit_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"mask_ratio must be a fraction in \[0, 1\), got 1.0"):
        on_meta("vit_t", mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"drop_path must be a fraction in \[0, 1\), got -0.1"):
        on_meta("vit_s", drop_path=-0.1)
    with pytest.raises(ValueError, match="input_size must be at least the patch size 9, got 8"):
        on_meta("vit_t", input_size=8)
    with pytest.raises(ValueError, match=r"expected images \[batch, 3, 112, 112\], got \[1, 3, 108, 108\]"):
        create_backbone("vit_t")(images(1, 108))


# --- numerics against functional references ----------------------------------------------------


def bare(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A lone block's state_dict with the keys the references look up under prefix "" (".name")."""
    return {f".{key}": value for key, value in module.state_dict().items()}


def settle(model: torch.nn.Module, inputs: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """Realistic, non-trivial eval state: BN statistics from one batch, random BN affines and PReLU slopes."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.train()(inputs)
        for module in model.modules():
            if module in norms or isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.PReLU):
                module.weight.copy_(0.5 * torch.rand(module.weight.shape, generator=generator))
    return model.eval()


def bn(x, sd, prefix, eps=1e-5):
    return F.batch_norm(
        x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"],
        training=False, eps=eps,
    )


def prelu(x, sd, prefix):
    return F.prelu(x, sd[f"{prefix}.weight"])


def ibasic_block_reference(x, sd, prefix, stride):
    """iresnet.py IBasicBlock.forward, with its 3x3 convs padded by 1 and the stride on conv2."""
    out = bn(x, sd, f"{prefix}.bn1")
    out = F.conv2d(out, sd[f"{prefix}.conv1.weight"], padding=1)
    out = prelu(bn(out, sd, f"{prefix}.bn2"), sd, f"{prefix}.prelu")
    out = bn(F.conv2d(out, sd[f"{prefix}.conv2.weight"], stride=stride, padding=1), sd, f"{prefix}.bn3")
    if f"{prefix}.downsample.0.weight" in sd:
        x = bn(F.conv2d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride), sd, f"{prefix}.downsample.1")
    return out + x


def iresnet_reference(x, sd, blocks):
    x = prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd, "prelu")
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            x = ibasic_block_reference(x, sd, f"layer{stage}.{index}", 2 if index == 0 else 1)
    x = bn(x, sd, "bn2").flatten(1)
    return bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), sd, "features")


def conv_unit_reference(x, sd, prefix, stride=1, padding=None):
    weight = sd[f"{prefix}.layers.0.weight"]
    groups = x.shape[1] // weight.shape[1]
    padding = weight.shape[-1] // 2 if padding is None else padding
    x = bn(F.conv2d(x, weight, stride=stride, padding=padding, groups=groups), sd, f"{prefix}.layers.1")
    return prelu(x, sd, f"{prefix}.layers.2") if f"{prefix}.layers.2.weight" in sd else x


def depthwise_reference(x, sd, prefix, stride, residual):
    """mobilefacenet.py DepthWise: 1x1 ConvBlock, 3x3 depthwise ConvBlock (stride), 1x1 LinearBlock."""
    out = conv_unit_reference(x, sd, f"{prefix}.layers.0")
    out = conv_unit_reference(out, sd, f"{prefix}.layers.1", stride=stride)
    out = conv_unit_reference(out, sd, f"{prefix}.layers.2")
    return x + out if residual else out


def mbf_reference(x, sd, blocks):
    def residual(x, prefix, count):
        for index in range(count):
            x = depthwise_reference(x, sd, f"{prefix}.layers.{index}", 1, True)
        return x

    x = conv_unit_reference(x, sd, "layers.0", stride=2)
    x = conv_unit_reference(x, sd, "layers.1") if blocks[0] == 1 else residual(x, "layers.1", blocks[0])
    for stage, count in enumerate(blocks[1:]):
        x = depthwise_reference(x, sd, f"layers.{2 + 2 * stage}", 2, False)
        x = residual(x, f"layers.{3 + 2 * stage}", count)
    x = conv_unit_reference(x, sd, "conv_sep")
    x = conv_unit_reference(x, sd, "features.layers.0", padding=0).flatten(1)
    return bn(F.linear(x, sd["features.layers.2.weight"]), sd, "features.layers.3")


def patch_embed_reference(images, sd, prefix="patch_embed.proj"):
    """Each 9x9 patch (row-major over the 12x12 grid) times the flattened conv kernel, plus bias."""
    weight = sd[f"{prefix}.weight"]
    patches = F.unfold(images, kernel_size=9, stride=9)  # [B, 3*81, patches]
    return patches.transpose(1, 2) @ weight.flatten(1).T + sd[f"{prefix}.bias"]


def vit_block_reference(x, sd, prefix, heads=8):
    """vit.py Block in eval mode: pre-LN attention (qkv laid out [3, heads, head_dim]) and ReLU6 MLP."""
    width = x.shape[-1]
    head_dim = width // heads
    y = F.layer_norm(x, (width,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"])
    q, k, v = (y @ sd[f"{prefix}.attn.qkv.weight"].T).split(width, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    x = x + y @ sd[f"{prefix}.attn.proj.weight"].T + sd[f"{prefix}.attn.proj.bias"]
    y = F.layer_norm(x, (width,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"])
    y = torch.clamp(y @ sd[f"{prefix}.mlp.fc1.weight"].T + sd[f"{prefix}.mlp.fc1.bias"], 0, 6)
    return x + y @ sd[f"{prefix}.mlp.fc2.weight"].T + sd[f"{prefix}.mlp.fc2.bias"]


def vit_reference(images, sd, depth):
    x = patch_embed_reference(images, sd) + sd["pos_embed"]
    for index in range(depth):
        x = vit_block_reference(x, sd, f"blocks.{index}")
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"]).flatten(1)
    x = bn(x @ sd["feature.0.weight"].T, sd, "feature.1", eps=2e-5)
    return bn(x @ sd["feature.2.weight"].T, sd, "feature.3", eps=2e-5)


@pytest.mark.parametrize("in_channels, out_channels, stride", [(32, 64, 2), (64, 64, 1)])
def test_ibasic_block_matches_the_functional_reference(in_channels, out_channels, stride):
    torch.manual_seed(0)
    block = IBasicBlock(in_channels, out_channels, stride)
    x = torch.randn(4, in_channels, 14, 14)
    settle(block, x)
    assert (block.downsample is not None) == (stride == 2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ibasic_block_reference(x, bare(block), "", stride))


@pytest.mark.parametrize("in_channels, out_channels, hidden, stride, residual", [(64, 64, 128, 1, True),
                                                                                (64, 128, 256, 2, False)])
def test_depthwise_unit_matches_the_functional_reference(in_channels, out_channels, hidden, stride, residual):
    torch.manual_seed(0)
    unit = DepthwiseUnit(in_channels, out_channels, hidden, stride, residual)
    x = torch.randn(4, in_channels, 14, 14)
    settle(unit, x)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), depthwise_reference(x, bare(unit), "", stride, residual))


def test_patch_embedding_and_vit_block_match_the_functional_references():
    torch.manual_seed(0)
    embed = PatchEmbed(112, 9, 64)
    x = images(2)
    with torch.no_grad():
        tokens = embed(x)
        assert tokens.shape == (2, 144, 64)
        torch.testing.assert_close(tokens, patch_embed_reference(x, embed.state_dict(), "proj"))
        block = Block(64, 8, drop_path=0.1).eval()
        settle(block, tokens)
        torch.testing.assert_close(block(tokens), vit_block_reference(tokens, bare(block), ""))


@pytest.mark.parametrize(
    "name, reference, description",
    [("r18", iresnet_reference, (2, 2, 2, 2)), ("mbf", mbf_reference, (1, 4, 6, 2)),
     ("mbf_large", mbf_reference, (2, 8, 12, 4)), ("vit_t", vit_reference, 12)],
)
def test_whole_network_matches_the_functional_reference_in_eval_mode(name, reference, description):
    torch.manual_seed(0)
    model = settle(create_backbone(name), images(4, seed=1))
    x = images(2, seed=2)
    with torch.no_grad():
        expected = reference(x, model.state_dict(), description)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("old, new", IRESNET_TO_ARCFACE.items())
def test_an_sf2dist_iresnet_state_dict_renamed_loads_strictly_and_embeds_the_same(old, new):
    torch.manual_seed(0)
    iresnet = settle(create_backbone(old, input_size=48), images(4, 48, seed=1))
    rnet = create_backbone(new, input_size=48).eval()
    rnet.load_state_dict(arcface_keys_from_iresnet(iresnet.state_dict()), strict=True)
    x = images(2, 48, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rnet(x), iresnet(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'conv1.weight' is not a key of an sf2dist iresnet state_dict"):
        arcface_keys_from_iresnet(rnet.state_dict())


def test_vit_masking_in_training_runs_the_blocks_on_the_kept_tokens_and_fills_in_the_mask_token():
    torch.manual_seed(0)
    model = create_backbone("vit_t", input_size=45).train()  # 5x5 = 25 tokens, int(25 * 0.9) = 22 kept
    seen = {}
    model.blocks[0].register_forward_hook(lambda module, inputs, output: seen.update(block=inputs[0].shape))
    model.feature.register_forward_hook(lambda module, inputs, output: seen.update(tokens=inputs[0]))
    model(images(3, 45))
    assert seen["block"] == (3, 22, 256)
    tokens = seen["tokens"].detach().unflatten(1, (25, 256))
    is_mask = (tokens == model.mask_token.detach()).all(dim=-1)  # [B, 25]
    assert is_mask.sum(dim=1).tolist() == [3, 3, 3]
    assert not (is_mask[0] == is_mask[1]).all() or not (is_mask[0] == is_mask[2]).all()  # per image
    model.eval()(images(3, 45))
    assert seen["block"] == (3, 25, 256)
    unmasked = create_backbone("vit_t_dp005_mask0", input_size=45).train()
    unmasked.blocks[0].register_forward_hook(lambda module, inputs, output: seen.update(block=inputs[0].shape))
    unmasked(images(3, 45))
    assert seen["block"] == (3, 25, 256)


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 5, 7)
    out = drop(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 16 < (per_sample[:, 0] == 0).sum() < 48
    assert torch.equal(drop.eval()(x), x)
