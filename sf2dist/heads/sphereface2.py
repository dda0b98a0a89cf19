"""SphereFace2 (Wen, Liu et al., ICLR 2022) on a classifier sharded by identity.

Each class is its own binary classifier, so rank r's loss over its classes [start_r, stop_r)
needs only the gathered embeddings and labels: the forward issues no collective beyond
those gathers. With z_i = r * g_m(cos theta_i) + b (margin and similarity adjustment applied
with gradient detachment: the value of r*g_m(cos), the gradient of r*cos),

    L = loss_weight * mean_n (1/r) [ alpha * softplus(-z_y) + (1 - alpha) * sum_{i != y} softplus(z_i) ]

and L is the sum over ranks of each rank's share. `forward` returns this rank's share;
`backward` on it gives exact local row gradients, a reduce-scatter of the embedding gradient
and one all-reduce of the shared bias's gradient. `global_loss` sums the shares for logging.

Every term depends on one cosine only, so the default (fused) implementation works through
the local classes chunk by chunk: cosines, loss and dL/dcos of a chunk in one go, folded at
once into the embedding and row gradients; it never holds more than one [N, chunk] tile.

Class sampling (`sample_rate` p < 1): the loss is a sum of independent per-class terms, so a
step may use a random subset of them and reweight it to an unbiased estimate. On each rank,
every class present in the global batch is kept with weight 1, and the step uses a fixed number
of rows, S = min(L, max(ceil(p * L), N + 1)) of the L local ones (N: the global batch): of the M
other local classes, k = S - P (P = L - M present) are drawn uniformly without replacement and
their terms weighted by M / k (each is drawn with probability k / M, so the expected loss and
gradients are the full ones; k >= 1 whenever M >= 1). S is fixed so that no step waits for the
host to count the classes present. Only
the kept rows are renormalised, read and given a gradient: `weight.grad` is then a sparse COO
tensor holding exactly those rows, `last_sampled_rows` names them, and
`sf2dist.heads.sparse_sgd.SampledRowsSGD` updates only them (torch.optim.SGD cannot take a
sparse gradient with weight decay). The draw of step s on rank q comes from a generator seeded
with (seed, q, s), where s is `sample_step`, counted by the head: restore it on resume to repeat
a run's draws exactly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sf2dist import comm
from sf2dist.heads import chunked
from sf2dist.heads.base import ShardedHead, cosines

MARGINS = ("C", "A", "M")


def similarity_adjust(cos: torch.Tensor, t: float) -> torch.Tensor:
    """g(z) = 2((z + 1)/2)^t - 1 (paper Sec. 3.4)."""
    return 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0


def positive_target(cos_y: torch.Tensor, margin: str, m: float, t: float) -> torch.Tensor:
    """g_m(cos theta_y) for the true class: C subtracts m; A adds m to theta; M multiplies theta by m."""
    if margin == "C":
        return similarity_adjust(cos_y, t) - m
    theta = torch.acos(cos_y.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    theta = theta + m if margin == "A" else theta * m
    return similarity_adjust(torch.cos(theta.clamp(0.0, math.pi)), t)


def negative_target(cos: torch.Tensor, margin: str, m: float, t: float) -> torch.Tensor:
    """g_m(cos theta_i) for the other classes: C adds m; A and M leave them unchanged."""
    adjusted = similarity_adjust(cos, t)
    return adjusted + m if margin == "C" else adjusted


def initial_bias(num_classes: int, alpha: float, r: float, m: float, t: float, margin: str) -> float:
    """The bias that makes the initial loss balanced (paper App. G), from the global class count."""
    if margin == "C":
        a_y = r * (2.0 * 0.5**t - 1.0 - m)
        a_i = r * (2.0 * 0.5**t - 1.0 + m)
    else:
        theta_y = min(math.pi, math.pi / 2.0 + m) if margin == "A" else min(math.pi, m * math.pi / 2.0)
        a_y = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0)
        a_i = r * (2.0 * 0.5**t - 1.0)
    z = alpha / ((1.0 - alpha) * (num_classes - 1.0))
    root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i))
    return math.log(2.0 * z) - a_i - math.log(1.0 - z + root)


@dataclass(frozen=True)
class LossTerms:
    """The hyper-parameters of the loss, as the loss functions take them."""

    alpha: float
    r: float
    m: float
    t: float
    margin: str
    loss_weight: float


class _ShardLoss(torch.autograd.Function):
    """Reference: this rank's share of the loss from its materialised cosines.

    Every term depends on one cosine only, so dL/dcos is known elementwise when the loss is:
    keeping it (one [N, S] tensor) is cheaper than keeping autograd's intermediates.
    `class_weight` [S] weights each column's terms (sampling), None for all ones.
    """

    @staticmethod
    def forward(ctx, cos, bias, positives, class_weight, terms, group):
        # cos: [N, S] float32; positives: where each row's true class is, if held here (chunked.Positives).
        alpha, r, m, t, margin = terms.alpha, terms.r, terms.m, terms.t, terms.margin
        num_samples = cos.shape[0]
        z = negative_target(cos, margin, m, t).mul_(r).add_(bias)  # [N, S]
        per_class = F.softplus(z).sum(dim=0)  # [S]
        if class_weight is not None:
            per_class = per_class * class_weight
        loss = (1.0 - alpha) * per_class.sum()
        cols, here = positives.columns, positives.here
        z_neg_y = chunked.take_positive(z, cols)
        z_pos_y = r * positive_target(chunked.take_positive(cos, cols), margin, m, t) + bias
        correction = alpha * F.softplus(-z_pos_y) - (1.0 - alpha) * F.softplus(z_neg_y)
        loss = loss + torch.where(here, correction, 0.0).sum()
        grad = z.sigmoid_().mul_(1.0 - alpha)  # dL/dz up to the constant, reusing z's storage
        chunked.set_positive_(grad, cols, here, -alpha * torch.sigmoid(-z_pos_y))
        if class_weight is not None:  # the batch's own classes (all positives) have weight 1
            grad.mul_(class_weight)
        scale = terms.loss_weight / (r * num_samples)
        grad_cos = grad.mul_(scale * r)  # dL/dcos = r * dL/dz
        grad_bias = grad_cos.sum() / r  # dL/db = sum of dL/dz
        ctx.group = group
        ctx.save_for_backward(grad_cos, grad_bias)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_cos, grad_bias = ctx.saved_tensors
        grad_bias = comm.all_reduce(grad_bias * grad_loss, "sum", ctx.group)  # b is shared by all shards
        return grad_cos * grad_loss, grad_bias, None, None, None, None


def _negative_terms(scaled_cos: torch.Tensor, shift: float, t: float, kappa: torch.Tensor):
    """Over a chunk of a*cos, in place: (per-column sums of softplus(z), sigmoid(z)).

    z = r * g_m(cos) + b is every entry's negative logit; with a = (2r / 2^t)^(1/t) it is
    (a*cos + a)^t + kappa (kappa = b + r(m - 1) for margin C, b - r for A and M): three passes.
    """
    z = scaled_cos.add_(shift).pow_(t).add_(kappa)
    return F.softplus(z).sum(dim=0), z.sigmoid_()


def _fused_shard_loss(embeddings, weight, bias, positives, index, class_weight, terms, chunk_size,
                      need_grads, mm_dtype, negative_terms, update=None):
    """This rank's share of the loss, and (if `need_grads`) dL/d(embeddings), dL/d(used rows), dL/db.

    embeddings [N, D]: the unit-norm gathered batch; weight [C_local, D]: the rows, renormalised
    here in place (chunk by chunk, as they are read); positives (`chunked.Positives`): each row's
    true class among the used columns; index [S] (or None: all rows): the rows used, ascending;
    class_weight [S] (or None): the weight of each used row's terms.
    `update(rows, values, grad)` (fused step): instead of returning dL/d(rows), hand each chunk's
    row gradient, with the chunk's float32 rows, to it as soon as the chunk is done (it steps
    them); the row gradient returned is then None. `mm_dtype` (autocast's, or None): the
    precision of the cosine matmul; the gradient matmuls run in `chunked.grad_mm_dtype` of it.
    """
    alpha, r, t = terms.alpha, terms.r, terms.t
    num_samples, dim = embeddings.shape
    dtype = embeddings.dtype  # the loss math's precision (float32 under autocast too)
    mm = mm_dtype or dtype
    grad_mm = chunked.grad_mm_dtype(mm_dtype) or dtype  # bfloat16 under fp16: gradients keep float32's range
    weight = weight.detach()
    stored = weight.dtype  # float32, or bfloat16 storage (read into float32 chunk by chunk)
    num_columns = weight.shape[0] if index is None else index.numel()
    chunk_size = chunked.resolve_chunk_size(chunk_size, num_samples, num_columns, weight.device)
    bounds = chunked.chunk_bounds(num_columns, chunk_size)
    shift = (2.0 * r / 2.0**t) ** (1.0 / t)
    bias_value = bias.detach().to(dtype)
    kappa = bias_value + (r * (terms.m - 1.0) if terms.margin == "C" else -r)
    grad_scale = (1.0 - alpha) * terms.loss_weight / num_samples  # dL/dcos per unit of sigmoid(z)
    embeddings = embeddings.detach()
    scaled = (embeddings * shift).to(mm)  # [N, D]: the first matmul gives a*cos
    negative_sum = torch.zeros((), dtype=dtype, device=weight.device)
    positive_sum = torch.zeros((), dtype=dtype, device=weight.device)
    grads = None
    if need_grads:
        weighted = (embeddings * grad_scale).to(grad_mm)  # [N, D]: g^T @ weighted = dL/d(rows)
        grad_embeddings = torch.zeros(num_samples, dim, dtype=dtype, device=weight.device)
        grad_rows = None if update else torch.empty(num_columns, dim, dtype=weight.dtype, device=weight.device)
        grad_bias = torch.zeros((), dtype=dtype, device=weight.device)
    for start, stop in bounds:
        rows_w = chunked.iter_rows(weight, index, start, stop)  # [c, D]
        if stored != dtype:
            rows_w = rows_w.to(dtype)  # a float32 copy of bfloat16 rows
        rows_w.div_(rows_w.norm(dim=1, keepdim=True).clamp_min(1e-12))  # rows are kept unit-norm
        if index is not None and stored == dtype and not (update and need_grads):
            weight.index_copy_(0, index[start:stop], rows_w)
        rows_mm = rows_w.to(mm)
        x = torch.mm(scaled, rows_mm.t())  # [N, c] a*cos
        x = x.to(dtype)
        pos_cols, inside = positives.in_chunk(start, stop)  # [N]: every row, those whose class is in this chunk
        scaled_cos_y = chunked.take_positive(x, pos_cols)
        per_class, g = negative_terms(x, shift, t, kappa)  # g: sigmoid(z), in x's storage
        cw = None if class_weight is None else class_weight[start:stop].to(dtype)
        negative_sum += per_class.sum() if cw is None else per_class @ cw
        z_neg_y = (scaled_cos_y + shift).pow_(t).add_(kappa)
        z_pos_y = r * positive_target(scaled_cos_y / shift, terms.margin, terms.m, t) + bias_value
        correction = alpha * F.softplus(-z_pos_y) - (1.0 - alpha) * F.softplus(z_neg_y)
        positive_sum += torch.where(inside, correction, 0.0).sum()
        chunked.set_positive_(g, pos_cols, inside, torch.sigmoid(-z_pos_y).mul_(-alpha / (1.0 - alpha)))
        if not need_grads:
            continue
        if cw is not None:  # the batch's own classes (all positives) have weight 1
            g.mul_(cw)
        grad_bias += g.sum()
        g_mm = g.to(grad_mm)
        chunked.addmm_into(grad_embeddings, g_mm, rows_mm if grad_mm == mm else rows_w.to(grad_mm))
        if update is None:
            chunked.mm_into(grad_rows[start:stop], g_mm.t(), weighted)
        else:  # the step of these rows, now, from their gradient (the embedding gradient used the old rows)
            grad_chunk = torch.mm(g_mm.t(), weighted)
            positions = slice(start, stop) if index is None else index[start:stop]
            update(positions, rows_w, grad_chunk.to(dtype))
    loss = ((1.0 - alpha) * negative_sum + positive_sum) * (terms.loss_weight / (r * num_samples))
    if need_grads:
        grads = (grad_embeddings.mul_(grad_scale), grad_rows, grad_bias.mul_(grad_scale / r))
    return loss, grads


class _FusedShardLoss(torch.autograd.Function):
    """Fused: this rank's share of the loss, its gradients formed chunk by chunk in the forward.

    The forward keeps only dL/d(embeddings) [N, D], dL/d(rows) [S, D] and dL/db; the backward
    scales them by the incoming gradient and all-reduces dL/db (b is shared by every shard).
    With sampling, the row gradient is handed over as a sparse COO tensor of the used rows.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, bias, positives, index, class_weight, terms, chunk_size, group,
                negative_terms, update):
        mm_dtype = chunked.autocast_dtype(embeddings.device)
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, grads = _fused_shard_loss(embeddings, weight, bias, positives, index, class_weight, terms,
                                            chunk_size, need_grads, mm_dtype, negative_terms,
                                            update if need_grads else None)
        if grads is not None:
            ctx.grad_embeddings, ctx.grad_rows, ctx.grad_bias = grads
        ctx.group, ctx.index, ctx.weight_shape = group, index, weight.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_embeddings, grad_rows, grad_bias = chunked.take_grads(ctx, ("grad_embeddings", "grad_rows", "grad_bias"))
        grad_embeddings = chunked.scale_grad_(grad_embeddings, grad_loss)
        grad_rows = chunked.scale_grad_(grad_rows, grad_loss)
        grad_bias = comm.all_reduce(grad_bias * grad_loss, "sum", ctx.group)  # b is shared by all shards
        if ctx.index is not None and grad_rows is not None:
            grad_rows = torch.sparse_coo_tensor(ctx.index.unsqueeze(0), grad_rows, ctx.weight_shape,
                                                is_coalesced=True, check_invariants=False)
        return grad_embeddings, grad_rows, grad_bias, None, None, None, None, None, None, None, None


class SphereFace2Head(ShardedHead):
    """Identity-sharded SphereFace2 classifier.

    Holds `weight` [num_local_classes, D] (rows: global classes class_start..class_stop-1,
    renormalised to unit norm at every forward) and `bias`, the scalar shared by all classes,
    identical on every rank. `forward(embeddings [b, D], labels [b] int64)` returns this
    rank's share of the loss (see the module docstring); the loss math runs in float32 even
    when the cosine matmuls run in bf16/fp16 under autocast (the gradient matmuls then run in
    bf16, whose range holds the tiny gradients of negative classes: `chunked.grad_mm_dtype`).

    `sample_rate` < 1 samples the classes absent from the batch (module docstring);
    `implementation`, `chunk_size` and `compile_elementwise` are described in `ShardedHead`.

    Fused step (`fuse_step(optimizer)`, fused implementation only): each training forward
    steps the rows it used with a `FusedStepSGD`, chunk by chunk, as soon as a chunk's
    gradient is known, so the [C_local, D] weight gradient is never formed. The row update
    takes the head's own loss as it is (a loss scale or other factor applied to it in
    backward does not reach the rows) and happens whether or not backward follows; the
    weight gets no `.grad`, so global-norm clipping leaves the rows out. `storage_dtype`
    bfloat16 keeps the rows (and, with the fused step, their momentum) in bfloat16 while all
    the math runs in float32; it needs the fused step, whose stochastic rounding keeps the
    small row updates that bfloat16 could not otherwise store.
    """

    storage_dtypes = (torch.float32, torch.bfloat16)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        alpha: float = 0.7,
        r: float = 40.0,
        m: float = 0.4,
        t: float = 3.0,
        margin: str = "C",
        loss_weight: float = 10.0,
        sample_rate: float = 1.0,
        process_group: dist.ProcessGroup | None = None,
        backbone_grads_averaged: bool = True,
        check_inputs: bool = True,
        seed: int = 0,
        implementation: str = "fused",
        chunk_size: int | None = None,
        compile_elementwise: bool | None = None,
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS} (paper App. F), got {margin!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha (the positive/negative balance) must be in (0, 1), got {alpha}")
        if r <= 0 or t <= 0 or loss_weight <= 0:
            raise ValueError(f"r, t and loss_weight must be positive, got r={r}, t={t}, loss_weight={loss_weight}")
        if m < 0:
            raise ValueError(f"margin m must be non-negative, got {m}")
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
            storage_dtype=storage_dtype,
        )
        self.alpha, self.r, self.m, self.t, self.margin = float(alpha), float(r), float(m), float(t), margin
        self.loss_weight = float(loss_weight)
        self.terms = LossTerms(self.alpha, self.r, self.m, self.t, margin, self.loss_weight)
        self.bias = nn.Parameter(torch.tensor(initial_bias(num_classes, alpha, r, m, t, margin)))
        self.sample_rate = float(sample_rate)
        self.last_sampled_rows: torch.Tensor | None = None  # local rows used by the last forward (sampling only)
        self.step_optimizer = None  # a FusedStepSGD when the rows are stepped in the forward

    def fuse_step(self, optimizer) -> None:
        """Step the rows inside every training forward with `optimizer` (a FusedStepSGD; class docstring)."""
        if self.implementation != "fused":
            raise ValueError("fuse_step needs implementation='fused': the reference head forms the full weight gradient")
        if not hasattr(optimizer, "update_rows_"):
            raise TypeError(f"fuse_step needs an optimizer with update_rows_ (FusedStepSGD), got {type(optimizer).__name__}")
        optimizer._group_of(self.weight)  # ValueError when it does not hold this head's rows
        self.step_optimizer = optimizer

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}, r={self.r}, "
            f"m={self.m}, t={self.t}, loss_weight={self.loss_weight}, sample_rate={self.sample_rate}"
        )

    @property
    def sparse_row_grad(self) -> bool:
        return self.sample_rate < 1.0

    def rows_per_step(self, batch: int) -> int:
        """The rows a sampled step uses, fixed by the shard and the global batch size (module docstring)."""
        return min(self.num_local_classes, max(math.ceil(self.sample_rate * self.num_local_classes), batch + 1))

    def sample_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(used local rows [S] ascending, the weight of each one's terms [S]) for a step with the
        gathered `labels` [N].

        S = `rows_per_step(N)`: every row some label of the batch names (P of them) is used with
        weight 1, and S - P of the M other rows are drawn uniformly without replacement, each
        weighted M / (S - P). S is known without asking the device how many rows are present.
        """
        return self._sample_rows(chunked.local_positives(labels, self.class_start, self.num_local_classes))

    def _sample_rows(self, positives: chunked.Positives) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.weight.device
        present = chunked.present_rows(positives, self.num_local_classes)
        num_rows = self.rows_per_step(positives.columns.numel())
        num_absent = self.num_local_classes - present.sum()
        num_drawn = num_rows - (self.num_local_classes - num_absent)
        generator = self.step_generator(device)
        self.sample_step += 1
        scores = torch.rand(self.num_local_classes, generator=generator, device=device)
        scores.masked_fill_(present, 2.0)  # above any uniform draw: always kept
        index = scores.topk(num_rows, sorted=False).indices.sort().values
        # float32 at least: rounded to bfloat16 storage's precision, M / k would be off by up to 0.2 %
        weight_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        drawn_weight = (num_absent / num_drawn.clamp_min(1)).to(weight_dtype)
        class_weight = torch.where(present[index], torch.ones((), dtype=weight_dtype, device=device), drawn_weight)
        return index, class_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gathered, gathered_labels, _ = self.gather_batch(embeddings, labels)
        positives = chunked.local_positives(gathered_labels, self.class_start, self.num_local_classes)
        index = class_weight = update = None
        if self.sample_rate < 1.0:
            index, class_weight = self._sample_rows(positives)
            positives = chunked.among(positives, index)
        self.last_sampled_rows = index
        if self.step_optimizer is not None and self.training and torch.is_grad_enabled():
            generator = self.step_generator(self.weight.device, 1) if self.weight.dtype == torch.bfloat16 else None
            update = functools.partial(self.step_optimizer.update_rows_, self.weight, generator=generator)
        elif self.weight.dtype == torch.bfloat16 and self.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("rows stored in bfloat16 are trained by the fused step only (fuse_step with a "
                               "FusedStepSGD, head in train mode); a separate optimizer would do its math, and "
                               "round, in bfloat16")
        if update is not None and index is None:  # (sample_rows counted this forward already)
            self.sample_step += 1
        if self.implementation == "fused":
            negative_terms = chunked.elementwise(
                _negative_terms, chunked.should_compile(self.compile_elementwise, gathered.device))
            return _FusedShardLoss.apply(
                F.normalize(gathered, dim=1), self.weight, self.bias, positives, index, class_weight,
                self.terms, self.chunk_size, self.process_group, negative_terms, update,
            )
        with torch.no_grad():
            if index is None:
                self.weight.copy_(F.normalize(self.weight, dim=1))
            else:
                self.weight[index] = F.normalize(self.weight[index], dim=1)
        if index is None:
            weight = self.weight
        else:  # the used rows, with a sparse gradient, as the fused path gives
            weight = F.embedding(index, self.weight, sparse=True)
        cos = cosines(F.normalize(gathered, dim=1), weight)  # [N, S]
        return _ShardLoss.apply(cos, self.bias, positives, class_weight, self.terms, self.process_group)

    def loss_share(self, loss: torch.Tensor) -> torch.Tensor:
        """`forward` already returns this rank's share (see the module docstring)."""
        return loss.detach()

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's share: the loss of the global batch (one scalar all-reduce)."""
        return comm.all_reduce(loss.detach().clone(), "sum", self.process_group)
