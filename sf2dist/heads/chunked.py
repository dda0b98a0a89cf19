"""What the fused heads share: cutting the local classes into chunks, finding the true classes
in each chunk, the matmul precisions under autocast, and compiling a chunk's elementwise math.

A fused head walks over its (used) class rows in chunks of `chunk_size`: per chunk it forms the
[N, chunk] cosines, turns them into loss and dL/dcos in place, and folds them into the embedding
and weight gradients with two more matmuls. Nothing of size [N, C_local] ever exists, and a
chunk small enough to stay in cache makes the elementwise passes cheap next to the matmuls.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch

IMPLEMENTATIONS = ("fused", "reference")

# Elements of one [N, chunk] tile when chunk_size is left to the head. On a CPU a tile of about
# 1 MiB of float32 stays in L2 while its elementwise passes run; on a GPU it should be large
# enough to fill the device (64 MiB) and still small next to the weights.
_TILE_ELEMENTS = {"cuda": 1 << 24}
_CPU_TILE_ELEMENTS = 1 << 18
_MIN_AUTO_CHUNK = 256


def check_implementation(implementation: str, chunk_size: int | None) -> None:
    """ValueError for an unknown implementation or a chunk size that is not a positive integer."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None (chosen from the batch), got {chunk_size!r}")


def resolve_chunk_size(chunk_size: int | None, num_rows: int, num_columns: int, device: torch.device) -> int:
    """Classes per chunk: `chunk_size`, or about a cache-sized (CPU) / device-filling (GPU) tile."""
    if chunk_size is None:
        tile = _TILE_ELEMENTS.get(device.type, _CPU_TILE_ELEMENTS)
        chunk_size = max(_MIN_AUTO_CHUNK, tile // max(1, num_rows))
    return max(1, min(chunk_size, num_columns))


def chunk_bounds(num_columns: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_columns)) for start in range(0, num_columns, chunk_size)]


class Positives:
    """Where each row of the gathered batch has its true class among the columns a step uses.

    By index arithmetic over fixed shapes, so that no step waits for the host to learn how many
    true classes a shard holds: `columns` [N] is each row's column (clamped into range where
    another rank holds the row's class) and `here` [N] says whether this rank holds it.
    """

    def __init__(self, columns: torch.Tensor, here: torch.Tensor) -> None:
        self.columns, self.here = columns, here

    def in_chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] each row's column relative to `start`, clamped into the chunk; [N] whether it lies in [start, stop))."""
        inside = self.here & (self.columns >= start) & (self.columns < stop)
        return (self.columns - start).clamp_(0, stop - start - 1), inside


def local_positives(labels: torch.Tensor, class_start: int, num_local: int) -> Positives:
    """Each gathered label's local row on a shard holding classes [class_start, class_start + num_local)."""
    local = labels - class_start
    here = (local >= 0) & (local < num_local)
    return Positives(local.clamp_(0, num_local - 1), here)


def present_rows(positives: Positives, num_local: int) -> torch.Tensor:
    """[num_local] bool: the local rows that are some row's true class (duplicates counted once)."""
    counts = torch.zeros(num_local, dtype=torch.int32, device=positives.columns.device)
    counts.index_add_(0, positives.columns, positives.here.to(torch.int32))
    return counts > 0


def among(positives: Positives, index: torch.Tensor) -> Positives:
    """The same true classes as positions among the used rows `index` (ascending, holding every present row)."""
    columns = torch.searchsorted(index, positives.columns).clamp_(max=index.numel() - 1)
    return Positives(columns, positives.here)


def set_positive_(x: torch.Tensor, columns: torch.Tensor, inside: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x[n, columns[n]] = values[n] where `inside[n]`, in place over x [N, c]."""
    at = columns.unsqueeze(1)
    kept = x.gather(1, at).squeeze(1)
    return x.scatter_(1, at, torch.where(inside, values.to(x.dtype), kept).unsqueeze(1))


def take_positive(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """x[n, columns[n]] for every row n of x [N, c]."""
    return x.gather(1, columns.unsqueeze(1)).squeeze(1)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmuls on `device` right now, or None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    if device.type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device.type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def grad_mm_dtype(mm_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of the matmuls that form gradients when the cosine matmul runs in `mm_dtype`.

    Under fp16 autocast a head has no loss scale, and the entries of dL/dcos of a negative
    class (SphereFace2 at a large class count's bias, or a softmax probability far from the
    target) and the row gradients they sum to lie around 1e-9 .. 1e-7: below fp16's smallest
    subnormal (6e-8) they flush to zero, and rows are starved of gradient. bfloat16 has the
    exponent range of float32 at the speed of fp16 on tensor cores, so the gradient matmuls run
    in bfloat16 under either half-precision autocast (their results are read into float32);
    the cosine matmul keeps fp16's finer mantissa. None (autocast off): the loss math's dtype.
    """
    return torch.bfloat16 if mm_dtype in (torch.float16, torch.bfloat16) else mm_dtype


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, with `out` in float32/float64 and a, b possibly in a half type (autocast)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, as `mm_into`."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b))


def iter_rows(weight: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the used rows: a view of `weight`, or a gathered copy when sampling."""
    return weight[start:stop] if index is None else weight[index[start:stop]]


_COMPILED: dict[Callable, Callable] = {}


def should_compile(compile_elementwise: bool | None, device: torch.device) -> bool:
    """Auto (None): compile a chunk's elementwise math on CUDA when Triton is installed.

    On a CPU the eager kernels on a cache-sized chunk are already close to the matmul floor,
    and a compile takes longer than many steps; there, compile only when asked (True).
    """
    if compile_elementwise is not None:
        return bool(compile_elementwise)
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return has_triton()


def elementwise(fn: Callable, compiled: bool) -> Callable:
    """`fn`, or its torch.compile'd version (built once per function, shapes dynamic), which
    falls back to `fn` for good if compiling fails (see `_CompiledOrEager`)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = _CompiledOrEager(fn)
    return _COMPILED[fn]


_compile_warned = False


class _CompiledOrEager:
    """torch.compile compiles at the first call, and on a host without a C compiler or Python's
    headers (Triton builds a small C launcher) that call fails deep inside Inductor. Then the
    function runs eagerly from that call on (same results, slower), with one warning per process."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.failed = fn, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure; the eager call below re-raises real errors
                self.failed = True
                global _compile_warned
                if not _compile_warned:
                    _compile_warned = True
                    reason = (str(err).strip().splitlines() or [""])[0][:300]
                    warnings.warn(
                        f"torch.compile of the head's elementwise math failed ({type(err).__name__}: {reason}); "
                        "running it eagerly instead (slower on a GPU). Triton needs a C compiler (gcc) and "
                        "Python's headers; or set the heads' compile_elementwise=False to skip compiling.",
                        RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)


def take_grads(ctx, names: tuple[str, ...]) -> Iterator[torch.Tensor | None]:
    """Pop the gradients a fused forward stored on `ctx` (a second backward is an error)."""
    if not hasattr(ctx, names[0]):
        raise RuntimeError(
            "a fused head's backward ran twice (retain_graph=True): its gradients are formed in the "
            "forward and handed over once; use implementation='reference' to backward more than once"
        )
    for name in names:
        yield getattr(ctx, name)
        delattr(ctx, name)


def scale_grad_(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """grad * grad_loss, in place (the fused head's gradients are its own)."""
    if grad is None:
        return None
    return grad.mul_(grad_loss.to(grad.dtype))
