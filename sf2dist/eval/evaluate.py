"""From a model and a benchmark to numbers: the path shared by `sf2dist-eval` and training.

A benchmark is a pair set (an InsightFace `.bin`, a synthetic held-out set in the same
format, or a `label path0 path1` pair list) or an IJB-style directory. Each evaluation
embeds the images once (`extract_embeddings`, flip-fused, split over the ranks of `group`)
and returns a `BenchmarkResult`: JSON-ready metrics and the ROC for the plot. Training calls
`evaluate_pairs` with pair sets it loaded once.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sf2dist.eval.bin_io import PairSet, load_pairs
from sf2dist.eval.extract import extract_embeddings
from sf2dist.eval.ijb import IJBImages, ijb_metrics, is_ijb_directory, load_ijb
from sf2dist.eval.metrics import Roc, cosine_scores, pair_metrics, roc_curve


@dataclass
class BenchmarkResult:
    """One benchmark's numbers (`metrics`, JSON-ready) and its ROC."""

    name: str
    kind: str  # "pairs" or "ijb"
    metrics: dict
    roc: Roc


@dataclass(frozen=True)
class ExtractOptions:
    """How images are embedded: see `extract_embeddings`."""

    batch_size: int = 128
    flip: bool = True
    device: str | torch.device | None = None
    group: dist.ProcessGroup | None = None
    num_workers: int = 0


def _pair_result(model: nn.Module, pairs: PairSet, options: ExtractOptions) -> tuple[dict, Roc]:
    start = time.perf_counter()
    embeddings = extract_embeddings(model, pairs.images, **vars(options))
    seconds = time.perf_counter() - start
    first, second = embeddings[0::2], embeddings[1::2]
    metrics = {**pair_metrics(first, second, pairs.issame), "extract_seconds": seconds}
    return metrics, roc_curve(cosine_scores(first, second), pairs.issame)


def evaluate_pairs(
    model: nn.Module, benchmark: PairSet | str | os.PathLike, options: ExtractOptions = ExtractOptions()
) -> dict:
    """Verification metrics of `model` on a pair set (loaded, or a path to load it from).

    Keys: accuracy, accuracy_std (10-fold), best_accuracy, best_threshold, eer, auc,
    tar_at_far, pair counts and extract_seconds; see `sf2dist.eval.metrics` for definitions.
    """
    pairs = benchmark if isinstance(benchmark, PairSet) else load_pairs(benchmark)
    return _pair_result(model, pairs, options)[0]


def evaluate_benchmark(
    model: nn.Module, path: str | os.PathLike, options: ExtractOptions = ExtractOptions()
) -> BenchmarkResult:
    """Evaluate `model` on the benchmark at `path`: a pair-set file or an IJB-style directory."""
    path = Path(path)
    if path.is_dir():
        if not is_ijb_directory(path):
            raise ValueError(f"{path} is a directory but not an IJB-style benchmark (no meta/*_face_tid_mid.txt)")
        protocol = load_ijb(path)
        start = time.perf_counter()
        embeddings = extract_embeddings(model, IJBImages(protocol), **vars(options))
        seconds = time.perf_counter() - start
        metrics, roc = ijb_metrics(protocol, embeddings)
        return BenchmarkResult(protocol.name, "ijb", {**metrics, "extract_seconds": seconds}, roc)
    metrics, roc = _pair_result(model, load_pairs(path), options)
    return BenchmarkResult(path.stem, "pairs", metrics, roc)
