"""sf2dist-convert throughput at 1 and 2 workers, and the listing of a folder of identity folders.

Measures, on sf2dist-synth faces (112x112, JPEG quality 95 by default, as InsightFace's RecordIO
files hold them) written here as identity folders and as a .rec/.idx pair:

- images/s of `convert_folder` and `convert_recordio` (reading, decoding to validate, writing
  the shards, everything the command does after its start-up) with `--workers 1` and
  `--workers 2` (or `--workers-list`), each the median of `--repeats` conversions after a
  warm-up conversion (which also brings the source into the page cache), the worker counts
  taking turns so that load from other processes spreads over them alike;
- the seconds `sf2dist-convert folder` takes to list `--listing` empty identity folders (one
  directory read for the root, one per identity folder), the first thing it does.

    .venv/bin/python launch/bench_convert.py                          # prints the table
    .venv/bin/python launch/bench_convert.py --out docs/benchmarks.md  # and writes its section
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sf2dist.data import convert, read_manifest, synth
from sf2dist.data.recordio import pack_image, write_recordio
from sf2dist.data.shards import load_index
from sf2dist.report import machine_description, write_section

SECTION = "convert"


def make_sources(scratch: Path, identities: int, images_per_identity: int, size: int, quality: int,
                 workers: int) -> tuple[Path, Path, Path, int]:
    """(identity-folder root, .rec, .idx, number of images) holding the same synthetic faces."""
    synth.generate(scratch / "synth", identities=identities, images_per_identity=images_per_identity,
                   holdout_identities=0, pairs=0, size=size, jpeg_quality=quality, workers=workers)
    manifest = read_manifest(scratch / "synth" / "train")
    root = scratch / "faces"
    records = []
    for number, shard in enumerate(manifest.shards):
        with open(manifest.directory / shard.tar, "rb") as tar:
            for offset, length, label in load_index(manifest, number).tolist():
                tar.seek(offset)
                jpeg = tar.read(length)
                folder = root / f"id{label:07d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{len(records):08d}.jpg").write_bytes(jpeg)
                records.append((len(records), pack_image(label, jpeg)))
    write_recordio(scratch / "train.rec", scratch / "train.idx", records)
    shutil.rmtree(scratch / "synth")
    return root, scratch / "train.rec", scratch / "train.idx", len(records)


@dataclass
class Figures:
    """One worker count's measurements, one entry per timed conversion."""

    rates: list[float] = field(default_factory=list)  # images/s, wall clock
    main_cpu: list[float] = field(default_factory=list)  # CPU seconds of the main process
    worker_cpu: list[float] = field(default_factory=list)  # CPU seconds of the worker processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers count once the pool has joined them
    return usage.ru_utime + usage.ru_stime


def conversion_rates(convert_once, worker_counts: list[int], repeats: int, images: int) -> dict[int, Figures]:
    """Each worker count's figures over `repeats` interleaved rounds, after one warm-up round.

    Besides the wall-clock rate, the CPU time of the main process and of the workers: on a
    machine shared with other jobs the rate depends on the cores the others leave, while the
    main process's share of the CPU bounds the speed-up any number of free cores can give.
    """
    figures = {workers: Figures() for workers in worker_counts}
    for round_number in range(repeats + 1):
        for workers in worker_counts:
            wall, main, children = time.perf_counter(), time.process_time(), _children_cpu()
            convert_once(workers)
            if round_number:  # round 0 warms up
                figures[workers].rates.append(images / (time.perf_counter() - wall))
                figures[workers].main_cpu.append(time.process_time() - main)
                figures[workers].worker_cpu.append(_children_cpu() - children)
    return figures


def listing_seconds(scratch: Path, folders: int) -> float:
    """Seconds to list `folders` empty identity folders as `sf2dist-convert folder` does."""
    root = scratch / "listing"
    root.mkdir()
    for n in range(folders):
        os.mkdir(root / f"{n:07d}")
    start = time.perf_counter()
    try:
        convert.FolderListing(root)
    except convert.ConversionError as err:  # every folder is empty: listed, then refused
        assert "holds an image directly inside" in str(err), err
    seconds = time.perf_counter() - start
    shutil.rmtree(root)
    return seconds


def to_markdown(rows, *, images: int, size: int, quality: int, shard_size: int, repeats: int,
                listing: tuple[int, float] | None, load: tuple[float, float], seconds: float, command: str) -> str:
    lines = [
        "## Converter: sf2dist-convert images/s by workers",
        "",
        f"{images:,} {size}x{size} sf2dist-synth faces (JPEG quality {quality}) converted from identity",
        f"folders and from a .rec/.idx pair, in shards of {shard_size} samples (so that the work splits",
        "into many shards, as a real dataset's does: WebFace42M makes about 4,200 of 10,000). A figure is",
        "images/s of the whole conversion in one call (listing or indexing, reading, decoding to validate,",
        "writing shards and manifest; without the command's start-up of about 2 s), median (min-max) of",
        f"{repeats} conversions after a warm-up conversion, the worker counts taking turns; the source is in",
        "the page cache. Each worker converts whole shards; the output is the same bytes for any count.",
        "",
        "| source | workers | images/s | min-max | speed-up over 1 worker | CPU ms per 1,000 images: main process | workers | main process share | images/s bound on free cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for source, figures in rows:
        base = statistics.median(figures[min(figures)].rates)
        for workers, measured in figures.items():
            median = statistics.median(measured.rates)
            main = 1e6 * statistics.median(measured.main_cpu) / images
            worker = 1e6 * statistics.median(measured.worker_cpu) / images
            bound = 1e6 / max(main, worker / max(workers, 1))
            lines.append(f"| {source} | {workers} | {median:,.0f} | {min(measured.rates):,.0f}-{max(measured.rates):,.0f} | "
                         f"{median / base:.2f}x | {main:,.0f} | {worker:,.0f} | {100 * main / (main + worker):.0f}% | "
                         f"{bound:,.0f} |")
    lines += [
        "",
        "CPU ms are medians over the timed conversions. The main process lists the source, hands out",
        "shard jobs and collects their results; the workers read, decode and write. The last column is",
        "not measured: it is the rate the measured CPU times allow when every process has a core of its",
        "own, 1,000 images per max(main, workers / W) ms; on a machine shared with other jobs the measured",
        f"rate is lower (load average {load[0]:.1f} when the conversions started, {load[1]:.1f} when they ended,",
        f"on {os.cpu_count()} logical cores).",
    ]
    if listing is not None:
        folders, listed = listing
        lines += ["", f"Listing {folders:,} empty identity folders (one directory read for the root and one per "
                      f"identity folder, as `sf2dist-convert folder` lists its --root): {listed:.2f} s "
                      f"({1e6 * listed / folders:.1f} us per folder)."]
    lines += [
        "",
        f"Machine: {machine_description(disk_of=tempfile.gettempdir())}.",
        f"Command: `{command}` ({seconds:.0f} s in all).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=96, help="synthetic identities (default 96)")
    parser.add_argument("--images-per-identity", type=int, default=48, help="images per identity (default 48)")
    parser.add_argument("--size", type=int, default=112, help="image side (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the images (default 95)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--workers-list", default="1,2", help="worker counts to measure (default 1,2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed conversions per figure (default 5)")
    parser.add_argument("--listing", type=int, default=200_000,
                        help="empty identity folders to list (default 200000; 0 skips)")
    parser.add_argument("--out", type=Path, help=f"markdown file whose '{SECTION}' section receives the table")
    args = parser.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers_list.split(",")]
    except ValueError:
        parser.error(f"--workers-list must be comma-separated integers, got {args.workers_list!r}")
    if args.repeats < 1 or args.shard_size < 1 or min(worker_counts) < 0 or args.listing < 0:
        parser.error("--repeats and --shard-size must be positive, worker counts and --listing non-negative")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        print(f"generating {args.identities * args.images_per_identity} synthetic faces ...", flush=True)
        root, rec, idx, images = make_sources(scratch, args.identities, args.images_per_identity, args.size,
                                              args.quality, max(worker_counts) or 1)
        options = dict(shard_size=args.shard_size, image_size=(args.size, args.size), overwrite=True)
        sources = [
            ("identity folders", lambda workers: convert.convert_folder(root, scratch / "out", workers=workers,
                                                                         **options)),
            ("RecordIO", lambda workers: convert.convert_recordio(rec, idx, scratch / "out", workers=workers,
                                                                  **options)),
        ]
        rows = []
        load_before = os.getloadavg()[0]
        for name, convert_once in sources:
            print(f"converting from {name} ...", flush=True)
            rows.append((name, conversion_rates(convert_once, worker_counts, args.repeats, images)))
        load = (load_before, os.getloadavg()[0])
        listing = None
        if args.listing:
            print(f"listing {args.listing} empty identity folders ...", flush=True)
            listing = (args.listing, listing_seconds(scratch, args.listing))
    seconds = time.perf_counter() - start
    command = " ".join(["launch/bench_convert.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(rows, images=images, size=args.size, quality=args.quality, shard_size=args.shard_size,
                           repeats=args.repeats, listing=listing, load=load, seconds=seconds, command=command)
    print(markdown)
    if args.out is not None:
        write_section(args.out, SECTION, markdown)
        print(f"wrote the '{SECTION}' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
