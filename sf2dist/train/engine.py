"""The backbone's data-parallel engine: DDP by default, DeepSpeed ZeRO as a config switch.

An engine owns the replicated backbone and its optimiser; the sharded head never enters it,
so its rows are never all-reduced or averaged (docs/design.md, "Conventions": the gradient contract). The trainer
drives every engine through the same few calls:

    embeddings = engine(images)              # forward, in the engine's precision context
    with engine.no_sync(): ...               # micro-batches before the last one (accumulation)
    engine.backward(loss)
    engine.grad_sq_norm() / scale_grads_(f)  # for the global norm, clipping and unscaling
    engine.set_lr(lr); engine.step(); engine.zero_grad()
    engine.save(directory) / engine.load(directory)   # optimiser state (every rank calls)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sf2dist.config import Config
from sf2dist.train import optim


class DDPEngine:
    """The backbone under DistributedDataParallel (or bare on one rank) with a torch optimiser."""

    name = "ddp"

    def __init__(self, backbone: nn.Module, cfg: Config, device: torch.device, world_size: int) -> None:
        self.memory_format = memory_format(backbone, device)
        self.module = backbone.to(device, memory_format=self.memory_format)
        self.device = device
        if world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            # Gradients as views into DDP's buckets: no second copy of them, no copy per step.
            self.wrapped: nn.Module = DistributedDataParallel(self.module, device_ids=device_ids,
                                                             gradient_as_bucket_view=True)
        else:
            self.wrapped = self.module
        self.optimizer = optim.make_optimizer(self.module.parameters(), cfg.optim, cfg.optim.lr)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images.contiguous(memory_format=self.memory_format))

    def no_sync(self):
        return self.wrapped.no_sync() if isinstance(self.wrapped, DistributedDataParallel) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_sq_norm(self) -> torch.Tensor:
        return optim.grad_sq_norm(self.module.parameters())

    def scale_grads_(self, factor: float) -> None:
        optim.scale_grads_(self.module.parameters(), factor)

    def set_lr(self, lr: float) -> None:
        optim.set_lr(self.optimizer, lr)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def save(self, directory: Path, rank: int) -> None:
        """The optimiser state is replicated: rank 0 writes it."""
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict()}, directory / "backbone_optimizer.pt")

    def load(self, directory: Path) -> None:
        path = directory / "backbone_optimizer.pt"
        if not path.is_file():
            saved_by = "engine.type deepspeed" if (directory / "deepspeed").is_dir() else "an incomplete save"
            raise ValueError(f"{directory} holds no DDP optimiser state ({path.name}; it was written by {saved_by}): "
                             f"resume it with the engine.type it was saved with, or start a new run in another "
                             f"run.dir")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])


def memory_format(backbone: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for a convolutional backbone on CUDA (the layout cuDNN's tensor-core kernels
    want; NCHW costs transposes around every convolution), else the default layout."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in backbone.modules())
    return torch.channels_last if device.type == "cuda" and has_conv else torch.contiguous_format


def make_engine(backbone: nn.Module, cfg: Config, device: torch.device, world_size: int,
                micro_batch_size: int | None = None):
    """The engine `cfg.engine.type` names; `micro_batch_size`: images per rank per micro-batch
    (the trainer's, derived from data.global_batch_size when that is set; None: data.batch_size)."""
    if cfg.engine.type == "ddp":
        return DDPEngine(backbone, cfg, device, world_size)
    if cfg.engine.type == "deepspeed":
        from sf2dist.train.deepspeed_engine import DeepSpeedEngine  # deepspeed is an optional install

        return DeepSpeedEngine(backbone, cfg, device, world_size, micro_batch_size)
    raise ValueError(f"engine.type: unknown engine {cfg.engine.type!r} (ddp or deepspeed)")
