"""SphereFace2 (Wen, Liu et al., ICLR 2022) on a classifier sharded by identity.

Each class is its own binary classifier, so rank r's loss over its classes [start_r, stop_r)
needs only the gathered embeddings and labels: the forward issues no collective beyond
those gathers. With z_i = r * g_m(cos theta_i) + b (margin and similarity adjustment applied
with gradient detachment: the value of r*g_m(cos), the gradient of r*cos),

    L = loss_weight * mean_n (1/r) [ alpha * softplus(-z_y) + (1 - alpha) * sum_{i != y} softplus(z_i) ]

and L is the sum over ranks of each rank's share. `forward` returns this rank's share;
`backward` on it gives exact local row gradients, a reduce-scatter of the embedding gradient
and one all-reduce of the shared bias's gradient. `global_loss` sums the shares for logging.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sf2dist import comm
from sf2dist.heads.base import ShardedHead, upcast

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


class _ShardLoss(torch.autograd.Function):
    """This rank's share of the loss from its cosines; the gradient is formed in the forward.

    Every term depends on one cosine only, so dL/dcos is known elementwise when the loss is:
    keeping it (one [N, C_local] tensor) is cheaper than keeping autograd's intermediates.
    """

    @staticmethod
    def forward(ctx, cos, bias, rows, cols, alpha, r, m, t, margin, loss_weight, group):
        # cos: [N, C_local] float32; rows/cols: positions of the true classes held here.
        num_samples = cos.shape[0]
        z = negative_target(cos, margin, m, t).mul_(r).add_(bias)  # [N, C_local]
        loss = (1.0 - alpha) * F.softplus(z).sum()
        z_neg_y = z[rows, cols]
        z_pos_y = r * positive_target(cos[rows, cols], margin, m, t) + bias
        loss = loss - (1.0 - alpha) * F.softplus(z_neg_y).sum() + alpha * F.softplus(-z_pos_y).sum()
        grad = z.sigmoid_().mul_(1.0 - alpha)  # dL/dz up to the constant, reusing z's storage
        grad[rows, cols] = -alpha * torch.sigmoid(-z_pos_y)
        scale = loss_weight / (r * num_samples)
        grad_cos = grad.mul_(scale * r)  # dL/dcos = r * dL/dz
        grad_bias = grad_cos.sum() / r  # dL/db = sum of dL/dz
        ctx.group = group
        ctx.save_for_backward(grad_cos, grad_bias)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_cos, grad_bias = ctx.saved_tensors
        grad_bias = comm.all_reduce(grad_bias * grad_loss, "sum", ctx.group)  # b is shared by all shards
        return grad_cos * grad_loss, grad_bias, None, None, None, None, None, None, None, None, None


class SphereFace2Head(ShardedHead):
    """Identity-sharded SphereFace2 classifier.

    Holds `weight` [num_local_classes, D] (rows: global classes class_start..class_stop-1,
    renormalised to unit norm at every forward) and `bias`, the scalar shared by all classes,
    identical on every rank. `forward(embeddings [b, D], labels [b] int64)` returns this
    rank's share of the loss (see the module docstring); the loss math runs in float32 even
    when the cosine matmul runs in bf16/fp16 under autocast.
    """

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
        process_group: dist.ProcessGroup | None = None,
        backbone_grads_averaged: bool = True,
        check_inputs: bool = True,
        seed: int = 0,
    ) -> None:
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS} (paper App. F), got {margin!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha (the positive/negative balance) must be in (0, 1), got {alpha}")
        if r <= 0 or t <= 0 or loss_weight <= 0:
            raise ValueError(f"r, t and loss_weight must be positive, got r={r}, t={t}, loss_weight={loss_weight}")
        if m < 0:
            raise ValueError(f"margin m must be non-negative, got {m}")
        super().__init__(
            num_classes,
            embedding_dim,
            process_group=process_group,
            backbone_grads_averaged=backbone_grads_averaged,
            check_inputs=check_inputs,
            seed=seed,
        )
        self.alpha, self.r, self.m, self.t, self.margin = float(alpha), float(r), float(m), float(t), margin
        self.loss_weight = float(loss_weight)
        self.bias = nn.Parameter(torch.tensor(initial_bias(num_classes, alpha, r, m, t, margin)))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}, r={self.r}, "
            f"m={self.m}, t={self.t}, loss_weight={self.loss_weight}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))
        gathered, gathered_labels, _ = self.gather_batch(embeddings, labels)
        cos = upcast(F.linear(F.normalize(gathered, dim=1), self.weight))  # [N, C_local]
        here = (gathered_labels >= self.class_start) & (gathered_labels < self.class_stop)
        rows = here.nonzero().squeeze(1)
        cols = gathered_labels[rows] - self.class_start
        return _ShardLoss.apply(
            cos, self.bias, rows, cols, self.alpha, self.r, self.m, self.t, self.margin,
            self.loss_weight, self.process_group,
        )

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's share: the loss of the global batch (one scalar all-reduce)."""
        return comm.all_reduce(loss.detach().clone(), "sum", self.process_group)
