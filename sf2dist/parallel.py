"""Where a process sits in the job: rank/world discovery, process-group set-up, class shards.

Nothing here runs at import time. `init_distributed()` is called once by a launcher; models
and heads never create process groups themselves.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: dict, name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def discover(env: dict | None = None) -> ProcessInfo:
    """Read rank and world size from torchrun's variables, else SLURM's, else a single process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE. Under `srun` with one task per
    GPU, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NTASKS_PER_NODE describe the same thing
    (MASTER_ADDR and MASTER_PORT must then be exported by the batch script).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local_rank = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        per_node = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]  # e.g. "8(x4)"
        local_world = int(per_node) if per_node.isdigit() else 1
        source = "slurm"
    else:
        return ProcessInfo(0, 1, 0, 1, "single")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{source}: rank {rank} is not within world size {world_size}")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"{source}: local rank {local_rank} is not within local world size {local_world}")
    return ProcessInfo(rank, world_size, local_rank, local_world, source)


def init_distributed(
    device: str | torch.device | None = None, timeout_s: float = 600.0
) -> tuple[ProcessInfo, torch.device]:
    """Join the job's default process group and pick this process's device.

    The backend follows the device: NCCL for CUDA, gloo for CPU. `device=None` means CUDA
    (this process's local GPU) when available, else CPU. A single process with no launcher
    variables gets no process group; every collective in `sf2dist.comm` then acts locally.
    `timeout_s` bounds how long a collective may wait on a dead rank before the job fails.
    """
    info = discover()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if info.source == "slurm":
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if name not in os.environ:
                    raise ValueError(f"running under SLURM without {name}: export it in the batch script")
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return info, device


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The global classes [start, stop) held by `rank`: contiguous, the first C % W ranks one larger."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} is smaller than the world size {world_size}: "
            "every rank must hold at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
