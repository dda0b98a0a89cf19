"""A backbone built by name and started from a weight file the user already has.

`load_backbone_weights(name, path, **kwargs)` is what `sf2dist-eval --backbone-weights`,
`sf2dist-export --backbone-weights` and training's `model.init_from` all use. The file may be

- a bare state_dict (arcface_torch's `backbone.pth` / `model.pt`), also one saved from a DDP
  model, whose keys all start with `module.` (the prefix is dropped);
- an sf2dist training checkpoint (a step directory or its model.pt): its `backbone_state`;
- an arcface_torch training checkpoint (`checkpoint_gpu_N.pt`): its `state_dict_backbone`.

Files are read with `torch.load(weights_only=True)`, so loading one runs no code from it.
A file that does not fit the network is one `BackboneWeightsError` naming the network, the
first missing, unexpected and reshaped keys, and the registered networks whose keys it does
fit (each built on the meta device, so the search allocates nothing).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sf2dist.models.arcface import IRESNET_TO_ARCFACE
from sf2dist.models.registry import create_backbone, list_backbones

# Backbone arguments that every registered network takes, so the closest-fit search can pass them on.
_SHARED_ARGUMENTS = ("embedding_dim", "input_size")
_SHOWN = 3  # keys named per kind of difference


class BackboneWeightsError(ValueError):
    """A weight file cannot be read, or does not fit the network asked for; the message says which fits."""


def read_backbone_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone state_dict a weight file holds (module doc), on CPU, without a `module.` prefix."""
    path = Path(path)
    if path.is_dir():
        # sf2dist.eval imports matplotlib and more; a model package stays light until a directory is given
        from sf2dist.eval.checkpoint import checkpoint_file

        path = checkpoint_file(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights {path} do not exist")
    try:  # a zip archive (torch >= 1.6) is memory-mapped: the head of a checkpoint beside the backbone is not read
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch reports refused globals and corrupt archives with many types
        raise BackboneWeightsError(
            f"cannot load backbone weights {path} with torch.load(weights_only=True): {' '.join(str(err).split())[:300]}"
        ) from err
    if isinstance(saved, dict) and isinstance(saved.get("backbone_state"), dict):
        saved = saved["backbone_state"]  # an sf2dist checkpoint
    elif isinstance(saved, dict) and isinstance(saved.get("state_dict_backbone"), dict):
        saved = saved["state_dict_backbone"]  # an arcface_torch training checkpoint
    if not isinstance(saved, dict) or not saved or not all(
        isinstance(key, str) and torch.is_tensor(value) for key, value in saved.items()
    ):
        found = f"a dict with keys {sorted(map(str, saved))[:5]}" if isinstance(saved, dict) else f"a {type(saved).__name__}"
        raise BackboneWeightsError(
            f"{path} holds {found}, not backbone weights: expected a state_dict (parameter names to tensors), an "
            "sf2dist checkpoint or an arcface_torch checkpoint_gpu_N.pt"
        )
    if all(key.startswith("module.") for key in saved):  # saved from a DistributedDataParallel wrapper
        saved = {key[len("module."):]: value for key, value in saved.items()}
    return saved


def _differences(expected: dict[str, Any], saved: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, reshaped) keys of `saved` against a module's state_dict `expected`.

    A missing BatchNorm `num_batches_tracked` is not counted: files from before it existed load without it.
    """
    missing = [key for key in expected if key not in saved and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in saved if key not in expected]
    reshaped = [
        f"{key} {list(saved[key].shape)} vs {list(expected[key].shape)}"
        for key in expected
        if key in saved and saved[key].shape != expected[key].shape
    ]
    return missing, unexpected, reshaped


def _listed(what: str, keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {what} ({', '.join(keys[:_SHOWN])}{more})"


def _closest_fit(saved: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any]) -> str:
    """Which registered networks `saved` fits, as the end of the mismatch message."""
    shared = {key: value for key, value in kwargs.items() if key in _SHARED_ARGUMENTS}
    fits, same_keys, nearest = [], [], (0, "")
    for candidate in list_backbones():
        try:
            with torch.device("meta"):
                expected = create_backbone(candidate, **(kwargs if candidate == name else shared)).state_dict()
        except (TypeError, ValueError):  # e.g. an input size this network cannot take
            continue
        missing, unexpected, reshaped = _differences(expected, saved)
        if not missing and not unexpected:
            (same_keys if reshaped else fits).append(candidate)
        common = len(expected) - len(missing)
        if common > nearest[0]:
            nearest = (common, f"{candidate} ({common} of its {len(expected)} keys are in the file)")
    if fits:
        hint = f"the file fits {', '.join(fits)}: build that network instead"
        renamed = [IRESNET_TO_ARCFACE[fit] for fit in fits if fit in IRESNET_TO_ARCFACE]
        if renamed:
            hint += (f" (or rename the keys with sf2dist.models.arcface_keys_from_iresnet for {renamed[0]}, the same "
                     "network under arcface_torch's names)")
        return hint
    if same_keys:
        return (f"its keys are those of {', '.join(same_keys)}, with other shapes: it was saved from that network "
                "built with other arguments (embedding_dim, input_size or model.kwargs)")
    if nearest[0]:
        return f"no registered network has these keys; the nearest is {nearest[1]}"
    return "no registered network has any of these keys"


def check_backbone_weights(
    name: str, saved: dict[str, torch.Tensor], source: str | os.PathLike = "the weights", **kwargs: Any
) -> None:
    """Raise `BackboneWeightsError` unless `saved` loads strictly into `create_backbone(name, **kwargs)`."""
    with torch.device("meta"):
        expected = create_backbone(name, **kwargs).state_dict()
    missing, unexpected, reshaped = _differences(expected, saved)
    if missing or unexpected or reshaped:
        parts = [_listed(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                         ("of another shape (file vs network)", reshaped)) if keys]
        arguments = ", ".join(f"{key}={value}" for key, value in kwargs.items())
        raise BackboneWeightsError(
            f"{source} does not fit backbone {name}{f' ({arguments})' if arguments else ''}: {len(saved)} tensors "
            f"against the network's {len(expected)}, {'; '.join(parts)}; {_closest_fit(saved, name, kwargs)}"
        )


def load_backbone_weights(name: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`create_backbone(name, **kwargs)` with the weights of the file at `path` (module doc), on CPU, in train mode."""
    saved = read_backbone_weights(path)
    check_backbone_weights(name, saved, path, **kwargs)
    model = create_backbone(name, **kwargs)
    model.load_state_dict(saved)
    return model
