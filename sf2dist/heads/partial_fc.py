"""The softmax baseline: a Partial-FC-style margin softmax sharded by identity.

Logits are s * (cos theta + margin term) over the (sampled) classes of every shard; the
cross entropy's normaliser spans all shards, so every step all-reduces the row maxima
([N] floats) and then the row sums of exponentials together with the true-class logits
([2, N] floats). Those batch-sized all-reduces are what SphereFace2 does without.

With `sample_rate < 1`, each rank keeps every class of the global batch that it holds and
samples the rest of its shard uniformly up to `sample_rate * num_local_classes` classes
(Partial FC); only the kept rows take part in the step. The draw is made on the rows' device
from a generator seeded with (seed, rank, `sample_step`), as SphereFace2's: restore
`sample_step` on resume to repeat a run's draws. At rate 1 nothing is drawn or indexed.

The default (fused) implementation never holds the [N, S_local] logits: a first pass over
chunks of classes keeps a running row maximum and sum of exponentials (a streaming
log-sum-exp, rescaled when the maximum grows); the same two all-reduces as the reference then
combine the shards; a second pass recomputes each chunk's cosines (the last chunk of the first
pass is kept instead) and folds the softmax gradient into the embedding and row gradients.
It costs one more cosine matmul than the reference over all but the last chunk.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sf2dist import comm
from sf2dist.heads import chunked
from sf2dist.heads.base import ShardedHead, cosines

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


def _exp_logits(x, inv_norm, pos_rows, pos_cols, targets, row_max):
    """In place over a chunk of s * (e . w) [N, c]: exp(logit - new row max), and that max.

    The logits are s * cos (x divided by the row norms of w), with the true classes' entries
    set to their margin targets; the new row max is the larger of `row_max` and the chunk's.
    Returns (exp'd chunk, new row max [N], per-row sums of the exp'd chunk [N]).
    """
    x.mul_(inv_norm)
    x[pos_rows, pos_cols] = targets
    new_max = torch.maximum(row_max, x.amax(dim=1))
    e = x.sub_(new_max.unsqueeze(1)).exp_()
    return e, new_max, e.sum(dim=1)


def _grad_from_exp(e, inv_norm, pos_rows, pos_cols, total):
    """In place over exp(logit - global row max) [N, c]: g = (e - total * [j = y_n]) / |w_j|.

    With row_scale = s / (N * total), row_scale[n] * g[n, j] * |w_j| is dL/dcos[n, j]: so
    g @ w (raw rows) is dL/de / row_scale, and g^T @ (row_scale * e) is dL/dw_hat / |w|.
    """
    g = e.mul_(inv_norm)
    g[pos_rows, pos_cols] -= total[pos_rows] * inv_norm[pos_cols]
    return g


def _fused_margin_cross_entropy(embeddings, weight, rows, cols, index, margin, s, m, chunk_size, need_grads,
                                mm_dtype, group, compiled):
    """Mean cross entropy of the global batch, and (if `need_grads`) dL/d(embeddings) and dL/d(weight).

    embeddings [N, D] unit-norm; weight [C_local, D] raw rows (normalised on the fly, the
    normalisation's Jacobian applied to their gradient); index [S] ascending (or None: all).
    `mm_dtype` (autocast's, or None): the precision of the cosine matmuls; the gradient matmuls
    run in `chunked.grad_mm_dtype` of it (a softmax probability far from the target underflows fp16).
    """
    exp_logits = chunked.elementwise(_exp_logits, compiled)
    grad_from_exp = chunked.elementwise(_grad_from_exp, compiled)
    num_samples, dim = embeddings.shape
    dtype = embeddings.dtype
    mm = mm_dtype or dtype
    grad_mm = chunked.grad_mm_dtype(mm_dtype) or dtype
    weight = weight.detach()
    embeddings = embeddings.detach()
    num_columns = weight.shape[0] if index is None else index.numel()
    chunk_size = chunked.resolve_chunk_size(chunk_size, num_samples, num_columns, weight.device)
    bounds = chunked.chunk_bounds(num_columns, chunk_size)
    scaled = (embeddings * s).to(mm)  # [N, D]: the matmul gives s * (e . w)
    columns = cols if index is None else torch.searchsorted(index, cols)
    positives = chunked.PositivesByChunk(rows, columns, bounds)
    targets = torch.empty(positives.rows.numel(), dtype=dtype, device=weight.device)  # s * margin target
    inv_norm = torch.empty(num_columns, dtype=dtype, device=weight.device)  # 1 / max(|w|, eps)
    degenerate = torch.empty(num_columns, dtype=torch.bool, device=weight.device)  # |w| <= eps
    row_max = torch.full((num_samples,), -math.inf, dtype=dtype, device=weight.device)
    row_sum = torch.zeros(num_samples, dtype=dtype, device=weight.device)  # sum of exp(logit - row_max)

    def chunk_matmul(rows_mm):
        x = torch.mm(scaled, rows_mm.t())  # [N, c]
        return x.to(dtype)

    last = None
    for start, stop in bounds:
        rows_w = chunked.iter_rows(weight, index, start, stop)
        norm = rows_w.norm(dim=1).to(dtype)
        degenerate[start:stop] = norm <= 1e-12
        inv = torch.reciprocal(norm.clamp_min_(1e-12), out=inv_norm[start:stop])
        x = chunk_matmul(rows_w.to(mm))
        pos_rows, pos_cols, part = positives.in_chunk(start)
        targets[part] = s * margin_target(x[pos_rows, pos_cols] * inv[pos_cols] / s, margin, m)
        e, new_max, chunk_sum = exp_logits(x, inv, pos_rows, pos_cols, targets[part], row_max)
        row_sum = row_sum.mul_(torch.exp(row_max - new_max)).add_(chunk_sum)  # rescaled to the new max
        row_max = new_max
        last = e  # the backward pass starts with the last chunk: no second matmul for it
    local_max = row_max.clone()
    row_max = comm.all_reduce(row_max, "max", group)  # [N]
    sums = torch.zeros(2, num_samples, dtype=dtype, device=weight.device)
    sums[0] = row_sum * torch.exp(local_max - row_max)
    sums[1, positives.rows] = targets - row_max[positives.rows]
    comm.all_reduce(sums, "sum", group)  # [sum of exp; true-class logit minus max]
    total = sums[0]
    loss = (total.log() - sums[1]).mean()
    if not need_grads:
        return loss, None
    row_scale = (s / num_samples) / total  # [N]
    weighted = (embeddings * row_scale.unsqueeze(1)).to(grad_mm)  # [N, D]
    grad_embeddings = torch.zeros(num_samples, dim, dtype=dtype, device=weight.device)  # until times row_scale
    grad_weight = (torch.empty_like if index is None else torch.zeros_like)(weight)
    for start, stop in reversed(bounds):
        rows_w = chunked.iter_rows(weight, index, start, stop)
        rows_mm = rows_w.to(mm)
        inv = inv_norm[start:stop]
        pos_rows, pos_cols, part = positives.in_chunk(start)
        if last is not None:
            e, last = last.mul_(torch.exp(local_max - row_max).unsqueeze(1)), None
        else:
            e = exp_logits(chunk_matmul(rows_mm), inv, pos_rows, pos_cols, targets[part], row_max)[0]
        g = grad_from_exp(e, inv, pos_rows, pos_cols, total)
        g_mm = g.to(grad_mm)
        chunked.addmm_into(grad_embeddings, g_mm, rows_mm if grad_mm == mm else rows_w.to(grad_mm))
        grad_rows = torch.mm(g_mm.t(), weighted)  # dL/dw_hat / |w|  [c, D]
        grad_rows = grad_rows.to(weight.dtype)
        # dL/dw = (dL/dw_hat - w_hat (w_hat . dL/dw_hat)) / |w|, or dL/dw_hat / eps where |w| <= eps
        along = torch.linalg.vecdot(grad_rows, rows_w) * inv.square().masked_fill_(degenerate[start:stop], 0.0)
        grad_rows.addcmul_(rows_w, along.unsqueeze(1).to(grad_rows.dtype), value=-1.0)
        if index is None:
            grad_weight[start:stop] = grad_rows
        else:
            grad_weight.index_copy_(0, index[start:stop], grad_rows)
    return loss, (grad_embeddings.mul_(row_scale.unsqueeze(1)), grad_weight)


class _FusedShardedMarginCrossEntropy(torch.autograd.Function):
    """Fused: the global mean cross entropy, gradients formed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, embeddings, weight, rows, cols, index, margin, s, m, chunk_size, group, compiled):
        mm_dtype = chunked.autocast_dtype(embeddings.device)
        need_grads = any(ctx.needs_input_grad[:2])
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, grads = _fused_margin_cross_entropy(embeddings, weight, rows, cols, index, margin, s, m,
                                                      chunk_size, need_grads, mm_dtype, group, compiled)
        if grads is not None:
            ctx.grad_embeddings, ctx.grad_weight = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_embeddings, grad_weight = chunked.take_grads(ctx, ("grad_embeddings", "grad_weight"))
        return (chunked.scale_grad_(grad_embeddings, grad_loss), chunked.scale_grad_(grad_weight, grad_loss),
                None, None, None, None, None, None, None, None, None)


class PartialFCHead(ShardedHead):
    """Identity-sharded margin softmax (CosFace or ArcFace) with Partial FC class sampling.

    `weight` [num_local_classes, D] holds the rows of global classes class_start..class_stop-1
    (normalised inside the forward, with gradient). `forward` returns the mean loss of the
    global batch, the same value on every rank. Its gradient is dense (zero on the rows a
    sampled step did not keep), so any torch optimiser steps it. `implementation`,
    `chunk_size` and `compile_elementwise` are described in `ShardedHead`.
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
        implementation: str = "fused",
        chunk_size: int | None = None,
        compile_elementwise: bool | None = None,
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
            implementation=implementation,
            chunk_size=chunk_size,
            compile_elementwise=compile_elementwise,
        )
        self.margin, self.s = margin, float(s)
        self.m = float(MARGINS[margin] if m is None else m)
        if self.m < 0:
            raise ValueError(f"margin m must be non-negative, got {self.m}")
        self.sample_rate = float(sample_rate)
        self.num_sample = max(1, int(self.sample_rate * self.num_local_classes))
        self._last_kept: torch.Tensor | slice | None = None  # local classes the last forward kept (slice: all)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}"

    @property
    def last_sampled_classes(self) -> torch.Tensor | None:
        """Global ids of the classes the last forward kept, ascending (None before any forward).
        Formed when asked: a step at rate 1 keeps every class without listing them."""
        if isinstance(self._last_kept, slice):
            return torch.arange(self.class_start, self.class_stop, device=self.weight.device)
        return None if self._last_kept is None else self._last_kept + self.class_start

    def sample_classes(self, local_positive: torch.Tensor) -> torch.Tensor | None:
        """Sorted local class indices to keep: all of `local_positive`, the rest uniform; None
        when every class is kept (then nothing is drawn and no index is formed)."""
        if self.num_sample >= self.num_local_classes:
            return None
        device = self.weight.device
        generator = self.step_generator(device)
        self.sample_step += 1
        scores = torch.rand(self.num_local_classes, generator=generator, device=device)
        scores[local_positive] = 2.0  # above any uniform draw: always kept
        keep = self.num_sample
        if local_positive.numel() > keep:  # the batch may hold more classes here: count them (a host sync)
            keep = max(keep, int((scores > 1.0).sum()))
        if keep >= self.num_local_classes:
            return None
        return scores.topk(keep, sorted=False).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gathered, gathered_labels, _ = self.gather_batch(embeddings, labels)
        here = (gathered_labels >= self.class_start) & (gathered_labels < self.class_stop)
        rows = here.nonzero().squeeze(1)
        local_labels = gathered_labels[rows] - self.class_start
        kept = self.sample_classes(local_labels)  # [S_local], or None: every class
        self._last_kept = slice(None) if kept is None else kept
        if self.implementation == "fused":
            return _FusedShardedMarginCrossEntropy.apply(
                F.normalize(gathered, dim=1), self.weight, rows, local_labels, kept, self.margin, self.s, self.m,
                self.chunk_size, self.process_group, chunked.should_compile(self.compile_elementwise, gathered.device),
            )
        weight = self.weight if kept is None else self.weight[kept]
        cols = local_labels if kept is None else torch.searchsorted(kept, local_labels)  # among the kept
        cos = cosines(F.normalize(gathered, dim=1), F.normalize(weight, dim=1))  # [N, S_local]
        return _ShardedMarginCrossEntropy.apply(cos, rows, cols, self.margin, self.s, self.m, self.process_group)
