"""Class sampling for SphereFace2 and the row-sparse SGD that steps only the sampled rows.

Sampling must be unbiased: over many draws, the mean sampled loss and gradients converge to
the full ones. The test states its tolerance from the draws themselves: every mean (loss, each
embedding, row and bias gradient entry) lies within 5 standard errors of the full value (a
Gaussian deviation that large has odds of about 1 in 1.7 million per entry; the draws are
seeded, so the test is deterministic), and 5 standard errors of the loss are under a fifth of
the bias an estimate without the M/k reweighting would have, so such an estimate would fail.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sf2dist.heads import SampledRowsSGD, SphereFace2Head, sgd_rows_
from tests import dense_reference
from tests.head_cases import AllocationTracker

NUM_CLASSES, DIM, BATCH = 60, 8, 10


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return embeddings, labels


def _loss_and_grads(head, embeddings, labels):
    head.zero_grad(set_to_none=True)
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    weight_grad = head.weight.grad.to_dense()
    return torch.cat([loss.detach().view(1), x.grad.flatten(), weight_grad.flatten(), head.bias.grad.view(1)])


@pytest.mark.parametrize("margin", ("C", "A"))
def test_sampled_loss_and_gradients_are_unbiased(margin):
    embeddings, labels = _batch()
    rate, draws_count = 0.2, 1000
    full_head = SphereFace2Head(NUM_CLASSES, DIM, margin=margin, seed=1).double()
    head = SphereFace2Head(NUM_CLASSES, DIM, margin=margin, seed=1, sample_rate=rate, chunk_size=16).double()
    for h in (full_head, head):  # unit rows in float64 from the start: only the draws differ
        with torch.no_grad():
            h.weight.copy_(F.normalize(h.weight, dim=1))
    full = _loss_and_grads(full_head, embeddings, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation
    try:
        draws = torch.stack([_loss_and_grads(head, embeddings, labels) for _ in range(draws_count)])
    finally:
        torch.set_num_threads(threads)
    mean, stderr = draws.mean(dim=0), draws.std(dim=0) / math.sqrt(draws_count)
    tolerance = 5 * stderr + 1e-12  # 1e-12: entries that never vary (rows of the batch's classes)
    outside = (mean - full).abs() / tolerance
    assert bool((outside <= 1).all()), (
        f"{int((outside > 1).sum())} of {outside.numel()} means lie outside 5 standard errors of the full "
        f"value, the worst {float(outside.max()):.1f} times that far"
    )
    assert float(draws[:, 0].std()) > 0, "the draws do not vary: nothing was sampled"
    # The tolerance is tight enough to matter: without the M/k weight, the drawn classes would
    # count k/M of their full share, a bias of (1 - k/M) times the loss of the absent classes.
    absent = torch.ones(NUM_CLASSES, dtype=torch.float64)
    absent[labels] = 0.0
    num_absent = int(absent.sum())
    kw = dict(alpha=0.7, r=40.0, m=0.4, t=3.0, margin=margin, loss_weight=10.0)
    absent_loss = dense_reference.sphereface2_loss(
        embeddings, labels, head.weight.detach(), head.bias.detach(), **kw, class_weight=absent)
    unweighted_bias = (1.0 - math.ceil(rate * num_absent) / num_absent) * float(absent_loss)
    assert 5 * float(stderr[0]) < 0.2 * unweighted_bias


def test_batch_classes_are_never_dropped_and_the_rest_is_drawn_at_the_rate():
    head = SphereFace2Head(NUM_CLASSES, DIM, sample_rate=0.1)
    generator = torch.Generator().manual_seed(2)
    for step in range(200):
        distinct = int(torch.randint(1, NUM_CLASSES + 1, (1,), generator=generator))
        labels = torch.randperm(NUM_CLASSES, generator=generator)[:distinct].repeat(2)
        rows, weights = head.sample_rows(labels)
        present = set(labels.tolist())
        absent = NUM_CLASSES - len(present)
        # a count the host knows without reading the device: ceil(p L) rows, or N + 1 where the
        # batch of N could name more classes, all of them at most
        used = min(NUM_CLASSES, max(math.ceil(0.1 * NUM_CLASSES), labels.numel() + 1))
        drawn = used - len(present)
        assert present <= set(rows.tolist()), f"step {step}: a class of the batch was dropped"
        assert rows.numel() == used and torch.equal(rows, rows.unique())
        is_present = torch.tensor([row in present for row in rows.tolist()])
        assert bool((weights[is_present] == 1).all())
        assert torch.allclose(weights[~is_present], torch.full((drawn,), absent / max(drawn, 1)))


def test_draws_are_reproducible_from_seed_and_step():
    labels = torch.tensor([3, 5, 5, 40])
    first = SphereFace2Head(NUM_CLASSES, DIM, sample_rate=0.3, seed=4)
    draws = [first.sample_rows(labels)[0] for _ in range(3)]
    assert first.sample_step == 3
    assert not torch.equal(draws[0], draws[1]), "two steps drew the same rows"
    again = SphereFace2Head(NUM_CLASSES, DIM, sample_rate=0.3, seed=4)
    again.sample_step = 1  # as a resumed run would set it
    assert torch.equal(again.sample_rows(labels)[0], draws[1])
    other_seed = SphereFace2Head(NUM_CLASSES, DIM, sample_rate=0.3, seed=5)
    assert not torch.equal(other_seed.sample_rows(labels)[0], draws[0])


@pytest.mark.parametrize("implementation", ("fused", "reference"))
def test_only_sampled_rows_are_read_renormalised_and_given_a_gradient(implementation):
    head = SphereFace2Head(NUM_CLASSES, DIM, sample_rate=0.1, implementation=implementation, chunk_size=4)
    with torch.no_grad():
        head.weight.mul_(2.0)  # every row off the unit sphere
    labels = torch.tensor([0, 7, 7, 31])
    head(torch.randn(4, DIM), labels).backward()
    rows = head.last_sampled_rows
    assert {0, 7, 31} <= set(rows.tolist())
    norms = head.weight.detach().norm(dim=1)
    sampled = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    sampled[rows] = True
    torch.testing.assert_close(norms[sampled], torch.ones(int(sampled.sum())))
    torch.testing.assert_close(norms[~sampled], torch.full((NUM_CLASSES - int(sampled.sum()),), 2.0))
    grad = head.weight.grad
    assert grad.is_sparse and torch.equal(grad.coalesce().indices()[0], rows)


def _matmul_flops(head, embeddings, labels) -> int:
    """Multiply-adds of every matmul in a forward and backward (the work that scales with rows)."""
    flops = 0

    class Count(AllocationTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal flops
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default, torch.ops.aten.mm.out):
                a, b = (args[0], args[1]) if func is not torch.ops.aten.addmm_.default else (args[1], args[2])
                flops += a.shape[0] * a.shape[1] * b.shape[1]
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Count():
        head(embeddings, labels).backward()
    return flops


def test_a_step_costs_in_proportion_to_the_sampled_rows():
    embeddings, labels = torch.randn(16, 32), torch.arange(16)
    full = _matmul_flops(SphereFace2Head(2000, 32, chunk_size=256), embeddings, labels)
    head = SphereFace2Head(2000, 32, sample_rate=0.1, chunk_size=256)
    sampled = _matmul_flops(head, embeddings, labels)
    assert sampled / full == pytest.approx(head.last_sampled_rows.numel() / 2000, rel=1e-6)
    optimizer = SampledRowsSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer.step()  # the first step allocates the momentum buffer, [C, D]
    head.zero_grad()
    head(embeddings, labels).backward()
    with AllocationTracker() as tracker:
        optimizer.step()
    assert tracker.largest_numel <= head.last_sampled_rows.numel() * 32, "the step allocated more than the sampled rows"


# Row-sparse SGD ---------------------------------------------------------------------------

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-3)


def test_dense_gradients_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    with torch.no_grad():
        theirs.copy_(ours)
    opt_ours, opt_theirs = SampledRowsSGD([ours], **HYPER), torch.optim.SGD([theirs], **HYPER)
    for _ in range(4):
        grad = torch.randn(5, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        assert torch.equal(ours, theirs)
    assert torch.equal(opt_ours.state[ours]["momentum_buffer"], opt_theirs.state[theirs]["momentum_buffer"])


def test_sparse_gradients_step_their_rows_as_torch_sgd_and_leave_the_others_alone():
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(8, 3))
    rows = torch.tensor([1, 4, 6])
    selected = nn.Parameter(weight.detach()[rows].clone())  # torch.optim.SGD on just those rows
    optimizer, reference = SampledRowsSGD([weight], **HYPER), torch.optim.SGD([selected], **HYPER)
    untouched = weight.detach()[[0, 2, 3, 5, 7]].clone()
    for _ in range(4):
        grad_rows = torch.randn(3, 3)
        weight.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, weight.shape, check_invariants=True)
        selected.grad = grad_rows.clone()
        optimizer.step()
        reference.step()
        torch.testing.assert_close(weight.detach()[rows], selected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"][rows],
                               reference.state[selected]["momentum_buffer"])
    assert torch.equal(weight.detach()[[0, 2, 3, 5, 7]], untouched)
    assert not optimizer.state[weight]["momentum_buffer"][[0, 2, 3, 5, 7]].any()


def test_rows_keep_their_own_momentum_between_the_steps_that_sample_them():
    weight = nn.Parameter(torch.zeros(4, 2))
    optimizer = SampledRowsSGD([weight], lr=1.0, momentum=0.5)
    ones = torch.ones(1, 2)
    for rows in ([0], [1], [0]):  # row 0 at steps 1 and 3, row 1 at step 2
        # two micro-batches that both sampled the row: an uncoalesced gradient of 1 + 1
        weight.grad = torch.sparse_coo_tensor(torch.tensor([rows * 2]), ones.repeat(2, 1), weight.shape,
                                              check_invariants=True)
        optimizer.step()
    buffer = optimizer.state[weight]["momentum_buffer"]
    # row 0: buffer 2, then (untouched at step 2) 0.5 * 2 + 2 = 3; weight -2 - 3. Row 1: buffer 2, weight -2.
    torch.testing.assert_close(buffer[:, 0], torch.tensor([3.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(weight.detach()[:, 0], torch.tensor([-5.0, -2.0, 0.0, 0.0]))


def test_sgd_rows_checks_its_arguments():
    weight = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"grad_rows has shape \(3, 2\), expected \(2, 2\)"):
        sgd_rows_(weight, torch.tensor([0, 1]), torch.zeros(3, 2), torch.zeros(4, 2), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum is set but no momentum_buffer"):
        sgd_rows_(weight, torch.tensor([0]), torch.zeros(1, 2), None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        SampledRowsSGD([nn.Parameter(weight)], lr=0.1, momentum=1.0)
