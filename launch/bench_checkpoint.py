"""`make bench-checkpoint`: how long the trainer's checkpoint of a 1M-class head shard takes.

A node failure loses the steps since the newest checkpoint, and a checkpoint every N steps
costs its save time once per N steps: this measures that save time, so that
run.checkpoint_every can be chosen. The write is the trainer's own, `checkpoint.save`, on the
objects the trainer builds (`build_head`, `make_head_sgd`, `make_engine`, a `TrainerState`),
in one process without a process group (comm's barriers act locally).

For each world size W (--world-sizes) it builds the head shard that rank 0 of W holds for C
classes of width D (`parallel.class_range`; rank 0 holds the largest shard and also writes
model.pt, so the other ranks wait for it at the save's barrier), with a smallcnn backbone so
that the head is what is written, and takes one training step so that the rows' and the
backbone's SGD momentum exist. Then, in --repeat rounds, each of these cases in turn (so that whatever the
machine does for a while falls on all of them alike), into a fresh directory under --dir:

  save      `checkpoint.save(...)`: what the trainer waits for. torch.save does not fsync, so
            part of the checkpoint may still be in the page cache when it returns;
  to disk   fsync of every file it wrote: until then a power loss or kernel crash of the node
            could take the checkpoint with it;
  load      `checkpoint.load(...)` of that checkpoint (what a resume does on this rank), after
            its pages were dropped from the page cache (posix_fadvise), so read from the disk.

The rows are stored as head.storage says: float32 (the default), and bfloat16 (with head.step
fused, which bfloat16 rows need), whose rows and momentum take half the bytes.

The cases are held in memory together (for the rounds): about 14 GB at the defaults, which take
about 90 s on 2 cores.

    .venv/bin/python launch/bench_checkpoint.py                          # prints the table
    .venv/bin/python launch/bench_checkpoint.py --docs docs/benchmarks.md   # and writes its section
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sf2dist import parallel
from sf2dist.config import Config, ConfigError, config_to_dict, load_config
from sf2dist.heads import make_head_sgd
from sf2dist.models import create_backbone
from sf2dist.report import machine_description, write_section
from sf2dist.train import checkpoint, optim
from sf2dist.train.engine import make_engine
from sf2dist.train.trainer import build_head

SECTION = "checkpoint"
STORAGE_SETTINGS = {"float32": ["head.storage=float32"], "bfloat16": ["head.storage=bfloat16", "head.step=fused"]}
IMAGE_SIZE = 112


def build_shard(cfg: Config, num_classes: int, rank: int, world_size: int):
    """(backbone engine, head, head optimiser) of rank `rank` of `world_size`, one step trained."""
    start, stop = parallel.class_range(num_classes, rank, world_size)
    torch.manual_seed(cfg.run.seed)
    backbone = create_backbone(cfg.model.backbone, embedding_dim=cfg.model.embedding_dim, input_size=IMAGE_SIZE,
                               **cfg.model.kwargs)
    engine = make_engine(backbone, cfg, torch.device("cpu"), 1)
    # Without a process group the head holds all of its classes: build it with this rank's row
    # count, then tag it with the rank's global range, which is all that its files record of it.
    head = build_head(cfg, stop - start)
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    head_optimizer = make_head_sgd(head, optim.head_param_groups(head, cfg.optim), lr=head_lr,
                                   momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                   fused_step=cfg.head.step == "fused")
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.tensor([0, stop - start - 1])
    engine.backward(head(engine(images), labels))
    engine.step()
    head_optimizer.step()
    engine.zero_grad()
    head_optimizer.zero_grad(set_to_none=True)
    head.num_classes, head.rank, head.world_size = num_classes, rank, world_size
    head.class_start, head.class_stop = start, stop
    return engine, head, head_optimizer


def fsync_tree(directory: Path) -> None:
    """Every file under `directory`, then the directories, on disk."""
    for path in sorted(directory.rglob("*")) + [directory, directory.parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_cached(directory: Path) -> None:
    """Evict the (clean, fsynced) pages of the files under `directory` from the page cache."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class Shard:
    """One measured case: rank 0's objects for one world size and row storage, and its figures."""

    world_size: int
    storage: str
    cfg: Config
    engine: object
    head: torch.nn.Module
    head_optimizer: torch.optim.Optimizer
    seconds: dict = field(default_factory=lambda: {"save": [], "sync": [], "load": []})
    head_bytes: int = 0
    total_bytes: int = 0


def checkpoint_once(shard: Shard, root: Path) -> None:
    """Save `shard` under `root` as the trainer does, fsync it, load it back; appends the seconds."""
    rank, cfg = 0, shard.cfg
    state = checkpoint.TrainerState(step=1, micro_batches=1, world_size=shard.world_size,
                                    batch_size=cfg.data.batch_size)
    extra = {"loss_scale": optim.LossScale(False).state_dict(), "config": config_to_dict(cfg)}
    start = time.perf_counter()
    saved = checkpoint.save(root / "checkpoints", state, rank=rank, backbone=shard.engine.module, head=shard.head,
                            head_optimizer=shard.head_optimizer, engine=shard.engine, extra=extra,
                            keep=cfg.run.keep_checkpoints)
    shard.seconds["save"].append(time.perf_counter() - start)
    start = time.perf_counter()
    fsync_tree(saved)
    shard.seconds["sync"].append(time.perf_counter() - start)
    shard.head_bytes = (saved / f"head-{rank:05d}.pt").stat().st_size
    shard.total_bytes = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    drop_cached(saved)
    start = time.perf_counter()
    checkpoint.load(saved, rank=rank, world_size=shard.world_size, backbone=shard.engine.module, head=shard.head,
                    head_optimizer=shard.head_optimizer, engine=shard.engine)
    shard.seconds["load"].append(time.perf_counter() - start)
    shutil.rmtree(root)


def measure(shards: list[Shard], repeat: int, scratch: Path) -> None:
    """`repeat` rounds of `checkpoint_once` of every shard in turn, so that whatever the machine does
    for a while (page-cache reclaim, another job's I/O) falls on all of them alike."""
    for index in range(repeat):
        for number, shard in enumerate(shards):
            checkpoint_once(shard, scratch / f"round-{index}-case-{number}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def to_markdown(shards: list[Shard], *, num_classes: int, embedding_dim: int, repeat: int, directory: Path,
                seconds: float, command: str) -> str:
    classes = f"{num_classes / 1e6:g}M" if num_classes % 100_000 == 0 else f"{num_classes:,}"
    backbone_bytes = shards[0].total_bytes - shards[0].head_bytes
    lines = [
        f"## Checkpoint time of a {classes}-class head shard (`make bench-checkpoint`)",
        "",
        f"`checkpoint.save` (what the trainer calls) of the head shard that rank 0 of W holds for "
        f"{num_classes:,} classes x {embedding_dim}, rows and SGD momentum in the row dtype, with a smallcnn "
        f"backbone and its optimiser (model.pt, backbone_optimizer.pt: {_mb(backbone_bytes)}), "
        f"written by one process to a fresh directory on the disk of {directory}. Median (min-max) of {repeat} "
        "saves, in rounds of one save of each row. *save*: until `save` returns, the time training stops "
        "(torch.save does not fsync); *+ fsync*: then until every file is on the disk; *load*: "
        "`checkpoint.load` of it after its pages were dropped from the page cache. MB/s: the head file's "
        "bytes over the save time.",
        "",
        "| W | rows | head file | save s | MB/s | + fsync s | load s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for shard in shards:
        times = shard.seconds
        rate = shard.head_bytes / 1e6 / statistics.median(times["save"])
        lines.append(f"| {shard.world_size} | {shard.head.num_local_classes:,} x {shard.storage} "
                     f"| {_mb(shard.head_bytes)} | {spread(times['save'])} | {rate:,.0f} | {spread(times['sync'])} "
                     f"| {spread(times['load'])} |")
    example = max((s for s in shards if s.storage == "float32"), key=lambda s: s.world_size, default=shards[0])
    save = statistics.median(example.seconds["save"])
    lines += [
        "",
        "What it means: a node failure loses the steps since the newest checkpoint, and a checkpoint every "
        "N steps (run.checkpoint_every) costs (save time) / (N x step time) of the run; e.g. with the "
        f"W={example.world_size} {example.storage} save of {save:.2f} s and steps of 0.5 s, "
        f"run.checkpoint_every=1000 costs {100 * save / 500:.2f} % of the run and loses at most 1,000 steps "
        "(8.3 minutes) per failure. The ranks of a node save at the same time: ranks that share a disk "
        "write (ranks per node) x C / W rows together, so 8 ranks of W=8 on one node write as many bytes "
        "as the W=1 row.",
        "",
        f"Machine: {machine_description(disk_of=directory)}.",
        f"Command: `{command}` ({seconds:.0f} s in all).",
    ]
    return "\n".join(lines) + "\n"


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000,
                        help="identities C of the whole head (default 1,000,000)")
    parser.add_argument("--embedding-dim", type=int, default=512, help="row width D (default 512)")
    parser.add_argument("--world-sizes", default="8,1", help="comma-separated W; rank 0's shard of each (default 8,1)")
    parser.add_argument("--storage", default=",".join(STORAGE_SETTINGS),
                        help="comma-separated head.storage values (default float32,bfloat16)")
    parser.add_argument("--repeat", type=int, default=3, help="saves per W and storage (default 3)")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-checkpoint"),
                        help="checkpoints are written to a temporary directory in it (default runs/bench-checkpoint)")
    parser.add_argument("--docs", type=Path, help=f"markdown file whose '{SECTION}' section receives the table")
    args = parser.parse_args(argv)
    try:
        world_sizes = [int(w) for w in args.world_sizes.split(",") if w]
    except ValueError:
        parser.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    storages = [s for s in args.storage.split(",") if s]
    unknown = [s for s in storages if s not in STORAGE_SETTINGS]
    if unknown:
        parser.error(f"unknown --storage {', '.join(unknown)}; choose from {', '.join(STORAGE_SETTINGS)}")
    if not world_sizes or not storages or min(world_sizes) < 1 or args.repeat < 1:
        parser.error("--world-sizes, --storage and --repeat need at least one positive value each")
    if args.classes < max(world_sizes) or args.classes < 2:
        parser.error(f"--classes {args.classes} must be at least 2 and at least the largest world size "
                     f"{max(world_sizes)} (every rank holds a class)")

    start = time.perf_counter()
    args.dir.mkdir(parents=True, exist_ok=True)
    shards = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-") as scratch:
        for world_size in world_sizes:
            for storage in storages:
                try:
                    cfg = load_config(overrides=["model.backbone=smallcnn", f"model.embedding_dim={args.embedding_dim}",
                                                 "engine.device=cpu", *STORAGE_SETTINGS[storage]])
                except ConfigError as err:
                    parser.error(str(err))
                shards.append(Shard(world_size, storage, cfg, *build_shard(cfg, args.classes, 0, world_size)))
        measure(shards, args.repeat, Path(scratch))
    for shard in shards:
        print(f"W={shard.world_size} {shard.storage}: head file {_mb(shard.head_bytes)}, "
              f"save {spread(shard.seconds['save'])} s, + fsync {spread(shard.seconds['sync'])} s, "
              f"load {spread(shard.seconds['load'])} s", flush=True)
    command = " ".join(["launch/bench_checkpoint.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(shards, num_classes=args.classes, embedding_dim=args.embedding_dim, repeat=args.repeat,
                           directory=args.dir, seconds=time.perf_counter() - start, command=command)
    print(markdown)
    if args.docs is not None:
        write_section(args.docs, SECTION, markdown)
        print(f"wrote the '{SECTION}' section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
