"""The heads under half-precision autocast, bfloat16 row storage, and Partial FC's class draw.

Under `engine.precision: fp16` the trainer runs the head inside fp16 autocast, with no loss
scale reaching the head's own gradients. A negative class's gradient is tiny (SphereFace2 at a
large class count's bias; a softmax probability far below the target's): entries of 1e-7 and
less, around fp16's smallest subnormal (6e-8). The tests put the heads in that regime (batches
close to their classes, as after training; for SphereFace2 a large class count's bias, lowered)
and compare every row's gradient, and a fused step's row update, with the float32 run: within a
relative tolerance, and no entry that matters flushed to zero. The fp16 cases fail on heads that
form gradients in fp16. On a CPU, autocast supports float16 as a GPU's does.

Also pinned: bfloat16 row storage weights sampled classes in float32, and Partial FC draws its
classes from (seed, rank, step) on the rows' device, and at rate 1 draws and indexes nothing.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sf2dist.heads import FusedStepSGD, PartialFCHead, SphereFace2Head, initial_bias
from tests.head_cases import AllocationTracker

NUM_CLASSES, DIM, BATCH, CHUNK = 512, 512, 128, 96
SF2_TERMS = dict(alpha=0.8, r=64.0, m=0.5, t=3.0, margin="C", loss_weight=10.0)
# App. G's bias for MS1MV3's 85,742 classes (docs/design.md: about 6.03), lowered by 5 so that, at
# this small batch, negative rows' gradient entries are about 1e-7, as at MS1MV3's scale.
SF2_BIAS = initial_bias(85_742, 0.8, 64.0, 0.5, 3.0, "C") - 5.0
FP16_SUBNORMAL = 2.0**-24
# Per-row relative error against float32: the gradient matmuls round their operands to bf16
# (2^-9); the cosines are rounded to fp16 (2^-11) or bf16 (2^-8), and the softmax's logits
# s * cos carry that rounding times s = 64 into the probabilities.
ROW_TOL = {"sphereface2": {torch.float16: 2e-2, torch.bfloat16: 6e-2},
           "partial_fc": {torch.float16: 5e-2, torch.bfloat16: 0.15}}


def _near_their_classes(head, labels: torch.Tensor, cos: float = 0.7, seed: int = 0) -> torch.Tensor:
    """Unit embeddings at cosine `cos` to their class's row, otherwise random: a trained batch."""
    rows = F.normalize(head.weight.detach().float(), dim=1)[labels]
    noise = torch.randn(labels.numel(), head.embedding_dim, generator=torch.Generator().manual_seed(seed))
    noise = F.normalize(noise - (noise * rows).sum(1, keepdim=True) * rows, dim=1)
    return cos * rows + math.sqrt(1.0 - cos**2) * noise


def _run(make_head, labels, autocast_dtype, cos=0.7):
    """(row gradient [C, D] dense, embedding gradient, bias gradient or None) of one forward/backward."""
    head = make_head()
    embeddings = _near_their_classes(head, labels, cos).requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = head(embeddings, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    bias_grad = head.bias.grad if isinstance(head, SphereFace2Head) else None
    return head.weight.grad.to_dense(), embeddings.grad, bias_grad


def _assert_close_rows(half: torch.Tensor, full: torch.Tensor, tol: float, what: str) -> None:
    """Every row with a float32 gradient within `tol` of it (relative, row norm), and no entry
    flushed to zero that matters (above `tol` times its row's root mean square)."""
    used = full.abs().sum(dim=1) > 0
    error = (half[used] - full[used]).norm(dim=1) / full[used].norm(dim=1)
    rms = full.norm(dim=1, keepdim=True) / math.sqrt(full.shape[1])
    flushed = int(((half == 0) & (full.abs() > tol * rms)).sum())
    assert flushed == 0, f"{what}: {flushed} of {int((full != 0).sum())} gradient entries flushed to zero"
    assert float(error.max()) <= tol, f"{what}: a row's relative error is {float(error.max()):.3g} (> {tol})"


def _labels(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (BATCH,), generator=torch.Generator().manual_seed(seed))


SF2_CASES = {
    "fused": dict(),
    "fused-sampled": dict(sample_rate=0.5),
    "reference": dict(implementation="reference"),
}


@pytest.mark.parametrize("autocast_dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("case", list(SF2_CASES))
def test_sphereface2_gradients_under_half_autocast_match_float32(case, autocast_dtype):
    labels = _labels()

    def make_head():
        head = SphereFace2Head(NUM_CLASSES, DIM, **SF2_TERMS, seed=2, chunk_size=CHUNK, **SF2_CASES[case])
        with torch.no_grad():
            head.bias.fill_(SF2_BIAS)
        return head

    full_rows, full_embeddings, full_bias = _run(make_head, labels, None)
    negative = torch.ones(NUM_CLASSES, dtype=torch.bool)
    negative[labels] = False
    negative_entries = full_rows[negative & (full_rows.abs().sum(dim=1) > 0)].abs()
    assert float(negative_entries.median()) < 1e-6, "the case is not in the regime of tiny negative gradients"
    assert float((negative_entries < FP16_SUBNORMAL).float().mean()) > 0.1, "no entries below fp16's subnormals"
    rows, embeddings, bias = _run(make_head, labels, autocast_dtype)
    _assert_close_rows(rows, full_rows, ROW_TOL["sphereface2"][autocast_dtype], f"sphereface2 {case}")
    torch.testing.assert_close(embeddings, full_embeddings, rtol=0, atol=2e-2 * float(full_embeddings.abs().max()))
    torch.testing.assert_close(bias, full_bias, rtol=1e-2, atol=0)


@pytest.mark.parametrize("sample_rate", (1.0, 0.5))
def test_fused_step_under_fp16_autocast_moves_rows_as_float32(sample_rate):
    labels = _labels(3)
    updates = []
    for autocast_dtype in (None, torch.float16):
        head = SphereFace2Head(NUM_CLASSES, DIM, **SF2_TERMS, seed=2, chunk_size=CHUNK, sample_rate=sample_rate)
        with torch.no_grad():
            head.bias.fill_(SF2_BIAS)
        # a large rate makes updates of 1e-7 gradients visible on rows of entries ~0.04 in float32
        optimizer = FusedStepSGD(head.parameters(), lr=1e3, momentum=0.9)
        head.fuse_step(optimizer)
        before = head.weight.detach().clone()
        embeddings = _near_their_classes(head, labels)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast_dtype is not None):
            head(embeddings, labels)
        updates.append(head.weight.detach() - before)
    full, half = updates
    assert int((full.abs().sum(dim=1) > 0).sum()) >= (NUM_CLASSES if sample_rate == 1.0 else NUM_CLASSES // 2)
    _assert_close_rows(half, full, ROW_TOL["sphereface2"][torch.float16], f"fused step, sample_rate={sample_rate}")


@pytest.mark.parametrize("autocast_dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("case", ("fused", "fused-sampled", "reference"))
def test_partial_fc_gradients_under_half_autocast_match_float32(case, autocast_dtype):
    labels = _labels(4)
    kwargs = dict(implementation="reference") if case == "reference" else {}
    if case == "fused-sampled":
        kwargs["sample_rate"] = 0.5

    def make_head():
        return PartialFCHead(NUM_CLASSES, DIM, margin="arcface", seed=2, chunk_size=CHUNK, **kwargs)

    cos = 0.8  # the target's probability near 1, the others' around exp(-20)
    full_rows, _, _ = _run(make_head, labels, None, cos)
    negative = torch.ones(NUM_CLASSES, dtype=torch.bool)
    negative[labels] = False
    negative_entries = full_rows[negative & (full_rows.abs().sum(dim=1) > 0)].abs()
    assert float(negative_entries.median()) < FP16_SUBNORMAL, "the case is not in the regime of tiny gradients"
    rows, _, _ = _run(make_head, labels, autocast_dtype, cos)
    # The rows of the batch's own classes, and the embeddings, have gradients of 1 - p (p near 1)
    # times their row: cancellation, noise in float32 too. The absent classes' rows are compared.
    _assert_close_rows(rows[negative], full_rows[negative], ROW_TOL["partial_fc"][autocast_dtype],
                       f"partial fc {case}")


def test_bfloat16_storage_weights_the_sampled_classes_in_float32():
    labels = torch.arange(4)  # 56 absent classes of 60; a step uses max(ceil(0.1 * 60), 4 + 1) = 6 rows: 2 drawn, each weighted 56/2
    stored = SphereFace2Head(60, 16, sample_rate=0.1, seed=3, storage_dtype=torch.bfloat16)
    plain = SphereFace2Head(60, 16, sample_rate=0.1, seed=3)
    with torch.no_grad():
        plain.weight.copy_(stored.weight.float())  # the same (bfloat16-exact) rows in float32
    _, class_weight = stored.sample_rows(labels)
    assert class_weight.dtype == torch.float32
    assert torch.equal(class_weight[class_weight != 1], torch.full((2,), 56 / 2))
    stored.sample_step = 0
    embeddings = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same draw in both; only the storage differs
        losses = [head(embeddings, labels) for head in (stored, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_partial_fc_at_full_rate_draws_and_indexes_nothing():
    head = PartialFCHead(4096, 16, chunk_size=512)
    labels = torch.tensor([3, 900, 4000, 3])
    assert head.sample_classes(labels) is None
    integer_sizes = []  # of every index tensor a step makes

    class Track(AllocationTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.int64, torch.int32):
                    integer_sizes.append(tensor.numel())
            return out

    with Track():
        head(torch.randn(4, 16), labels).backward()
    assert max(integer_sizes) < head.num_local_classes, "a step at rate 1 formed a class-long index"
    assert head.sample_step == 0, "a step at rate 1 drew random numbers"
    assert torch.equal(head.last_sampled_classes, torch.arange(4096))


def test_partial_fc_draws_repeat_from_seed_and_step():
    labels = torch.tensor([3, 5, 5, 40])
    first = PartialFCHead(60, 8, sample_rate=0.3, seed=4)
    draws = [first.sample_classes(labels) for _ in range(3)]
    assert first.sample_step == 3
    assert all(d.device == first.weight.device and {3, 5, 40} <= set(d.tolist()) for d in draws)
    assert all(d.numel() == first.num_sample and torch.equal(d, d.unique()) for d in draws)
    assert not torch.equal(draws[0], draws[1]), "two steps drew the same classes"
    again = PartialFCHead(60, 8, sample_rate=0.3, seed=4)
    again.sample_step = 1  # as a resumed run would set it
    assert torch.equal(again.sample_classes(labels), draws[1])
    assert not torch.equal(PartialFCHead(60, 8, sample_rate=0.3, seed=5).sample_classes(labels), draws[0])
    head = PartialFCHead(60, 8, sample_rate=0.3, seed=4)
    head(torch.randn(4, 8), labels)  # a forward draws as sample_classes does, and counts the step
    assert head.sample_step == 1 and torch.equal(head.last_sampled_classes, draws[0])
