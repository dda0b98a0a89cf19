"""sf2dist-synth as a newcomer meets it (issue #16): no empty pair file, options that say
what to add, a re-run that is not an error, and a synth root given as training data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf2dist.data import read_manifest, synth
from tests.test_data_firstday_convert import option_help_entries

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--identities", "3", "--images-per-identity", "2", "--size", "16", "--workers", "0", "--quiet"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = synth.main([*SMALL, *map(str, argv)])
    output = capsys.readouterr()
    return code, output.out, output.err


def test_without_holdout_identities_no_pair_file_is_written_and_the_output_says_so(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, stderr = run(capsys, "--out", out)
    assert code == 0, stderr
    assert stdout == (f"wrote 6 training images of 3 identities to {out / 'train'}; no held-out pair set "
                      f"(pass --holdout-identities 200 --pairs 3000, for example, to also write "
                      f"{out / 'holdout.bin'} for evaluation)\n")
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    assert read_manifest(out / "train").num_samples == 6

    code, stdout, stderr = run(capsys, "--out", out)  # the same set again: nothing to do
    assert code == 0 and stderr == ""
    assert stdout.startswith(f"already written: {out} holds a synthetic set: seed 0, 3 identities x 2 images")
    assert "pass --overwrite to write it again" in stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--holdout-identities", "4"], "--holdout-identities 4 without --pairs would write an empty holdout.bin: "
                                        "add --pairs N (e.g. 3000), or leave out --holdout-identities to write "
                                        "training shards only"),
        (["--pairs", "10"], "--pairs 10 needs held-out identities to draw the pairs from: add "
                            "--holdout-identities N (at least 2, e.g. 200)"),
        (["--holdout-identities", "1", "--pairs", "10"], "--holdout-identities must be 0 or at least 2"),
        (["--images-per-identity", "1"], "--images-per-identity must be at least 2"),
    ],
)
def test_an_empty_or_impossible_pair_set_is_refused_before_anything_is_written(tmp_path, capsys, options, message):
    out = tmp_path / "s"
    code, stdout, stderr = run(capsys, "--out", out, *options)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"sf2dist-synth: error: {message}") and stderr.count("\n") == 1
    assert not out.exists()


def test_with_pairs_the_output_counts_them(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, stderr = run(capsys, "--out", out, "--holdout-identities", "2", "--pairs", "1")
    assert code == 0, stderr
    assert stdout == (f"wrote 6 training images of 3 identities to {out / 'train'} and 1 held-out pair of "
                      f"2 identities to {out / 'holdout.bin'}\n")
    assert sorted(p.name for p in out.iterdir()) == ["holdout.bin", "holdout_pairs.tsv", "train"]


def test_every_option_says_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--help"])
    assert exit_info.value.code == 0
    entries = option_help_entries(capsys.readouterr().out)
    assert len(entries) == 13
    for option, entry in entries.items():
        if option != "-h":
            assert "default" in entry or "required" in entry, entry


def test_training_pointed_at_a_synth_root_is_told_to_use_its_train_folder(tmp_path):
    out = synth.generate(tmp_path / "s", identities=3, images_per_identity=2, holdout_identities=0, pairs=0, size=16)
    settings = [f"data.train={out}", f"run.dir={tmp_path / 'run'}", "logging.wandb_mode=disabled", "eval.benchmarks=[]"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
         *[arg for setting in settings for arg in ("--set", setting)]],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"{out} has no manifest.json but its train/ folder does (an sf2dist-synth output): "
            f"point at {out / 'train'} instead") in proc.stderr
