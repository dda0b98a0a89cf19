"""Training jobs in the tests, started as a user would and watched from outside: a config for the
tiny synthetic set, the run directory's files (metrics.csv, status.json, checkpoints), jobs
submitted to the Slurm test cluster (tests/slurm/cluster.sh: sbatch from the repository root,
scontrol to see the job), and the test hosts' processes (tests/hosts.sh). Shared by
test_slurm.py, test_multihost_slurm.py and test_multihost_torchrun.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
HOSTS_SH = ROOT / "tests" / "hosts.sh"
TRAIN = "launch/slurm/train.sbatch"


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


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


def submit(script: str, *args: str, sbatch: tuple[str, ...] = (), env: dict | None = None, nodes: int = 1,
           nproc: int = 2) -> str:
    """sbatch from the repository root, as the README shows, `nproc` CPU ranks on each of `nodes` nodes;
    returns the job id."""
    command = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
               *sbatch, script, *args]
    environment = dict(os.environ, NPROC_PER_NODE=str(nproc), PYTHON=sys.executable, OMP_NUM_THREADS="1",
                       **(env or {}))
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


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "model.pt").is_file())


def host_pids(host: str) -> list[int]:
    """Every process running on `host` (its network namespace)."""
    out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True, timeout=10).stdout
    return [int(pid) for pid in out.split()]


def kill_host(host: str) -> None:
    """The host dies: every process on it gets SIGKILL at once."""
    for pid in host_pids(host):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
