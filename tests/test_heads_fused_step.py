"""The fused head step (rows stepped inside the forward) and bfloat16 row storage.

A SphereFace2 head with `fuse_step(FusedStepSGD)` must leave exactly what the reference head
followed by an ordinary SGD step leaves: rows, momentum, bias and the embedding gradients, over
several steps with changing learning rates, weight decay and momentum, on 1, 2 and 3 ranks
with uneven class shards and batches, with and without class sampling, in float64. The rows
gathered from 2 and 3 ranks must equal the single-process run. The fused step never forms the
[C, D] weight gradient (tracked allocations). bfloat16 storage rounds stochastically without
bias and keeps the updates that round-to-nearest would lose.
"""
from __future__ import annotations

import pytest
import torch

from sf2dist import comm
from sf2dist.heads import FusedStepSGD, SampledRowsSGD, SphereFace2Head
from sf2dist.heads import sparse_sgd
from sf2dist.heads.sparse_sgd import round_to_bfloat16_
from tests.distributed import run_on_ranks
from tests.head_cases import AllocationTracker

NUM_CLASSES, DIM = 11, 8  # shards of 11 classes over 2 and 3 ranks are uneven
LRS = (0.5, 0.3, 0.1)  # one per step: the rate must be set before the forward
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-3
CASES = {
    "C": dict(kwargs=dict(margin="C"), sizes=(4, 4, 4)),
    "M-uneven-batches": dict(kwargs=dict(margin="M", m=1.5), sizes=(5, 2, 3)),
    "A-sampled": dict(kwargs=dict(margin="A", m=0.5, sample_rate=0.4), sizes=(4, 3, 5)),
}


def _global_batch(name: str, step: int, world_size: int):
    three = CASES[name]["sizes"]  # the same global batch on any world size
    sizes = {1: (sum(three),), 2: (three[0] + three[1], three[2]), 3: three}[world_size]
    total = sum(three)
    generator = torch.Generator().manual_seed(100 * step + len(name))
    embeddings = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (total,), generator=generator)
    return embeddings, labels, sizes


def _groups(head):
    return [{"params": [head.weight]}, {"params": [head.bias], "weight_decay": 0.0}]


def run_steps(rank: int, world_size: int, name: str, mode: str) -> dict:
    """Three training steps of one case; mode is "reference" (autograd head + separate SGD) or "fused_step"."""
    kwargs = CASES[name]["kwargs"]
    implementation = "reference" if mode == "reference" else "fused"
    head = SphereFace2Head(NUM_CLASSES, DIM, seed=3, implementation=implementation, chunk_size=2, **kwargs).double()
    sampled = kwargs.get("sample_rate", 1.0) < 1.0
    if mode == "fused_step":
        optimizer = FusedStepSGD(_groups(head), lr=LRS[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        head.fuse_step(optimizer)
    else:
        cls = SampledRowsSGD if sampled else torch.optim.SGD
        optimizer = cls(_groups(head), lr=LRS[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses, embedding_grads = [], []
    for step, lr in enumerate(LRS):
        for group in optimizer.param_groups:
            group["lr"] = lr
        embeddings, labels, sizes = _global_batch(name, step, world_size)
        start = sum(sizes[:rank])
        local = embeddings[start:start + sizes[rank]].clone().requires_grad_(True)
        loss = head(local, labels[start:start + sizes[rank]])
        loss.backward()
        if mode == "fused_step":
            assert head.weight.grad is None, "the fused step formed a weight gradient"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(head.global_loss(loss))
        embedding_grads.append(local.grad)
    sizes = [head.num_local_classes] if world_size == 1 else None
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    counts = comm.all_gather(torch.tensor([head.num_local_classes]), [1] * world_size).tolist()
    return {
        "losses": torch.stack(losses), "embedding_grads": embedding_grads, "rows": head.full_weight(),
        "momentum": momentum if sizes else comm.all_gather(momentum, counts),
        "bias": head.bias.detach().clone(), "bias_momentum": optimizer.state[head.bias]["momentum_buffer"],
    }


def run_all(rank: int, world_size: int) -> dict:
    return {(name, mode): run_steps(rank, world_size, name, mode) for name in CASES for mode in ("reference", "fused_step")}


_RESULTS: dict[int, list[dict]] = {}


def results(world_size: int) -> list[dict]:
    if world_size not in _RESULTS:
        _RESULTS[world_size] = [run_all(0, 1)] if world_size == 1 else run_on_ranks(run_all, world_size)
    return _RESULTS[world_size]


TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", (1, 2, 3))
@pytest.mark.parametrize("name", list(CASES))
def test_fused_step_equals_the_reference_head_and_sgd(name, world_size):
    for rank, per_rank in enumerate(results(world_size)):
        reference, fused = per_rank[(name, "reference")], per_rank[(name, "fused_step")]
        for key in ("losses", "rows", "momentum", "bias", "bias_momentum"):
            torch.testing.assert_close(fused[key], reference[key], **TOL,
                                       msg=lambda m, k=key: f"{name}, {k}, rank {rank}/{world_size}: {m}")
        for step, (got, want) in enumerate(zip(fused["embedding_grads"], reference["embedding_grads"])):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, s=step: f"{name}, step {s}: {m}")


@pytest.mark.parametrize("world_size", (2, 3))
@pytest.mark.parametrize("name", ("C", "M-uneven-batches"))
def test_fused_step_on_several_ranks_equals_one_process(name, world_size):
    single = results(1)[0][(name, "fused_step")]
    for rank, per_rank in enumerate(results(world_size)):
        sharded = per_rank[(name, "fused_step")]
        for key in ("losses", "rows", "momentum", "bias"):
            torch.testing.assert_close(sharded[key], single[key], **TOL,
                                       msg=lambda m, k=key: f"{name}, {k}, rank {rank}/{world_size}: {m}")


def test_the_rows_move_only_in_training_forwards():
    head = SphereFace2Head(NUM_CLASSES, DIM, seed=1, chunk_size=3)
    head.fuse_step(FusedStepSGD(_groups(head), lr=0.5, momentum=0.9))
    embeddings, labels = torch.randn(6, DIM), torch.randint(0, NUM_CLASSES, (6,))
    before = head.weight.detach().clone()
    with torch.no_grad():
        head(embeddings, labels)
    head.eval()
    head(embeddings.requires_grad_(True), labels)
    torch.testing.assert_close(head.weight.detach(), before)  # renormalised only: they were unit-norm
    head.train()
    head(embeddings, labels).backward()
    assert (head.weight.detach() - before).abs().max() > 1e-4


def test_fused_step_never_forms_the_weight_gradient():
    num_classes, dim, batch = 4096, 64, 32
    weight_bytes = num_classes * dim * 4
    peaks = {}
    for mode in ("separate", "fused"):
        generator = torch.Generator().manual_seed(0)
        embeddings = torch.randn(batch, dim, generator=generator).requires_grad_(True)
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        head = SphereFace2Head(num_classes, dim, chunk_size=256)
        if mode == "fused":
            optimizer = FusedStepSGD(_groups(head), lr=0.1, momentum=0.9, weight_decay=5e-4)
            head.fuse_step(optimizer)
        else:
            optimizer = torch.optim.SGD(_groups(head), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for step in range(2):  # the second step has the momentum buffer already
            with AllocationTracker() as tracker:
                head(embeddings, labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peaks[mode] = tracker.peak_bytes
    assert peaks["separate"] >= weight_bytes  # the bound catches a step that forms the gradient
    assert peaks["fused"] < weight_bytes / 4, peaks


def test_stochastic_rounding_to_bfloat16_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    for value in (1.0 + 1e-4, -0.0441 - 3e-6, 3.0e-3 + 1e-8):
        values = torch.full((n,), value)
        bits = values[:1].view(torch.int32)
        toward_zero = (bits & -(1 << 16)).view(torch.float32).item()  # the two bfloat16 neighbours
        away = (bits.bitwise_and(-(1 << 16)) + (1 << 16)).view(torch.float32).item()
        out = torch.empty(n, dtype=torch.bfloat16)
        round_to_bfloat16_(out, values, generator)
        assert set(out.float().unique().tolist()) <= {toward_zero, away}, value
        # the mean of a two-point distribution one step wide: standard error <= step / (2 sqrt(n))
        step = abs(away - toward_zero)
        assert abs(out.double().mean().item() - values[0].item()) < 5 * step / (2 * n**0.5), value
    exact = torch.tensor([0.5, -1.25, 0.0, 3.0])  # bfloat16 numbers stay as they are
    out = torch.empty(4, dtype=torch.bfloat16)
    round_to_bfloat16_(out, exact, generator)
    assert torch.equal(out.float(), exact)


def _train(storage: torch.dtype, steps: int, lr: float) -> torch.Tensor:
    head = SphereFace2Head(200, 32, seed=2, chunk_size=64, storage_dtype=storage)
    head.fuse_step(FusedStepSGD(_groups(head), lr=lr, momentum=0.9, weight_decay=5e-4))
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        embeddings = torch.randn(16, 32, generator=generator).requires_grad_(True)
        head(embeddings, torch.randint(0, 200, (16,), generator=generator)).backward()
    return head.weight.detach().float()


def _movement_along_float32(monkeypatch, rounding) -> float:
    """How far 40 small steps of bfloat16 rows went along the float32 rows' movement (1: as far)."""
    if rounding == "nearest":
        monkeypatch.setattr(sparse_sgd, "round_to_bfloat16_", lambda out, values, generator: out.copy_(values))
    lr = 0.001  # per-step updates mostly below half a bfloat16 step of the rows
    full = (_train(torch.float32, 40, lr) - _train(torch.float32, 0, lr)).flatten()
    half = (_train(torch.bfloat16, 40, lr) - _train(torch.bfloat16, 0, lr)).flatten()
    monkeypatch.undo()
    return float(half @ full / (full @ full))


def test_bfloat16_rows_move_as_float32_rows_do(monkeypatch):
    # stochastic rounding keeps the small updates: unbiased, the same movement on average
    assert 0.9 < _movement_along_float32(monkeypatch, "stochastic") < 1.1
    # round-to-nearest would lose most of them (here 55%): the case tests what it claims
    assert _movement_along_float32(monkeypatch, "nearest") < 0.7


def test_bfloat16_storage_needs_the_fused_step():
    with pytest.raises(ValueError, match="bfloat16"):
        SphereFace2Head(NUM_CLASSES, DIM, implementation="reference", storage_dtype=torch.bfloat16)
    head = SphereFace2Head(NUM_CLASSES, DIM, storage_dtype=torch.bfloat16)
    assert head.weight.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="fused step only"):
        head(torch.randn(4, DIM), torch.randint(0, NUM_CLASSES, (4,)))
    with torch.no_grad():  # evaluation of the loss is fine
        assert torch.isfinite(head(torch.randn(4, DIM), torch.randint(0, NUM_CLASSES, (4,))))
    with pytest.raises(ValueError, match="implementation='fused'"):
        SphereFace2Head(NUM_CLASSES, DIM, implementation="reference").fuse_step(
            FusedStepSGD(SphereFace2Head(NUM_CLASSES, DIM).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not one this optimizer updates"):
        head.fuse_step(FusedStepSGD(SphereFace2Head(NUM_CLASSES, DIM).parameters(), lr=0.1))
