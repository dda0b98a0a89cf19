"""The reproduction's tables and plots, from results.json, and their sections of docs/results.md.

Every number of a row is over its final runs (one per seed, all evaluated on the test
identities): the mean and the sample standard deviation (ddof 1) across seeds; "k-fold std"
is the mean over seeds of each run's standard deviation across the k folds of the LFW
protocol. Accuracy is the k-fold accuracy on the first test pair set, k the folds the
evaluation used: as its metrics record them ("folds"), else sf2dist-eval's (`EVAL_FOLDS`).
TAR@FAR comes from the first IJB-style test benchmark
(from the first pair set when there is none).

A row is compared with its reference seed by seed: seed k gives every row the same data order,
initialisation and flips, so most of the variation between seeds is shared and cancels in the
per-seed difference d_k = row_k - reference_k. The tables give the mean of the d_k over the
seeds both rows have and its 90 % confidence interval, mean ± t(0.95, n-1) · sd(d) / sqrt(n)
(Student's t, n the seeds in common); a difference is called only when that interval excludes
0, and "agrees" compares its sign with the paper's (its figures where it has them, else its
text). With fewer than two common seeds nothing is called ("n/a").

Convergence (`convergence`): how each row's final runs trained, from the curves and the
end-of-training metrics the runner stores. The training loss at 50 % and 75 % of a run is the
logged loss nearest that step (of the last logged step), at 100 % the mean of the losses
logged in the last 5 % of the steps; the change over the last quarter is (loss at 100 % −
loss at 75 %) / loss at 75 %; each is taken per run, then averaged over seeds. Beside them,
the accuracy on the seen pairs (the training identities' own training images) and on
validation at the last step, mean ± std over seeds. The code states the numbers; whether they
say "converged" is for the reader.
"""
from __future__ import annotations

import inspect
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sf2dist.eval.metrics import pair_metrics
from sf2dist.reproduce import paper
from sf2dist.reproduce.plan import LOSSES, Experiment, Plan, Row
from sf2dist.reproduce.runner import seen_score, val_score

FARS = ("1e-03", "1e-04", "1e-05")
# the folds of sf2dist-eval's pair accuracy: it calls `pair_metrics` with its default
EVAL_FOLDS: int = inspect.signature(pair_metrics).parameters["folds"].default
RESULTS_HEADER = ("# Results: SphereFace2 against softmax\n\n"
                  "Written by `launch/reproduce.py` (`make reproduce`); each section is rewritten by its experiment. "
                  "The paper's claims and figures are beside each table, with their sources.\n")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (std None with fewer than two values)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass(frozen=True)
class RowSummary:
    key: str  # "experiment/row"
    label: str
    setting: dict  # the chosen setting
    val_score: float | None  # of the chosen setting at the first seed
    seeds: tuple[int, ...]  # of the runs with test metrics
    accuracy: Stat
    fold_std: Stat
    tar: dict[str, Stat]  # "1e-04" -> TAR over seeds
    folds: tuple[int, ...] = ()  # of each run's accuracy, as its evaluation used them
    accuracy_by_seed: dict[int, float] = field(default_factory=dict)
    tar_by_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # "1e-04" -> seed -> TAR


def _primary(test: dict, kind: str) -> dict | None:
    for metrics in test.values():
        if metrics.get("kind") == kind:
            return metrics
    return None


def summarize(results: dict, experiment: Experiment) -> list[RowSummary]:
    """Every row's numbers over its final runs (module doc), from results.json's content."""
    summaries = []
    for row in experiment.rows:
        key = f"{experiment.name}/{row.name}"
        stored = results["rows"].get(key, {})
        accuracy, fold_std, tar = [], [], {far: [] for far in FARS}
        seeds, folds, accuracy_by_seed, tar_by_seed = [], [], {}, {far: {} for far in FARS}
        for run_id in stored.get("final_runs", []):
            record = results["runs"].get(run_id) or {}
            test = record.get("test")
            if not test:
                continue
            pairs = _primary(test, "pairs")
            templates = _primary(test, "ijb") or pairs
            seeds.append(record["seed"])
            if pairs is not None:
                accuracy.append(pairs["accuracy"])
                accuracy_by_seed[record["seed"]] = pairs["accuracy"]
                fold_std.append(pairs["accuracy_std"])
                folds.append(int(pairs.get("folds", EVAL_FOLDS)))
            if templates is not None:
                for far in FARS:
                    value = templates.get("tar_at_far", {}).get(far)
                    if value is not None:
                        tar[far].append(value)
                        tar_by_seed[far][record["seed"]] = value
        chosen_score = None
        for candidate in stored.get("candidates", []):
            if candidate["settings"] == stored.get("chosen"):
                chosen_score = candidate["val_score"]
        summaries.append(RowSummary(
            key=key, label=row.label, setting=stored.get("setting") or {}, val_score=chosen_score,
            seeds=tuple(seeds), accuracy=Stat(tuple(accuracy)), fold_std=Stat(tuple(fold_std)),
            tar={far: Stat(tuple(values)) for far, values in tar.items()}, folds=tuple(folds),
            accuracy_by_seed=accuracy_by_seed, tar_by_seed=tar_by_seed,
        ))
    return summaries


def fold_counts(summaries: list[RowSummary]) -> list[int]:
    """The folds the accuracies of these rows were taken over (module doc), each count once."""
    return sorted({k for s in summaries for k in s.folds}) or [EVAL_FOLDS]


def fold_label(summaries: list[RowSummary]) -> str:
    """The fold count for headers, e.g. "10-fold"; "2/10-fold" where the runs' evaluations differ."""
    return "/".join(map(str, fold_counts(summaries))) + "-fold"


# -- comparisons ---------------------------------------------------------------------------
# Student's t, the 0.95 quantile (the bounds of a two-sided 90 % interval), by degrees of freedom
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729,
        20: 1.725, 25: 1.708, 30: 1.697, 40: 1.684, 60: 1.671, 120: 1.658}


def t95(df: int) -> float:
    """t(0.95, df); between tabulated degrees of freedom the next smaller one's (a wider interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95[max(k for k in _T95 if k <= df)] if df <= 120 else 1.645


@dataclass(frozen=True)
class Paired:
    """The per-seed differences of a row against its reference, over the seeds both have."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]

    @property
    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seeds, self.differences))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.differences) if self.differences else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 90 % confidence interval of the mean difference (module doc); None below two seeds."""
        n = len(self.differences)
        if n < 2:
            return None
        half = t95(n - 1) * statistics.stdev(self.differences) / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def sign(self) -> int | None:
        """+1 or -1 when the interval excludes 0, 0 when it holds it, None when there is none."""
        if self.interval is None:
            return None
        low, high = self.interval
        return 1 if low > 0 else -1 if high < 0 else 0


def paired(row: dict[int, float], reference: dict[int, float]) -> Paired:
    seeds = tuple(sorted(set(row) & set(reference)))
    return Paired(seeds, tuple(row[k] - reference[k] for k in seeds))


def paired_agreement(diff: Paired, expected: int | None) -> str:
    """Whether our paired difference goes the paper's way: only an interval that excludes 0 decides."""
    if expected is None:
        return "–"
    if diff.sign is None:
        return "n/a"
    if diff.sign == 0:
        return "not resolved (interval holds 0)"
    return "yes" if diff.sign == expected else "**no** (reversed)"


def paired_text(diff: Paired) -> str:
    """"+1.23 [+0.40, +2.06]" in points; the mean alone with one seed, "–" with none."""
    if diff.mean is None:
        return "–"
    if diff.interval is None:
        return f"{100 * diff.mean:+.2f} (1 seed)"
    low, high = diff.interval
    return f"{100 * diff.mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def paper_text(value: float | None, reference: float | None = None) -> str:
    """The paper's figure (%), with its difference from the reference row's where both exist."""
    if value is None:
        return "–"
    return f"{value:.2f}" if reference is None else f"{value:.2f} ({value - reference:+.2f})"


# -- formatting ---------------------------------------------------------------------------
def percent(stat: Stat, digits: int = 2) -> str:
    if stat.mean is None:
        return "–"
    text = f"{100 * stat.mean:.{digits}f}"
    return text if stat.std is None else f"{text} ± {100 * stat.std:.{digits}f}"


def setting_text(setting: dict, hide: Sequence[str] = ()) -> str:
    shown = [f"{key.split('.', 1)[1]} {value:g}" if isinstance(value, float) else f"{key.split('.', 1)[1]} {value}"
             for key, value in sorted(setting.items()) if key not in hide]
    return ", ".join(shown) or "as the trainer config"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _tar_columns(summary: RowSummary) -> list[str]:
    return [percent(summary.tar[far]) for far in FARS]


def losses_table(summaries: list[RowSummary], experiment: Experiment) -> str:
    by_name = {s.key.split("/", 1)[1]: s for s in summaries}
    folds = fold_label(summaries)
    header = ["loss", "chosen on validation", "seeds", f"accuracy % ({folds})", f"{folds} std",
              *[f"TAR@{far} %" for far in FARS], "paired Δ accuracy vs reference [90 % CI]",
              "paired Δ TAR@1e-04 [90 % CI]", "paper: combined % (Δ)", "paper: IJB-B TAR@1e-04 % (Δ)", "agrees"]
    rows = []
    for row in experiment.rows:
        summary = by_name[row.name]
        reference = by_name.get(row.reference) if row.reference else None
        combined, tar = paper.combined("losses", row.name), paper.tar("losses", row.name, "1e-04")
        if reference is None:
            cells = ["reference", "–", paper_text(combined), paper_text(tar), "–"]
        else:
            accuracy = paired(summary.accuracy_by_seed, reference.accuracy_by_seed)
            tar_diff = paired(summary.tar_by_seed.get("1e-04", {}), reference.tar_by_seed.get("1e-04", {}))
            cells = [paired_text(accuracy), paired_text(tar_diff),
                     paper_text(combined, paper.combined("losses", row.reference)),
                     paper_text(tar, paper.tar("losses", row.reference, "1e-04")),
                     paired_agreement(accuracy, paper.direction("losses", row.name, row.reference))]
        rows.append([row.label, setting_text(summary.setting, hide=LOSSES[row.name]), str(len(summary.seeds)),
                     percent(summary.accuracy), percent(summary.fold_std), *_tar_columns(summary), *cells])
    return _table(header, rows)


def ablation_table(summaries: list[RowSummary], experiment: Experiment) -> str:
    by_name = {s.key.split("/", 1)[1]: s for s in summaries}
    folds = fold_label(summaries)
    header = ["row", "setting (chosen on validation)", "seeds", f"accuracy % ({folds})", f"{folds} std",
              *[f"TAR@{far} %" for far in FARS], "against", "paired Δ accuracy [90 % CI]", "paper: combined % (Δ)",
              "agrees"]
    rows = []
    for row in experiment.rows:
        summary = by_name[row.name]
        combined = paper.combined("ablation", row.name)
        if row.reference is None:
            cells = ["–", "–", paper_text(combined), "–"]
        else:
            accuracy = paired(summary.accuracy_by_seed, by_name[row.reference].accuracy_by_seed)
            cells = [row.reference, paired_text(accuracy),
                     paper_text(combined, paper.combined("ablation", row.reference)),
                     paired_agreement(accuracy, paper.direction("ablation", row.name, row.reference))]
        rows.append([row.label, setting_text(summary.setting, hide=("head.type",)), str(len(summary.seeds)),
                     percent(summary.accuracy), percent(summary.fold_std), *_tar_columns(summary), *cells])
    return _table(header, rows)


def noise_table(summaries: list[RowSummary], experiment: Experiment) -> str:
    by_name = {s.key.split("/", 1)[1]: s for s in summaries}
    groups: dict[str, list] = {}
    for row in experiment.rows:
        groups.setdefault(row.group, []).append(row)
    losses = [row.label for row in next(iter(groups.values()))]
    compared = [row for row in next(iter(groups.values())) if row.reference is not None]
    reference_label = next((row.label for row in next(iter(groups.values())) if row.reference is None), None)
    header = ["label noise", *[f"{loss} accuracy %" for loss in losses],
              *[f"paired Δ {row.label} − {reference_label} [90 % CI]" for row in compared], "paper", "agrees",
              *["change of that Δ since 0 % noise [90 % CI]" if len(compared) == 1 else
                f"change of Δ {row.label} since 0 % noise [90 % CI]" for row in compared],
              f"{reference_label} degrades more slowly (the paper)"]

    def gap(row: Row) -> Paired:  # the row's per-seed differences from its reference
        return paired(by_name[row.name].accuracy_by_seed, by_name[row.reference].accuracy_by_seed)

    clean = {row.label: row for group, rows in groups.items() if float(group) == 0.0 for row in rows}
    lines = []
    for group, rows in groups.items():
        cells = [f"{100 * float(group):.0f} %", *[percent(by_name[row.name].accuracy) for row in rows]]
        verdicts, changes, slower = [], [], []
        for row in rows:
            if row.reference is None:
                continue
            diff = gap(row)
            cells.append(paired_text(diff))
            verdicts.append(paired_agreement(diff, paper.direction("noise", row.name)))
            # the paper's claim is about the slope: the gap at this ratio against the same seeds' gap without
            # noise; a slower degradation of the reference makes the other loss's Δ more negative
            base = clean.get(row.label)
            if base is None or float(group) == 0.0:
                changes.append("–")
                continue
            change = paired(diff.by_seed, gap(base).by_seed)
            changes.append(paired_text(change))
            slower.append(paired_agreement(change, paper.direction("noise", row.name)))
        expected = [paper.direction("noise", row.name) for row in rows if row.reference is not None]
        claim = f"{reference_label} highest" if expected and all(e == -1 for e in expected) else "–"
        lines.append([*cells, claim, "; ".join(verdicts) or "–", *changes, "; ".join(slower) or "–"])
    return _table(header, lines)


TABLES = {"losses": losses_table, "ablation": ablation_table, "noise": noise_table}


# -- plots --------------------------------------------------------------------------------
def _bars(axes, labels: list[str], stats: list[Stat], ylabel: str) -> None:
    means = [100 * s.mean if s.mean is not None else math.nan for s in stats]
    errors = [100 * s.std if s.std is not None else 0.0 for s in stats]
    axes.bar(range(len(labels)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        spread = max(errors + [0.5])
        axes.set_ylim(max(0.0, min(finite) - 4 * spread), min(100.0, max(finite) + 4 * spread))
    else:
        axes.text(0.5, 0.5, "not measurable on this set", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    axes.grid(True, axis="y", alpha=0.3)


def plot(summaries: list[RowSummary], experiment: Experiment, path: str | os.PathLike) -> Path:
    """The experiment's figure: accuracy (and TAR@1e-4) by row with seed error bars, or accuracy against noise."""
    figure = Figure(figsize=(9.6, 4.4), layout="constrained")
    if experiment.name == "noise":
        axes = figure.add_subplot()
        by_name = {s.key.split("/", 1)[1]: s for s in summaries}
        losses = dict.fromkeys(row.label for row in experiment.rows)
        for loss in losses:
            rows = [row for row in experiment.rows if row.label == loss]
            ratios = [100 * float(row.group) for row in rows]
            stats = [by_name[row.name].accuracy for row in rows]
            axes.errorbar(ratios, [100 * s.mean if s.mean is not None else math.nan for s in stats],
                          yerr=[100 * s.std if s.std is not None else 0.0 for s in stats], marker="o", capsize=4,
                          label=loss)
        axes.set_xlabel("labels replaced by other identities (% of each class)")
        axes.set_ylabel(f"test accuracy % ({fold_label(summaries)})")
        axes.grid(True, alpha=0.3)
        axes.legend()
    else:
        labels = [s.key.split("/", 1)[1] for s in summaries]
        _bars(figure.add_subplot(1, 2, 1), labels, [s.accuracy for s in summaries],
              f"test accuracy % ({fold_label(summaries)})")
        _bars(figure.add_subplot(1, 2, 2), labels, [s.tar["1e-04"] for s in summaries], "test TAR@FAR=1e-4 %")
    figure.suptitle(f"{experiment.title}: mean ± std over seeds")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


# -- convergence --------------------------------------------------------------------------
LOSS_AT = (0.5, 0.75)  # fractions of a run at which the table reads the logged loss
FINAL_SPAN = 0.05  # the loss at 100 %: the mean over this last fraction of the steps


@dataclass(frozen=True)
class Convergence:
    """How a row's final runs trained (module doc), over the seeds whose training finished."""

    key: str  # "experiment/row"
    label: str
    seeds: tuple[int, ...]
    loss: dict[float, Stat]  # 0.5, 0.75, 1.0 -> the training loss there, over seeds
    last_quarter: Stat  # relative change of the loss from 75 % to 100 %
    seen: Stat  # seen-pair accuracy at the end
    val: Stat  # validation accuracy at the end
    loss_curve: tuple[tuple[int, float], ...] = ()  # of the first seed's run
    val_curves: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)  # name -> (step, accuracy)
    seen_curves: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)


def _logged(points: list) -> list[tuple[int, float]]:
    """The [step, value] points of a stored curve that have a value."""
    return [(int(step), float(value)) for step, value in points if value is not None]


def loss_at(points: list[tuple[int, float]], fraction: float) -> float | None:
    """The logged loss nearest `fraction` of the last logged step (the earlier one on ties)."""
    if not points:
        return None
    target = fraction * points[-1][0]
    return min(points, key=lambda point: abs(point[0] - target))[1]


def final_loss(points: list[tuple[int, float]], span: float = FINAL_SPAN) -> float | None:
    """The mean of the losses logged in the last `span` of the steps (at least the last one)."""
    if not points:
        return None
    start = (1.0 - span) * points[-1][0]
    return statistics.fmean(value for step, value in points if step >= start)


def convergence(results: dict, experiment: Experiment) -> list[Convergence]:
    """Every row's convergence numbers over its final runs (module doc), from results.json's content."""
    rows = []
    for row in experiment.rows:
        key = f"{experiment.name}/{row.name}"
        seeds, seen, val, last_quarter = [], [], [], []
        loss: dict[float, list[float]] = {fraction: [] for fraction in (*LOSS_AT, 1.0)}
        first: dict = {}
        for run_id in results["rows"].get(key, {}).get("final_runs", []):
            record = results["runs"].get(run_id) or {}
            if val_score(record) is None:  # not trained to the end
                continue
            first = first or record
            seeds.append(record["seed"])
            val.append(val_score(record))
            if seen_score(record) is not None:
                seen.append(seen_score(record))
            points = _logged((record.get("curve") or {}).get("loss", []))
            if not points:
                continue
            values = {fraction: loss_at(points, fraction) for fraction in LOSS_AT} | {1.0: final_loss(points)}
            for fraction, value in values.items():
                loss[fraction].append(value)
            if values[0.75]:
                last_quarter.append((values[1.0] - values[0.75]) / abs(values[0.75]))
        evaluations = (first.get("curve") or {}).get("eval", {})
        label = row.label if row.group is None else f"{row.label}, {100 * float(row.group):g} % noise"
        rows.append(Convergence(
            key=key, label=label, seeds=tuple(seeds), loss={f: Stat(tuple(v)) for f, v in loss.items()},
            last_quarter=Stat(tuple(last_quarter)), seen=Stat(tuple(seen)), val=Stat(tuple(val)),
            loss_curve=tuple(_logged((first.get("curve") or {}).get("loss", []))),
            val_curves={name: tuple(_logged(points)) for name, points in evaluations.items()
                        if name in (first.get("val") or {})},
            seen_curves={name: tuple(_logged(points)) for name, points in evaluations.items()
                         if name in (first.get("seen") or {})},
        ))
    return rows


def _loss_text(stat: Stat) -> str:
    return "–" if stat.mean is None else f"{stat.mean:.4g}"


def convergence_table(rows: list[Convergence], experiment: Experiment) -> str:
    header = ["loss" if experiment.name == "losses" else "row", "seeds", "training loss at 50 %", "at 75 %",
              f"at 100 % (last {100 * FINAL_SPAN:g} %)", "change over the last quarter %",
              "seen-pair accuracy % (training identities)", "val accuracy %"]
    lines = [[row.label, str(len(row.seeds)), *[_loss_text(row.loss[f]) for f in (*LOSS_AT, 1.0)],
              percent(row.last_quarter, 1), percent(row.seen), percent(row.val)] for row in rows]
    return _table(header, lines)


CONVERGENCE_NOTE = (
    "Training loss: each final run's logged loss nearest 50 % and 75 % of its steps and its mean over the last "
    f"{100 * FINAL_SPAN:g} % of the steps, averaged over seeds (heads differ in scale: read a row across, not rows "
    "against each other); change over the last quarter: (loss at 100 % − loss at 75 %) / loss at 75 %; seen-pair "
    "accuracy: pairs of the training identities' own training images, val: the validation identities, both at the "
    "last step; mean ± std over seeds.")


def plot_convergence(rows: list[Convergence], experiment: Experiment, path: str | os.PathLike) -> Path:
    """Training loss against step (left) and seen and validation accuracy against step (right), per row,
    of the first seed's run; a run evaluated only at its end gives one marker per benchmark."""
    figure = Figure(figsize=(11.0, 4.4), layout="constrained")
    loss_axes, accuracy_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for index, row in enumerate(rows):
        colour = f"C{index % 10}"
        if row.loss_curve:
            steps, values = zip(*row.loss_curve)
            loss_axes.plot(steps, values, color=colour, label=row.label)
        for curves, style in ((row.val_curves, "-"), (row.seen_curves, "--")):
            for points in curves.values():
                if points:
                    steps, values = zip(*points)
                    accuracy_axes.plot(steps, [100 * v for v in values], style, marker="o", markersize=3,
                                       color=colour)
    if all(value > 0 for row in rows for _, value in row.loss_curve) and any(row.loss_curve for row in rows):
        loss_axes.set_yscale("log")
    loss_axes.set(xlabel="step", ylabel="training loss (logged)", title="training loss")
    accuracy_axes.set(xlabel="step", ylabel="accuracy %", title="pair accuracy during training")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(True, alpha=0.3)
    if any(row.loss_curve for row in rows):
        loss_axes.legend(fontsize="small")
    accuracy_axes.legend(handles=[Line2D([], [], color="gray", linestyle="--", marker="o", markersize=3,
                                         label="seen pairs (training identities)"),
                                  Line2D([], [], color="gray", linestyle="-", marker="o", markersize=3,
                                         label="validation identities")], fontsize="small")
    seeds = sorted({seed for row in rows for seed in row.seeds})
    figure.suptitle(f"{experiment.title}: how the final runs trained (seed {seeds[0] if seeds else '–'})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def convergence_section(results: dict, experiment: Experiment, *, plot_link: str) -> str:
    """The convergence part of an experiment's section: the table, what its columns mean, the plot."""
    seen = (results.get("benchmarks") or {}).get("seen") or []
    return "\n".join([
        "#### How the final runs trained",
        "",
        f"Seen pairs: {', '.join(f'`{p}`' for p in seen) or 'none in this plan'}; they are evaluated with validation "
        f"during training and never choose anything.",
        "",
        convergence_table(convergence(results, experiment), experiment),
        "",
        CONVERGENCE_NOTE,
        "",
        f"![{experiment.title}: training curves]({plot_link})",
    ])


def convergence_image(docs: Path, experiment: Experiment) -> str:
    """The file name of an experiment's convergence plot beside docs (the losses': results_convergence.png)."""
    return f"{docs.stem}_convergence.png" if experiment.name == "losses" else \
        f"{docs.stem}_{experiment.name}_convergence.png"


# -- docs/results.md ----------------------------------------------------------------------
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def section(results: dict, experiment: Experiment, *, plot_link: str, command: str, machine: str,
            convergence_link: str | None = None) -> str:
    """The markdown of one experiment's section (module doc for the numbers); with `convergence_link`
    (its convergence plot) also how the final runs trained."""
    summaries = summarize(results, experiment)
    invocations = results["experiments"].get(experiment.name, {}).get("invocations", [])
    compute = 0.0
    for summary_key in (f"{experiment.name}/{row.name}" for row in experiment.rows):
        for run_id in results["rows"].get(summary_key, {}).get("final_runs", []):
            record = results["runs"].get(run_id) or {}
            compute += sum((record.get(step) or {}).get("seconds", 0.0) for step in ("train", "test_eval"))
    seeds = sorted({seed for s in summaries for seed in s.seeds})
    test = results["benchmarks"]["test"]
    lines = [
        f"### {experiment.title}",
        "",
        f"Command: `{command}`. Machine: {machine}.",
    ]
    if invocations:
        # the last invocation that trained or evaluated something: a re-run that found every run done
        # (to re-render the page) must not pass for the experiment's wall time
        working = [record for record in invocations if record["trained"] or record["tested"]]
        last = (working or invocations)[-1]
        later = len(invocations) - 1 - invocations.index(last)
        lines.append(f"Wall time of the last invocation that ran anything: {_minutes(last['wall_seconds'])} "
                     f"({last['trained']} runs trained, {last['tested']} evaluated on test, {len(last['failed'])} "
                     f"failed, {last['jobs']} at a time"
                     + (f"; {later} later invocation(s) found nothing left to run" if later else "")
                     + f"); the final runs took {_minutes(compute)} of run time together.")
    lines += [
        "",
        f"Test identities only: accuracy is the {fold_label(summaries)} accuracy on `{test[0]}`, TAR@FAR from "
        f"`{next((p for p in test if not p.endswith('.bin')), test[0])}`; hyper-parameters were chosen on "
        f"{', '.join(f'`{p}`' for p in results['benchmarks']['val'])} with seed {seeds[0] if seeds else '–'}. "
        f"Mean ± std over seeds {', '.join(map(str, seeds)) or '–'} (sample std). A row is compared with its "
        f"reference seed by seed (the same seed gives both the same data order, initialisation and flips): the "
        f"paired Δ is the mean per-seed difference in points with its 90 % confidence interval (Student's t); a "
        f"difference is called only when the interval excludes 0, and \"agrees\" compares its sign with the "
        f"paper's. The paper's columns are its own figures (SFNet-20 on VGGFace2, one run each) with their "
        f"difference from the reference row: directions compare, levels do not.{_layout_note(results, summaries)}",
        "",
        TABLES[experiment.name](summaries, experiment),
        "",
        f"![{experiment.title}]({plot_link})",
        "",
        f"Paper ({paper.SOURCE}): {paper.CLAIMS[experiment.name]}",
    ]
    if convergence_link is not None:
        lines += ["", convergence_section(results, experiment, plot_link=convergence_link)]
    return "\n".join(lines)


def _layout_note(results: dict, summaries: list[RowSummary]) -> str:
    """A sentence where the generated pair set's folds (identity-disjoint) are not the evaluation's."""
    layout = ((results.get("fingerprint") or {}).get("openset") or {}).get("folds")
    if layout is None or fold_counts(summaries) == [layout]:
        return ""
    return (f" The pair sets are laid out in {layout} folds of disjoint identities, but the accuracy splits them "
            f"into {'/'.join(map(str, fold_counts(summaries)))} folds, so each fold's threshold is chosen partly on "
            f"pairs of its own identities.")


def setup_section(plan: Plan, *, command: str, machine: str) -> str:
    """What every experiment below ran on: the profile, the data, the seeds, how runs were launched."""
    lines = ["### Set-up", "", f"Profile `{plan.name}` ({plan.path.name}; trainer config {plan.train_config.name}), "
             f"last command `{command}`, machine: {machine}.", ""]
    spec = plan.openset
    if spec is not None:
        genuine, impostor = spec.template_pair_counts
        lines.append(
            f"Data: the synthetic open-set benchmark of `sf2dist.data.openset` in `{plan.data_root}` "
            f"(seed {spec.seed}, {spec.size}x{spec.size} images, jitter {spec.jitter:g}): "
            f"{spec.train_identities:,} training identities x {spec.train_images} images (and {spec.pairs:,} seen "
            f"pairs of these very images, the training-identity accuracy); {spec.val_identities:,} validation and "
            f"{spec.test_identities:,} test identities, disjoint, each set {spec.pairs:,} pairs in LFW's layout "
            f"({spec.folds} folds); "
            f"{spec.test_identities * spec.templates_per_subject:,} test templates of {spec.images_per_template} "
            f"images ({genuine:,} genuine and {impostor:,} impostor comparisons).")
    else:
        lines.append(f"Data: training `{plan.train}`; validation {', '.join(f'`{p}`' for p in plan.val)}; test "
                     f"{', '.join(f'`{p}`' for p in plan.test)}; seen pairs (training identities) "
                     f"{', '.join(f'`{p}`' for p in plan.seen) or 'none'}.")
    lines += ["", f"Seeds {', '.join(map(str, plan.seeds))} (the first chooses the hyper-parameters, on validation "
                  f"only); each run {plan.nproc} rank(s) x {plan.threads} thread(s), {plan.jobs} run(s) at a time"
                  + (f" on devices {', '.join(plan.devices)}" if plan.devices else "")
                  + f". Grids: `{plan.path.name}`."]
    return "\n".join(lines)


def _docs_file(docs: str | os.PathLike) -> Path:
    docs = Path(docs)
    if not docs.exists():
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(RESULTS_HEADER)
    return docs


def write_setup(plan: Plan, docs: str | os.PathLike, *, command: str, machine: str) -> Path:
    from sf2dist.report import write_section

    docs = _docs_file(docs)
    write_section(docs, "reproduce-setup", setup_section(plan, command=command, machine=machine))
    return docs


def write_docs(results: dict, experiment: Experiment, docs: str | os.PathLike, *, command: str, machine: str) -> Path:
    """Plot (results and convergence) into docs' folder and (re)write the experiment's section of the docs file."""
    from sf2dist.report import write_section

    docs = _docs_file(docs)
    image, curves = f"{docs.stem}_{experiment.name}.png", convergence_image(docs, experiment)
    plot(summarize(results, experiment), experiment, docs.parent / image)
    plot_convergence(convergence(results, experiment), experiment, docs.parent / curves)
    write_section(docs, f"reproduce-{experiment.name}",
                  section(results, experiment, plot_link=image, command=command, machine=machine,
                          convergence_link=curves))
    return docs
