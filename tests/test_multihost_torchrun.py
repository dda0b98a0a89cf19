"""Training across two hosts with torchrun, as on a cluster: hosts that die, a network that fails.

The hosts are network namespaces on one bridge (tests/hosts.sh: sfhost0 at 10.213.8.1 keeps
the rendezvous store, sfhost1 at 10.213.8.2), each with its own hostname and /etc/hosts; the
run directory under /tmp is shared by both, as a cluster's shared file system would be. Every
host runs the command the README documents for a multi-node run, one rank per host:

    python -m sf2dist.launcher --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d \\
        --rdzv_endpoint=sfhost0:29400 --rdzv_id=JOB launch/train.py --config CFG

Needs root (network namespaces); skipped, with the reason, where the hosts cannot be made. Each
test prints what it measured (run pytest with -s to see it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import jobs
from tests.jobs import HOSTS_SH, ROOT, checkpoints, host_pids, kill_host, logged_step, status

PREFIX, SUBNET = "sfhost", "10.213.8"
HOSTS = (f"{PREFIX}0", f"{PREFIX}1")
STORE = f"{PREFIX}0:29400"  # the rendezvous store lives in the agent on sfhost0
TIMEOUT_S = 10  # run.timeout_s: how long a collective waits for a dead or unreachable peer
pytestmark = pytest.mark.multihost


def _hosts_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HOSTS_SH), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def hosts():
    """sfhost0 and sfhost1, removed at the end of the module whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests make network namespaces (ip netns add), which needs root")
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"tests/hosts.sh needs {', '.join(missing)} (iproute2, util-linux)")
    try:
        up = _hosts_sh("up", PREFIX, str(len(HOSTS)), SUBNET)
        if up.returncode != 0:
            pytest.skip(f"cannot make the hosts (tests/hosts.sh up {PREFIX} {len(HOSTS)} {SUBNET}): "
                        f"{(up.stderr or up.stdout).strip()[-500:]}")
        yield HOSTS
    finally:
        down = _hosts_sh("down", PREFIX)
        assert down.returncode == 0, down.stderr
        assert not [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                    .splitlines() if line.startswith(PREFIX)], "namespaces left behind"


@pytest.fixture(scope="module")
def data(tiny_set) -> Path:
    return tiny_set


class Cluster:
    """Starts the documented command on a host; after the test, nothing of it is left running."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def launch(self, host: str, config: Path, job: str, *torchrun: str, nnodes: str = "2") -> subprocess.Popen:
        log = self.tmp_path / f"{job}-{host}-{len(self.procs)}.log"
        command = ["bash", str(HOSTS_SH), "exec", host, "env", "OMP_NUM_THREADS=1",
                   sys.executable, "-m", "sf2dist.launcher", f"--nnodes={nnodes}", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={STORE}", f"--rdzv_id={job}", *torchrun,
                   "launch/train.py", "--config", str(config)]
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((host, proc, log))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(log for _, p, log in self.procs if p is proc).read_text()

    def logs(self) -> str:
        return "\n".join(f"--- {host} (exit {proc.poll()}):\n{log.read_text()[-4000:]}"
                         for host, proc, log in self.procs)

    def cleanup(self) -> None:
        for host in HOSTS:
            _hosts_sh("join", host)
            kill_host(host)
        for _, proc, _ in self.procs:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def cluster(hosts, tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.cleanup()
    assert not [pid for host in hosts for pid in host_pids(host)], "processes left on the hosts"


def write_config(path: Path, data: Path, run_dir: Path, **settings) -> Path:
    """A one-rank-per-host CPU config for the tiny set; `settings` are dotted keys. The global batch
    (32) is kept on any number of ranks, so a run continues on 1 host what 2 began."""
    return jobs.write_config(path, data, run_dir, **{
        "run.max_steps": 60, "run.log_every": 5, "run.checkpoint_every": 20, "run.timeout_s": TIMEOUT_S,
        "data.global_batch_size": 32, "data.num_workers": 0, "eval.benchmarks": [], **settings})


def wait_until(predicate, timeout: float, what: str, cluster: Cluster):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.1)
    return value


def wait_exit(proc: subprocess.Popen, timeout: float, cluster: Cluster) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the command did not end within {timeout:.0f} s\n{cluster.logs()}") from None


def seconds_until_empty(host: str, since: float, limit: float) -> float:
    """When the last process on `host` ended, in seconds after `since` (monotonic); inf past `limit`."""
    while host_pids(host):
        if time.monotonic() - since > limit:
            return float("inf")
        time.sleep(0.2)
    return time.monotonic() - since


def start_both(cluster: Cluster, config: Path, job: str, *torchrun: str, nnodes: str = "2"):
    return tuple(cluster.launch(host, config, job, *torchrun, nnodes=nnodes) for host in HOSTS)


def test_two_hosts_train_and_checkpoint_together(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": 40})
    start = time.monotonic()
    procs = start_both(cluster, config, "together")
    codes = [wait_exit(proc, 120, cluster) for proc in procs]
    took = time.monotonic() - start
    print(f"\nmultihost: 2 hosts trained 40 steps in {took:.1f} s (start-up and rendezvous included)")
    assert codes == [0, 0], cluster.logs()
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == 40
    newest = checkpoints(run_dir)[-1]
    assert newest.name == "step_00000040"
    assert sorted(p.name for p in newest.glob("head-*.pt")) == ["head-00000.pt", "head-00001.pt"]
    assert "ranks: 2 (torchrun)" in (run_dir / "summary.txt").read_text()


def test_a_killed_host_ends_the_job_and_the_survivor_resumes_alone(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": 2000})
    start_both(cluster, config, "killed")
    wait_until(lambda: checkpoints(run_dir) and logged_step(run_dir) >= 50, 120, "step 50 and a checkpoint", cluster)
    killed = time.monotonic()
    kill_host(HOSTS[1])
    survivor_done = seconds_until_empty(HOSTS[0], killed, TIMEOUT_S + 60)
    print(f"\nmultihost: {HOSTS[1]} killed at step ~{logged_step(run_dir)}; every process on {HOSTS[0]} ended "
          f"{survivor_done:.1f} s later")
    assert survivor_done <= TIMEOUT_S + 60, cluster.logs()
    newest = checkpoints(run_dir)[-1]
    assert sorted(p.name for p in newest.glob("*.pt")) == ["backbone_optimizer.pt", "head-00000.pt",
                                                           "head-00001.pt", "model.pt"]

    # The surviving host alone carries the run on: 2 -> 1 rank, the same global batch.
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": int(newest.name[5:]) + 40})
    rerun = time.monotonic()
    alone = cluster.launch(HOSTS[0], config, "killed-rerun", nnodes="1")
    code = wait_exit(alone, 120, cluster)
    print(f"multihost: {HOSTS[0]} alone resumed from {newest.name} and trained 40 more steps in "
          f"{time.monotonic() - rerun:.1f} s")
    assert code == 0, cluster.log(alone)
    assert f"resumed from {newest}" in cluster.log(alone)
    assert "world size 2 -> 1: global batch 32 kept" in cluster.log(alone)
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == int(newest.name[5:]) + 40


def test_elastic_the_survivor_reforms_alone_and_the_replaced_host_joins(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    steps = 1500
    elastic = ("--max-restarts=3", "--rdzv-conf=last_call_timeout=5")
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": steps})
    survivor, _ = start_both(cluster, config, "elastic", *elastic, nnodes="1:2")
    wait_until(lambda: checkpoints(run_dir) and logged_step(run_dir) >= 50, 120, "step 50 and a checkpoint", cluster)
    killed = time.monotonic()
    kill_host(HOSTS[1])
    reached = logged_step(run_dir)  # rank 0 logs every 5 steps: it had done reached..reached+4 steps
    time.sleep(1)  # rank 0 sees the reset connection at once; a checkpoint it was writing is never completed
    newest = int(checkpoints(run_dir)[-1].name[5:])
    resumed_line = wait_until(lambda: next((line for line in cluster.log(survivor).splitlines()
                                            if "start: step" in line and "resumed from" in line), None),
                              TIMEOUT_S + 90, "the survivor's resumed workers", cluster)
    reformed = time.monotonic() - killed
    resumed_step = int(resumed_line.split("start: step ")[1].split(",")[0])
    wait_until(lambda: logged_step(run_dir) > resumed_step, 60, "a step after the resume", cluster)
    training_again = time.monotonic() - killed
    print(f"\nmultihost: elastic, {HOSTS[1]} killed at step {reached}..{reached + 4}; {HOSTS[0]} re-formed alone "
          f"and resumed from step {resumed_step} {reformed:.1f} s later, logged a new step {training_again:.1f} s "
          f"later ({reached - resumed_step}..{reached + 4 - resumed_step} steps lost)")
    assert resumed_step == newest, cluster.log(survivor)  # the newest complete checkpoint at the kill
    assert reached - 20 <= resumed_step <= reached + 4  # run.checkpoint_every=20: at most 20 steps lost
    assert "world size 2 -> 1: global batch 32 kept" in cluster.log(survivor)

    # The host is replaced: the same command there joins at the next restart (the survivor's
    # ranks checkpoint, stop, and both hosts resume together, resharded 1 -> 2)
    joined = time.monotonic()
    replaced = cluster.launch(HOSTS[1], config, "elastic", *elastic, nnodes="1:2")
    wait_until(lambda: "(saved on 1 rank(s), now 2)" in cluster.log(survivor), 90, "the two hosts resumed", cluster)
    rejoined = time.monotonic() - joined
    codes = [wait_exit(proc, 180, cluster) for proc in (survivor, replaced)]
    print(f"multihost: the replaced {HOSTS[1]} joined; both resumed together {rejoined:.1f} s after its start; "
          f"finished {steps} steps {time.monotonic() - killed:.1f} s after the kill")
    assert codes == [0, 0], cluster.logs()
    assert "world size 1 -> 2: global batch 32 kept" in cluster.log(survivor)
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == steps
    assert sorted(p.name for p in checkpoints(run_dir)[-1].glob("head-*.pt")) == ["head-00000.pt", "head-00001.pt"]


def test_a_network_cut_ends_every_rank_and_agent_on_both_hosts(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": 100000})
    store_host, cut_host = start_both(cluster, config, "cut")
    wait_until(lambda: logged_step(run_dir) >= 50, 120, "step 50", cluster)
    cut = time.monotonic()
    assert _hosts_sh("cut", HOSTS[1]).returncode == 0
    limit = TIMEOUT_S + 120
    ended = {host: seconds_until_empty(host, cut, limit) for host in HOSTS}
    print(f"\nmultihost: link of {HOSTS[1]} cut at step ~{logged_step(run_dir)}; every process ended "
          + ", ".join(f"on {host} {took:.1f} s" for host, took in ended.items()) + " later")
    assert max(ended.values()) <= limit, cluster.logs()
    assert store_host.wait(timeout=10) != 0 and cut_host.wait(timeout=10) != 0
    rank_message = f"a collective waited longer than run.timeout_s={TIMEOUT_S} s"
    assert rank_message in cluster.log(store_host) and rank_message in cluster.log(cut_host), cluster.logs()
    assert f"the rendezvous store {STORE} has been unreachable" in cluster.log(cut_host), cluster.logs()
