"""Runs that survive: stop signals, kills during a checkpoint write, non-finite steps."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sf2dist.config import load_config
from sf2dist.train import checkpoint
from tests.distributed import run_on_ranks
from tests.test_train import DEMO, ROOT, overrides, tiny_data  # noqa: F401  (tiny_data is a fixture)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_sigterm_checkpoints_and_exits_for_requeue(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", DEMO]
    settings = {"run.max_steps": 100000, "run.log_every": 1, "data.num_workers": 1}
    for value in overrides(tiny_data, run_dir, **settings):
        args += ["--set", value]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run_dir / "metrics.csv").exists() and len((run_dir / "metrics.csv").read_text().splitlines()) > 3)
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: the whole process group, loader workers included
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    from sf2dist.stop import EXIT_PREEMPTED

    assert proc.returncode == EXIT_PREEMPTED, out + err
    status = json.loads((run_dir / "status.json").read_text())
    (saved,) = checkpoint.checkpoint_dirs(run_dir)
    assert status["state"] == "preempted" and saved.name == f"step_{status['step']:08d}"
    assert 3 <= status["step"] < 100000


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from sf2dist.config import load_config
    from sf2dist.train import Trainer, checkpoint
    real_save = torch.save
    def slow_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        print("wrote", path, flush=True)
        time.sleep(600)  # killed here, mid-checkpoint
    trainer = Trainer(load_config([sys.argv[1]], sys.argv[2:]))
    trainer._resume()
    trainer.state.step += 1
    checkpoint.torch.save = slow_save
    trainer.save_checkpoint()
""")


def test_sigkill_during_a_checkpoint_write_keeps_the_last_good_one(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = overrides(tiny_data, run_dir, **{"run.max_steps": 3, "eval.benchmarks": "[]"})
    subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", DEMO,
                    *[a for v in settings for a in ("--set", v)]], cwd=ROOT, check=True, capture_output=True)
    (good,) = checkpoint.checkpoint_dirs(run_dir)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, DEMO, *settings], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # (the resume message comes first)
            if line.startswith("wrote"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert any(p.name.startswith(".partial-") for p in (run_dir / "checkpoints").iterdir())
    assert checkpoint.checkpoint_dirs(run_dir) == [good]
    from sf2dist.eval import load_backbone, newest_checkpoint

    assert newest_checkpoint(run_dir) == good / "model.pt"
    load_backbone(good / "model.pt")


def _nan_worker(rank: int, world_size: int, data: str, run_dir: str, nan_steps: list[int], max_bad: int) -> dict:
    from sf2dist.train import BadStepsError, Trainer

    cfg = load_config([DEMO], overrides(Path(data), Path(run_dir), **{
        "run.max_steps": 8, "eval.benchmarks": "[]", "run.max_bad_steps": max_bad, "run.log_every": 1}))
    trainer = Trainer(cfg)
    forward = trainer.head.forward

    def poisoned(embeddings, labels):  # one rank's loss turns NaN at the chosen steps
        loss = forward(embeddings, labels)
        return loss * float("nan") if rank == 1 and trainer.state.step in nan_steps else loss

    trainer.head.forward = poisoned
    try:
        summary = trainer.run()
    except BadStepsError as err:
        return {"error": str(err), "step": trainer.state.step}
    return {"skipped": summary["skipped_steps"], "weight": trainer.head.full_weight(), "bias": trainer.head.bias.detach(),
            # parameters only: BatchNorm running statistics follow each rank's own batches
            "backbone": {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}}


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tiny_data, tmp_path):
    ranks = run_on_ranks(_nan_worker, 2, str(tiny_data), str(tmp_path / "run"), [2, 5], 3)
    assert [r["skipped"] for r in ranks] == [2, 2]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"]) and torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    for name, value in ranks[0]["backbone"].items():
        assert torch.equal(value, ranks[1]["backbone"][name]), name
    assert torch.isfinite(ranks[0]["weight"]).all()
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(row["skipped_steps"]) for row in csv.DictReader(f)] == [0, 0, 1, 1, 1, 2, 2, 2]


def test_k_bad_steps_in_a_row_stop_the_run_with_the_step(tiny_data, tmp_path):
    ranks = run_on_ranks(_nan_worker, 2, str(tiny_data), str(tmp_path / "run"), [1, 2, 3, 4], 3)
    for r in ranks:
        assert "3 consecutive steps had a non-finite loss or gradient, the last at step 3" in r["error"]


def test_a_checkpoint_of_another_model_is_refused_with_what_differs(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = overrides(tiny_data, run_dir, **{"run.max_steps": 2, "eval.benchmarks": "[]"})
    train = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", DEMO]
    subprocess.run([*train, *[a for v in settings for a in ("--set", v)]], cwd=ROOT, check=True, capture_output=True)
    other = settings + ["model.embedding_dim=64", "head.type=partial_fc", "head.margin=cosface", "head.m=null"]
    proc = subprocess.run([*train, *[a for v in other for a in ("--set", v)]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "belongs to another model" in proc.stderr
    assert "embedding_dim" in proc.stderr and "SphereFace2Head" in proc.stderr and "PartialFCHead" in proc.stderr
    assert len(checkpoint.checkpoint_dirs(run_dir)) == 1  # nothing of the saved run was touched


STUCK_RANK = textwrap.dedent("""
    import runpy, sys, time
    from sf2dist.train import trainer as trainer_module
    real_step = trainer_module.Trainer.train_step
    def stuck_step(self, batches):
        if self.rank == 1 and self.state.step == 2:
            print("rank 1 is stuck", flush=True)
            time.sleep(3600)  # alive but silent: only the time-out can end the run
        return real_step(self, batches)
    trainer_module.Trainer.train_step = stuck_step
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("launch/train.py", run_name="__main__")
""")


def test_a_stuck_rank_ends_the_run_after_the_collective_timeout(tiny_data, tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK)
    settings = overrides(tiny_data, tmp_path / "run", **{"run.max_steps": 50, "eval.benchmarks": "[]",
                                                           "run.timeout_s": 10})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--config", DEMO, *[a for v in settings for a in ("--set", v)]],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    assert "rank 1 is stuck" in proc.stdout
    assert "a collective waited longer than run.timeout_s=10 s: another rank is stuck or dead" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 200
