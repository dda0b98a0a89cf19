"""The sharded heads equal a dense single-process computation on 1, 2 and 3 ranks.

Loss, and gradients of embeddings, head weights and bias, in float64 so that "equal" means
float rounding. Shards are uneven (11 classes); cases cover a shard holding none of the
batch's labels, all labels on one shard, uneven per-rank batch sizes (one rank empty), all
three SphereFace2 margins and both softmax margins, with and without class sampling.
"""
from __future__ import annotations

import pytest
import torch

from sf2dist.heads import init_class_rows, initial_bias
from tests import dense_reference
from tests.distributed import run_on_ranks
from tests.head_cases import CASES, EMBEDDING_DIM, NUM_CLASSES, global_batch, run_cases

WORLD_SIZES = (1, 2, 3)


@pytest.fixture(scope="module")
def rank_results():
    """{world_size: [per-rank {case: result}]}; one spawn per world size for all cases."""
    names = list(CASES)
    results = {1: [run_cases(0, 1, names)]}
    for world_size in WORLD_SIZES[1:]:
        results[world_size] = run_on_ranks(run_cases, world_size, names)
    return results


def dense(name: str, world_size: int, sampled: torch.Tensor | None):
    """Dense loss and gradients on the concatenated batch (restricted to `sampled` classes)."""
    case = CASES[name]
    embeddings, labels, _ = global_batch(name, world_size)
    embeddings.requires_grad_(True)
    full_weight = init_class_rows(0, NUM_CLASSES, EMBEDDING_DIM, seed=3).double()
    if case["head"] == "sf2":  # SphereFace2 keeps its rows unit-norm: renormalised before the step
        full_weight = torch.nn.functional.normalize(full_weight, dim=1)
    weight = full_weight.clone().requires_grad_(True)
    if case["head"] == "sf2":
        kw = dict(alpha=0.7, r=40.0, m=0.4, t=3.0, loss_weight=10.0) | case["kwargs"]
        # the head stores its parameters in float32 and the test converts them to float64
        bias = torch.tensor(initial_bias(NUM_CLASSES, kw["alpha"], kw["r"], kw["m"], kw["t"], kw["margin"]))
        bias = bias.double().requires_grad_(True)
        loss = dense_reference.sphereface2_loss(embeddings, labels, weight, bias, **kw)
        loss.backward()
        return loss.detach(), embeddings.grad, weight.grad, bias.grad
    kw = dict(s=64.0, m={"cosface": 0.4, "arcface": 0.5}[case["kwargs"]["margin"]]) | case["kwargs"]
    kw.pop("sample_rate", None)
    kept = torch.arange(NUM_CLASSES) if sampled is None else sampled
    loss = dense_reference.margin_softmax_loss(embeddings, torch.searchsorted(kept, labels), weight[kept], **kw)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad, None


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_head_matches_dense_reference(rank_results, name, world_size):
    ranks = [result[name] for result in rank_results[world_size]]
    sampled = torch.cat([r["sampled"] for r in ranks]) if "sampled" in ranks[0] else None
    if "sample_rate" in CASES[name]["kwargs"] and world_size > 1:
        assert sampled.numel() < NUM_CLASSES, "sampling kept every class: the case tests nothing"
    loss, embedding_grad, weight_grad, bias_grad = dense(name, world_size, sampled)
    tol = dict(rtol=1e-8, atol=1e-10)  # float64: far below float32 rounding
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], loss, **tol, msg=f"loss on rank {rank}")
        if bias_grad is not None:
            torch.testing.assert_close(result["bias_grad"], bias_grad, **tol, msg=f"bias grad on rank {rank}")
    # Gradient convention: each rank's embeddings receive W * dL/de (DDP then averages).
    gathered_grad = torch.cat([r["embedding_grad"] for r in ranks]) / world_size
    torch.testing.assert_close(gathered_grad, embedding_grad, **tol)
    torch.testing.assert_close(torch.cat([r["weight_grad"] for r in ranks]), weight_grad, **tol)
    assert [tuple(r["class_range"]) for r in ranks][-1][1] == NUM_CLASSES


@pytest.mark.parametrize("world_size", (2, 3))
def test_sampling_keeps_every_class_of_the_batch(rank_results, world_size):
    for name in ("cosface-sampled", "arcface-sampled-one-shard"):
        _, labels, _ = global_batch(name, world_size)
        ranks = [result[name] for result in rank_results[world_size]]
        sampled = torch.cat([r["sampled"] for r in ranks])
        assert set(labels.tolist()) <= set(sampled.tolist())
        for r in ranks:  # each shard keeps at least its sample_rate share, sorted, no duplicates
            start, stop = r["class_range"]
            rate = CASES[name]["kwargs"]["sample_rate"]
            assert r["sampled"].numel() >= max(1, int(rate * (stop - start)))
            assert torch.equal(r["sampled"], r["sampled"].unique())
            assert bool(((r["sampled"] >= start) & (r["sampled"] < stop)).all())


def test_bias_is_identical_on_every_rank(rank_results):
    for world_size in (2, 3):
        biases = [result["sf2-C"]["bias"] for result in rank_results[world_size]]
        assert all(torch.equal(b, biases[0]) for b in biases)


@pytest.mark.parametrize("world_size", (2, 3))
def test_sphereface2_issues_no_batch_or_class_sized_all_reduce(rank_results, world_size):
    """Per step: sizes + embeddings + labels gathered, one bias all-reduce, one reduce-scatter."""
    for name in ("sf2-C", "sf2-A-uneven-batches"):
        _, _, sizes = global_batch(name, world_size)
        padded = max(sizes) * world_size
        log = rank_results[world_size][0][name]["collectives"]
        assert log == [
            ["all_gather", 8 * world_size],
            ["all_gather", padded * EMBEDDING_DIM * 8],
            ["all_gather", padded * 8],
            ["all_reduce", 8],
            ["reduce_scatter", padded * EMBEDDING_DIM * 8],
        ], name


@pytest.mark.parametrize("world_size", (2, 3))
def test_softmax_head_pays_batch_sized_all_reduces(rank_results, world_size):
    batch = 4 * world_size
    log = rank_results[world_size][0]["cosface"]["collectives"]
    assert log == [
        ["all_gather", 8 * world_size],
        ["all_gather", batch * EMBEDDING_DIM * 8],
        ["all_gather", batch * 8],
        ["all_reduce", batch * 8],  # row maxima
        ["all_reduce", 2 * batch * 8],  # row sums of exp and true-class logits
        ["reduce_scatter", batch * EMBEDDING_DIM * 8],
    ]
