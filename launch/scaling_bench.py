"""`make scaling-bench`: images/s of the classifier layer against world size, SphereFace2
beside the softmax baseline and Partial FC, measured in the same run at the same shapes.

Three ways to run it:
  python launch/scaling_bench.py [--world-sizes 1,2] ...   spawns the ranks itself for each
      world size on this machine (GPUs with NCCL where there are enough, else CPU with gloo);
  torchrun ... launch/scaling_bench.py --out-dir DIR        measures at torchrun's world size
      and writes DIR/points-w<W>.json (what launch/slurm/scaling_bench.sbatch runs per node count);
  python launch/scaling_bench.py --collect DIR              turns those point files into the outputs.
`--project` adds points up to --max-world from per-rank compute measured here at each shard
size C/W and a latency/bandwidth model of the collectives (labelled "projected" everywhere).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sf2dist import comm, parallel
from sf2dist.bench import scaling
from sf2dist.report import machine_description, write_section

CPU_DEFAULT_CLASSES = 100_000
FULL_CLASSES = 1_000_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"identities in total (default {FULL_CLASSES:,} on GPUs, {CPU_DEFAULT_CLASSES:,} on CPU)")
    p.add_argument("--full", action="store_true", help=f"use {FULL_CLASSES:,} identities on CPU too (slow)")
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--methods", default=",".join(scaling.METHODS), help="comma-separated: " + ", ".join(scaling.METHODS))
    p.add_argument("--memory-classes", type=int, default=None,
                   help=f"the head-memory table: classes on one rank (default {FULL_CLASSES:,}; --quick 20,000; 0 skips it)")
    p.add_argument("--world-sizes", default=None, help="comma-separated (default: 1, 2, 4, ... up to the GPUs or cores here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes for a smoke test (2,000 classes, 32-d, 16 images/rank)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/scaling-bench"))
    p.add_argument("--docs", type=Path, default=None, help="write the table into this markdown file (docs/benchmarks.md)")
    p.add_argument("--collect", type=Path, default=None, help="build the outputs from DIR/points-w*.json")
    p.add_argument("--project", action="store_true", help="add projected points up to --max-world")
    p.add_argument("--max-world", type=int, default=64)
    p.add_argument("--ranks-per-node", type=int, default=8, help="projection: ranks sharing the intra-node link")
    p.add_argument("--intra-gbs", type=float, default=None, help="projection: intra-node bandwidth per rank, GB/s (e.g. NVLink)")
    p.add_argument("--intra-latency-us", type=float, default=None)
    p.add_argument("--inter-gbs", type=float, default=None, help="projection: inter-node bandwidth per rank, GB/s (e.g. InfiniBand)")
    p.add_argument("--inter-latency-us", type=float, default=None)
    args = p.parse_args(argv)
    if args.memory_classes is not None and args.memory_classes < 0:
        p.error(f"--memory-classes must be 0 (skip the table) or a positive class count, got {args.memory_classes}")
    if args.project and None in (args.intra_gbs, args.intra_latency_us, args.inter_gbs, args.inter_latency_us):
        p.error("--project needs the link parameters: --intra-gbs, --intra-latency-us, --inter-gbs, --inter-latency-us")
    return args


def settings_from(args, device: torch.device) -> scaling.BenchSettings:
    if args.quick:
        return scaling.BenchSettings(num_classes=args.num_classes or 2000, embedding_dim=32, batch_per_rank=16,
                                     warmup=1, steps=3)
    classes = args.num_classes or (FULL_CLASSES if device.type == "cuda" or args.full else CPU_DEFAULT_CLASSES)
    return scaling.BenchSettings(classes, args.embedding_dim, args.batch_per_rank, args.warmup, args.steps)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(choice)


def default_world_sizes(device: torch.device) -> list[int]:
    available = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    sizes, w = [], 1
    while w <= available:
        sizes.append(w)
        w *= 2
    return sizes


def _point_worker(rank: int, world: int, port: int, method: str, settings, device_type: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    _, device = parallel.init_distributed(device_type)
    try:
        point = scaling.measure_point(method, settings, device)
        if rank == 0:
            Path(out).write_text(json.dumps(point))
        comm.barrier()  # leave together: a rank tearing gloo down while a peer still talks can abort it
    finally:
        parallel.shutdown()
    _leave()


def _leave() -> None:
    """Exit a rank whose figures are on disk and whose process group is gone.

    Now and then (more often on a loaded machine) torch 2.13's CPU build aborts in its C++
    static destructors after Python has finished ("terminate called without an active
    exception", no Python frame on the stack), which would turn a measured point into a failed
    run: leave without running them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_point(method: str, settings, world: int, device: torch.device) -> dict:
    """Measure one point in `world` fresh processes (fresh, so the peak memory is the point's own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        mp.start_processes(_point_worker, args=(world, port, method, settings, device.type, str(out)),
                           nprocs=world, start_method="spawn")
        return json.loads(out.read_text())


def measure_memory(args, settings, device: torch.device) -> list[dict]:
    """Peak memory of one rank's head at --memory-classes local classes, for MEMORY_METHODS."""
    classes = args.memory_classes if args.memory_classes is not None else (20_000 if args.quick else FULL_CLASSES)
    if classes == 0:
        return []
    memory_settings = scaling.BenchSettings(classes, settings.embedding_dim, settings.batch_per_rank,
                                            warmup=1, steps=2, threads_per_rank=settings.threads_per_rank)
    rows = []
    for method in scaling.MEMORY_METHODS:
        point = spawn_point(method, memory_settings, 1, device)
        rows.append(scaling.memory_row(point))
        print(f"memory {method}, {classes:,} classes: peak {rows[-1]['peak_mib']:,.0f} MiB", flush=True)
    return rows


def report_memory(rows: list[dict], args, device: torch.device) -> None:
    if not rows:
        return
    table = scaling.memory_table(rows)
    print(table)
    where = "GPU memory allocated by torch" if device.type == "cuda" else "resident memory (RSS) of the process"
    text = "\n\n".join([
        "## Head memory at a million local classes (`make scaling-bench`)",
        f"One rank (W=1) holding {rows[0]['classes_per_rank']:,} classes, {args.embedding_dim}-d, "
        f"{rows[0]['global_batch']} images per step, SGD with momentum; peak {where} during the head's "
        f"forward, backward and optimizer step, above what the process held before the head was built. "
        f"Measured on {machine_description()}.",
        table,
        "Weights + momentum is the floor any SGD-with-momentum head needs. With the separate step the "
        "[C, D] weight gradient comes on top of it; the fused step forms each chunk's row gradient and steps "
        "those rows at once (`head.step: fused`), and bfloat16 storage halves the rest (`head.storage: bfloat16`).",
    ])
    if args.docs is not None:
        write_section(args.docs, "head-memory", text)
        print(f"wrote the head-memory section of {args.docs}")


# the throughput ratios reported: (numerator method, denominator method, what the ratio compares)
COMPARISONS = (
    ("sphereface2", "softmax", "SphereFace2 / softmax"),
    ("sphereface2_fstep", "softmax", "SphereFace2 with the fused step / softmax"),
    ("sphereface2_0.1", "partial_fc_0.1", "SphereFace2 at sample rate 0.1 / Partial FC 0.1"),
)


def report(points: list[dict], settings, args, note: str) -> None:
    paths = scaling.write_outputs(points, args.out_dir, settings, note)
    print(scaling.markdown_table(points))
    for numerator, denominator, name in COMPARISONS:
        for (world, kind), ratio in sorted(scaling.throughput_ratios(points, numerator, denominator).items()):
            print(f"{name} images/s at W={world} ({kind}): {ratio:.2f}x")
    print(note)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.docs is not None:
        png = args.docs.parent / "scaling.png"
        if png.resolve() != Path(paths["png"]).resolve():
            shutil.copyfile(paths["png"], png)
        ratios = []
        for numerator, denominator, name in COMPARISONS:
            found = sorted(scaling.throughput_ratios(points, numerator, denominator).items())
            if found:
                ratios.append(f"{name} images/s: " + ", ".join(
                    f"W={w}{'' if kind == 'measured' else ' (projected)'}: {r:.2f}x" for (w, kind), r in found) + ".")
        write_section(args.docs, "scaling", "\n\n".join([
            "## Classifier-layer scaling (`make scaling-bench`)",
            note, scaling.markdown_table(points), " ".join(ratios),
            "sphereface2_fstep is SphereFace2 with its SGD step fused into the forward (`head.step: fused`); "
            "the other methods run the head's optimizer step after the backward.",
            "Head efficiency = step time / the time of the step's three matmuls (cos, dE, dW) alone at the same "
            "shapes. The fused softmax needs a fourth (the logits again, after the all-reduced normaliser), so "
            "its floor is 4/3 of this one.",
            f"![scaling]({png.name})",
        ]))
        print(f"wrote {args.docs} and {png}")


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        scaling.parse_method(method)  # a typo fails here, before any process starts
    if args.collect is not None:
        files = sorted(args.collect.glob("points-w*.json"))
        if not files:
            raise SystemExit(f"--collect {args.collect}: no points-w*.json files there")
        runs = [json.loads(f.read_text()) for f in files]
        settings = scaling.BenchSettings(**runs[0]["settings"])
        points = [p for run in runs for p in run["points"]]
        report(points, settings, args, f"Collected from {len(files)} multi-node runs in {args.collect}.")
        return
    device = pick_device(args.device)
    settings = settings_from(args, device)
    if "WORLD_SIZE" in os.environ:  # under torchrun: measure this world size only
        info, device = parallel.init_distributed(device.type)
        try:
            points = [scaling.measure_point(method, settings, device) for method in methods]
            comm.barrier()  # leave together (see _point_worker)
        finally:
            parallel.shutdown()
        if info.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            out = args.out_dir / f"points-w{info.world_size}.json"
            out.write_text(json.dumps({"settings": settings.__dict__, "points": points}, indent=2))
            print(f"wrote {out}")
        _leave()
    world_sizes = [int(w) for w in args.world_sizes.split(",")] if args.world_sizes else default_world_sizes(device)
    if device.type == "cuda" and max(world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"--world-sizes {max(world_sizes)} exceeds the {torch.cuda.device_count()} GPU(s) here")
    points = []
    for world in world_sizes:
        for method in methods:
            point = spawn_point(method, settings, world, device)
            print(f"measured {method} W={world}: {point['step_ms']:.1f} ms/step, {point['images_per_s']:,.0f} images/s",
                  flush=True)
            points.append(point)
    if args.project:
        intra = scaling.Link(args.intra_gbs, args.intra_latency_us)
        inter = scaling.Link(args.inter_gbs, args.inter_latency_us)
        world = 1
        while world <= args.max_world:
            for method in methods:
                compute = scaling.measure_compute(method, settings, world, device)
                points.append(scaling.project(method, settings, world, compute, intra, inter, args.ranks_per_node))
            print(f"projected W={world}", flush=True)
            world *= 2
    scaled = "" if settings.num_classes >= FULL_CLASSES else (
        f" Scaled down from the paper's 1M identities to {settings.num_classes:,} so that it runs in minutes here;"
        " `--full` runs 1M.")
    note = (f"Measured on {machine_description()}; {points[0]['device']} per rank, backend "
            f"{'nccl' if device.type == 'cuda' else 'gloo'} for W>1; {settings.num_classes:,} identities, "
            f"{settings.embedding_dim}-d, {settings.batch_per_rank} images per rank, median of {settings.steps} steps "
            f"after {settings.warmup} warm-up.{scaled}")
    if args.project:
        note += (f" Projected points: compute measured here at each shard size, plus a ring model of each collective "
                 f"with {args.intra_gbs} GB/s / {args.intra_latency_us} us within {args.ranks_per_node} ranks and "
                 f"{args.inter_gbs} GB/s / {args.inter_latency_us} us beyond (given on the command line).")
    report(points, settings, args, note)
    report_memory(measure_memory(args, settings, device), args, device)


if __name__ == "__main__":
    main()
