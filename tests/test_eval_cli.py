"""`sf2dist-eval` end to end with a stand-in backbone registry, and its error messages."""
import json
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch

from sf2dist.eval import ExtractOptions, evaluate_pairs, newest_checkpoint
from sf2dist.eval.cli import main
from sf2dist.imageio import encode_jpeg
from tests.test_eval_extract import TinyCNN


@pytest.fixture
def registry(monkeypatch):
    """A stand-in for the future `sf2dist.models` registry, holding only TinyCNN."""

    def create_backbone(name, **kwargs):
        if name != "tiny":
            raise KeyError(f"unknown backbone {name!r}")
        return TinyCNN(**kwargs)

    module = types.ModuleType("sf2dist.models")
    module.create_backbone = create_backbone
    monkeypatch.setitem(sys.modules, "sf2dist.models", module)


def fails(capsys, main, argv) -> str:
    """Run a command line that must end in a user error: exit status 2 and one message line
    (the last on stderr, after any progress lines), which is returned without the program's name."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    message = err.rstrip("\n").splitlines()[-1]
    assert message.startswith(("sf2dist-eval: ", "sf2dist-export: ")) and "Traceback" not in err, err
    return message.split(": ", 1)[1]


def write_checkpoint(path, seed=1):
    model = TinyCNN(dim=16, seed=seed)
    torch.save({"backbone": {"name": "tiny", "kwargs": {"dim": 16}}, "backbone_state": model.state_dict(), "step": 7}, path)
    return model


def write_pairs(path, count=20, seed=0):
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)
    images, issame = [], []
    for i in range(count // 2):
        same = i % 2 == 0
        second = np.clip(faces[2 * i].astype(int) + rng.integers(-20, 21, (16, 16, 3)), 0, 255) if same else faces[2 * i + 1]
        images += [encode_jpeg(faces[2 * i]), encode_jpeg(second.astype(np.uint8))]
        issame.append(same)
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


def test_eval_prints_a_table_and_writes_json_and_roc(tmp_path, registry, capsys):
    model = write_checkpoint(tmp_path / "step_7.pt")
    lfw, cfp = write_pairs(tmp_path / "lfw.bin", seed=0), write_pairs(tmp_path / "cfp.bin", seed=1)
    main(["--checkpoint", str(tmp_path / "step_7.pt"), "--benchmark", str(lfw), str(cfp), "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "1:1 verification (%)" in table and "\nlfw " in table and "\ncfp " in table
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert document["backbone"] == {"name": "tiny", "kwargs": {"dim": 16}} and document["benchmarks"]["lfw"]["world_size"] == 1
    expected = evaluate_pairs(model, lfw, ExtractOptions(batch_size=128))
    assert document["benchmarks"]["lfw"]["accuracy"] == expected["accuracy"]
    assert document["benchmarks"]["lfw"]["tar_at_far"] == expected["tar_at_far"]
    assert f"{100 * expected['accuracy']:.2f} ± {100 * expected['accuracy_std']:.2f}" in table
    assert (tmp_path / "out" / "roc-sum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_directory_uses_its_newest_checkpoint(tmp_path, registry, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for step in (900, 1000, 80):
        write_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step}.pt", seed=step)
    assert newest_checkpoint(tmp_path / "run").name == "step_1000.pt"
    main(["--run", str(tmp_path / "run"), "--benchmark", str(write_pairs(tmp_path / "lfw.bin"))])
    document = json.loads((tmp_path / "run" / "eval" / "step_1000" / "results.json").read_text())
    assert document["checkpoint"].endswith("step_1000.pt")


def test_missing_backbone_registry_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sf2dist.models", None)  # as if sf2dist.models did not exist
    write_checkpoint(tmp_path / "c.pt")
    message = fails(capsys, main, ["--checkpoint", str(tmp_path / "c.pt"), "--benchmark", str(write_pairs(tmp_path / "lfw.bin"))])
    assert "no backbone registry (module sf2dist.models with create_backbone" in message


class NotAWeight:
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state": {}}, r"needs 'backbone': \{'name': str, 'kwargs': dict\}"),
        ({"backbone": {"name": "tiny", "kwargs": {}}}, r"needs 'backbone_state'"),
        ({"backbone": {"name": "resnet", "kwargs": {}}, "backbone_state": {}}, r"cannot build backbone 'resnet'"),
        ({"backbone": {"name": "tiny", "kwargs": {"dim": 8}}, "backbone_state": {}}, r"backbone_state does not fit"),
        ({"backbone": NotAWeight()}, r"cannot load checkpoint .*c.pt"),  # refused by weights_only
    ],
)
def test_bad_checkpoints_are_reported(tmp_path, registry, capsys, content, message):
    torch.save(content, tmp_path / "c.pt")
    error = fails(capsys, main, ["--checkpoint", str(tmp_path / "c.pt"), "--benchmark", str(write_pairs(tmp_path / "lfw.bin"))])
    assert re.search(message, error), error


def test_bad_arguments_are_reported(tmp_path, registry, capsys):
    write_checkpoint(tmp_path / "c.pt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lfw, other_lfw = write_pairs(tmp_path / "a" / "lfw.bin"), write_pairs(tmp_path / "b" / "lfw.bin")
    checkpoint = ["--checkpoint", str(tmp_path / "c.pt")]
    assert "repeated: ['lfw']" in fails(capsys, main, [*checkpoint, "--benchmark", str(lfw), str(other_lfw)])
    assert fails(capsys, main, [*checkpoint, "--benchmark", str(tmp_path / "nowhere.bin")]) == (
        f"benchmark {tmp_path / 'nowhere.bin'} does not exist"
    )
    assert "--nproc (0)" in fails(capsys, main, [*checkpoint, "--benchmark", str(lfw), "--nproc", "0"])
