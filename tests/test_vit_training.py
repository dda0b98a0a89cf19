"""Training a ViT here (#26 item 3): the cosine schedule, activation checkpointing, bf16 autocast, the
CPU demo config and the WebFace42M configs with arcface_torch's published settings."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from sf2dist.config import load_config
from sf2dist.eval import load_backbone
from sf2dist.models import create_backbone
from sf2dist.train import optim
from tests.test_train import ROOT, _launch, _set_args, overrides, tiny_data  # noqa: F401 (fixture)

VIT_DEMO = str(ROOT / "configs" / "demo_vit_t_cpu.yaml")
SIZE = 27  # 3x3 patches of 9x9: every block type at a test's cost


def test_the_cosine_schedule_warms_up_then_falls_as_half_a_cosine_to_zero():
    cfg = load_config([], ["optim.schedule=cosine", "optim.warmup_steps=10"]).optim
    assert optim.lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert optim.lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert optim.lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert optim.lr_factor(35, 110, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert optim.lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert optim.lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    factors = [optim.lr_factor(step, 110, cfg) for step in range(10, 111)]
    assert all(a > b for a, b in zip(factors, factors[1:]))


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_t", embedding_dim=16, input_size=SIZE, **kwargs)


def _gradients(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(5)  # the same drop-path and token-mask draws in both models
    out = model(images)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_blocks_with_the_same_draws_and_gradients():
    images = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = _vit().train()
    recomputed = _vit(activation_checkpointing=True).train()
    assert recomputed.mask_ratio > 0 and any(type(m).__name__ == "DropPath" for m in recomputed.modules())
    calls = {"plain": 0, "recomputed": 0}
    for key, model in (("plain", plain), ("recomputed", recomputed)):
        fc1 = model.blocks[0].mlp.fc1
        fc1.forward = lambda x, fc1=fc1, key=key: calls.__setitem__(key, calls[key] + 1) or type(fc1).forward(fc1, x)
    out, grads = _gradients(plain, images)
    out_r, grads_r = _gradients(recomputed, images)
    assert calls == {"plain": 1, "recomputed": 2}  # the block ran again in backward
    torch.testing.assert_close(out_r, out, rtol=0, atol=1e-6)
    assert grads.keys() == grads_r.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_is_arcface_torchs_choice_per_network_and_checked():
    # arcface_torch's get_model turns using_checkpoint on for vit_b, vit_l and vit_h
    defaults = {name: create_backbone(name, input_size=SIZE).activation_checkpointing
                for name in ("vit_t", "vit_s_dp005_mask_0")}
    assert defaults == {"vit_t": False, "vit_s_dp005_mask_0": False}
    with torch.device("meta"):
        assert create_backbone("vit_b", input_size=SIZE).activation_checkpointing
        assert create_backbone("vit_h", input_size=SIZE).activation_checkpointing
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false, got 'yes'"):
        _vit(activation_checkpointing="yes")


def test_every_block_runs_under_bf16_autocast_close_to_float32():
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    model = _vit(drop_path=0.0, mask_ratio=0.0).eval()
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.dtype == torch.bfloat16  # the matmuls and, on CPU, the BatchNorms ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(low.float(), reference, dim=1)
    assert cosine.min() > 0.99, cosine


def test_vit_t_trains_through_train_py_with_adamw_cosine_checkpointing_and_bf16(tmp_path, tiny_data):  # noqa: F811
    run = tmp_path / "run"
    settings = overrides(tiny_data, run, **{"run.max_steps": 4, "run.log_every": 1, "optim.warmup_steps": 2,
                                            "model.kwargs.activation_checkpointing": "true"})
    proc = _launch(["--config", VIT_DEMO, *_set_args(settings)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backbone: vit_t" in proc.stdout and "precision bf16" in proc.stdout
    cfg = load_config([run / "config.yaml"])
    assert (cfg.optim.name, cfg.optim.schedule, cfg.engine.precision) == ("adamw", "cosine", "bf16")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["lr"]) for row in rows] == pytest.approx(
        [cfg.optim.lr * optim.lr_factor(step, 4, cfg.optim) for step in range(4)])
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    model = load_backbone(run / "checkpoints" / "step_00000004")
    assert model.backbone_spec["kwargs"]["activation_checkpointing"] is True
    assert "holdout: verification accuracy" in proc.stdout


@pytest.mark.parametrize("name", ["vit_t", "vit_s", "vit_b", "vit_l", "vit_h"])
def test_the_webface42m_vit_configs_carry_arcface_torchs_published_settings(name):
    cfg = load_config([ROOT / "configs" / f"webface42m_{name}.yaml"])
    network, batch, epochs, warmup_epochs = {
        "vit_t": ("vit_t_dp005_mask0", 384, 40, 4), "vit_s": ("vit_s_dp005_mask_0", 384, 40, 4),
        "vit_b": ("vit_b_dp005_mask_005", 384, 40, 4), "vit_l": ("vit_l_dp005_mask_005", 384, 40, 4),
        "vit_h": ("vit_h", 768, 16, 2)}[name]
    steps_per_epoch = 42_474_557 // (batch * 64)  # 8 nodes x 8 GPUs
    assert (cfg.model.backbone, cfg.data.batch_size, cfg.run.epochs) == (network, batch, epochs)
    assert cfg.optim.warmup_steps == warmup_epochs * steps_per_epoch
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.power,
            cfg.optim.clip_grad_norm) == ("adamw", 1e-3, 0.1, "poly", 2.0, 5.0)
    assert cfg.engine.precision == "bf16" and cfg.data.num_classes == 2_059_906
    # the file's own comment gives the step counts it was written from
    assert f"({cfg.optim.warmup_steps:,} of {epochs * steps_per_epoch:,} steps" in (
        ROOT / "configs" / f"webface42m_{name}.yaml").read_text()
