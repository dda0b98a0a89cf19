"""Cases for the head parity tests and the code that runs them on one rank.

A case fixes a head, its hyper-parameters, a class count, a label pattern and per-rank batch
sizes. `run_cases(rank, world_size, names)` builds each case's global batch from a seed,
runs this rank's slice through the sharded head in float64, and returns the loss and every
gradient; tests compare them with the dense reference on the concatenated batch.

`FUSED_CASES` and `run_fused_cases` do the same for the fused heads against their reference
implementation (tests/test_heads_fused.py), and `AllocationTracker` records what a forward and
backward allocate (tests/test_heads_memory.py, tests/test_heads_sampling.py).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sf2dist import comm
from sf2dist.heads import LambdaSchedule, PartialFCHead, SphereFace2Head
from tests.distributed import run_on_ranks

NUM_CLASSES = 11  # 11 classes: shards of 6/5 on 2 ranks and 4/4/3 on 3 ranks
EMBEDDING_DIM = 6

CASES = {
    "sf2-C": dict(head="sf2", kwargs=dict(margin="C")),
    "sf2-A": dict(head="sf2", kwargs=dict(margin="A", m=0.5)),
    "sf2-M": dict(head="sf2", kwargs=dict(margin="M", m=1.5)),
    "sf2-C-other-hparams": dict(head="sf2", kwargs=dict(margin="C", alpha=0.8, r=64.0, m=0.5, t=2.0, loss_weight=50.0)),
    "sf2-C-labels-on-one-shard": dict(head="sf2", kwargs=dict(margin="C"), labels="first3"),
    "sf2-A-uneven-batches": dict(head="sf2", kwargs=dict(margin="A", m=0.5), sizes="uneven"),
    "sf2-M-one-label-last-shard": dict(head="sf2", kwargs=dict(margin="M", m=1.5), labels="last"),
    "cosface": dict(head="pfc", kwargs=dict(margin="cosface")),
    "arcface": dict(head="pfc", kwargs=dict(margin="arcface")),
    "cosface-labels-on-one-shard": dict(head="pfc", kwargs=dict(margin="cosface", s=30.0), labels="first3"),
    "arcface-uneven-batches": dict(head="pfc", kwargs=dict(margin="arcface", m=0.3), sizes="uneven"),
    "cosface-sampled": dict(head="pfc", kwargs=dict(margin="cosface", sample_rate=0.5)),
    "arcface-sampled-one-shard": dict(head="pfc", kwargs=dict(margin="arcface", sample_rate=0.4), labels="first3"),
}


def batch_sizes(case: dict, world_size: int) -> list[int]:
    if case.get("sizes") == "uneven":  # includes a rank with an empty batch on 3 ranks
        return [[3], [2, 5], [3, 0, 5]][world_size - 1]
    return [4] * world_size


def global_batch(name: str, world_size: int, cases: dict = CASES) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The case's full batch: embeddings [N, D] float64, labels [N] int64, per-rank sizes."""
    case = cases[name]
    sizes = batch_sizes(case, world_size)
    total = sum(sizes)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    embeddings = torch.randn(total, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    pattern = case.get("labels", "random")
    if pattern == "random":
        labels = torch.randint(0, case.get("classes", NUM_CLASSES), (total,), generator=generator)
    elif pattern == "first3":  # all on rank 0's shard; the other shards hold none of them
        labels = torch.randint(0, 3, (total,), generator=generator)
    else:  # every sample is the last class
        labels = torch.full((total,), NUM_CLASSES - 1)
    return embeddings, labels, sizes


def make_head(name: str) -> torch.nn.Module:
    case = CASES[name]
    cls = SphereFace2Head if case["head"] == "sf2" else PartialFCHead
    return cls(NUM_CLASSES, EMBEDDING_DIM, seed=3, **case["kwargs"]).double()


def run_case(name: str, rank: int, world_size: int) -> dict:
    embeddings, labels, sizes = global_batch(name, world_size)
    start = sum(sizes[:rank])
    local = embeddings[start : start + sizes[rank]].clone().requires_grad_(True)
    head = make_head(name)
    comm.stats.reset()
    loss = head(local, labels[start : start + sizes[rank]])
    loss.backward()
    step_log = list(comm.stats.log)
    result = {
        "loss": head.global_loss(loss),
        "embedding_grad": local.grad,
        "weight_grad": head.weight.grad,
        "class_range": [head.class_start, head.class_stop],
        "collectives": [[kind, nbytes] for kind, nbytes in step_log],
    }
    if isinstance(head, SphereFace2Head):
        result["bias_grad"] = head.bias.grad
        result["bias"] = head.bias.detach()
    else:
        result["sampled"] = head.last_sampled_classes
    return result


def run_cases(rank: int, world_size: int, names: list[str]) -> dict:
    return {name: run_case(name, rank, world_size) for name in names}


# Fused against reference: every case runs through implementation="reference" and through the
# fused implementation at each of FUSED_CHUNK_SIZES (1 class per chunk; 2 and 3, which divide
# some shards of 11 classes on 1-3 ranks and not others; None, the head's own choice).
FUSED_CHUNK_SIZES = (1, 2, 3, None)
FUSED_CASES = {
    "sf2-C": dict(head="sf2", kwargs=dict(margin="C")),
    "sf2-A": dict(head="sf2", kwargs=dict(margin="A", m=0.5)),
    "sf2-M": dict(head="sf2", kwargs=dict(margin="M", m=1.5)),
    "sf2-C-fractional-t": dict(head="sf2", kwargs=dict(margin="C", alpha=0.8, r=64.0, m=0.5, t=2.5, loss_weight=50.0)),
    "sf2-C-labels-on-one-shard": dict(head="sf2", kwargs=dict(margin="C"), labels="first3"),
    "sf2-A-uneven-batches": dict(head="sf2", kwargs=dict(margin="A", m=0.5), sizes="uneven"),
    # 60 classes: a sampled SphereFace2 step uses max(ceil(p L), N + 1) of a shard's L rows, fewer than L
    # only where the shard holds more than the global batch N
    "sf2-C-sampled": dict(head="sf2", kwargs=dict(margin="C", sample_rate=0.5), classes=60),
    "sf2-M-sampled-uneven": dict(head="sf2", kwargs=dict(margin="M", m=1.5, sample_rate=0.3), sizes="uneven",
                                 classes=60),
    "cosface": dict(head="pfc", kwargs=dict(margin="cosface")),
    "arcface": dict(head="pfc", kwargs=dict(margin="arcface")),
    "arcface-uneven-batches": dict(head="pfc", kwargs=dict(margin="arcface", m=0.3), sizes="uneven"),
    "cosface-sampled": dict(head="pfc", kwargs=dict(margin="cosface", sample_rate=0.5)),
    "arcface-sampled-one-shard": dict(head="pfc", kwargs=dict(margin="arcface", sample_rate=0.4), labels="first3"),
}
GRAD_LOSS = 0.37  # backward of GRAD_LOSS * loss: the heads must scale by the incoming gradient

# The SphereFace (A-Softmax) margin of the softmax head, run by tests/test_heads_sphereface_margin.py
# on 1-3 ranks against tests/dense_reference.py's `a_softmax_loss` and between implementations.
# Its batches place the true-class cosines on a spread, so that every branch k of psi occurs.
# "labels": "random" over the 11 classes, or "few" (classes 0, 1 and 9: the others are absent, so
# sampling draws); "sizes": "even" (12 samples split evenly) or "uneven" (one rank empty on 3);
# "step": the trainer step the head is given (feature_scale "norm": its lambda).
SPHEREFACE_CASES = {
    "m1.5": dict(kwargs=dict(margin="sphereface")),
    "m4": dict(kwargs=dict(margin="sphereface", m=4.0)),
    "m2-s16-uneven-batches": dict(kwargs=dict(margin="sphereface", m=2.0, s=16.0), sizes="uneven"),
    "m1.5-sampled": dict(kwargs=dict(margin="sphereface", sample_rate=0.5), labels="few"),
    "m4-sampled-uneven": dict(kwargs=dict(margin="sphereface", m=4.0, sample_rate=0.4), labels="few", sizes="uneven"),
    "norm-m4-step0": dict(kwargs=dict(margin="sphereface", m=4.0, feature_scale="norm"), step=0),
    "norm-m1.5-step1000": dict(kwargs=dict(margin="sphereface", feature_scale="norm"), step=1000),
    "norm-m4-at-lambda-min-sampled-uneven": dict(
        kwargs=dict(margin="sphereface", m=4.0, feature_scale="norm", sample_rate=0.5), step=10**6, labels="few",
        sizes="uneven"),
    "norm-m3-own-schedule": dict(  # lambda = 10 / (1 + 3)^2 = 0.625 at step 3: psi dominates the target
        kwargs=dict(margin="sphereface", m=3.0, feature_scale="norm",
                    lambda_schedule=LambdaSchedule(base=10.0, gamma=1.0, power=2.0, minimum=0.0)), step=3),
}


def run_fused_case(name: str, rank: int, world_size: int, implementation: str, chunk_size) -> dict:
    case = FUSED_CASES[name]
    embeddings, labels, sizes = global_batch(name, world_size, FUSED_CASES)
    start = sum(sizes[:rank])
    local = embeddings[start : start + sizes[rank]].clone().requires_grad_(True)
    cls = SphereFace2Head if case["head"] == "sf2" else PartialFCHead
    head = cls(case.get("classes", NUM_CLASSES), EMBEDDING_DIM, seed=3, implementation=implementation, chunk_size=chunk_size,
               **case["kwargs"]).double()
    with torch.no_grad():  # rows of uneven norms, so that the softmax head's normalisation counts
        head.weight.mul_(torch.linspace(0.5, 2.0, head.num_local_classes, dtype=torch.float64).unsqueeze(1))
    comm.stats.reset()
    loss = head(local, labels[start : start + sizes[rank]])
    (GRAD_LOSS * loss).backward()
    result = {
        "loss": head.global_loss(loss),
        "embedding_grad": local.grad,
        "weight_grad_sparse": bool(head.weight.grad.is_sparse),
        "weight_grad": head.weight.grad.to_dense(),
        "weight": head.weight.detach(),
        "class_range": [head.class_start, head.class_stop],
        "collectives": [[kind, nbytes] for kind, nbytes in comm.stats.log],
    }
    if isinstance(head, SphereFace2Head):
        result["bias_grad"] = head.bias.grad
        if head.last_sampled_rows is not None:
            result["sampled_rows"] = head.last_sampled_rows
    else:
        result["sampled"] = head.last_sampled_classes
    return result


def run_fused_cases(rank: int, world_size: int, cases=None, run_case=None) -> dict:
    """{case: {"reference": result, chunk_size: result, ...}} on this rank, for `cases` (default
    FUSED_CASES) run by `run_case(name, rank, world_size, implementation, chunk_size)`."""
    cases, run_case = cases or FUSED_CASES, run_case or run_fused_case
    results = {}
    for name in cases:
        runs = {"reference": run_case(name, rank, world_size, "reference", None)}
        for chunk_size in FUSED_CHUNK_SIZES:
            runs[str(chunk_size)] = run_case(name, rank, world_size, "fused", chunk_size)
        results[name] = runs
    return results


_FUSED_RESULTS: dict[int, list[dict]] = {}


def fused_results(world_size: int) -> list[dict]:
    """Per-rank `run_fused_cases` on `world_size` gloo ranks, computed once per test session."""
    if world_size not in _FUSED_RESULTS:
        if world_size == 1:
            _FUSED_RESULTS[1] = [run_fused_cases(0, 1)]
        else:
            _FUSED_RESULTS[world_size] = run_on_ranks(run_fused_cases, world_size)
    return _FUSED_RESULTS[world_size]


class AllocationTracker(TorchDispatchMode):
    """Records the tensors that ops allocate while active: the largest (elements) and peak live bytes.

    A tensor counts when an op returns it on a storage that none of the op's inputs had (in-place
    results and views are not allocations); its bytes stay live until the storage is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = self.peak_bytes = self.largest_numel = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._live:
                continue
            self._live.add(key)
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.largest_numel = max(self.largest_numel, tensor.numel())
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out
