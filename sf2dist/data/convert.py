"""`sf2dist-convert`: InsightFace RecordIO files and identity folders -> training shards.

Both converters share one pipeline: the main process lists or reads the source records in
a fixed order, worker processes decode each image to validate it, and the main process
writes the valid ones into shards (shards.py) and the others into `rejects.jsonl` with their
key and the reason. JPEG bytes are copied unchanged; an image in another format (PNG, BMP,
...) is re-encoded as JPEG (quality 95) and counted. Counts are reconciled at the end
(records read = samples written + samples rejected) and the manifest is written last.

Labels: RecordIO keeps the file's identity labels (which must be integers); an image folder
gets `label_offset + position of its identity folder in sorted name order`, and the
label <-> folder map is written to `labels.tsv`. Entries whose names start with "." are
ignored in image folders (file-system metadata such as .DS_Store).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from sf2dist.data.recordio import RecordIODataset, RecordIOError
from sf2dist.data.shards import (
    LABELS_NAME,
    REJECTS_NAME,
    OutputDirError,
    ShardSetWriter,
    claim_output_dir,
    write_manifest,
)
from sf2dist.imageio import ImageDecodeError, decode_image, encode_jpeg

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_IMAGE_SIZE = (112, 112)
_BATCH = 64  # records per task sent to a worker
_JPEG_SOI = b"\xff\xd8"


class ConversionError(ValueError):
    """A source cannot be converted as asked; the message says what to change."""


@dataclass(frozen=True)
class ConversionSummary:
    out_dir: Path
    records_read: int
    written: int
    rejected: int
    reencoded: int
    num_classes: int
    num_shards: int

    def __str__(self) -> str:
        text = (
            f"read {self.records_read} records: wrote {self.written} samples of "
            f"{self.num_classes} classes in {self.num_shards} shards to {self.out_dir}, "
            f"rejected {self.rejected} (see {self.out_dir / REJECTS_NAME})"
        )
        if self.reencoded:
            text += f"; re-encoded {self.reencoded} non-JPEG images as JPEG"
        return text


# A record on its way through the pipeline: (sample key in the shards, key in the source
# for rejects.jsonl, label, encoded bytes or the path of a file to read in the worker).
Record = tuple[str, str | int, int, bytes | str]


def _check_image(
    data: bytes | str, image_size: tuple[int, int]
) -> tuple[bytes | None, str | None, bool]:
    """Validate one image: (bytes to write if not the given ones, reject reason, re-encoded)."""
    fresh = None
    if isinstance(data, str):
        try:
            with open(data, "rb") as f:
                data = fresh = f.read()
        except OSError as err:
            return None, f"cannot read file: {err.strerror or err}", False
    try:
        image = decode_image(data)
    except ImageDecodeError as err:
        return None, str(err), False
    height, width = image.shape[:2]
    if (height, width) != image_size:
        return None, (
            f"image is {height}x{width} pixels, expected {image_size[0]}x{image_size[1]} "
            f"(set --image-size HxW if the whole dataset has another size)"
        ), False
    if data[:2] != _JPEG_SOI:
        return encode_jpeg(image, quality=95), None, True
    return fresh, None, False


def _check_batch(
    batch: list[bytes | str], image_size: tuple[int, int]
) -> list[tuple[bytes | None, str | None, bool]]:
    return [_check_image(data, image_size) for data in batch]


def _batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


def _validated(batches: Iterator[list[Record]], image_size: tuple[int, int], workers: int):
    """Yield (batch, results) in input order, decoding in `workers` processes (0: here)."""
    if workers == 0:
        for batch in batches:
            yield batch, _check_batch([r[3] for r in batch], image_size)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = deque()
        for batch in batches:
            task = pool.apply_async(_check_batch, ([r[3] for r in batch], image_size))
            pending.append((batch, task))
            if len(pending) >= 4 * workers:  # bounded read-ahead: memory stays flat
                batch, task = pending.popleft()
                yield batch, task.get()
        while pending:
            batch, task = pending.popleft()
            yield batch, task.get()


def _convert(
    records: Iterable[Record],
    total: int,
    out: Path,
    *,
    shard_size: int,
    image_size: tuple[int, int],
    workers: int,
    progress: bool,
) -> tuple[list, dict, int]:
    """Validate and write records; returns (shards, counts, largest label read)."""
    writer = ShardSetWriter(out, shard_size)
    read = rejected = reencoded = 0
    max_label = -1
    with open(out / REJECTS_NAME, "w") as rejects, tqdm(
        total=total, unit="img", disable=not progress, desc=f"converting to {out}"
    ) as bar:
        for batch, results in _validated(_batched(records, _BATCH), image_size, workers):
            for (sample_key, source_key, label, data), (fresh, reason, was_reencoded) in zip(
                batch, results
            ):
                read += 1
                max_label = max(max_label, label)
                if reason is not None:
                    rejects.write(json.dumps({"key": source_key, "label": label, "reason": reason}) + "\n")
                    rejected += 1
                    continue
                writer.write(sample_key, fresh if fresh is not None else data, label)
                reencoded += was_reencoded
            bar.update(len(batch))
    shards = writer.close()
    assert read == writer.num_samples + rejected, (read, writer.num_samples, rejected)
    if writer.num_samples == 0:
        raise ConversionError(
            f"none of the {read} records could be converted; reasons are in {out / REJECTS_NAME}"
        )
    counts = {"records_read": read, "written": writer.num_samples, "rejected": rejected, "reencoded": reencoded}
    return shards, counts, max_label


def _finish(out: Path, shards, counts, num_classes, image_size, source) -> ConversionSummary:
    write_manifest(
        out, num_classes=num_classes, image_size=image_size, shards=shards, source=source, counts=counts
    )
    return ConversionSummary(
        out, counts["records_read"], counts["written"], counts["rejected"], counts["reencoded"],
        num_classes, len(shards),
    )


def convert_recordio(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Convert an InsightFace .rec/.idx pair into shards in `out_dir`."""
    rec_path, idx_path = Path(rec_path).resolve(), Path(idx_path).resolve()
    rec_stat = rec_path.stat()
    source = {
        "kind": "recordio",
        "rec": str(rec_path),
        "idx": str(idx_path),
        "rec_bytes": rec_stat.st_size,
        "rec_mtime_ns": rec_stat.st_mtime_ns,
        "idx_sha256": hashlib.sha256(idx_path.read_bytes()).hexdigest(),
    }
    with RecordIODataset(rec_path, idx_path) as dataset:
        out = claim_output_dir(out_dir, source, overwrite=overwrite)
        layout = dataset.layout
        records = ((f"{key:010d}", key, label, image) for key, label, image in dataset.images())
        shards, counts, max_label = _convert(
            records, len(layout.image_keys), out,
            shard_size=shard_size, image_size=image_size, workers=workers, progress=progress,
        )
    num_classes = layout.num_classes if layout.has_header else max_label + 1
    return _finish(out, shards, counts, num_classes, image_size, source)


def _list_identity_folders(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted identity folder names and (relative file path, identity position) per file."""
    if not root.is_dir():
        raise ConversionError(f"--root {root} is not a directory")
    identities, stray = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        (identities if entry.is_dir() else stray).append(entry.name)
    if stray:
        raise ConversionError(
            f"{root} holds files outside identity folders ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}); --root must contain one folder per identity"
        )
    if not identities:
        raise ConversionError(f"{root} holds no identity folders")
    files = [
        (f"{name}/{file_name}", position)
        for position, name in enumerate(identities)
        for file_name in sorted(n for n in os.listdir(root / name) if not n.startswith("."))
    ]
    return identities, files


def convert_folder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_offset: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Convert a folder of identity folders into shards in `out_dir`.

    The identity in the i-th folder (sorted by name) gets label `label_offset + i`;
    an offset lets parts of one dataset converted separately keep disjoint labels.
    """
    if label_offset < 0:
        raise ConversionError(f"--label-offset must be non-negative, got {label_offset}")
    root = Path(root).resolve()
    identities, files = _list_identity_folders(root)
    listing = hashlib.sha256("\n".join(rel for rel, _ in files).encode()).hexdigest()
    source = {
        "kind": "folder",
        "root": str(root),
        "num_identities": len(identities),
        "num_files": len(files),
        "listing_sha256": listing,
        "label_offset": label_offset,
    }
    out = claim_output_dir(out_dir, source, overwrite=overwrite)
    with open(out / LABELS_NAME, "w") as f:
        f.writelines(f"{label_offset + i}\t{name}\n" for i, name in enumerate(identities))
    records = (
        (f"{n:010d}", rel, label_offset + position, str(root / rel))
        for n, (rel, position) in enumerate(files)
    )
    shards, counts, _ = _convert(
        records, len(files), out,
        shard_size=shard_size, image_size=image_size, workers=workers, progress=progress,
    )
    return _finish(out, shards, counts, label_offset + len(identities), image_size, source)


def parse_image_size(text: str) -> tuple[int, int]:
    """'112' -> (112, 112); '112x96' -> (112, 96) as (height, width)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected an image size like 112 or 112x96 (HxW), got {text!r}")
    return size


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf2dist-convert",
        description="Convert face datasets into sf2dist training shards (webdataset tars + manifest.json).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("rec", help="an InsightFace .rec/.idx pair (MS1MV3, Glint360K, WebFace42M)")
    rec.add_argument("--rec", required=True, help="the .rec file")
    rec.add_argument("--idx", required=True, help="its .idx file")
    folder = commands.add_parser("folder", help="a folder with one sub-folder of images per identity")
    folder.add_argument("--root", required=True, help="the folder of identity folders")
    folder.add_argument(
        "--label-offset", type=_non_negative, default=0,
        help="label of the first identity folder (default 0); the others follow in sorted order",
    )
    for command in (rec, folder):
        command.add_argument("--out", required=True, help="output shard directory (new or empty)")
        command.add_argument(
            "--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE,
            help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
        )
        command.add_argument(
            "--image-size", type=parse_image_size, default=DEFAULT_IMAGE_SIZE,
            help="size every image must have, N or HxW (default 112); others are rejected",
        )
        command.add_argument(
            "--workers", type=_non_negative, default=min(8, os.cpu_count() or 1),
            help="decoding processes (default min(8, CPUs); 0 decodes in the main process)",
        )
        command.add_argument(
            "--overwrite", action="store_true",
            help="replace an earlier conversion in --out (only files sf2dist wrote are removed)",
        )
        command.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(
        shard_size=args.shard_size, image_size=args.image_size, workers=args.workers,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    try:
        if args.command == "rec":
            summary = convert_recordio(args.rec, args.idx, args.out, **options)
        else:
            summary = convert_folder(args.root, args.out, label_offset=args.label_offset, **options)
    except (RecordIOError, OutputDirError, ConversionError, OSError) as err:
        print(f"sf2dist-convert: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sf2dist-convert: interrupted; {args.out} is unfinished", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
