"""Checkpoint rotation deletes only what the checkpoint writer created: an export or a note
left in an old checkpoint directory stays, with its directory and a one-line warning."""
from sf2dist.eval import newest_checkpoint
from sf2dist.train.checkpoint import checkpoint_dirs
from tests.test_export_run import save_step

WRITTEN = {"model.pt", "head-00000.pt", "backbone_optimizer.pt"}


def test_rotation_keeps_files_training_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    first = save_step(run, 10, keep=2)
    assert {p.name for p in first.iterdir()} == WRITTEN
    (first / "model.onnx").write_bytes(b"an export")
    (first / "head-00001.pt").write_bytes(b"")  # a head file of an earlier run on two ranks: training's
    save_step(run, 20, keep=2)
    assert capsys.readouterr().err == ""
    save_step(run, 30, keep=2)
    assert [p.name for p in first.iterdir()] == ["model.onnx"] and (first / "model.onnx").read_bytes() == b"an export"
    assert capsys.readouterr().err == (
        f"checkpoint rotation: deleted the training files of {first} but kept the directory: it also holds model.onnx, "
        "which training did not write\n"
    )
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000020", "step_00000030"]
    save_step(run, 40, keep=2)  # step 20 holds only training's files: its directory goes too
    assert not (run / "checkpoints" / "step_00000020").exists() and capsys.readouterr().err == ""
    assert newest_checkpoint(run) == run / "checkpoints" / "step_00000040" / "model.pt"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010", "step_00000030", "step_00000040"]


def test_saving_a_step_again_keeps_what_else_its_directory_holds(tmp_path):
    run = tmp_path / "run"
    final = save_step(run, 10)
    (final / "notes.txt").write_text("keep me")
    assert save_step(run, 10) == final  # the end of a run that resumed at its last step
    assert {p.name for p in final.iterdir()} == WRITTEN | {"notes.txt"}
    assert (final / "notes.txt").read_text() == "keep me"
