"""The training run: data -> replicated backbone -> gathered embeddings -> sharded head -> step.

`Trainer(cfg).run()` is the whole job on one rank; `launch/train.py` starts it under
torchrun, SLURM or as a single process. Everything a run needs is read and checked before
the first step: the backbone's arguments, the data's manifest, every benchmark, and whether
the run directory's newest checkpoint may be continued with this config (`resume_point`).
`check_run` does the same checks without a process group or a step (`--print-config`).
The loop reads top to bottom: `run` resumes, then repeats `train_step` (accumulate
micro-batches, one all-reduce for the global gradient norm and loss, unscale, clip, step or
skip together), logging, evaluation and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sf2dist import comm, parallel, stop
from sf2dist.config import (BATCH_SPLIT_KEYS, BatchPlan, Change, Config, ConfigError, batch_plan, config_changes,
                            config_to_dict, resume_safe, save_config)
from sf2dist.data import make_loader, train_manifest
from sf2dist.data.shards import Manifest
from sf2dist.data.stream import manifest_path
from sf2dist.eval import ExtractOptions, PreparedBenchmark, evaluate_prepared, prepare_benchmark
from sf2dist.heads import LambdaSchedule, PartialFCHead, SphereFace2Head, make_head_sgd
from sf2dist.models import create_backbone, load_backbone_weights
from sf2dist.models.registry import backbone_arguments
from sf2dist.train import checkpoint, optim
from sf2dist.train.engine import make_engine
from sf2dist.train.metrics import RunLog, logged_outputs, plot_run

# Backbone arguments the trainer passes itself: from model.embedding_dim and the images' size.
_TRAINER_ARGUMENTS = ("embedding_dim", "input_size")


def headline(metrics: dict) -> str:
    """One line for a benchmark's result: 10-fold accuracy for a pair set, TAR@FAR for IJB."""
    if "accuracy" in metrics:
        return f"verification accuracy {100 * metrics['accuracy']:.2f} ± {100 * metrics['accuracy_std']:.2f} % (10-fold)"
    rates = ", ".join(f"TAR@FAR={far} {'-' if tar is None else f'{100 * tar:.2f} %'}"
                      for far, tar in metrics.get("tar_at_far", {}).items())
    return f"{rates}; best accuracy {100 * metrics['best_accuracy']:.2f} %"


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class EvaluationError(RuntimeError):
    """An evaluation that failed mid-run, after the step it followed was checkpointed."""

    def __init__(self, message: str, step: int, checkpoint_dir: Path) -> None:
        super().__init__(message)
        self.step, self.checkpoint_dir = step, checkpoint_dir


def build_head(cfg: Config, num_classes: int) -> torch.nn.Module:
    h = cfg.head
    optional = {k: v for k, v in (("margin", h.margin), ("m", h.m)) if v is not None}
    if h.type == "sphereface2":
        return SphereFace2Head(num_classes, cfg.model.embedding_dim, alpha=h.alpha, r=h.r, t=h.t,
                               loss_weight=h.loss_weight, sample_rate=h.sample_rate, seed=cfg.run.seed,
                               storage_dtype=getattr(torch, h.storage), **optional)
    # s None: the margin's default scale; with feature_scale norm, A-Softmax's lambda follows head.schedule_step
    schedule = LambdaSchedule(base=h.lambda_base, gamma=h.lambda_gamma, power=h.lambda_power, minimum=h.lambda_min)
    return PartialFCHead(num_classes, cfg.model.embedding_dim, s=h.s, feature_scale=h.feature_scale,
                         lambda_schedule=schedule, sample_rate=h.sample_rate, seed=cfg.run.seed, **optional)


# -- what is checked before the first step ------------------------------------------------------
def check_backbone(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """model.backbone and model.kwargs against the backbone registry, before anything is built.

    Raises ConfigError naming the key, where it was set (`sources`, as `resolve_config` gives
    them) and the arguments the backbone takes.
    """
    sources = sources or {}

    def where(key: str) -> str:
        return sources.get(key, "the default")

    try:
        accepted = backbone_arguments(cfg.model.backbone)
    except ValueError as err:
        raise ConfigError(f"model.backbone: {err} (from {where('model.backbone')})") from None
    own = [name for name in accepted if name not in _TRAINER_ARGUMENTS]
    for key in cfg.model.kwargs:
        if key in _TRAINER_ARGUMENTS:
            setting = "model.embedding_dim" if key == "embedding_dim" else "the size of the training images"
            raise ConfigError(f"model.kwargs.{key}: set by the trainer from {setting}; remove it from model.kwargs "
                              f"(from {where('model.kwargs')})")
        if key not in accepted:
            close = difflib.get_close_matches(key, own, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            takes = f"takes {', '.join(own)} (and" if own else "takes nothing besides"
            raise ConfigError(
                f"model.kwargs.{key}: backbone {cfg.model.backbone} has no argument {key!r} (model.kwargs from "
                f"{where('model.kwargs')}, model.backbone from {where('model.backbone')}); {hint}{cfg.model.backbone} "
                f"{takes} {', '.join(_TRAINER_ARGUMENTS)}, which the trainer sets{')' if own else ''}. Remove "
                f"model.kwargs.{key}, e.g. --set model.kwargs={{}} to clear them all"
            )


def check_settings(cfg: Config) -> None:
    """What needs no file read: data.train set, every benchmark present, the backbone's arguments."""
    if not cfg.data.train:
        raise ValueError("data.train is empty: set it to a shard directory (with manifest.json) or shards to stream "
                         "(URLs, e.g. http://host/train/shard-{000000..000099}.tar), e.g. --set data.train=data/demo/train")
    missing = [path for path in cfg.eval.benchmarks if not Path(path).exists()]
    if missing:  # found now, not after the last step of a long run
        raise ValueError(f"eval.benchmarks: {', '.join(map(str, missing))} not found; fix the path or remove it "
                         f"from eval.benchmarks")
    if cfg.optim.freeze_backbone_steps and cfg.engine.type == "deepspeed":
        # a DeepSpeed engine expects its step after every accumulation boundary: skipping it is untested
        raise ValueError("optim.freeze_backbone_steps needs engine.type ddp: with deepspeed the backbone's steps "
                         "cannot be skipped yet; freeze with ddp, or use a small optim.backbone_lr instead")
    check_backbone(cfg)


def initial_backbone(cfg: Config, input_size: int, resuming: bool) -> torch.nn.Module:
    """model.backbone for `input_size` images, with model.init_from's weights in a new run.

    A resume loads its checkpoint's backbone over this one, so it never reads model.init_from.
    """
    arguments = dict(embedding_dim=cfg.model.embedding_dim, input_size=input_size, **cfg.model.kwargs)
    if cfg.model.init_from is None or resuming:
        return create_backbone(cfg.model.backbone, **arguments)
    try:
        return load_backbone_weights(cfg.model.backbone, cfg.model.init_from, **arguments)
    except ValueError as err:
        raise ValueError(f"model.init_from: {err}") from None


def read_train_manifest(cfg: Config) -> Manifest:
    """data.train's manifest, checked against data.num_classes and for square images (ValueError)."""
    try:
        manifest = train_manifest(cfg.data.train, cfg.data.manifest or None, retries=cfg.data.retries)
    except ValueError as err:
        raise ValueError(f"data.train: {err}") from None
    where = manifest_path(cfg.data.train, cfg.data.manifest or None)
    if cfg.data.num_classes is not None and cfg.data.num_classes != manifest.num_classes:
        raise ValueError(f"data.num_classes={cfg.data.num_classes} does not match the {manifest.num_classes} classes "
                         f"of {where}: set data.num_classes={manifest.num_classes} or remove it (the head is "
                         f"sized from the manifest), or point data.train at the shards you meant")
    height, width = manifest.image_size
    if height != width:
        raise ValueError(f"data.train: the images of {cfg.data.train} are {height}x{width}; the backbones take "
                         f"square images (convert the data with a square crop)")
    return manifest


def batch_warnings(cfg: Config, plan: BatchPlan, num_samples: int) -> list[str]:
    """A per-rank micro-batch larger than each rank's share of the data: every step shows samples twice."""
    per_rank = num_samples // plan.world_size
    if plan.per_rank <= per_rank:
        return []
    images = plan.per_rank * plan.world_size  # one micro-batch over all ranks
    repeats = f"(each about {images / num_samples:.1f} times)"
    if cfg.data.global_batch_size is None:
        return [f"data.batch_size={cfg.data.batch_size} is more than the {per_rank} samples per rank ({num_samples} "
                f"samples over {plan.world_size} rank(s)): each step of {images} images repeats samples {repeats}; set "
                f"data.batch_size to at most {max(per_rank, 1)}"]
    return [f"data.global_batch_size={cfg.data.global_batch_size} puts {plan.per_rank} images per rank in each "
            f"micro-batch ({plan}), more than the {per_rank} samples per rank ({num_samples} samples over "
            f"{plan.world_size} rank(s)): each micro-batch of {images} images repeats samples {repeats}; set "
            f"data.batch_size (the micro-batch's cap) to at most {max(per_rank, 1)}, or data.global_batch_size to at "
            f"most {max(per_rank, 1) * plan.world_size}"]


def prepare_benchmarks(paths: Sequence[str], rank: int, world_size: int,
                       image_size: tuple[int, int]) -> list[PreparedBenchmark]:
    """eval.benchmarks entries read and checked, this rank's slice of their images decoded (ValueError)."""
    prepared = []
    for path in paths:
        try:
            prepared.append(prepare_benchmark(path, rank=rank, world_size=world_size, image_size=image_size))
        except ValueError as err:
            raise ValueError(f"eval.benchmarks: {err}. Replace the file, or remove it from eval.benchmarks") from None
    return prepared


@dataclass
class ResumePoint:
    """Where a run starts: the newest checkpoint of run.dir (None: a new run) and what changed since."""

    checkpoint: Path | None = None
    step: int = 0
    record: dict = field(default_factory=dict, repr=False)  # its model.pt (mmap), empty for a new run
    changes: list[Change] = field(default_factory=list)  # keys this config changes since the checkpoint
    refused: list[Change] = field(default_factory=list)  # those neither resume-safe nor allowed
    saved_plan: BatchPlan | None = None  # how the checkpoint's steps were split over ranks and micro-batches

    def world_size_change(self, plan: BatchPlan) -> str | None:
        """What resuming on `plan.world_size` ranks does to the step; None on the checkpoint's world size."""
        saved = self.saved_plan
        if saved is None or saved.world_size == plan.world_size:
            return None
        if plan.global_batch == saved.global_batch:
            effect = f"global batch {plan.global_batch} kept"
        else:
            effect = f"global batch {saved.global_batch} -> {plan.global_batch} images per step"
        return f"world size {saved.world_size} -> {plan.world_size}: {effect} ({plan})"

    def changed(self, plan: BatchPlan) -> list[str]:
        """What differs from the checkpoint on this run's `plan`: the world size first, then each key."""
        world = self.world_size_change(plan)
        return [*([world] if world else []), *map(str, self.changes)]

    def world_size_warnings(self, cfg: Config, plan: BatchPlan) -> list[str]:
        """A world-size change that changes the images per step, because data.global_batch_size is unset."""
        saved = self.saved_plan
        if (saved is None or saved.world_size == plan.world_size or saved.global_batch == plan.global_batch
                or cfg.data.global_batch_size is not None):  # a global batch set on purpose is listed as a change
            return []
        keep = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch_size=saved.global_batch),
                                   optim=dataclasses.replace(cfg.optim, accumulation_steps=1))
        try:
            advice = (f"To keep {saved.global_batch} images per step on any number of ranks, set "
                      f"data.global_batch_size={saved.global_batch} (allowed on resume; here it would be "
                      f"{batch_plan(keep, plan.world_size)})")
        except ConfigError as err:
            advice = f"{saved.global_batch} images per step cannot be kept on {plan.world_size} rank(s): {err}"
        return [f"world size {saved.world_size} -> {plan.world_size} since {self.checkpoint}: the global batch changes "
                f"{saved.global_batch} -> {plan.global_batch} images per step ({plan}), so each remaining step "
                f"averages its gradient over {plan.global_batch} images instead of {saved.global_batch}, at a learning "
                f"rate chosen for {saved.global_batch}. {advice}"]

    def check(self, plan: BatchPlan | None = None) -> None:
        """ValueError listing the refused changes, with the ways out, if there are any.

        With this run's `plan`, a change of the world size is named as well (it is never refused).
        """
        if not self.refused:
            return
        listing = "".join(f"\n  {change}" for change in self.refused)
        world = self.world_size_change(plan) if plan is not None else None
        if world:
            listing += f"\n  ({world}; a change of the world size is allowed)"
        raise ValueError(
            f"{self.checkpoint} was trained with other settings than this command's (checkpoint -> now):{listing}\n"
            f"Resuming would train the remaining steps with settings no earlier step used. Either run the command "
            f"with the checkpoint's settings, start a new run in another directory (--set run.dir=NEW_DIR), or "
            f"continue with the change: --allow-config-change {','.join(change.key for change in self.refused)}. "
            f"(Keys such as run.max_steps may change on resume without asking: docs/config.md lists them.)"
        )


def resume_point(cfg: Config, allow_config_change: Sequence[str] = ()) -> ResumePoint:
    """The checkpoint this config continues, if any, and the settings it changes (see `ResumePoint.check`).

    Refused here (ValueError): a directory with the logged outputs of a run but no checkpoint
    (`logged_outputs`), and run.resume=false in a directory that holds checkpoints. A new run
    there would mix its checkpoints, metrics and config with the earlier run's, and the
    rotation would delete them. A change of a key that is neither resume-safe
    (`sf2dist.config.RESUME_SAFE_KEYS`) nor in `allow_config_change` is refused by `check`.
    """
    run_dir = Path(cfg.run.dir)
    found = checkpoint.checkpoint_dirs(run_dir)
    if not found:
        logged = logged_outputs(run_dir)
        if logged:  # a new run there would append to them and overwrite config.yaml and summary.txt
            raise ValueError(
                f"run.dir {run_dir} holds the outputs of an earlier run ({', '.join(logged)}) but no checkpoint in "
                f"{run_dir / 'checkpoints'} to resume from; a new run there would mix its metrics, plot and config "
                f"with that run's. Start the new run in another directory (--set run.dir=NEW_DIR), or move or delete "
                f"the earlier run's files first (e.g. mv {run_dir} {run_dir}.old)"
            )
        return ResumePoint()
    newest = found[-1]
    if not cfg.run.resume:
        raise ValueError(
            f"run.resume=false, but {run_dir / 'checkpoints'} holds {len(found)} checkpoint(s) of an earlier run "
            f"(the newest: {newest.name}); a new run there would mix its checkpoints, metrics and config with that "
            f"run's and could delete them. Start the new run in another directory (--set run.dir=NEW_DIR), move "
            f"{run_dir} away first, or set run.resume=true to continue the earlier run"
        )
    record = checkpoint.read_main(newest)
    changes = config_changes(record["config"], cfg) if "config" in record else []
    saved = saved_batch_plan(record)
    # A new split of the checkpoint's global batch changes no step's images (sf2dist.config.BATCH_SPLIT_KEYS)
    allowed = {*allow_config_change, *(BATCH_SPLIT_KEYS if cfg.data.global_batch_size == saved.global_batch else ())}
    refused = [change for change in changes if not resume_safe(change.key) and change.key not in allowed]
    return ResumePoint(newest, int(record["trainer"]["step"]), record, changes, refused, saved)


def saved_batch_plan(record: dict) -> BatchPlan:
    """How the steps of the checkpoint whose model.pt is `record` were split."""
    trainer = record["trainer"]
    if "accumulation_steps" in trainer:
        accumulation = trainer["accumulation_steps"]
    else:  # written before the trainer state kept it: the checkpoint's config has it
        accumulation = record.get("config", {}).get("optim", {}).get("accumulation_steps", 1)
    return BatchPlan(int(trainer["batch_size"]), int(trainer["world_size"]), int(accumulation))


def start_position(point: ResumePoint, plan: BatchPlan, num_samples: int) -> tuple[int, int]:
    """(optimizer step, micro-batches per rank) where the run starts, on this run's micro-batches.

    The data position is (epoch, samples into the epoch's order); on another world size or
    per-rank batch it is rounded down to a whole micro-batch of this run (a few samples may
    repeat). The step count is kept.
    """
    if point.checkpoint is None:
        return 0, 0
    saved, micro_batches = point.saved_plan, int(point.record["trainer"]["micro_batches"])
    before, now = saved.world_size * saved.per_rank, plan.world_size * plan.per_rank  # images per micro-batch
    if before == now:
        return point.step, micro_batches
    epoch, in_epoch = divmod(micro_batches, math.ceil(num_samples / before))  # epochs counted as the loader does
    return point.step, epoch * math.ceil(num_samples / now) + (in_epoch * before) // now


def total_steps(cfg: Config, plan: BatchPlan, batches_per_epoch: int, start: tuple[int, int] = (0, 0)) -> int:
    """Optimizer steps of the run: run.max_steps, or the steps that end run.epochs epochs of
    `batches_per_epoch` micro-batches, counted on from `start` (step, micro-batches per rank).

    Counted from the data position, not as epochs x steps per epoch: after a resume that changed
    the images per step, the steps before it and after it cover different shares of an epoch.
    """
    if cfg.run.max_steps:
        return cfg.run.max_steps
    step, micro_batches = start
    return step + max(0, cfg.run.epochs * batches_per_epoch - micro_batches) // plan.accumulation


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def head_memory(cfg: Config, num_classes: int, world_size: int) -> str:
    """Class rows per rank and the bytes they take: weights, optimiser state, gradient during a step."""
    counts = [hi - lo for lo, hi in (parallel.class_range(num_classes, r, world_size) for r in range(world_size))]
    rows = max(counts)
    dim = cfg.model.embedding_dim
    storage = torch.finfo(getattr(torch, cfg.head.storage)).bits // 8
    weights = rows * dim * storage
    if cfg.optim.name == "adamw":
        state = 2 * rows * dim * 4  # two float32 moments
    else:
        state = rows * dim * storage if cfg.optim.momentum else 0  # momentum in the rows' dtype
    spread = f"{rows:,}" if min(counts) == rows else f"{min(counts):,}-{rows:,}"
    text = (f"{spread} class rows per rank x {dim} dims; per rank: weights {_size(weights)}, "
            f"optimiser state {_size(state)}")
    if cfg.head.step == "separate":
        text += f", gradient up to {_size(rows * dim * 4)} during a step"
    return text


def describe_run(cfg: Config, *, manifest: Manifest, plan: BatchPlan, launcher: str, device: torch.device,
                 backbone_parameters: int, point: ResumePoint, config_path: Path | None,
                 warnings: Sequence[str] = ()) -> list[str]:
    """The start-up summary: what runs where, on what data, with what memory, from which step."""

    def count(number: float, noun: str, plural: str | None = None, spec: str = ",") -> str:
        """'1 step', '20 steps', '2.5 steps', '1,000 images': the number as printed decides the noun."""
        text = format(number, spec)
        return f"{text} {noun if text == '1' else plural or noun + 's'}"

    world_size = plan.world_size
    batches = math.ceil(manifest.num_samples / (world_size * plan.per_rank))  # per epoch, as the loader counts
    steps_per_epoch = batches / plan.accumulation
    start_step, start_micro_batches = start_position(point, plan, manifest.num_samples)
    total = total_steps(cfg, plan, batches, (start_step, start_micro_batches))
    # where the data position ends, as the progress line's epoch counts it (also after a resume
    # whose steps before it held another number of images)
    end = start_micro_batches + max(0, total - start_step) * plan.accumulation
    epochs = count(end / batches, "epoch", spec=".3g")
    kept = " (data.global_batch_size)" if cfg.data.global_batch_size is not None else ""
    margin = f", margin {cfg.head.margin}" if cfg.head.margin else ""
    lines = [
        f"run directory: {cfg.run.dir}" + (f" (config: {config_path})" if config_path else ""),
        f"ranks: {world_size} ({launcher}), device {device}, engine {cfg.engine.type}, "
        f"precision {cfg.engine.precision}",
        f"data: {cfg.data.train}: {count(manifest.num_samples, 'image')} of "
        f"{count(manifest.num_classes, 'class', 'classes')}, {manifest.image_size[0]}x{manifest.image_size[1]}",
        f"batch: {plan} = {count(plan.global_batch, 'image')} per step{kept}; "
        f"{count(steps_per_epoch, 'step', spec='g')} per epoch; {count(total, 'step')} ({epochs})",
        f"head: {cfg.head.type}{margin}, {head_memory(cfg, manifest.num_classes, world_size)}",
        f"backbone: {cfg.model.backbone}, {count(backbone_parameters, 'parameter')} "
        f"({_size(4 * backbone_parameters)} in float32)",
    ]
    if point.checkpoint is None:
        lines.append("start: step 0, a new run")
    else:
        changes = point.changed(plan)
        changed = f"; changed since: {', '.join(changes)}" if changes else ""
        lines.append(f"start: step {point.step}, resumed from {point.checkpoint}{changed}")
    lines += [f"warning: {warning}" for warning in warnings]
    return lines


def check_run(cfg: Config, allow_config_change: Sequence[str] = (), warnings: Sequence[str] = ()) -> list[str]:
    """What `Trainer(cfg)` checks before its first step, with no process group and no step.

    Every benchmark is read and each of its images decoded (as on one rank). Returns the
    start-up summary for the world size of the launcher this process was started by; raises
    ConfigError or ValueError with the first problem.
    """
    check_settings(cfg)
    info = parallel.discover()
    plan = batch_plan(cfg, info.world_size)
    point = resume_point(cfg, allow_config_change)
    point.check(plan)
    manifest = read_train_manifest(cfg)
    for benchmark in cfg.eval.benchmarks:  # one at a time: only one benchmark's images are held
        prepare_benchmarks([benchmark], 0, 1, manifest.image_size)
    backbone = initial_backbone(cfg, manifest.image_size[0], resuming=point.checkpoint is not None)
    batches = math.ceil(manifest.num_samples / (plan.world_size * plan.per_rank))  # per epoch, as the loader counts
    steps = total_steps(cfg, plan, batches, start_position(point, plan, manifest.num_samples))
    device = torch.device("cuda" if cfg.engine.device == "cuda" or (cfg.engine.device == "auto"
                                                                    and torch.cuda.is_available()) else "cpu")
    return describe_run(
        cfg, manifest=manifest, plan=plan, launcher=info.source, device=device,
        backbone_parameters=sum(p.numel() for p in backbone.parameters()), point=point, config_path=None,
        warnings=[*warnings, *batch_warnings(cfg, plan, manifest.num_samples),
                  *point.world_size_warnings(cfg, plan), *optim.warmup_warnings(cfg.optim, steps)],
    )


class Trainer:
    """One rank's share of a training run (see the module docstring).

    `allow_config_change`: keys that may differ from the resumed checkpoint's config besides
    the resume-safe ones; `warnings`: the config's (`ResolvedConfig.warnings`), printed on rank 0
    and kept in RUN_DIR/summary.txt with the trainer's own.
    """

    def __init__(self, cfg: Config, *, allow_config_change: Sequence[str] = (), warnings: Sequence[str] = ()) -> None:
        check_settings(cfg)
        self.cfg = cfg
        self.allow_config_change = tuple(allow_config_change)
        if cfg.engine.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("engine.device=cuda, but torch sees no CUDA device (use cpu or auto)")
        device = None if cfg.engine.device == "auto" else cfg.engine.device  # None: CUDA when there is one
        self.info, self.device = parallel.init_distributed(device, timeout_s=cfg.run.timeout_s,
                                                           always_group=cfg.engine.type == "deepspeed")
        if self.device.type == "cuda":
            # Fixed input shapes (face crops, a fixed batch): cuDNN may time its algorithms once and
            # keep the fastest, unless the run asks for deterministic kernels.
            torch.backends.cudnn.benchmark = not cfg.engine.deterministic
            if cfg.engine.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
        if cfg.engine.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("engine.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.rank, self.world_size = self.info.rank, self.info.world_size
        if self.rank == 0:  # in a SLURM log: where the ranks think they are, and from which variables
            tqdm.write(f"{self.info.describe()}; device {self.device}")
        # The per-rank micro-batch and the accumulation on this many ranks: what the loader, the step,
        # the schedule's length and the checkpoint's position use (data.global_batch_size keeps their product)
        self.plan = batch_plan(cfg, self.world_size)
        self.run_dir = Path(cfg.run.dir)
        # Before anything big is built: a new run must not land on an earlier run's checkpoints.
        self.resume_point = resume_point(cfg, self.allow_config_change)
        torch.manual_seed(cfg.run.seed + self.rank)

        # The manifest first: data.num_classes and the image size are checked before anything big is built.
        manifest = read_train_manifest(cfg)
        self.loader = make_loader(
            cfg.data.train, batch_size=self.plan.per_rank, rank=self.rank, world_size=self.world_size,
            num_workers=cfg.data.num_workers, seed=cfg.run.seed, num_classes=cfg.data.num_classes,
            flip=cfg.data.flip, label_noise=cfg.data.label_noise, pin_memory=self.device.type == "cuda",
            device=self.device, shuffle_buffer=cfg.data.shuffle_buffer, manifest_url=cfg.data.manifest or None,
            retries=cfg.data.retries,
        )
        height, width = manifest.image_size
        self.warnings = [*warnings, *batch_warnings(cfg, self.plan, manifest.num_samples),
                         *self.resume_point.world_size_warnings(cfg, self.plan)]
        # Each benchmark read and checked once, now (a broken one fails here, not after hours);
        # each rank decodes only the images it embeds, and keeps them for every evaluation.
        self.benchmarks = prepare_benchmarks(cfg.eval.benchmarks, self.rank, self.world_size, (height, width))
        torch.manual_seed(cfg.run.seed)  # the same initial backbone on every rank
        resuming = self.resume_point.checkpoint is not None
        backbone = initial_backbone(cfg, height, resuming)
        if self.rank == 0 and cfg.model.init_from is not None:
            tqdm.write(f"model.init_from {cfg.model.init_from}: " + (
                "not read, the run resumes from its checkpoint" if resuming else
                f"backbone {cfg.model.backbone} starts from its weights, the head from scratch"))
        torch.manual_seed(cfg.run.seed + self.rank)
        self.engine = make_engine(backbone, cfg, self.device, self.world_size, micro_batch_size=self.plan.per_rank)
        self.head = build_head(cfg, self.loader.num_classes).to(self.device)
        # every rank's batches hold data.batch_size images (checked in train_step), and the step's
        # numbers are read once: the head needs no read of its own (issue #24)
        self.head.equal_batches = self.head.defer_input_checks = True
        self.head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
        self.backbone_lr = cfg.optim.backbone_lr if cfg.optim.backbone_lr is not None else cfg.optim.lr
        groups = optim.head_param_groups(self.head, cfg.optim)
        if cfg.optim.name == "sgd":  # fused into the head's forward, row-sparse when sampled, or plain
            self.head_optimizer = make_head_sgd(self.head, groups, lr=self.head_lr, momentum=cfg.optim.momentum,
                                                weight_decay=cfg.optim.weight_decay, fused_step=cfg.head.step == "fused")
        else:
            self.head_optimizer = optim.make_optimizer(groups, cfg.optim, self.head_lr)
        self.loss_scale = optim.LossScale(cfg.engine.precision == "fp16")
        # (step, micro-batches) where the run starts: the checkpoint's data position on this run's micro-batches
        self.start = start_position(self.resume_point, self.plan, manifest.num_samples)
        self.total_steps = total_steps(cfg, self.plan, self.loader.batches_per_epoch, self.start)
        if self.total_steps < 1:
            raise ValueError(f"{cfg.run.epochs} epoch(s) of {self.loader.batches_per_epoch} batches make no step of "
                             f"{self.plan.accumulation} micro-batches ({self.plan}); raise run.epochs or set "
                             f"run.max_steps")
        self.warnings += optim.warmup_warnings(cfg.optim, self.total_steps)
        if self.resume_point.checkpoint is not None:
            # A checkpoint of another model is refused as such; one of this model with other settings
            # gets the list of changed keys.
            checkpoint.check_identity(self.resume_point.checkpoint / "model.pt", self.resume_point.record,
                                      self.engine.module, self.head)
            self.resume_point.check(self.plan)
        self.state = checkpoint.TrainerState(world_size=self.world_size, batch_size=self.plan.per_rank,
                                             accumulation_steps=self.plan.accumulation)
        self.consecutive_bad = 0
        self.log = None
        self.stop_everywhere = False  # some rank got a stop signal: decided together in the step's all-reduce
        self.interrupted = False  # ... and it was a Ctrl-C on some rank: the run ends "interrupted", not requeued
        self._resumed = False

    # -- the loop ---------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> dict:
        """Train to the end (or stop after `until_step`, with a checkpoint); rank 0 gets the plot."""
        cfg = self.cfg
        stop_step = self.total_steps if until_step is None else min(until_step, self.total_steps)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        self._resume()
        resumed_step = self.state.step
        if self.rank == 0:
            config_path = self._write_config()
            self.log = RunLog(self.run_dir, config_to_dict(cfg), cfg.logging)
            self._write_status("running", resumed_step)
            self._write_summary(config_path)
            if self.state.step >= stop_step:
                tqdm.write(f"nothing to train: the run is at step {self.state.step} and has {self.total_steps} steps; "
                           f"raise run.max_steps or run.epochs to train longer (they may change on resume)")
        progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", mininterval=2.0,
                        dynamic_ncols=True,
                        # a bar only on a terminal: in a pipe, a file or a SLURM log its "\r" updates would
                        # share a line with the messages after them, so those get plain lines instead
                        disable=self.rank != 0 or not cfg.logging.progress or not sys.stderr.isatty())
        self.engine.train()
        installed = stop.install()  # launch/train.py installed it at start; a Trainer used in-process does here
        stop.on_abort(f"without a checkpoint of the current step; the newest complete checkpoint in "
                      f"{self.run_dir / 'checkpoints'} (if any) resumes the run")
        stop.check_file()  # a request sent before this rank could catch the signal
        try:
            results = self._loop(stop_step, progress)
        except BaseException as err:
            if self.rank == 0:  # "failed" is never requeued by launch/slurm/train.sbatch
                where = {}
                if isinstance(err, EvaluationError):
                    where = {"failed_in": "evaluation", "checkpoint": str(err.checkpoint_dir)}
                self._write_status("failed", resumed_step, error=f"{type(err).__name__}: {err}", **where)
            raise
        finally:
            if installed:
                stop.uninstall()
            progress.close()
        summary = {"step": self.state.step, "skipped_steps": self.state.skipped_steps, "eval": results,
                   "preempted": self.stop_everywhere and not self.interrupted, "interrupted": self.interrupted}
        if self.log is not None:
            self.log.finish()
            summary["plot"] = str(plot_run(self.run_dir))
        if self.rank == 0:  # last: "preempted" tells the SLURM script that everything is on disk
            # A Ctrl-C anywhere wins over a scheduler's stop: the person who pressed it wants no requeue
            state = ("interrupted" if self.interrupted else "preempted" if self.stop_everywhere
                     else "finished" if self.state.step == self.total_steps else "stopped")
            self._write_status(state, resumed_step)
        # Leave together: under srun --kill-on-bad-exit, a rank that exits while rank 0 still writes
        # would have the whole step killed before the status is on disk.
        comm.barrier()
        return summary

    def _write_config(self) -> Path:
        """The config history, never overwritten: RUN_DIR/config.yaml is the config the run started
        with (a new run replaces only one left by an attempt that saved no checkpoint); a resume that
        changes a setting writes RUN_DIR/config.step_NNNNNNNN.yaml, the config of the steps after
        NNNNNNNN, headed by the changes. Returns the file of the config in force."""
        point, first = self.resume_point, self.run_dir / "config.yaml"
        if point.checkpoint is None or not first.exists():  # a new run (or one whose config.yaml was lost)
            save_config(self.cfg, first)
            return first
        if point.changes:
            path = self.run_dir / f"config.step_{point.step:08d}.yaml"
            changes = "".join(f"\n#   {change}" for change in point.changes)
            save_config(self.cfg, path, comment=f"The config of the steps after {point.step}, resumed from "
                                                f"{point.checkpoint} with these changes:{changes}")
            return path
        history = sorted(self.run_dir.glob("config.step_*.yaml"))
        earlier = [p for p in history if int(p.stem.split("_")[1]) <= point.step]
        return earlier[-1] if earlier else first

    def _write_summary(self, config_path: Path) -> None:
        """The start-up summary on stdout and appended to RUN_DIR/summary.txt (one block per start)."""
        lines = describe_run(
            self.cfg, manifest=self.loader.manifest, plan=self.plan, launcher=self.info.source,
            device=self.device, backbone_parameters=sum(p.numel() for p in self.engine.module.parameters()),
            point=self.resume_point, config_path=config_path, warnings=self.warnings,
        )
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        with open(self.run_dir / "summary.txt", "a") as f:
            f.write(f"== started {started} at step {self.state.step}\n" + "\n".join(lines) + "\n")
        for line in lines:
            tqdm.write(line)

    def _write_status(self, state: str, resumed_step: int, **extra) -> None:
        """RUN_DIR/status.json, replaced atomically: what the run is doing, and for which SLURM job."""
        record = {"state": state, "step": self.state.step, "total_steps": self.total_steps,
                  "resumed_from_step": resumed_step, "time": time.time(), **extra}
        if "SLURM_JOB_ID" in os.environ:  # the requeue check compares these with the job that reads it
            record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
            record["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if stop.requested():
            record["signals"] = stop.received()
        partial = self.run_dir / "status.json.partial"
        partial.write_text(json.dumps(record, indent=1) + "\n")
        partial.replace(self.run_dir / "status.json")

    def _loop(self, stop_step: int, progress) -> dict:
        cfg = self.cfg
        window_start, window_steps, results = time.perf_counter(), 0, {}
        run_start, first_step = time.perf_counter(), self.state.step
        batches = self._micro_batches()
        while self.state.step < stop_step:
            loss, grad_norm, lr = self.train_step(batches)
            self.state.step += 1
            window_steps += 1
            progress.update(1)
            last = self.state.step == stop_step or self.stop_everywhere
            if self.state.step % cfg.run.log_every == 0 or last:
                seconds = time.perf_counter() - window_start
                images = window_steps * self.plan.global_batch
                row = {"step": self.state.step, "epoch": self.state.micro_batches // self.loader.batches_per_epoch,
                       "loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": images / seconds,
                       "images_per_step": self.plan.global_batch,
                       "loss_scale": self.loss_scale.scale, "skipped_steps": self.state.skipped_steps,
                       "elapsed_s": time.perf_counter() - run_start}
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{images / seconds:.0f}")
                if self.log is not None:
                    self.log.train(row)
                    if progress.disable:  # no bar (a SLURM log, a pipe, logging.progress false): plain lines
                        per_step = row["elapsed_s"] / (self.state.step - first_step)
                        eta = datetime.timedelta(seconds=round(per_step * (stop_step - self.state.step)))
                        print(f"step {self.state.step}/{self.total_steps} epoch {row['epoch']} loss {loss:.4f} "
                              f"lr {lr:.4g} images/s {row['images_per_s']:.0f} ETA {eta}", flush=True)
                window_start, window_steps = time.perf_counter(), 0
            # the checkpoint first: an evaluation that fails loses no training
            saved = None
            if (cfg.run.checkpoint_every and self.state.step % cfg.run.checkpoint_every == 0) or last:
                saved = self.save_checkpoint()
            final = self.state.step == self.total_steps and not self.stop_everywhere
            if cfg.eval.benchmarks and ((cfg.run.eval_every and self.state.step % cfg.run.eval_every == 0) or final):
                results = self._evaluate_or_stop(saved)
                self.engine.train()
            if self.stop_everywhere:
                stop.on_abort(f"after the checkpoint of step {self.state.step}, {saved}, which resumes the run")
                if self.rank == 0 and self.interrupted:
                    tqdm.write(f"interrupted (Ctrl-C): checkpoint written at step {self.state.step} in {saved}; run "
                               f"the same command again to resume from it")
                elif self.rank == 0:
                    tqdm.write(stop.stopped_line(self.state.step, saved))
                break
        return results

    def _evaluate_or_stop(self, saved: Path | None) -> dict:
        """`evaluate`, or a checkpoint of this step and an EvaluationError that names both."""
        try:
            return self.evaluate()
        except Exception as err:
            # Every rank gets here when the failure is in the shared part (the metrics of gathered
            # embeddings, a benchmark's data); the checkpoint is a collective they write together.
            saved = saved or self.save_checkpoint()
            raise EvaluationError(
                f"the evaluation after step {self.state.step} failed ({type(err).__name__}: {err}); that step is "
                f"saved in {saved}. Fix or remove the benchmark (eval.* may change on resume) and run the same "
                f"command again to continue from there", self.state.step, saved) from err

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches as one stream across epochs, starting where the run stands."""
        per_epoch = self.loader.batches_per_epoch
        epoch, step_in_epoch = divmod(self.state.micro_batches, per_epoch)
        while True:
            self.loader.set_epoch(epoch, step_in_epoch)
            yield from self.loader
            epoch, step_in_epoch = epoch + 1, 0

    def _autocast(self):
        precision = self.cfg.engine.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batches: Iterator) -> tuple[float, float, float]:
        """One optimizer step on every rank: returns (global loss, global grad norm, lr)."""
        accumulation = self.plan.accumulation
        scale = self.loss_scale.scale
        lr_factor = optim.lr_factor(self.state.step, self.total_steps, self.cfg.optim)
        optim.set_lr(self.head_optimizer, self.head_lr * lr_factor)  # before the forward: a fused head steps there
        self.head.schedule_step = self.state.step  # a scheduled loss (A-Softmax's lambda) follows the run's step
        loss_share = torch.zeros((), device=self.device)
        self.head.input_problems = None
        for micro in range(accumulation):
            images, labels = next(batches)
            if images.shape[0] != self.plan.per_rank:  # the head trusts that every rank's batch has this size
                raise RuntimeError(f"rank {self.rank} got a batch of {images.shape[0]} images; every rank's batches "
                                   f"must hold data.batch_size={self.plan.per_rank} (the loader drops a short last "
                                   f"batch): the sharded head gathers them without exchanging their sizes")
            self.state.micro_batches += 1
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                with self._autocast():
                    embeddings = self.engine(images)
                    loss = self.head(embeddings.float(), labels) / accumulation  # [] this rank's share
                self.engine.backward(loss * scale if scale != 1.0 else loss)
            loss_share += self.head.loss_share(loss)
        # optim.freeze_backbone_steps: the backbone still runs its backward (DDP expects every parameter's
        # gradient), but its optimizer does not step, and its gradient is left out of the norm
        frozen = self.state.step < self.cfg.optim.freeze_backbone_steps
        backbone_sq_norm = (torch.zeros((), dtype=torch.float64, device=self.device) if frozen
                            else self.engine.grad_sq_norm())
        numbers = optim.global_grad_norm_and_loss(
            backbone_sq_norm, self.head, loss_share, flag=stop.requested(), interrupt=stop.interrupted(),
            extra=self.head.input_problems)
        if self.head.input_problems is not None:  # a wrong label or a non-finite embedding: the step is not taken
            self.head.raise_input_problems(numbers.extra)
        loss, self.stop_everywhere, self.interrupted = numbers.loss, numbers.stop, numbers.interrupted
        norm = numbers.grad_norm / scale
        finite = math.isfinite(norm) and math.isfinite(loss)
        if finite:
            factor = 1.0 / scale
            clip = self.cfg.optim.clip_grad_norm
            if clip is not None and norm > clip:
                factor *= clip / (norm + 1e-6)
            if factor != 1.0:
                self.engine.scale_grads_(factor)
                optim.scale_grads_(self.head.parameters(), factor)
            self.engine.set_lr(self.backbone_lr * lr_factor)
            if not frozen:
                self.engine.step()
            self.head_optimizer.step()
            self.consecutive_bad = 0
        else:
            self._bad_step(loss, norm)
        self.loss_scale.update(finite)
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        return loss, norm, self.backbone_lr * lr_factor

    def _bad_step(self, loss: float, norm: float) -> None:
        """Every rank sees the same all-reduced numbers, so every rank skips this step together."""
        self.state.skipped_steps += 1
        self.consecutive_bad += 1
        if self.rank == 0:
            tqdm.write(f"step {self.state.step}: non-finite loss {loss} or gradient norm {norm}; step skipped on "
                       f"every rank ({self.consecutive_bad} in a row)")
        if self.loss_scale.enabled and self.loss_scale.scale > 1.0:
            return  # fp16 overflow: the scale halves and the step is retried with new data
        if self.consecutive_bad >= self.cfg.run.max_bad_steps:
            raise BadStepsError(
                f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient, the last at step "
                f"{self.state.step} (loss {loss}, gradient norm {norm}); stopping (run.max_bad_steps="
                f"{self.cfg.run.max_bad_steps}). Lower optim.lr, set optim.clip_grad_norm, or check the data."
            )

    # -- evaluation and checkpoints ---------------------------------------------------------
    def evaluate(self) -> dict:
        """Verification on the configured pair sets, images split over all ranks."""
        # Each rank's BatchNorm statistics moved with its own last batch (DDP re-broadcasts them
        # only at the next forward): evaluate every slice with rank 0's, the ones checkpoints keep.
        for buffer in self.engine.module.buffers():
            comm.broadcast_(buffer.data)
        options = ExtractOptions(batch_size=self.cfg.eval.batch_size, flip=self.cfg.eval.flip, device=self.device)
        results = {}
        for benchmark in self.benchmarks:
            with self._autocast() if self.device.type == "cuda" else contextlib.nullcontext():  # eval as trained
                result = evaluate_prepared(self.engine.module, benchmark, options)
            results[result.name] = result.metrics
            if self.log is not None:
                self.log.eval(self.state.step, result.name, result.metrics)
                tqdm.write(f"step {self.state.step}: {result.name} {headline(result.metrics)}")
        return results

    def save_checkpoint(self) -> Path:
        return checkpoint.save(
            self.run_dir / "checkpoints", self.state, rank=self.rank, backbone=self.engine.module, head=self.head,
            head_optimizer=self.head_optimizer, engine=self.engine,
            extra={"loss_scale": self.loss_scale.state_dict(), "config": config_to_dict(self.cfg)},
            keep=self.cfg.run.keep_checkpoints,
        )

    def _resume(self) -> None:
        """Load the checkpoint `resume_point` chose (once; `run` calls it)."""
        if self._resumed:
            return
        self._resumed = True
        found = self.resume_point.checkpoint
        if found is None:
            return
        saved, main = checkpoint.load(
            found, rank=self.rank, world_size=self.world_size, backbone=self.engine.module, head=self.head,
            head_optimizer=self.head_optimizer, engine=self.engine,
        )
        self.loss_scale.load_state_dict(main["loss_scale"])
        step, micro_batches = self.start  # the saved position on this run's micro-batches (start_position)
        assert step == saved.step, (step, saved.step)  # the checkpoint `resume_point` read, loaded
        self.head.sample_step = micro_batches  # one draw per micro-batch: the same draws as before
        self.state = checkpoint.TrainerState(step=saved.step, micro_batches=micro_batches, world_size=self.world_size,
                                             batch_size=self.plan.per_rank, accumulation_steps=self.plan.accumulation,
                                             skipped_steps=saved.skipped_steps)
        if self.rank == 0:
            tqdm.write(f"resumed from {found} at step {saved.step} (saved on {saved.world_size} rank(s), "
                       f"now {self.world_size})")
            changed = self.resume_point.changed(self.plan)
            if changed:
                tqdm.write(f"changed since that checkpoint: {'; '.join(changed)}")
