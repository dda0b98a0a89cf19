"""Stop requests: SIGTERM and SIGUSR1 recorded from the first moment of a training process.

A scheduler asks a job to stop with one of these (SLURM: `--signal=B:USR1@N` before the time
limit, SIGTERM on `scancel` or preemption). A training process records the request and keeps
going; the trainer agrees on it with every rank in the step's all-reduce, so all ranks stop
after the same step and write one checkpoint. `launch/train.py` installs the handler before it
imports torch, so a request that arrives while the job is still starting is not lost: the
run then takes one step, checkpoints and exits for a requeue. Repeated signals (a scheduler
that signals every process of the job, and the batch script that forwards the same request)
change nothing: the first one counts.

No torch import here: this module loads in milliseconds.
"""
from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A worker that stopped for a stop signal after checkpointing exits with this status
# (EX_TEMPFAIL), and RUN_DIR/status.json says "preempted": launch/slurm/train.sbatch requeues.
EXIT_PREEMPTED = 75

_received: list[str] = []  # the names of the signals received, in order
_previous: dict[int, object] = {}


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> bool:
    """Record stop signals from now on (main thread only); True if this call installed the handler."""
    if _previous:
        return False
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _record)
    return True


def uninstall() -> None:
    """Put back the handlers that were there before `install`."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()


def ignore() -> None:
    """Ignore stop signals from now on: the process has checkpointed and is on its way out, and a
    late SIGTERM (torchrun ending the ranks once the first has exited) must not kill it midway."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_file() -> bool:
    """Count a stop request left in the file $SF2DIST_STOP_FILE names (launch/slurm/train.sbatch
    writes it before it signals the ranks, so a signal sent while a rank was still being
    started, and lost, is still seen when its training loop begins)."""
    path = os.environ.get("SF2DIST_STOP_FILE")
    if path and os.path.exists(path) and not _received:
        _received.append(f"file {path}")
    return requested()


def requested() -> bool:
    """True once a stop signal has arrived in this process."""
    return bool(_received)


def received() -> list[str]:
    """The stop signals received so far, by name."""
    return list(_received)
