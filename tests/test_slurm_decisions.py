"""What launch/slurm/train.sbatch decides in Python, without a cluster: may a job start, and
is a stopped run requeued (only a "preempted" status written by this very job and restart)."""
from __future__ import annotations

import json

import pytest

from sf2dist import slurm
from sf2dist.config import load_config

JOB = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}


def _status(tmp_path, **record):
    (tmp_path / "status.json").write_text(json.dumps(record))
    return tmp_path


def test_requeue_only_a_preemption_of_this_job_and_restart(tmp_path):
    preempted = {"state": "preempted", "step": 7, "total_steps": 9, "slurm_job_id": "42", "slurm_restart_count": 1}
    decision, why = slurm.should_requeue(_status(tmp_path, **preempted), JOB)
    assert decision and "preempted at step 7 of 9" in why
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
