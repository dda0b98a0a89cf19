"""`sf2dist-eval`: evaluate a checkpoint's backbone on benchmarks, print a table, write JSON + ROC.

    sf2dist-eval --checkpoint FILE | --run RUN_DIR  --benchmark FILE_OR_DIR... [--nproc N]
                 [--flip sum|concat|none]

With `--nproc N` the images of each benchmark are split over N local processes (gloo on
CPU, NCCL with one GPU each on CUDA); under torchrun the launcher's ranks are used instead.
Rank 0 prints and writes; every number is computed from the gathered embeddings.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sf2dist import __version__, parallel
from sf2dist.eval.checkpoint import backbone_factory, build_backbone, newest_checkpoint, read_checkpoint
from sf2dist.eval.evaluate import ExtractOptions, evaluate_benchmark
from sf2dist.eval.extract import FLIP_MODES
from sf2dist.eval.results import format_table, write_results
from sf2dist.report import machine_description


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sf2dist-eval", description=__doc__.split("\n")[0].split(": ", 1)[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a training checkpoint (.pt)")
    source.add_argument("--run", type=Path, help="a training run directory: evaluates its newest checkpoints/*.pt")
    parser.add_argument(
        "--benchmark",
        type=Path,
        nargs="+",
        required=True,
        help="InsightFace .bin files, synthetic held-out sets, 'label path0 path1' pair lists or IJB-style directories",
    )
    parser.add_argument("--nproc", type=int, default=1, help="local processes to split the images over (default 1)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass and rank (default 128)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument(
        "--workers", type=int, default=0, help="image-decoding processes per rank, worth it for IJB (default 0: in-line)"
    )
    parser.add_argument(
        "--flip",
        choices=FLIP_MODES,
        default="sum",
        help="flip-test fusion, f the backbone: sum = f(image) + f(mirror image); "
        "concat = [f(image), f(mirror image)], twice the width, as in the SphereFace LFW protocol; "
        "none = f(image) (default sum)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval/<checkpoint> or eval/<checkpoint>)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Fail in the launching process, before any rank starts, on what can be checked up front."""
    if args.nproc < 1 or args.batch_size < 1 or args.workers < 0:
        raise ValueError(
            f"--nproc ({args.nproc}) and --batch-size ({args.batch_size}) must be positive, --workers ({args.workers}) not negative"
        )
    for path in args.benchmark:
        if not path.exists():
            raise ValueError(f"benchmark {path} does not exist")
    names = [path.stem if path.is_file() else path.name for path in args.benchmark]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"benchmark names must differ (they key the results); repeated: {repeated}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    uses_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if uses_cuda and args.nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {args.nproc} needs as many GPUs; {torch.cuda.device_count()} are visible")
    read_checkpoint(args.checkpoint)  # a bad checkpoint or a missing registry fails here, once
    backbone_factory()


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """This rank's share of the evaluation; rank 0 prints the table and writes the results."""
    info, device = parallel.init_distributed(args.device)
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        model = build_backbone(checkpoint, device, source=str(args.checkpoint))
        options = ExtractOptions(batch_size=args.batch_size, flip=args.flip, device=device, num_workers=args.workers)
        results = []
        for path in args.benchmark:
            if info.is_main:
                print(f"evaluating {path} on {info.world_size} rank(s) ...", file=sys.stderr, flush=True)
            results.append(evaluate_benchmark(model, path, options))
        if info.is_main:
            print(format_table(results))
            context = {
                "checkpoint": str(args.checkpoint),
                "backbone": checkpoint["backbone"],
                "flip": options.flip,
                "world_size": info.world_size,
                "device": str(device),
                "machine": machine_description(),
                "sf2dist_version": __version__,
            }
            json_path, roc_path = write_results(results, args.out, context)
            print(f"wrote {json_path} and {roc_path}")
    finally:
        parallel.shutdown()


def _spawned_rank(local_rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(args.nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(args.nproc),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))  # ranks share the CPU
    try:
        evaluate_checkpoint(args)
    except ValueError as err:
        print(f"sf2dist-eval (rank {local_rank}): {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.run is not None:
            args.checkpoint = newest_checkpoint(args.run)
            print(f"evaluating {args.checkpoint}", file=sys.stderr)
        if args.out is None:
            base = args.run / "eval" if args.run is not None else Path("eval")
            args.out = base / (args.checkpoint.parent.name if args.checkpoint.name == "model.pt" else args.checkpoint.stem)
        _check_arguments(args)
        launched = parallel.discover()
        if launched.world_size > 1:  # under torchrun or srun: this process is one rank
            if args.nproc != 1:
                raise ValueError(f"--nproc {args.nproc} given inside a launcher that already started {launched.world_size} ranks")
            evaluate_checkpoint(args)
        elif args.nproc > 1:
            mp.spawn(_spawned_rank, args=(args, _free_port()), nprocs=args.nproc, join=True)
        else:
            evaluate_checkpoint(args)
    except ValueError as err:
        raise SystemExit(f"sf2dist-eval: {err}") from None
    except mp.ProcessExitedException as err:
        raise SystemExit(f"sf2dist-eval: a rank failed ({err}); its message is above") from None
