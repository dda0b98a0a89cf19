"""What every identity-sharded classifier shares: its class shard, its rows, and the gathered batch.

Gradient convention (one for the whole package, pinned by tests/test_gradient_contract.py):
a head's loss is the mean over the *global* batch (all ranks' samples). The backbone runs
under a data-parallel wrapper (DDP or DeepSpeed) that *averages* its gradients over the W
ranks, so the gradient handed back to each rank's embeddings is W times dL/de. After the
wrapper's average, every rank holds exactly dL/dtheta of the global batch, the same as one
process computing the whole batch. Head parameters are never averaged: each rank's rows get
their exact gradient locally. Pass `backbone_grads_averaged=False` to a head when whatever
consumes the embeddings sums gradients over ranks instead.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sf2dist import comm
from sf2dist.heads import chunked
from sf2dist.parallel import class_range

# Rows are initialised in fixed blocks of global classes, each from its own seeded generator,
# so the initial weights of class i do not depend on how many ranks share the classes.
_INIT_BLOCK = 4096


def init_class_rows(start: int, stop: int, embedding_dim: int, seed: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-norm Gaussian rows for global classes [start, stop), identical for any sharding.

    Written block by block into one tensor of `dtype`, so that building a shard of a million
    classes never holds more than the shard plus one block (no concatenated or normalised copy).
    """
    rows = torch.empty(stop - start, embedding_dim, dtype=dtype)
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(_INIT_BLOCK, embedding_dim, generator=generator)
        lo = max(start, block * _INIT_BLOCK)
        hi = min(stop, (block + 1) * _INIT_BLOCK)
        local = values[lo - block * _INIT_BLOCK:hi - block * _INIT_BLOCK]
        rows[lo - start:hi - start] = F.normalize(local, dim=1)
    return rows


class _Cosines(torch.autograd.Function):
    """embeddings [N, D] @ weight[S, D]^T in the loss math's precision (float32 under autocast).

    Under autocast the product runs in the autocast dtype and is read into float32, and the
    backward's two matmuls run in `chunked.grad_mm_dtype` (bfloat16 under fp16 too): autograd
    through an fp16 linear would form the weight and embedding gradients in fp16, which
    flushes the small gradients of negative classes to zero (see there).
    """

    @staticmethod
    def forward(ctx, embeddings, weight):
        mm_dtype = chunked.autocast_dtype(embeddings.device)
        grad_dtype = chunked.grad_mm_dtype(mm_dtype) or embeddings.dtype
        ctx.dtypes = embeddings.dtype, weight.dtype
        ctx.save_for_backward(embeddings.to(grad_dtype), weight.to(grad_dtype))
        with torch.autocast(embeddings.device.type, enabled=False):
            if mm_dtype is None:
                return torch.mm(embeddings, weight.t())
            return torch.mm(embeddings.to(mm_dtype), weight.to(mm_dtype).t()).to(embeddings.dtype)

    @staticmethod
    def backward(ctx, grad_cos):
        embeddings, weight = ctx.saved_tensors
        embeddings_dtype, weight_dtype = ctx.dtypes
        grad_cos = grad_cos.to(embeddings.dtype)
        grad_embeddings = grad_weight = None
        with torch.autocast(grad_cos.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_embeddings = torch.mm(grad_cos, weight).to(embeddings_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch.mm(grad_cos.t(), embeddings).to(weight_dtype)
        return grad_embeddings, grad_weight


def cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, S] products of unit-norm embeddings and rows for the reference heads: float32 under
    autocast too, so the loss math never runs in half precision; gradients keep float32's range."""
    return _Cosines.apply(embeddings, weight)


class ShardedHead(nn.Module):
    """Base of the heads: rows for global classes [class_start, class_stop) of this rank.

    `implementation="fused"` (the default) computes loss and gradients chunk by chunk over
    the classes, `chunk_size` of them at a time (None: chosen from the batch and the device),
    and never holds the [N, C_local] logits; `"reference"` is the straightforward version that
    materialises them and lets autograd do the rest. Both give the same loss and gradients.
    `compile_elementwise` compiles a chunk's elementwise math with torch.compile (None: on
    CUDA when Triton is there; on a CPU the eager kernels are used). `storage_dtype` is the
    dtype the rows are kept in (float32, or bfloat16 where a head supports it).
    """

    storage_dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        process_group: dist.ProcessGroup | None = None,
        backbone_grads_averaged: bool = True,
        check_inputs: bool = True,
        seed: int = 0,
        implementation: str = "fused",
        chunk_size: int | None = None,
        compile_elementwise: bool | None = None,
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        chunked.check_implementation(implementation, chunk_size)
        if storage_dtype not in self.storage_dtypes or (storage_dtype != torch.float32 and implementation != "fused"):
            raise ValueError(f"{type(self).__name__} keeps its rows in {', '.join(map(str, self.storage_dtypes))} "
                             f"(other than float32 with implementation='fused' only), not {storage_dtype}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        self.process_group = process_group
        self.rank, self.world_size = comm.rank_and_world(process_group)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.class_start, self.class_stop = class_range(num_classes, self.rank, self.world_size)
        self.num_local_classes = self.class_stop - self.class_start
        self.backbone_grads_averaged = backbone_grads_averaged
        self.check_inputs = check_inputs
        # Set by a trainer that gives every rank batches of one size and reads the step's numbers
        # once: `equal_batches` skips the all-gather of the batch sizes (and its read), and
        # `defer_input_checks` leaves the label and finiteness checks' verdict on the device, in
        # `input_problems`, for the trainer to read with the step's numbers (`raise_input_problems`).
        self.equal_batches = False
        self.defer_input_checks = False
        self.input_problems: torch.Tensor | None = None
        self.implementation, self.chunk_size, self.compile_elementwise = implementation, chunk_size, compile_elementwise
        self.weight = nn.Parameter(init_class_rows(self.class_start, self.class_stop, embedding_dim, seed,
                                                   storage_dtype))
        self.seed = seed
        # forwards that drew random numbers so far (a class sample, or the rounding of a fused
        # step): with seed and rank it fixes the next draws; restore it on resume to repeat them
        self.sample_step = 0
        # the trainer's optimizer step (its state.step, restored on resume), set before each forward:
        # a head whose loss follows a schedule (A-Softmax's lambda) reads it, so the schedule resumes
        # with the run and a checkpoint needs nothing more
        self.schedule_step = 0

    def step_generator(self, device: torch.device, stream: int = 0) -> torch.Generator:
        """The random stream of this step on this rank, on `device` (a draw there needs no copy
        from the host): 0 for the class draw, 1 for the rounding of a fused step."""
        generator = torch.Generator(device=device)
        generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.sample_step) ^ (stream << 48))
        return generator

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"classes=[{self.class_start}, {self.class_stop}) on rank {self.rank}/{self.world_size}, "
            f"implementation={self.implementation}, chunk_size={self.chunk_size}"
        )

    def gather_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Check this rank's batch and gather every rank's: ([N, D] with grad, [N] int64, sizes)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings on rank {self.rank} have shape {tuple(embeddings.shape)}; "
                f"this head expects [batch, {self.embedding_dim}]"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(
                f"labels on rank {self.rank} have dtype {labels.dtype}; identity labels must be an "
                "integer tensor (int64: float32 cannot hold ids above 2^24 exactly)"
            )
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"labels on rank {self.rank} have shape {tuple(labels.shape)}; expected "
                f"[{embeddings.shape[0]}], one per embedding"
            )
        if self.equal_batches:
            sizes = [embeddings.shape[0]] * self.world_size
        else:
            sizes = comm.batch_sizes(embeddings.shape[0], embeddings.device, self.process_group)
        grad_scale = float(self.world_size) if self.backbone_grads_averaged else 1.0
        gathered = comm.all_gather_with_grad(embeddings, sizes, self.process_group, grad_scale)
        gathered_labels = comm.all_gather(labels.to(torch.int64), sizes, self.process_group)
        if self.check_inputs:
            # Every rank checks the same gathered batch, so every rank raises together.
            self._check_gathered(gathered, gathered_labels, sizes)
        return gathered, gathered_labels, sizes

    def _check_gathered(self, embeddings: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> None:
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty: every rank passed 0 embeddings")
        bad_label = (labels < 0) | (labels >= self.num_classes)
        finite_rows = torch.isfinite(embeddings.detach()).all(dim=1)
        if self.defer_input_checks:
            # The first offending row of each kind (-1: none) and its label, read later with the step's
            # numbers. An out-of-range label is the true class of no shard, so the step computes on.
            first_bad = torch.where(bad_label.any(), bad_label.to(torch.int8).argmax(), -1)
            first_nonfinite = torch.where(finite_rows.all(), -1, (~finite_rows).to(torch.int8).argmax())
            found = torch.stack([first_bad, labels[first_bad.clamp(min=0)], first_nonfinite])
            if self.input_problems is not None:  # an earlier micro-batch of the step: its findings come first
                earlier = self.input_problems
                found = torch.cat([torch.where(earlier[0] >= 0, earlier[:2], found[:2]),
                                   torch.where(earlier[2] >= 0, earlier[2:], found[2:])])
            self.input_problems = found
            self._problem_sizes = sizes
            return
        if bool(bad_label.any()):
            row = int(bad_label.nonzero()[0, 0])
            self._raise_bad_label(row, int(labels[row]), sizes)
        if not bool(finite_rows.all()):
            row = int((~finite_rows).nonzero()[0, 0])
            self._raise_nonfinite(row, sizes)

    def _raise_bad_label(self, row: int, label: int, sizes: list[int]) -> None:
        rank, index = _locate(row, sizes)
        raise ValueError(
            f"label {label} at batch index {index} on rank {rank} is outside "
            f"[0, {self.num_classes}) (num_classes={self.num_classes})"
        )

    @staticmethod
    def _raise_nonfinite(row: int, sizes: list[int]) -> None:
        rank, index = _locate(row, sizes)
        raise ValueError(f"embedding at batch index {index} on rank {rank} is not finite (NaN or Inf)")

    def raise_input_problems(self, values: Sequence[float]) -> None:
        """Raise what `_check_gathered` found in the last forward (`defer_input_checks`), from the
        host copy `values` of `input_problems`: the same ValueError an immediate check raises."""
        first_bad, label, first_nonfinite = (int(v) for v in values)
        if first_bad >= 0:
            self._raise_bad_label(first_bad, label, self._problem_sizes)
        if first_nonfinite >= 0:
            self._raise_nonfinite(first_nonfinite, self._problem_sizes)

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the whole global batch, for logging (detached; same value on every rank)."""
        return loss.detach()

    def loss_share(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's additive part of the global loss (detached): summed over the ranks it is
        the global loss, so a trainer can fold it into an all-reduce it makes anyway. Here
        `forward` returns the whole global loss on every rank."""
        return loss.detach() / self.world_size

    @property
    def sparse_row_grad(self) -> bool:
        """Whether `weight.grad` is a sparse tensor of the rows a step used (then only a row-sparse
        optimiser, `SampledRowsSGD`, can step it)."""
        return False

    def full_weight(self) -> torch.Tensor:
        """Every rank's rows concatenated in class order (for tests and small models only)."""
        sizes = [class_range(self.num_classes, r, self.world_size) for r in range(self.world_size)]
        weight = self.weight.detach()
        if weight.dtype == torch.bfloat16:  # gathered as float32 (exact): not every backend has bfloat16
            weight = weight.float()
        rows = comm.all_gather(weight, [stop - start for start, stop in sizes], self.process_group)
        return rows.to(self.weight.dtype)


def _locate(row: int, sizes: list[int]) -> tuple[int, int]:
    """(rank, index within that rank's batch) of a row of the gathered batch."""
    for rank, size in enumerate(sizes):
        if row < size:
            return rank, row
        row -= size
    raise AssertionError("row outside the gathered batch")
