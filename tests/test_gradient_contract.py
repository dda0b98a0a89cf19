"""End to end: a DDP-wrapped backbone plus a sharded head, k SGD steps on W ranks, equals 1 rank.

This pins the package's one gradient convention (sf2dist/heads/base.py): the heads hand each
rank W * dL/de, DDP averages, and the result is the single-process gradient of the global batch.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sf2dist.heads import PartialFCHead, SphereFace2Head
from tests.distributed import run_on_ranks

GLOBAL_BATCH, IN_DIM, EMBEDDING_DIM, NUM_CLASSES, STEPS = 12, 10, 8, 7, 3


def train_steps(rank: int, world_size: int, head_kind: str) -> dict:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, EMBEDDING_DIM)).double()
    if world_size > 1:
        backbone = DistributedDataParallel(backbone)
    if head_kind == "sf2":
        head = SphereFace2Head(NUM_CLASSES, EMBEDDING_DIM, r=8.0, loss_weight=1.0, seed=1).double()
    else:
        head = PartialFCHead(NUM_CLASSES, EMBEDDING_DIM, margin="arcface", s=8.0, seed=1).double()
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5, momentum=0.9, weight_decay=5e-4)
    local = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 + step)
        images = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=generator)
        rows = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        loss = head(backbone(images[rows]), labels[rows])
        loss.backward()
        optimizer.step()
        losses.append(head.global_loss(loss))
    module = backbone.module if world_size > 1 else backbone
    result = {"backbone": {k: v.detach() for k, v in module.state_dict().items()},
              "head_weight": head.full_weight(), "losses": torch.stack(losses)}
    if head_kind == "sf2":
        result["bias"] = head.bias.detach()
    return result


@pytest.fixture(scope="module")
def single_process():
    return {kind: train_steps(0, 1, kind) for kind in ("sf2", "pfc")}


def _run_both(rank: int, world_size: int) -> dict:
    return {kind: train_steps(rank, world_size, kind) for kind in ("sf2", "pfc")}


@pytest.mark.parametrize("world_size", (2, 3))
def test_ddp_training_matches_single_process(single_process, world_size):
    per_rank = run_on_ranks(_run_both, world_size)
    tol = dict(rtol=1e-8, atol=1e-10)
    for kind, reference in single_process.items():
        assert not torch.allclose(reference["losses"][0], reference["losses"][-1]), "the steps changed nothing"
        for rank, result in enumerate(per_rank):
            got = result[kind]
            for name, value in reference["backbone"].items():
                torch.testing.assert_close(got["backbone"][name], value, **tol, msg=f"{kind} {name} on rank {rank}")
            torch.testing.assert_close(got["head_weight"], reference["head_weight"], **tol)
            torch.testing.assert_close(got["losses"], reference["losses"], **tol)
            if kind == "sf2":  # the shared bias moved identically on every rank
                torch.testing.assert_close(got["bias"], reference["bias"], **tol)
                assert torch.equal(got["bias"], per_rank[0][kind]["bias"])
