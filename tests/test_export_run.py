"""`sf2dist-export` on checkpoints as training writes them: step directories, --run, the
image size the backbone was trained at, where the file goes, and what rotation leaves alone."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sf2dist.eval import load_backbone
from sf2dist.export import build_parser, export_backbone, main
from sf2dist.heads import SphereFace2Head
from sf2dist.models import create_backbone
from sf2dist.train import checkpoint
from tests.test_eval_cli import fails
from tests.test_eval_extract import TinyCNN

SIZE = 16  # the tiny backbone's input size: what the checkpoints record


class OptimizerFileEngine:
    """Writes what `DDPEngine.save` writes into a checkpoint directory."""

    def save(self, directory, rank):
        torch.save({"optimizer": {}}, directory / "backbone_optimizer.pt")


def save_step(run_dir, step, keep=3, benchmarks=(), input_size=SIZE, flip="sum"):
    """A checkpoint of a one-rank run, written by the trainer's `checkpoint.save`; returns its directory."""
    torch.manual_seed(step)
    backbone = create_backbone("smallcnn", embedding_dim=8, input_size=input_size, width=4)
    head = SphereFace2Head(10, 8)
    config = {"eval": {"benchmarks": [str(path) for path in benchmarks], "flip": flip}}
    return checkpoint.save(
        run_dir / "checkpoints", checkpoint.TrainerState(step=step), rank=0, backbone=backbone, head=head,
        head_optimizer=torch.optim.SGD(head.parameters(), lr=0.1), engine=OptimizerFileEngine(),
        extra={"config": config}, keep=keep,
    )


def faces(batch=3):
    return torch.rand((batch, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_a_step_directory_exports_into_the_runs_export_folder_which_rotation_never_touches(tmp_path, capsys):
    run = tmp_path / "my-run"
    save_step(run, 10)
    step = save_step(run, 20)
    main(["--checkpoint", str(step), "--format", "torchscript"])  # the directory training prints
    out = run / "export" / "step_00000020.torchscript.pt"
    printed = capsys.readouterr().out
    assert f"wrote {out} (torchscript) from {step / 'model.pt'}" in printed
    assert f"float32 [batch, 3, {SIZE}, {SIZE}]" in printed and "[batch, 8] (not normalised" in printed
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(out))(faces()).numpy(), load_backbone(step)(faces()).numpy(), atol=1e-5)
    for later in (30, 40, 50):
        save_step(run, later, keep=2)
    assert not step.exists() and out.is_file()
    assert sorted(p.name for p in (run / "export").iterdir()) == ["step_00000020.torchscript.pt"]


def test_run_exports_its_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "my-run"
    for step in (900, 1000):
        save_step(run, step)
    main(["--run", str(run), "--format", "torchscript"])
    assert f"wrote {run / 'export' / 'step_00001000.torchscript.pt'} (torchscript)" in capsys.readouterr().out


def test_the_image_size_comes_from_the_checkpoint(tmp_path, capsys):
    step = save_step(tmp_path / "my-run", 10)
    out = tmp_path / "tiny.pt"
    main(["--checkpoint", str(step / "model.pt"), "--format", "torchscript", "--out", str(out), "--image-size", str(SIZE)])
    assert out.is_file()
    message = fails(capsys, main, ["--checkpoint", str(step), "--format", "onnx", "--image-size", "112"])
    assert message == (
        f"--image-size 112 does not match {step / 'model.pt'}: its backbone 'smallcnn' was trained on 16x16 images "
        "(input_size); leave --image-size out to export at 16"
    )


@pytest.fixture
def tiny_registry(monkeypatch):
    """A stand-in registry whose backbone records no input_size in its checkpoints."""
    module = types.ModuleType("sf2dist.models")
    module.create_backbone = lambda name, **kwargs: TinyCNN(**kwargs)
    monkeypatch.setitem(sys.modules, "sf2dist.models", module)


def test_an_image_size_the_backbone_does_not_take_is_one_line(tmp_path, tiny_registry, capsys):
    torch.save({"backbone": {"name": "tiny", "kwargs": {}}, "backbone_state": TinyCNN().state_dict()}, tmp_path / "c.pt")
    message = fails(capsys, main, ["--checkpoint", str(tmp_path / "c.pt"), "--format", "onnx"])  # 112 by default
    assert message.startswith(f"the backbone of {tmp_path / 'c.pt'} does not take 112x112 images (mat1 and mat2 shapes")
    assert message.endswith("; pass --image-size with the size it was trained at")
    main(["--checkpoint", str(tmp_path / "c.pt"), "--format", "torchscript", "--image-size", "16"])
    assert (tmp_path / "c.torchscript.pt").is_file()  # no run: beside the checkpoint, as before


def test_checkpoint_paths_that_are_not_checkpoints_say_what_to_pass(tmp_path, capsys):
    run = tmp_path / "my-run"
    step = save_step(run, 10)
    assert fails(capsys, main, ["--checkpoint", str(run), "--format", "onnx"]) == (
        f"{run} is a run directory, not a checkpoint: pass --run {run} for its newest checkpoint"
    )
    assert fails(capsys, main, ["--run", str(step), "--format", "onnx"]) == (
        f"{step} is a checkpoint, not a run directory: pass --checkpoint {step}"
    )
    assert fails(capsys, main, ["--checkpoint", str(run / "checkpoints" / "step_00000011"), "--format", "onnx"]) == (
        f"checkpoint {run / 'checkpoints' / 'step_00000011'} does not exist; pass a step directory "
        "RUN_DIR/checkpoints/step_N (as training prints it), its model.pt, or --run RUN_DIR"
    )
    partial = run / "checkpoints" / ".partial-step_00000020"
    partial.mkdir()
    assert fails(capsys, main, ["--checkpoint", str(partial), "--format", "onnx"]) == (
        f"{partial} is a checkpoint that was never completed (training stopped while writing it); "
        "use a step_N directory beside it"
    )
    assert fails(capsys, main, ["--run", str(tmp_path), "--format", "onnx"]) == (
        f"run directory {tmp_path} has no checkpoints (checkpoints/step_N/model.pt) yet; training writes one every "
        "run.checkpoint_every steps and at its end"
    )


def test_missing_onnx_packages_are_named_with_the_command_that_installs_them(tmp_path, monkeypatch, capsys):
    step = save_step(tmp_path / "my-run", 10)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    assert fails(capsys, main, ["--checkpoint", str(step), "--format", "onnx"]) == (
        "--format onnx needs onnxscript, not installed here; install with: pip install onnx onnxscript onnxruntime "
        "(or install sf2dist with its export extra: pip install -e '.[export]')"
    )
    assert not (tmp_path / "my-run" / "export").exists()


def test_onnx_export_with_the_exporter_of_torch_before_2_9(tmp_path, monkeypatch):
    """Older torch (the Docker image's 2.5) defaults to the TorchScript-based exporter: export
    takes it, with a dynamic batch axis, and onnxruntime checks the file at two batch sizes."""
    current = torch.onnx.export
    calls = []

    def export_before_2_9(model, args, f, *, dynamo=False, **kwargs):
        calls.append((dynamo, kwargs.get("dynamic_axes")))
        return current(model, args, f, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_before_2_9)
    model = TinyCNN()
    report = export_backbone(model, faces(batch=2), tmp_path / "tiny.onnx", "onnx")
    assert calls == [(False, {"images": {0: "batch"}, "embeddings": {0: "batch"}})]
    assert report.checked_batch_sizes == (2, 3) and report.max_abs_error < 1e-4


def option_helps(parser) -> dict[str, str]:
    """Each option of a parser's --help and its help text (wrapped lines joined)."""
    helps, current = {}, None
    for line in parser.format_help().split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            helps[current] = line
        elif current is not None:
            helps[current] += " " + line.strip()
    return helps


def test_every_option_says_its_default():
    helps = option_helps(build_parser())
    assert set(helps) == {"-h", "--checkpoint", "--run", "--backbone-weights", "--backbone", "--embedding-dim",
                          "--format", "--out", "--image-size"}
    for option, text in helps.items():
        assert option == "-h" or "default" in text or "required" in text, text
    assert "RUN_DIR/export/step_N.onnx" in helps["--out"] and "trained at" in helps["--image-size"]


def test_an_onnx_export_prints_its_result_and_nothing_about_torch(tmp_path):
    # torch's exporter logs a warning per torchvision operator it cannot register and a
    # FutureWarning from its pytree: noise around the one line that matters
    import subprocess

    run = tmp_path / "my-run"
    save_step(run, 10)
    export = Path(sys.executable).with_name("sf2dist-export")  # the venv's command, as a user runs it
    done = subprocess.run([str(export), "--run", str(run), "--format", "onnx"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {run / 'export' / 'step_00000010.onnx'} (onnx)" in done.stdout
    assert "torchvision" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
