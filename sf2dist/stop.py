"""Stop requests: SIGTERM, SIGUSR1 and SIGINT recorded from the first moment of a training process.

A scheduler asks a job to stop with one of these (SLURM: `--signal=B:USR1@N` before the time
limit, SIGTERM on `scancel` or preemption). A training process records the request and keeps
going; the trainer agrees on it with every rank in the step's all-reduce, so all ranks stop
after the same step and write one checkpoint. `launch/train.py` installs the handler before it
imports torch, so a request that arrives while the job is still starting is not lost: the
run then takes one step, checkpoints and exits with status 75. Repeated signals (a scheduler
that signals every process of the job, and the batch script that forwards the same request)
change nothing: the first one counts. What happens next is said once, by whoever decides it:
under launch/slurm/train.sbatch the batch script (requeued or not, `sf2dist.slurm requeue`),
elsewhere rank 0's line here (`stopped_line`: rerun the same command to resume).

SIGINT (Ctrl-C at a terminal, which signals torchrun and every rank) is a stop request as well:
the ranks agree on it the same way and checkpoint, but the run ends "interrupted" (exit 130), which
is never requeued. A second Ctrl-C aborts at once, without a checkpoint of the current step; the
previous complete checkpoint stays (checkpoints are written aside and renamed into place).
torchrun forwards the SIGINT it receives to its workers right away, so under torchrun each rank
gets one Ctrl-C twice within milliseconds: a repeat within `SAME_CTRL_C_S` counts as the same one.

No torch import here: this module loads in milliseconds.
"""
from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A worker that stopped for a stop signal after checkpointing exits with this status
# (EX_TEMPFAIL), and RUN_DIR/status.json says "preempted": launch/slurm/train.sbatch requeues.
EXIT_PREEMPTED = 75
# A worker that stopped for Ctrl-C after checkpointing exits with this status (128 + SIGINT, as a
# shell reports a Ctrl-C), and RUN_DIR/status.json says "interrupted": never requeued.
EXIT_INTERRUPTED = 130
# Under torchrun, a second SIGINT this soon after the first is torchrun forwarding the terminal's.
SAME_CTRL_C_S = 1.0

_received: list[str] = []  # the names of the signals received, in order
_previous: dict[int, object] = {}
_owner: list[int] = []  # the pid that installed the handlers (forked loader workers inherit them)
_first_ctrl_c: list[float] = []  # when the first SIGINT arrived (time.monotonic)
# what a second Ctrl-C leaves behind, for its one line (the trainer says which directory)
_abort_note = ["without a checkpoint of the current step; the newest complete checkpoint (if any) resumes the run"]


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def _interrupt(signum, frame) -> None:
    if _owner and os.getpid() != _owner[0]:
        return  # a forked data-loader worker: its rank handles the Ctrl-C and closes it
    now = time.monotonic()
    if not _first_ctrl_c:
        _first_ctrl_c.append(now)
        _record(signum, frame)
        return
    if "TORCHELASTIC_RUN_ID" in os.environ and now - _first_ctrl_c[0] < SAME_CTRL_C_S:
        return  # torchrun forwarding the Ctrl-C this rank got from the terminal already
    rank = os.environ.get("RANK")
    who = f"train.py (rank {rank})" if rank is not None else "train.py"
    print(f"{who}: second Ctrl-C: aborted at once, {_abort_note[0]}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def install() -> bool:
    """Record stop signals from now on (main thread only); True if this call installed the handler."""
    if _previous:
        return False
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _record)
    _previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    _owner[:] = [os.getpid()]
    return True


def on_abort(note: str) -> None:
    """What a second Ctrl-C leaves, as its line goes on after "aborted at once, "."""
    _abort_note[0] = note


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


def interrupted() -> bool:
    """True once a Ctrl-C (SIGINT) has arrived in this process."""
    return "SIGINT" in _received


def received() -> list[str]:
    """The stop signals received so far, by name."""
    return list(_received)


def stopped_line(step: int, checkpoint_dir) -> str:
    """Rank 0's one line once every rank has stopped for a stop signal and the checkpoint is written.

    It names the signals this process received (the ranks stop together, so rank 0 may have got
    none: another rank's request stopped it). Under launch/slurm/train.sbatch ($SF2DIST_STOP_FILE
    set) the batch script alone says whether the job is requeued, since only it knows: it requeues
    after a SIGUSR1 it forwarded, not after a SIGTERM it got itself (scancel). Anywhere else no
    scheduler requeues anything, and the line says how to resume.
    """
    names = list(dict.fromkeys(name if name.startswith("SIG") else f"the stop request {name}" for name in _received))
    what = ", ".join(names) if names else "received by another rank"
    line = f"stop signal ({what}): checkpoint written at step {step} in {checkpoint_dir}"
    if os.environ.get("SF2DIST_STOP_FILE"):
        return line
    return f"{line}; rerun the same command to resume"
