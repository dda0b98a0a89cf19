"""What a run tells its user: the start-up summary (stdout and RUN_DIR/summary.txt), plain progress
lines for SLURM logs, and an evaluation that fails mid-run, which leaves the step checkpointed and
status.json saying what failed. Through launch/train.py's main() in this process."""
from __future__ import annotations

import json
import re

from sf2dist.train import checkpoint
from sf2dist.train import trainer as trainer_module
from tests.test_firstday_resume import launch_main, settings
from tests.test_train import tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_the_start_up_summary_and_plain_progress_lines(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, out, err = launch_main(settings(tiny_data, run_dir, **{"run.max_steps": 4, "run.log_every": 2}), capsys)
    assert status == 0, err
    expected = [
        f"run directory: {run_dir} (config: {run_dir / 'config.yaml'})",
        "ranks: 1 (single), device cpu, engine ddp, precision fp32",
        f"data: {tiny_data / 'train'}: 320 images of 40 classes, 32x32",
        "batch: 16 per rank x 1 rank(s) x 1 accumulation = 16 images per step; 20 steps per epoch; "
        "4 steps (0.2 epochs)",
        "head: sphereface2, margin C, 40 class rows per rank x 128 dims; per rank: weights 20.0 KiB, optimiser state "
        "20.0 KiB, gradient up to 20.0 KiB during a step",
        "start: step 0, a new run",
    ]
    for line in expected:
        assert line in out.splitlines(), line
    assert re.search(r"^backbone: smallcnn, 115,216 parameters \(450\.1 KiB in float32\)$", out, re.M)
    # logging.progress false: a plain line every run.log_every steps, no progress bar
    progress = re.findall(r"^step (\d)/4 epoch 0 loss \d+\.\d{4} lr [\d.e-]+ images/s \d+ ETA \d:\d\d:\d\d$", out, re.M)
    assert progress == ["2", "4"], out
    assert "%|" not in out + err  # no tqdm bar

    # a resume appends its own block, with the checkpoint it resumed from
    assert launch_main(settings(tiny_data, run_dir, **{"run.max_steps": 5, "run.log_every": 2}), capsys)[0] == 0
    blocks = (run_dir / "summary.txt").read_text().split("== started ")[1:]
    assert [block.split("\n")[0].split(" at ")[1] for block in blocks] == ["step 0", "step 4"]
    assert all(line in blocks[0] for line in expected)
    assert f"start: step 4, resumed from {run_dir}/checkpoints/step_00000004; changed since: run.max_steps: 4 -> 5" \
        in blocks[1]


def test_an_evaluation_that_fails_mid_run_leaves_the_step_checkpointed_and_says_so(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    def broken(model, prepared, options):
        raise RuntimeError("embedding extraction ran out of memory")

    monkeypatch.setattr(trainer_module, "evaluate_prepared", broken)
    run_dir = tmp_path / "run"
    argv = settings(tiny_data, run_dir, **{"run.max_steps": 4, "run.eval_every": 2,
                                           "eval.benchmarks": f"[{tiny_data / 'holdout.bin'}]"})
    status, out, err = launch_main(argv, capsys)
    assert status == 1, out + err
    saved = run_dir / "checkpoints" / "step_00000002"
    assert checkpoint.checkpoint_dirs(run_dir) == [saved]  # checkpoint_every 0: written for the failure
    message = (f"the evaluation after step 2 failed (RuntimeError: embedding extraction ran out of memory); that step "
               f"is saved in {saved}. Fix or remove the benchmark (eval.* may change on resume) and run the same "
               f"command again to continue from there")
    assert f"train.py (rank 0): {message}\n" in err
    assert "Traceback" in err  # the failure inside the evaluation, for a bug report
    status_json = json.loads((run_dir / "status.json").read_text())
    assert status_json["state"] == "failed" and status_json["step"] == 2
    assert status_json["failed_in"] == "evaluation" and status_json["checkpoint"] == str(saved)
    assert status_json["error"] == f"EvaluationError: {message}"

    monkeypatch.undo()  # fixed: the same command continues from step 2
    status, out, err = launch_main(argv, capsys)
    assert status == 0, err
    assert f"resumed from {saved} at step 2" in out and "holdout: verification accuracy" in out
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
