"""Single-process dense references for the sharded heads, written from docs/design.md's formulas.

Straightforward autograd over the full [N, C] cosine matrix, independent of the heads'
code paths; the heads are tested against these on 1, 2 and 3 ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _g(x: torch.Tensor, t: float) -> torch.Tensor:
    return 2.0 * ((x + 1.0) / 2.0) ** t - 1.0


def sphereface2_loss(embeddings, labels, weight, bias, *, alpha, r, m, t, margin, loss_weight, class_weight=None):
    """L = lw * mean_n (1/r)[alpha softplus(-z_y) + (1 - alpha) sum_{i != y} softplus(z_i)].

    `class_weight` [C] multiplies every term of class i (None: all 1).
    """
    cos = F.normalize(embeddings, dim=1) @ weight.t()  # [N, C]; weight rows are unit-norm
    one_hot = F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    with torch.no_grad():
        if margin == "C":
            target = _g(cos, t) - m * (2.0 * one_hot - 1.0)
        else:
            theta = torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
            theta_m = theta + m * one_hot if margin == "A" else theta * (1.0 + (m - 1.0) * one_hot)
            target = torch.where(one_hot.bool(), _g(torch.cos(theta_m.clamp(0.0, math.pi)), t), _g(cos, t))
        detached = r * target - r * cos
    z = r * cos + detached + bias
    per_class = one_hot * alpha * F.softplus(-z) + (1.0 - one_hot) * (1.0 - alpha) * F.softplus(z)
    if class_weight is not None:
        per_class = per_class * class_weight
    return loss_weight * (per_class.sum(dim=1) / r).mean()


def margin_softmax_loss(embeddings, labels, weight, *, margin, s, m):
    """Cross entropy of s * (cos + margin term), margin applied to the target with detachment."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()  # [N, C]
    one_hot = F.one_hot(labels, weight.shape[0]).bool()
    with torch.no_grad():
        if margin == "cosface":
            target = cos - m
        else:
            target = torch.cos((torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6)) + m).clamp(max=math.pi))
        shift = torch.where(one_hot, target - cos, torch.zeros_like(cos))
    return F.cross_entropy(s * (cos + shift), labels)


def sphereface_psi(theta: torch.Tensor, m: float) -> torch.Tensor:
    """psi piece by piece: (-1)^k cos(m theta) - 2k on [k pi / m, (k + 1) pi / m)."""
    psi = torch.full_like(theta, math.nan)
    for k in range(math.ceil(m) + 1):
        piece = (theta >= k * math.pi / m) & (theta < (k + 1) * math.pi / m)
        psi = torch.where(piece, (-1) ** k * torch.cos(m * theta) - 2 * k, psi)
    return psi


def a_softmax_loss(embeddings, labels, weight, *, m, s=None, lam=None):
    """SphereFace (A-Softmax) cross entropy; the target's offset from the plain logit is detached.

    `s` set: unit features, logits s cos theta_j, target s psi(theta_y). `s` None (2017): logits
    |x| cos theta_j, target |x| (lam cos theta_y + psi(theta_y)) / (1 + lam). theta_y comes from the
    cosine clamped to [-1 + 1e-5, 1 - 1e-5].
    """
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()  # [N, C]
    norms = embeddings.norm(dim=1, keepdim=True)  # [N, 1]
    logits = s * cos if s is not None else norms * cos
    one_hot = F.one_hot(labels, weight.shape[0]).bool()
    with torch.no_grad():
        psi = sphereface_psi(torch.acos(cos.clamp(-1.0 + 1e-5, 1.0 - 1e-5)), m)
        target = s * psi if s is not None else norms * (lam * cos + psi) / (1.0 + lam)
        offset = torch.where(one_hot, target - logits, torch.zeros_like(logits))
    return F.cross_entropy(logits + offset, labels)
