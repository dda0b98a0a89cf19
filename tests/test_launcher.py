"""sf2dist.launcher on one host: its arguments, its guard, and what it hands torchrun.

The guard against a lost network is exercised across hosts in tests/test_multihost_torchrun.py;
here it runs in a plain process, with a store address that nothing listens on.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sf2dist import launcher

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv, endpoint", [
    (["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29411", "--rdzv_id=j", "train.py"], ("node0", 29411)),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0", "--rdzv-id=j", "train.py"], ("node0", 29400)),
    (["--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=1234", "train.py"], ("node0", 1234)),
    (["--standalone", "--nproc_per_node=2", "train.py"], None),
    (["--nproc_per_node=2", "train.py"], None),  # one node: torchrun makes a local store
    (["--no-such-option", "train.py"], None),  # torchrun itself reports it
])
def test_the_store_address_is_read_from_torchruns_own_arguments(argv, endpoint):
    assert launcher.store_endpoint(argv) == endpoint


def test_its_one_option_comes_before_torchruns():
    assert launcher._split_options(["--store-lost-s=12", "--nnodes=2", "x.py"]) == (12.0, ["--nnodes=2", "x.py"])
    assert launcher._split_options(["--store-lost-s", "7", "x.py", "--store-lost-s=1"]) == (7.0, ["x.py", "--store-lost-s=1"])
    assert launcher._split_options(["--nnodes=2", "x.py"]) == (launcher.STORE_LOST_S, ["--nnodes=2", "x.py"])
    with pytest.raises(SystemExit, match="needs a number of seconds"):
        launcher._split_options(["--store-lost-s=soon", "x.py"])


def test_an_exited_child_that_was_not_reaped_is_not_a_live_worker():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert child.pid in launcher.live_children(os.getpid())  # (other tests' children may be there too)
    time.sleep(1.5)  # exited, not yet reaped: a zombie, as under an agent blocked in a store call
    assert child.pid not in launcher.live_children(os.getpid())
    child.wait()


GUARDED_AGENT = textwrap.dedent("""
    import socket, subprocess, sys, time
    from sf2dist.launcher import StoreGuard
    port, listen = int(sys.argv[1]), sys.argv[2] == "listen"
    if listen:
        server = socket.create_server(("127.0.0.1", port))
    StoreGuard("127.0.0.1", port, lost_s=1.0, interval_s=0.2, connect_timeout_s=0.5).start()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])  # never reaped
    time.sleep(4)  # the agent, blocked
    print("still here", flush=True)
""")


def test_the_guard_ends_an_agent_whose_workers_are_gone_and_whose_store_is_unreachable():
    done = subprocess.run([sys.executable, "-c", GUARDED_AGENT, str(_closed_port()), "closed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == launcher.EXIT_STORE_LOST, done.stdout + done.stderr
    assert "still here" not in done.stdout
    assert "every worker of this torchrun agent has ended and the rendezvous store 127.0.0.1:" in done.stderr


def test_the_guard_leaves_an_agent_alone_while_the_store_answers():
    done = subprocess.run([sys.executable, "-c", GUARDED_AGENT, str(_closed_port()), "listen"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still here" in done.stdout, done.stderr


WORKER = textwrap.dedent("""
    import os, sys
    with open(sys.argv[1], "w") as out:
        out.write(os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "unset"))
""")


def test_it_runs_torchrun_with_a_fresh_store_address_per_rendezvous_round(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    seen = tmp_path / "seen"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    done = subprocess.run([sys.executable, "-m", "sf2dist.launcher", "--standalone", "--nproc_per_node=1",
                           str(script), str(seen)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert seen.read_text() == "1"


def test_only_a_status_the_ranks_share_and_explain_replaces_torchruns_report():
    from types import SimpleNamespace

    def failures(*codes):
        return {rank: SimpleNamespace(exitcode=code) for rank, code in enumerate(codes)}

    assert launcher.worker_status(failures(2, 2)) == 2
    assert launcher.worker_status(failures(2, -15)) == 2  # the other rank ended by torchrun before it said the same
    assert launcher.worker_status(failures(75, 75)) == 75
    for crash in [(1,), (2, 1), (75, 2), (-9,), (-15,), (-15, -15)]:
        assert launcher.worker_status(failures(*crash)) is None, crash
