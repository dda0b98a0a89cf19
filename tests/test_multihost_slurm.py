"""train.sbatch on two Slurm nodes that are hosts of their own (tests/slurm/cluster.sh up --hosts 2:
sfnode0 and sfnode1, each a network namespace with its own address, hostname and slurmd): a job
on both, a host that dies mid-run, elastic mode, and a network cut.

Jobs are submitted as the README says, `sbatch --nodes=2 launch/slurm/train.sbatch job.yaml`,
with CPU ranks (NPROC_PER_NODE, --gpus-per-node=0). A host "dies" when every process in its
namespace gets SIGKILL (its slurmd too, as when a machine loses power); a "cut" unplugs its
cable from the bridge. Afterwards the host gets its slurmd back (cluster.sh node-up). The test
cluster declares a silent node DOWN after SlurmdTimeout=15 s (300 s by default on a real one).
Each test prints what it measured (pytest -s).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.jobs import (CLUSTER, HOSTS_SH, TRAIN, _run, checkpoints, host_pids, job, kill_host, log_of, logged_step,
                        status, submit, wait_done, wait_until, write_config)

pytestmark = [pytest.mark.slurm, pytest.mark.multihost]
TIMEOUT_S = 15  # run.timeout_s: how long a collective waits for a dead or unreachable peer
# What a rank or a torchrun agent of ours looks like in a process list (slurmd and slurmstepd are Slurm's)
OURS = ("launch/train.py", "torch.distributed.run", "sf2dist.launcher")


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    if len(slurm_cluster) < 2:
        pytest.skip(f"the Slurm test cluster has {len(slurm_cluster)} node(s) ({', '.join(slurm_cluster)}); these "
                    "tests need 2: tests/slurm/cluster.sh up --hosts 2 makes them (root, network namespaces)")
    return slurm_cluster[:2]


@pytest.fixture(scope="module")
def data(tiny_set):
    return tiny_set


@pytest.fixture
def jobs(cluster):
    """Job ids a test submits; cancelled afterwards, and every node brought back, whatever happened."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        _run(["scancel", job_id])
    for node in cluster:
        _run(["bash", str(HOSTS_SH), "join", node])
    for node in cluster:
        if _run(["sinfo", "-h", "-n", node, "-o", "%T"]).stdout.strip() not in ("idle", "mixed", "allocated"):
            up = _run(["bash", str(CLUSTER), "node-up", node])
            assert up.returncode == 0, up.stderr


def host_processes(host: str) -> list[str]:
    """The command lines of our ranks and agents on `host` (its network namespace)."""
    found = []
    for pid in host_pids(host):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(word in command for word in OURS):
            found.append(f"{pid}: {command}")
    return found


def seconds_until(predicate, since: float, limit: float) -> float:
    """Seconds after `since` (monotonic) when `predicate()` first held; inf past `limit`."""
    while not predicate():
        if time.monotonic() - since > limit:
            return float("inf")
        time.sleep(0.5)
    return time.monotonic() - since


def config_for(tmp_path: Path, data: Path, run_dir: Path, **settings) -> Path:
    return write_config(tmp_path / "job.yaml", data, run_dir, **{"run.timeout_s": TIMEOUT_S, **settings})


# One rank per node: the preemption test of test_slurm.py, whose checkpoint holds both head shards
@pytest.mark.parametrize("nproc", [2])
def test_a_job_on_two_nodes_checkpoints_every_ranks_head_shard(cluster, data, tmp_path, jobs, nproc):
    run_dir = tmp_path / "run"
    config = config_for(tmp_path, data, run_dir, **{"run.max_steps": 30})
    start = time.monotonic()
    jobs.append(job_id := submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",), nodes=2,
                                 nproc=nproc))
    state = wait_done(job_id, timeout=180)
    text = log_of(state)
    print(f"\ntwo nodes x {nproc} rank(s): 30 steps in {time.monotonic() - start:.1f} s (job start to end)")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text
    assert f"on 2 node(s): {state['NodeList']}" in text and f"{nproc} rank(s) per node" in text
    assert f"ranks: {2 * nproc} (torchrun)" in text
    (newest,) = checkpoints(run_dir)
    assert sorted(p.name for p in newest.glob("head-*.pt")) == [f"head-{r:05d}.pt" for r in range(2 * nproc)]
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == 30


def test_a_lost_host_ends_the_job_which_resumes_on_the_node_left(cluster, data, tmp_path, jobs):
    run_dir = tmp_path / "run"
    config = config_for(tmp_path, data, run_dir, **{"run.max_steps": 1000, "run.checkpoint_every": 20})
    jobs.append(job_id := submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",), nodes=2, nproc=1))
    wait_until(lambda: checkpoints(run_dir) and logged_step(run_dir) >= 60, 120, "step 60 and a checkpoint", job_id)
    killed = time.monotonic()
    kill_host(cluster[1])
    ranks_gone = seconds_until(lambda: not host_processes(cluster[0]), killed, TIMEOUT_S + 60)
    ended = seconds_until(lambda: job(job_id).get("JobState") not in ("RUNNING", "COMPLETING"), killed,
                          TIMEOUT_S + 120)
    state = job(job_id)
    text = Path(state["StdOut"]).read_text()
    print(f"\nhost {cluster[1]} killed at step ~{logged_step(run_dir)}: the ranks on {cluster[0]} ended after "
          f"{ranks_gone:.1f} s, the job left RUNNING/COMPLETING after {ended:.1f} s "
          f"({state['JobState']}, restarts {state['Restarts']})")
    assert ranks_gone <= TIMEOUT_S + 60 and ended <= TIMEOUT_S + 120, text
    # Slurm requeues the job for the node's failure (--requeue); it waits for two nodes
    assert state["JobState"] == "PENDING" and state["Restarts"] == "1", text
    assert "Training stops here; the newest checkpoint" in text, text
    newest = checkpoints(run_dir)[-1]
    assert sorted(p.name for p in newest.glob("*.pt")) == ["backbone_optimizer.pt", "head-00000.pt",
                                                           "head-00001.pt", "model.pt"]
    assert f"the newest checkpoint, {newest}, resumes it on any number of ranks" in text

    assert f"to go on with fewer now, scancel {job_id} and submit the same command with --nodes=M" in text

    # What the log says to do: cancel the pending job and go on with the node left
    assert _run(["scancel", job_id]).returncode == 0
    rerun = time.monotonic()
    jobs.append(job_id := submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",), nodes=1, nproc=1))
    state = wait_done(job_id, timeout=180)
    text = log_of(state)
    step = int(newest.name[5:])
    print(f"resubmitted on {state['NodeList']} alone: resumed from step {step} and finished in "
          f"{time.monotonic() - rerun:.1f} s")
    assert state["JobState"] == "COMPLETED", text
    assert f"resumed from {newest} at step {step} (saved on 2 rank(s), now 1)" in text
    assert "world size 2 -> 1: global batch 32 -> 16 images per step" in text
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == 1000


def test_elastic_mode_carries_on_without_the_lost_node(cluster, data, tmp_path, jobs):
    run_dir = tmp_path / "run"
    steps = 1200
    config = config_for(tmp_path, data, run_dir, **{"run.max_steps": steps, "run.checkpoint_every": 20,
                                                     "data.global_batch_size": 32})
    jobs.append(job_id := submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out", "--no-kill"),
                                 env={"MIN_NODES": "1", "RDZV_CONF": "last_call_timeout=5"}, nodes=2, nproc=1))
    wait_until(lambda: checkpoints(run_dir) and logged_step(run_dir) >= 60, 120, "step 60 and a checkpoint", job_id)
    reached = logged_step(run_dir)
    killed = time.monotonic()
    kill_host(cluster[1])
    log = Path(job(job_id)["StdOut"])
    resumed = seconds_until(lambda: "(saved on 2 rank(s), now 1)" in log.read_text(), killed, TIMEOUT_S + 120)
    text = log.read_text()
    assert resumed <= TIMEOUT_S + 120, text
    resumed_step = int(text.split("(saved on 2 rank(s), now 1)")[0].rsplit(" at step ", 1)[1])
    state = wait_done(job_id, timeout=240)
    text = log_of(state)
    print(f"\nelastic: {cluster[1]} killed at step >= {reached}; {cluster[0]} went on alone from step {resumed_step} "
          f"after {resumed:.1f} s (at most {reached + 10 - resumed_step} steps lost); the job ended "
          f"{time.monotonic() - killed:.1f} s after the kill")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", text
    assert "elastic" in text and "--nnodes=1:2" in text
    assert reached - 20 <= resumed_step <= reached + 10  # the newest checkpoint at the kill
    assert "world size 2 -> 1: global batch 32 kept (16 per rank x 1 rank(s) x 2 accumulation)" in text
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == steps


def test_a_network_cut_leaves_no_rank_or_agent_on_either_host(cluster, data, tmp_path, jobs):
    run_dir = tmp_path / "run"
    config = config_for(tmp_path, data, run_dir, **{"run.max_steps": 100000})
    jobs.append(job_id := submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",), nodes=2, nproc=1))
    wait_until(lambda: logged_step(run_dir) >= 50, 120, "step 50", job_id)
    cut = time.monotonic()
    assert _run(["bash", str(HOSTS_SH), "cut", cluster[1]]).returncode == 0
    limit = TIMEOUT_S + 120
    ended = {host: seconds_until(lambda: not host_processes(host), cut, limit) for host in cluster}
    left = {host: host_processes(host) for host in cluster}
    print(f"\nnetwork cut of {cluster[1]} at step ~{logged_step(run_dir)}: the last rank or agent ended "
          + ", ".join(f"on {host} after {took:.1f} s" for host, took in ended.items()))
    text = Path(job(job_id)["StdOut"]).read_text()
    assert max(ended.values()) <= limit, f"still running: {left}\n{text[-3000:]}"
