"""Re-running a command into a run directory: a resume that would change what the remaining steps
compute is refused with the changed keys, the config history is kept, run.resume=false never
lands on an earlier run. Through launch/train.py's main() in this process (one rank, a few steps).

`launch_main` and `settings` are shared by the other tests/test_firstday_*.py files.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from sf2dist import stop
from sf2dist.config import load_config
from sf2dist.train import checkpoint
from tests.test_train import DEMO, ROOT, tiny_data  # noqa: F401  (tiny_data is a fixture)

_spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
launch_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_train)


def settings(data: Path, run_dir: Path, **extra) -> list[str]:
    """--config DEMO and --set options for a 2-step run on the tiny set, no benchmark."""
    values = {"data.train": data / "train", "eval.benchmarks": "[]", "run.dir": run_dir, "run.max_steps": 2,
              "run.log_every": 1, "data.batch_size": 16, "data.num_workers": 0, "optim.warmup_steps": 1,
              "logging.wandb_mode": "disabled", "logging.progress": False, **extra}
    return ["--config", DEMO, *[arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]]


def launch_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """launch/train.py's main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        status = launch_train.main([str(arg) for arg in argv])
    finally:
        stop.uninstall()  # main installs the stop-signal handlers; pytest keeps its own
    out, err = capsys.readouterr()
    return status, out, err


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_resume_with_other_settings_is_refused_with_the_changed_keys(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, _, err = launch_main(settings(tiny_data, run_dir), capsys)
    assert status == 0, err
    before = _files(run_dir)

    changed = settings(tiny_data, run_dir, **{"optim.lr": 0.05, "head.m": 0.3, "data.batch_size": 8})
    status, out, err = launch_main(changed, capsys)
    assert status == 2, out + err
    assert f"{run_dir}/checkpoints/step_00000002 was trained with other settings than this command's" in err
    for line in ("\n  data.batch_size: 16 -> 8\n", "\n  head.m: 0.1 -> 0.3\n", "\n  optim.lr: 0.3 -> 0.05\n"):
        assert line in err, err
    assert "--set run.dir=NEW_DIR" in err
    assert "--allow-config-change data.batch_size,head.m,optim.lr" in err
    assert _files(run_dir) == before  # nothing written: no config.yaml, status or checkpoint touched


def test_allowed_changes_resume_and_keep_the_config_history(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch_main(settings(tiny_data, run_dir), capsys)[0] == 0
    first_config = (run_dir / "config.yaml").read_text()

    # run.max_steps may always change; optim.lr and data.batch_size only when named (repeated or a comma list)
    more = settings(tiny_data, run_dir, **{"run.max_steps": 3, "optim.lr": 0.05, "data.batch_size": 8})
    status, out, err = launch_main([*more, "--allow-config-change", "optim.lr,head.m",
                                    "--allow-config-change", "data.batch_size"], capsys)
    assert status == 0, out + err
    changes = "run.max_steps: 2 -> 3; data.batch_size: 16 -> 8; optim.lr: 0.3 -> 0.05"
    assert f"changed since that checkpoint: {changes}" in out
    assert json.loads((run_dir / "status.json").read_text())["step"] == 3
    assert (run_dir / "config.yaml").read_text() == first_config  # the config steps 1-2 were trained with
    history = run_dir / "config.step_00000002.yaml"
    assert history.read_text().startswith(
        f"# The config of the steps after 2, resumed from {run_dir}/checkpoints/step_00000002 with these changes:\n"
        "#   run.max_steps: 2 -> 3\n#   data.batch_size: 16 -> 8\n#   optim.lr: 0.3 -> 0.05\n")
    resumed = load_config([history])
    assert (resumed.optim.lr, resumed.data.batch_size, resumed.run.max_steps) == (0.05, 8, 3)
    assert load_config([run_dir / "config.yaml"]).optim.lr == 0.3

    # The same command again: the checkpoint holds these settings now; nothing left to train, nothing rewritten.
    status, out, err = launch_main([*more, "--allow-config-change", "optim.lr,data.batch_size"], capsys)
    assert status == 0, err
    assert "nothing to train: the run is at step 3 and has 3 steps; raise run.max_steps or run.epochs" in out
    assert f"(config: {history})" in out
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.step_00000002.yaml", "config.yaml"]


def test_only_resume_safe_keys_change_without_asking(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch_main(settings(tiny_data, run_dir), capsys)[0] == 0
    free = {"run.max_steps": 3, "run.log_every": 2, "run.checkpoint_every": 1, "run.keep_checkpoints": 2,
            "data.num_workers": 1, "eval.batch_size": 8, "logging.wandb_project": "other"}
    status, out, err = launch_main(settings(tiny_data, run_dir, **free), capsys)
    assert status == 0, out + err
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["step_00000002", "step_00000003"]


def test_run_resume_false_never_lands_on_an_earlier_run(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch_main(settings(tiny_data, run_dir), capsys)[0] == 0
    before = _files(run_dir)
    status, out, err = launch_main(settings(tiny_data, run_dir, **{"run.resume": "false"}), capsys)
    assert status == 2, out + err
    assert (f"run.resume=false, but {run_dir}/checkpoints holds 1 checkpoint(s) of an earlier run (the newest: "
            f"step_00000002)") in err
    assert "Start the new run in another directory (--set run.dir=NEW_DIR)" in err
    assert _files(run_dir) == before
    # into a fresh directory it starts a new run, as before
    assert launch_main(settings(tiny_data, tmp_path / "new", **{"run.resume": "false"}), capsys)[0] == 0


def test_allow_config_change_names_only_real_keys(tiny_data, tmp_path, capsys):
    status, _, err = launch_main([*settings(tiny_data, tmp_path / "run"), "--allow-config-change", "optim.lrr"], capsys)
    assert status == 2
    assert "train.py: config error: --allow-config-change optim.lrr: not a config key; did you mean 'optim.lr'?" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_model_is_named_as_such_before_the_setting_list(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch_main(settings(tiny_data, run_dir), capsys)[0] == 0
    status, _, err = launch_main(settings(tiny_data, run_dir, **{"model.embedding_dim": 64}), capsys)
    assert status == 2
    assert "belongs to another model" in err and "Point run.dir at a new directory for a new run" in err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["embedding_dim"] == 128


def test_a_slurm_job_that_would_change_a_runs_settings_fails_before_any_rank_starts(tiny_data, tmp_path, capsys):
    """train.sbatch's `prepare` step applies the same rule, and passes --allow-config-change on."""
    from sf2dist import slurm

    run_dir = tmp_path / "run"
    status, _, err = launch_main(settings(tiny_data, run_dir), capsys)
    assert status == 0, err
    job = [arg for arg in settings(tiny_data, run_dir, **{"optim.lr": 0.05, "run.max_steps": 3}) if arg != "--config"]
    assert job[0] == str(DEMO)
    assert slurm.main(["prepare", *job]) == 2
    err = capsys.readouterr().err
    assert "sf2dist: cannot start:" in err and "\n  optim.lr: 0.3 -> 0.05\n" in err and "\n  run.max_steps" not in err
    assert slurm.main(["prepare", *job, "--allow-config-change", "optim.lr"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir.resolve())
