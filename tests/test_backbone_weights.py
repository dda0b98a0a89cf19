"""Weight files users already have, everywhere a model goes in (#26 item 2): `load_backbone_weights`,
`sf2dist-export` and `sf2dist-eval --backbone-weights`, training's `model.init_from` with
`optim.backbone_lr` and `optim.freeze_backbone_steps`, and the one error of a file that does not fit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sf2dist.config import load_config
from sf2dist.data import synth
from sf2dist.eval import load_backbone
from sf2dist.eval.cli import main as eval_main
from sf2dist.export import main as export_main
from sf2dist.export import missing_onnx_packages
from sf2dist.models import BackboneWeightsError, create_backbone, load_backbone_weights
from sf2dist.train import optim
from sf2dist.train.trainer import initial_backbone
from tests.test_eval_cli import fails
from tests.test_export_run import save_step
from tests.test_train import DEMO, ROOT, _launch, _set_args, overrides

SIZE = 32  # the synthetic set's faces


def _faces(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1


def _save_state(path: Path, name: str, prefix: str = "", **kwargs) -> torch.nn.Module:
    """A trained-looking `name` (random BatchNorm statistics too) saved as a bare state_dict."""
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
    torch.save({prefix + key: value for key, value in model.state_dict().items()}, path)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return synth.generate(out, identities=40, images_per_identity=8, holdout_identities=20, pairs=100, size=SIZE,
                          seed=3, workers=0)


@pytest.mark.parametrize(("name", "size", "prefix"), [("r18", 112, ""), ("mbf", SIZE, "module.")])
def test_a_bare_state_dict_gives_the_same_embeddings(tmp_path, name, size, prefix):
    original = _save_state(tmp_path / "backbone.pth", name, prefix, input_size=size)
    loaded = load_backbone_weights(name, tmp_path / "backbone.pth", input_size=size).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_faces(size)), original(_faces(size)))


def test_an_sf2dist_checkpoint_gives_its_backbone(tmp_path):
    step = save_step(tmp_path / "run", 10)  # smallcnn, embedding 8, width 4, 16x16
    for path in (step, step / "model.pt"):
        loaded = load_backbone_weights("smallcnn", path, embedding_dim=8, input_size=16, width=4).eval()
        with torch.no_grad():
            assert torch.equal(loaded(_faces(16)), load_backbone(step)(_faces(16)))


def test_a_file_that_does_not_fit_names_the_network_the_keys_and_what_it_fits(tmp_path):
    _save_state(tmp_path / "mbf.pth", "mbf")
    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights("r18", tmp_path / "mbf.pth")
    assert str(error.value) == (
        f"{tmp_path / 'mbf.pth'} does not fit backbone r18: 333 tensors against the network's 187, 156 missing "
        "(conv1.weight, bn1.weight, bn1.bias and 153 more); 333 unexpected (layers.0.layers.0.weight, "
        "layers.0.layers.1.weight, layers.0.layers.1.bias and 330 more); the file fits mbf: build that network "
        "instead"
    )
    # sf2dist's own iresnet is the same network under other names: the message says how to rename it
    _save_state(tmp_path / "iresnet18.pth", "iresnet18")
    with pytest.raises(BackboneWeightsError, match="fits iresnet18: .*arcface_keys_from_iresnet for r18"):
        load_backbone_weights("r18", tmp_path / "iresnet18.pth")
    # the right network built with other arguments: the shapes that differ
    _save_state(tmp_path / "r18-256.pth", "r18", embedding_dim=256)
    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights("r18", tmp_path / "r18-256.pth", embedding_dim=512)
    assert "6 of another shape (file vs network) (fc.weight [256, 25088] vs [512, 25088]" in str(error.value)
    assert "its keys are those of r18, with other shapes" in str(error.value)
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(BackboneWeightsError, match="holds a dict with keys \\['epoch'\\], not backbone weights"):
        load_backbone_weights("r18", tmp_path / "other.pt")


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_export_of_a_weight_file_matches_pytorch(tmp_path, capsys, format):
    if format == "onnx" and missing_onnx_packages():
        pytest.skip(f"ONNX export needs {missing_onnx_packages()}")
    model = _save_state(tmp_path / "backbone.pth", "mbf", "module.", input_size=SIZE)
    # export_backbone itself runs the file against PyTorch on two batch sizes and fails on a mismatch
    export_main(["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "mbf", "--format", format,
                 "--image-size", str(SIZE)])
    out = tmp_path / ("backbone.torchscript.pt" if format == "torchscript" else "backbone.onnx")
    assert f"wrote {out} ({format}) from {tmp_path / 'backbone.pth'}" in capsys.readouterr().out
    if format == "torchscript":
        with torch.no_grad():
            np.testing.assert_allclose(torch.jit.load(str(out))(_faces(SIZE)).numpy(), model(_faces(SIZE)).numpy(),
                                       atol=1e-4)
    message = fails(capsys, export_main, ["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "r18",
                                          "--format", format, "--image-size", str(SIZE)])
    assert message.startswith(f"{tmp_path / 'backbone.pth'} does not fit backbone r18 (embedding_dim=512, "
                              f"input_size={SIZE})") and message.endswith("the file fits mbf: build that network instead")
    assert fails(capsys, export_main, ["--backbone-weights", str(tmp_path / "backbone.pth"), "--format", format]) == (
        f"--backbone-weights {tmp_path / 'backbone.pth'} needs --backbone NAME, the registered network the file holds "
        "(e.g. r50, mbf, vit_t; sf2dist's list: sf2dist.models.list_backbones())"
    )


def test_eval_of_a_weight_file_prints_a_table_and_writes_beside_it(tmp_path, tiny_data, capsys):
    _save_state(tmp_path / "backbone.pth", "mbf", input_size=SIZE)
    holdout = tiny_data / "holdout.bin"
    eval_main(["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "mbf", "--image-size", str(SIZE),
               "--benchmark", str(holdout)])
    printed = capsys.readouterr().out
    assert "holdout" in printed and "wrote" in printed, printed
    document = json.loads((tmp_path / "eval" / "backbone" / "results.json").read_text())
    assert document["checkpoint"] == str(tmp_path / "backbone.pth") and document["step"] is None
    assert document["backbone"]["name"] == "mbf" and document["backbone"]["kwargs"]["input_size"] == SIZE
    assert 0.0 <= document["benchmarks"]["holdout"]["accuracy"] <= 1.0
    assert fails(capsys, eval_main, ["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "mbf"]) == (
        f"--backbone-weights {tmp_path / 'backbone.pth'} records no benchmarks to evaluate on; pass --benchmark "
        "FILE_OR_DIR..."
    )
    message = fails(capsys, eval_main, ["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "r18",
                                        "--image-size", str(SIZE), "--benchmark", str(holdout)])
    assert "does not fit backbone r18" in message and "the file fits mbf" in message


def _backbone_parameters(step_dir: Path) -> dict[str, torch.Tensor]:
    """The parameters (not the BatchNorm statistics) of a checkpoint's backbone."""
    model = load_backbone(step_dir)
    return {key: value.detach().clone() for key, value in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_init_from_a_checkpoint_and_a_bare_state_dict_through_train_py(tmp_path, tiny_data):
    # A: an sf2dist run whose backbone B starts from; 2 steps
    first = tmp_path / "first"
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, first, **{"run.max_steps": 2}))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    source = first / "checkpoints" / "step_00000002"
    # B: from A's checkpoint, the head alone for 2 steps, then the backbone too
    second = tmp_path / "second"
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, second, **{
        "run.max_steps": 3, "run.checkpoint_every": 1, "model.init_from": source,
        "optim.freeze_backbone_steps": 2}))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"model.init_from {source}: backbone smallcnn starts from its weights, the head from scratch" in proc.stdout
    started = _backbone_parameters(source)
    assert _same(_backbone_parameters(second / "checkpoints" / "step_00000002"), started)
    assert not _same(_backbone_parameters(second / "checkpoints" / "step_00000003"), started)
    # C: a bare state_dict saved from DDP ('module.'), its own backbone learning rate
    cfg = load_config([DEMO], overrides(tiny_data, tmp_path / "third"))
    bare = _save_state(tmp_path / "smallcnn.pth", "smallcnn", "module.", embedding_dim=cfg.model.embedding_dim,
                       input_size=SIZE, **cfg.model.kwargs)
    third = tmp_path / "third"
    settings = {"run.max_steps": 1, "model.init_from": tmp_path / "smallcnn.pth", "optim.freeze_backbone_steps": 1,
                "optim.backbone_lr": 0.01, "run.log_every": 1}
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, third, **settings))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _same(_backbone_parameters(third / "checkpoints" / "step_00000001"),
                 {key: value for key, value in bare.named_parameters()})
    with open(third / "metrics.csv") as f:
        logged_lr = float(next(csv.DictReader(f))["lr"])
    cfg = load_config([DEMO], overrides(tiny_data, third, **settings))
    assert logged_lr == pytest.approx(0.01 * optim.lr_factor(0, 1, cfg.optim))
    # a resume loads its checkpoint and never reads init_from: the file may be gone
    (tmp_path / "smallcnn.pth").unlink()
    proc = _launch(["--config", DEMO, *_set_args(overrides(tiny_data, third, **{**settings, "run.max_steps": 2}))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not read, the run resumes from its checkpoint" in proc.stdout


def test_init_from_a_file_of_another_network_is_one_error_naming_the_key(tmp_path, tiny_data):
    _save_state(tmp_path / "mbf.pth", "mbf", embedding_dim=128, input_size=SIZE)
    cfg = load_config([DEMO], overrides(tiny_data, tmp_path / "run", **{"model.init_from": tmp_path / "mbf.pth"}))
    with pytest.raises(ValueError) as error:
        initial_backbone(cfg, SIZE, resuming=False)
    assert str(error.value).startswith(
        f"model.init_from: {tmp_path / 'mbf.pth'} does not fit backbone smallcnn (embedding_dim=128, input_size=32, "
        "input_pool=2): ")
    assert str(error.value).endswith("the file fits mbf: build that network instead")
    assert isinstance(initial_backbone(cfg, SIZE, resuming=True), torch.nn.Module)  # a resume never reads it


def test_the_fine_tuning_config_starts_r50_from_a_backbone_pth_with_the_usual_recipe():
    cfg = load_config([ROOT / "configs" / "finetune_r50_sf2.yaml"])
    assert cfg.model.backbone == "r50" and cfg.model.init_from.endswith("backbone.pth")
    assert cfg.head.type == "sphereface2" and cfg.optim.head_lr is None
    assert cfg.optim.backbone_lr < cfg.optim.lr and 0 < cfg.optim.freeze_backbone_steps < cfg.optim.warmup_steps
