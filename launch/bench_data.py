"""Decode + augment throughput of the training loader on 112x112 faces, per core.

Measures, in one process with one thread (so a figure is images/s per core):

- JPEG decode alone, with simplejpeg (what sf2dist.imageio uses) and with Pillow;
- what a loader worker does: `make_loader(..., num_workers=0).uint8_batches()` iterating an
  epoch, i.e. read from the shard through its index, decode, flip into a uint8 batch;
- the batch normalisation to float [-1, 1] on the CPU (on a GPU it runs on the GPU), and the
  whole path in one process (what a core does in CPU-only training);

and, unless `--workers 0`, the same loader with N DataLoader worker processes (default: one
per core), reported in total and per worker. Each figure is the median over `--repeats`
passes after one warm-up pass (which also brings the shards into the page cache).

The images are sf2dist-synth identities re-encoded at a fixed JPEG quality (95 by default,
as InsightFace's RecordIO files are written), or an existing shard set given with --data.

    .venv/bin/python launch/bench_data.py                       # prints the table
    .venv/bin/python launch/bench_data.py --out docs/benchmarks.md   # and writes its section
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from sf2dist.data import make_loader, read_manifest, synth
from sf2dist.data.shards import Manifest, ShardFormatError, load_index
from sf2dist.imageio import normalize_batch
from sf2dist.report import machine_description, write_section

TARGET_PER_CORE = 4000  # images/s per core for decode + augment (the data-layer issue)
WORKER_PATH = "loader workers' path: read, decode, flip -> uint8 batch"
NORMALISE = "normalise uint8 -> float32 [-1, 1], CPU"
FULL_PATH = "loader on CPU: read, decode, flip, normalise"


def decode_simplejpeg(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def interleaved_rates(stages: list[tuple[object, int]], repeats: int) -> list[tuple[float, float, float]]:
    """(median, min, max) images/s of each (run_pass, images per pass) stage.

    Each stage runs once as a warm-up, then the stages take turns `repeats` times, so that a
    burst of load from other processes on a shared machine spreads over all of them alike.
    """
    for run_pass, _ in stages:
        run_pass()
    rates = [[] for _ in stages]
    for _ in range(repeats):
        for (run_pass, images_per_pass), stage_rates in zip(stages, rates):
            start = time.perf_counter()
            run_pass()
            stage_rates.append(images_per_pass / (time.perf_counter() - start))
    return [(statistics.median(r), min(r), max(r)) for r in rates]


def read_jpegs(manifest: Manifest) -> list[bytes]:
    """Every sample's JPEG bytes, in shard order."""
    jpegs = []
    for number, shard in enumerate(manifest.shards):
        with open(manifest.directory / shard.tar, "rb") as tar:
            for offset, size, _ in load_index(manifest, number).tolist():
                tar.seek(offset)
                jpegs.append(tar.read(size))
    return jpegs


def make_shards(out: Path, identities: int, images_per_identity: int, size: int, quality: int,
                workers: int) -> Path:
    synth.generate(out, identities=identities, images_per_identity=images_per_identity,
                   holdout_identities=0, pairs=0, size=size, jpeg_quality=quality, workers=workers)
    return out / "train"


def shard_dir_of(path: Path) -> Path:
    """A shard directory, or the `train/` shards of an sf2dist-synth output."""
    return path / "train" if not (path / "manifest.json").exists() and (path / "train").is_dir() else path


def benchmark(shard_dir: Path, *, batch_size: int, repeats: int, workers: int) -> list[tuple[str, float, float, float, str]]:
    """Rows (what, median, min, max, note) of images/s."""
    jpegs = read_jpegs(read_manifest(shard_dir))

    def decode_all(decode):
        return lambda: [decode(data) for data in jpegs]

    def epoch_of(loader, uint8=False):
        def run_pass():
            loader.set_epoch(loader.epoch + 1)  # a fresh order and fresh flips every pass
            for _ in (loader.uint8_batches() if uint8 else loader):
                pass
        return run_pass

    def loader_with(num_workers):
        return make_loader(shard_dir, batch_size=batch_size, rank=0, world_size=1, num_workers=num_workers, seed=0,
                           flip=True)

    single = loader_with(0)
    # world_size=1: an epoch is every sample once, plus the padding of its last batch
    per_pass = single.batches_per_epoch * batch_size
    height, width = single.manifest.image_size
    pixels = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8)
    batches = max(1, len(jpegs) // batch_size)

    def normalise_batches():
        for _ in range(batches):
            normalize_batch(pixels)

    names = ["decode only, simplejpeg", "decode only, Pillow", WORKER_PATH, NORMALISE, FULL_PATH]
    stages = [(decode_all(decode_simplejpeg), len(jpegs)), (decode_all(decode_pillow), len(jpegs)),
              (epoch_of(single, uint8=True), per_pass), (normalise_batches, batches * batch_size),
              (epoch_of(single), per_pass)]
    if workers > 0:
        names.append(f"loader with {workers} DataLoader workers, total (normalised on CPU)")
        stages.append((epoch_of(loader_with(workers)), per_pass))
    rates = interleaved_rates(stages, repeats)
    notes = ["1 process"] * 5
    notes[3] = f"1 process, {1e6 / rates[3][0]:.0f} us per image"
    if workers > 0:
        notes.append(f"{rates[-1][0] / workers:,.0f} per worker")
    return [(name, *rate, note) for name, rate, note in zip(names, rates, notes)]


def to_markdown(rows, *, count: int, source: str, size: tuple[int, int], batch_size: int, repeats: int,
                seconds: float, command: str) -> str:
    rate = {r[0]: r[1] for r in rows}
    worker_rate, full_rate = rate[WORKER_PATH], rate[FULL_PATH]
    decode_rate = rate["decode only, simplejpeg"]
    verdict = "met" if worker_rate >= TARGET_PER_CORE else "NOT met"
    lines = [
        "## Data loading: decode + augment throughput",
        "",
        f"{count} {size[0]}x{size[1]} face JPEGs ({source}) read from local shards (page cache),",
        f"batches of {batch_size}. One process with one thread unless stated, so a figure is",
        f"images/s per core; median (min-max) of {repeats} passes after a warm-up pass, the stages",
        "taking turns. The loader's workers read, decode and randomly flip into uint8 [b, H, W, 3]",
        "batches; the loader normalises each batch to float32 [b, 3, H, W] in [-1, 1] where it is",
        "used: on the GPU after the (4x smaller) transfer in GPU training, on the CPU in CPU-only",
        "runs. With workers, the batches also travel to the main process through shared memory.",
        "",
        "| stage | images/s | min-max | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {what} | {median:,.0f} | {low:,.0f}-{high:,.0f} | {note} |" for what, median, low, high, note in rows]
    lines += [
        "",
        f"Target for decode + augment (the workers' path): >= {TARGET_PER_CORE:,} images/s per core: "
        f"**{verdict}** ({worker_rate:,.0f}, {100 * worker_rate / decode_rate:.0f}% of decoding alone with simplejpeg).",
        f"Where the normalisation also runs on the CPU (CPU-only training) a core prepares {full_rate:,.0f} images/s.",
        "",
        f"Machine: {machine_description()}.",
        f"Command: `{command}` ({seconds:.0f} s in all).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing shard directory (or sf2dist-synth output) to measure")
    parser.add_argument("--identities", type=int, default=64, help="synthetic identities to generate (default 64)")
    parser.add_argument("--images-per-identity", type=int, default=48, help="images per identity (default 48)")
    parser.add_argument("--size", type=int, default=112, help="synthetic image side (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the synthetic images (default 95)")
    parser.add_argument("--batch-size", type=int, default=128, help="loader batch size (default 128, a usual per-GPU batch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per figure (default 5)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers for the multi-process figure (default: one per core; 0 skips it)")
    parser.add_argument("--out", type=Path, help="markdown file whose 'data' section receives the table")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--repeats and --batch-size must be positive and --workers non-negative")

    start = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if args.data is not None:
                shard_dir = shard_dir_of(args.data)
                source = f"from {shard_dir}"
            else:
                print(f"generating {args.identities * args.images_per_identity} synthetic faces ...", flush=True)
                shard_dir = make_shards(Path(scratch) / "synth", args.identities, args.images_per_identity,
                                        args.size, args.quality, args.workers or 1)
                source = f"sf2dist-synth identities, JPEG quality {args.quality}"
            manifest = read_manifest(shard_dir)
        except (ShardFormatError, ValueError, OSError) as err:
            print(f"bench_data: error: {err}", file=sys.stderr)
            return 1
        rows = benchmark(shard_dir, batch_size=args.batch_size, repeats=args.repeats, workers=args.workers)
    seconds = time.perf_counter() - start
    command = " ".join(["launch/bench_data.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(rows, count=manifest.num_samples, source=source, size=manifest.image_size,
                           batch_size=args.batch_size, repeats=args.repeats, seconds=seconds, command=command)
    print(markdown)
    if args.out is not None:
        write_section(args.out, "data", markdown)
        print(f"wrote the 'data' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
