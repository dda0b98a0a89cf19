"""Images/s of the streaming loader over HTTP (nginx on 127.0.0.1) against the local random-access loader.

Both loaders produce the same thing, an epoch of uint8 [b, H, W, 3] batches of decoded and
randomly flipped faces (`loader.uint8_batches()`; the normalisation that follows is the same for
both and runs on the GPU in GPU training), for one rank:

- local: `make_loader(DIR)`, samples read at random through the shard index (pread, page cache);
- stream, http: `make_loader("http://127.0.0.1:PORT/shard-{...}.tar")`, each shard read from
  start to end over HTTP from Debian's nginx (tests/nginx.sh), mixed in a shuffle buffer;
- stream, local .tar: the same streaming loader on the shard files' paths, to tell the cost
  of HTTP from the cost of streaming.

Each is measured with 0 loader workers (one process does everything: images/s per core) and
with 1 worker (the worker decodes; for the stream the main process reads the tars). The
figure is the median over `--repeats` epochs after a warm-up epoch (which also brings the
shards into the page cache), the loaders taking turns so that load from other processes on a
shared machine spreads over all of them alike.

    .venv/bin/python launch/bench_stream.py                              # prints the table
    .venv/bin/python launch/bench_stream.py --out docs/benchmarks.md     # and writes its section
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sf2dist.data import make_loader, read_manifest, synth  # noqa: E402
from sf2dist.report import machine_description, write_section  # noqa: E402

NGINX_SH = Path(__file__).resolve().parent.parent / "tests" / "nginx.sh"
SECTION = "stream"
TARGET = 0.8  # the goal: streaming over HTTP within 20 % of local


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def epoch_rates(loaders: dict[tuple[str, int], object], repeats: int) -> dict[tuple[str, int], tuple]:
    """(median, min, max) images/s of an epoch of each loader, after one warm-up epoch each, in turns, and the
    median images per CPU-second of this process, its loader workers and the commands it ran (not nginx).

    CPU time does not depend on what else runs on the machine: on a shared one, the per-core figure.
    """
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
    per_cpu: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
    for rep in range(repeats + 1):
        for key, loader in loaders.items():
            loader.set_epoch(rep)  # a fresh order and fresh flips every pass
            cpu = _cpu_seconds()
            start = time.perf_counter()
            images = sum(len(labels) for _, labels in loader.uint8_batches())
            seconds = time.perf_counter() - start
            if rep:
                rates[key].append(images / seconds)
                per_cpu[key].append(images / (_cpu_seconds() - cpu))
    return {key: (statistics.median(r), min(r), max(r), statistics.median(per_cpu[key])) for key, r in rates.items()}


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children, finished ones and running ones (loader workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def benchmark(shard_dir: Path, base_url: str, *, batch_size: int, repeats: int, shuffle_buffer: int):
    manifest = read_manifest(shard_dir)
    last = len(manifest.shards) - 1
    names = f"shard-{{000000..{last:06d}}}.tar"
    sources = {"local, random access": str(shard_dir), "stream, http (nginx)": f"{base_url}/{names}",
               "stream, local .tar": f"{shard_dir}/{names}"}
    loaders = {}
    for workers in (0, 1):
        for what, train in sources.items():
            loaders[(what, workers)] = make_loader(train, batch_size=batch_size, rank=0, world_size=1,
                                                   num_workers=workers, seed=0, shuffle_buffer=shuffle_buffer)
    try:
        rates = epoch_rates(loaders, repeats)
    finally:
        for loader in loaders.values():
            loader.close()
    return manifest, rates


def to_markdown(manifest, rates, *, batch_size: int, repeats: int, shuffle_buffer: int, seconds: float,
                command: str) -> str:
    height, width = manifest.image_size
    lines = [
        "## Streaming loader: shards over HTTP against local random access",
        "",
        f"{manifest.num_samples:,} {height}x{width} sf2dist-synth face JPEGs in {len(manifest.shards)} shards, "
        f"one rank, batches of {batch_size},",
        f"shuffle buffer {shuffle_buffer:,} (streams). An epoch of decoded, flipped uint8 batches",
        f"(`uint8_batches()`); median (min-max) images/s of {repeats} epochs after a warm-up epoch, the loaders",
        "taking turns. HTTP: Debian's nginx on 127.0.0.1 (tests/nginx.sh), shards in the page cache. 0 workers:",
        "one process reads and decodes (images/s per core); 1 worker: the worker decodes (and, local, reads),",
        "the main process reads the tars of a stream.",
        "",
        "| loader | workers | images/s (wall) | min-max | vs local | images per CPU-second | vs local |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (what, workers), (median, low, high, per_cpu) in rates.items():
        local = rates[("local, random access", workers)]
        lines.append(f"| {what} | {workers} | {median:,.0f} | {low:,.0f}-{high:,.0f} | {100 * median / local[0]:.0f}% "
                     f"| {per_cpu:,.0f} | {100 * per_cpu / local[3]:.0f}% |")
    verdicts = []
    for workers in (0, 1):
        http, local = rates[("stream, http (nginx)", workers)], rates[("local, random access", workers)]
        met = "met" if http[3] >= TARGET * local[3] else "NOT met"
        verdicts.append(f"{workers} worker{'s' if workers != 1 else ''}: {100 * http[3] / local[3]:.0f}% per "
                        f"CPU-second (**{met}**), {100 * http[0] / local[0]:.0f}% wall clock")
    lines += [
        "",
        "CPU-seconds: of the loader's process, its workers and any command it ran, not nginx's. On a shared",
        "machine the wall-clock figures move with the load of other processes, CPU time far less.",
        f"Target (issue 25): streaming over HTTP within 20% of local per core: {'; '.join(verdicts)}.",
        "",
        f"Machine: {machine_description()}.",
        f"Command: `{command}` ({seconds:.0f} s in all).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=64, help="synthetic identities (default 64)")
    parser.add_argument("--images-per-identity", type=int, default=48, help="images per identity (default 48)")
    parser.add_argument("--size", type=int, default=112, help="image side (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95, as InsightFace's files)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="stream shuffle buffer (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loader (default 5)")
    parser.add_argument("--out", type=Path, help=f"markdown file whose '{SECTION}' section receives the table")
    args = parser.parse_args(argv)
    if min(args.repeats, args.batch_size, args.shard_size, args.shuffle_buffer) < 1:
        parser.error("--repeats, --batch-size, --shard-size and --shuffle-buffer must be positive")

    start = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"generating {args.identities * args.images_per_identity} synthetic faces ...", flush=True)
        synth.generate(Path(scratch) / "synth", identities=args.identities,
                       images_per_identity=args.images_per_identity, holdout_identities=0, pairs=0, size=args.size,
                       jpeg_quality=args.quality, shard_size=args.shard_size, workers=1)
        shard_dir = Path(scratch) / "synth" / "train"
        port = free_port()
        up = subprocess.run(["bash", str(NGINX_SH), "up", str(shard_dir), str(port)], capture_output=True, text=True)
        if up.returncode != 0:
            print(f"bench_stream: error: nginx did not start (tests/nginx.sh up, exit {up.returncode}): "
                  f"{(up.stderr or up.stdout).strip()[-500:]}", file=sys.stderr)
            return 1
        try:
            manifest, rates = benchmark(shard_dir, f"http://127.0.0.1:{port}", batch_size=args.batch_size,
                                        repeats=args.repeats, shuffle_buffer=args.shuffle_buffer)
        finally:
            subprocess.run(["bash", str(NGINX_SH), "down", str(port)], capture_output=True)
    seconds = time.perf_counter() - start
    command = " ".join(["launch/bench_stream.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(manifest, rates, batch_size=args.batch_size, repeats=args.repeats,
                           shuffle_buffer=args.shuffle_buffer, seconds=seconds, command=command)
    print(markdown)
    if args.out is not None:
        write_section(args.out, SECTION, markdown)
        print(f"wrote the '{SECTION}' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
