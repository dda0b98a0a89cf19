"""`sf2dist-convert`: InsightFace RecordIO files and identity folders -> training shards.

Both converters share one pipeline: the main process lists or reads the source records in
a fixed order, worker processes decode each image to validate it, and the main process
writes the valid ones into shards (shards.py) and the others into `rejects.jsonl` with their
key and the reason (the file exists only when something was rejected). JPEG bytes are
copied unchanged; an image in another format (PNG, BMP, ...) is re-encoded as JPEG
(quality 95) and counted. Counts are reconciled at the end (records read = samples written +
samples rejected) and the manifest is written last. When more than `max_reject_fraction` of
the input is rejected the conversion stops as soon as that is certain, removes its shards
and keeps `rejects.jsonl` to read. Images must be square (training takes N x N faces).

Labels: RecordIO keeps the file's identity labels (which must be integers); identity folders
are numbered `label_offset + 0, 1, 2, ...` in sorted name order, counting only folders that
end up with at least one image in the shards (so labels have no gaps), and the
label <-> folder map is written to `labels.tsv`. Empty identity folders and folders nested
inside identity folders are skipped with a warning naming them. Entries whose names start
with "." are ignored in image folders (file-system metadata such as .DS_Store).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from sf2dist.data.recordio import RecordIODataset, RecordIOError
from sf2dist.data.shards import (
    LABELS_NAME,
    REJECTS_NAME,
    AlreadyConverted,
    OutputDirError,
    ShardSetWriter,
    claim_output_dir,
    counted,
    describe_source,
    write_manifest,
)
from sf2dist.imageio import ImageDecodeError, decode_image, encode_jpeg

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_IMAGE_SIZE = (112, 112)
DEFAULT_MAX_REJECT_FRACTION = 0.1
_BATCH = 64  # records per task sent to a worker
_JPEG_SOI = b"\xff\xd8"
_NAMED = 10  # names a warning lists before "and N more"
_REASONS_KEPT = 1000  # distinct reject reasons counted for messages; rejects.jsonl has all


class ConversionError(ValueError):
    """A source cannot be converted as asked; the message says what to change."""


class OptionError(ConversionError):
    """An option value the converter cannot work with (the command line exits with status 2)."""


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
            f"read {counted(self.records_read, 'image')}: wrote {counted(self.written, 'sample')} of "
            f"{counted(self.num_classes, 'class', 'classes')} in {counted(self.num_shards, 'shard')} "
            f"to {self.out_dir}"
        )
        if self.rejected:
            text += f", rejected {self.rejected} (reasons in {self.out_dir / REJECTS_NAME})"
        if self.reencoded:
            text += f"; re-encoded {counted(self.reencoded, 'non-JPEG image')} as JPEG"
        return text


def _warn(message: str) -> None:
    print(f"sf2dist-convert: warning: {message}", file=sys.stderr, flush=True)


def _names(names: list[str]) -> str:
    """'a, b, c' or 'a, b, ... and 7 more': names for a one-line message."""
    shown = ", ".join(names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


def _check_image_size(image_size: tuple[int, int]) -> None:
    """Refuse sizes that training cannot use: sides must be positive and equal."""
    height, width = image_size
    if min(height, width) < 1:
        raise OptionError(f"--image-size must be positive, got {height}x{width}")
    if height != width:
        raise OptionError(
            f"--image-size {height}x{width} is not square: image sizes must be square, e.g. "
            f"--image-size {max(height, width)} (training takes N x N faces)"
        )


def _check_max_reject_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"--max-reject-fraction must be in [0, 1], got {value}")


# A record on its way through the pipeline: (sample key in the shards, key in the source
# for rejects.jsonl, label (or identity position, see `_convert`), encoded bytes or the
# path of a file to read in the worker).
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
        if height == width:
            hint = f"pass --image-size {height} if the whole dataset is {height}x{width}"
        else:
            hint = f"training takes square faces: align or crop the dataset to {image_size[0]}x{image_size[1]}"
        return None, (
            f"image is {height}x{width} pixels, expected {image_size[0]}x{image_size[1]} ({hint})"
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


def _ignore_interrupt() -> None:
    """Pool worker initializer: Ctrl-C is the main process's to handle.

    Ctrl-C signals the whole process group. A worker killed by it can die holding the pool's
    task-queue lock, and then `Pool.terminate` waits for that lock forever while the pool
    keeps starting replacement workers (issue #23). Workers that ignore SIGINT stay alive
    until the main process's KeyboardInterrupt terminates the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _validated(batches: Iterator[list[Record]], image_size: tuple[int, int], workers: int):
    """Yield (batch, results) in input order, decoding in `workers` processes (0: here)."""
    if workers == 0:
        for batch in batches:
            yield batch, _check_batch([r[3] for r in batch], image_size)
        return
    with multiprocessing.Pool(workers, initializer=_ignore_interrupt) as pool:
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


class _Rejects:
    """rejects.jsonl, created at the first reject, and a count of the reasons for messages."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self._file = None

    def add(self, key: str | int, label: int | None, reason: str) -> None:
        if self._file is None:
            self._file = open(self.path, "w")
        entry = {"key": key} if label is None else {"key": key, "label": label}
        self._file.write(json.dumps({**entry, "reason": reason}) + "\n")
        self.count += 1
        if reason in self.reasons or len(self.reasons) < _REASONS_KEPT:
            self.reasons[reason] += 1

    def most_common(self) -> str:
        reason, number = self.reasons.most_common(1)[0]
        return f"most common reason ({counted(number, 'image')}): {reason}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Converted:
    shards: list
    counts: dict
    max_label: int  # the largest label (or identity position) read, rejected ones included
    written_labels: set[int]


def _convert(
    records: Iterable[Record],
    total: int,
    out: Path,
    *,
    shard_size: int,
    image_size: tuple[int, int],
    workers: int,
    progress: bool,
    max_reject_fraction: float,
    assign_label: Callable[[int], int] | None = None,
) -> _Converted:
    """Validate and write records.

    With `assign_label`, a record's label field is its identity's position and the label
    written is `assign_label(position)`, asked only when an image of it is written; rejects
    then carry no label (their key names the identity).
    """
    writer = ShardSetWriter(out, shard_size)
    rejects = _Rejects(out / REJECTS_NAME)
    allowed = math.floor(max_reject_fraction * total + 1e-9)
    read = reencoded = 0
    max_label = -1
    written_labels: set[int] = set()
    try:
        with tqdm(total=total, unit="img", disable=not progress, desc=f"converting to {out}") as bar, \
                contextlib.closing(_validated(_batched(records, _BATCH), image_size, workers)) as validated:
            for batch, results in validated:
                for (sample_key, source_key, label, data), (fresh, reason, was_reencoded) in zip(
                    batch, results
                ):
                    read += 1
                    max_label = max(max_label, label)
                    if reason is not None:
                        rejects.add(source_key, None if assign_label is not None else label, reason)
                        if rejects.count > allowed:
                            _remove_shards(out, writer)
                            raise ConversionError(_too_many_rejects(rejects, read, total, allowed, max_reject_fraction))
                        continue
                    if assign_label is not None:
                        label = assign_label(label)
                    writer.write(sample_key, fresh if fresh is not None else data, label)
                    written_labels.add(label)
                    reencoded += was_reencoded
                bar.update(len(batch))
    finally:
        rejects.close()
    shards = writer.close()
    assert read == writer.num_samples + rejects.count, (read, writer.num_samples, rejects.count)
    if writer.num_samples == 0:
        raise ConversionError(
            f"none of the {counted(read, 'image')} could be converted; {rejects.most_common()}; "
            f"every reason is in {rejects.path}"
        )
    counts = {"records_read": read, "written": writer.num_samples, "rejected": rejects.count, "reencoded": reencoded}
    return _Converted(shards, counts, max_label, written_labels)


def _too_many_rejects(rejects: _Rejects, read: int, total: int, allowed: int, fraction: float) -> str:
    return (
        f"stopped after {rejects.count} of the first {counted(read, 'image')} were rejected: "
        f"--max-reject-fraction {fraction:g} allows at most {allowed} of the {counted(total, 'image')}. "
        f"The {rejects.most_common()}. No shards were kept; every reason is in {rejects.path}. "
        f"Fix the source, or pass a larger --max-reject-fraction (at most 1) with --overwrite to "
        f"keep the images that do convert"
    )


def _remove_shards(out: Path, writer: ShardSetWriter) -> None:
    """Delete what a stopped conversion wrote into shards (rejects.jsonl stays to be read)."""
    for shard in writer.close():
        for name in (shard.tar, shard.index):
            (out / name).unlink(missing_ok=True)


def _finish(out: Path, converted: _Converted, num_classes: int, image_size, source) -> ConversionSummary:
    counts = converted.counts
    write_manifest(
        out, num_classes=num_classes, image_size=image_size, shards=converted.shards, source=source,
        counts=counts,
    )
    return ConversionSummary(
        out, counts["records_read"], counts["written"], counts["rejected"], counts["reencoded"],
        num_classes, len(converted.shards),
    )


def convert_recordio(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    workers: int = 0,
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Convert an InsightFace .rec/.idx pair into shards in `out_dir`.

    Raises `AlreadyConverted` when `out_dir` holds a finished conversion of the same files.
    """
    _check_image_size(image_size)
    _check_max_reject_fraction(max_reject_fraction)
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
        if not dataset.layout.image_keys:
            raise ConversionError(f"{rec_path} holds no image records (its header record declares none)")
        out = claim_output_dir(out_dir, source, overwrite=overwrite, image_size=image_size, shard_size=shard_size)
        layout = dataset.layout
        records = ((f"{key:010d}", key, label, image) for key, label, image in dataset.images())
        converted = _convert(
            records, len(layout.image_keys), out, shard_size=shard_size, image_size=image_size,
            workers=workers, progress=progress, max_reject_fraction=max_reject_fraction,
        )
    num_classes = layout.num_classes if layout.has_header else converted.max_label + 1
    missing = num_classes - len(converted.written_labels)
    if missing:
        absent = islice((label for label in range(num_classes) if label not in converted.written_labels), _NAMED)
        _warn(
            f"{counted(missing, 'class', 'classes')} of {num_classes} {'has' if missing == 1 else 'have'} "
            f"no image in the shards (labels {', '.join(map(str, absent))}{', ...' if missing > _NAMED else ''}); "
            f"they still count in num_classes because RecordIO labels are kept as they are"
        )
    return _finish(out, converted, num_classes, image_size, source)


@dataclass(frozen=True)
class _FolderListing:
    identities: list[str]  # identity folders with at least one file directly inside, sorted
    files: list[tuple[str, int]]  # (path relative to the root, position in `identities`)
    empty: list[str]  # identity folders without files directly inside
    nested: list[tuple[str, int]]  # (folder inside an identity folder, files under it)


def _visible(path: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)


def _files_under(path: Path) -> int:
    return sum(
        sum(not name.startswith(".") for name in names) for _, _, names in os.walk(path)
    )


def _list_identity_folders(root: Path) -> _FolderListing:
    if not root.is_dir():
        raise ConversionError(f"--root {root} is not a directory")
    folders, stray = [], []
    for entry in _visible(root):
        (folders if entry.is_dir() else stray).append(entry.name)
    if stray:
        raise ConversionError(
            f"{root} holds files outside identity folders ({_names(stray)}); --root must "
            f"contain one folder of images per identity"
        )
    if not folders:
        raise ConversionError(
            f"{root} holds no identity folders; --root must contain one folder of images per identity"
        )
    identities, files, empty, nested = [], [], [], []
    for name in folders:
        images = []
        for entry in _visible(root / name):
            if entry.is_dir():
                nested.append((f"{name}/{entry.name}", _files_under(root / name / entry.name)))
            else:
                images.append(entry.name)
        if not images:
            empty.append(name)
            continue
        files += [(f"{name}/{image}", len(identities)) for image in images]
        identities.append(name)
    if not identities:
        where = f"; they are in nested folders such as {nested[0][0]}" if nested else ""
        raise ConversionError(
            f"none of the {counted(len(folders), 'identity folder')} in {root} holds an image "
            f"directly inside (expected {root}/IDENTITY/IMAGE){where}"
        )
    return _FolderListing(identities, files, empty, nested)


def _check_out_outside_root(out: Path, root: Path) -> None:
    """Refuse an output inside the source: its shards would be listed as an identity folder."""
    if out == root or root in out.parents:
        where = "is" if out == root else "is inside"
        raise OptionError(
            f"--out {out} {where} --root {root}: --out must not be inside --root, or the shards "
            f"are read back as an identity folder; choose an --out outside {root}, e.g. "
            f"--out {root.parent / (root.name + '-shards')}"
        )


class _FolderLabels:
    """Labels offset, offset + 1, ... for identity positions in the order they are first asked."""

    def __init__(self, offset: int):
        self.offset = offset
        self.of_position: dict[int, int] = {}

    def __call__(self, position: int) -> int:
        return self.of_position.setdefault(position, self.offset + len(self.of_position))


def convert_folder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_offset: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    workers: int = 0,
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Convert a folder of identity folders into shards in `out_dir`.

    Identity folders (sorted by name) that end up with images in the shards get labels
    `label_offset`, `label_offset + 1`, ... without gaps; an offset lets parts of one dataset
    converted separately keep disjoint labels (the next part's offset is this part's
    num_classes). Raises `AlreadyConverted` when `out_dir` holds a finished conversion of
    the same listing.
    """
    if label_offset < 0:
        raise OptionError(f"--label-offset must be non-negative, got {label_offset}")
    _check_image_size(image_size)
    _check_max_reject_fraction(max_reject_fraction)
    root = Path(root).resolve()
    _check_out_outside_root(Path(out_dir).resolve(), root)
    listing = _list_identity_folders(root)
    source = {
        "kind": "folder",
        "root": str(root),
        "num_identities": len(listing.identities),
        "num_files": len(listing.files),
        "listing_sha256": hashlib.sha256("\n".join(rel for rel, _ in listing.files).encode()).hexdigest(),
        "label_offset": label_offset,
    }
    out = claim_output_dir(out_dir, source, overwrite=overwrite, image_size=image_size, shard_size=shard_size)
    if listing.empty:
        _warn(
            f"skipped {counted(len(listing.empty), 'empty identity folder')} (no image file directly "
            f"inside; they get no label): {_names(listing.empty)}"
        )
    if listing.nested:
        nested = [f"{name} ({counted(files, 'file')})" for name, files in listing.nested]
        _warn(
            f"ignored {counted(len(listing.nested), 'nested folder')} inside identity folders, with "
            f"{counted(sum(n for _, n in listing.nested), 'file')} not converted (images must sit "
            f"directly in their identity folder): "
            f"{_names(nested)}"
        )
    labels = _FolderLabels(label_offset)
    records = (
        (f"{n:010d}", rel, position, str(root / rel))
        for n, (rel, position) in enumerate(listing.files)
    )
    converted = _convert(
        records, len(listing.files), out, shard_size=shard_size, image_size=image_size,
        workers=workers, progress=progress, max_reject_fraction=max_reject_fraction, assign_label=labels,
    )
    unlabelled = [name for position, name in enumerate(listing.identities) if position not in labels.of_position]
    if unlabelled:
        _warn(
            f"{counted(len(unlabelled), 'identity folder')} had every image rejected and got no "
            f"label (see {out / REJECTS_NAME}): {_names(unlabelled)}"
        )
    with open(out / LABELS_NAME, "w") as f:
        f.writelines(f"{label}\t{listing.identities[position]}\n" for position, label in labels.of_position.items())
    return _finish(out, converted, label_offset + len(labels.of_position), image_size, source)


def parse_image_size(text: str) -> tuple[int, int]:
    """'112' -> (112, 112); '112x96' -> (112, 96) as (height, width), refused later as not square."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected a square image size like 112 (or 112x112), got {text!r}")
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    exit_status = (
        "Exit status: 0 converted (or already converted), 1 the conversion failed or rejected "
        "too many images, 2 an option is wrong."
    )
    parser = argparse.ArgumentParser(
        prog="sf2dist-convert",
        description="Convert face datasets into sf2dist training shards (webdataset tars + manifest.json).",
        epilog=exit_status,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{rec,folder}")
    rec_text = "an InsightFace .rec/.idx pair (MS1MV2/MS1MV3, Glint360K, WebFace42M), read without mxnet"
    rec = commands.add_parser(
        "rec", help=rec_text, description=f"Convert {rec_text}; labels are kept as the file has them.",
        epilog=exit_status,
    )
    rec.add_argument("--rec", required=True, help="the .rec file (required)")
    rec.add_argument("--idx", required=True, help="its .idx file (required)")
    folder_text = "a folder with one sub-folder of images per identity"
    folder = commands.add_parser(
        "folder", help=folder_text,
        description=f"Convert {folder_text} (ROOT/IDENTITY/IMAGE). Identity folders get labels in "
        "sorted name order without gaps; empty and nested folders are skipped with a warning; "
        "labels.tsv maps labels to folder names.",
        epilog=exit_status,
    )
    folder.add_argument("--root", required=True, help="the folder of identity folders (required)")
    folder.add_argument(
        "--label-offset", type=_non_negative, default=0,
        help="label of the first identity folder (default 0); the others follow in sorted order",
    )
    for command in (rec, folder):
        command.add_argument("--out", required=True, help="output shard directory, new or empty (required)")
        command.add_argument(
            "--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE,
            help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
        )
        command.add_argument(
            "--image-size", type=parse_image_size, default=DEFAULT_IMAGE_SIZE, metavar="N",
            help=f"side in pixels of the square images (N x N) every image must have "
            f"(default {DEFAULT_IMAGE_SIZE[0]}); images of another size are rejected",
        )
        command.add_argument(
            "--max-reject-fraction", type=_fraction, default=DEFAULT_MAX_REJECT_FRACTION, metavar="F",
            help=f"stop with an error (exit status 1, no shards kept, reasons in OUT/rejects.jsonl) "
            f"when more than this share of the images is rejected (default "
            f"{DEFAULT_MAX_REJECT_FRACTION}); 1 accepts any number of rejects",
        )
        command.add_argument(
            "--workers", type=_non_negative, default=min(8, os.cpu_count() or 1),
            help=f"decoding processes (default min(8, CPUs), here {min(8, os.cpu_count() or 1)}; "
            f"0 decodes in the main process)",
        )
        command.add_argument(
            "--overwrite", action="store_true",
            help="replace an earlier conversion in --out, removing only files sf2dist wrote (default off: "
            "a finished conversion of the same source is left as it is)",
        )
        command.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(
        shard_size=args.shard_size, image_size=args.image_size, workers=args.workers,
        max_reject_fraction=args.max_reject_fraction, overwrite=args.overwrite, progress=not args.quiet,
    )
    try:
        if args.command == "rec":
            summary = convert_recordio(args.rec, args.idx, args.out, **options)
        else:
            summary = convert_folder(args.root, args.out, label_offset=args.label_offset, **options)
    except AlreadyConverted as done:
        manifest = done.manifest
        print(
            f"already converted: {done.out_dir} holds {counted(manifest.get('num_samples', 0), 'sample')} of "
            f"{counted(manifest.get('num_classes', 0), 'class', 'classes')} from "
            f"{describe_source(manifest.get('source'))}; nothing to do (pass --overwrite to convert it again)"
        )
        return 0
    except OptionError as err:
        print(f"sf2dist-convert: error: {err}", file=sys.stderr)
        return 2
    except (RecordIOError, OutputDirError, ConversionError, OSError) as err:
        print(f"sf2dist-convert: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sf2dist-convert: interrupted; {args.out} is unfinished (run again with --overwrite to start over)",
              file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
