"""Bad input to the heads raises ValueError naming the value and where it came from."""
from __future__ import annotations

import pytest
import torch

from sf2dist.heads import PartialFCHead, SphereFace2Head
from tests.distributed import run_on_ranks

HEADS = (SphereFace2Head, PartialFCHead)


@pytest.mark.parametrize("head_cls", HEADS)
def test_labels_out_of_range(head_cls):
    head = head_cls(10, 4)
    with pytest.raises(ValueError, match=r"label 10 at batch index 2 on rank 0 is outside \[0, 10\)"):
        head(torch.randn(3, 4), torch.tensor([1, 2, 10]))
    with pytest.raises(ValueError, match=r"label -1 at batch index 0 on rank 0"):
        head(torch.randn(3, 4), torch.tensor([-1, 2, 3]))


@pytest.mark.parametrize("head_cls", HEADS)
def test_labels_must_be_integers(head_cls):
    head = head_cls(10, 4)
    with pytest.raises(ValueError, match="labels on rank 0 have dtype torch.float32; identity labels must be an integer"):
        head(torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"labels on rank 0 have shape \(2,\); expected \[3\]"):
        head(torch.randn(3, 4), torch.tensor([1, 2]))


@pytest.mark.parametrize("head_cls", HEADS)
def test_embeddings_of_the_wrong_width(head_cls):
    head = head_cls(10, 4)
    with pytest.raises(ValueError, match=r"embeddings on rank 0 have shape \(3, 5\); this head expects \[batch, 4\]"):
        head(torch.randn(3, 5), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("head_cls", HEADS)
def test_non_finite_embeddings(head_cls):
    head = head_cls(10, 4)
    embeddings = torch.randn(3, 4)
    embeddings[1, 2] = float("nan")
    with pytest.raises(ValueError, match="embedding at batch index 1 on rank 0 is not finite"):
        head(embeddings, torch.tensor([1, 2, 3]))


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match=r"margin must be one of \('C', 'A', 'M'\)"):
        SphereFace2Head(10, 4, margin="X")
    with pytest.raises(ValueError, match="alpha"):
        SphereFace2Head(10, 4, alpha=1.0)
    with pytest.raises(ValueError, match="margin must be one of"):
        PartialFCHead(10, 4, margin="sphereface3")
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 0.0"):
        PartialFCHead(10, 4, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        SphereFace2Head(1, 4)


def test_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    embeddings, labels = torch.randn(16, 32), torch.randint(0, 50, (16,))
    for head in (SphereFace2Head(50, 32), PartialFCHead(50, 32, s=16.0)):
        exact = head(embeddings, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head(embeddings, labels)
        assert mixed.dtype == torch.float32
        assert mixed.item() == pytest.approx(exact.item(), rel=0.05)
        mixed.backward()
        assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()


def _errors_on_three_ranks(rank: int, world_size: int) -> dict:
    messages = {}
    try:
        SphereFace2Head(2, 4)
    except ValueError as err:
        messages["too_few_classes"] = str(err)
    head = SphereFace2Head(9, 4)
    labels = torch.tensor([1, 2]) if rank != 1 else torch.tensor([3, 9])
    try:  # the bad label is on rank 1, but every rank sees the gathered batch and raises
        head(torch.randn(2, 4), labels)
    except ValueError as err:
        messages["bad_label"] = str(err)
    embeddings = torch.randn(2 + rank, 4)  # uneven batches are supported
    if rank == 2:
        embeddings[3, 0] = float("inf")
    try:
        head(embeddings, torch.zeros(2 + rank, dtype=torch.int64))
    except ValueError as err:
        messages["non_finite"] = str(err)
    return messages


def test_errors_are_raised_on_every_rank_and_name_the_source_rank():
    for messages in run_on_ranks(_errors_on_three_ranks, 3):
        assert "num_classes=2 is smaller than the world size 3" in messages["too_few_classes"]
        assert messages["bad_label"] == "label 9 at batch index 1 on rank 1 is outside [0, 9) (num_classes=9)"
        assert messages["non_finite"] == "embedding at batch index 3 on rank 2 is not finite (NaN or Inf)"
