"""Does SphereFace2 beat softmax? The paper's loss comparison, ablation and label-noise experiments.

    python launch/reproduce.py                                  # make reproduce: the CPU profile, all three
    python launch/reproduce.py --experiment losses --seeds 0,1,2,3,4
    python launch/reproduce.py --profile quick                  # the former CPU profile: ~45 min, under-trained
    python launch/reproduce.py --profile paper --jobs 2         # SFNet-20 on VGGFace2, 2 runs of 4 GPUs at a time

For each experiment (sf2dist/reproduce/plan.py) every row's hyper-parameters are chosen on
the validation identities with the first seed, then the chosen setting is trained with every
seed and evaluated on the test identities. Every training also evaluates the seen pairs
(its own training identities) and its curves are kept, so each experiment's convergence table
and plot show how far its runs trained. Each training is `launch/train.py` in a
subprocess; `--out` (runs/reproduce) keeps every run and results.json, and re-running the
same command skips what is finished. Tables and plots (`E.png`, `E_convergence.png`) go to
`--out`; the published run (`--profile cpu`, `--out runs/reproduce`: make reproduce) also
rewrites its experiment's section of docs/results.md, and any other run writes a page only
when given `--docs FILE`.

Exit status: 0 when every row has test numbers, 1 when a run failed (the others are kept;
re-running retries it), 2 for a plan or data error.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


# The run whose tables docs/results.md publishes (make reproduce)
PUBLISHED_PROFILE, PUBLISHED_OUT, PUBLISHED_DOCS = "cpu", Path("runs/reproduce"), Path("docs/results.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("losses", "ablation", "noise", "all"), default="all",
                        help="which experiment to run (default all: losses, ablation, noise in that order)")
    parser.add_argument("--profile", default="cpu",
                        help="cpu, quick, paper, tiny (configs/reproduce/<profile>.yaml) or a plan file "
                             "(default cpu)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"),
                        help="runs and results.json (default runs/reproduce)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the profile's); the first "
                                                     "chooses the hyper-parameters")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the profile's; on a multi-GPU node each "
                                                 "gets its own GPUs from the profile's devices)")
    parser.add_argument("--nproc", type=int, help="ranks per run (default: the profile's; >1 uses torchrun)")
    parser.add_argument("--data", help="where the profile's open-set benchmark is (generated when missing)")
    parser.add_argument("--docs", type=Path,
                        help=f"results page whose sections are rewritten (default: {PUBLISHED_DOCS} for the published "
                             f"run, --profile {PUBLISHED_PROFILE} with --out {PUBLISHED_OUT}; other profiles and "
                             "outputs write no page unless given one)")
    parser.add_argument("--no-docs", action="store_true", help="leave the results page alone")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs that would start now")
    return parser


def docs_page(args: argparse.Namespace) -> Path | None:
    """The results page this invocation rewrites: the published one only for the published run
    (a throw-away profile or output never overwrites it), another only when named."""
    if args.no_docs:
        return None
    if args.docs is not None:
        return args.docs
    if args.profile == PUBLISHED_PROFILE and args.out == PUBLISHED_OUT:
        return PUBLISHED_DOCS
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    docs = docs_page(args)
    from sf2dist.data import openset, read_manifest
    from sf2dist.data.shards import ShardFormatError
    from sf2dist.report import machine_description
    from sf2dist.reproduce import EXPERIMENTS, PlanError, Reproduction, build_experiments, load_plan, report
    from sf2dist.reproduce.runner import SubprocessExecutor

    try:
        plan = load_plan(args.profile, data_root=args.data, seeds=args.seeds, jobs=args.jobs, nproc=args.nproc)
        if plan.openset is not None and not openset.is_generated(plan.data_root, plan.openset):
            if args.dry_run:
                print(f"# would generate the open-set benchmark into {plan.data_root} first")
            else:
                print(f"generating the open-set benchmark into {plan.data_root} ...", flush=True)
                openset.generate(plan.data_root, plan.openset, workers=os.cpu_count() or 1, overwrite=True,
                                 progress=True)
        if args.dry_run and plan.openset is not None and not Path(plan.train).exists():
            num_classes = plan.openset.train_identities
        else:
            missing = [path for path in (*plan.val, *plan.seen, *plan.test) if not Path(path).exists()]
            if missing:
                raise PlanError(f"benchmarks of {plan.path} not found: {', '.join(missing)}")
            num_classes = read_manifest(plan.train).num_classes
        experiments = build_experiments(plan, num_classes)
        reproduction = Reproduction(plan, experiments, args.out)
    except (PlanError, ShardFormatError, ValueError) as err:
        print(f"reproduce.py: {err}", file=sys.stderr)
        return 2

    chosen = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    command = shlex.join(["python", "launch/reproduce.py", *argv])
    machine = machine_description()
    if docs is None and not args.no_docs and not args.dry_run:
        print(f"{PUBLISHED_DOCS} is left alone: only --profile {PUBLISHED_PROFILE} with --out {PUBLISHED_OUT} rewrites "
              f"it; pass --docs FILE to write this run's tables to a page", flush=True)
    if docs is not None and not args.dry_run:
        report.write_setup(plan, docs, command=command, machine=machine)
    status = 0
    for name in chosen:
        experiment = experiments[name]
        if args.dry_run:
            executor = SubprocessExecutor(plan)
            for task in reproduction.pending(name):
                run_dir = reproduction.run_dir(task.run)
                if task.train:
                    print(shlex.join(executor.train_command(task.run, run_dir)))
                if task.test:
                    print(shlex.join(executor.test_command(task.run, run_dir)))
            continue
        print(f"== {experiment.title}", flush=True)
        try:
            outcome = reproduction.run(name, command=argv)
        except PlanError as err:
            print(f"reproduce.py: {err}", file=sys.stderr)
            return 2
        results = reproduction.store.data
        summaries = report.summarize(results, experiment)
        report.plot(summaries, experiment, args.out / f"{name}.png")
        trained = report.convergence(results, experiment)
        report.plot_convergence(trained, experiment, args.out / f"{name}_convergence.png")
        print(report.TABLES[name](summaries, experiment))
        print(report.convergence_table(trained, experiment))
        if docs is not None:
            report.write_docs(results, experiment, docs, command=command, machine=machine)
        print(f"{name}: {outcome.wall_seconds / 60:.1f} min, {outcome.trained} trained, {outcome.tested} tested; "
              f"results in {args.out / 'results.json'}, plots {args.out / f'{name}.png'} and "
              f"{args.out / f'{name}_convergence.png'}", flush=True)
        if outcome.failed or outcome.undecided:
            print(f"{name}: failed runs {outcome.failed}, rows without test numbers {outcome.undecided}; their logs "
                  f"are RUN_DIR/reproduce-*.log; re-running retries them", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
