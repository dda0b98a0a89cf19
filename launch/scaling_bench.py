"""`make scaling-bench`: images/s of the classifier layer against world size, SphereFace2
beside the softmax baseline and Partial FC, measured in the same run at the same shapes.

Every method's head is built at once per world size and the methods are timed in interleaved
rounds (one step of each per round, in a rotating order, every rank behind a barrier); each
ratio between two methods is the median of the per-round ratios, printed with its IQR and a
bootstrap 90 % interval and whether that interval excludes 1.0. Peak memory is measured apart,
one method per fresh process.

Three ways to run it:
  python launch/scaling_bench.py [--world-sizes 1,2] ...   spawns the ranks itself for each
      world size on this machine (GPUs with NCCL where there are enough, else CPU with gloo);
  torchrun ... launch/scaling_bench.py --out-dir DIR        measures at torchrun's world size
      and writes DIR/points-w<W>.json (what launch/slurm/scaling_bench.sbatch runs per node count);
  python launch/scaling_bench.py --collect DIR              turns those point files into the outputs.
`--project` adds points up to --max-world from per-rank compute measured here at each shard
size C/W and a latency/bandwidth model of the collectives (labelled "projected" everywhere),
e.g. `--project --max-world 64 --intra h100-nvlink --inter ib-ndr` on GPUs. A GPU link preset
(NVLink, InfiniBand) over compute timed on a CPU is refused; `--force-project` writes such rows
anyway, labelled "projected, CPU compute".
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sf2dist import comm, parallel
from sf2dist.bench import scaling
from sf2dist.report import machine_description, write_section

CPU_DEFAULT_CLASSES = 100_000
FULL_CLASSES = 1_000_000
# the throughput ratios reported: (numerator method, denominator method, what the ratio compares)
COMPARISONS = (
    ("sphereface2", "softmax", "SphereFace2 / softmax"),
    ("sphereface2_fstep", "softmax", "SphereFace2 with the fused step / softmax"),
    ("sphereface2_0.1", "partial_fc_0.1", "SphereFace2 at sample rate 0.1 / Partial FC 0.1"),
)
LINK_CHOICES = (*scaling.LINK_PRESETS, scaling.MEASURED)
# the ratio table's columns with their definitions, written under it (as `scaling.TABLE_COLUMNS`)
RATIO_COLUMNS = (
    ("ratio", "images/s of the first method over images/s of the second; above 1.00 the first is faster."),
    ("W", "world size, as in the table above."),
    ("kind", "as in the table above; a ratio is taken between two points of the same kind."),
    ("median", "the median of the per-round ratios."),
    ("IQR", "the interquartile range of the per-round ratios."),
    (f"{100 * scaling.INTERVAL_LEVEL:.0f} % interval", "a percentile bootstrap interval of the median (5,000 "
     "resamples of the rounds, seed 0). For projected kinds it holds the spread of the timed compute only, not "
     "the error of the link model."),
    ("rounds", "timed rounds, pooled over the runs."),
    ("run to run", "min / median / max of each run's median with --repeat; – with one run."),
    ("verdict", "whether the interval excludes 1.0."),
)


def build_parser() -> argparse.ArgumentParser:
    """Every option states its default in its help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"identities in total (default {FULL_CLASSES:,} on GPUs, {CPU_DEFAULT_CLASSES:,} on CPU)")
    p.add_argument("--full", action="store_true",
                   help=f"use {FULL_CLASSES:,} identities on CPU too (default off; slow, and needs room for every "
                        "method's head at once)")
    p.add_argument("--embedding-dim", type=int, default=512, help="embedding width D (default 512)")
    p.add_argument("--batch-per-rank", type=int, default=128, help="images per rank per step (default 128)")
    p.add_argument("--warmup-rounds", "--warmup", dest="warmup", type=int, default=2,
                   help="untimed rounds before the timed ones, one step of every method each (default 2)")
    p.add_argument("--rounds", "--steps", dest="rounds", type=int, default=12,
                   help="timed rounds per world size, one step of every method each; ratios and their "
                        "intervals are taken over them, so use 10 or more (default 12)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole measurement this many times; the figures pool every run's rounds and each "
                        "ratio also shows the run-to-run spread of its run medians (default 1)")
    p.add_argument("--methods", default=",".join(scaling.METHODS),
                   help=f"comma-separated (default {','.join(scaling.METHODS)})")
    p.add_argument("--memory-classes", type=int, default=None,
                   help=f"the head-memory table: classes on one rank (default {FULL_CLASSES:,}; --quick 20,000; 0 skips it)")
    p.add_argument("--no-point-memory", action="store_true",
                   help="CPU: leave the table's peak MiB/rank column empty (default off: each measured point's peak "
                        "is measured apart, its method alone in fresh processes; on GPUs alone in the same ones)")
    p.add_argument("--world-sizes", default=None,
                   help="comma-separated (default 1, 2, 4, ... up to the GPUs or cores here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when visible, else CPU (default auto)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes for a smoke test (default off; 2,000 classes, 32-d, 16 images/rank, "
                        "1 warm-up round)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/scaling-bench"),
                   help="where the CSV, JSON and PNG go (default runs/scaling-bench)")
    p.add_argument("--docs", type=Path, default=None,
                   help="write the tables into this markdown file, e.g. docs/benchmarks.md (default: none)")
    p.add_argument("--collect", type=Path, default=None,
                   help="build the outputs from DIR/points-w*.json instead of measuring (default: measure)")
    p.add_argument("--project", action="store_true",
                   help="add projected points up to --max-world (default off); needs --intra and --inter, "
                        "or their -gbs and -latency-us numbers")
    p.add_argument("--force-project", action="store_true",
                   help="projection: accept a GPU link preset (NVLink, InfiniBand) over per-rank compute timed on a "
                        "CPU, refused without it; its rows are labelled \"projected, CPU compute\" (default off)")
    p.add_argument("--max-world", type=int, default=64, help="projection: the largest world size (default 64)")
    p.add_argument("--ranks-per-node", type=int, default=8,
                   help="projection: ranks sharing the intra-node link (default 8)")
    p.add_argument("--intra", choices=LINK_CHOICES, default=None,
                   help="projection: intra-node link preset (default: none). Nominal figures from vendor specs, "
                        "not measured; bandwidth per rank in one direction, latency an assumed figure per ring hop: "
                        + scaling.preset_help())
    p.add_argument("--inter", choices=LINK_CHOICES, default=None,
                   help="projection: inter-node link preset, same choices as --intra (default: none)")
    p.add_argument("--intra-gbs", type=float, default=None,
                   help="projection: intra-node bandwidth per rank, GB/s; replaces the preset's (default: the preset's)")
    p.add_argument("--intra-latency-us", type=float, default=None,
                   help="projection: intra-node latency per hop, us; replaces the preset's (default: the preset's)")
    p.add_argument("--inter-gbs", type=float, default=None,
                   help="projection: inter-node bandwidth per rank, GB/s; replaces the preset's (default: the preset's)")
    p.add_argument("--inter-latency-us", type=float, default=None,
                   help="projection: inter-node latency per hop, us; replaces the preset's (default: the preset's)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.memory_classes is not None and args.memory_classes < 0:
        p.error(f"--memory-classes must be 0 (skip the table) or a positive class count, got {args.memory_classes}")
    if args.rounds < 1 or args.warmup < 0 or args.repeat < 1:
        p.error(f"need --rounds >= 1, --warmup-rounds >= 0 and --repeat >= 1, got {args.rounds}, {args.warmup} "
                f"and {args.repeat}")
    for which in ("intra", "inter") if args.project else ():
        numbers = getattr(args, f"{which}_gbs"), getattr(args, f"{which}_latency_us")
        if getattr(args, which) is None and None in numbers:
            p.error(f"--project needs the {which}-node link: --{which} with one of {', '.join(LINK_CHOICES)}, "
                    f"or both --{which}-gbs and --{which}-latency-us")
    return args


def settings_from(args, device: torch.device) -> scaling.BenchSettings:
    if args.quick:
        return scaling.BenchSettings(num_classes=args.num_classes or 2000, embedding_dim=32, batch_per_rank=16,
                                     warmup=1, steps=args.rounds)
    classes = args.num_classes or (FULL_CLASSES if device.type == "cuda" or args.full else CPU_DEFAULT_CLASSES)
    return scaling.BenchSettings(classes, args.embedding_dim, args.batch_per_rank, args.warmup, args.rounds)


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


def check_room_for_heads(methods: list[str], settings, world_sizes: list[int], device: torch.device) -> None:
    """Interleaved rounds hold every method's head at once: refuse, before spawning, what cannot fit."""
    need = scaling.head_state_bytes(methods, settings.num_classes, settings.embedding_dim)
    if device.type == "cuda":
        need, where = need / min(world_sizes), f"on one GPU ({min(world_sizes)} rank(s) sharing the classes)"
        room = torch.cuda.get_device_properties(0).total_memory
    else:
        with open("/proc/meminfo") as f:
            room = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        where = "in this machine's available memory"
    if need > 0.8 * room:
        raise SystemExit(f"the rounds hold all {len(methods)} methods' heads at once: {need / 2**30:.1f} GiB of weights "
                         f"+ momentum at {settings.num_classes:,} classes, more than fits {where} "
                         f"({room / 2**30:.1f} GiB); pass fewer --methods (e.g. --methods sphereface2,softmax) "
                         "or fewer --num-classes")


def _rank_worker(rank: int, world: int, port: int, out: str, device_type: str, measure) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    _, device = parallel.init_distributed(device_type)
    try:
        result = measure(device=device)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
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


def spawn(measure, world: int, device: torch.device) -> dict:
    """Run `measure(device=...)` on `world` fresh processes; returns what rank 0 measured."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank_worker, args=(world, port, str(out), device.type, measure),
                           nprocs=world, start_method="spawn")
        return json.loads(out.read_text())


def measure_runs(methods, settings, world_sizes, repeat: int, device) -> tuple[list[list[dict]], list[dict]]:
    """`repeat` runs over the world sizes, each world size in fresh processes; (runs, timed collectives)."""
    runs, collectives = [], []
    for run in range(repeat):
        points = []
        for world in world_sizes:
            result = spawn(functools.partial(scaling.measure_world, methods, settings), world, device)
            for p in result["points"]:
                print(f"{'' if repeat == 1 else f'run {run + 1}: '}{p['method']} W={world}: {p['step_ms']:.1f} ms/step "
                      f"(IQR {p['step_ms_q1']:.1f}-{p['step_ms_q3']:.1f}), {p['images_per_s']:,.0f} images/s",
                      flush=True)
            points += result["points"]
            collectives += result["collectives"]
        runs.append(points)
    return runs, collectives


def add_point_memory(points: list[dict], settings, device: torch.device) -> None:
    """Peak memory per rank of each measured point on CPU: its method alone, in fresh processes."""
    memory_settings = dataclasses.replace(settings, warmup=1, steps=1)
    for p in points:
        if p["kind"] == "measured":
            point = spawn(functools.partial(scaling.measure_point, p["method"], memory_settings), p["world_size"], device)
            p["peak_mem_mib"] = point["peak_mem_mib"]
            print(f"memory {p['method']} W={p['world_size']}: peak {p['peak_mem_mib']:,.0f} MiB per rank", flush=True)


def project_points(args, methods, settings, device, collectives, kind: str) -> tuple[list[dict], str]:
    """Projected points of `kind` (`scaling.projection_kind`) from W=1 to --max-world and the sentence
    saying what they rest on."""
    measured = None
    if scaling.MEASURED in (args.intra, args.inter):
        try:
            measured = scaling.fit_link(collectives)
        except ValueError as error:
            raise SystemExit(f"--intra/--inter {scaling.MEASURED}: {error}") from None
        print(f"link fitted to the {len(collectives)} collectives timed: {measured.bandwidth_gbs:.3g} GB/s, "
              f"{measured.latency_us:.3g} us per hop", flush=True)
    links = {}
    for which in ("intra", "inter"):
        try:
            links[which] = scaling.resolve_link(which, getattr(args, which), getattr(args, f"{which}_gbs"),
                                                getattr(args, f"{which}_latency_us"), measured)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    points, world = [], 1
    while world <= args.max_world:
        compute = scaling.measure_compute_rounds(methods, settings, world, device)
        points += [scaling.project(m, settings, world, compute[m], links["intra"][0], links["inter"][0],
                                   args.ranks_per_node, kind) for m in methods]
        print(f"projected W={world}", flush=True)
        world *= 2
    described = [f"{which}-node {link.bandwidth_gbs:.3g} GB/s, {link.latency_us:.3g} us per hop ({source})"
                 for which, (link, source) in links.items()]
    note = (f"Projected points: one rank's compute measured here at each shard size C/W in interleaved rounds, "
            f"plus a ring model of each collective of the step; {described[0]} within {args.ranks_per_node} ranks, "
            f"{described[1]} beyond.")
    if kind == scaling.KIND_PROJECTED_CPU:
        note += (f" Forced ({scaling.FORCE_FLAG}): GPU links over compute timed on {device.type.upper()}, so the rows "
                 f"\"{kind}\" are the figures of no machine.")
    return points, note


def ratio_rows(points: list[dict], runs: list[list[dict]]) -> tuple[list[str], dict, list[dict]]:
    """Print every ratio with its spread; returns its markdown rows, the verdicts ({distinguishable:
    {ratio name: [where]}}) and the W=2 check of each projected ratio against the measured interval."""
    rows, verdicts, checks = [], {True: {}, False: {}}, []
    for numerator, denominator, name in COMPARISONS:
        spread = scaling.run_to_run(runs, numerator, denominator) if len(runs) > 1 else {}
        ratios = scaling.throughput_ratios(points, numerator, denominator)
        for (world, kind), summary in ratios.items():
            medians = spread.get((world, kind))
            print(scaling.describe_ratio(name, world, kind, summary, medians))
            verdicts[summary.distinguishable].setdefault(name, []).append(
                f"W={world}{'' if kind == scaling.KIND_MEASURED else f' ({kind})'}")
            run_to_run = (f"{min(medians):.2f} / {statistics.median(medians):.2f} / {max(medians):.2f}"
                          if medians and len(medians) > 1 else "–")
            rows.append(f"| {name} | {world} | {kind} | {summary.median:.2f}x | {summary.q1:.2f}–{summary.q3:.2f} | "
                        f"{summary.low:.2f}–{summary.high:.2f} | {summary.rounds} | {run_to_run} | "
                        f"{summary.verdict()} |")
        for (world, kind), projected in ratios.items():
            measured = ratios.get((2, scaling.KIND_MEASURED))
            if world != 2 or kind == scaling.KIND_MEASURED or measured is None:
                continue
            checks.append({"ratio": name, "world_size": 2, "kind": kind, "projected": projected.median,
                           "measured": measured.median, "measured_low": measured.low, "measured_high": measured.high,
                           "inside": measured.low <= projected.median <= measured.high})
    return rows, verdicts, checks


def check_line(check: dict) -> str:
    """One projection check (a method's step time or a ratio at W=2) in words."""
    where = "inside" if check["inside"] else "outside"
    if "ratio" in check:
        return (f"W=2 {check['ratio']}: {check['kind']} {check['projected']:.2f}x, measured {check['measured']:.2f}x "
                f"({100 * scaling.INTERVAL_LEVEL:.0f}% interval {check['measured_low']:.2f}–"
                f"{check['measured_high']:.2f}): {where} the measured interval")
    return (f"W=2 {check['method']}: {check['kind']} {check['projected_ms']:.1f} ms/step, "
            f"measured {check['measured_ms']:.1f} "
            f"(IQR {check['measured_q1']:.1f}–{check['measured_q3']:.1f}): {where} the measured IQR "
            f"({100 * check['error']:+.0f}%)")


def report(points, runs, settings, args, note: str, checks: list[dict], extra: dict) -> None:
    """Print the table, every ratio with its spread and the projection check; write the outputs and docs."""
    scaling.add_scaling_efficiency(points)
    print(scaling.markdown_table(points))
    rows, verdicts, ratio_checks = ratio_rows(points, runs)
    checks = checks + ratio_checks
    for check in checks:
        print("projection check " + check_line(check))
    print(note)
    paths = scaling.write_outputs(points, args.out_dir, settings, note, dict(extra, projection_check=checks))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.docs is None:
        return
    png = args.docs.parent / "scaling.png"
    if png.resolve() != Path(paths["png"]).resolve():
        shutil.copyfile(paths["png"], png)
    level = f"{100 * scaling.INTERVAL_LEVEL:.0f} %"
    sentences = []
    for distinguishable, words in ((True, "Distinguishable from 1.0 at this spread"),
                                   (False, "Not distinguishable from 1.0 at this spread")):
        if verdicts[distinguishable]:
            sentences.append(f"{words} (the {level} interval {'excludes' if distinguishable else 'includes'} 1.0): "
                             + "; ".join(f"{name} at {', '.join(where)}"
                                         for name, where in verdicts[distinguishable].items()) + ".")
    sections = [
        "## Classifier-layer scaling (`make scaling-bench`)", note, scaling.markdown_table(points),
        scaling.table_legend(points),
        f"Ratios of images/s, taken round by round (each round times one step of every method, so both sides of a "
        f"ratio share the machine's state) and summarised over the rounds: the median, the interquartile range of "
        f"the per-round ratios, and a bootstrap {level} interval of the median (5,000 resamples of the rounds, "
        f"seed 0)" + (f"; run to run: min / median / max of the {len(runs)} runs' medians." if len(runs) > 1 else "."),
        "| " + " | ".join(header for header, _ in RATIO_COLUMNS) + " |\n" + "|---" * len(RATIO_COLUMNS) + "|\n"
        + "\n".join(rows),
        "\n".join(["Columns:", "", *(f"- **{header}**: {text}" for header, text in RATIO_COLUMNS)]),
        " ".join(sentences),
    ]
    if checks:
        sections.append("Projection check: a measured world size projected like the others (one rank's compute "
                        "measured in one process at its shard size, collectives from the link model), against the "
                        "measured spread:\n\n" + "\n".join(f"- {check_line(check)}" for check in checks))
    sections += [
        "sphereface2_fstep is SphereFace2 with its SGD step fused into the forward (`head.step: fused`); "
        "the other methods run the head's optimizer step after the backward. Peak memory per rank is measured "
        "apart from the rounds: each method alone (on CPU in fresh processes), one warm-up and one timed step.",
        f"![scaling]({png.name})",
    ]
    write_section(args.docs, "scaling", "\n\n".join(sections))
    print(f"wrote {args.docs} and {png}")


def measure_memory(args, settings, device: torch.device) -> list[dict]:
    """Peak memory of one rank's head at --memory-classes local classes, for MEMORY_METHODS."""
    classes = args.memory_classes if args.memory_classes is not None else (20_000 if args.quick else FULL_CLASSES)
    if classes == 0:
        return []
    memory_settings = dataclasses.replace(settings, num_classes=classes, warmup=1, steps=2)
    rows = []
    for method in scaling.MEMORY_METHODS:
        point = spawn(functools.partial(scaling.measure_point, method, memory_settings), 1, device)
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
        scaling.memory_legend(),
        "Weights + momentum is the floor any SGD-with-momentum head needs. With the separate step the "
        "[C, D] weight gradient comes on top of it; the fused step forms each chunk's row gradient and steps "
        "those rows at once (`head.step: fused`), and bfloat16 storage halves the rest (`head.storage: bfloat16`).",
    ])
    if args.docs is not None:
        write_section(args.docs, "head-memory", text)
        print(f"wrote the head-memory section of {args.docs}")


def measure_under_torchrun(args, methods, settings, device) -> None:
    """This world size only (torchrun's); rank 0 writes OUT_DIR/points-w<W>.json."""
    info, device = parallel.init_distributed(device.type)
    try:
        runs, collectives = [], []
        for _ in range(args.repeat):
            result = scaling.measure_world(methods, settings, device)
            runs.append(result["points"])
            collectives += result["collectives"]
        comm.barrier()  # leave together (see _rank_worker)
    finally:
        parallel.shutdown()
    if info.is_main:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"points-w{info.world_size}.json"
        out.write_text(json.dumps({"settings": dataclasses.asdict(settings), "points": scaling.merge_runs(runs),
                                   "runs": runs, "collectives": collectives}, indent=1))
        print(f"wrote {out}")
    _leave()


def collect(args) -> None:
    files = sorted(args.collect.glob("points-w*.json"))
    if not files:
        raise SystemExit(f"--collect {args.collect}: no points-w*.json files there")
    found = [json.loads(f.read_text()) for f in files]
    if any("runs" not in data for data in found):
        raise SystemExit(f"--collect {args.collect}: a points file without per-round figures (written before "
                         "interleaved rounds); measure that world size again")
    settings = scaling.BenchSettings(**found[0]["settings"])
    runs = [[p for data in found if run < len(data["runs"]) for p in data["runs"][run]]
            for run in range(max(len(data["runs"]) for data in found))]
    note = (f"Collected from {len(files)} multi-node runs in {args.collect}; {settings.num_classes:,} identities, "
            f"{settings.embedding_dim}-d, {settings.batch_per_rank} images per rank, {settings.steps} interleaved "
            f"rounds after {settings.warmup} warm-up per world size.")
    report(scaling.merge_runs(runs), runs, settings, args, note, [],
           {"collectives": [c for data in found for c in data["collectives"]]})


def main(argv=None) -> None:
    args = parse_args(argv)
    command = " ".join(["launch/scaling_bench.py", *(sys.argv[1:] if argv is None else argv)])
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        scaling.parse_method(method)  # a typo fails here, before any process starts
    if args.collect is not None:
        return collect(args)
    device = pick_device(args.device)
    settings = settings_from(args, device)
    if "WORLD_SIZE" in os.environ:  # under torchrun: measure this world size only
        return measure_under_torchrun(args, methods, settings, device)
    world_sizes = [int(w) for w in args.world_sizes.split(",")] if args.world_sizes else default_world_sizes(device)
    if device.type == "cuda" and max(world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"--world-sizes {max(world_sizes)} exceeds the {torch.cuda.device_count()} GPU(s) here")
    if scaling.MEASURED in ((args.intra, args.inter) if args.project else ()) and max(world_sizes) < 2:
        raise SystemExit(f"--intra/--inter {scaling.MEASURED} fits the collectives timed at a world size above 1; "
                         f"--world-sizes {args.world_sizes} has none")
    projected_kind = None
    if args.project:  # before anything is measured
        try:
            projected_kind = scaling.projection_kind(args.intra, args.inter, device, args.force_project)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    check_room_for_heads(methods, settings, world_sizes, device)
    if settings.steps < 10:
        print(f"note: {settings.steps} rounds; the ratio intervals want 10 or more", flush=True)
    started = time.perf_counter()
    runs, collectives = measure_runs(methods, settings, world_sizes, args.repeat, device)
    points = scaling.merge_runs(runs)
    if device.type == "cpu" and not args.no_point_memory:  # (on CUDA, measure_world measured them)
        add_point_memory(points, settings, device)
    scaled = "" if settings.num_classes >= FULL_CLASSES else (
        f" Scaled down from the paper's 1M identities to {settings.num_classes:,} so that it runs in minutes here;"
        " `--full` runs 1M.")
    note = (f"Measured on {machine_description()}; {points[0]['device']} per rank, backend "
            f"{'nccl' if device.type == 'cuda' else 'gloo'} for W>1; {settings.num_classes:,} identities, "
            f"{settings.embedding_dim}-d, {settings.batch_per_rank} images per rank. Per world size, every method's "
            f"head is held at once and timed in {settings.steps} interleaved rounds after {settings.warmup} "
            f"warm-up round{'' if settings.warmup == 1 else 's'} (one step of each method per round, in a rotating balanced order, every step behind "
            f"a barrier; a step's time is the slowest rank's)"
            + (f", the whole measurement repeated {args.repeat} times and the rounds pooled" if args.repeat > 1 else "")
            + f".{scaled}")
    checks, extra = [], {"collectives": collectives, "runs": runs}
    if args.project:
        projected, projection_note = project_points(args, methods, settings, device, collectives, projected_kind)
        points += projected
        checks = scaling.projection_check(points)
        note += " " + projection_note
    note += f" Command: `{command}`; {(time.perf_counter() - started) / 60:.1f} min."
    report(points, runs, settings, args, note, checks, extra)
    report_memory(measure_memory(args, settings, device), args, device)


if __name__ == "__main__":
    main()
