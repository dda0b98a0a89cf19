"""The training run: data -> replicated backbone -> gathered embeddings -> sharded head -> step.

`Trainer(cfg).run()` is the whole job on one rank; `launch/train.py` starts it under
torchrun, SLURM or as a single process. The loop reads top to bottom: `run` resumes, then
repeats `train_step` (accumulate micro-batches, one all-reduce for the global gradient norm
and loss, unscale, clip, step or skip together), logging, evaluation and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from sf2dist import comm, parallel, stop
from sf2dist.config import Config, config_to_dict, save_config
from sf2dist.data import make_loader
from sf2dist.eval import ExtractOptions, evaluate_prepared, prepare_benchmark
from sf2dist.heads import LambdaSchedule, PartialFCHead, SphereFace2Head, make_head_sgd
from sf2dist.models import create_backbone
from sf2dist.train import checkpoint, optim
from sf2dist.train.engine import make_engine
from sf2dist.train.metrics import RunLog, plot_run


def headline(metrics: dict) -> str:
    """One line for a benchmark's result: 10-fold accuracy for a pair set, TAR@FAR for IJB."""
    if "accuracy" in metrics:
        return f"verification accuracy {100 * metrics['accuracy']:.2f} ± {100 * metrics['accuracy_std']:.2f} % (10-fold)"
    rates = ", ".join(f"TAR@FAR={far} {'-' if tar is None else f'{100 * tar:.2f} %'}"
                      for far, tar in metrics.get("tar_at_far", {}).items())
    return f"{rates}; best accuracy {100 * metrics['best_accuracy']:.2f} %"


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


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


class Trainer:
    def __init__(self, cfg: Config) -> None:
        if not cfg.data.train:
            raise ValueError("data.train is empty: set it to a shard directory (with manifest.json), "
                             "e.g. --set data.train=data/demo/train")
        missing = [path for path in cfg.eval.benchmarks if not Path(path).exists()]
        if missing:  # found now, not after the last step of a long run
            raise ValueError(f"eval.benchmarks: {', '.join(map(str, missing))} not found")
        self.cfg = cfg
        if cfg.engine.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("engine.device=cuda, but torch sees no CUDA device (use cpu or auto)")
        device = None if cfg.engine.device == "auto" else cfg.engine.device  # None: CUDA when there is one
        self.info, self.device = parallel.init_distributed(device, timeout_s=cfg.run.timeout_s)
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
        self.run_dir = Path(cfg.run.dir)
        torch.manual_seed(cfg.run.seed + self.rank)

        # The loader first: it checks data.num_classes against the manifest before anything big is built.
        self.loader = make_loader(
            cfg.data.train, batch_size=cfg.data.batch_size, rank=self.rank, world_size=self.world_size,
            num_workers=cfg.data.num_workers, seed=cfg.run.seed, num_classes=cfg.data.num_classes,
            flip=cfg.data.flip, label_noise=cfg.data.label_noise, pin_memory=self.device.type == "cuda",
            device=self.device,
        )
        height, width = self.loader.manifest.image_size
        if height != width:
            raise ValueError(f"{cfg.data.train}: images are {height}x{width}; the backbones take square images")
        # Each benchmark read and checked once, now (a broken one fails here, not after hours);
        # each rank decodes only the images it embeds, and keeps them for every evaluation.
        self.benchmarks = [prepare_benchmark(path, rank=self.rank, world_size=self.world_size,
                                             image_size=(height, width)) for path in cfg.eval.benchmarks]
        torch.manual_seed(cfg.run.seed)  # the same initial backbone on every rank
        backbone = create_backbone(cfg.model.backbone, embedding_dim=cfg.model.embedding_dim, input_size=height,
                                   **cfg.model.kwargs)
        torch.manual_seed(cfg.run.seed + self.rank)
        self.engine = make_engine(backbone, cfg, self.device, self.world_size)
        self.head = build_head(cfg, self.loader.num_classes).to(self.device)
        self.head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
        groups = optim.head_param_groups(self.head, cfg.optim)
        if cfg.optim.name == "sgd":  # fused into the head's forward, row-sparse when sampled, or plain
            self.head_optimizer = make_head_sgd(self.head, groups, lr=self.head_lr, momentum=cfg.optim.momentum,
                                                weight_decay=cfg.optim.weight_decay, fused_step=cfg.head.step == "fused")
        else:
            self.head_optimizer = optim.make_optimizer(groups, cfg.optim, self.head_lr)
        self.loss_scale = optim.LossScale(cfg.engine.precision == "fp16")
        accumulation = cfg.optim.accumulation_steps
        self.total_steps = cfg.run.max_steps or (cfg.run.epochs * self.loader.batches_per_epoch) // accumulation
        if self.total_steps < 1:
            raise ValueError(f"{cfg.run.epochs} epoch(s) of {self.loader.batches_per_epoch} batches make no step "
                             f"with optim.accumulation_steps={accumulation}")
        self.state = checkpoint.TrainerState(world_size=self.world_size, batch_size=cfg.data.batch_size)
        self.consecutive_bad = 0
        self.log = None
        self.stop_everywhere = False  # some rank got a stop signal: decided together in the step's all-reduce

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
            save_config(cfg, self.run_dir / "config.yaml")
            self.log = RunLog(self.run_dir, config_to_dict(cfg), cfg.logging)
            self._write_status("running", resumed_step)
        progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", mininterval=2.0,
                        dynamic_ncols=True, disable=self.rank != 0 or not cfg.logging.progress)
        self.engine.train()
        installed = stop.install()  # launch/train.py installed it at start; a Trainer used in-process does here
        stop.check_file()  # a request sent before this rank could catch the signal
        try:
            results = self._loop(stop_step, progress)
        except BaseException as err:
            if self.rank == 0:  # "failed" is never requeued by launch/slurm/train.sbatch
                self._write_status("failed", resumed_step, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            if installed:
                stop.uninstall()
            progress.close()
        summary = {"step": self.state.step, "skipped_steps": self.state.skipped_steps, "eval": results,
                   "preempted": self.stop_everywhere}
        if self.log is not None:
            self.log.finish()
            summary["plot"] = str(plot_run(self.run_dir))
        if self.rank == 0:  # last: "preempted" tells the SLURM script that everything is on disk
            state = "preempted" if self.stop_everywhere else "finished" if self.state.step == self.total_steps else "stopped"
            self._write_status(state, resumed_step)
        # Leave together: under srun --kill-on-bad-exit, a rank that exits while rank 0 still writes
        # would have the whole step killed before the status is on disk.
        comm.barrier()
        return summary

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
        run_start = time.perf_counter()
        batches = self._micro_batches()
        while self.state.step < stop_step:
            loss, grad_norm, lr = self.train_step(batches)
            self.state.step += 1
            window_steps += 1
            progress.update(1)
            last = self.state.step == stop_step or self.stop_everywhere
            if self.state.step % cfg.run.log_every == 0 or last:
                seconds = time.perf_counter() - window_start
                images = window_steps * cfg.optim.accumulation_steps * cfg.data.batch_size * self.world_size
                row = {"step": self.state.step, "epoch": self.state.micro_batches // self.loader.batches_per_epoch,
                       "loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": images / seconds,
                       "loss_scale": self.loss_scale.scale, "skipped_steps": self.state.skipped_steps,
                       "elapsed_s": time.perf_counter() - run_start}
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{images / seconds:.0f}")
                if self.log is not None:
                    self.log.train(row)
                window_start, window_steps = time.perf_counter(), 0
            # the checkpoint first: an evaluation that fails loses no training
            if (cfg.run.checkpoint_every and self.state.step % cfg.run.checkpoint_every == 0) or last:
                self.save_checkpoint()
            final = self.state.step == self.total_steps and not self.stop_everywhere
            if cfg.eval.benchmarks and ((cfg.run.eval_every and self.state.step % cfg.run.eval_every == 0) or final):
                results = self.evaluate()
                self.engine.train()
            if self.stop_everywhere:
                if self.rank == 0:
                    tqdm.write(f"stop signal: checkpoint written at step {self.state.step}; exiting for a requeue")
                break
        return results

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
        accumulation = self.cfg.optim.accumulation_steps
        scale = self.loss_scale.scale
        lr_factor = optim.lr_factor(self.state.step, self.total_steps, self.cfg.optim)
        optim.set_lr(self.head_optimizer, self.head_lr * lr_factor)  # before the forward: a fused head steps there
        self.head.schedule_step = self.state.step  # a scheduled loss (A-Softmax's lambda) follows the run's step
        loss_share = torch.zeros((), device=self.device)
        for micro in range(accumulation):
            images, labels = next(batches)
            self.state.micro_batches += 1
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                with self._autocast():
                    embeddings = self.engine(images)
                    loss = self.head(embeddings.float(), labels) / accumulation  # [] this rank's share
                self.engine.backward(loss * scale if scale != 1.0 else loss)
            loss_share += self.head.loss_share(loss)
        norm, loss, stop_everywhere = optim.global_grad_norm_and_loss(
            self.engine.grad_sq_norm(), self.head, loss_share, flag=stop.requested())
        self.stop_everywhere = stop_everywhere
        norm /= scale
        finite = math.isfinite(norm) and math.isfinite(loss)
        if finite:
            factor = 1.0 / scale
            clip = self.cfg.optim.clip_grad_norm
            if clip is not None and norm > clip:
                factor *= clip / (norm + 1e-6)
            if factor != 1.0:
                self.engine.scale_grads_(factor)
                optim.scale_grads_(self.head.parameters(), factor)
            self.engine.set_lr(self.cfg.optim.lr * lr_factor)
            self.engine.step()
            self.head_optimizer.step()
            self.consecutive_bad = 0
        else:
            self._bad_step(loss, norm)
        self.loss_scale.update(finite)
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        return loss, norm, self.cfg.optim.lr * lr_factor

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
        found = checkpoint.checkpoint_dirs(self.run_dir) if self.cfg.run.resume else []
        if not found:
            return
        saved, main = checkpoint.load(
            found[-1], rank=self.rank, world_size=self.world_size, backbone=self.engine.module, head=self.head,
            head_optimizer=self.head_optimizer, engine=self.engine,
        )
        self.loss_scale.load_state_dict(main["loss_scale"])
        # The data position is (epoch, samples into the epoch's order); on another world size or
        # batch size it is rounded down to a whole global batch (a few samples may repeat).
        micro_batches = saved.micro_batches
        if (saved.world_size, saved.batch_size) != (self.world_size, self.cfg.data.batch_size):
            num_samples = self.loader.manifest.num_samples
            saved_global, global_batch = saved.world_size * saved.batch_size, self.world_size * self.cfg.data.batch_size
            epoch, in_epoch = divmod(saved.micro_batches, math.ceil(num_samples / saved_global))
            micro_batches = epoch * self.loader.batches_per_epoch + (in_epoch * saved_global) // global_batch
        self.head.sample_step = micro_batches  # one draw per micro-batch: the same draws as before
        self.state = checkpoint.TrainerState(step=saved.step, micro_batches=micro_batches, world_size=self.world_size,
                                             batch_size=self.cfg.data.batch_size, skipped_steps=saved.skipped_steps)
        if self.rank == 0:
            tqdm.write(f"resumed from {found[-1]} at step {saved.step} (saved on {saved.world_size} rank(s), "
                       f"now {self.world_size})")
