"""SGD with momentum for class rows: row-sparse for sampled heads, or fused into a head's forward.

With class sampling (`SphereFace2Head(sample_rate=p < 1)`), a step reads and differentiates
only the rows it kept, and `weight.grad` is a sparse COO tensor of exactly those rows (summed
over micro-batches by autograd). `SampledRowsSGD` updates those rows, and nothing else:

    for the rows r in the gradient:  d = grad[r] + weight_decay * w[r]
                                     buf[r] = momentum * buf[r] + d
                                     w[r] -= lr * buf[r]

which is torch.optim.SGD (dampening 0, no Nesterov) restricted to the rows. Rows that were
not sampled keep their weight, and their momentum, untouched: a row's momentum is that of its
own updates, carried to the next step that samples it (as a Partial FC memory bank keeps it),
rather than decayed and applied on steps that never looked at the row. So the cost of a step
falls with the sample rate. Weight decay likewise reaches a row only when it is sampled.

Dense gradients (the shared bias, or a weight when sampling is off) get the ordinary update,
identical to torch.optim.SGD. The state key is `momentum_buffer`, a tensor shaped like the
parameter, as torch.optim.SGD's, so checkpoints store and shard it the same way.

torch.optim.SGD itself cannot step a sparse gradient when weight decay is set.

`FusedStepSGD` is the same update applied by a head inside its forward, chunk by chunk, so
that the weight gradient never exists (and, for rows stored in bfloat16, written back with
the stochastic rounding of `round_to_bfloat16_`).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def sgd_rows_(
    weight: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> None:
    """One SGD step of `weight[rows]` (in place) from their gradient `grad_rows` [len(rows), D].

    `rows` must hold no duplicates. `momentum_buffer` is shaped like `weight` and is updated
    at `rows` only (pass None when momentum is 0).
    """
    if momentum and momentum_buffer is None:
        raise ValueError("sgd_rows_: momentum is set but no momentum_buffer was given")
    if grad_rows.shape != (rows.numel(), *weight.shape[1:]):
        raise ValueError(
            f"sgd_rows_: grad_rows has shape {tuple(grad_rows.shape)}, expected "
            f"{(rows.numel(), *weight.shape[1:])} (one gradient row per entry of rows)"
        )
    values = weight[rows]  # [k, D] copy
    step = grad_rows.add(values, alpha=weight_decay) if weight_decay else grad_rows
    if momentum:
        step = momentum_buffer[rows].mul_(momentum).add_(step)
        momentum_buffer.index_copy_(0, rows, step)
    weight.index_copy_(0, rows, values.sub_(step, alpha=lr))


class SampledRowsSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay; sparse (row) gradients update only their rows.

    Use it for a head trained with class sampling, in place of torch.optim.SGD:

        optimizer = SampledRowsSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loss = head(embeddings, labels); loss.backward(); optimizer.step()

    Parameter groups work as in torch.optim (e.g. no weight decay for the bias).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"learning rate must be non-negative, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                buffer = None
                if momentum:
                    state = self.state[param]
                    if "momentum_buffer" not in state:  # zeros: the first step is buf = d, as in SGD
                        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    buffer = state["momentum_buffer"]
                grad = param.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # micro-batches may have sampled a row twice
                    sgd_rows_(param, grad.indices()[0], grad.values(), buffer,
                              lr=lr, momentum=momentum, weight_decay=weight_decay)
                    continue
                step = grad.add(param, alpha=weight_decay) if weight_decay else grad
                if momentum:
                    step = buffer.mul_(momentum).add_(step)
                param.add_(step, alpha=-lr)
        return loss


def round_to_bfloat16_(out: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None) -> None:
    """Store float32 `values` into the bfloat16 tensor `out`, rounding stochastically.

    Each value goes to one of the two nearest bfloat16 numbers with probabilities that make the
    stored value unbiased. Round-to-nearest would drop every update smaller than half a bfloat16
    step of the weight (about 0.2 % of it): a class row's per-step update is far smaller than
    that, so with plain rounding the rows would stop learning. Adding uniform noise to the 16
    bits that bfloat16 drops, then truncating, does the stochastic rounding exactly.
    """
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    out.copy_(noise.add_(bits).bitwise_and_(-(1 << 16)).view(torch.float32))  # exact in bfloat16


class FusedStepSGD(SampledRowsSGD):
    """SGD with momentum whose update of a head's class rows runs inside the head's forward.

    A head in fused-step mode (`SphereFace2Head.fuse_step(optimizer)`) forms each chunk's row
    gradient in its forward and hands it at once to `update_rows_`, which applies the SGD step
    above to those rows: the [C_local, D] weight gradient never exists, so a rank's head needs
    its weights and momentum and little else. The weight then has no `.grad`; `step()` updates
    the other parameters (the shared bias) as SampledRowsSGD does. Set the learning rate before
    the forward. Rows stored in bfloat16 (`storage_dtype=torch.bfloat16`) are updated in float32
    and written back with stochastic rounding (`round_to_bfloat16_`); their momentum is stored
    in bfloat16 with ordinary rounding (it is a sum of gradients of its own scale).
    """

    @torch.no_grad()
    def update_rows_(self, param: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor,
                     grad: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """One step of `param[rows]` from float32 `values` (its current rows) and `grad`; both are consumed."""
        group = self._group_of(param)
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        step = grad.add_(values, alpha=weight_decay) if weight_decay else grad
        if momentum:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            step = buffer[rows].to(values.dtype).mul_(momentum).add_(step)
            _store_rows(buffer, rows, step)
        values.sub_(step, alpha=lr)
        if param.dtype == torch.bfloat16:
            rounded = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
            round_to_bfloat16_(rounded, values, generator)
            values = rounded
        _store_rows(param, rows, values)

    def _group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("FusedStepSGD.update_rows_: the parameter is not one this optimizer updates")


def make_head_sgd(head, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                  fused_step: bool = False) -> torch.optim.Optimizer:
    """SGD for a head's parameters in the form its rows need.

    `fused_step`: a FusedStepSGD that the head steps inside its forward (`fuse_step`); a head
    whose row gradient is sparse (sampled SphereFace2): SampledRowsSGD; otherwise torch.optim.SGD.
    `params` may be parameter groups (e.g. the bias without weight decay).
    """
    if fused_step:
        optimizer = FusedStepSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        head.fuse_step(optimizer)
        return optimizer
    if head.sparse_row_grad:
        return SampledRowsSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _store_rows(target: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        if target[rows].data_ptr() != values.data_ptr():  # else updated in place already
            target[rows] = values
    else:
        target.index_copy_(0, rows, values.to(target.dtype))
