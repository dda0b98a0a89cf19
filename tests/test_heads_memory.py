"""The fused heads never hold the [N, C_local] logits; the reference heads do.

Every allocation of a forward and backward on the CPU is tracked (tests/head_cases.py,
`AllocationTracker`): the largest tensor and the peak of live bytes. The shapes make the full
logits (N x C float32, 2 MiB) far larger than anything else the step needs (the [C, D] row
gradient is 256 KiB, a [N, chunk] tile 128 KiB), so a head that materialised them, even once
and briefly, would exceed the bounds, as the reference heads do.
"""
from __future__ import annotations

import pytest
import torch

from sf2dist.heads import PartialFCHead, SphereFace2Head
from tests.head_cases import AllocationTracker

BATCH, DIM, NUM_CLASSES, CHUNK = 128, 16, 4096, 256
LOGITS_NUMEL = BATCH * NUM_CLASSES
LOGITS_BYTES = LOGITS_NUMEL * 4

HEADS = {
    "sphereface2": (SphereFace2Head, {}),
    "sphereface2-sampled": (SphereFace2Head, dict(sample_rate=0.5)),
    "cosface": (PartialFCHead, dict(margin="cosface")),
    "arcface-partial-fc": (PartialFCHead, dict(margin="arcface", sample_rate=0.5)),
}


def _track(cls, implementation: str, **kwargs) -> AllocationTracker:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(BATCH, DIM, generator=generator).requires_grad_(True)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    head = cls(NUM_CLASSES, DIM, implementation=implementation, chunk_size=CHUNK, **kwargs)
    with AllocationTracker() as tracker:
        head(embeddings, labels).backward()
    return tracker


@pytest.mark.parametrize("name", list(HEADS))
def test_fused_head_never_materialises_the_logits(name):
    cls, kwargs = HEADS[name]
    fused = _track(cls, "fused", **kwargs)
    assert fused.largest_numel <= NUM_CLASSES * DIM, f"{name}: a tensor of {fused.largest_numel} elements"
    assert fused.peak_bytes < LOGITS_BYTES / 2, f"{name}: peak {fused.peak_bytes} bytes"


@pytest.mark.parametrize("name", ("sphereface2", "cosface"))
def test_the_bounds_catch_a_head_that_materialises_them(name):
    cls, kwargs = HEADS[name]
    reference = _track(cls, "reference", **kwargs)
    assert reference.largest_numel >= LOGITS_NUMEL
    assert reference.peak_bytes >= LOGITS_BYTES
