"""A newcomer's second day (issue #23): Ctrl-C checkpoints and resumes, a run directory with an
earlier run's outputs but no checkpoint is refused, a warm-up as long as the run is warned about."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sf2dist import stop
from sf2dist.config import load_config
from sf2dist.train import checkpoint
from sf2dist.train.metrics import TRAIN_COLUMNS
from sf2dist.train.optim import warmup_warnings
from tests.test_train import DEMO, ROOT, overrides, tiny_data  # noqa: F401  (tiny_data is a fixture)

TRAIN = str(ROOT / "launch" / "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _args(data: Path, run_dir: Path, **extra) -> list[str]:
    args = ["--config", DEMO]
    for value in overrides(data, run_dir, **{"eval.benchmarks": "[]", **extra}):
        args += ["--set", value]
    return args


def _torchrun(log_dir: Path) -> list[str]:
    # --redirects 3: each rank's stdout and stderr in its own file under log_dir, apart from torchrun's
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--log-dir={log_dir}", "--redirects=3"]


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def _rank_output(log_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(log_dir)): p.read_text() for p in sorted(log_dir.rglob("*.log"))}


def test_ctrl_c_under_torchrun_checkpoints_on_every_rank_and_the_rerun_resumes(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(tiny_data, run_dir, **{"run.max_steps": 100000, "run.log_every": 1, "run.checkpoint_every": 0,
                                        "data.num_workers": 1})
    proc = subprocess.Popen([*_torchrun(tmp_path / "logs"), TRAIN, *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while _rows(run_dir / "metrics.csv") < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: torchrun, every rank and the loader workers
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ranks = _rank_output(tmp_path / "logs")
    status = json.loads((run_dir / "status.json").read_text())
    (saved,) = checkpoint.checkpoint_dirs(run_dir)
    assert status["state"] == "interrupted" and status["signals"][0] == "SIGINT", status
    assert saved.name == f"step_{status['step']:08d}" and 3 <= status["step"] < 100000
    logged = "".join(ranks.values())
    assert f"interrupted (Ctrl-C): checkpoint written at step {status['step']} in {saved}" in logged, ranks
    assert "Traceback" not in logged and "aborted" not in logged, ranks
    assert logged.count("interrupted (Ctrl-C)") == 1, ranks  # rank 0's one line; the other ranks say nothing
    assert "".join(text for name, text in ranks.items() if "/1/" in name) == "", ranks
    # torchrun forwards the SIGINT to the ranks at once (they take it for the same Ctrl-C), then waits for them
    # up to its --shutdown-timeout; they exited well before it had to kill them
    assert "closing signal SIGINT" in out and "SIGKILL" not in out, out

    rerun = subprocess.run([*_torchrun(tmp_path / "logs2"), TRAIN,
                            *_args(tiny_data, run_dir, **{"run.max_steps": status["step"] + 2})],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    logged = "".join(_rank_output(tmp_path / "logs2").values())
    assert f"start: step {status['step']}, resumed from {saved}" in logged
    after = json.loads((run_dir / "status.json").read_text())
    assert (after["state"], after["step"], after["resumed_from_step"]) == ("finished", status["step"] + 2,
                                                                          status["step"])


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(tiny_data, run_dir, **{"run.max_steps": 100000, "run.log_every": 1, "run.checkpoint_every": 2})
    proc = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.checkpoint_dirs(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        before = checkpoint.checkpoint_dirs(run_dir)[-1]
        # Two presses, as a person makes them; the run may have taken a step or two in between
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == stop.EXIT_INTERRUPTED, out + err
    newest = checkpoint.checkpoint_dirs(run_dir)[-1]
    # Where the second press landed decides the line: mid-step, or after the Ctrl-C's checkpoint (the plot, the status)
    lines = err.strip().splitlines()
    mid_step = ("train.py: second Ctrl-C: aborted at once, without a checkpoint of the current step; the newest "
                f"complete checkpoint in {run_dir / 'checkpoints'} (if any) resumes the run")
    after = f"train.py: second Ctrl-C: aborted at once, after the checkpoint of step {newest.name[5:].lstrip('0')}, "
    assert lines in ([], [mid_step]) or (len(lines) == 1 and lines[0].startswith(after)), err
    assert newest >= before
    checkpoint.read_main(newest)  # complete: it loads


ABORT = """
import os, signal, sys, time
from sf2dist import stop
stop.install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
print("requested", stop.requested(), stop.interrupted(), flush=True)
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
print("still running", flush=True)
"""


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_second_ctrl_c_exits_at_once_saying_so_and_torchruns_forward_of_the_first_is_not_one(torchrun):
    env = {key: value for key, value in ENV.items() if key != "TORCHELASTIC_RUN_ID"}
    env["RANK"] = "1"
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "x"
    line = ("train.py (rank 1): second Ctrl-C: aborted at once, without a checkpoint of the current step; the newest "
            "complete checkpoint (if any) resumes the run")
    forwarded = subprocess.run([sys.executable, "-c", ABORT, "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=60)
    if torchrun:  # the repeat within SAME_CTRL_C_S: torchrun passing on the terminal's Ctrl-C
        assert (forwarded.returncode, forwarded.stdout, forwarded.stderr) == (
            0, "requested True True\nstill running\n", "")
    else:
        assert (forwarded.returncode, forwarded.stdout, forwarded.stderr) == (
            stop.EXIT_INTERRUPTED, "requested True True\n", line + "\n")
    pressed = subprocess.run([sys.executable, "-c", ABORT, str(stop.SAME_CTRL_C_S)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert (pressed.returncode, pressed.stdout, pressed.stderr) == (
        stop.EXIT_INTERRUPTED, "requested True True\n", line + "\n")


def test_a_run_directory_with_an_earlier_runs_outputs_and_no_checkpoint_is_refused(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = "step,epoch,loss\n10,0,5.0\n20,0,4.9\n100,1,3.1\n"
    (run_dir / "metrics.csv").write_text(metrics)
    (run_dir / "config.yaml").write_text("earlier: config\n")
    expected = (f"run.dir {run_dir} holds the outputs of an earlier run (metrics.csv (steps 10 to 100, 3 rows)) but "
                f"no checkpoint in {run_dir / 'checkpoints'} to resume from; a new run there would mix its metrics, "
                f"plot and config with that run's. Start the new run in another directory (--set run.dir=NEW_DIR), "
                f"or move or delete the earlier run's files first (e.g. mv {run_dir} {run_dir}.old)")
    args = _args(tiny_data, run_dir, **{"run.max_steps": 20})
    # two ranks under the launcher, as train.sbatch runs them: said once, before any process group
    trained = subprocess.run([sys.executable, "-m", "sf2dist.launcher", "--standalone", "--nproc_per_node=2", TRAIN,
                              *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 2, trained.stdout + trained.stderr
    assert trained.stderr.count(f"train.py: {expected}\n") == 1, trained.stderr
    assert "Traceback" not in trained.stderr and "ChildFailedError" not in trained.stderr, trained.stderr
    checked = subprocess.run([sys.executable, TRAIN, *args, "--print-config"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 2 and checked.stderr.strip() == f"train.py: {expected}"
    # nothing was written: the earlier run's files are as they were
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.csv"]
    assert (run_dir / "metrics.csv").read_text() == metrics
    assert (run_dir / "config.yaml").read_text() == "earlier: config\n"

    # an attempt that stopped before its first logged step (a header only) is started over
    (run_dir / "metrics.csv").write_text(",".join(TRAIN_COLUMNS) + "\n")
    again = subprocess.run([sys.executable, TRAIN, *_args(tiny_data, run_dir, **{"run.max_steps": 2})], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "start: step 0, a new run" in again.stdout


def test_a_warm_up_as_long_as_the_run_is_warned_about_in_the_summary(tiny_data, tmp_path):
    cfg = load_config([], ["optim.warmup_steps=50", "optim.lr=0.1"])
    (warning,) = warmup_warnings(cfg.optim, 30)
    assert warning == (
        "optim.warmup_steps=50 is not less than the run's 30 steps: the learning rate rises for the whole run, to 60% "
        "of optim.lr=0.1 at the last step and the optim.schedule=poly decay never starts; set optim.warmup_steps "
        "below 30 (e.g. 3, a tenth of the run), or train longer (run.max_steps, run.epochs)")
    assert warmup_warnings(cfg.optim, 51) == []
    (at_peak,) = warmup_warnings(load_config([], ["optim.warmup_steps=30", "optim.schedule=constant"]).optim, 30)
    assert "to 100% of optim.lr" in at_peak and "decay" not in at_peak

    run_dir = tmp_path / "run"
    args = _args(tiny_data, run_dir, **{"run.max_steps": 3, "optim.warmup_steps": 5})
    line = ("warning: optim.warmup_steps=5 is not less than the run's 3 steps: the learning rate rises for the whole "
            "run, to 60% of optim.lr=")
    checked = subprocess.run([sys.executable, TRAIN, *args, "--print-config"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and f"# {line}" in checked.stdout, checked.stdout + checked.stderr
    trained = subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0 and line in trained.stdout, trained.stdout + trained.stderr
    assert line in (run_dir / "summary.txt").read_text()
