"""Every registered network on this CPU: size, PyTorch and ONNX time per image, the export's check.

For one network (`measure_network`), built by `create_backbone(name, embedding_dim=512)` at its
builder's default input size (112 for arcface_torch's and sf2dist's networks) with random
weights, in eval mode:

- parameters, and the bytes of parameters and buffers (what decides external data);
- PyTorch forward time per image on a batch of `batch_size` (torch threads = all cores),
  the median of `repeats` runs after one warm-up run;
- `sf2dist.export.export_backbone` to ONNX (checked against PyTorch on batches of 2 and 3:
  the largest |difference|), the file's size (with its .onnx.data sidecar when the weights
  went there), and onnxruntime's time per image on the same batch, timed as PyTorch's;
- `sf2dist.export.insightface_route`: whether insightface's model zoo loads the file as its
  recognition model.

`to_markdown` writes the table for docs/benchmarks.md (section `SECTION`); launch/bench_models.py
(`make bench-models`) runs it.
"""
from __future__ import annotations

import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sf2dist.export import ExportMismatchError, InsightFaceRoute, export_backbone, insightface_route, model_bytes
from sf2dist.models import backbone_spec, create_backbone

SECTION = "models"
EMBEDDING_DIM = 512


@dataclass(frozen=True)
class NetworkFigures:
    """One network's row of the table; the ONNX fields are None when its export failed (`onnx_error`)."""

    name: str
    input_size: int
    parameters: int
    weight_bytes: int
    torch_ms_per_image: float
    onnx_ms_per_image: float | None = None
    max_abs_error: float | None = None
    onnx_bytes: int | None = None  # the .onnx and its sidecar together
    external_data: bool = False
    insightface: InsightFaceRoute | None = None  # what insightface's model zoo makes of the file
    onnx_error: str | None = None
    twins: tuple[str, ...] = ()  # names that build the same network for inference (`eval_twins`)


def eval_twins(names: list[str]) -> dict[str, list[str]]:
    """`names` grouped by identical eval-mode networks: the first of each group -> the others.

    Two names build the same network for inference when their state_dicts have the same keys
    and shapes (built on the meta device, no memory): arcface_torch's WebFace42M variants
    (vit_b_dp005_mask_005 and vit_b, ...) differ only in drop path, token masking and activation
    checkpointing, which act in training alone, so the benchmark measures each group once.
    """
    groups: dict[tuple, list[str]] = {}
    for name in names:
        with torch.device("meta"):
            model = create_backbone(name, embedding_dim=EMBEDDING_DIM)
        signature = (type(model).__name__, tuple((key, tuple(t.shape)) for key, t in model.state_dict().items()))
        groups.setdefault(signature, []).append(name)
    return {group[0]: group[1:] for group in groups.values()}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_network(name: str, scratch: Path, batch_size: int = 8, repeats: int = 5) -> NetworkFigures:
    """Measure network `name` (module doc); its ONNX file goes to `scratch` and is deleted after."""
    import onnxruntime

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_backbone(name, embedding_dim=EMBEDDING_DIM).eval()
    size = backbone_spec(model)["kwargs"]["input_size"]
    images = torch.rand((batch_size, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch_seconds = median_seconds(functools.partial(model, images), repeats)
    figures = dict(name=name, input_size=size, parameters=sum(p.numel() for p in model.parameters()),
                   weight_bytes=model_bytes(model), torch_ms_per_image=1000 * torch_seconds / batch_size)
    path = scratch / f"{name}.onnx"
    try:
        report = export_backbone(model, images[:2], path, "onnx")
    except (ExportMismatchError, RuntimeError, ValueError) as err:  # one network's failure is its row, not the end
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return NetworkFigures(**figures, onnx_error=f"{type(err).__name__}: {first_line}")
    del model  # its weights, before onnxruntime loads the file's copy (vit_h: 3 GB each)
    gc.collect()
    files = [path] + ([report.external_data] if report.external_data else [])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy()}
    onnx_seconds = median_seconds(functools.partial(session.run, None, feed), repeats)
    del session
    result = NetworkFigures(
        **figures, onnx_ms_per_image=1000 * onnx_seconds / batch_size, max_abs_error=report.max_abs_error,
        onnx_bytes=sum(f.stat().st_size for f in files), external_data=report.external_data is not None,
        insightface=insightface_route(path),
    )
    for file in files:
        file.unlink()
    return result


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.1f} MB"


def to_markdown(rows: list[NetworkFigures], *, batch_size: int, repeats: int, machine: str, command: str,
                seconds: float) -> str:
    """The section of docs/benchmarks.md."""
    lines = [
        "## Every network: size, CPU time per image, ONNX export (`make bench-models`)",
        "",
        f"Each registered network at its default input size with embedding_dim {EMBEDDING_DIM} and random weights, "
        f"in eval mode. *PyTorch* and *ONNX*: forward time per image on a batch of {batch_size} (torch and "
        f"onnxruntime on all cores), the median of {repeats} runs after a warm-up. *max diff*: the largest "
        "|difference| between onnxruntime on the exported file and PyTorch on batches of 2 and 3 (sf2dist-export's "
        "check). *file*: the .onnx, with its .onnx.data sidecar where the weights exceed 1.5 GiB. *insightface*: "
        "whether insightface's model zoo (`insightface.model_zoo.get_model(FILE)`) loads the file as its "
        "recognition model fed (pixel - 127.5) / 127.5, by sf2dist.export.insightface_route. A name in "
        "parentheses builds the same network for inference (a WebFace42M variant: drop path and token masking "
        "act in training only) and is not measured again.",
        "",
        "| network | input | parameters | PyTorch ms/image | ONNX ms/image | max diff | file | insightface |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        name = row.name + (f" (= {', '.join(row.twins)})" if row.twins else "")
        head = (f"| {name} | {row.input_size} | {row.parameters / 1e6:,.2f}M | "
                f"{row.torch_ms_per_image:,.2f} |")
        if row.onnx_error is not None:
            lines.append(f"{head} export failed: {row.onnx_error} | | | |")
            continue
        file = _size(row.onnx_bytes) + (" (with .onnx.data)" if row.external_data else "")
        insightface = "recognition model" if row.insightface.recognition else f"no: {row.insightface.reason}"
        lines.append(f"{head} {row.onnx_ms_per_image:,.2f} | {row.max_abs_error:.1e} | {file} | {insightface} |")
    lines += ["", f"Machine: {machine}.", f"Command: `{command}` ({seconds:.0f} s in all)."]
    return "\n".join(lines) + "\n"
