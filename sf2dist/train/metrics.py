"""What a run reports: metrics.csv and eval.csv in the run directory, wandb, the final plot.

Only rank 0 holds a `RunLog`. wandb runs offline unless the config says otherwise, and quietly
(its files are written as ever; its run history and summary are not printed at the end); if it
cannot start (no network for online mode, a broken install) the run goes on with a warning
and the CSV files, which always exist.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "loss_scale", "skipped_steps", "elapsed_s",
                 "images_per_step")
EVAL_COLUMNS = ("step", "benchmark", "accuracy", "accuracy_std", "best_accuracy", "eer", "auc")


def logged_outputs(run_dir: Path) -> list[str]:
    """What RUN_DIR holds of a run that trained: metrics.csv and eval.csv rows, training.png, each
    described (e.g. "metrics.csv (steps 10 to 100)"). Files with a header only, as an attempt that
    stopped before its first logged step leaves, do not count."""
    found = []
    for name in ("metrics.csv", "eval.csv"):
        path = run_dir / name
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            steps = [row.get("step", "") for row in csv.DictReader(f)]
        if steps:
            found.append(f"{name} (steps {steps[0]} to {steps[-1]}, {len(steps)} rows)")
    if (run_dir / "training.png").is_file():
        found.append("training.png")
    return found


class RunLog:
    def __init__(self, run_dir: Path, config: dict, logging_cfg) -> None:
        self.run_dir = run_dir
        self.train_path = run_dir / "metrics.csv"
        self.eval_path = run_dir / "eval.csv"
        # A resumed run appends under the header its file already has: one written before a column
        # was added keeps its columns (the new one is left out there), so every row still parses.
        self.columns: dict[Path, tuple[str, ...]] = {}
        for path, columns in ((self.train_path, TRAIN_COLUMNS), (self.eval_path, EVAL_COLUMNS)):
            if path.exists() and path.stat().st_size:
                with open(path, newline="") as f:
                    columns = tuple(next(csv.reader(f), columns))
            else:
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
            self.columns[path] = columns
        self.wandb = None
        if logging_cfg.wandb_mode != "disabled":
            try:
                import wandb

                # quiet: wandb's start lines (where its files are) and its warnings and errors stay, its
                # ~30-line history and summary at finish go, so a run's output ends with its results
                self.wandb = wandb.init(
                    project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity, mode=logging_cfg.wandb_mode,
                    dir=str(run_dir), config=config, name=run_dir.name, resume="allow",
                    settings=wandb.Settings(quiet=True),
                )
            except Exception as err:  # wandb must never take a training run down
                warnings.warn(f"wandb could not start ({err}); metrics go to {self.train_path} only", stacklevel=2)

    def _append(self, path: Path, row: dict) -> None:
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns[path]])

    def train(self, row: dict) -> None:
        self._append(self.train_path, row)
        self._wandb_log({f"train/{k}": v for k, v in row.items() if k != "step"}, row["step"])

    def eval(self, step: int, benchmark: str, metrics: dict) -> None:
        row = {"step": step, "benchmark": benchmark, **{k: metrics.get(k) for k in EVAL_COLUMNS[2:]}}
        self._append(self.eval_path, row)
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
    """The rows of a CSV file with a header; none when the file does not exist."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def training_figure(train: list[dict], evals: list[dict]) -> Figure:
    """Loss, learning rate and (when `evals` holds any) verification accuracy against step, side by side.

    `train` and `evals` are rows of metrics.csv and eval.csv. Accuracy is drawn with error bars
    of ± the 10-fold standard deviation. Rows without an accuracy (a benchmark that reports
    none, such as IJB) are left out; a run with no accuracy to show gets the loss and
    learning-rate panels only, not an empty accuracy panel. Steps are whole numbers on every axis.
    """
    accuracy_rows = [r for r in evals if r.get("accuracy")]
    fig = Figure(figsize=(5.5 * (3 if accuracy_rows else 2), 4))
    axes = fig.subplots(1, 3 if accuracy_rows else 2, sharex=True)  # one step axis, evaluations in line with the loss
    steps = [int(r["step"]) for r in train]
    ax_loss, ax_lr = axes[0], axes[1]
    ax_loss.plot(steps, [float(r["loss"]) for r in train])
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_lr.plot(steps, [float(r["lr"]) for r in train], color="tab:gray",
               label="backbone lr (optim.lr x warm-up x schedule)")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_lr.legend()
    if accuracy_rows:
        ax_acc = axes[2]
        for name in sorted({r["benchmark"] for r in accuracy_rows}):
            rows = [r for r in accuracy_rows if r["benchmark"] == name]
            stds = [100 * float(r["accuracy_std"]) if r.get("accuracy_std") else 0.0 for r in rows]
            x, y = [int(r["step"]) for r in rows], [100 * float(r["accuracy"]) for r in rows]
            (line,) = ax_acc.plot(x, y, "o-", label=name)
            ax_acc.errorbar(x, y, yerr=stds, fmt="none", ecolor=line.get_color(), capsize=0)  # bars only
        ax_acc.set(xlabel="step", ylabel="verification accuracy (%), ± 10-fold std",
                   title="10-fold verification accuracy")
        ax_acc.legend()
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared: every panel's step axis
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path) -> Path:
    """training.png from the run's metrics.csv and eval.csv (see `training_figure`)."""
    path = run_dir / "training.png"
    training_figure(read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv")).savefig(path, dpi=110)
    return path
