"""How evaluation results leave the program: the printed table, the JSON file, the ROC plots.

Rates are printed in percent; the JSON keeps the fractions `sf2dist.eval.metrics` computed.
A TAR (or TPIR) that the set is too small to measure is printed as `-` and stored as null;
a line under the table says so, with the counts that fell short.

An output folder holds the results of one checkpoint: `results.json` gathers every
evaluation of it written there, one result per benchmark and flip test, so a later
evaluation of other benchmarks or with another `--flip` adds to it:

    {"checkpoint": "/abs/path/model.pt", "step": 20, "backbone": {"name": ..., "kwargs": {...}},
     "flip": "none",                        # the flip test of the latest evaluation
     "benchmarks": {"lfw": {...}},          # everything evaluated with that flip: evaluations[flip]["benchmarks"]
     "evaluations": {
       "sum":  {"benchmarks": {"lfw": {"kind": "pairs", <metrics>, "world_size": 1, "device": "cpu",
                                       "machine": "...", "sf2dist_version": "...",
                                       "evaluated_at": "2026-12-07T01:50:00+00:00"}, "cfp": {...}},
                "roc": {"lfw": {"far": [...], "tar": [...]}, "cfp": {...}}},
       "none": {...}}}

`roc` keeps at most `ROC_POINTS` operating points of each exact ROC, from which
`roc-<flip>.png` (`roc_file`) is redrawn with every benchmark of that flip after each write.
Evaluating a benchmark again with the same flip replaces its entry (and curve); nothing else
is removed. The file is replaced whole (written beside it, then renamed), and one that is not
JSON or holds another checkpoint's results is refused, never overwritten (`read_results`).
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from sf2dist.eval.evaluate import BenchmarkResult
from sf2dist.eval.extract import FLIP_MODES
from sf2dist.eval.metrics import FAR_TARGETS, Roc

RESULTS_FILE = "results.json"
ROC_POINTS = 200  # per stored curve: plenty for a 6.4-inch plot, a few KiB of JSON
PLOT_MIN_FAR = 1e-6  # the plot's left edge


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def format_table(results: Sequence[BenchmarkResult]) -> str:
    """A text table of every result: 1:1 verification, then 1:N identification if any."""
    far_keys = list(results[0].metrics["tar_at_far"]) if results else []
    header = ["benchmark", "pairs", "acc (10-fold)", "best acc", "EER", "AUC", *[f"TAR@{key}" for key in far_keys]]
    rows = []
    for result in results:
        metrics = result.metrics
        accuracy = "-"
        if "accuracy" in metrics:
            accuracy = f"{_percent(metrics['accuracy'])} ± {_percent(metrics['accuracy_std'])}"
        rows.append(
            [
                result.name,
                str(metrics["num_pairs"]),
                accuracy,
                _percent(metrics["best_accuracy"]),
                _percent(metrics["eer"]),
                _percent(metrics["auc"]),
                *[_percent(metrics["tar_at_far"][key]) for key in far_keys],
            ]
        )
    sections = ["1:1 verification (%)", _render(header, rows), *_verification_notes(results)]
    search_rows = []
    fpir_keys: list[str] = []
    for result in results:
        for gallery, search in result.metrics.get("identification", {}).items():
            fpir_keys = list(search["tpir_at_fpir"])
            search_rows.append(
                [
                    result.name,
                    gallery,
                    f"{search['num_mated']}/{search['num_nonmated']}",
                    _percent(search["rank_1"]),
                    _percent(search["rank_5"]),
                    *[_percent(search["tpir_at_fpir"][key]) for key in fpir_keys],
                ]
            )
    if search_rows:
        search_header = ["benchmark", "gallery", "probes mated/non-mated", "rank-1", "rank-5"]
        search_header += [f"TPIR@{key}" for key in fpir_keys]
        sections += ["", "1:N identification (%)", _render(search_header, search_rows)]
        sections += _identification_notes(results)
    return "\n".join(sections)


def _verification_notes(results: Sequence[BenchmarkResult]) -> list[str]:
    """One line for each kind of `-` in the 1:1 table, saying why it is there."""
    notes = []
    short = [r for r in results if any(rate is None for rate in r.metrics["tar_at_far"].values())]
    if short:
        counts = ", ".join(f"{r.name} {r.metrics['num_negative']}" for r in short)
        notes.append(
            '"-" under TAR@FAR: too few negative pairs to measure that FAR (FAR f needs at least 1/f of them; '
            f"negative pairs: {counts})"
        )
    templates = [r.name for r in results if "accuracy" not in r.metrics]
    if templates:
        notes.append(f'"-" under acc (10-fold): not measured on template benchmarks ({", ".join(templates)})')
    return notes


def _identification_notes(results: Sequence[BenchmarkResult]) -> list[str]:
    short = [
        f"{result.name}/{gallery} {search['num_nonmated']}"
        for result in results
        for gallery, search in result.metrics.get("identification", {}).items()
        if any(rate is None for rate in search["tpir_at_fpir"].values())
    ]
    if not short:
        return []
    return [
        '"-" under TPIR@FPIR: too few non-mated probes to measure that FPIR (FPIR f needs at least 1/f of them; '
        f"non-mated probes: {', '.join(short)})"
    ]


def roc_points(roc: Roc, count: int = ROC_POINTS) -> dict[str, list[float]]:
    """At most `count` operating points of `roc`, enough to redraw it on the plot's log axis:
    (0, 0), (1, 1) and, for each FAR of `FAR_TARGETS` and of FARs spaced evenly on that axis,
    the point TAR@FAR reads (the last one at or below it). Every point is one of the exact
    ROC's, and the curve drawn passes through every TAR@FAR of the table."""
    spaced = np.logspace(np.log10(PLOT_MIN_FAR), 0, count - 2 - len(FAR_TARGETS))
    targets = np.union1d(spaced, FAR_TARGETS)
    last = len(roc.far) - 1
    kept = np.unique(np.concatenate([[0], np.searchsorted(roc.far, targets, side="right") - 1, [last]]))
    return {"far": roc.far[kept].tolist(), "tar": roc.tar[kept].tolist()}


def plot_roc(evaluation: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the stored ROC of every benchmark of one flip setting (`results.json`'s
    `evaluations[flip]`: TAR against FAR on a log axis) into one PNG, titled `title` (also
    stored as the PNG's Title text). The file is replaced whole, never left half written."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    if title:
        axes.set_title(title)
    for name, metrics in evaluation["benchmarks"].items():
        points = evaluation["roc"].get(name)
        if points is None:  # taken in from a results.json older than stored curves
            axes.plot([], [], label=f"{name}: curve only in the earlier roc.png")
            continue
        far, tar = np.asarray(points["far"]), np.asarray(points["tar"])
        shown = far > 0  # FAR 0 has no place on a log axis
        axes.plot(far[shown], tar[shown], label=f"{name} (AUC {metrics['auc']:.4f})")
    axes.set_xscale("log")
    axes.set_xlim(PLOT_MIN_FAR, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=120, bbox_inches="tight", metadata={"Title": title} if title else None)
    os.replace(partial, path)
    return path


def roc_file(flip: str) -> str:
    """The name of the ROC plot of the benchmarks evaluated with flip test `flip`."""
    return f"roc-{flip}.png"


def _same_checkpoint(document: dict, evaluated: dict) -> bool:
    stored = document.get("checkpoint")
    return (
        isinstance(stored, str)
        and Path(stored).resolve() == Path(evaluated["checkpoint"]).resolve()
        and document.get("step") == evaluated["step"]
        and document.get("backbone") == json.loads(json.dumps(evaluated["backbone"]))
    )


def read_results(out_dir: str | os.PathLike, evaluated: dict) -> dict | None:
    """The results.json in `out_dir` that the results of checkpoint `evaluated` (its
    "checkpoint", "step" and "backbone") are merged into; None when there is none yet.

    Raises ValueError, leaving the file as it is, when it is not a results file or holds the
    results of another checkpoint. A file from before the `evaluations` layout is taken in as
    the entries of its one flip test, dated by the file's time.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), dict):
            raise ValueError("no 'benchmarks' mapping")
        evaluations = document.get("evaluations", {})
        if not isinstance(evaluations, dict) or not all(
            mode in FLIP_MODES and isinstance(entry, dict)
            and isinstance(entry.get("benchmarks"), dict) and isinstance(entry.get("roc"), dict)
            for mode, entry in evaluations.items()
        ):
            raise ValueError("'evaluations' is not a mapping of flip tests to their 'benchmarks' and 'roc'")
    except ValueError as err:  # json.JSONDecodeError is one
        raise ValueError(
            f"{path} is not a results file of sf2dist-eval ({err}); it is left as it is: move it away, or pass "
            "another --out"
        ) from None
    if not _same_checkpoint(document, evaluated):
        raise ValueError(
            f"{path} holds the results of another checkpoint ({document.get('checkpoint')}, step "
            f"{document.get('step')}, backbone {document.get('backbone')}), not of {evaluated['checkpoint']} (step "
            f"{evaluated['step']}, backbone {evaluated['backbone']}); pass another --out for this one"
        )
    if "evaluations" not in document:
        kept = ("world_size", "device", "machine", "sf2dist_version")
        context = {key: document[key] for key in kept if key in document}
        written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        context["evaluated_at"] = written.isoformat(timespec="seconds")
        benchmarks = {name: {**entry, **context} for name, entry in document["benchmarks"].items()}
        document = {**evaluated, "evaluations": {document.get("flip", "sum"): {"benchmarks": benchmarks, "roc": {}}}}
    return document


@dataclass(frozen=True)
class WrittenResults:
    """What `write_results` wrote: its two files, the earlier results it replaced (benchmark
    name -> when that result was evaluated) and the file's whole content (flip -> benchmarks)."""

    json_path: Path
    roc_path: Path
    replaced: dict[str, str]
    holds: dict[str, list[str]]

    def summary(self) -> str:
        """One line: the files written and what results.json now holds."""
        held = "; ".join(f"flip {flip}: {', '.join(names)}" for flip, names in self.holds.items())
        return f"wrote {self.json_path} and {self.roc_path}; {self.json_path.name} holds {held}"


def write_results(
    results: Sequence[BenchmarkResult],
    out_dir: str | os.PathLike,
    evaluated: dict[str, Any],
    flip: str,
    context: dict[str, Any],
    title: str | None = None,
) -> WrittenResults:
    """Merge `results`, evaluated with flip test `flip`, into `out_dir`'s results.json (module
    doc) and redraw that flip's ROC plot, titled `title`.

    `evaluated` names the checkpoint ("checkpoint", "step", "backbone"); `context` (ranks,
    device, machine, version, time) is stored with each benchmark's metrics. An earlier result
    of the same benchmark and flip is replaced; every other result stays. Raises ValueError as
    `read_results` does, before anything is written.
    """
    out_dir = Path(out_dir)
    document = read_results(out_dir, evaluated) or {**evaluated, "evaluations": {}}
    evaluation = document["evaluations"].setdefault(flip, {"benchmarks": {}, "roc": {}})
    replaced = {}
    for result in results:
        earlier = evaluation["benchmarks"].get(result.name)
        if earlier is not None:
            replaced[result.name] = earlier.get("evaluated_at", "an unknown time")
        evaluation["benchmarks"][result.name] = {"kind": result.kind, **result.metrics, **context}
        evaluation["roc"][result.name] = roc_points(result.roc)
    order = [mode for mode in FLIP_MODES if mode in document["evaluations"]]
    merged = ("flip", "benchmarks", "evaluations")
    checkpoint_fields = {key: value for key, value in document.items() if key not in merged}
    document = {
        **checkpoint_fields,
        "flip": flip,
        "benchmarks": evaluation["benchmarks"],  # the latest flip's view, for readers of the one-flip file
        "evaluations": {mode: document["evaluations"][mode] for mode in order},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / RESULTS_FILE
    partial = json_path.with_name(json_path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(partial, json_path)
    roc_path = plot_roc(evaluation, out_dir / roc_file(flip), title)
    holds = {mode: list(document["evaluations"][mode]["benchmarks"]) for mode in order}
    return WrittenResults(json_path, roc_path, replaced, holds)
