"""The fused (chunked) heads equal the straightforward reference implementation.

On 1, 2 and 3 ranks, in float64: loss, embedding, weight and bias gradients (after a backward
of 0.37 * loss), the renormalised rows and the collectives of the step, for all SphereFace2
margins, both softmax margins, with and without class sampling, at chunk sizes that divide
the shards and that do not (tests/head_cases.py). The dense parity tests
(tests/test_heads_parity.py) already pin the default (fused) heads to docs/design.md's formulas.
"""
from __future__ import annotations

import math

import pytest
import torch

from sf2dist.heads import PartialFCHead, SphereFace2Head
from tests.head_cases import FUSED_CASES, FUSED_CHUNK_SIZES, fused_results, global_batch

TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world_size", (1, 2, 3))
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_head_equals_reference(name, world_size):
    for rank, runs in enumerate(result[name] for result in fused_results(world_size)):
        reference = runs["reference"]
        for chunk_size in map(str, FUSED_CHUNK_SIZES):
            fused, where = runs[chunk_size], f"{name}, chunk_size={chunk_size}, rank {rank}/{world_size}"
            for key in ("loss", "embedding_grad", "weight_grad", "weight", "bias_grad"):
                if key in reference:
                    torch.testing.assert_close(fused[key], reference[key], **TOL,
                                               msg=lambda m, k=key: f"{k}, {where}: {m}")
            assert fused["collectives"] == reference["collectives"], where
            assert fused["weight_grad_sparse"] == reference["weight_grad_sparse"], where
            for key in ("sampled", "sampled_rows"):
                if key in reference:
                    assert torch.equal(fused[key], reference[key]), where


@pytest.mark.parametrize("world_size", (2, 3))
def test_sampled_sphereface2_keeps_every_class_of_the_batch_on_every_rank(world_size):
    for name in ("sf2-C-sampled", "sf2-M-sampled-uneven"):
        _, labels, _ = global_batch(name, world_size, FUSED_CASES)
        rate, classes = FUSED_CASES[name]["kwargs"]["sample_rate"], FUSED_CASES[name]["classes"]
        used = []
        for result in fused_results(world_size):
            run = result[name]["None"]
            start, stop = run["class_range"]
            rows = run["sampled_rows"]
            present = {label - start for label in labels.tolist() if start <= label < stop}
            assert present <= set(rows.tolist()), f"{name}: a class of the batch was dropped on [{start}, {stop})"
            # a fixed count (no host read): ceil(p L) rows, or N + 1 where the batch could name more classes
            assert rows.numel() == min(stop - start, max(math.ceil(rate * (stop - start)), labels.numel() + 1)), name
            assert torch.equal(rows, rows.unique()), name
            assert run["weight_grad_sparse"]
            nonzero_rows = run["weight_grad"].abs().sum(dim=1).nonzero().squeeze(1)
            assert set(nonzero_rows.tolist()) <= set(rows.tolist()), "a row outside the sample got a gradient"
            used.append(rows + start)
        assert torch.cat(used).numel() < classes, f"{name}: sampling kept every class, the case tests nothing"


def _head_pair(cls, **kwargs):
    return [cls(40, 16, seed=5, implementation=impl, **kwargs) for impl in ("reference", "fused")]


@pytest.mark.parametrize("cls", (SphereFace2Head, PartialFCHead))
def test_fused_head_under_bf16_autocast_is_float32_and_close_to_reference(cls):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(24, 16, generator=generator)
    labels = torch.randint(0, 40, (24,), generator=generator)
    kwargs = dict(chunk_size=7) | ({} if cls is SphereFace2Head else dict(s=16.0))
    results = []
    for head in _head_pair(cls, **kwargs):
        x = embeddings.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(x, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        results.append((loss.detach(), x.grad, head.weight.grad))
    for got, want in zip(results[1], results[0]):  # both ran their matmuls in bf16: close, not equal
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("cls", (SphereFace2Head, PartialFCHead))
def test_fused_head_without_grad_gives_the_same_loss(cls):
    generator = torch.Generator().manual_seed(1)
    embeddings, labels = torch.randn(10, 16, generator=generator), torch.randint(0, 40, (10,), generator=generator)
    reference, fused = _head_pair(cls, chunk_size=6)
    with torch.no_grad():
        loss = fused(embeddings, labels)
    assert fused.weight.grad is None
    torch.testing.assert_close(loss, reference(embeddings, labels).detach(), rtol=1e-6, atol=1e-7)


def test_fused_head_refuses_a_second_backward():
    head = SphereFace2Head(40, 16, chunk_size=8)
    loss = head(torch.randn(4, 16), torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*implementation='reference'"):
        loss.backward()


def test_bad_implementation_or_chunk_size():
    with pytest.raises(ValueError, match=r"implementation must be one of \('fused', 'reference'\), got 'chunked'"):
        SphereFace2Head(10, 4, implementation="chunked")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        PartialFCHead(10, 4, chunk_size=0)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 1.5"):
        SphereFace2Head(10, 4, sample_rate=1.5)
