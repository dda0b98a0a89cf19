"""Backbone export: ONNX checked with onnxruntime, TorchScript with torch.jit, and the CLI."""
import sys
import types

import numpy as np
import onnxruntime
import pytest
import torch

from sf2dist.export import ExportMismatchError, check_export, export_backbone, main
from tests.test_eval_extract import TinyCNN


def example(batch=2, seed=0):
    return torch.rand((batch, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_onnx_export_matches_pytorch_at_any_batch_size(tmp_path):
    model = TinyCNN()
    model.train()
    report = export_backbone(model, example(), tmp_path / "tiny.onnx", "onnx")
    assert model.training  # left as it was given
    assert report.checked_batch_sizes == (2, 3) and report.max_abs_error < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["embeddings"]
    x = example(batch=5, seed=1)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_torchscript_export_matches_pytorch(tmp_path):
    model = TinyCNN()
    report = export_backbone(model, example(), tmp_path / "tiny.pt", "torchscript")
    assert report.max_abs_error < 1e-5
    loaded = torch.jit.load(str(tmp_path / "tiny.pt"))
    x = example(batch=4, seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), model.eval()(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_file_that_computes_something_else_is_caught(tmp_path):
    model = TinyCNN()
    export_backbone(model, example(), tmp_path / "tiny.pt", "torchscript")
    with torch.no_grad():
        model.head.bias.add_(0.01)  # the module moves on; the file no longer matches it
    with pytest.raises(ExportMismatchError, match="differs from PyTorch by up to 0.01"):
        check_export(model.eval(), tmp_path / "tiny.pt", "torchscript", [example()])


def test_export_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_backbone(TinyCNN(), example(), tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match=r"batch >= 2.*\(1, 3, 16, 16\)"):
        export_backbone(TinyCNN(), example(batch=1), tmp_path / "x", "onnx")


def test_export_cli_writes_and_describes_the_file(tmp_path, monkeypatch, capsys):
    registry = types.ModuleType("sf2dist.models")
    registry.create_backbone = lambda name, **kwargs: TinyCNN(**kwargs)
    monkeypatch.setitem(sys.modules, "sf2dist.models", registry)
    model = TinyCNN(dim=16, seed=3)
    torch.save({"backbone": {"name": "tiny", "kwargs": {"dim": 16, "seed": 3}}, "backbone_state": model.state_dict()}, tmp_path / "c.pt")
    main(["--checkpoint", str(tmp_path / "c.pt"), "--format", "torchscript", "--image-size", "16"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'c.torchscript.pt'} (torchscript)" in out and "output 'embeddings' [batch, 16]" in out
    x = example(batch=3)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(tmp_path / "c.torchscript.pt"))(x).numpy(), model.eval()(x).numpy(), atol=1e-6)
