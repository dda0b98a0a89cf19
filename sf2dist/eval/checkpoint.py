"""Backbones rebuilt from training checkpoints, for `sf2dist-eval` and `sf2dist-export`.

A checkpoint is a `torch.save`d dict holding at least

    {"backbone": {"name": str, "kwargs": dict}, "backbone_state": state_dict, ...}

It is read with `torch.load(..., weights_only=True)`, so loading it runs no code from the
file, memory-mapped, so that a large classifier stored beside the backbone is not read; the
backbone is built by the registry function `sf2dist.models.create_backbone(name, **kwargs)`
before the weights are loaded into it.
A training run keeps its checkpoints in `RUN_DIR/checkpoints/step_NNNNNNNN/model.pt` (single
files `RUN_DIR/checkpoints/*.pt` are read too); wherever a checkpoint is asked for, its step
directory may be given instead of its model.pt. What is made from a checkpoint of a run goes
under the run, outside `checkpoints/` (whose old steps training deletes): see `run_of_checkpoint`.
A bare weight file (`--backbone-weights`, `weights_backbone`) is read by
`sf2dist.models.load_backbone_weights`; what is made from it goes beside it, as for a checkpoint
outside a run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint cannot be read or turned into a backbone; the message says why."""


WEIGHTS_EMBEDDING_DIM = 512  # arcface_torch's num_features, the width of its published backbones
_WHAT_TO_PASS = "pass a step directory RUN_DIR/checkpoints/step_N (as training prints it), its model.pt, or --run RUN_DIR"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: `path` itself, or the model.pt of a step directory.

    Raises `CheckpointError` saying what to pass instead for a missing path, a run directory,
    a half-written `.partial-*` directory or a directory without model.pt.
    """
    path = Path(path)
    if path.is_dir():
        if path.name.startswith(".partial-"):
            raise CheckpointError(
                f"{path} is a checkpoint that was never completed (training stopped while writing it); "
                "use a step_N directory beside it"
            )
        if (path / "model.pt").is_file():
            return path / "model.pt"
        if (path / "checkpoints").is_dir():
            raise CheckpointError(f"{path} is a run directory, not a checkpoint: pass --run {path} for its newest checkpoint")
        raise CheckpointError(f"checkpoint directory {path} has no model.pt; {_WHAT_TO_PASS}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {_WHAT_TO_PASS}")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (tensors to CPU) and check it names a backbone and holds its weights.

    `path` is a checkpoint file or a step directory (`checkpoint_file`).
    """
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch reports refused globals and corrupt archives with many types
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:  # torch's own message is a page of advice on loading with weights_only=False
            raise CheckpointError(
                f"cannot load checkpoint {path}: it holds a {refused.group(1)} object, and checkpoints are loaded "
                "without running code from the file (weights_only), so they may hold only tensors, numbers, strings, "
                "lists and dicts, as sf2dist's training writes them"
            ) from err
        raise CheckpointError(f"cannot load checkpoint {path}: {' '.join(str(err).split())}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: a checkpoint must be a dict, found a {type(checkpoint).__name__}")
    spec = checkpoint.get("backbone")
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("kwargs", {}), dict)
    ):
        raise CheckpointError(f"{path}: needs 'backbone': {{'name': str, 'kwargs': dict}}, found {spec!r}")
    if not isinstance(checkpoint.get("backbone_state"), dict):
        raise CheckpointError(f"{path}: needs 'backbone_state' (the backbone's state_dict); keys are {sorted(checkpoint)}")
    return checkpoint


def backbone_factory() -> Callable[..., nn.Module]:
    """`sf2dist.models.create_backbone`, or a `CheckpointError` saying it is not there."""
    try:
        models = importlib.import_module("sf2dist.models")
    except ModuleNotFoundError as err:
        if err.name != "sf2dist.models":
            raise
        raise CheckpointError(
            "this sf2dist has no backbone registry (module sf2dist.models with create_backbone(name, **kwargs)), "
            "so backbones cannot be rebuilt from checkpoints; install a version that has one"
        ) from None
    factory = getattr(models, "create_backbone", None)
    if not callable(factory):
        raise CheckpointError("sf2dist.models has no create_backbone(name, **kwargs) to rebuild backbones with")
    return factory


def build_backbone(checkpoint: dict[str, Any], device: str | torch.device = "cpu", source: str = "checkpoint") -> nn.Module:
    """The backbone a `read_checkpoint` result describes, with its weights, in eval mode on `device`."""
    name, kwargs = checkpoint["backbone"]["name"], checkpoint["backbone"].get("kwargs", {})
    factory = backbone_factory()
    try:
        model = factory(name, **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot build backbone {name!r} with {kwargs}: {err}") from err
    try:
        model.load_state_dict(checkpoint["backbone_state"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: backbone_state does not fit backbone {name!r} {kwargs}: "
            f"{_state_differences(model.state_dict(), checkpoint['backbone_state'])}; the weights were saved from "
            "another architecture than the one the checkpoint names"
        ) from err
    return model.to(device).eval()


def _state_differences(expected: dict[str, Any], saved: dict[str, Any]) -> str:
    """What keeps `saved` from loading into a module whose state_dict is `expected`, in one line."""
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    reshaped = [
        f"{key} saved {list(saved[key].shape)}, built {list(expected[key].shape)}"
        for key in expected
        if key in saved and torch.is_tensor(saved[key]) and saved[key].shape != expected[key].shape
    ]
    parts = [
        f"{len(found)} {what} (e.g. {found[0]})"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if found
    ]
    return ", ".join(parts) or "the weights differ from the model's"


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone of the checkpoint at `path` (a file or step directory), with its weights, in eval mode on `device`."""
    return build_backbone(read_checkpoint(path), device, source=str(path))


def checkpoint_image_size(checkpoint: dict[str, Any]) -> int | None:
    """The height and width of the faces the backbone of a `read_checkpoint` result takes.

    Training builds the backbone with `input_size` = the data's image size, and the registry
    records it in the backbone's spec; None for a checkpoint whose spec has no `input_size`.
    """
    size = checkpoint["backbone"].get("kwargs", {}).get("input_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def checkpoint_step(checkpoint: dict[str, Any]) -> int | None:
    """The optimizer step a training checkpoint was written at, None when it does not say."""
    trainer = checkpoint.get("trainer")
    step = trainer.get("step") if isinstance(trainer, dict) else None
    return step if isinstance(step, int) else None


def run_of_checkpoint(path: str | os.PathLike) -> Path | None:
    """The run directory of the checkpoint file `path`, or None when it is not inside one.

    `RUN_DIR/checkpoints/step_N/model.pt` and `RUN_DIR/checkpoints/NAME.pt` belong to RUN_DIR.
    """
    path = Path(path).resolve()
    checkpoints = path.parent.parent if path.name == "model.pt" else path.parent
    return checkpoints.parent if checkpoints.name == "checkpoints" else None


def checkpoint_name(path: str | os.PathLike) -> str:
    """What names a checkpoint file in the paths made from it: its step directory's name
    (`step_00001200` for `.../step_00001200/model.pt`), else the file's stem."""
    path = Path(path)
    return path.parent.name if path.name == "model.pt" else path.stem


def newest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of a run, in natural order (step_900 before step_1000).

    Training writes `checkpoints/step_NNNNNNNN/model.pt` (see sf2dist/train/checkpoint.py);
    single files `checkpoints/*.pt` are accepted too. Half-written checkpoints
    (`.partial-*` directories) are never picked.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if (run_dir / "model.pt").is_file():
        raise CheckpointError(f"{run_dir} is a checkpoint, not a run directory: pass --checkpoint {run_dir}")
    root = run_dir / "checkpoints"
    candidates = list(root.glob("*.pt")) + [p for p in root.glob("step_*/model.pt")]
    if not candidates:
        raise CheckpointError(
            f"run directory {run_dir} has no checkpoints (checkpoints/step_N/model.pt) yet; training writes one "
            "every run.checkpoint_every steps and at its end"
        )

    def natural(path: Path) -> list:
        name = path.parent.name if path.name == "model.pt" else path.name
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return max(candidates, key=natural)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """--checkpoint PATH | --run RUN_DIR | --backbone-weights PATH --backbone NAME [--embedding-dim N], one
    source required: how sf2dist-eval and sf2dist-export name a model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="a training checkpoint: a step directory RUN_DIR/checkpoints/step_N (as training prints it), its "
        "model.pt, or a .pt file (required unless --run or --backbone-weights is given)",
    )
    source.add_argument(
        "--run",
        type=Path,
        metavar="RUN_DIR",
        help=f"a training run directory: {verb} its newest checkpoint (required unless --checkpoint or "
        "--backbone-weights is given)",
    )
    source.add_argument(
        "--backbone-weights",
        type=Path,
        metavar="PATH",
        help="a weight file of network --backbone: a bare state_dict such as arcface_torch's backbone.pth (a DDP "
        "'module.' prefix is dropped), or an sf2dist checkpoint's backbone (required unless --checkpoint or --run "
        "is given)",
    )
    parser.add_argument(
        "--backbone",
        metavar="NAME",
        help="with --backbone-weights (and required by it): the registered network the file holds, e.g. r50, mbf, "
        "vit_t (no default)",
    )
    parser.add_argument(
        "--embedding-dim",
        type=int,
        metavar="N",
        help=f"with --backbone-weights: the network's embedding width (default {WEIGHTS_EMBEDDING_DIM}, "
        "arcface_torch's)",
    )


def check_weights_arguments(args: argparse.Namespace) -> None:
    """--backbone and --embedding-dim go with --backbone-weights only, and --backbone is required by it."""
    if args.backbone_weights is None:
        given = [option for option, value in (("--backbone", args.backbone), ("--embedding-dim", args.embedding_dim))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} describe(s) the network of --backbone-weights; a checkpoint "
                             "names its own backbone: leave them out, or pass --backbone-weights PATH")
        return
    if args.backbone is None:
        raise ValueError(f"--backbone-weights {args.backbone_weights} needs --backbone NAME, the registered network "
                         "the file holds (e.g. r50, mbf, vit_t; sf2dist's list: sf2dist.models.list_backbones())")
    if args.embedding_dim is None:
        args.embedding_dim = WEIGHTS_EMBEDDING_DIM
    if args.embedding_dim < 1:
        raise ValueError(f"--embedding-dim must be positive, got {args.embedding_dim}")


def weights_backbone(args: argparse.Namespace, input_size: int) -> nn.Module:
    """The network --backbone with the weights of --backbone-weights at `input_size`, in eval mode on CPU."""
    from sf2dist.models import load_backbone_weights  # the registry, imported where it is used (see backbone_factory)

    model = load_backbone_weights(args.backbone, args.backbone_weights, embedding_dim=args.embedding_dim,
                                  input_size=input_size)
    return model.eval()
