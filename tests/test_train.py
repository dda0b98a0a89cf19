"""The training run end to end: launch/train.py under torchrun, config errors, resharded and
bitwise-deterministic resume (gloo on CPU, a tiny synthetic set at 32x32)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sf2dist import comm
from sf2dist.config import load_config
from sf2dist.data import synth
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo_cpu.yaml")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return synth.generate(out, identities=40, images_per_identity=8, holdout_identities=20, pairs=100, size=32,
                          seed=3, workers=0)


def overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.train": str(data / "train"), "eval.benchmarks": f"[{data / 'holdout.bin'}]",
              "run.dir": str(run_dir), "run.epochs": 4, "run.log_every": 2, "data.batch_size": 16,
              "data.num_workers": 0, "optim.warmup_steps": 2, "logging.wandb_mode": "disabled",
              "logging.progress": False, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _launch(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*prefix, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _set_args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_two_process_run_through_launch(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, run_dir))], nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "holdout: verification accuracy" in proc.stdout
    assert {"config.yaml", "metrics.csv", "eval.csv", "training.png", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert load_config([run_dir / "config.yaml"]).data.batch_size == 16  # the resolved config, reloadable
    with open(run_dir / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 20  # 4 epochs x ceil(320 / 32) steps, a row every 2 steps
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.3, losses
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert checkpoint.name == "step_00000040"
    assert {p.name for p in checkpoint.iterdir()} == {"model.pt", "head-00000.pt", "head-00001.pt", "backbone_optimizer.pt"}
    # the evaluation tool reads what training wrote and agrees with the run's own evaluation
    from sf2dist.eval.cli import main as eval_main

    eval_main(["--run", str(run_dir), "--benchmark", str(tiny_data / "holdout.bin")])
    with open(run_dir / "eval.csv") as f:
        in_training = float(next(csv.DictReader(f))["accuracy"])
    results = json.loads((run_dir / "eval" / "step_00000040" / "results.json").read_text())
    assert results["benchmarks"]["holdout"]["accuracy"] == pytest.approx(in_training)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.batchsize=8", "unknown key 'data.batchsize'"),
        ("data.batch_size=many", "data.batch_size"),
        ("head.type=arcface", "head.type"),
        ("data.num_classes=41", "does not match the 40 classes"),
        ("eval.benchmarks=[/nonexistent/lfw.bin]", "eval.benchmarks: /nonexistent/lfw.bin not found"),
    ],
)
def test_config_errors_name_the_key(tiny_data, tmp_path, setting, message):
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, tmp_path / "run") + [setting])])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- resume -------------------------------------------------------------------------------------
def _head_state(trainer) -> dict:
    head = trainer.head
    momentum = trainer.head_optimizer.state[head.weight]["momentum_buffer"]
    # clones: on one rank the gathers return the live tensors, which training goes on to change
    return {"weight": head.full_weight().clone(), "momentum": comm.all_gather_variable(momentum.float()).clone(),
            "bias": head.bias.detach().clone(),
            "bias_momentum": trainer.head_optimizer.state[head.bias]["momentum_buffer"].clone()}


def _train(rank: int, world_size: int, data: str, run_dir: str, until: int | None, total: int,
           head: dict | None = None) -> dict:
    from sf2dist.train import Trainer

    cfg = load_config([DEMO], overrides(Path(data), Path(run_dir), **{
        "run.max_steps": total, "eval.benchmarks": "[]", **(head or {})}))
    trainer = Trainer(cfg)
    summary = trainer.run(until_step=until)
    return {**_head_state(trainer), "step": summary["step"],
            "backbone": {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}}


def _resume_only(rank: int, world_size: int, data: str, run_dir: str) -> dict:
    from sf2dist.train import Trainer

    cfg = load_config([DEMO], overrides(Path(data), Path(run_dir), **{"run.max_steps": 12, "eval.benchmarks": "[]"}))
    trainer = Trainer(cfg)
    trainer._resume()
    state = _head_state(trainer)
    trainer.cfg.run.resume = False  # resumed already: run() goes on from here
    summary = trainer.run()
    return {**state, "resumed_step": trainer.state.step, "final_step": summary["step"]}


def test_saved_on_two_ranks_resumes_on_one_and_three(tiny_data, tmp_path):
    saved = run_on_ranks(_train, 2, str(tiny_data), str(tmp_path / "run"), 6, 12)[0]
    for world_size in (1, 3):
        run_dir = tmp_path / f"run-{world_size}"
        shutil.copytree(tmp_path / "run", run_dir)
        for rank, got in enumerate(run_on_ranks(_resume_only, world_size, str(tiny_data), str(run_dir))):
            for key in ("weight", "momentum", "bias", "bias_momentum"):
                assert torch.equal(got[key], saved[key]), f"{key} after resuming on {world_size} rank(s), rank {rank}"
            assert got["final_step"] == 12


@pytest.mark.parametrize("head", [{}, {"head.sample_rate": 0.5}, {"head.step": "fused", "head.storage": "bfloat16"}],
                         ids=["sf2", "sf2-sampled", "sf2-fused-step-bf16"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_data, tmp_path, head):
    """Also with SphereFace2 class sampling (the draws and the per-row momentum resume exactly) and
    with the fused step on bfloat16 rows (so does the stochastic rounding)."""
    straight = run_on_ranks(_train, 2, str(tiny_data), str(tmp_path / "straight"), None, 8, head)
    run_on_ranks(_train, 2, str(tiny_data), str(tmp_path / "split"), 3, 8, head)
    resumed = run_on_ranks(_train, 2, str(tiny_data), str(tmp_path / "split"), None, 8, head)
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"] == 8
        for key in ("weight", "momentum", "bias"):
            assert torch.equal(a[key], b[key]), key
        for name, value in a["backbone"].items():
            assert torch.equal(value, b["backbone"][name]), name


def test_sfnet4_with_the_sphereface_margin_trains_on_two_processes(tiny_data, tmp_path):
    """The classic SphereFace experiment's pieces through launch/train.py: the 4-layer CNN and
    the A-Softmax margin on the sharded softmax head, 2 gloo processes; its loss falls."""
    run_dir = tmp_path / "run"
    settings = overrides(tiny_data, run_dir, **{
        "run.epochs": 8, "run.log_every": 1, "model.backbone": "sfnet4", "model.embedding_dim": 64, "model.kwargs": "{}",
        "head.type": "partial_fc", "head.margin": "sphereface", "head.m": 1.5, "optim.lr": 0.2,
        "eval.flip": "concat"})
    proc = _launch(["--config", DEMO, *_set_args(settings)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    losses = [float(row["loss"]) for row in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"
    assert "holdout: verification accuracy" in proc.stdout
