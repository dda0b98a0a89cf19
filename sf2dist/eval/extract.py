"""Embeddings of a sequence of face images, with flip-test fusion, optionally across ranks.

The flip-test fusion (`FLIP_MODES`) says what the embedding of an image x is: "sum",
f(x) + f(flip(x)) (docs/design.md, the default); "concat", [f(x), f(flip(x))], twice the
backbone's width (the SphereFace LFW protocol; verification L2-normalises the whole vector);
"none", f(x). f is the backbone and flip the horizontal mirror. Pixels are prepared by
`sf2dist.imageio.to_tensor`, as in training. With a process group, rank r embeds the
contiguous slice of images given by the shard arithmetic of `sf2dist.parallel.class_range`,
and `sf2dist.comm.all_gather_variable` concatenates the slices (of whatever width), so
every rank returns every embedding, in input order. `embed_images` and
`gather_embeddings` are the two halves, for callers that hold only their own slice of the
images (`sf2dist.eval.evaluate.prepare_benchmark`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sf2dist import comm
from sf2dist.imageio import to_tensor
from sf2dist.parallel import class_range


class _ImageTensors(Dataset):
    """images[start:stop] as normalised float tensors [3, H, W]."""

    def __init__(self, images: Sequence[np.ndarray], start: int, stop: int) -> None:
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(np.asarray(self.images[self.start + index]))


FLIP_MODES = ("sum", "concat", "none")


def flip_mode(flip: str | bool) -> str:
    """The fusion `flip` names, one of `FLIP_MODES`; True and False (the old boolean option) mean "sum" and "none"."""
    if flip is True or flip is False:
        return "sum" if flip else "none"
    if not isinstance(flip, str) or flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {', '.join(map(repr, FLIP_MODES))}, got {flip!r}")
    return flip


def image_slice(num_images: int, rank: int, world_size: int) -> tuple[int, int]:
    """The images [start, stop) that `rank` embeds: contiguous, sizes differ by at most one."""
    if num_images < world_size:
        raise ValueError(f"cannot split {num_images} images over {world_size} ranks; use fewer ranks")
    return class_range(num_images, rank, world_size)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def embed_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 128,
    flip: str | bool = "sum",
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Embed `images[start:stop]` in this process alone: float32 [stop - start, width] on `device`.

    `images` is a sequence of RGB uint8 [H, W, 3] (e.g. an array [N, H, W, 3]); batches of
    `batch_size` are taken from `start` on. `flip` fuses each image with its mirror image
    (see `FLIP_MODES`): width is the backbone's dim, or 2 * dim with "concat". `device`
    defaults to the model's. The model is run in eval mode and left in the mode it was given
    in. Pass the bare backbone, not a DDP wrapper.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    flip = flip_mode(flip)
    stop = len(images) if stop is None else stop
    device = torch.device(device) if device is not None else _model_device(model)
    loader = DataLoader(
        _ImageTensors(images, start, stop),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = batch.to(device, non_blocking=True)  # [b, 3, H, W]
                inputs = batch if flip == "none" else torch.cat([batch, batch.flip(3)])  # [b or 2b, 3, H, W]
                outputs = model(inputs)
                if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[0] != len(inputs):
                    shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
                    raise ValueError(f"the model must map [b, 3, H, W] to embeddings [b, dim]; it returned {shape}")
                if flip == "sum":
                    outputs = outputs[: len(batch)] + outputs[len(batch) :]  # [b, dim]
                elif flip == "concat":
                    outputs = torch.cat([outputs[: len(batch)], outputs[len(batch) :]], dim=1)  # [b, 2 * dim]
                chunks.append(outputs.float())
            return torch.cat(chunks)  # [stop - start, width]
    finally:
        model.train(was_training)


def gather_embeddings(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> np.ndarray:
    """Every rank's embeddings [n_r, width], concatenated in rank order: float32 [sum n_r, width] on every rank.

    Every rank must pass the same width (the same backbone and `flip`).
    """
    with torch.inference_mode():
        return comm.all_gather_variable(local, group).cpu().numpy()


def extract_embeddings(
    model: nn.Module,
    images: Sequence[np.ndarray],
    batch_size: int = 128,
    flip: str | bool = "sum",
    device: str | torch.device | None = None,
    group: dist.ProcessGroup | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Embed `images` (a sequence of RGB uint8 [H, W, 3], e.g. an array [N, H, W, 3]).

    Returns float32 [N, width] on every rank (width: see `embed_images`): each rank embeds
    its `image_slice` with `embed_images` (same arguments) and `gather_embeddings` joins the
    slices. Under a
    process group every rank of `group` must call this with the same images.
    """
    rank, world_size = comm.rank_and_world(group)
    start, stop = image_slice(len(images), rank, world_size)
    local = embed_images(model, images, start, stop, batch_size, flip, device, num_workers)
    return gather_embeddings(local, group)
