"""What a run reports: metrics.csv and eval.csv in the run directory, wandb, the final plot.

Only rank 0 holds a `RunLog`. wandb runs offline unless the config says otherwise; if it
cannot start (no network for online mode, a broken install) the run goes on with a warning
and the CSV files, which always exist.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "loss_scale", "skipped_steps", "elapsed_s")
EVAL_COLUMNS = ("step", "benchmark", "accuracy", "accuracy_std", "best_accuracy", "eer", "auc")


class RunLog:
    def __init__(self, run_dir: Path, config: dict, logging_cfg) -> None:
        self.run_dir = run_dir
        self.train_path = run_dir / "metrics.csv"
        self.eval_path = run_dir / "eval.csv"
        for path, columns in ((self.train_path, TRAIN_COLUMNS), (self.eval_path, EVAL_COLUMNS)):
            if not path.exists():
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
        self.wandb = None
        if logging_cfg.wandb_mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(
                    project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity, mode=logging_cfg.wandb_mode,
                    dir=str(run_dir), config=config, name=run_dir.name, resume="allow",
                )
            except Exception as err:  # wandb must never take a training run down
                warnings.warn(f"wandb could not start ({err}); metrics go to {self.train_path} only", stacklevel=2)

    def _append(self, path: Path, columns: tuple[str, ...], row: dict) -> None:
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in columns])

    def train(self, row: dict) -> None:
        self._append(self.train_path, TRAIN_COLUMNS, row)
        self._wandb_log({f"train/{k}": v for k, v in row.items() if k != "step"}, row["step"])

    def eval(self, step: int, benchmark: str, metrics: dict) -> None:
        row = {"step": step, "benchmark": benchmark, **{k: metrics.get(k) for k in EVAL_COLUMNS[2:]}}
        self._append(self.eval_path, EVAL_COLUMNS, row)
        self._wandb_log({f"eval/{benchmark}/{k}": v for k, v in row.items() if k not in ("step", "benchmark")}, step)

    def _wandb_log(self, values: dict, step: int) -> None:
        if self.wandb is not None:
            try:
                self.wandb.log(values, step=step)
            except Exception as err:
                warnings.warn(f"wandb.log failed ({err}); logging to CSV only from now on", stacklevel=2)
                self.wandb = None

    def finish(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as err:
                warnings.warn(f"wandb.finish failed: {err}", stacklevel=2)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_run(run_dir: Path) -> Path:
    """training.png: loss (and learning rate) against step, verification accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_csv(run_dir / "metrics.csv")
    evals = read_csv(run_dir / "eval.csv")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [int(r["step"]) for r in train]
    ax_loss.plot(steps, [float(r["loss"]) for r in train], label="training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(steps, [float(r["lr"]) for r in train], color="tab:gray", alpha=0.5, label="lr")
    ax_lr.set_ylabel("learning rate")
    for name in sorted({r["benchmark"] for r in evals}):
        rows = [r for r in evals if r["benchmark"] == name]
        ax_acc.plot([int(r["step"]) for r in rows], [100 * float(r["accuracy"]) for r in rows], "o-", label=name)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("verification accuracy (%)")
    ax_acc.set_title("10-fold verification accuracy")
    if evals:
        ax_acc.legend()
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
