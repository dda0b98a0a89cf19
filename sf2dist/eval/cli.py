"""`sf2dist-eval`: evaluate a checkpoint's backbone on benchmarks, print a table, write JSON + ROC.

    sf2dist-eval --checkpoint RUN_DIR/checkpoints/step_N | --run RUN_DIR  [--benchmark FILE_OR_DIR...]
                 [--nproc N] [--flip sum|concat|none] [--out DIR]
    sf2dist-eval --backbone-weights backbone.pth --backbone NAME [--embedding-dim N] [--image-size N]
                 --benchmark FILE_OR_DIR... [--nproc N] [--flip sum|concat|none] [--out DIR]

Without `--benchmark`, the benchmarks the checkpoint's run evaluated (its config's
`eval.benchmarks`, stored in the checkpoint) are used. Results go to RUN_DIR/eval/step_N/ for
a checkpoint of a run (else beside the checkpoint, in eval/NAME/), never the current directory:
results.json, which keeps one result per benchmark and flip test over every evaluation of the
checkpoint written there (`sf2dist.eval.results`), and roc-FLIP.png. A folder whose results.json
is broken or holds another checkpoint's results is refused before anything is evaluated.
A weight file (a bare state_dict such as arcface_torch's backbone.pth, read by
`sf2dist.models.load_backbone_weights`) is evaluated as network NAME at --image-size (default
112) on the --benchmark sets, with flip sum unless --flip says otherwise; its results go beside
it, to eval/STEM/ (backbone.pth: eval/backbone/), as a checkpoint's outside a run, and record
the file and the network ("checkpoint", "backbone"; "step" null).
With `--nproc N` the images of each benchmark are split over N local processes (gloo on
CPU, NCCL with one GPU each on CUDA); under torchrun the launcher's ranks are used instead.
Rank 0 prints and writes; every number is computed from the gathered embeddings. User errors
end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sf2dist import __version__, parallel
from sf2dist.eval.checkpoint import (
    add_checkpoint_arguments,
    backbone_factory,
    build_backbone,
    check_weights_arguments,
    checkpoint_file,
    checkpoint_image_size,
    checkpoint_name,
    checkpoint_step,
    newest_checkpoint,
    read_checkpoint,
    run_of_checkpoint,
    weights_backbone,
)
from sf2dist.eval.evaluate import ExtractOptions, evaluate_prepared, prepare_benchmark
from sf2dist.eval.extract import FLIP_MODES
from sf2dist.eval.results import format_table, read_results, write_results
from sf2dist.report import machine_description

WEIGHTS_IMAGE_SIZE = 112  # --backbone-weights: the faces arcface_torch's networks are trained on


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sf2dist-eval", description=__doc__.split("\n")[0].split(": ", 1)[1])
    add_checkpoint_arguments(parser, "evaluates")
    parser.add_argument(
        "--benchmark",
        type=Path,
        nargs="+",
        metavar="FILE_OR_DIR",
        help="InsightFace .bin files, synthetic held-out sets, 'label path0 path1' pair lists or IJB-style directories "
        "(default: the run's own eval.benchmarks, from the config stored in the checkpoint)",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="local processes to split the images over (default 1)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, metavar="N", help="images per forward pass and rank (default 128)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where the backbone runs (default: cuda when torch sees a GPU, else cpu)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="image-decoding processes per rank, worth it for IJB (default 0: in-line)",
    )
    parser.add_argument(
        "--flip",
        choices=FLIP_MODES,
        default=None,
        help="flip-test fusion, f the backbone: sum = f(image) + f(mirror image); "
        "concat = [f(image), f(mirror image)], twice the width, as in the SphereFace LFW protocol; "
        "none = f(image) (default: the run's eval.flip as the checkpoint records it, else sum)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder for results.json and roc-FLIP.png, added to when it holds this checkpoint's results "
        "(default: RUN_DIR/eval/step_N for a checkpoint of a run, else eval/NAME beside the checkpoint or weight "
        "file)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help=f"with --backbone-weights: the height and width of the faces the network is built for (default "
        f"{WEIGHTS_IMAGE_SIZE}); a checkpoint's backbone takes the size it was trained at",
    )
    return parser


def _resolve(args: argparse.Namespace) -> None:
    """Fill in what the arguments leave to the checkpoint: its file, benchmarks and output folder.

    The checkpoint is read here, so that a bad one fails once, before any rank starts.
    """
    check_weights_arguments(args)
    if args.backbone_weights is not None:
        _resolve_weights(args)
        return
    if args.image_size is not None:
        raise ValueError("--image-size applies to --backbone-weights only: a checkpoint's backbone takes the size it "
                         "was trained at")
    if args.run is not None:
        args.checkpoint = newest_checkpoint(args.run)
        print(f"evaluating {args.checkpoint}", file=sys.stderr)
    args.checkpoint = checkpoint_file(args.checkpoint)
    checkpoint = read_checkpoint(args.checkpoint)
    config = checkpoint.get("config")
    if args.flip is None:  # the run's own flip test, so that its numbers reproduce
        stored_flip = config.get("eval", {}).get("flip") if isinstance(config, dict) else None
        args.flip = stored_flip if stored_flip in FLIP_MODES else "sum"
    if args.benchmark is None:
        stored = config.get("eval", {}).get("benchmarks") if isinstance(config, dict) else None
        if not stored:
            raise ValueError(
                f"no --benchmark given, and {args.checkpoint} records no eval.benchmarks of its run to use instead; "
                "pass --benchmark FILE_OR_DIR..."
            )
        args.benchmark = [Path(path) for path in stored]
        for path in args.benchmark:
            if not path.exists():
                raise ValueError(
                    f"benchmark {path} (the run's eval.benchmarks, stored in {args.checkpoint}) does not exist from "
                    f"{Path.cwd()}; pass --benchmark with where it is now"
                )
        print(f"benchmarks from the run's eval.benchmarks: {' '.join(map(str, args.benchmark))}", file=sys.stderr)
    if args.out is None:
        run = run_of_checkpoint(args.checkpoint)
        base = run / "eval" if run is not None else args.checkpoint.parent / "eval"
        args.out = base / checkpoint_name(args.checkpoint)
    read_results(args.out, evaluated_checkpoint(args.checkpoint, checkpoint))  # refused here, not after the work


def _resolve_weights(args: argparse.Namespace) -> None:
    """`_resolve` for --backbone-weights: the file is loaded here too, so that a mismatch fails once, before
    any rank starts; `args.checkpoint` is its file and `args.weights_spec` the network it is read into."""
    if args.benchmark is None:
        raise ValueError(f"--backbone-weights {args.backbone_weights} records no benchmarks to evaluate on; pass "
                         "--benchmark FILE_OR_DIR...")
    if args.image_size is None:
        args.image_size = WEIGHTS_IMAGE_SIZE
    if args.image_size < 1:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")
    from sf2dist.models import backbone_spec  # the registry, imported where it is used (see backbone_factory)

    path = args.backbone_weights
    args.checkpoint = checkpoint_file(path) if path.is_dir() else path  # what names the results
    args.weights_spec = backbone_spec(weights_backbone(args, args.image_size))
    if args.flip is None:
        args.flip = "sum"
    if args.out is None:
        run = run_of_checkpoint(args.checkpoint)
        base = run / "eval" if run is not None else args.checkpoint.parent / "eval"
        args.out = base / checkpoint_name(args.checkpoint)
    read_results(args.out, evaluated_checkpoint(args.checkpoint, {"backbone": args.weights_spec}))


def evaluated_checkpoint(path: Path, checkpoint: dict) -> dict:
    """What results.json says its results are of: the checkpoint's file, step and backbone."""
    step, backbone = checkpoint_step(checkpoint), checkpoint.get("backbone")
    return {"checkpoint": str(path.absolute()), "step": step, "backbone": backbone}


def roc_title(path: Path, checkpoint: dict, flip: str) -> str:
    """What roc-FLIP.png is of: "run NAME, step N, flip MODE" (the checkpoint's name where it is not in a run)."""
    run, step = run_of_checkpoint(path), checkpoint_step(checkpoint)
    parts = [f"run {run.name}" if run is not None else checkpoint_name(path)]
    if step is not None:
        parts.append(f"step {step}")
    elif run is not None:
        parts.append(checkpoint_name(path))
    return ", ".join([*parts, f"flip {flip}"])


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
    backbone_factory()  # a missing registry fails here, once


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """This rank's share of the evaluation; rank 0 prints the table and writes the results."""
    info, device = parallel.init_distributed(args.device)
    try:
        if args.backbone_weights is not None:  # a bare weight file: what the results record of it, as of a checkpoint
            checkpoint = {"backbone": args.weights_spec}
            model = weights_backbone(args, args.image_size).to(device)
        else:
            checkpoint = read_checkpoint(args.checkpoint)
            model = build_backbone(checkpoint, device, source=str(args.checkpoint))
        options = ExtractOptions(batch_size=args.batch_size, flip=args.flip, device=device, num_workers=args.workers)
        size = checkpoint_image_size(checkpoint)  # a benchmark of another size fails on its first image
        results = []
        for path in args.benchmark:
            if info.is_main:
                print(f"evaluating {path} on {info.world_size} rank(s) ...", file=sys.stderr, flush=True)
            prepared = prepare_benchmark(path, info.rank, info.world_size, None if size is None else (size, size))
            results.append(evaluate_prepared(model, prepared, options))
        if info.is_main:
            print(format_table(results))
            context = {
                "world_size": info.world_size,
                "device": str(device),
                "machine": machine_description(),
                "sf2dist_version": __version__,
                "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            title = roc_title(args.checkpoint, checkpoint, options.flip)
            evaluated = evaluated_checkpoint(args.checkpoint, checkpoint)
            written = write_results(results, args.out, evaluated, options.flip, context, title)
            for name, when in written.replaced.items():
                print(f"replaced the earlier result of {name} (flip {options.flip}) from {when}")
            print(written.summary())
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
        _resolve(args)
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
        print(f"sf2dist-eval: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever raised it
        raise SystemExit(2) from None
    except mp.ProcessExitedException as err:
        raise SystemExit(f"sf2dist-eval: a rank failed ({err}); its message is above") from None


if __name__ == "__main__":
    main()
