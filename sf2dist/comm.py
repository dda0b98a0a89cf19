"""Every collective sf2dist issues passes through this module, which counts them.

The heads need four things: the per-rank batch sizes, an all-gather of embeddings whose
backward is a reduce-scatter, an all-gather of labels, and a few all-reduces. Each call is
recorded in `stats` (calls, bytes, seconds per collective kind, counted without limit, and
the kind and bytes of the last `LOG_SIZE` calls in order) so that tests and benchmarks can read
what a step communicated. `bytes` is the size of the full buffer the collective
produces or consumes on this rank: the gathered tensor for an all-gather, the unscattered
input for a reduce-scatter, the tensor itself for an all-reduce.

Without an initialised process group (or with a group of one) every function acts locally
and records nothing, so single-process code runs the same path as distributed code.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# torch >= 2.13 names the tensor-in/tensor-out collectives *_single; older releases *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
# Calls `CommStats.log` keeps: a head's step issues five or six, and readers reset the stats
# before the step they read; the log stays this size however long the run is.
LOG_SIZE = 4096


class CommStats:
    """Calls, bytes and seconds per collective kind since the last `reset()`.

    `log` holds (kind, bytes) of the last `LOG_SIZE` of those calls, oldest first; the
    counters of `snapshot()` count every call.
    """

    def __init__(self) -> None:
        self.sync_cuda_for_timing = False  # synchronise around CUDA collectives to time them
        self.reset()

    def reset(self) -> None:
        self._calls: dict[str, int] = defaultdict(int)
        self._bytes: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = defaultdict(float)
        self.log: deque[tuple[str, int]] = deque(maxlen=LOG_SIZE)  # (kind, bytes) of the last calls, in order

    def record(self, kind: str, nbytes: int, seconds: float) -> None:
        self._calls[kind] += 1
        self._bytes[kind] += nbytes
        self._seconds[kind] += seconds
        self.log.append((kind, nbytes))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{kind: {"calls": int, "bytes": int, "seconds": float}} for every kind seen."""
        return {
            kind: {"calls": self._calls[kind], "bytes": self._bytes[kind], "seconds": self._seconds[kind]}
            for kind in sorted(self._calls)
        }


stats = CommStats()


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) within `group`; (0, 1) when no process group is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@contextmanager
def _recorded(kind: str, tensor: torch.Tensor, nbytes: int):
    sync = stats.sync_cuda_for_timing and tensor.is_cuda
    if sync:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    yield
    if sync:
        torch.cuda.synchronize(tensor.device)
    stats.record(kind, nbytes, time.perf_counter() - start)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce `tensor` in place across ranks with `op` ("sum", "max" or "min"); returns it."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(_REDUCE_OPS)}")
    if rank_and_world(group)[1] == 1:
        return tensor
    with _recorded("all_reduce", tensor, tensor.numel() * tensor.element_size()):
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s (in place); returns it."""
    if rank_and_world(group)[1] == 1:
        return tensor
    with _recorded("broadcast", tensor, tensor.numel() * tensor.element_size()):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def batch_sizes(local_size: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's local batch size, in rank order (one int64 per rank on the wire)."""
    _, world = rank_and_world(group)
    if world == 1:
        return [local_size]
    local = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    with _recorded("all_gather", local, sizes.numel() * sizes.element_size()):
        _all_gather_single(sizes, local, group=group)
    return sizes.tolist()


def _gather(tensor: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `tensor` (rows `sizes[r]` on rank r) along dim 0."""
    rows = max(sizes)
    tensor = tensor.contiguous()
    if tensor.shape[0] < rows:  # uneven batches travel padded to the largest one
        pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    out = tensor.new_empty((rows * len(sizes), *tensor.shape[1:]))
    with _recorded("all_gather", tensor, out.numel() * out.element_size()):
        _all_gather_single(out, tensor, group=group)
    if all(size == rows for size in sizes):
        return out
    return torch.cat([out[r * rows : r * rows + size] for r, size in enumerate(sizes)])


def _reduce_scatter(grad: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `grad` [sum(sizes), ...] over ranks and return this rank's rows."""
    rows = max(sizes)
    grad = grad.contiguous()
    if any(size != rows for size in sizes):
        padded = grad.new_zeros((rows * len(sizes), *grad.shape[1:]))
        offset = 0
        for r, size in enumerate(sizes):
            padded[r * rows : r * rows + size] = grad[offset : offset + size]
            offset += size
        grad = padded
    out = grad.new_empty((rows, *grad.shape[1:]))
    with _recorded("reduce_scatter", grad, grad.numel() * grad.element_size()):
        _reduce_scatter_single(out, grad, group=group)
    return out[: sizes[rank]]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, sizes, group, grad_scale):
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        return _gather(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        rank, _ = rank_and_world(ctx.group)
        local = _reduce_scatter(grad, ctx.sizes, rank, ctx.group)
        if ctx.grad_scale != 1.0:
            local = local * ctx.grad_scale
        return local, None, None, None


def all_gather_with_grad(
    tensor: torch.Tensor,
    sizes: list[int],
    group: dist.ProcessGroup | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """All-gather rows [b_r, ...] -> [sum b_r, ...]; backward reduce-scatters (sums) the gradient.

    Each rank gets back the gradient of its own rows summed over every rank's use of them,
    multiplied by `grad_scale` (see `sf2dist.heads` for why the heads pass the world size).
    """
    if len(sizes) == 1:
        return tensor if grad_scale == 1.0 else _ScaleGrad.apply(tensor, grad_scale)
    return _AllGatherWithGrad.apply(tensor, sizes, group, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def all_gather(tensor: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather rows without autograd (labels, evaluation embeddings)."""
    if len(sizes) == 1:
        return tensor
    return _gather(tensor, sizes, group)


def all_gather_variable(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate along dim 0 tensors whose first dimension may differ per rank (no autograd)."""
    sizes = batch_sizes(tensor.shape[0], tensor.device, group)
    return all_gather(tensor, sizes, group)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (benchmarks align their timed steps with it); not recorded."""
    if rank_and_world(group)[1] > 1:
        dist.barrier(group=group)
