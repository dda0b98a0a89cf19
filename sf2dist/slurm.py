"""The decisions launch/slurm/train.sbatch takes in Python: may this job start, and requeue it?

    python -m sf2dist.slurm prepare CONFIG [--config FILE] [--set key=value ...] [--allow-config-change KEYS]
                                                                    prints the run directory
    python -m sf2dist.slurm requeue RUN_DIR [--cancelled SIGNAL]    exit 0: requeue, 75: stopped with a
                                                                    checkpoint, not requeued, 1: do not

`prepare` runs once on the batch node before any rank starts, so that a job that cannot work
fails at once with the reason in its log (and is not requeued): a config error, missing data
or evaluation files, a config that wants CUDA where torch sees none, or a resume that would
change settings of the run in RUN_DIR (unless `--allow-config-change` names them, as for
launch/train.py).

`requeue` says yes only when RUN_DIR/status.json says "preempted" and was written by this
very job and restart (SLURM_JOB_ID, SLURM_RESTART_COUNT): the ranks write that state last,
after the checkpoint is complete. A crash, a config error, a finished run or a status left by
an earlier restart never requeues, so a failing job cannot loop. `--cancelled SIGNAL`: the
batch script itself got SIGNAL (SIGTERM: a plain scancel, the time limit itself, a preemption
that cancels), so a preempted run is not requeued either: a user's scancel must cancel. Its
one line on stderr is the log's only word on what happens next.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sf2dist.config import Config, ConfigError, check_keys, load_config
from sf2dist.stop import EXIT_PREEMPTED


class NotReady(ValueError):
    """The job cannot start; the message says why and what to change."""


def _check_train_data(cfg: Config) -> None:
    """data.train: a shard directory with its manifest, or shards to stream whose manifest can be fetched."""
    train = cfg.data.train
    if train and not Path(train).is_dir():
        from sf2dist.data.stream import ShardReadError, is_stream_source, train_manifest

        if is_stream_source(train):
            try:
                train_manifest(train, cfg.data.manifest or None, retries=cfg.data.retries)
            except (ValueError, ShardReadError) as err:
                raise NotReady(f"data.train={train!r}: {err}") from None
            return
    if not train or not (Path(train) / "manifest.json").is_file():
        why = "convert the data first (sf2dist-convert) or point data.train at a shard directory"
        if train:
            from sf2dist.data.shards import ShardFormatError, read_manifest

            try:  # says what the directory is instead: raw images, a synth root, an unfinished conversion
                read_manifest(train)
            except ShardFormatError as err:
                why = str(err)
        raise NotReady(f"data.train={train!r}: no manifest.json there: {why}")


def check_ready(cfg: Config, cuda_available: bool | None = None) -> None:
    """Refuse a job that would fail after it got its nodes, or silently train on the CPU."""
    _check_train_data(cfg)
    missing = [str(p) for p in cfg.eval.benchmarks if not Path(p).exists()]
    if missing:
        raise NotReady(f"eval.benchmarks: {', '.join(missing)} not found")
    if cfg.engine.device == "cpu":
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise NotReady(
            f"engine.device={cfg.engine.device} wants CUDA, but the torch in {sys.prefix} sees no GPU here "
            f"(torch {_torch_version()}). Install a CUDA build of torch into the venv (make install TORCH=cu126), "
            "request GPUs (--gpus-per-node), or set engine.device=cpu to train on CPUs on purpose")


def check_resume(cfg: Config, allow_config_change: list[str]) -> None:
    """NotReady when the ranks would refuse to resume RUN_DIR (changed settings, run.resume=false over a run)."""
    from sf2dist.train.trainer import resume_point  # torch: only once the config is known to be sound

    try:
        resume_point(cfg, allow_config_change).check()
    except ValueError as err:
        raise NotReady(str(err)) from None


def _torch_version() -> str:
    import torch

    return torch.__version__


def should_requeue(run_dir: Path, env: dict | None = None, cancelled: str | None = None) -> tuple[bool, str]:
    """(requeue?, why) from RUN_DIR/status.json and this job's SLURM_JOB_ID / SLURM_RESTART_COUNT;
    `cancelled`: the signal the batch script itself got, if any (then never a requeue)."""
    env = os.environ if env is None else env
    path = Path(run_dir) / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"{path} does not exist: the ranks never started training"
    except (OSError, ValueError) as err:
        return False, f"{path} is unreadable ({err})"
    state = status.get("state")
    job = env.get("SLURM_JOB_ID")
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if job is not None and (status.get("slurm_job_id"), status.get("slurm_restart_count")) != (job, restart):
        return False, (f"{path} was written by job {status.get('slurm_job_id')} restart "
                       f"{status.get('slurm_restart_count')}, not by this job {job} restart {restart}: "
                       "the ranks of this one did not get to write it")
    if state != "preempted":
        detail = f": {status['error']}" if status.get("error") else ""
        if state == "failed" and _lost_peer(status.get("error") or ""):
            detail += f". {lost_peer_advice(env)}"
        return False, f"the run's state is {state!r} at step {status.get('step')}{detail}"
    if cancelled:
        return False, (f"the job got {cancelled} (scancel, the time limit itself, or a preemption that cancels) and "
                       f"stopped at step {status.get('step')} of {status.get('total_steps')} with a checkpoint; "
                       f"the same sbatch command resumes from it")
    return True, (f"preempted at step {status.get('step')} of {status.get('total_steps')} with a checkpoint; "
                  f"requeueing job {env.get('SLURM_JOB_ID', 'JOB')}, which resumes from it")


def lost_peer_advice(env: dict) -> str:
    """What happens to a Slurm job whose ranks lost a peer, and how to go on (env: the job's variables)."""
    job, nodes = env.get("SLURM_JOB_ID", "JOB"), env.get("SLURM_JOB_NUM_NODES", "N")
    return (f"A rank lost its peers (a node failed or the network was cut): when Slurm marks a node down it "
            f"requeues this job itself (--requeue), and the job waits until {nodes} nodes are up; to go on with "
            f"fewer now, scancel {job} and submit the same command with --nodes=M (the newest checkpoint resumes on "
            f"any number of ranks; set data.global_batch_size to keep the images per step)")


def _lost_peer(error: str) -> bool:
    from sf2dist.parallel import lost_peer  # torch: only for a failed run

    return lost_peer(error, 0) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sf2dist.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="check that the job can start; print its run directory")
    prepare.add_argument("config", help="YAML config file")
    prepare.add_argument("rest", nargs=argparse.REMAINDER,
                         help="--config FILE, --set key=value, --allow-config-change KEYS ... as given to train.py")
    requeue = commands.add_parser("requeue", help="exit 0 if the job should be requeued")
    requeue.add_argument("run_dir", type=Path)
    requeue.add_argument("--cancelled", metavar="SIGNAL",
                         help="the batch script itself got this signal (SIGTERM): no requeue, exit 75 after a checkpoint")
    args = parser.parse_args(argv)

    if args.command == "requeue":
        decision, why = should_requeue(args.run_dir, cancelled=args.cancelled)
        print(f"sf2dist: {'requeue' if decision else 'no requeue'}: {why}", file=sys.stderr)
        if decision:
            return 0
        # cancelled where it would have been requeued: stopped with a checkpoint, as the ranks exit
        return EXIT_PREEMPTED if args.cancelled and should_requeue(args.run_dir)[0] else 1

    configs, overrides, allowed, rest = [args.config], [], [], list(args.rest)
    while rest:
        flag = rest.pop(0)
        if flag in ("--set", "--config", "--allow-config-change") and rest:
            {"--set": overrides, "--config": configs, "--allow-config-change": allowed}[flag].append(rest.pop(0))
        else:
            print(f"sf2dist: unexpected argument {flag!r}: train.sbatch takes CONFIG [--config FILE] "
                  "[--set key=value ...] [--allow-config-change KEYS]", file=sys.stderr)
            return 2
    try:
        cfg = load_config(configs, overrides)
        check_ready(cfg)
        check_resume(cfg, check_keys(allowed, "--allow-config-change"))
    except ConfigError as err:
        print(f"sf2dist: config error: {err}", file=sys.stderr)
        return 2
    except NotReady as err:
        print(f"sf2dist: cannot start: {err}", file=sys.stderr)
        return 2
    print(Path(cfg.run.dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
