"""Backbone registry: every registered backbone's shapes, gradients, specs and checkpoints."""
import ast
import json
from pathlib import Path

import pytest
import torch

import sf2dist.models
from sf2dist.eval import load_backbone
from sf2dist.models import backbone_spec, create_backbone, list_backbones, register_backbone
from sf2dist.models.registry import backbone_arguments
from sf2dist.models.sfnet import NORMS

# Small inputs keep the gradient tests fast; every backbone must also run at the default 112.
SMALL_INPUT, SMALL_DIM = 32, 64

SFNETS = [name for name in list_backbones() if name.startswith("sfnet")]
# Over 100M parameters: a minute of building and running here; tests/test_models_arcface.py
# checks their layout on the meta device and runs the same blocks in the smaller networks.
LARGE = {"r200", "vit_b", "vit_b_dp005_mask_005", "vit_l", "vit_l_dp005_mask_005", "vit_h"}
# Every registered backbone with its defaults, and every sfnet with each norm besides its default.
VARIANTS = [pytest.param(name, {}, id=name) for name in list_backbones() if name not in LARGE] + [
    pytest.param(name, {"norm": norm}, id=f"{name}-norm={norm}")
    for name in SFNETS
    for norm in NORMS
    if norm != "batch"
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches are dominated by per-op overhead, and extra threads only fight over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_backbone_is_registered_and_listed_sorted():
    names = list_backbones()
    assert names == sorted(names)
    assert {"iresnet18", "iresnet50", "iresnet100", "mobilefacenet", "smallcnn"} <= set(names)
    assert SFNETS == ["sfnet20", "sfnet36", "sfnet4", "sfnet64"]


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_forward_shape_and_finite_gradients_for_every_parameter(name, kwargs):
    torch.manual_seed(0)
    if "drop_path" in backbone_arguments(name):  # stochastic depth may drop a branch for both images
        kwargs = {**kwargs, "drop_path": 0.0}
    model = create_backbone(name, embedding_dim=SMALL_DIM, input_size=SMALL_INPUT, **kwargs).train()
    embeddings = model(images(2, SMALL_INPUT))
    assert embeddings.shape == (2, SMALL_DIM) and embeddings.dtype == torch.float32
    # A random projection, not a sum: a sum of BN outputs has zero gradient by construction.
    (embeddings * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for param_name, param in trainable:
        assert param.grad is not None, f"{name}: {param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_default_build_embeds_112x112_images_to_512(name, kwargs):
    model = create_backbone(name, **kwargs).eval()
    with torch.no_grad():
        embeddings = model(images(2, 112))
    assert embeddings.shape == (2, 512) and torch.isfinite(embeddings).all()
    # Unnormalised: the heads normalise, and the norm carries information (e.g. image quality).
    assert not torch.allclose(embeddings.norm(dim=1), torch.ones(2))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("iresnet50", {}, 43.6e6),  # ArcFace IR-50 at 512-d, 112x112 (7x7 final map)
        ("iresnet100", {}, 65.2e6),  # ArcFace IR-100
        ("mobilefacenet", {"embedding_dim": 128}, 0.99e6),  # MobileFaceNet paper, Table 1
    ],
)
def test_parameter_counts_match_the_papers(name, kwargs, reference):
    assert parameter_count(create_backbone(name, **kwargs)) == pytest.approx(reference, rel=0.02)


def test_only_the_iresnet_output_bn_scale_is_frozen():
    frozen = {
        name: [n for n, p in create_backbone(name, input_size=SMALL_INPUT).named_parameters() if not p.requires_grad]
        for name in ("iresnet18", "sfnet20", "mobilefacenet", "smallcnn")
    }
    assert frozen == {"iresnet18": ["features.weight"], "sfnet20": [], "mobilefacenet": [], "smallcnn": []}
    assert torch.equal(create_backbone("iresnet18").features.weight, torch.ones(512))


def modules_of(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", SFNETS)
def test_sfnet_depth_is_its_number_of_conv_layers_and_norm_adds_or_drops_bn(name):
    depth = int(name.removeprefix("sfnet"))
    batch = create_backbone(name, input_size=SMALL_INPUT)
    none = create_backbone(name, input_size=SMALL_INPUT, norm="none")
    assert len(modules_of(batch, torch.nn.Conv2d)) == len(modules_of(none, torch.nn.Conv2d)) == depth
    assert len(modules_of(batch, torch.nn.BatchNorm2d)) == depth and not modules_of(none, torch.nn.BatchNorm2d)
    assert all(conv.bias is None for conv in modules_of(batch, torch.nn.Conv2d))
    assert all(conv.bias is not None for conv in modules_of(none, torch.nn.Conv2d))
    assert len(modules_of(none, torch.nn.PReLU)) == depth


def test_norm_none_takes_the_original_caffe_initialisation():
    torch.manual_seed(0)
    model = create_backbone("sfnet20", norm="none")
    entry_convs = [stage[0][0] for stage in model.stages]
    residual_convs = [conv for conv in modules_of(model, torch.nn.Conv2d) if conv not in entry_convs]
    assert len(residual_convs) == 16
    for layer in [*entry_convs, model.fc]:  # Caffe "xavier": U(+-sqrt(3 / fan_in)), std 1 / sqrt(fan_in)
        fan_in = layer.weight[0].numel()
        assert layer.weight.abs().max() <= (3 / fan_in) ** 0.5
        assert layer.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.1)
    for conv in residual_convs:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(not layer.bias.any() for layer in [*modules_of(model, torch.nn.Conv2d), model.fc])
    slopes = torch.cat([prelu.weight for prelu in modules_of(model, torch.nn.PReLU)])
    assert torch.equal(slopes, torch.full_like(slopes, 0.25))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", SFNETS)
def test_sfnet_embedding_scale_at_init_is_bounded_with_either_norm(name, norm):
    """In training mode, as the first step sees it. Below ~0.1 the BN-free nets hardly move at
    first (PyTorch's default init gives 0.01-0.07 and the loss stalls); above a few the scale is
    growing with depth (He init on the residual convs: 8 at 20 layers, 1e5 at 64)."""
    torch.manual_seed(0)
    model = create_backbone(name, norm=norm).train()
    with torch.no_grad():
        embeddings = model(images(4, 112))
    assert torch.isfinite(embeddings).all()
    assert 0.1 < embeddings.std().item() < 4


@pytest.mark.parametrize("name", ["sfnet4", "sfnet20"])
def test_sfnet_without_bn_learns_a_tiny_classification_problem(name):
    """16 random images, 8 classes, a linear softmax on the embeddings, 10 full-batch SGD steps."""
    torch.manual_seed(0)
    model = create_backbone(name, embedding_dim=SMALL_DIM, input_size=SMALL_INPUT, norm="none").train()
    classifier = torch.nn.Linear(SMALL_DIM, 8)
    inputs, labels = images(16, SMALL_INPUT, seed=3), torch.arange(16) % 8
    optimizer = torch.optim.SGD([*model.parameters(), *classifier.parameters()], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(classifier(model(inputs)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.1)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.1 * losses[0], losses


def test_smallcnn_sizes_its_fc_from_input_size_and_width():
    model = create_backbone("smallcnn", embedding_dim=128, input_size=48, width=8)
    assert model.fc.in_features == 64 * 3 * 3  # 48 -> 24 -> 12 -> 6 -> 3, channels 8..64
    assert model(images(2, 48)).shape == (2, 128)
    assert create_backbone("smallcnn").fc.in_features == 128 * 7 * 7


def multiply_adds(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds of the convolutions and linear layers for one image, counted by hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output[0].numel() * module.weight[0].numel()  # per output value: (C_in/groups)*k*k
        else:
            total += module.in_features * module.out_features

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [layer.register_forward_hook(count) for layer in layers]
    with torch.no_grad():
        model.eval()(images(1, size))
    for handle in handles:
        handle.remove()
    return total


def test_smallcnn_costs_about_15m_multiply_adds_at_112():
    assert multiply_adds(create_backbone("smallcnn", embedding_dim=128), 112) == pytest.approx(15.4e6, rel=0.01)


def test_unknown_name_is_reported_with_a_suggestion_and_the_registered_names():
    with pytest.raises(ValueError, match="unknown backbone 'iresnet5O'; did you mean 'iresnet50'") as info:
        create_backbone("iresnet5O")
    assert all(name in str(info.value) for name in list_backbones())


def test_bad_arguments_say_what_is_wrong():
    accepted = "accepts the keyword arguments embedding_dim, input_size, dropout"
    with pytest.raises(TypeError, match=rf"backbone 'iresnet18'.*'depth'.*{accepted}"):
        create_backbone("iresnet18", depth=18)
    with pytest.raises(ValueError, match="embedding_dim must be a positive int, got 0"):
        create_backbone("sfnet20", embedding_dim=0)
    with pytest.raises(ValueError, match="input_size must be a positive int, got 112.0"):
        create_backbone("mobilefacenet", input_size=112.0)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.0"):
        create_backbone("iresnet50", dropout=1.0)
    with pytest.raises(ValueError, match="width must be a positive int, got True"):
        create_backbone("smallcnn", width=True)
    with pytest.raises(ValueError, match="norm must be one of 'batch', 'none', got 'layer'"):
        create_backbone("sfnet4", norm="layer")
    with pytest.raises(ValueError, match="norm must be one of 'batch', 'none', got None"):
        create_backbone("sfnet36", norm=None)


def test_images_of_another_size_are_refused_with_the_built_size():
    model = create_backbone("smallcnn", input_size=48)
    with pytest.raises(ValueError, match=r"\[batch, 3, 48, 48\], got \[2, 3, 112, 112\].*built with input_size=48"):
        model(images(2, 112))
    with pytest.raises(ValueError, match=r"expected images \[batch, 3, 48, 48\], got \[2, 48, 48\]"):
        model(images(2, 48)[:, 0])


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'smallcnn' is already registered"):
        register_backbone("smallcnn")(lambda embedding_dim=512: torch.nn.Identity())
    assert list_backbones().count("smallcnn") == 1


def test_a_module_not_built_by_the_registry_has_no_spec():
    with pytest.raises(ValueError, match="Linear was not built by sf2dist.models.create_backbone"):
        backbone_spec(torch.nn.Linear(2, 2))


def train_a_little(model: torch.nn.Module, size: int) -> None:
    """Move BN running statistics and weights away from their initial values."""
    model.train()
    with torch.no_grad():
        model(images(4, size, seed=5))
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_spec_rebuilds_the_same_network(name, kwargs):
    model = create_backbone(name, embedding_dim=SMALL_DIM, input_size=SMALL_INPUT, **kwargs)
    spec = backbone_spec(model)
    assert spec["name"] == name and spec["kwargs"].items() >= kwargs.items()
    assert spec["kwargs"]["embedding_dim"] == SMALL_DIM and spec["kwargs"]["input_size"] == SMALL_INPUT
    assert json.loads(json.dumps(spec)) == spec  # plain values, storable anywhere
    spec["kwargs"]["embedding_dim"] = 1  # a copy: the model's own spec is untouched
    assert backbone_spec(model)["kwargs"]["embedding_dim"] == SMALL_DIM

    train_a_little(model, SMALL_INPUT)
    spec = backbone_spec(model)
    rebuilt = create_backbone(spec["name"], **spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = images(3, SMALL_INPUT, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_spec_records_defaults_so_later_default_changes_do_not_change_old_checkpoints():
    assert backbone_spec(create_backbone("smallcnn")) == {
        "name": "smallcnn",
        "kwargs": {"embedding_dim": 512, "input_size": 112, "width": 16, "input_pool": 1},
    }
    assert backbone_spec(create_backbone("iresnet18", dropout=0.2))["kwargs"] == {
        "embedding_dim": 512,
        "input_size": 112,
        "dropout": 0.2,
    }
    # A checkpoint from before `norm` existed has no "norm" in its spec and rebuilds with BN.
    assert backbone_spec(create_backbone("sfnet20", input_size=SMALL_INPUT))["kwargs"] == {
        "embedding_dim": 512,
        "input_size": SMALL_INPUT,
        "norm": "batch",
    }


def test_eval_load_backbone_rebuilds_a_saved_checkpoint(tmp_path):
    model = create_backbone("smallcnn", embedding_dim=128, input_size=48, width=8)
    train_a_little(model, 48)
    path = tmp_path / "step_10.pt"
    torch.save({"backbone": backbone_spec(model), "backbone_state": model.state_dict()}, path)
    loaded = load_backbone(path)
    assert not loaded.training
    assert backbone_spec(loaded) == backbone_spec(model)
    x = images(2, 48, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def imported_distributed(source: str) -> list[str]:
    """Every way `source` reaches torch.distributed: imports and `torch.distributed` attributes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed"):
                found.append(node.module)
            elif node.module == "torch" and any(alias.name == "distributed" for alias in node.names):
                found.append("from torch import distributed")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            found.append(ast.unparse(node))
    return found


def test_the_detector_sees_each_way_of_reaching_torch_distributed():
    for source in ("import torch.distributed as dist", "from torch.distributed import all_reduce",
                   "from torch import distributed", "import torch\ntorch.distributed.get_rank()"):
        assert imported_distributed(source), source
    assert not imported_distributed('"""Backbones never use torch.distributed."""\nimport torch')


def test_no_backbone_file_uses_torch_distributed():
    files = sorted(Path(sf2dist.models.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    offenders = {f.name: hits for f in files if (hits := imported_distributed(f.read_text()))}
    assert not offenders, f"backbones must not use torch.distributed: {offenders}"
