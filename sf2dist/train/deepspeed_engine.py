"""The backbone under DeepSpeed ZeRO (stage 1 or 2), behind the same calls as `DDPEngine`.

DeepSpeed partitions the backbone's optimiser state and float32 master weights (stage 1)
and also its gradients while they are reduced (stage 2), each rank holding one contiguous
partition of the flattened parameters. The sharded head never enters it.
What the trainer can rely on, and why it holds:

- Gradients. After a backward at an accumulation boundary, DeepSpeed has reduced (averaged
  over ranks) the gradients and kept only this rank's partition of them; `param.grad` is None.
  `grad_sq_norm` sums squares over that partition and all-reduces the partial sums (the
  partitions are disjoint, so every entry counts once); `scale_grads_` multiplies the
  partition in place. `step` then applies exactly those gradients: DeepSpeed's own clipping
  is 0 and its loss scale is a static 1, so it does not rescale them again.
- Accumulation. DeepSpeed's config says `gradient_accumulation_steps: 1` and the boundary is
  driven by hand (DeepSpeed's public `set_gradient_accumulation_boundary`): always True,
  False inside `no_sync()`. Stage 1 then skips the reduction of those micro-batches and sums
  their gradients locally (a real no_sync); stage 2 still reduce-scatters every micro-batch
  (partitioning gradients as they are produced is what it saves memory with) and sums the
  partitions. Either way the boundary gradient is the average over ranks of the summed
  micro-batches, as under DDP. Without `no_sync()` on the earlier micro-batches, each
  backward would be a boundary and would replace, not add to, the previous partition.
- Precision. DeepSpeed's own bf16/fp16 modes stay off: they cast every parameter to half
  precision, BatchNorm's included (whose float32 running statistics then no longer match:
  CPU batch_norm refuses the mix, and half-precision BN weights train poorly). bf16/fp16 run
  as under DDP instead: float32 weights, the trainer's autocast for the forward, the
  trainer's loss scale for fp16. ZeRO still partitions the optimiser state and the
  gradients, which is where its memory saving is.
- Checkpoints. `save`/`load` use DeepSpeed's own checkpoint (module weights, float32 master
  partitions, optimiser partitions) in `directory / "deepspeed"`. Loading restores the master
  weights as well: changing `module`'s weights by hand after construction would be undone by
  the next step, which writes the master copy back. DeepSpeed refuses to load its partitions
  on a different number of ranks, so a run must resume on as many ranks as it saved from.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from sf2dist import comm
from sf2dist.config import Config
from sf2dist.train import optim

_CHECKPOINT_TAG = "engine"  # one DeepSpeed checkpoint per directory: the trainer names the directory


def deepspeed_config(cfg: Config, micro_batch_size: int | None = None) -> dict:
    """The DeepSpeed config for `cfg`: ZeRO stage and precision; scaling and clipping are left to the trainer.

    `micro_batch_size`: images per rank per micro-batch, None for data.batch_size (DeepSpeed only
    reports it: the trainer feeds the batches).
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size or cfg.data.batch_size,
        # The trainer accumulates and marks the boundary itself (see the module docstring).
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,  # a plain torch optimiser, from optim.make_optimizer
        "zero_optimization": {
            "stage": cfg.engine.zero_stage,
            # The trainer computes the global norm (head included) before stepping; DeepSpeed's
            # own norm inside step() would be a second all-reduce that nothing reads.
            "compute_grad_norm": False,
            # DeepSpeed's default buckets (5e8 elements: 2 GB of float32 per GPU for each) are
            # sized for billion-parameter models; an iresnet100 is 65M parameters.
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        },
        # Half precision comes from the trainer's autocast (see the module docstring).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


class DeepSpeedEngine:
    """The backbone under a DeepSpeed ZeRO-1/2 engine with a torch optimiser (see the module docstring)."""

    name = "deepspeed"

    def __init__(self, backbone: nn.Module, cfg: Config, device: torch.device, world_size: int,
                 micro_batch_size: int | None = None) -> None:
        if cfg.engine.precision == "fp16" and device.type != "cuda":
            raise ValueError(f"engine.precision fp16 needs a CUDA device, got {device}; use bf16 or fp32")
        # DeepSpeed joins the existing default group and cannot run without one (not even on one rank).
        has_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not has_group or comm.rank_and_world()[1] != world_size:
            found = f"one of world size {comm.rank_and_world()[1]}" if has_group else "none"
            raise ValueError(
                f"engine.type deepspeed needs an initialised process group of world size {world_size} "
                f"(found {found}), even on one GPU: start training with torchrun (torchrun --nproc_per_node=NUM_GPUS "
                "launch/train.py ...; sf2dist.parallel.init_distributed(always_group=True) then creates it), or use "
                "engine.type ddp for a single process"
            )
        backbone = backbone.to(device)
        optimizer = optim.make_optimizer(backbone.parameters(), cfg.optim, cfg.optim.lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, config=deepspeed_config(cfg, micro_batch_size),
            dist_init_required=False,
        )
        if torch.device(self.engine.device) != device:
            raise ValueError(
                f"DeepSpeed placed the backbone on {self.engine.device} but the trainer uses {device}; "
                "set LOCAL_RANK (torchrun does) so that both pick the same device"
            )
        # grad_sq_norm/scale_grads_/zero_grad reach into this optimiser's gradient partitions.
        assert isinstance(self.engine.optimizer, DeepSpeedZeroOptimizer), type(self.engine.optimizer)
        self.module = self.engine.module  # the same nn.Module, its parameters now views of ZeRO's flat buffers
        self.device = device
        self.engine.set_gradient_accumulation_boundary(True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches before the last of an accumulation: not a boundary, so nothing is stepped."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _local_grad_partitions(self) -> list[torch.Tensor]:
        """This rank's partition of the reduced gradients (zero padding included), as DeepSpeed holds them.

        They exist only between a boundary backward and `step`, in the ZeRO optimiser's
        `averaged_gradients`; `step` flattens exactly these tensors into its update. DeepSpeed's
        public per-parameter accessors (deepspeed.utils.safe_get_full_grad) all-reduce the whole
        gradient on every call, which would undo what ZeRO saves.
        """
        partitions = self.engine.optimizer.averaged_gradients
        return [grad for group in partitions.values() if group is not None for grad in group]

    def grad_sq_norm(self) -> torch.Tensor:
        partial = optim.sq_norm(self._local_grad_partitions()).to(self.device)
        return comm.all_reduce(partial, "sum")

    def scale_grads_(self, factor: float) -> None:
        for grad in self._local_grad_partitions():
            grad.mul_(factor)

    def set_lr(self, lr: float) -> None:
        optim.set_lr(self.engine.optimizer, lr)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)
        # A skipped step leaves its partitions behind; drop them as DeepSpeed does on overflow.
        # The next boundary would replace them anyway, except where DeepSpeed adds into a kept
        # buffer (float32 accumulation of bf16 gradients), so this keeps a skip from leaking.
        zero_optimizer = self.engine.optimizer
        for group in zero_optimizer.averaged_gradients:
            zero_optimizer.averaged_gradients[group] = None
            zero_optimizer.all_grad_tensors[group] = None

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its partition (rank 0 also the module); `directory` must be shared by the ranks."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag=_CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """Module weights, float32 master weights and optimiser state, from a run on as many ranks."""
        checkpoint = directory / "deepspeed" / _CHECKPOINT_TAG
        if not checkpoint.is_dir():
            saved_by = "engine.type ddp" if (directory / "backbone_optimizer.pt").is_file() else "an incomplete save"
            raise ValueError(f"{directory} holds no DeepSpeed engine state ({checkpoint} is missing; it was written "
                             f"by {saved_by}): resume it with the engine.type it was saved with, or start a new run "
                             f"in another run.dir")
        saved_ranks = len(list(checkpoint.glob("*zero_pp_rank_*optim_states.pt")))
        _, world_size = comm.rank_and_world()
        if saved_ranks != world_size:
            raise ValueError(
                f"{checkpoint} holds ZeRO partitions of {saved_ranks} rank(s) but this run has {world_size}; "
                f"DeepSpeed cannot repartition them: resume on {saved_ranks} ranks"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag=_CHECKPOINT_TAG, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine checkpoint at {checkpoint}")
