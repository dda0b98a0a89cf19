"""The gradient contract under DeepSpeed ZeRO: 2 gloo ranks with DeepSpeedEngine equal 1 plain process.

Each run follows the trainer's call sequence (accumulated micro-batches under `no_sync`, a
loss scale undone with `scale_grads_`, clipping by the global norm, `set_lr`, `step`,
`zero_grad`; first a skipped step, gradients dropped by `zero_grad` alone) with a SphereFace2
head beside the engine. The reference is `DDPEngine` on one process (a bare torch backbone and
torch SGD) over the whole batch, without accumulation. ZeRO stages 1 and 2 must match it in
float32 and stay close in bf16; a save/load round trip must continue exactly as without it.
DeepSpeed starts slowly, so every distributed check runs in one spawn of 2 ranks.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

from sf2dist import comm  # noqa: E402
from sf2dist.config import Config  # noqa: E402
from sf2dist.heads import SphereFace2Head  # noqa: E402
from sf2dist.train import optim  # noqa: E402
from sf2dist.train.engine import DDPEngine, make_engine  # noqa: E402
from tests.distributed import run_on_ranks  # noqa: E402

WORLD_SIZE, GLOBAL_BATCH, IN_DIM, EMBEDDING_DIM, NUM_CLASSES = 2, 12, 10, 8, 7
STEPS = 3  # compared with the reference; one more step checks the save/load round trip
ACCUMULATION = 2  # micro-batches per step on the ranks (the reference takes the whole batch at once)
LOSS_SCALE, CLIP_NORM = 4.0, 0.5
LRS = (0.5, 0.4, 0.3, 0.2)
TOL = dict(rtol=1e-5, atol=1e-6)


def make_config(zero_stage: int, precision: str = "fp32") -> Config:
    cfg = Config()
    cfg.engine.type, cfg.engine.zero_stage, cfg.engine.precision = "deepspeed", zero_stage, precision
    cfg.data.batch_size = GLOBAL_BATCH // WORLD_SIZE // ACCUMULATION
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = "sgd", LRS[0], 0.9, 5e-4
    return cfg


def make_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, EMBEDDING_DIM))


def make_head_and_optimizer(cfg: Config) -> tuple[nn.Module, torch.optim.Optimizer]:
    head = SphereFace2Head(NUM_CLASSES, EMBEDDING_DIM, r=8.0, loss_weight=1.0, seed=1)
    return head, optim.make_optimizer(optim.head_param_groups(head, cfg.optim), cfg.optim, cfg.optim.lr)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator)
    return images, torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=generator)


def local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = global_batch(step)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    return images[rows], labels[rows]


def forward_backward(engine, head, images, labels, accumulation: int) -> torch.Tensor:
    """The trainer's micro-batches: all but the last under no_sync; returns this rank's loss share."""
    loss_share = torch.zeros(())
    for micro, (x, y) in enumerate(zip(images.chunk(accumulation), labels.chunk(accumulation))):
        last = micro == accumulation - 1
        with contextlib.nullcontext() if last else engine.no_sync():
            # as the trainer does: the head takes float32 embeddings
            loss = head(engine(x).float(), y) / accumulation
            engine.backward(loss * LOSS_SCALE)
        loss_share += loss.detach()
    return loss_share


def skipped_step(engine, head, head_optimizer, rank: int, world_size: int, accumulation: int) -> None:
    """What the trainer does on a non-finite norm: gradients computed, then dropped without a step."""
    forward_backward(engine, head, *local_batch(99, rank, world_size), accumulation)
    engine.grad_sq_norm()
    engine.zero_grad()
    head_optimizer.zero_grad(set_to_none=True)


def train_step(engine, head, head_optimizer, step: int, rank: int, world_size: int, accumulation: int) -> dict:
    """One optimizer step as the trainer takes it; returns the figures the checks compare."""
    loss_share = forward_backward(engine, head, *local_batch(step, rank, world_size), accumulation)
    backbone_sq = engine.grad_sq_norm()
    numbers = optim.global_grad_norm_and_loss(backbone_sq, head, loss_share)
    scaled_norm, global_loss = numbers.grad_norm, numbers.loss
    engine.scale_grads_(1.0 / LOSS_SCALE)
    optim.scale_grads_(head.parameters(), 1.0 / LOSS_SCALE)
    clip = min(1.0, CLIP_NORM / (scaled_norm / LOSS_SCALE + 1e-6))
    engine.scale_grads_(clip)
    optim.scale_grads_(head.parameters(), clip)
    engine.set_lr(LRS[step])
    optim.set_lr(head_optimizer, LRS[step])
    engine.step()
    head_optimizer.step()
    engine.zero_grad()
    head_optimizer.zero_grad(set_to_none=True)
    return {"backbone_sq": backbone_sq.detach().cpu(), "loss": global_loss, "clip": clip}


def snapshot(engine, head) -> dict:
    return {"backbone": {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()},
            "head_weight": head.full_weight().clone(), "bias": head.bias.detach().clone()}


def run_reference() -> dict:
    """One process, whole batch, plain torch: STEPS steps, then one more."""
    cfg = make_config(1)
    engine = DDPEngine(make_backbone(), cfg, torch.device("cpu"), 1)
    head, head_optimizer = make_head_and_optimizer(cfg)
    initial = copy.deepcopy(snapshot(engine, head))
    skipped_step(engine, head, head_optimizer, 0, 1, 1)
    steps = [train_step(engine, head, head_optimizer, s, 0, 1, 1) for s in range(STEPS)]
    after = snapshot(engine, head)
    train_step(engine, head, head_optimizer, STEPS, 0, 1, 1)
    return {"steps": steps, "initial": initial, "after": after, "after_one_more": snapshot(engine, head)}


def contract_run(rank: int, world_size: int, zero_stage: int, checkpoint_root: Path) -> dict:
    cfg = make_config(zero_stage)
    engine = make_engine(make_backbone(), cfg, torch.device("cpu"), world_size)
    head, head_optimizer = make_head_and_optimizer(cfg)
    skipped_step(engine, head, head_optimizer, rank, world_size, ACCUMULATION)
    steps = [train_step(engine, head, head_optimizer, s, rank, world_size, ACCUMULATION) for s in range(STEPS)]
    after = snapshot(engine, head)

    # Saved into a partial directory that rank 0 then renames, as the trainer's checkpoints are.
    partial, checkpoint = checkpoint_root / ".partial", checkpoint_root / "final"
    engine.save(partial, rank)
    comm.barrier()
    if rank == 0:
        os.replace(partial, checkpoint)
    comm.barrier()
    head_state = {"head": {k: v.clone() for k, v in head.state_dict().items()},
                  "optimizer": copy.deepcopy(head_optimizer.state_dict())}
    train_step(engine, head, head_optimizer, STEPS, rank, world_size, ACCUMULATION)
    continued = snapshot(engine, head)

    # A fresh engine from other weights: load must restore the weights, DeepSpeed's float32
    # master copy of them and the momentum, or the next step differs from `continued`.
    resumed_engine = make_engine(make_backbone(seed=7), cfg, torch.device("cpu"), world_size)
    resumed_engine.load(checkpoint)
    loaded = snapshot(resumed_engine, head)["backbone"]
    resumed_head, resumed_optimizer = make_head_and_optimizer(cfg)
    resumed_head.load_state_dict(head_state["head"])
    resumed_optimizer.load_state_dict(head_state["optimizer"])
    train_step(resumed_engine, resumed_head, resumed_optimizer, STEPS, rank, world_size, ACCUMULATION)
    return {"steps": steps, "after": after, "continued": continued, "loaded": loaded,
            "resumed": snapshot(resumed_engine, resumed_head),
            "other_world_size_error": load_error_from_other_world_size(resumed_engine, rank, checkpoint)}


def load_error_from_other_world_size(engine, rank: int, checkpoint: Path) -> str:
    """The message `load` raises on a checkpoint that holds one rank's partitions only."""
    shrunk = checkpoint.parent / "one_rank"
    if rank == 0:
        shutil.copytree(checkpoint, shrunk)
        for path in shrunk.rglob("*zero_pp_rank_1_*"):
            path.unlink()
    comm.barrier()
    try:
        engine.load(shrunk)
    except ValueError as err:
        return str(err)
    return "no error"


def bf16_run(rank: int, world_size: int, zero_stage: int) -> dict:
    """bf16 as the trainer runs it (float32 weights, bf16 autocast): steps close to the fp32 reference."""
    cfg = make_config(zero_stage, "bf16")
    engine = make_engine(make_backbone(), cfg, torch.device("cpu"), world_size)
    head, head_optimizer = make_head_and_optimizer(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = [train_step(engine, head, head_optimizer, s, rank, world_size, ACCUMULATION) for s in range(STEPS)]
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    return {"steps": steps, "after": snapshot(engine, head), "dtypes": dtypes}


def _all_runs(rank: int, world_size: int, checkpoint_root: str) -> dict:
    results = {}
    for stage in (1, 2):
        results[f"zero{stage}"] = contract_run(rank, world_size, stage, Path(checkpoint_root) / f"zero{stage}")
        results[f"bf16_zero{stage}"] = bf16_run(rank, world_size, stage)
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_reference()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_all_runs, WORLD_SIZE, str(tmp_path_factory.mktemp("deepspeed_checkpoints")))


def assert_state_close(got: dict, want: dict, what: str, **tol) -> None:
    for name, value in want["backbone"].items():
        torch.testing.assert_close(got["backbone"][name], value, **tol, msg=lambda m: f"{what} {name}: {m}")
    torch.testing.assert_close(got["head_weight"], want["head_weight"], **tol, msg=lambda m: f"{what} head: {m}")
    torch.testing.assert_close(got["bias"], want["bias"], **tol, msg=lambda m: f"{what} bias: {m}")


def test_reference_exercises_clipping_and_moves(reference):
    clips = [s["clip"] for s in reference["steps"]]
    assert min(clips) < 1.0, f"clipping never bound (factors {clips}); scale_grads_ would go untested"
    losses = [s["loss"] for s in reference["steps"]]
    assert losses[0] != losses[-1], "the steps changed nothing"


@pytest.mark.parametrize("stage", (1, 2))
def test_zero_training_matches_single_process(per_rank, reference, stage):
    for rank, results in enumerate(per_rank):
        got = results[f"zero{stage}"]
        assert_state_close(got["after"], reference["after"], f"ZeRO-{stage} rank {rank}", **TOL)
        got_losses = [s["loss"] for s in got["steps"]]
        want_losses = [s["loss"] for s in reference["steps"]]
        assert got_losses == pytest.approx(want_losses, rel=1e-5)
        # the replicated backbone and the shared bias moved identically on every rank
        first = per_rank[0][f"zero{stage}"]["after"]
        assert all(torch.equal(value, first["backbone"][name]) for name, value in got["after"]["backbone"].items())
        assert torch.equal(got["after"]["bias"], first["bias"])


@pytest.mark.parametrize("stage", (1, 2))
def test_grad_sq_norm_is_the_averaged_gradient(per_rank, reference, stage):
    """Step 0's squared norm (loss scale still in) equals the one-process backbone gradient's, on each rank."""
    want = reference["steps"][0]["backbone_sq"]
    assert want.dtype == torch.float64 and want > 0
    norms = [results[f"zero{stage}"]["steps"][0]["backbone_sq"] for results in per_rank]
    for rank, got in enumerate(norms):
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want.item(), rel=1e-5), f"rank {rank}"
    assert torch.equal(norms[0], norms[1]), "ranks disagree on the norm"


@pytest.mark.parametrize("stage", (1, 2))
def test_save_load_round_trip_restores_engine_state(per_rank, reference, stage):
    for rank, results in enumerate(per_rank):
        got = results[f"zero{stage}"]
        for name, value in got["after"]["backbone"].items():
            assert torch.equal(got["loaded"][name], value), f"rank {rank}: load did not restore {name}"
        assert_state_close(got["resumed"], got["continued"], f"ZeRO-{stage} rank {rank} resumed", rtol=0, atol=0)
        assert_state_close(got["continued"], reference["after_one_more"], f"ZeRO-{stage} rank {rank}", **TOL)


@pytest.mark.parametrize("stage", (1, 2))
def test_bf16_autocast_keeps_fp32_weights_and_tracks_fp32(per_rank, reference, stage):
    for rank, results in enumerate(per_rank):
        got = results[f"bf16_zero{stage}"]
        assert got["dtypes"] == ["torch.float32"]
        assert all(math.isfinite(s["loss"]) for s in got["steps"])
        # bf16 matmuls keep about 3 significant digits, and this tiny net's clipped steps amplify
        # that (about a third of the distance moved, measured); a missing or wrong update would
        # sit as far from the fp32 run as the start does
        want, start, after = reference["after"], reference["initial"], got["after"]
        names = [("backbone", n) for n in want["backbone"]] + [("head_weight", None), ("bias", None)]
        for key, name in names:
            pick = (lambda state: state[key][name]) if name else (lambda state: state[key])
            error = (pick(after).double() - pick(want).double()).norm()
            moved = (pick(want).double() - pick(start).double()).norm()
            assert moved > 0 and error < 0.5 * moved, f"bf16 ZeRO-{stage} rank {rank} {name or key}: {error:.3g} vs moved {moved:.3g}"


def test_load_refuses_another_world_size(per_rank):
    for results in per_rank:
        message = results["zero1"]["other_world_size_error"]
        assert "partitions of 1 rank" in message and "this run has 2" in message, message
