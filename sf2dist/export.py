"""Backbones as standalone files (ONNX or TorchScript), checked against PyTorch before use.

The exported graph maps `images` float32 [batch, 3, H, W] (RGB, (pixel - 127.5) / 127.5, as
`sf2dist.imageio.to_tensor` prepares them) to `embeddings` [batch, dim]; the batch dimension
is dynamic. It embeds one image: the flip-test fusion of `sf2dist.eval` (embedding of the
image plus that of its mirror image) is left to the caller. After writing, the file is run
(onnxruntime for ONNX, `torch.jit.load` for TorchScript) on the example batch and on a batch
of another size, and compared with the PyTorch module; a mismatch raises `ExportMismatchError`.

    sf2dist-export --checkpoint FILE --format onnx|torchscript [--out PATH] [--image-size 112]
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sf2dist.eval.checkpoint import load_backbone

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class ExportMismatchError(RuntimeError):
    """The exported file computes different embeddings from the PyTorch module."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it reproduces PyTorch."""

    path: Path
    format: str
    checked_batch_sizes: tuple[int, ...]
    max_abs_error: float


def _export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    try:
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
    except ImportError as err:
        raise ImportError(f"ONNX export needs the onnxscript package (pip install onnxscript): {err}") from err


def _export_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    torch.jit.trace(model, example_input, check_trace=False).save(str(path))


def _run_exported(path: Path, format: str, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("checking an ONNX export needs onnxruntime (pip install onnxruntime)") from err
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sf2dist-export", description="Export a checkpoint's backbone to ONNX or TorchScript.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (.pt)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, help="output file (default: beside the checkpoint, .onnx or .torchscript.pt)")
    parser.add_argument("--image-size", type=int, default=112, help="height and width of the input faces (default 112)")
    args = parser.parse_args(argv)
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    out = args.out or args.checkpoint.with_suffix(suffix)
    try:
        model = load_backbone(args.checkpoint)
        example = torch.rand((2, 3, args.image_size, args.image_size), generator=torch.Generator().manual_seed(0)) * 2 - 1
        report = export_backbone(model, example, out, args.format)
    except (ValueError, ExportMismatchError) as err:
        raise SystemExit(f"sf2dist-export: {err}") from None
    with torch.no_grad():
        dim = model(example).shape[1]
    print(
        f"wrote {report.path} ({report.format}): input '{INPUT_NAME}' float32 [batch, 3, {args.image_size}, "
        f"{args.image_size}] RGB scaled (x - 127.5) / 127.5, output '{OUTPUT_NAME}' [batch, {dim}]; "
        f"largest |difference| from PyTorch over batches of {report.checked_batch_sizes}: {report.max_abs_error:.2e}"
    )
