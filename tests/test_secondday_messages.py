"""A newcomer's second day (issue #23, items 10 and 13): what the commands say, through the commands.

A stop signal outside a scheduler says how to resume and never mentions a requeue; status.json
lists the signals the process got. A config error under a launcher is said once (local rank 0),
and sf2dist.launcher replaces torchrun's failure traceback with one line and the ranks' status.
Lines reach a shared stream whole, as they are written; wandb's end-of-run tables are not
printed; the start-up summary's counts agree with their nouns.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sf2dist import stop
from sf2dist.train import checkpoint
from tests.test_train import DEMO, ROOT, overrides, tiny_data  # noqa: F401  (tiny_data is a fixture)

TRAIN = str(ROOT / "launch" / "train.py")
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SF2DIST_STOP_FILE"))},
       "OMP_NUM_THREADS": "1"}


def _args(data: Path, run_dir: Path, **extra) -> list[str]:
    args = ["--config", DEMO]
    for value in overrides(data, run_dir, **{"eval.benchmarks": "[]", **extra}):
        args += ["--set", value]
    return args


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """stdout as it arrives, up to a line that starts with `prefix`, while `proc` runs."""
    lines, chunks = [], b""
    deadline = time.monotonic() + timeout
    while not (lines and lines[-1].startswith(prefix)):
        assert time.monotonic() < deadline and proc.poll() is None, (prefix, lines)
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunks += os.read(proc.stdout.fileno(), 65536)  # the pipe itself: what the process has written so far
            *complete, chunks = chunks.split(b"\n")
            lines += [line.decode() for line in complete]
    return "".join(f"{line}\n" for line in lines) + chunks.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda sig: sig.name)
def test_a_stop_signal_without_a_scheduler_says_how_to_resume_once_and_status_json_names_it(tiny_data, tmp_path,
                                                                                             sig):
    run_dir = tmp_path / "run"
    buffered = {key: value for key, value in ENV.items() if key != "PYTHONUNBUFFERED"}  # Python's default: a pipe
    proc = subprocess.Popen([sys.executable, TRAIN, *_args(tiny_data, run_dir, **{"run.max_steps": 100000,
                                                                                   "run.log_every": 100000})],
                            cwd=ROOT, env=buffered, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The start-up summary arrives while the run goes on, with no progress line after it to flush
        # stdout: each line is written whole when printed (line-buffered), not held until the process ends
        seen = _read_until(proc, "start: step 0, a new run", 120)
        proc.send_signal(sig)
        rest, err = (text.decode() for text in proc.communicate(timeout=120))
        out = seen + rest
    finally:
        proc.kill()
    assert proc.returncode == stop.EXIT_PREEMPTED, out + err
    status = json.loads((run_dir / "status.json").read_text())
    (saved,) = checkpoint.checkpoint_dirs(run_dir)
    assert status["state"] == "preempted" and status["signals"] == [sig.name], status
    said = [line for line in out.splitlines() if line.startswith("stop signal")]
    assert said == [f"stop signal ({sig.name}): checkpoint written at step {status['step']} in {saved}; rerun the "
                    f"same command to resume"], out
    assert "requeue" not in out + err and "Traceback" not in err, out + err


def test_under_the_batch_script_the_ranks_line_leaves_the_requeue_to_it(monkeypatch, tmp_path):
    monkeypatch.setattr(stop, "_received", ["SIGTERM", "SIGTERM"])
    monkeypatch.setenv("SF2DIST_STOP_FILE", str(tmp_path / "stop-request.5.0"))
    assert stop.stopped_line(7, tmp_path / "step_00000007") == (
        f"stop signal (SIGTERM): checkpoint written at step 7 in {tmp_path / 'step_00000007'}")
    monkeypatch.setattr(stop, "_received", [f"file {tmp_path / 'stop-request.5.0'}"])
    assert stop.stopped_line(7, "D").startswith(f"stop signal (the stop request file {tmp_path / 'stop-request.5.0'}):")
    monkeypatch.setattr(stop, "_received", [])  # rank 0 stopped because another rank was asked to
    monkeypatch.delenv("SF2DIST_STOP_FILE")
    assert stop.stopped_line(7, "D") == ("stop signal (received by another rank): checkpoint written at step 7 in D; "
                                         "rerun the same command to resume")


def _torchrun(launcher: str) -> list[str]:
    return [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("launcher", ["sf2dist.launcher", "torch.distributed.run"])
def test_a_config_error_under_a_launcher_is_said_once(tiny_data, tmp_path, launcher):
    args = _args(tiny_data, tmp_path / "run", **{"run.max_stpes": 3})
    done = subprocess.run([*_torchrun(launcher), TRAIN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    error = ("train.py: config error: unknown key 'run.max_stpes' in --set run.max_stpes=3; did you mean "
             "'run.max_steps'?")
    assert (done.stdout + done.stderr).count("config error") == 1, done.stdout + done.stderr
    assert error in done.stderr.splitlines()
    if launcher == "sf2dist.launcher":  # one line for torchrun's ~30-line ChildFailedError traceback; the ranks' status
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"sf2dist.launcher: {TRAIN} exited with status 2: a usage, config, data or checkpoint error before "
            f"training started; the ranks' message above says what to change"), done.stderr
    else:  # plain torchrun keeps its own report and status
        assert done.returncode == 1 and "ChildFailedError" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_usage_error_under_a_launcher_is_said_once(tmp_path):
    done = subprocess.run([*_torchrun("sf2dist.launcher"), TRAIN, "--confg", "x.yaml"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("train.py: error: unrecognized arguments: --confg x.yaml") == 1, done.stderr
    assert done.stderr.count("usage: train.py") == 1 and "Traceback" not in done.stderr, done.stderr


def test_wandb_writes_its_run_but_the_output_ends_with_the_result(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(tiny_data, run_dir, **{"run.max_steps": 2, "logging.wandb_mode": "offline",
                                        "eval.benchmarks": f"[{tiny_data / 'holdout.bin'}]"})
    env = {key: value for key, value in ENV.items() if not key.startswith("WANDB_")}
    done = subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"run directory: {run_dir} (2 steps, 0 skipped)", done.stdout
    assert "Run history" not in done.stdout + done.stderr and "Run summary" not in done.stdout + done.stderr
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # offline, and its files are there
    assert list(wandb_run.glob("run-*.wandb")), sorted(wandb_run.iterdir())


def test_the_start_up_summary_counts_agree_with_their_nouns(tiny_data, tmp_path):
    # 320 images in one batch of 320: one step per epoch, one step, one epoch
    args = _args(tiny_data, tmp_path / "run", **{"data.batch_size": 320, "run.max_steps": 1})
    done = subprocess.run([sys.executable, TRAIN, *args, "--print-config"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("# batch: 320 per rank x 1 rank(s) x 1 accumulation = 320 images per step; 1 step per epoch; 1 step "
            "(1 epoch)") in done.stdout.splitlines(), done.stdout
    assert f"# data: {tiny_data / 'train'}: 320 images of 40 classes, 32x32" in done.stdout.splitlines()


@pytest.mark.parametrize("who", ["torchrun", "the ranks"])
def test_a_stop_signal_under_the_launcher_ends_with_one_line_of_its_own(tiny_data, tmp_path, who):
    """SIGTERM to torchrun (it passes it on) or to the ranks themselves (torchrun sees them exit 75): rank 0 says
    where the checkpoint is and how to resume, the launcher one line instead of torchrun's traceback."""
    from sf2dist.launcher import live_children

    run_dir = tmp_path / "run"
    args = _args(tiny_data, run_dir, **{"run.max_steps": 100000, "run.log_every": 100000})
    proc = subprocess.Popen([*_torchrun("sf2dist.launcher"), TRAIN, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        seen = _read_until(proc, "start: step 0, a new run", 120)
        for pid in [proc.pid] if who == "torchrun" else live_children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        rest, err = (text.decode() for text in proc.communicate(timeout=120))
    finally:
        proc.kill()
    status = json.loads((run_dir / "status.json").read_text())
    (saved,) = checkpoint.checkpoint_dirs(run_dir)
    assert status["state"] == "preempted" and status["signals"] == ["SIGTERM"], status
    said = [line for line in (seen + rest).splitlines() if line.startswith("stop signal")]
    assert said == [f"stop signal (SIGTERM): checkpoint written at step {status['step']} in {saved}; rerun the same "
                    f"command to resume"], seen + rest
    assert "Traceback" not in err and "requeue" not in seen + rest + err, err
    if who == "torchrun":
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.splitlines()[-1] == (
            "sf2dist.launcher: torchrun got SIGTERM and passed it on to the ranks; their lines above say where they "
            "stopped (a rank still running --shutdown-timeout seconds later was killed)"), err
    else:
        assert proc.returncode == stop.EXIT_PREEMPTED, err
        assert err.splitlines()[-1] == (f"sf2dist.launcher: {TRAIN} exited with status 75: stopped for a stop signal "
                                        f"after writing the checkpoint (rank 0's line says where)"), err
