"""How evaluation results leave the program: the printed table, the JSON file, the ROC plot.

Rates are printed in percent; the JSON keeps the fractions `sf2dist.eval.metrics` computed.
A TAR (or TPIR) that the set is too small to measure is printed as `-` and stored as null;
a line under the table says so, with the counts that fell short.
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


def plot_roc(results: Sequence[BenchmarkResult], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw every result's ROC (TAR against FAR on a log axis) into one PNG, titled `title`
    (also stored as the PNG's Title text)."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    if title:
        axes.set_title(title)
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
    figure.savefig(path, dpi=120, bbox_inches="tight", metadata={"Title": title} if title else None)
    return path


def write_results(
    results: Sequence[BenchmarkResult], out_dir: str | os.PathLike, context: dict[str, Any], title: str | None = None
) -> tuple[Path, Path]:
    """Write `results.json` (`context` plus every benchmark's metrics) and `roc.png` (titled `title`) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {**context, "benchmarks": {r.name: {"kind": r.kind, **r.metrics} for r in results}}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return json_path, plot_roc(results, out_dir / "roc.png", title)

