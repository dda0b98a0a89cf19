"""How evaluation results leave the program: the printed table, the JSON file, the ROC plot.

Rates are printed in percent; the JSON keeps the fractions `sf2dist.eval.metrics` computed.
A TAR (or TPIR) that the set is too small to measure is printed as `-` and stored as null.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from sf2dist.eval.evaluate import BenchmarkResult


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
    sections = ["1:1 verification (%)", _render(header, rows)]
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
    return "\n".join(sections)


def plot_roc(results: Sequence[BenchmarkResult], path: str | os.PathLike) -> Path:
    """Draw every result's ROC (TAR against FAR on a log axis) into one PNG."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    for result in results:
        shown = result.roc.far > 0  # FAR 0 has no place on a log axis
        axes.plot(result.roc.far[shown], result.roc.tar[shown], label=f"{result.name} (AUC {result.metrics['auc']:.4f})")
    axes.set_xscale("log")
    axes.set_xlim(1e-6, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_results(
    results: Sequence[BenchmarkResult], out_dir: str | os.PathLike, context: dict[str, Any]
) -> tuple[Path, Path]:
    """Write `results.json` (`context` plus every benchmark's metrics) and `roc.png` to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {**context, "benchmarks": {r.name: {"kind": r.kind, **r.metrics} for r in results}}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return json_path, plot_roc(results, out_dir / "roc.png")

