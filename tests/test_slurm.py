"""The SLURM scripts under a real Slurm controller (tests/slurm/cluster.sh): submission,
preemption with requeue and exact resume, the time-limit warning, the scaling bench, and jobs
that must fail once and never be requeued.

Every job is submitted as a user would, from the repository root with `sbatch --nodes=1
launch/slurm/...sbatch` (the multi-node command line, one node here), 2 CPU ranks per node
(NPROC_PER_NODE=2, --gpus-per-node=0, engine.device=cpu). `.ci/run` starts the cluster
before the suite; when none is running, the fixture starts one (as root) or skips saying why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sf2dist.data import synth

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
TRAIN = "launch/slurm/train.sbatch"
pytestmark = pytest.mark.slurm


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def _cluster_problem() -> str | None:
    """None when sinfo shows an idle node, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    result = _run(["sinfo", "-h", "-o", "%T"])
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}"
    if not {"idle", "mixed"} & set(result.stdout.split()):
        return f"no idle node (sinfo: {result.stdout.strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem is not None:
        up = _run(["bash", str(CLUSTER), "up"]) if os.geteuid() == 0 else None
        if up is None:
            pytest.skip(f"no Slurm cluster here ({problem}) and not root, so tests/slurm/cluster.sh cannot start one")
        if up.returncode != 0 or _cluster_problem() is not None:
            pytest.skip(f"no Slurm cluster here ({problem}); tests/slurm/cluster.sh up failed: "
                        f"{(up.stderr or up.stdout).strip()[-500:]}")
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm-synth") / "tiny"
    return synth.generate(out, identities=40, images_per_identity=8, holdout_identities=20, pairs=100, size=32,
                          seed=3, workers=0)


def write_config(path: Path, data: Path, run_dir: Path, **settings) -> Path:
    """A 2-rank CPU config for the tiny set; `settings` are dotted keys."""
    values = {"run.dir": str(run_dir), "run.max_steps": 200, "run.log_every": 10, "run.checkpoint_every": 0,
              "run.eval_every": 0, "data.train": str(data / "train"), "data.batch_size": 16, "data.num_workers": 1,
              "model.backbone": "smallcnn", "model.embedding_dim": 32, "optim.lr": 0.1, "optim.warmup_steps": 2,
              "engine.device": "cpu", "eval.benchmarks": [str(data / "holdout.bin")],
              "logging.wandb_mode": "disabled", "logging.progress": False, **settings}
    tree: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def submit(script: str, *args: str, sbatch: tuple[str, ...] = (), env: dict | None = None) -> str:
    """sbatch from the repository root, as the README shows; returns the job id."""
    command = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
               *sbatch, script, *args]
    environment = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))
    result = _run(command, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
    text = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_until(predicate, timeout: float, what: str, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = job(job_id) if job_id else {}
            log = Path(state.get("StdOut", "")).read_text()[-3000:] if state.get("StdOut") else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job: "
                                 f"{ {k: state.get(k) for k in ('JobState', 'Restarts', 'ExitCode', 'Reason')} }\n{log}")
        time.sleep(0.5)


def wait_done(job_id: str, timeout: float = 240) -> dict:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_until(lambda: (lambda s: s if s.get("JobState") in done else None)(job(job_id)), timeout,
                      f"job {job_id} to end", job_id)


def log_of(state: dict) -> str:
    return Path(state["StdOut"]).read_text()


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint: backbone and each rank's head shard."""
    (newest,) = sorted((run_dir / "checkpoints").glob("step_*"))[-1:]
    tensors = {}
    for path in sorted(newest.glob("*.pt")):
        def walk(prefix, value):
            if isinstance(value, torch.Tensor):
                tensors[prefix] = value
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}", item)
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    walk(f"{prefix}.{i}", item)
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return tensors


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


def test_preemption_checkpoints_requeues_and_resumes_to_the_uninterrupted_state(cluster, data, tmp_path):
    steps = 600
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": steps, "run.checkpoint_every": 100})
    job_id = submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out",))
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

    state = wait_done(job_id, timeout=300)
    text = log_of(state)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text
    assert state["Restarts"] == "1", text  # requeued by the script, once
    assert f"sf2dist: requeue: preempted at step {stop_step} of {steps} with a checkpoint" in text
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
    # --time=3 with the warning 100 s before the end: Slurm sends USR1 after 20-80 s (it checks
    # time limits periodically and may send the warning up to a minute early; seen: 3 s after
    # the start with --time=2 @90), well before these steps are done.
    steps = 4000
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", data, run_dir, **{"run.max_steps": steps})
    job_id = submit(TRAIN, str(config), sbatch=(f"--output={tmp_path}/slurm-%j.out", "--time=3",
                                                "--signal=B:USR1@100"))
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
    if status(run_dir).get("slurm_restart_count") == restarts:  # unless the TERM came before the ranks ran
        assert status(run_dir)["state"] == "preempted" and "not requeued; the same sbatch command resumes" in text
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


@pytest.mark.parametrize("problem", ["config typo", "missing data", "cuda without a gpu"])
def test_a_job_that_cannot_start_fails_once_with_the_reason(cluster, data, tmp_path, problem):
    run_dir = tmp_path / "run"
    settings, expected = {
        "config typo": ({}, "config error: unknown key 'optim.lrr' in --set optim.lrr=0.1; did you mean 'optim.lr'?"),
        "missing data": ({"data.train": str(tmp_path / "nowhere")}, "no manifest.json there"),
        "cuda without a gpu": ({"engine.device": "cuda"}, "wants CUDA, but the torch"),
    }[problem]
    config = write_config(tmp_path / "job.yaml", data, run_dir, **settings)
    extra = ("--set", "optim.lrr=0.1") if problem == "config typo" else ()
    job_id = submit(TRAIN, str(config), *extra, sbatch=(f"--output={tmp_path}/slurm-%j.out",))
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
