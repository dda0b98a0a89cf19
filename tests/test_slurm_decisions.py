"""What launch/slurm/train.sbatch decides in Python, without a cluster: may a job start, and
is a stopped run requeued (only a "preempted" status written by this very job and restart)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf2dist import slurm
from sf2dist.config import load_config

JOB = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}
ROOT = Path(__file__).resolve().parents[1]


def _status(tmp_path, **record):
    (tmp_path / "status.json").write_text(json.dumps(record))
    return tmp_path


def test_requeue_only_a_preemption_of_this_job_and_restart(tmp_path):
    preempted = {"state": "preempted", "step": 7, "total_steps": 9, "slurm_job_id": "42", "slurm_restart_count": 1}
    decision, why = slurm.should_requeue(_status(tmp_path, **preempted), JOB)
    assert decision and why == "preempted at step 7 of 9 with a checkpoint; requeueing job 42, which resumes from it"
    for changed, words in [({"slurm_restart_count": 0}, "not by this job 42 restart 1"),
                           ({"slurm_job_id": "41"}, "written by job 41"),
                           ({"state": "running"}, "state is 'running'"),
                           ({"state": "finished"}, "state is 'finished'"),
                           ({"state": "failed", "error": "ValueError: bad label"}, "ValueError: bad label")]:
        decision, why = slurm.should_requeue(_status(tmp_path, **{**preempted, **changed}), JOB)
        assert not decision and words in why, why


@pytest.mark.parametrize("error, lost", [
    ("RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:4242: Connection reset by peer", True),
    ("RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation", True),
    ("ValueError: label 9 out of range", False),
])
def test_a_lost_peer_is_not_requeued_by_the_script_and_the_log_says_how_to_go_on(tmp_path, error, lost):
    # Slurm itself requeues a job whose node failed (--requeue); a peer's crash must not loop
    failed = {"state": "failed", "step": 60, "error": error, "slurm_job_id": "42", "slurm_restart_count": 1}
    decision, why = slurm.should_requeue(_status(tmp_path, **failed), {**JOB, "SLURM_JOB_NUM_NODES": "2"})
    assert not decision and error in why
    advice = "scancel 42 and submit the same command with --nodes=M"
    assert (advice in why and "waits until 2 nodes are up" in why) == lost, why


@pytest.mark.parametrize("cancelled", [None, "SIGTERM"])
def test_the_requeue_command_says_once_what_happens_after_a_stop(tmp_path, cancelled):
    """What train.sbatch runs last: a USR1 it forwarded requeues; a TERM it got itself (scancel) does not,
    and the job ends with the ranks' status 75; either way one line says so."""
    preempted = {"state": "preempted", "step": 7, "total_steps": 9, "slurm_job_id": "42", "slurm_restart_count": 1,
                 "signals": ["SIGTERM"] if cancelled else ["SIGUSR1"]}
    _status(tmp_path, **preempted)
    argv = [sys.executable, "-m", "sf2dist.slurm", "requeue", str(tmp_path)] + (["--cancelled", cancelled]
                                                                             if cancelled else [])
    done = subprocess.run(argv, env={**os.environ, **JOB}, capture_output=True, text=True, timeout=60)
    expected = {
        None: (0, "sf2dist: requeue: preempted at step 7 of 9 with a checkpoint; requeueing job 42, which resumes "
                  "from it"),
        "SIGTERM": (75, "sf2dist: no requeue: the job got SIGTERM (scancel, the time limit itself, or a preemption "
                        "that cancels) and stopped at step 7 of 9 with a checkpoint; the same sbatch command resumes "
                        "from it"),
    }[cancelled]
    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (expected[0], [expected[1]], "")
    # a TERM before the ranks got to a checkpoint: no requeue, and the job's status is srun's (1)
    _status(tmp_path, **{**preempted, "state": "running"})
    done = subprocess.run(argv, env={**os.environ, **JOB}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == "sf2dist: no requeue: the run's state is 'running' at step 7\n"


FORWARD = """
set -u
eval "$(sed -n '/^forward() {/,/^}/p' launch/slurm/train.sbatch)"   # the script's own function
STOP_REQUESTED=""; CANCELLED=""; SF2DIST_STOP_FILE="$STOP_FILE"; SLURM_JOB_ID=42
"$PYTHON" -c 'import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: print("srun got USR1", flush=True))
signal.signal(signal.SIGTERM, lambda *a: print("srun got TERM", flush=True))
print("ready", flush=True); time.sleep(1.2)' &
SRUN_PID=$!
sleep 0.5
forward "$1"
wait $SRUN_PID
echo "CANCELLED=$CANCELLED"
"""


@pytest.mark.parametrize("got, scancel_works", [("USR1", True), ("TERM", True), ("USR1", False), ("TERM", False)])
def test_the_batch_script_forwards_the_very_signal_it_got(tmp_path, got, scancel_works):
    """train.sbatch's `forward`, run as it is: the ranks get the signal the job got (status.json lists what they
    received), via scancel; when scancel cannot (a job Slurm is ending already), a USR1 goes to srun, which passes
    it on, but a TERM never does: srun would end the step after KillWait, and Slurm signals the ranks itself."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scancel").write_text(f"#!/bin/sh\necho \"scancel $*\" >> {tmp_path / 'calls'}\nexit "
                                   f"{0 if scancel_works else 1}\n")
    (stubs / "scancel").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "STOP_FILE": str(tmp_path / "stop-request.42.0")}
    done = subprocess.run(["bash", "-c", FORWARD, "forward", got], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text() == f"scancel --signal={got} 42\n"
    assert (tmp_path / "stop-request.42.0").read_text() == f"{got}\n"
    srun_got = [line for line in done.stdout.splitlines() if line.startswith("srun got")]
    assert srun_got == ([] if scancel_works or got == "TERM" else ["srun got USR1"]), done.stdout
    assert done.stdout.splitlines()[-1] == f"CANCELLED={1 if got == 'TERM' else ''}"
    assert f"sf2dist: {got} received" in done.stdout


def test_no_status_or_a_broken_one_never_requeues(tmp_path):
    decision, why = slurm.should_requeue(tmp_path, JOB)
    assert not decision and "does not exist" in why
    (tmp_path / "status.json").write_text('{"state": "preem')  # never half-written by the trainer, but still
    decision, why = slurm.should_requeue(tmp_path, JOB)
    assert not decision and "unreadable" in why


def _config(tmp_path, **settings):
    train = tmp_path / "train"
    train.mkdir(exist_ok=True)
    (train / "manifest.json").write_text("{}")
    values = {"data.train": str(train), "engine.device": "cpu", "eval.benchmarks": "[]", **settings}
    return load_config([], [f"{k}={v}" for k, v in values.items()])


def test_ready_checks_data_benchmarks_and_cuda(tmp_path):
    slurm.check_ready(_config(tmp_path))
    slurm.check_ready(_config(tmp_path, **{"engine.device": "cuda"}), cuda_available=True)
    with pytest.raises(slurm.NotReady, match="no manifest.json there"):
        slurm.check_ready(_config(tmp_path, **{"data.train": str(tmp_path / "elsewhere")}))
    raw = tmp_path / "faces" / "person_0"
    raw.mkdir(parents=True)
    (raw / "0.jpg").write_bytes(b"")
    with pytest.raises(slurm.NotReady, match="raw images, not shards; convert them first with sf2dist-convert folder"):
        slurm.check_ready(_config(tmp_path, **{"data.train": str(tmp_path / "faces")}))
    with pytest.raises(slurm.NotReady, match="lfw.bin not found"):
        slurm.check_ready(_config(tmp_path, **{"eval.benchmarks": f"[{tmp_path / 'lfw.bin'}]"}))
    for device in ("cuda", "auto"):  # auto on a GPU job that got no GPU would train on the CPU for days
        with pytest.raises(slurm.NotReady, match=f"engine.device={device} wants CUDA"):
            slurm.check_ready(_config(tmp_path, **{"engine.device": device}), cuda_available=False)


def test_prepare_prints_the_run_directory_or_says_what_is_wrong(tmp_path, capsys):
    train = tmp_path / "train"
    train.mkdir()
    (train / "manifest.json").write_text("{}")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"data": {"train": str(train)}, "engine": {"device": "cpu"},
                                  "run": {"dir": str(tmp_path / "run")}, "eval": {"benchmarks": []}}))
    assert slurm.main(["prepare", str(config), "--set", "optim.lr=0.2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run")
    assert slurm.main(["prepare", str(config), "--set", "optim.lrr=0.2"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert slurm.main(["prepare", str(config), "--resume"]) == 2
    assert "unexpected argument '--resume'" in capsys.readouterr().err


def test_a_stop_request_file_counts_as_a_stop_signal(tmp_path, monkeypatch):
    """train.sbatch writes it before signalling: a rank started after the signal still stops."""
    from sf2dist import stop

    monkeypatch.setattr(stop, "_received", [])
    monkeypatch.setenv("SF2DIST_STOP_FILE", str(tmp_path / "stop-request.7.0"))
    assert not stop.check_file()
    (tmp_path / "stop-request.7.0").write_text("USR1\n")
    assert stop.check_file() and stop.received() == [f"file {tmp_path / 'stop-request.7.0'}"]
    monkeypatch.setenv("SF2DIST_STOP_FILE", "")
    monkeypatch.setattr(stop, "_received", [])
    assert not stop.check_file()
