"""The backbone registry, and the argument and size checks every backbone shares.

A backbone is registered under a name by decorating a builder function whose arguments are
all keywords with defaults (at least `embedding_dim` and `input_size`). Building through the
registry records `{"name": ..., "kwargs": ...}` on the module, defaults included, so a
checkpoint can store that spec and rebuild the same architecture even after a default changes.
"""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)
Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {}
# Where a registry-built module keeps its spec; read it with `backbone_spec(model)`.
_SPEC_ATTRIBUTE = "backbone_spec"


def register_backbone(name: str) -> Callable[[Callable[..., ModuleT]], Callable[..., ModuleT]]:
    """Register `builder` as backbone `name`; the returned builder records its spec on each model."""

    def decorator(builder: Callable[..., ModuleT]) -> Callable[..., ModuleT]:
        if name in _BUILDERS:
            raise ValueError(f"backbone name {name!r} is already registered; pick another name")
        signature = inspect.signature(builder)
        accepted = ", ".join(signature.parameters)

        @functools.wraps(builder)
        def build(**kwargs: Any) -> ModuleT:
            try:
                bound = signature.bind(**kwargs)
            except TypeError as err:
                raise TypeError(f"backbone {name!r}: {err}; it accepts the keyword arguments {accepted}") from None
            bound.apply_defaults()
            model = builder(**bound.arguments)
            setattr(model, _SPEC_ATTRIBUTE, {"name": name, "kwargs": dict(bound.arguments)})
            return model

        _BUILDERS[name] = build
        return build

    return decorator


def backbone_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments backbone `name`'s builder takes, in order (ValueError for an unknown name)."""
    return tuple(inspect.signature(_builder(name)).parameters)


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_BUILDERS)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as `name` with `kwargs` (embedding_dim, input_size, ...)."""
    return _builder(name)(**kwargs)


def _builder(name: str) -> Builder:
    builder = _BUILDERS.get(name)
    if builder is None:
        close = difflib.get_close_matches(str(name), _BUILDERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown backbone {name!r}; {hint}registered backbones: {', '.join(list_backbones())}")
    return builder


def backbone_spec(model: nn.Module) -> dict[str, Any]:
    """`{"name": str, "kwargs": dict}` that rebuilds `model`'s architecture via `create_backbone`."""
    spec = getattr(model, _SPEC_ATTRIBUTE, None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} was not built by sf2dist.models.create_backbone, so it has no spec; "
            "build it through the registry (and pass the unwrapped module, e.g. ddp_model.module)"
        )
    return copy.deepcopy(spec)


def check_positive_int(argument: str, value: Any) -> int:
    """`value` if it is a positive int (bools refused), else a `ValueError` naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


def check_dropout(value: Any) -> float:
    """`value` as a float if it is a probability in [0, 1), else a `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {value!r}")
    return float(value)


def halved_size(size: int, times: int) -> int:
    """Side of a feature map after `times` stride-2 convolutions with 'same' padding (ceil(n / 2))."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def check_images(images: torch.Tensor, input_size: int) -> None:
    """Raise a `ValueError` unless `images` is [B, 3, input_size, input_size].

    The backbones size a layer from `input_size`, so another size would otherwise fail
    later with an opaque shape error from inside torch. Skipped under `torch.jit.trace`,
    whose graph is fixed to the example's size anyway and which warns about shape tests.
    """
    if torch.jit.is_tracing():
        return
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != input_size or images.shape[3] != input_size:
        raise ValueError(
            f"expected images [batch, 3, {input_size}, {input_size}], got {list(images.shape)}; "
            f"the backbone was built with input_size={input_size}, build it with the size of your images"
        )
