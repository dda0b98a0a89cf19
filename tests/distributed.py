"""Run a function on N gloo processes on CPU and collect what each rank returns.

`run_on_ranks(fn, world_size, *args)` spawns `world_size` processes that join a gloo group
on a free local port, call `fn(rank, world_size, *args)` (a module-level function), and save
its return value (tensors, numbers, strings, lists, dicts). The parent gets the values as a
list in rank order, or the first rank's traceback as an exception.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": result}, out)
        dist.barrier()  # leave together: gloo torn down on one rank while a peer still talks can abort it
    except BaseException:  # report any failure to the parent instead of hanging it
        torch.save({"ok": False, "value": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is saved and the group destroyed: skip the interpreter's C++ static destructors,
    # which now and then abort in torch 2.13's CPU build ("terminate called without an active
    # exception", after the last Python frame) and would fail a test whose ranks all succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world_size: int, *args) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, fn, args),
                           nprocs=world_size, start_method="spawn", join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for rank, result in enumerate(results):
        if not result["ok"]:
            raise RuntimeError(f"rank {rank} failed:\n{result['value']}")
    return [result["value"] for result in results]
