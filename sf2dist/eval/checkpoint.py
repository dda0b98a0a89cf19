"""Backbones rebuilt from training checkpoints, for `sf2dist-eval` and `sf2dist-export`.

A checkpoint is a `torch.save`d dict holding at least

    {"backbone": {"name": str, "kwargs": dict}, "backbone_state": state_dict, ...}

It is read with `torch.load(..., weights_only=True)`, so loading it runs no code from the
file, memory-mapped, so that a large classifier stored beside the backbone is not read; the backbone is built by the registry function
`sf2dist.models.create_backbone(name, **kwargs)` before the weights are loaded into it.
A training run keeps its checkpoints in `RUN_DIR/checkpoints/*.pt`.
"""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint cannot be read or turned into a backbone; the message says why."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (tensors to CPU) and check it names a backbone and holds its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch reports refused globals and corrupt archives with many types
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
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
        raise CheckpointError(f"{source}: backbone_state does not fit backbone {name!r} {kwargs}: {err}") from err
    return model.to(device).eval()


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone of the checkpoint at `path`, with its weights, in eval mode on `device`."""
    return build_backbone(read_checkpoint(path), device, source=str(path))


def newest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of a run, in natural order (step_900 before step_1000).

    Training writes `checkpoints/step_NNNNNNNN/model.pt` (see sf2dist/train/checkpoint.py);
    single files `checkpoints/*.pt` are accepted too. Half-written checkpoints
    (`.partial-*` directories) are never picked.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    candidates = list(root.glob("*.pt")) + [p for p in root.glob("step_*/model.pt")]
    if not candidates:
        raise CheckpointError(f"run directory {run_dir} has no checkpoints/*.pt")

    def natural(path: Path) -> list:
        name = path.parent.name if path.name == "model.pt" else path.name
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return max(candidates, key=natural)
