"""Cases for the head parity tests and the code that runs them on one rank.

A case fixes a head, its hyper-parameters, a class count, a label pattern and per-rank batch
sizes. `run_cases(rank, world_size, names)` builds each case's global batch from a seed,
runs this rank's slice through the sharded head in float64, and returns the loss and every
gradient; tests compare them with the dense reference on the concatenated batch.
"""
from __future__ import annotations

import torch

from sf2dist import comm
from sf2dist.heads import PartialFCHead, SphereFace2Head

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


def global_batch(name: str, world_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The case's full batch: embeddings [N, D] float64, labels [N] int64, per-rank sizes."""
    case = CASES[name]
    sizes = batch_sizes(case, world_size)
    total = sum(sizes)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    embeddings = torch.randn(total, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    pattern = case.get("labels", "random")
    if pattern == "random":
        labels = torch.randint(0, NUM_CLASSES, (total,), generator=generator)
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
