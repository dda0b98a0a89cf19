"""From a model and a benchmark to numbers: the path shared by `sf2dist-eval` and training.

A benchmark is a pair set (an InsightFace `.bin`, a synthetic held-out set in the same
format, or a `label path0 path1` pair list) or an IJB-style directory. `prepare_benchmark`
reads and checks it once and decodes only the images this rank embeds; `evaluate_prepared`
embeds them (flip-fused as `ExtractOptions.flip` says; the ranks' slices are gathered, so
every rank holds every embedding) and returns a `BenchmarkResult`: JSON-ready metrics and
the ROC for the plot.
Training prepares its benchmarks when it starts and evaluates the prepared ones every time;
`evaluate_benchmark` does both for a single evaluation (`sf2dist-eval`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sf2dist import comm
from sf2dist.eval.bin_io import BenchmarkFormatError, PairSet, load_pairs, read_pairs
from sf2dist.eval.extract import embed_images, extract_embeddings, flip_mode, gather_embeddings, image_slice
from sf2dist.eval.ijb import IJBImages, IJBProtocol, ijb_metrics, is_ijb_directory, load_ijb
from sf2dist.eval.metrics import Roc, cosine_scores, pair_metrics, roc_curve

MIN_PAIRS = 10  # `pair_metrics`' 10-fold accuracy needs a pair in every fold


@dataclass
class BenchmarkResult:
    """One benchmark's numbers (`metrics`, JSON-ready) and its ROC."""

    name: str
    kind: str  # "pairs" or "ijb"
    metrics: dict
    roc: Roc


@dataclass(frozen=True)
class ExtractOptions:
    """How images are embedded: see `extract_embeddings`.

    `flip` is "sum" (the default), "concat" (embeddings twice the backbone's width) or "none"
    (`sf2dist.eval.extract.FLIP_MODES`); True and False are accepted and stored as "sum" and
    "none". Anything else raises ValueError here, when the options are made.
    """

    batch_size: int = 128
    flip: str = "sum"
    device: str | torch.device | None = None
    group: dist.ProcessGroup | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "flip", flip_mode(self.flip))  # frozen: set once, normalised


@dataclass(frozen=True, eq=False)
class PreparedBenchmark:
    """A benchmark read and checked once, with this rank's slice of its images decoded.

    Memory per rank: the decoded slice, `images` uint8 [stop - start, H, W, 3], about
    (number of images) x H x W x 3 bytes / world size; e.g. LFW's 12,000 112x112 images are
    452 MB in all, 56 MB per rank on 8 ranks, and IJB-C's 469k aligned faces 17.6 GB, 2.2 GB
    per rank on 8 ranks. Nothing else of the images is kept, and evaluating reads no file.
    """

    name: str
    kind: str  # "pairs" or "ijb"
    path: Path
    rank: int
    world_size: int
    num_images: int  # over all ranks
    image_start: int  # this rank embeds images [image_start, image_stop)
    image_stop: int
    images: np.ndarray = field(repr=False)  # uint8 [image_stop - image_start, H, W, 3], RGB
    issame: np.ndarray | None = field(repr=False)  # bool [num_images // 2], pairs only
    protocol: IJBProtocol | None = field(repr=False)  # ijb only


def _check_labels(path: Path, issame: np.ndarray, what: str) -> None:
    positive = int(issame.sum())
    if positive == 0 or positive == len(issame):
        raise BenchmarkFormatError(
            f"{path}: all {len(issame)} {what} are {'same' if positive else 'different'}-identity pairs; "
            "a ROC needs both kinds"
        )


def prepare_benchmark(
    path: str | os.PathLike, rank: int = 0, world_size: int = 1, image_size: tuple[int, int] | None = None
) -> PreparedBenchmark:
    """Read and check the benchmark at `path` and decode the images `rank` of `world_size` embeds.

    `path` is a pair-set file (`sf2dist.eval.bin_io.read_pairs`) or an IJB-style directory;
    rank r gets the slice `image_slice(number of images, r, world_size)` that
    `extract_embeddings` gives it, so the numbers equal `evaluate_benchmark`'s. With
    `image_size` (H, W), every decoded image must have that size. Raises `ValueError` (most
    often its subclass `BenchmarkFormatError`) naming the path and what is wrong: an
    unreadable or malformed file, fewer than `MIN_PAIRS` pairs, pairs of one kind only, an
    image that does not decode or has another size, fewer images than ranks. Each rank checks
    the images it decodes; the rest of the file is checked on every rank.
    """
    path = Path(path)
    if path.is_dir():
        if not is_ijb_directory(path):
            raise ValueError(f"{path} is a directory but not an IJB-style benchmark (no meta/*_face_tid_mid.txt)")
        protocol = load_ijb(path)
        _check_labels(path, protocol.pair_labels, "template pairs")
        name, kind, issame, source = protocol.name, "ijb", None, IJBImages(protocol)
        num_images = len(source)
    else:
        protocol, encoded = None, read_pairs(path)
        if len(encoded.issame) < MIN_PAIRS:
            raise BenchmarkFormatError(f"{path}: {len(encoded.issame)} pairs; 10-fold accuracy needs at least {MIN_PAIRS}")
        _check_labels(path, encoded.issame, "pairs")
        name, kind, issame, source = path.stem, "pairs", encoded.issame, encoded
        num_images = encoded.num_images
    try:
        start, stop = image_slice(num_images, rank, world_size)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return PreparedBenchmark(
        name=name, kind=kind, path=path, rank=rank, world_size=world_size, num_images=num_images,
        image_start=start, image_stop=stop, images=source.decode(start, stop, image_size), issame=issame,
        protocol=protocol,
    )


def _pair_result(embeddings: np.ndarray, issame: np.ndarray) -> tuple[dict, Roc]:
    first, second = embeddings[0::2], embeddings[1::2]
    return pair_metrics(first, second, issame), roc_curve(cosine_scores(first, second), issame)


def evaluate_prepared(
    model: nn.Module, prepared: PreparedBenchmark, options: ExtractOptions = ExtractOptions()
) -> BenchmarkResult:
    """Evaluate `model` on a prepared benchmark; every rank of `options.group` calls it together.

    Each rank embeds its decoded slice (nothing is read or decoded) and every rank returns
    the same result. Metrics as `evaluate_pairs` (pair sets) or `ijb_metrics`, plus extract_seconds.
    """
    rank, world_size = comm.rank_and_world(options.group)
    if (rank, world_size) != (prepared.rank, prepared.world_size):
        raise ValueError(
            f"{prepared.path} was prepared for rank {prepared.rank} of {prepared.world_size} but is evaluated on "
            f"rank {rank} of {world_size}; prepare it with the rank and size of the evaluating group"
        )
    start = time.perf_counter()
    local = embed_images(
        model, prepared.images, batch_size=options.batch_size, flip=options.flip, device=options.device,
        num_workers=options.num_workers,
    )
    embeddings = gather_embeddings(local, options.group)  # [num_images, dim], or [num_images, 2 * dim] with concat
    seconds = time.perf_counter() - start
    if prepared.kind == "ijb":
        metrics, roc = ijb_metrics(prepared.protocol, embeddings)
    else:
        metrics, roc = _pair_result(embeddings, prepared.issame)
    return BenchmarkResult(prepared.name, prepared.kind, {**metrics, "extract_seconds": seconds}, roc)


def evaluate_pairs(
    model: nn.Module, benchmark: PairSet | str | os.PathLike, options: ExtractOptions = ExtractOptions()
) -> dict:
    """Verification metrics of `model` on a pair set (loaded, or a path to load it from).

    Keys: accuracy, accuracy_std (10-fold), best_accuracy, best_threshold, eer, auc,
    tar_at_far, pair counts and extract_seconds; see `sf2dist.eval.metrics` for definitions.
    """
    pairs = benchmark if isinstance(benchmark, PairSet) else load_pairs(benchmark)
    start = time.perf_counter()
    embeddings = extract_embeddings(model, pairs.images, **vars(options))
    seconds = time.perf_counter() - start
    return {**_pair_result(embeddings, pairs.issame)[0], "extract_seconds": seconds}


def evaluate_benchmark(
    model: nn.Module, path: str | os.PathLike, options: ExtractOptions = ExtractOptions()
) -> BenchmarkResult:
    """Evaluate `model` once on the benchmark at `path`: `prepare_benchmark` then `evaluate_prepared`."""
    rank, world_size = comm.rank_and_world(options.group)
    return evaluate_prepared(model, prepare_benchmark(path, rank, world_size), options)
