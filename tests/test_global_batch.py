"""A changed world size is a changed step, said and handled: data.global_batch_size keeps the images
per step when a run resumes on another number of ranks (the split rule, `sf2dist.config.batch_plan`),
the resume names the change, and without it a warning says how the step changed and how to keep it.
The end-to-end tests run launch/train.py under torchrun: 2 gloo ranks, then 1, on the same run dir."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sf2dist.config import BatchPlan, ConfigError, batch_plan, load_config
from sf2dist.data import synth
from sf2dist.train.checkpoint import checkpoint_dirs
from sf2dist.train.metrics import RunLog
from sf2dist.train.trainer import ResumePoint, batch_warnings, start_position, total_steps
from tests.test_firstday_resume import launch_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo_cpu.yaml")


# -- the split rule -------------------------------------------------------------------------------
def _plan(world_size: int, global_batch: int | None, batch_size: int, **extra) -> BatchPlan:
    sets = [f"data.global_batch_size={'null' if global_batch is None else global_batch}",
            f"data.batch_size={batch_size}", *(f"{key}={value}" for key, value in extra.items())]
    return batch_plan(load_config([], sets), world_size)


@pytest.mark.parametrize(("world_size", "global_batch", "batch_size", "expected"), [
    (2, 128, 64, (64, 1)),    # one micro-batch fits
    (1, 128, 64, (64, 2)),    # half the ranks: twice the micro-batches, the same per-rank size
    (4, 128, 64, (32, 1)),    # more ranks: smaller micro-batches, never accumulation
    (1, 64, 128, (64, 1)),    # data.batch_size is a cap, not a size
    (1, 96, 40, (32, 3)),     # ceil(96 / 40) = 3 micro-batches of 32
    (2, 90, 32, (15, 3)),     # 2 x 2 does not divide 90: the next accumulation that does, 3
    (8, 4096, 128, (128, 4)),
])
def test_the_global_batch_is_split_into_the_fewest_micro_batches_that_fit(world_size, global_batch, batch_size,
                                                                        expected):
    plan = _plan(world_size, global_batch, batch_size)
    assert (plan.per_rank, plan.accumulation) == expected
    assert plan.world_size == world_size and plan.global_batch == global_batch  # exact, always
    assert plan.per_rank <= batch_size


def test_without_a_global_batch_the_per_rank_batch_is_fixed_and_the_global_batch_follows_the_ranks():
    for world_size in (1, 2, 3):
        plan = _plan(world_size, None, 64, **{"optim.accumulation_steps": 2})
        assert (plan.per_rank, plan.accumulation, plan.global_batch) == (64, 2, 128 * world_size)
    assert str(_plan(1, 128, 64)) == "64 per rank x 1 rank(s) x 2 accumulation"


def test_a_global_batch_the_ranks_cannot_split_evenly_is_refused_with_values_that_work():
    with pytest.raises(ConfigError) as caught:
        _plan(3, 128, 64)
    assert str(caught.value) == (
        "data.global_batch_size=128 cannot be split evenly over 3 ranks (128 / 3 is not a whole number of images per "
        "rank), and the global batch is kept exact: on 3 ranks set it to a multiple of 3 (e.g. 126 or 129), or run on "
        "a number of ranks that divides 128 (e.g. 1, 2, 4, 8)")


def test_the_fused_head_step_says_that_this_world_size_would_need_accumulation():
    fused = {"head.step": "fused"}
    assert _plan(2, 128, 64, **fused).accumulation == 1
    with pytest.raises(ConfigError) as caught:
        _plan(1, 128, 64, **fused)
    assert str(caught.value) == (
        "head.step fused steps the class rows at every forward, so it cannot accumulate micro-batches, but "
        "data.global_batch_size=128 on 1 rank(s) with at most data.batch_size=64 images per rank per micro-batch needs "
        "2 micro-batches per step (64 per rank x 1 rank(s) x 2 accumulation). Run on 2 ranks (64 per rank), raise "
        "data.batch_size to 128 if a rank's memory holds it, or set head.step separate")


def test_config_validation_checks_what_it_can_without_the_world_size():
    with pytest.raises(ConfigError, match=r"data.global_batch_size: must be at least 1, got 0"):
        load_config([], ["data.global_batch_size=0"])
    with pytest.raises(ConfigError) as caught:
        load_config([], ["data.global_batch_size=128", "optim.accumulation_steps=2"])
    assert str(caught.value) == (
        "optim.accumulation_steps: is derived from data.global_batch_size=128 and the number of ranks when that is "
        "set; leave it at 1 (data.batch_size caps the images per rank per micro-batch), or set "
        "data.global_batch_size=null (from --set optim.accumulation_steps=2)")


# -- the data position and the run's length across a world-size change -----------------------------
def _point(step: int, micro_batches: int, saved: BatchPlan) -> ResumePoint:
    trainer = {"step": step, "micro_batches": micro_batches, "world_size": saved.world_size,
               "batch_size": saved.per_rank, "accumulation_steps": saved.accumulation}
    return ResumePoint(Path("run/checkpoints/step"), step, {"trainer": trainer}, saved_plan=saved)


def test_a_kept_global_batch_keeps_the_position_the_step_count_and_the_end_of_the_run():
    cfg = load_config([], ["run.epochs=2", "data.global_batch_size=32", "data.batch_size=16"])
    two, one = batch_plan(cfg, 2), batch_plan(cfg, 1)
    # 160 samples: 5 micro-batches of 2 x 16 per epoch on 2 ranks, 10 of 1 x 16 on 1 rank; 5 steps either way
    point = _point(3, 3, two)
    assert start_position(point, one, 160) == (3, 6)  # 96 samples in, on micro-batches of 16
    assert total_steps(cfg, one, 10, (3, 6)) == total_steps(cfg, two, 5) == 10
    assert point.world_size_change(one) == "world size 2 -> 1: global batch 32 kept (16 per rank x 1 rank(s) x 2 " \
                                           "accumulation)"
    assert point.world_size_warnings(cfg, one) == []


def test_a_changed_global_batch_ends_the_run_after_its_epochs_not_after_its_old_step_count():
    """The cause of a summary's "(10 epochs)" beside a progress line's "epoch 16": the step count
    was epochs x steps per epoch at the new world size, though the steps already done held more
    images each. It is now counted from the data position."""
    cfg = load_config([], ["run.epochs=2", "data.batch_size=16"])
    two, one = batch_plan(cfg, 2), batch_plan(cfg, 1)
    point = _point(3, 3, two)
    assert start_position(point, one, 160) == (3, 6)
    total = total_steps(cfg, one, 10, (3, 6))
    assert total == 17  # 3 steps of 32 + 14 steps of 16 = 320 images, 2 epochs (not 2 x 10 = 20 steps)
    assert 6 + (total - 3) * one.accumulation == 2 * 10  # the data position at the end: exactly 2 epochs
    (warning,) = point.world_size_warnings(cfg, one)
    assert "the global batch changes 32 -> 16 images per step (16 per rank x 1 rank(s) x 1 accumulation)" in warning
    assert ("To keep 32 images per step on any number of ranks, set data.global_batch_size=32 (allowed on resume; "
            "here it would be 16 per rank x 1 rank(s) x 2 accumulation)") in warning


def test_the_refusal_of_a_resume_names_the_world_size_change_too():
    from sf2dist.config import Change

    cfg = load_config([], ["data.batch_size=16"])
    point = _point(3, 3, batch_plan(cfg, 2))
    point.refused = [Change("optim.lr", 0.1, 0.05)]
    with pytest.raises(ValueError) as caught:
        point.check(batch_plan(cfg, 1))
    listing = ("(checkpoint -> now):\n  optim.lr: 0.1 -> 0.05\n  (world size 2 -> 1: global batch 32 -> 16 images "
               "per step (16 per rank x 1 rank(s) x 1 accumulation); a change of the world size is allowed)\n")
    assert listing in str(caught.value)


def test_a_global_batch_whose_micro_batch_exceeds_a_ranks_share_of_the_data_is_warned_about():
    cfg = load_config([], ["data.global_batch_size=512", "data.batch_size=512"])
    (warning,) = batch_warnings(cfg, batch_plan(cfg, 2), 320)
    assert warning == (
        "data.global_batch_size=512 puts 256 images per rank in each micro-batch (256 per rank x 2 rank(s) x 1 "
        "accumulation), more than the 160 samples per rank (320 samples over 2 rank(s)): each micro-batch of 512 "
        "images repeats samples (each about 1.6 times); set data.batch_size (the micro-batch's cap) to at most 160, or "
        "data.global_batch_size to at most 320")
    assert batch_warnings(cfg, batch_plan(load_config([], ["data.global_batch_size=320", "data.batch_size=512"]), 2),
                          320) == []


def test_metrics_rows_keep_the_columns_of_a_file_written_before_images_per_step(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,epoch,loss\n1,0,3.5\n")
    RunLog(tmp_path, {}, SimpleNamespace(wandb_mode="disabled")).train(
        {"step": 2, "epoch": 0, "loss": 3.25, "images_per_step": 32})
    assert (tmp_path / "metrics.csv").read_text() == "step,epoch,loss\n1,0,3.5\n2,0,3.25\n"


# -- end to end: 2 ranks, then 1, on the same run directory ------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """160 training images of 20 identities at 32x32: 5 steps of 32 per epoch."""
    out = tmp_path_factory.mktemp("synth") / "small"
    return synth.generate(out, identities=20, images_per_identity=8, holdout_identities=0, pairs=0, size=32, seed=5,
                          workers=0)


def _settings(data: Path, run_dir: Path, **extra) -> list[str]:
    """--set options for 2 epochs of 5 steps on `data`, a metrics row and a progress line every step."""
    values = {"data.train": data / "train", "eval.benchmarks": "[]", "run.dir": run_dir, "run.epochs": 2,
              "run.log_every": 1, "data.batch_size": 16, "data.num_workers": 0, "model.embedding_dim": 32,
              "optim.warmup_steps": 2, "logging.wandb_mode": "disabled", "logging.progress": False, **extra}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _torchrun(nproc: int, data: Path, run_dir: Path, **extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "launch" / "train.py"), "--config", DEMO, *_settings(data, run_dir, **extra)]
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _trainer_state(run_dir: Path) -> dict:
    return torch.load(checkpoint_dirs(run_dir)[-1] / "model.pt", map_location="cpu", weights_only=True)["trainer"]


def _summary_batch_line(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("batch: ")]
    return line


def test_a_global_batch_survives_a_resume_on_fewer_ranks(small_data, tmp_path):
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    kept = {"data.global_batch_size": 32}
    # the reference: 10 steps on 2 ranks without a break
    _torchrun(2, small_data, straight, **kept)
    # the same run stopped after 3 steps on 2 ranks, then resumed on 1
    first = _torchrun(2, small_data, run_dir, **kept, **{"run.max_steps": 3})
    assert _summary_batch_line(first.stdout) == ("batch: 16 per rank x 2 rank(s) x 1 accumulation = 32 images per step "
                                                 "(data.global_batch_size); 5 steps per epoch; 3 steps (0.6 epochs)")
    saved = _trainer_state(run_dir)
    assert (saved["step"], saved["micro_batches"], saved["world_size"], saved["batch_size"],
            saved["accumulation_steps"]) == (3, 3, 2, 16, 1)

    resumed = _torchrun(1, small_data, run_dir, **kept, **{"run.max_steps": "null"})
    out = resumed.stdout
    change = "world size 2 -> 1: global batch 32 kept (16 per rank x 1 rank(s) x 2 accumulation)"
    assert f"changed since that checkpoint: {change}; run.max_steps: 3 -> null" in out
    assert f"resumed from {run_dir}/checkpoints/step_00000003; changed since: {change}, run.max_steps" in out
    assert _summary_batch_line(out) == ("batch: 16 per rank x 1 rank(s) x 2 accumulation = 32 images per step "
                                        "(data.global_batch_size); 5 steps per epoch; 10 steps (2 epochs)")
    assert "warning: " not in out
    # the same images per step before and after: 32, and the data position moved by 32 images per step
    rows = _metrics(run_dir)
    assert [int(row["step"]) for row in rows] == list(range(1, 11))
    assert {row["images_per_step"] for row in rows} == {"32"}
    final = _trainer_state(run_dir)
    assert (final["step"], final["world_size"], final["batch_size"], final["accumulation_steps"]) == (10, 1, 16, 2)
    assert (final["micro_batches"] - 6) * final["batch_size"] == (10 - 3) * 32  # 6: step 3's position, 96 images in
    assert int(rows[-1]["epoch"]) == 2 and final["micro_batches"] == 2 * 10  # ended after exactly 2 epochs
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    # The same steps as the uninterrupted 2-rank run: the same images per micro-batch (1 rank's two
    # micro-batches are the 2 ranks' halves), so the same losses up to float rounding.
    reference = {row["step"]: float(row["loss"]) for row in _metrics(straight)}
    for row in rows[3:]:
        assert float(row["loss"]) == pytest.approx(reference[row["step"]], rel=1e-4), row["step"]


def test_without_a_global_batch_a_resume_on_fewer_ranks_warns_and_the_advice_works(small_data, tmp_path, capsys):
    run_dir, advised = tmp_path / "run", tmp_path / "advised"
    _torchrun(2, small_data, run_dir, **{"run.max_steps": 3})
    shutil.copytree(run_dir, advised)
    change = "world size 2 -> 1: global batch 32 -> 16 images per step (16 per rank x 1 rank(s) x 1 accumulation)"
    warning = (f"warning: world size 2 -> 1 since {run_dir}/checkpoints/step_00000003: the global batch changes 32 -> "
               f"16 images per step (16 per rank x 1 rank(s) x 1 accumulation), so each remaining step averages its "
               f"gradient over 16 images instead of 32, at a learning rate chosen for 32. To keep 32 images per step "
               f"on any number of ranks, set data.global_batch_size=32 (allowed on resume; here it would be 16 per "
               f"rank x 1 rank(s) x 2 accumulation)")
    # the check before training (--print-config, one process) says it already
    argv = ["--config", DEMO, *_settings(small_data, run_dir, **{"run.max_steps": "null"}), "--print-config"]
    status, out, err = launch_main(argv, capsys)
    assert status == 0, err
    assert f"# start: step 3, resumed from {run_dir}/checkpoints/step_00000003; changed since: {change}, " in out
    assert f"# {warning}\n" in out

    out = _torchrun(1, small_data, run_dir, **{"run.max_steps": "null"}).stdout
    assert f"changed since that checkpoint: {change}; run.max_steps: 3 -> null" in out
    assert f"{warning}\n" in out
    # the run still ends after its 2 epochs: 3 steps of 32 images + 14 of 16, and the summary says so
    assert _summary_batch_line(out) == ("batch: 16 per rank x 1 rank(s) x 1 accumulation = 16 images per step; "
                                        "10 steps per epoch; 17 steps (2 epochs)")
    rows = _metrics(run_dir)
    assert [row["images_per_step"] for row in rows] == ["32"] * 3 + ["16"] * 14
    assert (int(rows[-1]["step"]), int(rows[-1]["epoch"])) == (17, 2)
    assert "step 17/17 epoch 2 loss" in out
    assert _trainer_state(run_dir)["micro_batches"] == 2 * 10

    # The advice, followed on resume without --allow-config-change: the step keeps its 32 images.
    out = _torchrun(1, small_data, advised, **{"run.max_steps": "null", "data.global_batch_size": 32}).stdout
    assert ("changed since that checkpoint: world size 2 -> 1: global batch 32 kept (16 per rank x 1 rank(s) x 2 "
            "accumulation); run.max_steps: 3 -> null; data.global_batch_size: null -> 32") in out
    assert "warning: " not in out
    assert {row["images_per_step"] for row in _metrics(advised)} == {"32"}
    assert _trainer_state(advised)["step"] == 10
