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
    variables: tuple[str, ...] = ()  # the environment variables the numbers came from

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        used = ", ".join(self.variables) or "no launcher variables"
        return (f"rank {self.rank} of {self.world_size}, local rank {self.local_rank} of {self.local_world_size} "
                f"({self.source}: {used})")


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
        used = ["RANK", "WORLD_SIZE"]
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        used = ["SLURM_PROCID", "SLURM_NTASKS"]
        source = "slurm"
    else:
        return ProcessInfo(0, 1, 0, 1, "single")
    # The place on this node. Without a local rank the global one stands in: the GPU index is
    # taken modulo the visible GPUs (cuda_device_index), so rank 9 of an 8-GPU node gets GPU 1.
    local_rank, local_world = rank, world_size
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in env:
            local_rank = _env_int(env, name)
            used.append(name)
            break
    if "LOCAL_WORLD_SIZE" in env:
        local_world = _env_int(env, "LOCAL_WORLD_SIZE")
        used.append("LOCAL_WORLD_SIZE")
    elif "SLURM_NTASKS_PER_NODE" in env and source == "slurm":
        per_node = env["SLURM_NTASKS_PER_NODE"].split("(")[0]  # e.g. "8(x4)"
        local_world = int(per_node) if per_node.isdigit() else 1
        used.append("SLURM_NTASKS_PER_NODE")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{source}: rank {rank} is not within world size {world_size}")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"{source}: local rank {local_rank} is not within local world size {local_world}")
    return ProcessInfo(rank, world_size, local_rank, local_world, source, tuple(used))


def cuda_device_index(info: ProcessInfo, visible: int) -> int:
    """This process's GPU among the `visible` ones: its local rank modulo their number.

    With one GPU per task (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) every
    process sees a single device, index 0, whatever its local rank; with all of a node's GPUs
    visible, local rank r takes GPU r.
    """
    if visible < 1:
        raise ValueError(f"{info.describe()}: CUDA was requested but no GPU is visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return info.local_rank % visible


def init_distributed(
    device: str | torch.device | None = None, timeout_s: float = 600.0, always_group: bool = False
) -> tuple[ProcessInfo, torch.device]:
    """Join the job's default process group and pick this process's device.

    The backend follows the device: NCCL for CUDA, gloo for CPU. `device=None` means CUDA
    (this process's local GPU) when available, else CPU. A single process with no launcher
    variables gets no process group; every collective in `sf2dist.comm` then acts locally.
    `timeout_s` bounds how long a collective may wait on a dead rank before the job fails.
    `always_group`: join a group of one as well when a launcher (torchrun, SLURM) started a
    single process (DeepSpeed cannot run without a group); a process started without a
    launcher has no rendezvous address, so it never gets one.
    """
    info = discover()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", cuda_device_index(info, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    wanted = info.world_size > 1 or (always_group and info.source != "single")
    if wanted and not dist.is_initialized():
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


def lost_peer(error: str, timeout_s: float) -> str | None:
    """What a collective's error message says about the other ranks; None for an error of another kind."""
    text = error.lower()
    # gloo's words ("Timed out waiting ...", "Application timeout caused pair closure"); NCCL's
    # watchdog ends the process itself after the same time-out
    if "timed out" in text or "timeout" in text:
        return (f"a collective waited longer than run.timeout_s={timeout_s:g} s: another rank is stuck or dead, "
                "or the network between the hosts is cut")
    # a peer process that ended (its host died, it crashed, it was killed) closes its connections
    if any(words in text for words in ("connection reset", "connection closed", "broken pipe", "connection refused",
                                       "no route to host", "ncclremoteerror")):
        return ("the connection to another rank was lost: its host died or was cut off, or its process ended "
                "(a crash there prints its own error)")
    return None
