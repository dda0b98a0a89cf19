"""torchrun with a guard: the agent ends once its workers are gone and its rendezvous store is lost.

    python -m sf2dist.launcher [--store-lost-s S] TORCHRUN_ARGS...

is `python -m torch.distributed.run TORCHRUN_ARGS...` (same process, same options, signals,
output and exit status), plus one watchdog thread, and one difference in what it says: when
the ranks end with a status of launch/train.py's that is no crash (`WORKER_STATUSES`: 2, a
usage, config, data or checkpoint error whose message the ranks printed; 75, stopped for a
stop signal after the checkpoint), it prints one line instead of torchrun's ChildFailedError
traceback and report, and exits with that status instead of 1; and when torchrun itself gets a
signal it handles (Ctrl-C, SIGTERM: it passes it on to the ranks and waits --shutdown-timeout for
them), one line instead of its SignalException traceback, and status 128 + the signal's number.
Use it for runs across hosts, e.g. on each of two hosts:

    python -m sf2dist.launcher --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST0:29400 --rdzv_id=JOB launch/train.py --config CFG

Why. When the network between a host and the host that keeps the rendezvous store (the
first host of --rdzv_endpoint) goes away mid-run, the ranks stop after run.timeout_s (their
collectives time out), but torchrun's agent on the cut-off host does not: between checks of
its workers it asks the store whether nodes wait to join (`num_nodes_waiting()`, every
--monitor-interval), and that store call blocks. TCPStore's get waits `read_timeout` (60 s)
for an answer, then sends a cancel and reads the reply to it with no time limit at all
(`TCPStore::doWait`: `receiveValue` after `CANCEL_WAIT`); that read returns only when the
kernel gives the TCP connection up (net.ipv4.tcp_retries2, about 15 minutes by default). Until
then the agent never looks at its workers again, so it neither notices that they are gone nor
exits, and no torchrun option bounds that read (--rdzv-conf read_timeout only shortens the
first 60 s).

The guard. A thread in the agent's process watches the agent's child processes (its workers)
and, while there are none, tries a TCP connection to the rendezvous store every few seconds.
Once workers have run, all of them have ended, and the store has been unreachable for
--store-lost-s seconds (default 30) without a break, the agent can do nothing more (a restart
needs the store, and the other agents count a node whose keep-alive has been missing for 15 s,
torchrun's 5 s x 3 attempts, as gone), so the guard says so on stderr and ends the process with
status 1, as torchrun itself does when ranks fail. While the store answers, the guard never
acts: a rendezvous for an elastic restart, the exit barrier and all of torchrun's own time
limits are untouched, and it never touches a live worker.

A host that joins later. With --nnodes=MIN:MAX, a host started again (the same command)
while the others train makes them restart their workers with it, but torchrun 2.13's default
of sharing the agent's TCPStore with the workers deadlocks that restart: the agent that is
rank 0 again keeps its bootstrap address from the first round and never publishes MASTER_ADDR
for the new round, while the new agent waits for exactly that key (`RendezvousStoreInfo.build`
in `DynamicRendezvousHandler.next_rendezvous`); both fail after read_timeout (60 s) with
"wait timeout ... MASTER_ADDR" and "... role_info/1". This launcher therefore sets
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless it is set already: rank 0 then publishes a fresh
address every round (torchrun's behaviour before 2.4) and the join works.

It guards the c10d rendezvous (--rdzv_endpoint) and the static one (--master_addr and
--master_port); with --standalone the store is in this very process, and no guard is needed.
Only Linux (/proc) is supported; elsewhere this is plain torchrun.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

STORE_LOST_S = 30.0  # default --store-lost-s: twice torchrun's keep-alive limit (5 s x 3)
PROBE_INTERVAL_S = 5.0  # how often the guard looks at the workers and, without any, at the store
CONNECT_TIMEOUT_S = 5.0  # one probe of the store
EXIT_STORE_LOST = 1  # torchrun's status when ranks failed; the guard's message says why
# launch/train.py's exit statuses that are no crash (its docstring): the ranks have said what
# happened, and torchrun's ~30-line failure report would bury it. -SIGTERM: a rank that torchrun
# ended once the first had exited (before it got to the same status).
WORKER_STATUSES = {
    2: "a usage, config, data or checkpoint error before training started; the ranks' message above says what to "
       "change",
    75: "stopped for a stop signal after writing the checkpoint (rank 0's line says where)",
}
_ENDED_BY_TORCHRUN = -int(signal.SIGTERM)
SHARE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

_OPTION = "--store-lost-s"


class StoreGuard(threading.Thread):
    """Ends this process (a torchrun agent) once its workers are gone and the store is lost.

    `host`, `port`: the rendezvous store; `lost_s`: how long it must be unreachable without a
    break, with no worker alive, before the process is ended.
    """

    def __init__(self, host: str, port: int, lost_s: float = STORE_LOST_S,
                 interval_s: float = PROBE_INTERVAL_S, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        super().__init__(name="sf2dist-store-guard", daemon=True)
        self.host, self.port = host, port
        self.lost_s, self.interval_s, self.connect_timeout_s = lost_s, interval_s, connect_timeout_s

    def run(self) -> None:
        agent = os.getpid()
        workers_seen = False
        lost_since: float | None = None
        while True:
            time.sleep(self.interval_s)
            if live_children(agent):
                workers_seen, lost_since = True, None
                continue
            if not workers_seen or store_reachable(self.host, self.port, self.connect_timeout_s):
                lost_since = None  # before the first workers: torchrun's own join time-outs apply
                continue
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since >= self.lost_s:
                self.end(now - lost_since)

    def end(self, lost_for: float) -> None:
        print(f"sf2dist.launcher: every worker of this torchrun agent has ended and the rendezvous store "
              f"{self.host}:{self.port} has been unreachable for {lost_for:.0f} s (a network cut, or its host is "
              f"gone). torchrun would stay blocked in a store call until the kernel drops the connection "
              f"(net.ipv4.tcp_retries2, about 15 min), so the agent ends here with status {EXIT_STORE_LOST}. "
              f"When the hosts reach each other again, rerun the same command on every host: the run resumes "
              f"from its newest checkpoint.", file=sys.stderr, flush=True)
        os._exit(EXIT_STORE_LOST)  # the main thread sits in a C++ read that no exception can interrupt


def live_children(pid: int) -> list[int]:
    """The processes whose parent is `pid` and that are still running (zombies do not count:
    a blocked agent does not reap its exited workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state not in ("Z", "X"):
            children.append(int(entry.name))
    return children


def store_reachable(host: str, port: int, timeout_s: float) -> bool:
    """True if a TCP connection to host:port opens within `timeout_s` (the store's server accepts
    and drops a connection that sends nothing)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def store_endpoint(torchrun_argv: list[str]) -> tuple[str, int] | None:
    """The rendezvous store's (host, port) that these torchrun arguments name; None where the
    store is local (--standalone, a one-node default) or the arguments do not parse (torchrun
    then says what is wrong itself)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = torchrun.parse_args(torchrun_argv)
        if args.standalone or args.rdzv_backend not in ("c10d", "static"):
            return None
        if args.rdzv_backend == "static" and not args.rdzv_endpoint:
            if torchrun.parse_min_max_nnodes(args.nnodes)[1] == 1:
                return None  # one node: torchrun makes itself a local c10d store
            host, port = args.master_addr, args.master_port or 29500
        else:
            host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=29400)
    except (SystemExit, RuntimeError, ValueError):
        return None
    return (host, port) if port > 0 else None


def _split_options(argv: list[str]) -> tuple[float, list[str]]:
    """This module's one option (it must come first), then torchrun's arguments."""
    lost_s = STORE_LOST_S
    if argv and argv[0].startswith(_OPTION):
        given = argv[0].partition("=")[2] if "=" in argv[0] else (argv[1] if len(argv) > 1 else "")
        rest = argv[1:] if "=" in argv[0] else argv[2:]
        try:
            lost_s = float(given)
        except ValueError:
            raise SystemExit(f"sf2dist.launcher: {_OPTION} needs a number of seconds, got {given!r}") from None
        if lost_s <= 0:
            raise SystemExit(f"sf2dist.launcher: {_OPTION} must be positive, got {given}")
        argv = rest
    return lost_s, argv


def worker_status(failures: dict) -> int | None:
    """The one status of `WORKER_STATUSES` that the failed ranks share (`failures`: global rank ->
    torchrun's ProcessFailure), or None: a crash, a signal, or ranks that disagree."""
    codes = {failure.exitcode for failure in failures.values()} - {_ENDED_BY_TORCHRUN}
    if len(codes) == 1 and (code := codes.pop()) in WORKER_STATUSES:
        return code
    return None


def main(argv: list[str] | None = None) -> None:
    lost_s, torchrun_argv = _split_options(sys.argv[1:] if argv is None else argv)
    if torchrun_argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
    elif sys.platform.startswith("linux"):
        endpoint = store_endpoint(torchrun_argv)
        if endpoint is not None:
            StoreGuard(*endpoint, lost_s=lost_s).start()
    # Each rendezvous round publishes its own MASTER_ADDR/MASTER_PORT (see the module docstring);
    # a value the user exported wins.
    os.environ.setdefault(SHARE_STORE_VARIABLE, "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *torchrun_argv]  # torchrun's usage and error lines name itself
    try:
        torchrun_main(torchrun_argv)  # raises as `python -m torch.distributed.run` does: same report, same status
    except ChildFailedError as err:
        status = worker_status(err.failures)
        if status is None:
            raise
        print(f"sf2dist.launcher: {err.name} exited with status {status}: {WORKER_STATUSES[status]}", file=sys.stderr,
              flush=True)
        sys.exit(status)
    except SignalException as err:
        print(f"sf2dist.launcher: torchrun got {signal.Signals(err.sigval).name} and passed it on to the ranks; their "
              f"lines above say where they stopped (a rank still running --shutdown-timeout seconds later was killed)",
              file=sys.stderr, flush=True)
        sys.exit(128 + err.sigval)


if __name__ == "__main__":
    main()
