"""Everything a run needs is checked before its first step, and each refusal says what to set:
backbone arguments, YAML syntax, benchmarks, class counts, DeepSpeed without torchrun; the
warnings for head keys and oversized batches; --print-config and --help. Through launch/train.py."""
from __future__ import annotations

import pickle
import re

import pytest
import yaml

from sf2dist.config import config_to_dict, load_config
from tests.test_firstday_resume import launch_main, launch_train, settings
from tests.test_train import DEMO, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_backbone_arguments_are_checked_before_anything_is_built(tiny_data, tmp_path, capsys):
    status, out, err = launch_main([*settings(tiny_data, tmp_path / "run"), "--set", "model.backbone=mobilefacenet"],
                                   capsys)
    assert status == 2, out + err
    assert ("train.py: config error: model.kwargs.input_pool: backbone mobilefacenet has no argument 'input_pool' "
            f"(model.kwargs from {DEMO}, model.backbone from --set model.backbone=mobilefacenet); mobilefacenet "
            "takes nothing besides embedding_dim, input_size, which the trainer sets. Remove model.kwargs.input_pool, "
            "e.g. --set model.kwargs={} to clear them all") in err
    status, _, err = launch_main([*settings(tiny_data, tmp_path / "run"), "--set", "model.kwargs.widht=8"], capsys)
    assert status == 2
    assert "model.kwargs.widht: backbone smallcnn has no argument 'widht'" in err
    assert "did you mean 'width'? smallcnn takes width, input_pool (and embedding_dim, input_size" in err
    status, _, err = launch_main([*settings(tiny_data, tmp_path / "run"), "--set", "model.backbone=resnet50"], capsys)
    assert status == 2
    assert "config error: model.backbone: unknown backbone 'resnet50'" in err and "registered backbones:" in err
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  dir: runs/x\n epochs: 3\n")
    status, _, err = launch_main(["--config", path], capsys)
    assert status == 2
    assert err.startswith(f"train.py: config error: {path}, line 3, column 2: not valid YAML: expected <block end>, "
                          f"but found '<block mapping start>' (while parsing a block mapping at line 1, column 1)\n")
    assert err.endswith("\n     epochs: 3\n     ^\n")  # the line, and a caret under the spot
    path.write_text("data: [1, 2\n")
    status, _, err = launch_main(["--config", path], capsys)
    assert status == 2
    assert f"config error: {path}, line 2, column 1 (the end of the file): not valid YAML" in err
    assert "(while parsing a flow sequence at line 1, column 7)\n    data: [1, 2\n" in err


def test_a_benchmark_that_cannot_be_read_stops_the_run_before_its_first_step(tiny_data, tmp_path, capsys):
    empty = tmp_path / "holdout.bin"
    empty.write_bytes(pickle.dumps(([], []), protocol=4))
    run_dir = tmp_path / "run"
    status, out, err = launch_main(settings(tiny_data, run_dir, **{"eval.benchmarks": f"[{empty}]"}), capsys)
    assert status == 2, out + err
    assert (f"train.py (rank 0): eval.benchmarks: {empty}: needs an even, non-zero number of images (two per pair), "
            f"found 0. Replace the file, or remove it from eval.benchmarks") in err
    assert not run_dir.exists()  # no step, no status, no checkpoint
    # --print-config finds it as well
    status, out, err = launch_main([*settings(tiny_data, run_dir, **{"eval.benchmarks": f"[{empty}]"}),
                                    "--print-config"], capsys)
    assert status == 2 and f"eval.benchmarks: {empty}: needs an even, non-zero number of images" in err


def test_a_class_count_mismatch_says_what_to_set(tiny_data, tmp_path, capsys):
    status, _, err = launch_main(settings(tiny_data, tmp_path / "run", **{"data.num_classes": 41}), capsys)
    assert status == 2
    assert (f"data.num_classes=41 does not match the 40 classes of {tiny_data / 'train' / 'manifest.json'}: set "
            f"data.num_classes=40 or remove it") in err


def test_deepspeed_without_torchrun_says_which_command_to_run(tiny_data, tmp_path, capsys):
    argv = [*settings(tiny_data, tmp_path / "run"), "--set", "engine.type=deepspeed"]
    status, _, err = launch_main(argv, capsys)
    assert status == 2
    assert "engine.type deepspeed needs a process group, even on one GPU, and this process was started without " \
           "torchrun or srun" in err
    assert "  torchrun --nproc_per_node=NUM_GPUS launch/train.py --config " in err
    assert "--set engine.type=deepspeed" in err.split("torchrun --nproc_per_node=NUM_GPUS")[1]
    assert "or train without DeepSpeed: --set engine.type=ddp" in err


def test_print_config_prints_the_resolved_config_and_checks_without_training(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = settings(tiny_data, run_dir, **{"eval.benchmarks": f"[{tiny_data / 'holdout.bin'}]",
                                           "data.batch_size": 400, "head.s": 30})
    status, out, err = launch_main([*argv, "--print-config"], capsys)
    assert status == 0, err
    resolved = load_config([DEMO], [a for a in argv[2:] if a != "--set"])
    assert yaml.safe_load(out) == config_to_dict(resolved)  # the summary follows as YAML comments
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert comments[0] == "# checked: the data, every benchmark and the run directory; nothing was trained"
    summary = "\n".join(comments)
    for fragment in (f"# run directory: {run_dir}", "# ranks: 1 (single), device cpu, engine ddp, precision fp32",
                     f"# data: {tiny_data / 'train'}: 320 images of 40 classes, 32x32",
                     "# batch: 400 per rank x 1 rank(s) x 1 accumulation = 400 images per step; 1 step per epoch",
                     "# head: sphereface2, margin C, 40 class rows per rank x 128 dims",
                     "# start: step 0, a new run",
                     # item 14: each step repeats samples
                     "# warning: data.batch_size=400 is more than the 320 samples per rank (320 samples over 1 "
                     "rank(s)): each step of 400 images repeats samples (each about 1.2 times); set data.batch_size "
                     "to at most 320",
                     # item 13: a key the chosen head does not read
                     "# warning: head.s=30.0 (from --set head.s=30) is not used: it is a partial_fc setting and "
                     "head.type is sphereface2; remove it"):
        assert fragment in summary, summary
    assert re.search(r"# backbone: smallcnn, [\d,]+ parameters", summary)
    assert not run_dir.exists()  # nothing trained, nothing written


def test_print_config_reports_a_resume_it_would_refuse(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch_main(settings(tiny_data, run_dir), capsys)[0] == 0
    status, out, _ = launch_main([*settings(tiny_data, run_dir), "--print-config"], capsys)
    assert status == 0 and f"# start: step 2, resumed from {run_dir}/checkpoints/step_00000002" in out
    status, _, err = launch_main([*settings(tiny_data, run_dir, **{"optim.lr": 0.05}), "--print-config"], capsys)
    assert status == 2 and "\n  optim.lr: 0.3 -> 0.05\n" in err


def test_help_names_the_docs_the_exit_statuses_and_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch_main(["--help"], capsys)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the option help
    assert "docs/config.md" in text
    for status in ("0 done", "1 failed after training started", "2 config, data or checkpoint error",
                   "75 preempted", "torchrun itself exits 1 when any rank fails"):
        assert status in text, status
    actions = [a for a in launch_train._parser()._actions if a.dest != "help"]
    assert {a.option_strings[0] for a in actions} == {"--config", "--set", "--allow-config-change", "--print-config"}
    for action in actions:
        assert "(default: " in action.help, action.option_strings
        assert " ".join(action.help.split()) in text
