"""Backbones as standalone files (ONNX or TorchScript), checked against PyTorch before use.

The exported graph maps `images` float32 [batch, 3, H, W] (RGB, (pixel - 127.5) / 127.5, as
`sf2dist.imageio.to_tensor` prepares them) to `embeddings` [batch, dim], not L2-normalised;
the batch dimension is dynamic. It embeds one image: the flip-test fusion of `sf2dist.eval`
(by default the embedding of the image plus that of its mirror image) is left to the caller.
After writing, the file is run (onnxruntime for ONNX, `torch.jit.load` for TorchScript) on
the example batch and on a batch of another size, and compared with the PyTorch module; a
mismatch raises `ExportMismatchError`.

An ONNX file is one self-contained file unless the model's parameters and buffers exceed
`EXTERNAL_DATA_BYTES` (1.5 GiB: vit_h's 3 GB of float32 weights, say): protobuf cannot write a
message over 2 GiB, so torch's exporter then writes the weights to a sidecar FILE.onnx.data
beside FILE.onnx (`external_data_file`), which the .onnx names by its file name alone; keep the
two together. onnxruntime, `onnx.load` and insightface read the sidecar from the .onnx's folder,
and the check against PyTorch runs on the pair as on a single file.

`insightface_route` says what insightface's model zoo (`insightface.model_zoo.get_model(FILE)`)
would make of an exported file, from the file alone: its recognition model (ArcFaceONNX) for
one input [N, 3, S, S] with S >= 112 and S % 16 == 0 (except S = 192, its landmark model), fed
(pixel - 127.5) / 127.5 as sf2dist's files expect; sf2dist-export prints the verdict.

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
import contextlib
import importlib.util
import inspect
import itertools
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
# Above this many bytes of parameters and buffers an ONNX export keeps its weights in a sidecar
# file: protobuf refuses messages over 2 GiB, and the graph itself needs some of that room.
EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB


class ExportMismatchError(RuntimeError):
    """The exported file computes different embeddings from the PyTorch module."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it reproduces PyTorch."""

    path: Path
    format: str
    checked_batch_sizes: tuple[int, ...]
    max_abs_error: float
    external_data: Path | None = None  # the sidecar holding an ONNX file's weights; None when self-contained


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


def model_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers: what an export writes as weights."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def external_data_file(path: str | os.PathLike) -> Path:
    """The sidecar that torch's exporter writes an ONNX file's weights to: FILE.onnx.data beside FILE.onnx."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, external_data: bool = False) -> None:
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
                    external_data=external_data,
                    verbose=False,
                )
            else:  # older torch (e.g. the Docker image's): its default, TorchScript-based exporter, which
                # puts the weights of a model over 2 GiB into files of their own beside the .onnx by itself
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
    a constant, so a batch of at least two keeps the batch dimension dynamic. An ONNX export of
    a model over `EXTERNAL_DATA_BYTES` writes its weights to `external_data_file(path)` as well.
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
    sidecar = None
    try:
        example_input = example_input.detach().cpu().float()
        if format == "onnx":
            external = model_bytes(model) > EXTERNAL_DATA_BYTES
            external_data_file(path).unlink(missing_ok=True)  # an older export's weights, which this one replaces
            _export_onnx(model, example_input, path, external)
            sidecar = external_data_file(path) if external_data_file(path).exists() else None
        else:
            _export_torchscript(model, example_input, path)
        generator = torch.Generator().manual_seed(0)
        other_batch = torch.rand((len(example_input) + 1, *example_input.shape[1:]), generator=generator) * 2 - 1
        inputs = [example_input, other_batch]
        error = check_export(model, path, format, inputs, atol, rtol)
    finally:
        model.train(was_training)
    return ExportReport(path, format, tuple(len(x) for x in inputs), error, sidecar)


# insightface's model zoo routes a file by its first input's height and width, in this order
# (insightface.model_zoo.model_zoo.ModelRouter.get_model); a file with 5 or more outputs is its
# face detector whatever its input.
INSIGHTFACE_DETECTOR_OUTPUTS = 5
INSIGHTFACE_FIXED_SIDES = {192: "Landmark", 96: "Attribute"}
INSIGHTFACE_SWAPPER_SIDE = 128  # with two inputs: the face swapper
# its recognition model takes square inputs of at least 112 whose side is a multiple of 16
INSIGHTFACE_MIN_SIDE, INSIGHTFACE_SIDE_MULTIPLE = 112, 16
# ArcFaceONNX scales pixels (0..255) by (pixel - mean) / std: 127.5 / 127.5, what sf2dist's files expect,
# unless a node named Sub* or _minus* and one named Mul* or _mul* are among the graph's first
# 8 nodes, which it takes for an MXNet file that scales inside (0 / 1).
INSIGHTFACE_SCALING_NODES = 8
SF2DIST_SCALING = (127.5, 127.5)


@dataclass(frozen=True)
class InsightFaceRoute:
    """What `insightface.model_zoo.get_model(FILE)` makes of an ONNX file (see `insightface_route`)."""

    model: str | None  # the class its router returns: "ArcFaceONNX" (recognition), "SCRFD", "Landmark", ...; None
    recognition: bool  # loaded as its recognition model and fed images scaled as the file expects
    reason: str  # one line: why
    input_mean: float | None = None  # ArcFaceONNX's scaling of pixels: (pixel - input_mean) / input_std
    input_std: float | None = None

    def describe(self) -> str:
        """One sentence for sf2dist-export's printed result."""
        verdict = "loads it" if self.recognition else "would not load it"
        return (f"insightface's model zoo (insightface.model_zoo.get_model) {verdict} as its recognition model: "
                f"{self.reason}")


def _dims(value_info) -> list[int | str | None]:
    """A graph input's shape as onnxruntime reports it: ints, names of symbolic dimensions, None where unknown."""
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    return dims


def insightface_route(path: str | os.PathLike) -> InsightFaceRoute:
    """What insightface's model zoo does with the ONNX file at `path`, decided from the file alone.

    insightface's `get_model(FILE)` opens the file and routes it by its outputs and its first
    input's shape [N, C, H, W]: 5 or more outputs to its face detector (SCRFD); H = W = 192 to
    its landmark model, 96 to its attribute model, 128 with two inputs to its face swapper; then
    square inputs with H >= 112 and H % 16 == 0 to its recognition model, ArcFaceONNX; anything
    else to nothing (None). ArcFaceONNX asserts one output, feeds only the first input with
    3-channel images, and picks its pixel scaling from the names of the graph's first 8 nodes
    (`INSIGHTFACE_SCALING_NODES`). `recognition` is true when all of that gives a working
    recognition model fed (pixel - 127.5) / 127.5, the scaling sf2dist's files expect.
    Only the graph is read, not the weights of an external-data file. The rule is that of
    insightface 2.1's router; releases up to 0.7.3 route only H = W = 112 to ArcFaceONNX, so a
    112x112 file is taken by both.
    """
    try:
        import onnx
    except ImportError as err:
        raise _missing(err) from err
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]  # what onnxruntime lists as inputs
    outputs = list(graph.output)
    if len(outputs) >= INSIGHTFACE_DETECTOR_OUTPUTS:
        return InsightFaceRoute("SCRFD", False, f"{len(outputs)} outputs make it insightface's face detector (SCRFD)")
    shape = _dims(inputs[0]) if inputs else []
    if len(shape) != 4:
        return InsightFaceRoute(None, False, f"its first input has shape {shape}, not [N, C, H, W]")
    height, width = shape[2], shape[3]
    if not isinstance(height, int) or not isinstance(width, int):
        return InsightFaceRoute(None, False, f"its input's height and width ({height} x {width}) are not fixed "
                                             "numbers, which insightface reads the image size from")
    side = height if height == width else None
    if side in INSIGHTFACE_FIXED_SIDES:
        model = INSIGHTFACE_FIXED_SIDES[side]
        return InsightFaceRoute(model, False, f"a {side}x{side} input routes to insightface's {model} model")
    if side == INSIGHTFACE_SWAPPER_SIDE and len(inputs) == 2:
        return InsightFaceRoute("INSwapper", False, f"two inputs, the first {side}x{side}, route to insightface's "
                                                    "face swapper (INSwapper)")
    if side is None or side < INSIGHTFACE_MIN_SIDE or side % INSIGHTFACE_SIDE_MULTIPLE:
        return InsightFaceRoute(None, False, f"its input is {height}x{width}; insightface routes to its recognition "
                                             f"model only square inputs of at least {INSIGHTFACE_MIN_SIDE} whose side "
                                             f"is a multiple of {INSIGHTFACE_SIDE_MULTIPLE}")
    names = [node.name for node in graph.node[:INSIGHTFACE_SCALING_NODES]]
    scales_inside = (any(name.startswith(("Sub", "_minus")) for name in names)
                     and any(name.startswith(("Mul", "_mul")) for name in names))
    mean, std = (0.0, 1.0) if scales_inside else SF2DIST_SCALING

    def refused(reason: str) -> InsightFaceRoute:
        return InsightFaceRoute("ArcFaceONNX", False, f"it routes to ArcFaceONNX, but {reason}", mean, std)

    if len(inputs) != 1:
        return refused(f"that feeds only the first of its {len(inputs)} inputs")
    if len(outputs) != 1:
        return refused(f"that requires exactly one output and the file has {len(outputs)}")
    if shape[1] != 3:
        return refused(f"that feeds 3-channel images and the input has {shape[1]} channels")
    if (mean, std) != SF2DIST_SCALING:
        return refused(f"the first {INSIGHTFACE_SCALING_NODES} nodes' names ({', '.join(names)}) make it feed "
                       f"pixels scaled (pixel - {mean:g}) / {std:g}, not (pixel - 127.5) / 127.5")
    reason = f"ArcFaceONNX for {side}x{side} faces, input mean {mean:g} std {std:g}, i.e. (pixel - 127.5) / 127.5 as " \
             "the file expects"
    return InsightFaceRoute("ArcFaceONNX", True, reason, mean, std)


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
    weights = f", weights in {report.external_data} (keep it beside the .onnx)" if report.external_data else ""
    print(
        f"wrote {report.path} ({report.format}{weights}) from {path}: input '{INPUT_NAME}' float32 [batch, 3, {size}, "
        f"{size}] RGB scaled (x - 127.5) / 127.5, output '{OUTPUT_NAME}' [batch, {dim}] (not normalised; one image, no "
        f"flip fusion); largest |difference| from PyTorch over batches of {report.checked_batch_sizes}: "
        f"{report.max_abs_error:.2e}"
    )
    if report.format == "onnx":
        print(insightface_route(report.path).describe())
