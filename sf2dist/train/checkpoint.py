"""Training checkpoints that resume on any number of ranks.

One checkpoint is a directory, `RUN_DIR/checkpoints/step_00001200/`:

    model.pt        rank 0: the backbone's spec and weights (what `sf2dist-eval` and
                    `sf2dist-export` read), the head's identity (type, classes, width) and
                    its replicated parameters (the SphereFace2 bias) with their optimiser
                    state, the trainer's position (step, micro-batches consumed, world size,
                    batch size, accumulation), the loss scale and the resolved config;
    head-00003.pt   rank r: its rows, tagged with their global class range
                    [class_start, class_stop), and their optimiser state (momentum, Adam
                    moments), plus rank r's RNG states (CPU, and CUDA where it was used);
    backbone_optimizer.pt (DDP) or deepspeed/ (DeepSpeed): the engine's state.

No file depends on the world size that wrote it: a run on W' ranks reads, for its own class
range, the overlapping rows of every head file. Every rank writes into
`checkpoints/.partial-step_00001200/`; after a barrier rank 0 renames it into place, so a
crash or kill mid-write leaves the previous checkpoints intact, and only complete
directories are ever found. The last `keep` checkpoints are kept.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sf2dist import comm
from sf2dist.models import backbone_spec

FORMAT = 1
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another model, head or class count than this run's."""


@dataclass
class TrainerState:
    """Where training stands; saved in model.pt."""

    step: int = 0                 # optimizer steps done
    micro_batches: int = 0        # loader batches consumed per rank
    world_size: int = 1
    batch_size: int = 1           # per rank per micro-batch
    skipped_steps: int = 0
    accumulation_steps: int = 1   # micro-batches per step (absent from checkpoints written before it was kept)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "model.pt").is_file()]
    return [p for _, p in sorted(found)]


def read_main(directory: Path) -> dict:
    """A checkpoint's model.pt: trainer state, config, model identity; the weights stay on disk (mmap)."""
    path = Path(directory) / "model.pt"
    try:
        main = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a refused global, a truncated archive: say which file
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {err}; move that checkpoint directory away "
                                      "to resume from the one before it") from err
    if main.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: checkpoint format {main.get('format')!r}, expected {FORMAT}")
    return main


def _row_state(state: dict, rows: int) -> tuple[dict, dict]:
    """Split an optimiser state into per-row tensors and the rest (e.g. Adam's step count)."""
    per_row = {k: v for k, v in state.items() if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == rows}
    return per_row, {k: v for k, v in state.items() if k not in per_row}


def state_on_param(state: dict, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict:
    """Optimiser state of `param` placed as `torch.optim.Optimizer.load_state_dict` places it.

    Every tensor goes to the parameter's device, a floating-point one in the parameter's dtype
    when that is floating point too; 0-dim state (the SGD momentum of the SphereFace2 bias, the
    Adam moments of any scalar parameter) as well, or the first step on CUDA mixes devices.
    `step` stays as saved (on the CPU, where torch keeps it) unless the parameter's group is
    fused or capturable, whose kernels read it on the device as float32.
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), {})
    step_on_device = group.get("fused") or group.get("capturable")
    placed = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            placed[key] = value
        elif key == "step":
            placed[key] = value.to(device=param.device, dtype=torch.float32) if step_on_device else value
        elif value.is_floating_point() and param.is_floating_point():
            placed[key] = value.to(device=param.device, dtype=param.dtype)
        else:
            placed[key] = value.to(device=param.device)
    return placed


def _cuda_rng_states() -> list[torch.Tensor]:
    """Every visible device's CUDA RNG state, or none where this process never initialised CUDA:
    then its generators still hold what `torch.manual_seed` queued, which a resumed run queues
    again, and a CPU run on a GPU machine does not create a CUDA context just to save."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state_all()
    return []


def _restore_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Device i gets saved state i, for every i both the saved list and this process have.

    That covers the device this rank trains on when it sees the devices it saw at save time.
    Devices beyond a shorter saved list keep their seeded state; saved states beyond this
    process's devices are dropped. `set_rng_state` is applied lazily, at CUDA's initialisation
    if that has not happened yet, so a CPU run does not initialise CUDA here either.
    """
    if not torch.cuda.is_available():
        return
    for index, state in enumerate(saved[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


def head_identity(head: nn.Module) -> dict:
    return {
        "type": type(head).__name__,
        "num_classes": head.num_classes,
        "embedding_dim": head.embedding_dim,
    }


def save(
    directory_root: Path,
    state: TrainerState,
    *,
    rank: int,
    backbone: nn.Module,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    engine,
    extra: dict,
    keep: int,
) -> Path:
    """Write a checkpoint of the current step on every rank; returns its final directory."""
    name = f"step_{state.step:08d}"
    final = directory_root / name
    partial = directory_root / f".partial-{name}"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    comm.barrier()

    weight = head.weight.detach()
    rows, replicated = {}, {}
    for pname, param in head.named_parameters():
        opt_state = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in head_optimizer.state.get(param, {}).items()}
        if pname == "weight":
            per_row, rest = _row_state(opt_state, weight.shape[0])
            rows = {"weight": weight.cpu(), "optimizer": per_row, "optimizer_rest": rest}
        else:
            replicated[pname] = {"value": param.detach().cpu(), "optimizer": opt_state}
    torch.save(
        {"format": FORMAT, "class_start": head.class_start, "class_stop": head.class_stop, **rows,
         "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_states(), "world_size": state.world_size},
        partial / f"head-{rank:05d}.pt",
    )
    engine.save(partial, rank)
    if rank == 0:
        torch.save(
            {
                "format": FORMAT,
                "backbone": backbone_spec(backbone),
                "backbone_state": backbone.state_dict(),
                "head": {**head_identity(head), "replicated": replicated},
                "trainer": vars(state),
                **extra,
            },
            partial / "model.pt",
        )
    comm.barrier()
    if rank == 0:
        # Only what a checkpoint writer creates is ever deleted: the names this save wrote (model.pt,
        # the engine's files) and the head files of any world size. Whatever else was put in a
        # checkpoint directory (an export, notes) stays, and so does its directory.
        written = {entry.name for entry in partial.iterdir()}

        def ours(entry: Path) -> bool:
            return entry.name in written or re.fullmatch(r"head-\d+\.pt", entry.name) is not None

        if final.exists():  # the same step saved again (e.g. the end of a run that resumed there)
            for entry in final.iterdir():
                if not ours(entry):
                    os.replace(entry, partial / entry.name)  # carried over into the new checkpoint
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(directory_root.parent)[:-keep]:
            for entry in old.iterdir():
                if not ours(entry):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    try:
                        entry.unlink()
                    except OSError:
                        pass  # named below with what else is left
            left = sorted(entry.name for entry in old.iterdir())
            if left:
                print(f"checkpoint rotation: deleted the training files of {old} but kept the directory: it also holds "
                      f"{', '.join(left)}, which training did not write", file=sys.stderr, flush=True)
            else:
                old.rmdir()
    comm.barrier()
    return final


def check_identity(path: Path, saved: dict, backbone: nn.Module, head: nn.Module) -> None:
    """CheckpointMismatchError unless model.pt `saved` holds this backbone architecture and head."""
    differences = []
    spec = backbone_spec(backbone)
    if saved["backbone"] != spec:
        differences.append(f"backbone {saved['backbone']} (this run: {spec})")
    here = head_identity(head)
    for key, value in here.items():
        if saved["head"].get(key) != value:
            differences.append(f"head {key} {saved['head'].get(key)!r} (this run: {value!r})")
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} belongs to another model: " + "; ".join(differences)
            + ". Point run.dir at a new directory for a new run, or use the checkpoint's settings to continue it."
        )


def load(
    directory: Path,
    *,
    rank: int,
    world_size: int,
    backbone: nn.Module,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    engine,
) -> tuple[TrainerState, dict]:
    """Restore a checkpoint into this rank's objects; returns the trainer state and model.pt."""
    main_path = directory / "model.pt"
    try:
        main = torch.load(main_path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused global, a truncated archive: say which file
        raise CheckpointMismatchError(f"cannot read checkpoint {main_path}: {err}") from err
    if main.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{main_path}: checkpoint format {main.get('format')!r}, expected {FORMAT}")
    check_identity(main_path, main, backbone, head)
    backbone.load_state_dict(main["backbone_state"])

    # This rank's rows, from every saved shard that overlaps them.
    start, stop = head.class_start, head.class_stop
    weight_parts, state_parts, rest, rng, cuda_rng = [], [], {}, None, []
    for path in sorted(directory.glob("head-*.pt")):
        part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        lo, hi = max(start, part["class_start"]), min(stop, part["class_stop"])
        if part["world_size"] == world_size and path.name == f"head-{rank:05d}.pt":
            rng = part["rng"]
            cuda_rng = part.get("cuda_rng", [])  # absent in checkpoints written before it was saved
        if lo >= hi:
            continue
        offset = slice(lo - part["class_start"], hi - part["class_start"])
        weight_parts.append((lo, part["weight"][offset]))
        state_parts.append((lo, {k: v[offset] for k, v in part["optimizer"].items()}))
        rest = part["optimizer_rest"]
    covered = sum(w.shape[0] for _, w in weight_parts)
    if covered != stop - start:
        raise CheckpointMismatchError(
            f"{directory}: the head files cover {covered} of this rank's {stop - start} classes [{start}, {stop}); "
            "the checkpoint is incomplete: move that directory away to resume from the checkpoint before it"
        )
    weight_parts.sort(key=lambda item: item[0])
    state_parts.sort(key=lambda item: item[0])
    with torch.no_grad():
        head.weight.copy_(torch.cat([w for _, w in weight_parts]))
    row_state = {k: torch.cat([s[k] for _, s in state_parts]) for k in (state_parts[0][1] if state_parts else {})}
    if row_state or rest:
        head_optimizer.state[head.weight] = state_on_param({**row_state, **rest}, head.weight, head_optimizer)
    params = dict(head.named_parameters())
    for pname, saved in main["head"]["replicated"].items():
        with torch.no_grad():
            params[pname].copy_(saved["value"])
        if saved["optimizer"]:
            head_optimizer.state[params[pname]] = state_on_param(saved["optimizer"], params[pname], head_optimizer)
    engine.load(directory)
    if rng is not None:
        torch.set_rng_state(rng)
        _restore_cuda_rng_states(cuda_rng)
    return TrainerState(**main["trainer"]), main
