"""Backbones as standalone files (ONNX or TorchScript), checked against PyTorch before use.

The exported graph maps `images` float32 [batch, 3, H, W] (RGB, (pixel - 127.5) / 127.5, as
`sf2dist.imageio.to_tensor` prepares them) to `embeddings` [batch, dim], not L2-normalised;
the batch dimension is dynamic. It embeds one image: the flip-test fusion of `sf2dist.eval`
(by default the embedding of the image plus that of its mirror image) is left to the caller.
After writing, the file is run (onnxruntime for ONNX, `torch.jit.load` for TorchScript) on
the example batch and on a batch of another size, and compared with the PyTorch module; a
mismatch raises `ExportMismatchError`.

    sf2dist-export --checkpoint RUN_DIR/checkpoints/step_N | --run RUN_DIR  --format onnx|torchscript
                   [--out PATH] [--image-size N]
    sf2dist-export --backbone-weights backbone.pth --backbone NAME [--embedding-dim N] --format onnx|torchscript
                   [--out PATH] [--image-size N]

H = W = the size the checkpoint's backbone was trained at (its spec's `input_size`). The file
goes to RUN_DIR/export/step_N.onnx (or .torchscript.pt): outside checkpoints/, whose old
steps training deletes. A weight file (a bare state_dict, e.g. arcface_torch's backbone.pth)
is exported as network NAME at --image-size (default 112), beside the file (backbone.pth: backbone.onnx).
User errors end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import contextlib
import inspect
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sf2dist.eval.checkpoint import (
    add_checkpoint_arguments,
    build_backbone,
    check_weights_arguments,
    checkpoint_file,
    checkpoint_image_size,
    checkpoint_name,
    newest_checkpoint,
    read_checkpoint,
    run_of_checkpoint,
    weights_backbone,
)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
DEFAULT_IMAGE_SIZE = 112  # for a checkpoint whose backbone spec records no input_size
# What ONNX export and its check import; all three come with sf2dist's export extra.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_INSTALL = (f"install with: pip install {' '.join(ONNX_PACKAGES)} "
                "(or install sf2dist with its export extra: pip install -e '.[export]')")


class ExportMismatchError(RuntimeError):
    """The exported file computes different embeddings from the PyTorch module."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it reproduces PyTorch."""

    path: Path
    format: str
    checked_batch_sizes: tuple[int, ...]
    max_abs_error: float


class MissingPackageError(ImportError):
    """A package that ONNX export needs is not installed; the message says how to install it."""


def missing_onnx_packages() -> list[str]:
    """The packages of `ONNX_PACKAGES` that cannot be imported here."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _missing(err: ImportError) -> MissingPackageError:
    return MissingPackageError(f"ONNX export needs the packages {', '.join(ONNX_PACKAGES)} ({err}); {ONNX_INSTALL}")


@contextlib.contextmanager
def _quiet_exporter():
    """Without the exporter's notes that are about torch, not this model: a warning per
    torchvision operator it cannot register (torchvision is not a dependency) and a
    FutureWarning from inside torch's pytree. Errors still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")
            yield
    finally:
        registration.setLevel(level)


def _export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    dynamo = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    try:
        with _quiet_exporter():
            if dynamo is not None and dynamo.default is True:  # torch >= 2.9: the torch.export-based exporter
                torch.onnx.export(
                    model,
                    (example_input,),
                    path,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    external_data=False,
                    verbose=False,
                )
            else:  # older torch (e.g. the Docker image's): its default, TorchScript-based exporter
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    **({} if dynamo is None else {"dynamo": False}),
                )
    except ImportError as err:
        raise _missing(err) from err


def _export_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    torch.jit.trace(model, example_input, check_trace=False).save(str(path))


def _run_exported(path: Path, format: str, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError as err:
            raise _missing(err) from err
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] for x in inputs]
    module = torch.jit.load(str(path), map_location="cpu")
    return [module(x).numpy() for x in inputs]


def check_export(
    model: nn.Module, path: str | os.PathLike, format: str, inputs: list[torch.Tensor], atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Run the exported file and `model` (on CPU) on each input; return the largest |difference|.

    Raises `ExportMismatchError` when any output differs by more than `atol + rtol * |torch|`.
    """
    path = Path(path)
    with torch.no_grad():
        expected = [model(x).numpy() for x in inputs]
        actual = _run_exported(path, format, inputs)
    worst = 0.0
    for x, want, got in zip(inputs, expected, actual):
        if got.shape != want.shape:
            raise ExportMismatchError(f"{path}: batch of {len(x)} gives shape {got.shape}, PyTorch gives {want.shape}")
        error = np.abs(got.astype(np.float64) - want)
        worst = max(worst, float(error.max()))
        if np.any(error > atol + rtol * np.abs(want)):
            raise ExportMismatchError(
                f"{path}: on a batch of {len(x)} the {format} output differs from PyTorch by up to {error.max():.3g} "
                f"(allowed {atol} + {rtol} * |output|)"
            )
    return worst


def export_backbone(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    format: str,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportReport:
    """Export `model` (on CPU, in eval mode) to `path` as `format` and check the file (module doc).

    `example_input` is float32 [batch >= 2, 3, H, W]: the exporter treats a batch of one as
    a constant, so a batch of at least two keeps the batch dimension dynamic.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    if example_input.ndim != 4 or example_input.shape[0] < 2:
        raise ValueError(f"example_input must be [batch >= 2, 3, H, W], got {tuple(example_input.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    was_training = model.training
    model.eval()
    try:
        example_input = example_input.detach().cpu().float()
        if format == "onnx":
            _export_onnx(model, example_input, path)
        else:
            _export_torchscript(model, example_input, path)
        generator = torch.Generator().manual_seed(0)
        other_batch = torch.rand((len(example_input) + 1, *example_input.shape[1:]), generator=generator) * 2 - 1
        inputs = [example_input, other_batch]
        error = check_export(model, path, format, inputs, atol, rtol)
    finally:
        model.train(was_training)
    return ExportReport(path, format, tuple(len(x) for x in inputs), error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sf2dist-export", description="Export a checkpoint's backbone, or a weight file, to ONNX or TorchScript.")
    add_checkpoint_arguments(parser, "exports")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help=f"onnx (checked with onnxruntime; needs {', '.join(ONNX_PACKAGES)}) or torchscript (checked with "
        "torch.jit.load); required, no default",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="output file (default: RUN_DIR/export/step_N.onnx or .torchscript.pt for a checkpoint of a run, "
        "outside checkpoints/, whose old steps training deletes; else beside the checkpoint or weight file, "
        "NAME.onnx or NAME.torchscript.pt)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="height and width of the input faces (default: the size the checkpoint's backbone was trained at, "
        f"its input_size; {DEFAULT_IMAGE_SIZE} for a checkpoint that records none and for --backbone-weights). "
        "Another size than the recorded one is an error",
    )
    return parser


def default_out(checkpoint: Path, format: str) -> Path:
    """RUN_DIR/export/step_N<suffix> for a checkpoint of a run, else NAME<suffix> beside the checkpoint file."""
    run = run_of_checkpoint(checkpoint)
    folder = run / "export" if run is not None else checkpoint.parent
    return folder / f"{checkpoint_name(checkpoint)}{SUFFIXES[format]}"


def _image_size(checkpoint: dict, path: Path, requested: int | None) -> int:
    """The input size to export at: the checkpoint's, which `requested` (--image-size) must equal."""
    recorded = checkpoint_image_size(checkpoint)
    if requested is not None and requested < 1:
        raise ValueError(f"--image-size must be positive, got {requested}")
    if recorded is None:
        return requested or DEFAULT_IMAGE_SIZE
    if requested is not None and requested != recorded:
        raise ValueError(
            f"--image-size {requested} does not match {path}: its backbone {checkpoint['backbone']['name']!r} was "
            f"trained on {recorded}x{recorded} images (input_size); leave --image-size out to export at {recorded}"
        )
    return recorded


def _embedding_width(model: nn.Module, example: torch.Tensor, path: Path) -> int:
    """The width of `model`'s embeddings, from one run on `example`: an input size it does not
    take is one clear error here, not a page of exporter traceback later."""
    size = example.shape[-1]
    try:
        with torch.no_grad():
            embeddings = model(example)
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the backbone of {path} does not take {size}x{size} images ({reason}); pass --image-size with the size "
            "it was trained at"
        ) from None
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"the backbone of {path} must map images to embeddings [batch, dim]; it returned {shape}")
    return embeddings.shape[1]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_weights_arguments(args)
        if args.backbone_weights is not None:
            path = args.backbone_weights
            path = checkpoint_file(path) if path.is_dir() else path  # a step directory: named by its model.pt
        else:
            path = checkpoint_file(newest_checkpoint(args.run) if args.run is not None else args.checkpoint)
        missing = missing_onnx_packages() if args.format == "onnx" else []
        if missing:  # before any work; names every package at once
            raise MissingPackageError(f"--format onnx needs {', '.join(missing)}, not installed here; {ONNX_INSTALL}")
        if args.backbone_weights is not None:
            if args.image_size is not None and args.image_size < 1:
                raise ValueError(f"--image-size must be positive, got {args.image_size}")
            size = args.image_size or DEFAULT_IMAGE_SIZE
            model = weights_backbone(args, size)
        else:
            checkpoint = read_checkpoint(path)
            size = _image_size(checkpoint, path, args.image_size)
            model = build_backbone(checkpoint, source=str(path))
        example = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1
        dim = _embedding_width(model, example, path)
        report = export_backbone(model, example, args.out or default_out(path, args.format), args.format)
    except (ValueError, ImportError, ExportMismatchError) as err:
        print(f"sf2dist-export: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever raised it
        raise SystemExit(2) from None
    print(
        f"wrote {report.path} ({report.format}) from {path}: input '{INPUT_NAME}' float32 [batch, 3, {size}, {size}] "
        f"RGB scaled (x - 127.5) / 127.5, output '{OUTPUT_NAME}' [batch, {dim}] (not normalised; one image, no flip "
        f"fusion); largest |difference| from PyTorch over batches of {report.checked_batch_sizes}: {report.max_abs_error:.2e}"
    )
