"""The softmax baseline: a Partial-FC-style margin softmax sharded by identity.

Logits are s * (cos theta + margin term) over the (sampled) classes of every shard; the
cross entropy's normaliser spans all shards, so every step all-reduces the row maxima
([N] floats) and then the row sums of exponentials together with the true-class logits
([2, N] floats). Those batch-sized all-reduces are what SphereFace2 does without.

Margins (each changes only the true class's logit, applied with gradient detachment: the
value has the margin, the gradient is that of the plain logit): CosFace s(cos - m), ArcFace
s cos(theta + m), and SphereFace (A-Softmax) s psi(theta) with psi(theta) = (-1)^k cos(m theta) - 2k,
k = floor(m theta / pi), for any real m >= 1. SphereFace comes in two forms (`feature_scale`):
"s", the default, normalises the features and scales every logit by s (the hard-feature-
normalisation variant the SphereFace2 paper compares against); "norm" is the original 2017
A-Softmax: the features keep their norm, class j's logit is |x| cos theta_j, and the target is
the annealed blend |x| (lambda cos theta_y + psi(theta_y)) / (1 + lambda), with lambda =
max(lambda_min, base (1 + gamma t)^-power) at the trainer's step t (`schedule_step`, which the
trainer sets before each forward from its own step, so lambda resumes with the run).

Gradients of the 2017 form: the same detached-offset convention as the other margins. The
offset f_y - |x| cos theta_y is detached, so the gradient flows through |x| and cos theta of
every logit (the target's included) but not through psi or the blend. The original
backpropagates through psi as well; this head does not, because (1) one convention for every
margin keeps one gradient path, chunked without any per-margin derivative; (2) d psi / d cos =
(-1)^k m sin(m theta) / sin(theta) grows without bound as theta nears pi for a non-integer m
(1/sin theta; about 330 at the clamp for m = 1.5), which the detached form never multiplies in.
What is given up is the original's extra pull through d psi / d theta (a factor (d psi / d cos - 1)
/ (1 + lambda) on the target's gradient: small while lambda is large, not once it nears lambda_min).
The margin still acts through the value, as CosFace's and ArcFace's do here: a lower
target logit lowers the true class's probability and so strengthens the pull toward its row.

With `sample_rate < 1`, each rank keeps every class of the global batch that it holds and
samples the rest of its shard uniformly up to `sample_rate * num_local_classes` classes
(Partial FC), or up to N (the global batch) where that is more, since the batch may name N
classes here: a count fixed in advance, so that no step waits for the host to count the
classes present. Only the kept rows take part in the step. The draw is made on the rows' device
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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sf2dist import comm
from sf2dist.heads import chunked
from sf2dist.heads.base import ShardedHead, cosines

MARGINS = {"cosface": 0.4, "arcface": 0.5, "sphereface": 1.5}  # name -> default m
DEFAULT_SCALES = {"cosface": 64.0, "arcface": 64.0, "sphereface": 30.0}  # name -> default s
FEATURE_SCALES = ("s", "norm")  # logits scaled by s (unit features), or by the feature's own norm (A-Softmax 2017)


@dataclass(frozen=True)
class LambdaSchedule:
    """A-Softmax's annealing (SphereFace, 2017): lambda = max(minimum, base (1 + gamma step)^-power)."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    minimum: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"lambda schedule base must be a finite number > 0, got {self.base}")
        for name in ("gamma", "power", "minimum"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"lambda schedule {name} must be a finite number >= 0, got {getattr(self, name)}")

    def at(self, step: int) -> float:
        return max(self.minimum, self.base * (1.0 + self.gamma * step) ** (-self.power))


def sphereface_psi(theta: torch.Tensor, m: float) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi): decreasing and continuous on [0, pi]."""
    k = torch.floor(theta * (m / math.pi))
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(m * theta) - 2.0 * k


def margin_target(cos_y: torch.Tensor, margin: str, m: float) -> torch.Tensor:
    """The true class's cosine with its margin: CosFace cos - m; ArcFace cos(min(theta + m, pi));
    SphereFace psi(theta) with theta from the cosine clamped to [-1 + 1e-5, 1 - 1e-5]."""
    if margin == "cosface":
        return cos_y - m
    if margin == "sphereface":
        return sphereface_psi(torch.acos(cos_y.clamp(-1.0 + 1e-5, 1.0 - 1e-5)), m)
    theta = torch.acos(cos_y.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return torch.cos((theta + m).clamp(max=math.pi))


@dataclass(frozen=True)
class _Logits:
    """How one step turns dots = feature . w_hat into logits: `scale` * dots for every class, the
    true class's replaced by its target (a value only: the offset from the plain logit is detached).

    Unit features (`by_norm` False): dots are cosines and the target is s * margin_target(cos).
    Features that keep their norm (A-Softmax 2017, `scale` 1): dots are |x| cos and the target is
    |x| (lam cos + psi) / (1 + lam).
    """

    margin: str
    m: float
    scale: float
    by_norm: bool = False
    lam: float = 0.0

    def targets(self, dots: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """Target logits [P] from the true classes' dots [P] and their features' norms [P] (None: unit)."""
        if norms is None:
            return self.scale * margin_target(dots, self.margin, self.m)
        cos = dots / norms
        return norms * (self.lam * cos + margin_target(cos, self.margin, self.m)) / (1.0 + self.lam)


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over the global batch from each rank's slice of the cosines.

    Returns the same (global) value on every rank; the backward gives each rank the gradient
    of its own dots only. The margin is applied with gradient detachment.
    """

    @staticmethod
    def forward(ctx, dots, norms, positives, offset, spec, group):
        # dots: [N, S_local] float32 feature . w_hat (cosines for unit features); norms: [N] feature
        # norms, or None for unit features; positives: where each row's true class is, if held
        # here (chunked.Positives); offset: [S_local] 0 for the columns in the loss, the dtype's lowest
        # value for those drawn but left out (see PartialFCHead.sample_classes), or None.
        num_samples = dots.shape[0]
        s = spec.scale
        cols, here = positives.columns, positives.here
        logits = dots * s
        if offset is not None:
            logits.add_(offset)
        target = spec.targets(chunked.take_positive(dots, cols), norms)
        chunked.set_positive_(logits, cols, here, target)
        row_max = comm.all_reduce(logits.max(dim=1).values, "max", group)  # [N]
        logits.sub_(row_max.unsqueeze(1)).exp_()  # [N, S_local], numerators of the softmax
        sums = torch.zeros(2, num_samples, dtype=logits.dtype, device=logits.device)
        sums[0] = logits.sum(dim=1)
        sums[1] = torch.where(here, target - row_max, 0.0)
        comm.all_reduce(sums, "sum", group)  # [sum of exp; true-class logit minus max]
        loss = (sums[0].log() - sums[1]).mean()
        grad = logits.div_(sums[0].unsqueeze(1))  # softmax probabilities
        grad.scatter_add_(1, cols.unsqueeze(1), torch.where(here, -1.0, 0.0).to(grad.dtype).unsqueeze(1))
        ctx.save_for_backward(grad.mul_(s / num_samples))  # dL/d(dots)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_dots,) = ctx.saved_tensors
        return grad_dots * grad_loss, None, None, None, None, None


def _exp_logits(x, inv_norm, offset, pos_cols, inside, targets, row_max):
    """In place over a chunk of s * (e . w) [N, c]: exp(logit - new row max), and that max.

    The logits are s * cos (x divided by the row norms of w), with the true classes' entries
    set to their margin targets (row n's at column pos_cols[n] where inside[n]) and `offset` (or
    None) added to each column (the lowest value for a column out of the loss); the new row max
    is the larger of `row_max` and the chunk's.
    Returns (exp'd chunk, new row max [N], per-row sums of the exp'd chunk [N]).
    """
    x.mul_(inv_norm)
    if offset is not None:
        x.add_(offset)
    chunked.set_positive_(x, pos_cols, inside, targets)
    new_max = torch.maximum(row_max, x.amax(dim=1))
    e = x.sub_(new_max.unsqueeze(1)).exp_()
    return e, new_max, e.sum(dim=1)


def _grad_from_exp(e, inv_norm, pos_cols, inside, total):
    """In place over exp(logit - global row max) [N, c]: g = (e - total * [j = y_n]) / |w_j|.

    With row_scale = s / (N * total), row_scale[n] * g[n, j] * |w_j| is dL/dcos[n, j]: so
    g @ w (raw rows) is dL/de / row_scale, and g^T @ (row_scale * e) is dL/dw_hat / |w|.
    """
    g = e.mul_(inv_norm)
    step = torch.where(inside, -total * inv_norm[pos_cols], 0.0)
    return g.scatter_add_(1, pos_cols.unsqueeze(1), step.to(g.dtype).unsqueeze(1))


def _fused_margin_cross_entropy(embeddings, weight, positives, index, offset, spec, chunk_size, need_grads,
                                mm_dtype, group, compiled):
    """Mean cross entropy of the global batch, and (if `need_grads`) dL/d(embeddings) and dL/d(weight).

    embeddings [N, D] unit-norm (or, with `spec.by_norm`, features of any norm); spec: `_Logits`;
    weight [C_local, D] raw rows (normalised on the fly, the
    normalisation's Jacobian applied to their gradient); index [S] ascending (or None: all);
    offset [S] (or None): added to the columns' logits (the lowest value leaves a column out).
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
    s = spec.scale
    norms = embeddings.norm(dim=1).clamp_min_(1e-12) if spec.by_norm else None  # [N] |x| (A-Softmax 2017)
    scaled = (embeddings * s).to(mm)  # [N, D]: the matmul gives s * (e . w)
    targets = torch.zeros(num_samples, dtype=dtype, device=weight.device)  # s * margin target of each row's class here
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
        pos_cols, inside = positives.in_chunk(start, stop)
        chunk_targets = spec.targets(chunked.take_positive(x, pos_cols) * inv[pos_cols] / s, norms)
        targets = torch.where(inside, chunk_targets, targets)
        part = None if offset is None else offset[start:stop]
        e, new_max, chunk_sum = exp_logits(x, inv, part, pos_cols, inside, targets, row_max)
        row_sum = row_sum.mul_(torch.exp(row_max - new_max)).add_(chunk_sum)  # rescaled to the new max
        row_max = new_max
        last = e  # the backward pass starts with the last chunk: no second matmul for it
    local_max = row_max.clone()
    row_max = comm.all_reduce(row_max, "max", group)  # [N]
    sums = torch.zeros(2, num_samples, dtype=dtype, device=weight.device)
    sums[0] = row_sum * torch.exp(local_max - row_max)
    sums[1] = torch.where(positives.here, targets - row_max, 0.0)
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
        pos_cols, inside = positives.in_chunk(start, stop)
        if last is not None:
            e, last = last.mul_(torch.exp(local_max - row_max).unsqueeze(1)), None
        else:
            part = None if offset is None else offset[start:stop]
            e = exp_logits(chunk_matmul(rows_mm), inv, part, pos_cols, inside, targets, row_max)[0]
        g = grad_from_exp(e, inv, pos_cols, inside, total)
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
    def forward(ctx, embeddings, weight, positives, index, offset, spec, chunk_size, group, compiled):
        mm_dtype = chunked.autocast_dtype(embeddings.device)
        need_grads = any(ctx.needs_input_grad[:2])
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, grads = _fused_margin_cross_entropy(embeddings, weight, positives, index, offset, spec,
                                                      chunk_size, need_grads, mm_dtype, group, compiled)
        if grads is not None:
            ctx.grad_embeddings, ctx.grad_weight = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_embeddings, grad_weight = chunked.take_grads(ctx, ("grad_embeddings", "grad_weight"))
        return (chunked.scale_grad_(grad_embeddings, grad_loss), chunked.scale_grad_(grad_weight, grad_loss),
                None, None, None, None, None, None, None)


def _in_loss(index: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """The drawn classes that are in the loss (those without the lowest offset); reads the device."""
    return index if offset is None else index[offset == 0]


class PartialFCHead(ShardedHead):
    """Identity-sharded margin softmax (CosFace, ArcFace or SphereFace) with Partial FC class sampling.

    `weight` [num_local_classes, D] holds the rows of global classes class_start..class_stop-1
    (normalised inside the forward, with gradient). `forward` returns the mean loss of the
    global batch, the same value on every rank. Its gradient is dense (zero on the rows a
    sampled step did not keep), so any torch optimiser steps it. `implementation`,
    `chunk_size` and `compile_elementwise` are described in `ShardedHead`.

    `s` None: the margin's default (64 for CosFace and ArcFace, 30 for SphereFace); `m` None:
    the margin's default (0.4, 0.5, 1.5). `feature_scale="norm"` (SphereFace only) is the
    original A-Softmax with `lambda_schedule` read at `schedule_step` (see the module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: str = "cosface",
        s: float | None = None,
        m: float | None = None,
        feature_scale: str = "s",
        lambda_schedule: LambdaSchedule = LambdaSchedule(),
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
        if feature_scale not in FEATURE_SCALES:
            raise ValueError(f"feature_scale must be one of {FEATURE_SCALES}, got {feature_scale!r}")
        if feature_scale == "norm":
            if margin != "sphereface":
                raise ValueError(f"feature_scale='norm' is the original A-Softmax (SphereFace 2017); it needs "
                                 f"margin='sphereface', not {margin!r}")
            if s is not None:
                raise ValueError(f"feature_scale='norm' scales each logit by its feature's norm; leave s unset "
                                 f"(None), got s={s}")
        elif s is None:
            s = DEFAULT_SCALES[margin]
        if s is not None and not s > 0:
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
        self.margin, self.feature_scale = margin, feature_scale
        self.s = None if s is None else float(s)  # None: logits scaled by the feature's norm
        self.m = float(MARGINS[margin] if m is None else m)
        if margin == "sphereface" and not (math.isfinite(self.m) and self.m >= 1.0):
            raise ValueError(f"the SphereFace margin m must be a real number >= 1 (psi is decreasing there), "
                             f"got {self.m}")
        if self.m < 0:
            raise ValueError(f"margin m must be non-negative, got {self.m}")
        self.lambda_schedule = lambda_schedule
        self.sample_rate = float(sample_rate)
        self.num_sample = max(1, int(self.sample_rate * self.num_local_classes))
        self._last_kept: torch.Tensor | slice | None = None  # local classes the last forward drew (slice: all)
        self._last_offset: torch.Tensor | None = None  # and their logit offsets (None: all in the loss)

    def extra_repr(self) -> str:
        scale = f"s={self.s}" if self.s is not None else f"feature_scale=norm, {self.lambda_schedule}"
        return f"{super().extra_repr()}, margin={self.margin}, {scale}, m={self.m}, sample_rate={self.sample_rate}"

    @property
    def blend_lambda(self) -> float | None:
        """A-Softmax's lambda at `schedule_step` (feature_scale "norm"); None for the other forms."""
        return self.lambda_schedule.at(self.schedule_step) if self.feature_scale == "norm" else None

    def _logits(self) -> _Logits:
        if self.feature_scale == "norm":
            return _Logits(self.margin, self.m, 1.0, by_norm=True, lam=self.blend_lambda)
        return _Logits(self.margin, self.m, self.s)

    @property
    def last_step_columns(self) -> int | None:
        """The class columns the last forward computed (those offset out of its loss included)."""
        if self._last_kept is None:
            return None
        return self.num_local_classes if isinstance(self._last_kept, slice) else self._last_kept.numel()

    @property
    def last_sampled_classes(self) -> torch.Tensor | None:
        """Global ids of the classes the last forward kept, ascending (None before any forward).
        Formed when asked: a step at rate 1 keeps every class without listing them."""
        if isinstance(self._last_kept, slice):
            return torch.arange(self.class_start, self.class_stop, device=self.weight.device)
        return None if self._last_kept is None else _in_loss(self._last_kept, self._last_offset) + self.class_start

    def sample_classes(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Sorted local indices of the classes a step with the gathered `labels` keeps in its loss
        (None: every class); draws as `draw_classes` does, for inspection (it reads the device)."""
        index, offset = self.draw_classes(labels)
        return None if index is None else _in_loss(index, offset)

    def draw_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sorted local class indices drawn, [S] logit offsets or None): every class a row of the
        batch names and the rest uniform up to `num_sample` classes, or as many as are named where
        that is more; (None, None) when every class is kept (nothing drawn, no index).

        The count must be known to the host without reading the device: with a global batch of
        N <= num_sample rows (the usual case) it is num_sample; otherwise min(N, L) classes are
        drawn in score order and those past max(num_sample, named here) are left out of the
        loss by an offset of the dtype's lowest value (their logits vanish from the softmax).
        """
        return self._draw_classes(chunked.local_positives(labels, self.class_start, self.num_local_classes))

    def _draw_classes(self, positives: chunked.Positives) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        batch = positives.columns.numel()
        if self.num_sample >= self.num_local_classes:
            return None, None
        device = self.weight.device
        generator = self.step_generator(device)
        self.sample_step += 1
        scores = torch.rand(self.num_local_classes, generator=generator, device=device)
        present = chunked.present_rows(positives, self.num_local_classes)
        scores.masked_fill_(present, 2.0)  # above any uniform draw: always kept
        if batch <= self.num_sample:
            return scores.topk(self.num_sample, sorted=False).indices.sort().values, None
        drawn = scores.topk(min(batch, self.num_local_classes), sorted=True).indices  # best first
        in_loss = torch.arange(drawn.numel(), device=device) < present.sum().clamp_min(self.num_sample)
        index, order = drawn.sort()
        offset = torch.zeros(index.numel(), dtype=torch.float32, device=device)
        offset.masked_fill_(~in_loss[order], torch.finfo(torch.float32).min)
        return index, offset

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gathered, gathered_labels, _ = self.gather_batch(embeddings, labels)
        positives = chunked.local_positives(gathered_labels, self.class_start, self.num_local_classes)
        kept, offset = self._draw_classes(positives)  # [S_local], or None: every class
        self._last_kept, self._last_offset = (slice(None) if kept is None else kept), offset
        if kept is not None:
            positives = chunked.among(positives, kept)  # positions among the kept
        spec = self._logits()
        features = gathered if spec.by_norm else F.normalize(gathered, dim=1)  # [N, D]
        if self.implementation == "fused":
            return _FusedShardedMarginCrossEntropy.apply(
                features, self.weight, positives, kept, offset, spec, self.chunk_size, self.process_group,
                chunked.should_compile(self.compile_elementwise, gathered.device),
            )
        weight = self.weight if kept is None else self.weight[kept]
        dots = cosines(features, F.normalize(weight, dim=1))  # [N, S_local]
        norms = features.detach().norm(dim=1).clamp_min_(1e-12) if spec.by_norm else None  # [N]
        return _ShardedMarginCrossEntropy.apply(dots, norms, positives, offset, spec, self.process_group)
