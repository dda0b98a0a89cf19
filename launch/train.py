"""Train a face-recognition model with an identity-sharded classifier.

    torchrun --nproc_per_node=8 launch/train.py --config configs/ms1mv3_r100_sf2.yaml
    torchrun --nproc_per_node=2 launch/train.py --config configs/demo_cpu.yaml --set run.epochs=2
    srun ... launch/train.py ...          (see launch/slurm/train.sbatch)
    python launch/train.py --config configs/demo_cpu.yaml --print-config   (check, do not train)

Several --config files compose (later wins); --set section.key=value overrides any key. Every
key, with its type, default and meaning, is listed in docs/config.md.
A run directory that already holds checkpoints resumes from the newest (run.resume); a resume
that changes a setting other than the resume-safe ones (run.max_steps, run.epochs, logging,
evaluation, ...: docs/config.md) is refused unless --allow-config-change names it.
SIGTERM or SIGUSR1, from the first moment: every rank finishes its step, a checkpoint is
written, status.json says "preempted" and the process exits with status 75.
Ctrl-C (SIGINT) the same, but status.json says "interrupted" (never requeued) and the exit status
is 130; a second Ctrl-C aborts at once, leaving the previous complete checkpoint. torchrun forwards
a SIGINT to the ranks and kills them after its --shutdown-timeout (default 30 s): give a run whose
step and checkpoint take longer a larger one, e.g. torchrun --shutdown-timeout=300 ...

Exit status, of each rank (torchrun itself exits 1 when any rank fails; `python -m sf2dist.launcher`
exits 2 or 75 as the ranks did, with one line instead of torchrun's failure report):
  0   done (trained to the end, or nothing left to train; --print-config: the config and data are sound)
  1   failed after training started: an evaluation that failed (its step is checkpointed), too many
      non-finite steps, a collective time-out; the newest checkpoint resumes the run. Also any
      unexpected error (with a traceback: please report it)
  2   config, data or checkpoint error (or a usage error), found before the first step; the message says
      what to change. A usage or config error is the same on every rank: only local rank 0 prints it, the
      other ranks exit 2 without a word
  75  preempted (a stop signal, SIGTERM or SIGUSR1): checkpoint written, rerun the same command to resume
      (under launch/slurm/train.sbatch the batch script says whether it requeued the job)
  130 interrupted (Ctrl-C): checkpoint written, rerun the same command to resume; a second Ctrl-C
      aborts without one
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

from sf2dist import stop


class _Parser(argparse.ArgumentParser):
    """argparse, but a rank that is not local rank 0 exits 2 without repeating the usage message."""

    quiet = False

    def error(self, message: str):
        if self.quiet:
            self.exit(2)
        super().error(message)


def _parser(quiet: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.quiet = quiet
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file; repeatable, later files win (default: none, every key at its "
                             "default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key after the files, e.g. --set optim.lr=0.05; repeatable "
                             "(default: none)")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY[,KEY...]",
                        help="let a resume change these keys from the checkpoint's config, e.g. "
                             "--allow-config-change data.batch_size; repeatable or comma-separated (default: none; "
                             "the resume-safe keys of docs/config.md need no permission)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the start-up summary as YAML, check the data, every "
                             "benchmark and the run directory's checkpoint, and exit without training: status 0 if "
                             "all is sound, 2 with the problem otherwise (default: off, train)")
    return parser


def main(argv: list[str] | None = None) -> int:
    installed = stop.install()  # before the imports below: a stop request while the job starts is not lost
    status = _main(argv)
    if installed and status not in (stop.EXIT_PREEMPTED, stop.EXIT_INTERRUPTED):
        stop.uninstall()  # called in-process (a test, a notebook): Ctrl-C works as before afterwards
    return status


def _main(argv: list[str] | None) -> int:
    from sf2dist import parallel
    from sf2dist.config import ConfigError, batch_plan, check_keys, resolve_config

    info = parallel.discover()
    # Every rank reads the same command line and config and finds the same mistake: one line per
    # host (local rank 0) says it, before any process group exists.
    says = info.local_rank == 0
    args = _parser(quiet=not says).parse_args(argv)
    try:
        resolved = resolve_config(args.config, args.overrides)
        allowed = check_keys(args.allow_config_change, "--allow-config-change")
    except ConfigError as err:
        _config_error(err, says)
        return 2
    cfg = resolved.config
    if cfg.engine.type == "deepspeed" and info.source == "single" and not args.print_config:
        given = shlex.join(sys.argv[1:] if argv is None else argv)
        print(f"train.py: engine.type deepspeed needs a process group, even on one GPU, and this process was "
              f"started without torchrun or srun. Start it with torchrun:\n"
              f"  torchrun --nproc_per_node=NUM_GPUS launch/train.py {given}\n"
              f"or train without DeepSpeed: --set engine.type=ddp", file=sys.stderr)
        return 2

    # torch and the rest load after the config is known to be sound
    from sf2dist.data import ShardReadError
    from sf2dist.train import Trainer
    from sf2dist.train.trainer import (BadStepsError, EvaluationError, check_backbone, check_settings, headline,
                                       resume_point)

    try:  # what needs no data read: the backbone's arguments, data.train set, the benchmarks there, the batch split
        check_backbone(cfg, resolved.sources)
        check_settings(cfg)
        batch_plan(cfg, info.world_size)
    except ValueError as err:
        _config_error(err, says)
        return 2
    try:  # the run directory, which every rank reads alike: an earlier run's outputs without a checkpoint
        resume_point(cfg, allowed)
    except ValueError as err:
        if says:
            print(f"train.py: {err}", file=sys.stderr, flush=True)
        return 2
    if args.print_config:
        stop.uninstall()  # nothing to checkpoint: Ctrl-C stops the check at once
        return _print_config(resolved, allowed, info.rank)
    try:
        trainer = Trainer(cfg, allow_config_change=allowed, warnings=resolved.warnings)
        summary = trainer.run()
    except ValueError as err:  # bad data, labels, checkpoints: the message says what and where
        print(f"train.py (rank {info.rank}): {err}", file=sys.stderr, flush=True)
        return 2
    except (EvaluationError, BadStepsError) as err:
        print(f"train.py (rank {info.rank}): {err}", file=sys.stderr, flush=True)
        if err.__cause__ is not None:  # what failed inside the evaluation, for a bug report
            traceback.print_exception(err.__cause__, file=sys.stderr)
        return 1
    except ShardReadError as err:  # a streamed shard that could not be read, retries spent: its URL and why
        print(f"train.py (rank {info.rank}): {err}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:
        lost = parallel.lost_peer(str(err), cfg.run.timeout_s)
        if lost is None:
            raise
        from sf2dist.train.checkpoint import checkpoint_dirs

        newest = checkpoint_dirs(cfg.run.dir)[-1:]
        resume = (f"the newest checkpoint, {newest[0]}, resumes it on any number of ranks" if newest
                  else f"no checkpoint was written yet in {cfg.run.dir}/checkpoints")
        print(f"train.py (rank {info.rank}): {lost}. Training stops here; {resume}. ({err})",
              file=sys.stderr, flush=True)
        if "SLURM_JOB_ID" in os.environ and info.local_rank == 0:  # the script may not live to say it
            from sf2dist.slurm import lost_peer_advice

            print(f"train.py (rank {info.rank}): {lost_peer_advice(os.environ)}", file=sys.stderr, flush=True)
        return 1
    finally:
        parallel.shutdown()
    if summary["interrupted"]:
        stop.ignore()
        return stop.EXIT_INTERRUPTED
    if summary["preempted"]:
        stop.ignore()
        return stop.EXIT_PREEMPTED
    if trainer.rank == 0:
        for name, metrics in summary["eval"].items():
            print(f"{name}: {headline(metrics)}")
        if "plot" in summary:
            print(f"plot: {summary['plot']}")
        print(f"run directory: {cfg.run.dir} ({summary['step']} steps, {summary['skipped_steps']} skipped)")
    return 0


def _config_error(err: Exception, says: bool) -> None:
    if says:
        print(f"train.py: config error: {err}", file=sys.stderr, flush=True)


def _print_config(resolved, allowed: list[str], rank: int) -> int:
    """--print-config: the resolved config on stdout as YAML, the summary as YAML comments after it."""
    import yaml

    from sf2dist.config import config_to_dict
    from sf2dist.train.trainer import check_run

    if rank != 0:  # under a launcher every rank would print the same
        return 0
    print(yaml.safe_dump(config_to_dict(resolved.config), sort_keys=False), end="", flush=True)
    try:
        lines = check_run(resolved.config, allowed, resolved.warnings)
    except ValueError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    print("# checked: the data, every benchmark and the run directory; nothing was trained")
    print("\n".join(f"# {line}" for line in lines))
    return 0


if __name__ == "__main__":
    # Each line in one write, when it is printed: under a launcher every rank and torchrun write to
    # the same terminal or log. Unbuffered (PYTHONUNBUFFERED, as in docker/Dockerfile) a print is two
    # writes, its text and then its newline, and two ranks' lines run together; block-buffered (a
    # pipe, a file) stdout comes out in 8 KiB pieces, mid-line, long after it was printed.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=False)
    sys.exit(main())
