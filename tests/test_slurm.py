"""The SLURM scripts under a real Slurm controller (tests/slurm/cluster.sh): submission,
preemption with requeue and exact resume, the time-limit warning, the scaling bench, and jobs
that must fail once and never be requeued.

Every job is submitted as a user would, from the repository root with `sbatch --nodes=1
launch/slurm/...sbatch` (the multi-node command line), 2 CPU ranks per node (NPROC_PER_NODE=2,
--gpus-per-node=0, engine.device=cpu); the preemption and time-limit paths also run on two
nodes with one rank each (marked `multihost`; the losses of a node are in
test_multihost_slurm.py). `.ci/run` starts a two-host cluster before the suite; when none is
running, the session's fixture starts one (as root) or skips saying why.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.jobs import (ROOT, TRAIN, _run, final_weights, job, log_of, logged_step, status, submit, wait_done,
                        wait_until, write_config)

pytestmark = pytest.mark.slurm
# The two-node cases: one rank on each of two nodes, the same world size as two ranks on one node.
TWO_NODES = pytest.param(2, 1, marks=pytest.mark.multihost, id="2-nodes")
ONE_NODE = pytest.param(1, 2, id="1-node")


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    return slurm_cluster


@pytest.fixture
def nodes_for(cluster):
    """Skips a case that needs more nodes than the cluster has."""
    def need(nodes: int) -> None:
        if len(cluster) < nodes:
            pytest.skip(f"the Slurm test cluster has {len(cluster)} node(s) ({', '.join(cluster)}); this case needs "
                        f"{nodes}: tests/slurm/cluster.sh up --hosts {nodes} makes them (root, network namespaces)")
    return need


@pytest.fixture(scope="module")
def data(tiny_set):
    return tiny_set

def test_a_training_job_completes_with_its_log_where_the_readme_says(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": 60})
    job_id = submit(TRAIN, str(config), "--set", "optim.momentum=0.8")
    log = ROOT / f"slurm-sf2dist-{job_id}.out"  # default --output: the submission directory
    try:
        state = wait_done(job_id)
        text = log.read_text()
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text
        assert Path(state["StdOut"]) == log
        assert (run_dir / f"slurm-{job_id}.out").resolve() == log.resolve()
        assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == 60
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["momentum"] == 0.8  # --set reached it
        assert f"run directory: {run_dir} (60 steps, 0 skipped)" in text
        assert "no requeue: the run's state is 'finished'" in text
        assert state["Restarts"] == "0"
    finally:
        log.unlink(missing_ok=True)


@pytest.mark.parametrize("nodes, nproc", [ONE_NODE, TWO_NODES])
def test_preemption_checkpoints_requeues_and_resumes_to_the_uninterrupted_state(nodes_for, data, tmp_path, nodes,
                                                                                nproc):
    nodes_for(nodes)
    steps = 600
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": steps, "run.checkpoint_every": 100})
    job_id = submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",), nodes=nodes, nproc=nproc)
    wait_until(lambda: logged_step(run_dir) >= 120, 120, "step 120", job_id)
    # What --signal=B:USR1@N does, then more stop signals to every process of the job while the
    # ranks finish their step and write the checkpoint: the later ones must change nothing.
    assert _run(["scancel", "--signal=USR1", "--batch", job_id]).returncode == 0
    storm_end = time.monotonic() + 60
    while status(run_dir).get("state") != "preempted" and time.monotonic() < storm_end:
        _run(["scancel", "--signal=USR1", job_id])
        _run(["scancel", "--signal=TERM", job_id])
        time.sleep(0.05)
    preempted = status(run_dir)
    assert preempted["state"] == "preempted", preempted
    assert preempted["slurm_job_id"] == job_id and preempted["slurm_restart_count"] == 0
    assert len(preempted["signals"]) >= 2, f"no second signal reached rank 0 before it was done: {preempted}"
    stop_step = preempted["step"]
    assert 120 <= stop_step < steps
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}").is_dir()
    assert len(list((run_dir / "checkpoints" / f"step_{stop_step:08d}").glob("head-*.pt"))) == 2  # a shard per rank

    state = wait_done(job_id, timeout=300)
    text = log_of(state)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text
    assert state["Restarts"] == "1", text  # requeued by the script, once
    # what happens next, said once: the ranks' line names the signal and the checkpoint, the script's the requeue
    assert "stop signal (SIGUSR1" in text and f"checkpoint written at step {stop_step} in {run_dir}/checkpoints/" \
        f"step_{stop_step:08d}\n" in text, text
    assert text.count(f"sf2dist: requeue: preempted at step {stop_step} of {steps} with a checkpoint; requeueing job "
                      f"{job_id}, which resumes from it") == 1, text
    assert "rerun the same command" not in text and "exiting for a requeue" not in text and \
        "not requeued" not in text, text
    assert f"resumed from {run_dir}/checkpoints/step_{stop_step:08d} at step {stop_step}" in text
    final = status(run_dir)
    assert final["state"] == "finished" and final["step"] == steps and final["slurm_restart_count"] == 1

    # The same steps without a stop, started directly (torchrun, 2 ranks): the same final state.
    reference = tmp_path / "reference"
    write_config(tmp_path / "reference.yaml", data, reference, **{"run.max_steps": steps, "run.checkpoint_every": 100})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "launch/train.py", "--config", str(tmp_path / "reference.yaml")], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = final_weights(run_dir), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 4
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


def test_the_time_limit_warning_requeues_the_same_way(cluster, data, tmp_path):
    # On two nodes where the cluster has them (one rank each), else on one (two ranks): the
    # preemption test above runs both; this path is the same on either, and takes 90 s.
    nodes, nproc = (2, 1) if len(cluster) >= 2 else (1, 2)
    # --time=3 with the warning 100 s before the end: Slurm sends USR1 after 20-80 s (it checks
    # time limits periodically and may send the warning up to a minute early; seen: 3 s after
    # the start with --time=2 @90), well before these steps are done.
    steps = 4000
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": steps})
    job_id = submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out", "--time=3",
                                                "--signal=B:USR1@100"), nodes=nodes, nproc=nproc)
    wait_until(lambda: int(job(job_id).get("Restarts", 0)) >= 1, 240, "the first requeue", job_id)
    text = Path(job(job_id)["StdOut"]).read_text()
    assert "USR1 received" in text and "sf2dist: requeue: preempted at step" in text, text
    first_stop = int(re.search(r"requeue: preempted at step (\d+)", text).group(1))
    assert 0 < first_stop < steps
    # the requeued job resumes from that checkpoint; then it is cancelled (its time is short too)
    wait_until(lambda: f"at step {first_stop} (saved on 2 rank(s), now 2)" in Path(job(job_id)["StdOut"]).read_text(),
               120, "the resumed run", job_id)
    wait_until(lambda: logged_step(run_dir) > first_stop, 60, "a step after the resume", job_id)
    # a plain scancel (SIGTERM) cancels: the ranks checkpoint, and the job is not requeued
    restarts = int(job(job_id)["Restarts"])
    assert _run(["scancel", job_id]).returncode == 0
    state = wait_done(job_id, timeout=120)
    text = log_of(state)
    assert state["JobState"] == "CANCELLED" and int(state["Restarts"]) == restarts, text
    assert text.count("; requeueing job") == restarts and "exiting for a requeue" not in text, text
    cancelled = status(run_dir)
    if cancelled.get("slurm_restart_count") == restarts:  # unless the TERM came before the ranks ran
        # the ranks got the SIGTERM Slurm sent (and the script's forward of it): no SIGUSR1 in status.json
        assert cancelled["state"] == "preempted" and set(cancelled["signals"]) == {"SIGTERM"}, cancelled
        last = text[text.rindex(f"(restart {restarts})"):]  # this restart's part of the log
        assert (f"sf2dist: no requeue: the job got SIGTERM (scancel, the time limit itself, or a preemption that "
                f"cancels) and stopped at step {cancelled['step']} of {steps} with a checkpoint; the same sbatch "
                f"command resumes from it") in last, last
        assert "requeueing" not in last and "rerun the same command" not in last, last
    time.sleep(3)
    assert job(job_id)["JobState"] == "CANCELLED"


def test_the_scaling_bench_job_writes_its_outputs(cluster, tmp_path):
    out_dir = tmp_path / "bench"
    job_id = submit("launch/slurm/scaling_bench.sbatch", sbatch=(f"--output={tmp_path}/slurm-%j.out",),
                    env={"OUT_DIR": str(out_dir), "EXTRA_ARGS": "--quick --device cpu --methods sphereface2,softmax"})
    state = wait_done(job_id, timeout=240)
    assert state["JobState"] == "COMPLETED", log_of(state)
    points = json.loads((out_dir / "points-w2.json").read_text())["points"]
    assert {p["method"] for p in points} == {"sphereface2", "softmax"} and all(p["world_size"] == 2 for p in points)
    for suffix in ("csv", "json", "png"):
        assert list(out_dir.glob(f"*.{suffix}")), f"no .{suffix} in {sorted(out_dir.iterdir())}"


@pytest.mark.parametrize("problem", ["config typo", "missing data", "cuda without a gpu", "min nodes"])
def test_a_job_that_cannot_start_fails_once_with_the_reason(cluster, data, tmp_path, problem):
    run_dir = tmp_path / "run"
    settings, expected = {
        "config typo": ({}, "config error: unknown key 'optim.lrr' in --set optim.lrr=0.1; did you mean 'optim.lr'?"),
        "missing data": ({"data.train": str(tmp_path / "nowhere")}, "no manifest.json there"),
        "cuda without a gpu": ({"engine.device": "cuda"}, "wants CUDA, but the torch"),
        "min nodes": ({}, "MIN_NODES=2: elastic mode needs a number of nodes from 1 to this job's 1 (--nodes)"),
    }[problem]
    config = write_config(tmp_path / "job.yaml", data, run_dir, **settings)
    extra = ("--set", "optim.lrr=0.1") if problem == "config typo" else ()
    env = {"MIN_NODES": "2"} if problem == "min nodes" else {}
    job_id = submit(TRAIN, str(config), *extra, sbatch=(f"--output={tmp_path}/slurm-%j.out",), env=env)
    state = wait_done(job_id, timeout=120)
    text = log_of(state)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", text
    assert expected in text
    time.sleep(3)  # a requeue would show by now (cred_expire=5 in the test cluster)
    assert job(job_id)["Restarts"] == "0" and job(job_id)["JobState"] == "FAILED"


def test_a_run_that_crashes_is_not_requeued_even_after_an_earlier_preemption(cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # what an earlier, preempted job of this run directory left behind
    (run_dir / "status.json").write_text(json.dumps({"state": "preempted", "step": 5, "slurm_job_id": "1",
                                                     "slurm_restart_count": 0}))
    # a learning rate that makes the weights non-finite: the run fails within a few steps
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"optim.lr": 1e30, "run.max_bad_steps": 3,
                                                                    "optim.warmup_steps": 0})
    job_id = submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",))
    state = wait_done(job_id, timeout=180)
    text = log_of(state)
    assert state["JobState"] == "FAILED", text
    failed = status(run_dir)
    assert failed["state"] == "failed" and failed["slurm_job_id"] == job_id and "not finite" in failed["error"]
    assert f"no requeue: the run's state is 'failed' at step {failed['step']}" in text
    time.sleep(3)
    assert job(job_id)["Restarts"] == "0" and job(job_id)["JobState"] == "FAILED"
