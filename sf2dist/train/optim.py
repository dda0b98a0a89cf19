"""Optimisers, the learning-rate schedule, the global gradient norm and the loss scale.

The backbone and the head get separate optimisers because they live in different places:
the backbone's may belong to DeepSpeed, the head's always stays with the trainer (its rows
are sharded and never averaged). Both follow one schedule, set by hand every iteration, so
that the schedule's state is the step number and nothing else.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sf2dist import comm
from sf2dist.config import OptimConfig


def make_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, with the config's weight decay."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name: unknown optimiser {cfg.name!r} (sgd or adamw)")


def head_param_groups(head: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Class rows decay like any weight; the shared SphereFace2 bias does not."""
    decay = [p for name, p in head.named_parameters() if name != "bias"]
    no_decay = [p for name, p in head.named_parameters() if name == "bias"]
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps`, then `poly` ((1 - progress)^power over the remaining
    steps), `cosine` ((1 + cos(pi progress)) / 2), `step` (times gamma at each milestone) or
    `constant`; progress runs from 0 at the end of the warm-up to 1 at `total_steps`.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule in ("poly", "cosine"):
        remaining = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / remaining)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** cfg.power
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= milestone for milestone in cfg.milestones)
    return 1.0


def warmup_warnings(cfg: OptimConfig, total_steps: int) -> list[str]:
    """A warm-up as long as the run or longer: the rate never reaches optim.lr's peak, or never decays."""
    if cfg.warmup_steps < total_steps or total_steps < 1:
        return []
    last = lr_factor(total_steps - 1, total_steps, cfg)
    decay = "" if cfg.schedule == "constant" else f" and the optim.schedule={cfg.schedule} decay never starts"
    return [f"optim.warmup_steps={cfg.warmup_steps} is not less than the run's {total_steps} steps: the learning rate "
            f"rises for the whole run, to {last:.0%} of optim.lr={cfg.lr:g} at the last step{decay}; set "
            f"optim.warmup_steps below {total_steps} (e.g. {max(1, total_steps // 10)}, a tenth of the run), or train "
            f"longer (run.max_steps, run.epochs)"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sq_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of `tensors` as a float64 scalar (0 when there are none).

    One fused norm kernel per device and dtype (torch's foreach norm), not one chain of
    kernels per tensor, and no float64 copy of any tensor: a per-tensor norm in the tensor's
    own precision, squared and summed in float64. Sparse (row-sparse head) gradients count
    their coalesced values.
    """
    dense = [t.detach().coalesce().values() if t.is_sparse else t.detach() for t in tensors]
    dense = [t for t in dense if t.numel()]
    if not dense:
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm(dense, norm_type=2.0, foreach=True).double().pow(2)


def grad_sq_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Sum of squared gradient entries of `params`, in float64 (0 when none has a gradient)."""
    return sq_norm(p.grad for p in params if p.grad is not None)


def scale_grads_(params: Iterable[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


@dataclass(frozen=True)
class StepNumbers:
    """What every rank learns after a step's backward, from one all-reduce and one read."""

    grad_norm: float  # the whole model's gradient norm (nan where it is not finite)
    loss: float  # the global loss
    stop: bool  # some rank received a stop signal
    interrupted: bool  # ... and it was a Ctrl-C on some rank
    extra: tuple[float, ...] = ()  # the `extra` values passed in, as read


def global_grad_norm_and_loss(
    backbone_sq: torch.Tensor, head: nn.Module, loss_share: torch.Tensor, flag: bool = False, group=None,
    interrupt: bool = False, extra: torch.Tensor | None = None,
) -> StepNumbers:
    """The L2 norm of the whole model's gradient, the global loss, "any rank flagged" and "any rank
    flagged an interrupt", in one all-reduce, read by the host at once (the step's one read).

    The backbone's gradient is replicated (already averaged by its engine), so its squared
    norm counts once; the head's rows are sharded, so their squares are summed over ranks.
    The SphereFace2 bias is replicated as well and counts once. The loss shares of the ranks
    travel in the same all-reduce, and so does each rank's stop flag (a signal it received), so
    that every rank learns at the same step that one of them must stop, and whether it was a Ctrl-C.
    `extra` (a small tensor on the same device, the same on every rank: not reduced) is read with
    them, so a caller's own device-side numbers cost no read of their own.
    """
    sharded = [p for name, p in head.named_parameters() if name != "bias"]
    replicated = [p for name, p in head.named_parameters() if name == "bias"]
    device = loss_share.device
    packed = torch.stack([
        grad_sq_norm(sharded).to(device), loss_share.detach().double().to(device),
        torch.tensor(float(flag), dtype=torch.float64, device=device),
        torch.tensor(float(interrupt), dtype=torch.float64, device=device),
    ])
    packed = comm.all_reduce(packed, "sum", group)
    total_sq = packed[0] + backbone_sq.to(device) + grad_sq_norm(replicated).to(device)
    read = [total_sq.reshape(1), packed[1:4]]
    if extra is not None:
        read.append(extra.detach().to(device=device, dtype=torch.float64).reshape(-1))
    values = torch.cat(read).tolist()  # the one read
    total, loss, stop_flags, interrupt_flags = values[:4]
    norm = math.sqrt(total) if math.isfinite(total) else float("nan")
    return StepNumbers(norm, loss, stop_flags > 0, interrupt_flags > 0, tuple(values[4:]))


class LossScale:
    """Dynamic loss scaling for fp16, decided from the global gradient norm.

    torch's GradScaler checks for infinities per process; with a sharded head one rank can
    overflow while another does not, and a step skipped on some ranks only would split the
    replicated backbone and bias. Here the decision uses the all-reduced norm, so every rank
    skips or steps together. Disabled (scale 1, never changes) outside fp16.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
