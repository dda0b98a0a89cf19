"""The softmax baseline: a Partial-FC-style margin softmax sharded by identity.

Logits are s * (cos theta + margin term) over the (sampled) classes of every shard; the
cross entropy's normaliser spans all shards, so every step all-reduces the row maxima
([N] floats) and then the row sums of exponentials together with the true-class logits
([2, N] floats). Those batch-sized all-reduces are what SphereFace2 does without.

With `sample_rate < 1`, each rank keeps every class of the global batch that it holds and
samples the rest of its shard uniformly up to `sample_rate * num_local_classes` classes
(Partial FC); only the kept rows take part in the step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sf2dist import comm
from sf2dist.heads.base import ShardedHead, upcast

MARGINS = {"cosface": 0.4, "arcface": 0.5}  # name -> default m


def margin_target(cos_y: torch.Tensor, margin: str, m: float) -> torch.Tensor:
    """The true class's cosine with its margin: CosFace cos - m; ArcFace cos(min(theta + m, pi))."""
    if margin == "cosface":
        return cos_y - m
    theta = torch.acos(cos_y.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return torch.cos((theta + m).clamp(max=math.pi))


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over the global batch from each rank's slice of the cosines.

    Returns the same (global) value on every rank; the backward gives each rank the gradient
    of its own cosines only. The margin is applied with gradient detachment.
    """

    @staticmethod
    def forward(ctx, cos, rows, cols, margin, s, m, group):
        # cos: [N, S_local] float32; rows/cols: positions of the true classes held here.
        num_samples = cos.shape[0]
        logits = cos * s
        target = s * margin_target(cos[rows, cols], margin, m)
        logits[rows, cols] = target
        row_max = comm.all_reduce(logits.max(dim=1).values, "max", group)  # [N]
        logits.sub_(row_max.unsqueeze(1)).exp_()  # [N, S_local], numerators of the softmax
        sums = torch.zeros(2, num_samples, dtype=logits.dtype, device=logits.device)
        sums[0] = logits.sum(dim=1)
        sums[1, rows] = target - row_max[rows]
        comm.all_reduce(sums, "sum", group)  # [sum of exp; true-class logit minus max]
        loss = (sums[0].log() - sums[1]).mean()
        grad = logits.div_(sums[0].unsqueeze(1))  # softmax probabilities
        grad[rows, cols] -= 1.0
        ctx.save_for_backward(grad.mul_(s / num_samples))  # dL/dcos
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_cos,) = ctx.saved_tensors
        return grad_cos * grad_loss, None, None, None, None, None, None


class PartialFCHead(ShardedHead):
    """Identity-sharded margin softmax (CosFace or ArcFace) with Partial FC class sampling.

    `weight` [num_local_classes, D] holds the rows of global classes class_start..class_stop-1
    (normalised inside the forward, with gradient). `forward` returns the mean loss of the
    global batch, the same value on every rank.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: str = "cosface",
        s: float = 64.0,
        m: float | None = None,
        sample_rate: float = 1.0,
        process_group: dist.ProcessGroup | None = None,
        backbone_grads_averaged: bool = True,
        check_inputs: bool = True,
        seed: int = 0,
    ) -> None:
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {sorted(MARGINS)}, got {margin!r}")
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        super().__init__(
            num_classes,
            embedding_dim,
            process_group=process_group,
            backbone_grads_averaged=backbone_grads_averaged,
            check_inputs=check_inputs,
            seed=seed,
        )
        self.margin, self.s = margin, float(s)
        self.m = float(MARGINS[margin] if m is None else m)
        if self.m < 0:
            raise ValueError(f"margin m must be non-negative, got {self.m}")
        self.sample_rate = float(sample_rate)
        self.num_sample = max(1, int(self.sample_rate * self.num_local_classes))
        # Each rank samples its own shard, so each rank has its own stream.
        self._sampler = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (self.rank + 1))
        self.last_sampled_classes: torch.Tensor | None = None  # global ids kept in the last step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}"

    def sample_classes(self, local_positive: torch.Tensor) -> torch.Tensor:
        """Sorted local class indices to keep: all of `local_positive`, the rest uniform."""
        if self.num_sample >= self.num_local_classes:
            return torch.arange(self.num_local_classes, device=local_positive.device)
        scores = torch.rand(self.num_local_classes, generator=self._sampler).to(local_positive.device)
        scores[local_positive] = 2.0  # above any uniform draw: always kept
        keep = max(self.num_sample, int(local_positive.unique().numel()))
        return scores.topk(keep).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gathered, gathered_labels, _ = self.gather_batch(embeddings, labels)
        here = (gathered_labels >= self.class_start) & (gathered_labels < self.class_stop)
        rows = here.nonzero().squeeze(1)
        local_labels = gathered_labels[rows] - self.class_start
        kept = self.sample_classes(local_labels)  # [S_local]
        self.last_sampled_classes = kept + self.class_start
        weight = self.weight if kept.numel() == self.num_local_classes else self.weight[kept]
        cols = torch.searchsorted(kept, local_labels)  # positions of the true classes among the kept
        cos = upcast(F.linear(F.normalize(gathered, dim=1), F.normalize(weight, dim=1)))  # [N, S_local]
        return _ShardedMarginCrossEntropy.apply(cos, rows, cols, self.margin, self.s, self.m, self.process_group)
