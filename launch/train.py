"""Train a face-recognition model with an identity-sharded classifier.

    torchrun --nproc_per_node=8 launch/train.py --config configs/ms1mv3_r100_sf2.yaml
    torchrun --nproc_per_node=2 launch/train.py --config configs/demo_cpu.yaml --set run.epochs=2
    srun ... launch/train.py ...          (see launch/slurm/train.sbatch)

Several --config files compose (later wins); --set section.key=value overrides any key.
A run directory that already holds checkpoints resumes from the newest (run.resume).
SIGTERM or SIGUSR1, from the first moment: every rank finishes its step, a checkpoint is
written, status.json says "preempted" and the process exits with status 75.
"""
from __future__ import annotations

import argparse
import sys

from sf2dist import stop


def main(argv: list[str] | None = None) -> int:
    stop.install()  # before the imports below: a stop request while the job starts is not lost
    from sf2dist import parallel
    from sf2dist.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=0.05 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2

    from sf2dist.train import Trainer  # torch and the rest load after the config is known to be sound
    from sf2dist.train.trainer import headline

    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
    except ValueError as err:  # bad data, labels, checkpoints: the message says what and where
        print(f"train.py (rank {parallel.discover().rank}): {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        if not any(words in str(err).lower() for words in ("timed out", "timeout")):
            raise
        # gloo's words ("Timed out waiting ...", "Application timeout caused pair closure");
        # NCCL's watchdog ends the process itself after the same time-out
        print(f"train.py (rank {parallel.discover().rank}): a collective waited longer than run.timeout_s="
              f"{cfg.run.timeout_s:g} s: another rank is stuck or dead. Training stops here; the newest checkpoint "
              f"in {cfg.run.dir}/checkpoints resumes it. ({err})", file=sys.stderr, flush=True)
        return 1
    finally:
        parallel.shutdown()
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


if __name__ == "__main__":
    sys.exit(main())
