"""`sf2dist-convert`: InsightFace RecordIO files and identity folders -> training shards.

Both converters share one pipeline. The main process lists the source (the .idx and header
records, or the identity folders) and cuts its records, in a fixed order, into shard jobs:
job n is records n*shard_size ... (n+1)*shard_size - 1 and becomes `shard-n`. Worker
processes each take whole jobs: read the records, decode each image to validate it, and
write the valid ones into the job's shard (shards.py `write_shard`: renamed into place when
complete, then marked done). The main process takes the jobs' results in job order and writes
the rejected records into `rejects.jsonl` with their key and the reason (the file exists only
when something was rejected). So reading, decoding and writing all scale with the workers, and
the output is the same bytes for any number of workers (0 runs the jobs in the main process).

JPEG bytes are copied unchanged; an image in another format (PNG, BMP, ...) is re-encoded as
JPEG (quality 95) and counted. Counts are reconciled at the end (records read = samples
written + samples rejected) and the manifest is written last. When more than
`max_reject_fraction` of the input is rejected the conversion stops as soon as that is
certain, removes its shards and keeps `rejects.jsonl` to read. Images must be square
(training takes N x N faces).

A conversion that was killed resumes when the same command runs again: shards marked done
are kept, the others redone (`conversion.json` says what was being converted).
`part=(I, N)` (`--part I/N`) converts the jobs of part I of N, for N nodes; `merge_parts`
(`sf2dist-convert merge`) joins the parts' outputs into one shard directory by hard links,
equal to a conversion of the whole source in one go.

Labels: RecordIO keeps the file's identity labels (which must be integers); identity folders
with at least one file directly inside are numbered `label_offset + 0, 1, 2, ...` in sorted
name order, from the listing alone (so that every worker and every part labels alike; a
folder whose images are all rejected keeps its label, unused), and the label <-> folder map is
written to `labels.tsv`. Empty identity folders and folders nested inside identity folders
are skipped with a warning naming them. Entries whose names start with "." are ignored in
image folders (file-system metadata such as .DS_Store).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from sf2dist.data.recordio import RecordIODataset, RecordIOError, RecordReader
from sf2dist.data.shards import (
    DONE_SUFFIX,
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARD_DIR_FILES,
    STATE_NAME,
    AlreadyConverted,
    OutputDirError,
    ShardInfo,
    claim_output_dir,
    counted,
    describe_source,
    resuming,
    shard_names,
    write_json,
    write_manifest,
    write_shard,
)
from sf2dist.imageio import ImageDecodeError, decode_image, encode_jpeg

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_IMAGE_SIZE = (112, 112)
DEFAULT_MAX_REJECT_FRACTION = 0.1
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
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


def _ignore_interrupt() -> None:
    """Pool worker initializer: Ctrl-C is the main process's to handle; a killed main ends us.

    Ctrl-C signals the whole process group. A worker killed by it can die holding the pool's
    task-queue lock, and then `Pool.terminate` waits for that lock forever while the pool
    keeps starting replacement workers (issue #23). Workers that ignore SIGINT stay alive
    until the main process's KeyboardInterrupt terminates the pool. A main process killed
    outright (SIGKILL, a node going down) cannot terminate its pool: on Linux the kernel
    then kills the workers, so none is left writing into the output directory.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class _Context:
    """What every shard job of one conversion shares."""

    out: str
    image_size: tuple[int, int]
    recordio: tuple[str, str] | None  # (.rec, .idx) when records are byte offsets into a .rec
    num_classes: int | None  # RecordIO: the header record's class count, checked per label


@dataclass(frozen=True)
class _Job:
    """The source records that become shard `number`: (sample key, key in the source for
    rejects.jsonl, label (None: read from the RecordIO record), file path or .rec byte offset)."""

    number: int
    records: list[tuple[str, str | int, int | None, str | int]]


_readers: dict[tuple[str, str], RecordReader] = {}  # per process: each worker opens the .rec once


def _convert_job(context: _Context, job: _Job) -> dict:
    """Validate a job's records and write its shard; returns (and saves) what the shard holds.

    The shard is renamed into place when complete and `shard-NNNNNN.done.json` is written
    after it, so a killed conversion keeps every shard with a done file. The result lists
    the rejects with their position in the job, for the main process to write in input order.
    """
    samples, rejects = [], []
    reencoded, max_label = 0, -1
    for position, (sample_key, source_key, label, data) in enumerate(job.records):
        if context.recordio is not None:
            reader = _readers.get(context.recordio)
            if reader is None:
                reader = _readers[context.recordio] = RecordReader(*context.recordio)
            label, data = reader.image(source_key, data, context.num_classes)
        max_label = max(max_label, label)
        fresh, reason, was_reencoded = _check_image(data, context.image_size)
        if reason is not None:
            entry = {"key": source_key, "label": label} if context.recordio is not None else {"key": source_key}
            rejects.append([position, {**entry, "reason": reason}])
            continue
        samples.append((sample_key, fresh if fresh is not None else data, label))
        reencoded += was_reencoded
    if samples:
        write_shard(context.out, job.number, samples)
    result = {
        "shard": job.number, "records": len(job.records), "num_samples": len(samples),
        "reencoded": reencoded, "max_label": max_label, "rejects": rejects,
    }
    write_json(Path(context.out) / _done_name(job.number), result)
    return result


def _done_name(number: int) -> str:
    return f"shard-{number:06d}{DONE_SUFFIX}"


def _job_results(jobs: Iterator[_Job], context: _Context, workers: int) -> Iterator[dict]:
    """Each job's result, in job order; jobs run in `workers` processes (0: here)."""
    if workers == 0:
        try:
            for job in jobs:
                yield _convert_job(context, job)
        finally:
            for reader in _readers.values():
                reader.close()
            _readers.clear()
        return
    with multiprocessing.Pool(workers, initializer=_ignore_interrupt) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.apply_async(_convert_job, (context, job)))
            if len(pending) >= 2 * workers:  # bounded read-ahead: memory stays flat
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _finished_jobs(out: Path, numbers: range) -> dict[int, dict]:
    """The results of the jobs whose shards a killed run completed (done file and shard files there)."""
    names = {entry.name for entry in os.scandir(out)}
    finished = {}
    for number in numbers:
        if _done_name(number) not in names:
            continue
        try:
            result = json.loads((out / _done_name(number)).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # redone
        if result.get("shard") != number or (
            result.get("num_samples") and not all(name in names for name in shard_names(number))
        ):
            continue
        finished[number] = result
    return finished


class _Rejects:
    """rejects.jsonl, created at the first reject, and a count of the reasons for messages."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self._file = None

    def add(self, entry: dict) -> None:
        """Record one reject: {"key", ("label",) "reason"}."""
        if self._file is None:
            self._file = open(self.path, "w")
        self._file.write(json.dumps(entry) + "\n")
        self.count += 1
        reason = entry["reason"]
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
    shards: list[ShardInfo]
    counts: dict
    max_label: int  # the largest label read, rejected ones included


class _TooManyRejects(Exception):
    def __init__(self, read: int):
        self.read = read  # images read when the limit was passed


def _convert(
    numbers: range,
    make_job: Callable[[int], _Job],
    total: int,
    out: Path,
    *,
    context: _Context,
    workers: int,
    progress: bool,
    max_reject_fraction: float,
    resumed: bool,
) -> _Converted:
    """Convert the jobs `numbers` (`total` records) into shards, keeping those a killed run finished.

    Workers write shards in any order; the main process takes their results in job order,
    writes rejects.jsonl in input order and stops as soon as more than `max_reject_fraction`
    of the input is certain to be rejected.
    """
    finished = _finished_jobs(out, numbers)
    if resumed:
        print(f"resuming: {len(finished)} of {counted(len(numbers), 'shard')} done in {out}", flush=True)
    (out / REJECTS_NAME).unlink(missing_ok=True)  # rewritten below, finished shards' rejects first
    rejects = _Rejects(out / REJECTS_NAME)
    allowed = math.floor(max_reject_fraction * total + 1e-9)
    read = written = reencoded = 0
    max_label = -1
    shards = []
    jobs = (make_job(number) for number in numbers if number not in finished)
    try:
        with tqdm(total=total, unit="img", disable=not progress, desc=f"converting to {out}") as bar, \
                contextlib.closing(_job_results(jobs, context, workers)) as results:
            for number in numbers:
                result = finished[number] if number in finished else next(results)
                assert result["shard"] == number, (result["shard"], number)
                for position, entry in result["rejects"]:
                    rejects.add(entry)
                    if rejects.count > allowed:
                        raise _TooManyRejects(read + position + 1)
                read += result["records"]
                written += result["num_samples"]
                reencoded += result["reencoded"]
                max_label = max(max_label, result["max_label"])
                if result["num_samples"]:
                    shards.append(ShardInfo(*shard_names(number), result["num_samples"]))
                bar.update(result["records"])
    except _TooManyRejects as stop:
        rejects.close()
        _remove_conversion(out)
        raise ConversionError(_too_many_rejects(rejects, stop.read, total, allowed, max_reject_fraction)) from None
    finally:
        rejects.close()
    assert read == total == written + rejects.count, (read, total, written, rejects.count)
    if written == 0:
        raise ConversionError(
            f"none of the {counted(read, 'image')} could be converted; {rejects.most_common()}; "
            f"every reason is in {rejects.path}"
        )
    counts = {"records_read": read, "written": written, "rejected": rejects.count, "reencoded": reencoded}
    return _Converted(shards, counts, max_label)


def _too_many_rejects(rejects: _Rejects, read: int, total: int, allowed: int, fraction: float) -> str:
    return (
        f"stopped after {rejects.count} of the first {counted(read, 'image')} were rejected: "
        f"--max-reject-fraction {fraction:g} allows at most {allowed} of the {counted(total, 'image')}. "
        f"The {rejects.most_common()}. No shards were kept; every reason is in {rejects.path}. "
        f"Fix the source, or pass a larger --max-reject-fraction (at most 1) with --overwrite to "
        f"keep the images that do convert"
    )


def _remove_conversion(out: Path) -> None:
    """Delete what a stopped conversion wrote (rejects.jsonl stays to be read)."""
    for name in os.listdir(out):
        if name != REJECTS_NAME and any(fnmatch.fnmatch(name, p) for p in SHARD_DIR_FILES):
            (out / name).unlink(missing_ok=True)


def _labels_without_images(out: Path, shards: list[ShardInfo], low: int, end: int) -> np.ndarray:
    """Labels in [low, end) that no sample of the shards has (read from the shard indexes)."""
    present = np.zeros(end - low, dtype=bool)
    for shard in shards:
        present[np.load(out / shard.index, mmap_mode="r")[:, 2] - low] = True
    return np.flatnonzero(~present) + low


def _warn_recordio_classes_without_images(missing: np.ndarray, num_classes: int) -> None:
    if len(missing):
        shown = ", ".join(map(str, missing[:_NAMED].tolist()))
        _warn(
            f"{counted(len(missing), 'class', 'classes')} of {num_classes} {'has' if len(missing) == 1 else 'have'} "
            f"no image in the shards (labels {shown}{', ...' if len(missing) > _NAMED else ''}); "
            f"they still count in num_classes because RecordIO labels are kept as they are"
        )


def _warn_folders_without_images(missing: np.ndarray, identities: list[str], label_offset: int, out: Path) -> None:
    if len(missing):
        names = ", ".join(identities[label - label_offset] for label in missing[:_NAMED].tolist())
        more = f" and {len(missing) - _NAMED} more" if len(missing) > _NAMED else ""
        _warn(
            f"{counted(len(missing), 'identity folder')} had every image rejected (see {out / REJECTS_NAME}); "
            f"their labels have no image but still count in num_classes (labels come from the folder "
            f"listing, so that every worker and every part numbers identities alike): {names}{more}"
        )


def _finish(out: Path, converted: _Converted, num_classes: int, image_size, source, extra: dict) -> ConversionSummary:
    """Write the manifest (the conversion is finished), then remove the files only a resume needed."""
    counts = converted.counts
    write_manifest(
        out, num_classes=num_classes, image_size=image_size, shards=converted.shards, source=source,
        counts=counts, extra=extra,
    )
    for name in os.listdir(out):
        if name.endswith(DONE_SUFFIX) or name == STATE_NAME or fnmatch.fnmatch(name, "shard-*.partial-*"):
            (out / name).unlink(missing_ok=True)
    return ConversionSummary(
        out, counts["records_read"], counts["written"], counts["rejected"], counts["reencoded"],
        num_classes, len(converted.shards),
    )


def parse_part(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4): part 1 of 4, numbered from 0."""
    index, slash, count = text.partition("/")
    try:
        part = int(index), int(count)
    except ValueError:
        part = None
    if not slash or part is None or not 0 <= part[0] < part[1]:
        raise argparse.ArgumentTypeError(
            f"expected I/N with 0 <= I < N (part I of N, numbered from 0, e.g. 0/4 ... 3/4), got {text!r}"
        )
    return part


def _part_jobs(num_jobs: int, part: tuple[int, int] | None, shard_size: int) -> range:
    """The shard jobs of part I of N: contiguous, sizes differ by at most one, the first ones larger."""
    if part is None:
        return range(num_jobs)
    index, count = part
    if not 0 <= index < count:
        raise OptionError(f"--part {index}/{count}: expected I/N with 0 <= I < N")
    if num_jobs < count:
        raise OptionError(
            f"--part {index}/{count}: the input makes only {counted(num_jobs, 'shard')} of {shard_size} "
            f"samples, fewer than {count} parts; use at most {num_jobs} parts or a smaller --shard-size"
        )
    base, extra = divmod(num_jobs, count)
    first = base * index + min(index, extra)
    return range(first, first + base + (index < extra))


def _with_part(source: dict, part: tuple[int, int] | None) -> dict:
    return source if part is None else {**source, "part": {"index": part[0], "count": part[1]}}


def _part_extra(shard_size: int, part: tuple[int, int] | None, numbers: range, num_jobs: int) -> dict:
    extra = {"shard_size": shard_size}
    if part is not None:
        extra["part"] = {"index": part[0], "count": part[1], "first_shard": numbers.start,
                         "end_shard": numbers.stop, "total_shards": num_jobs}
    return extra


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
    part: tuple[int, int] | None = None,
) -> ConversionSummary:
    """Convert an InsightFace .rec/.idx pair into shards in `out_dir`.

    Shard n holds the valid images among image records n*shard_size ... (n+1)*shard_size - 1
    in key order, whatever `workers` is. `part=(I, N)` converts part I of N of those shards
    (`merge_parts` joins the parts). Raises `AlreadyConverted` when `out_dir` holds a finished
    conversion of the same files; resumes an unfinished one of the same files and settings.
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
        layout, index = dataset.layout, dataset.index
    if not layout.image_keys:
        raise ConversionError(f"{rec_path} holds no image records (its header record declares none)")
    total_jobs = -(-len(layout.image_keys) // shard_size)
    numbers = _part_jobs(total_jobs, part, shard_size)
    source = _with_part(source, part)
    resumed = resuming(out_dir, overwrite=overwrite)
    out = claim_output_dir(out_dir, source, overwrite=overwrite, image_size=image_size, shard_size=shard_size,
                           state=_state(source, image_size, shard_size, total_jobs))
    keys = layout.image_keys

    def make_job(number: int) -> _Job:
        job_keys = keys[number * shard_size:(number + 1) * shard_size]
        return _Job(number, [(f"{key:010d}", key, None, index[key]) for key in job_keys])

    context = _Context(str(out), tuple(image_size), (str(rec_path), str(idx_path)), layout.num_classes)
    total = min(numbers.stop * shard_size, len(keys)) - numbers.start * shard_size
    converted = _convert(
        numbers, make_job, total, out, context=context, workers=workers, progress=progress,
        max_reject_fraction=max_reject_fraction, resumed=resumed,
    )
    num_classes = layout.num_classes if layout.has_header else converted.max_label + 1
    if part is None:  # a part holds some of the classes; `merge` warns about the whole
        _warn_recordio_classes_without_images(
            _labels_without_images(out, converted.shards, 0, num_classes), num_classes
        )
    return _finish(out, converted, num_classes, image_size, source,
                   _part_extra(shard_size, part, numbers, total_jobs))


def _state(source: dict, image_size: tuple[int, int], shard_size: int, total_jobs: int) -> dict:
    """What an unfinished conversion records so that the same command resumes it."""
    return {"source": source, "image_size": list(image_size), "shard_size": shard_size, "total_shards": total_jobs}


class FolderListing:
    """The identity folders under a root, listed once: one directory read for the root and one
    per identity folder. Image names are kept joined per identity (millions of files)."""

    def __init__(self, root: Path):
        if not root.is_dir():
            raise ConversionError(f"--root {root} is not a directory")
        folders, stray = _entries(root)
        if stray:
            raise ConversionError(
                f"{root} holds files outside identity folders ({_names(stray)}); --root must "
                f"contain one folder of images per identity"
            )
        if not folders:
            raise ConversionError(
                f"{root} holds no identity folders; --root must contain one folder of images per identity"
            )
        self.root = root
        self.identities: list[str] = []  # folders with files directly inside, sorted: label offset + position
        self.empty: list[str] = []  # identity folders without files directly inside
        self.nested: list[tuple[str, int]] = []  # (folder inside an identity folder, files under it)
        self._images: list[str] = []  # per identity, its sorted image names joined by "/"
        counts = []
        digest = hashlib.sha256()
        for name in folders:
            subfolders, images = _entries(root / name)
            self.nested += [(f"{name}/{sub}", _files_under(root / name / sub)) for sub in subfolders]
            if not images:
                self.empty.append(name)
                continue
            # the checksum of "identity/image" lines joined by newlines, as earlier versions computed it
            digest.update((("\n" if self.identities else "") + "\n".join(f"{name}/{image}" for image in images)).encode())
            self.identities.append(name)
            self._images.append("/".join(images))  # "/" cannot occur in a file name
            counts.append(len(images))
        if not self.identities:
            where = f"; they are in nested folders such as {self.nested[0][0]}" if self.nested else ""
            raise ConversionError(
                f"none of the {counted(len(folders), 'identity folder')} in {root} holds an image "
                f"directly inside (expected {root}/IDENTITY/IMAGE){where}"
            )
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first file of each identity
        self.num_files = int(self.starts[-1])
        self.sha256 = digest.hexdigest()

    def files(self, begin: int, end: int) -> Iterator[tuple[int, str, int]]:
        """(file number, path relative to the root, identity position) of files begin..end-1."""
        position = int(np.searchsorted(self.starts, begin, side="right")) - 1
        number = begin
        while number < end:
            images = self._images[position].split("/")
            first = number - int(self.starts[position])
            for image in images[first:first + end - number]:
                yield number, f"{self.identities[position]}/{image}", position
                number += 1
            position += 1


def _entries(path: Path) -> tuple[list[str], list[str]]:
    """(folder names, other names) in `path`, sorted, without names starting with "."."""
    folders, others = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                (folders if entry.is_dir() else others).append(entry.name)
    folders.sort()
    others.sort()
    return folders, others


def _files_under(path: Path) -> int:
    return sum(
        sum(not name.startswith(".") for name in names) for _, _, names in os.walk(path)
    )


def _check_out_outside_root(out: Path, root: Path) -> None:
    """Refuse an output inside the source: its shards would be listed as an identity folder."""
    if out == root or root in out.parents:
        where = "is" if out == root else "is inside"
        raise OptionError(
            f"--out {out} {where} --root {root}: --out must not be inside --root, or the shards "
            f"are read back as an identity folder; choose an --out outside {root}, e.g. "
            f"--out {root.parent / (root.name + '-shards')}"
        )


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
    part: tuple[int, int] | None = None,
) -> ConversionSummary:
    """Convert a folder of identity folders into shards in `out_dir`.

    Identity folders (sorted by name) with at least one file directly inside get labels
    `label_offset`, `label_offset + 1`, ... in that order, decided by the listing alone, so
    that workers and parts label alike; a folder whose images are all rejected keeps its
    (unused) label. An offset lets parts of one dataset converted separately keep disjoint
    labels (the next part's offset is this part's num_classes). Shard n holds the valid images
    among files n*shard_size ... (n+1)*shard_size - 1 of the listing, whatever `workers` is;
    `part=(I, N)` converts part I of N of those shards (`merge_parts` joins the parts).
    Raises `AlreadyConverted` when `out_dir` holds a finished conversion of the same listing;
    resumes an unfinished one of the same listing and settings.
    """
    if label_offset < 0:
        raise OptionError(f"--label-offset must be non-negative, got {label_offset}")
    _check_image_size(image_size)
    _check_max_reject_fraction(max_reject_fraction)
    root = Path(root).resolve()
    _check_out_outside_root(Path(out_dir).resolve(), root)
    listing = FolderListing(root)
    source = {
        "kind": "folder",
        "root": str(root),
        "num_identities": len(listing.identities),
        "num_files": listing.num_files,
        "listing_sha256": listing.sha256,
        "label_offset": label_offset,
    }
    total_jobs = -(-listing.num_files // shard_size)
    numbers = _part_jobs(total_jobs, part, shard_size)
    source = _with_part(source, part)
    resumed = resuming(out_dir, overwrite=overwrite)
    out = claim_output_dir(out_dir, source, overwrite=overwrite, image_size=image_size, shard_size=shard_size,
                           state=_state(source, image_size, shard_size, total_jobs))
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

    def make_job(number: int) -> _Job:
        files = listing.files(number * shard_size, min((number + 1) * shard_size, listing.num_files))
        return _Job(number, [(f"{n:010d}", rel, label_offset + position, f"{root}/{rel}") for n, rel, position in files])

    context = _Context(str(out), tuple(image_size), None, None)
    total = min(numbers.stop * shard_size, listing.num_files) - numbers.start * shard_size
    converted = _convert(
        numbers, make_job, total, out, context=context, workers=workers, progress=progress,
        max_reject_fraction=max_reject_fraction, resumed=resumed,
    )
    num_classes = label_offset + len(listing.identities)
    if part is None:  # a part holds some of the identities; `merge` warns about the whole
        missing = _labels_without_images(out, converted.shards, label_offset, num_classes)
        _warn_folders_without_images(missing, listing.identities, label_offset, out)
    with open(out / LABELS_NAME, "w") as f:
        f.writelines(f"{label_offset + position}\t{name}\n" for position, name in enumerate(listing.identities))
    return _finish(out, converted, num_classes, image_size, source,
                   _part_extra(shard_size, part, numbers, total_jobs))


def merge_parts(
    out_dir: str | os.PathLike, part_dirs: list[str | os.PathLike], *, overwrite: bool = False,
) -> ConversionSummary:
    """Join the outputs of `--part I/N` conversions into one shard directory, `out_dir`.

    Shards are hard-linked, not copied (`out_dir` must be on the parts' file system); shard
    numbers are global, so the parts' names never collide. The result is what one conversion
    of the whole source writes: the same samples, labels, shard boundaries and `source`
    (so re-running that conversion into `out_dir` says "already converted").
    """
    if not part_dirs:
        raise OptionError("merge needs the part directories to join")
    out = Path(out_dir)
    parts = [_read_part(Path(d)) for d in part_dirs]
    first_dir, first = parts[0]
    whole = {k: v for k, v in first["source"].items() if k != "part"}
    count = first["part"]["count"]
    for directory, manifest in parts[1:]:
        source = {k: v for k, v in manifest["source"].items() if k != "part"}
        if source != whole:
            if describe_source(source) == describe_source(whole):
                what = (f"both convert {describe_source(whole)}, but it changed between them (its files, sizes or "
                        f"listing differ); convert every part from the same source")
            else:
                what = f"{directory} converts {describe_source(source)}, {first_dir} {describe_source(whole)}"
            raise ConversionError(f"{directory} and {first_dir} are parts of different conversions: {what}")
        for what in ("image_size", "shard_size"):
            if manifest.get(what) != first.get(what):
                raise ConversionError(
                    f"{directory} and {first_dir} were converted with different {what.replace('_', ' ')}s "
                    f"({manifest.get(what)} and {first.get(what)}); convert every part with the same options"
                )
        if manifest["part"]["count"] != count:
            raise ConversionError(
                f"{directory} is part {_part_words(manifest)} but {first_dir} is part {_part_words(first)}: "
                f"every part must be of the same --part I/N split"
            )
    by_index: dict[int, Path] = {}
    for directory, manifest in parts:
        index = manifest["part"]["index"]
        if index in by_index:
            raise ConversionError(
                f"part {index}/{count} is given twice: {by_index[index]} and {directory} (parts must not overlap)"
            )
        by_index[index] = directory
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise ConversionError(
            f"{'part' if len(missing) == 1 else 'parts'} {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: merge needs all {count} parts of the conversion"
        )
    parts.sort(key=lambda part: part[1]["part"]["index"])
    expected_start = 0
    for directory, manifest in parts:
        info = manifest["part"]
        if info["first_shard"] != expected_start:
            raise ConversionError(f"{directory}: its shards start at {info['first_shard']}, expected {expected_start}")
        expected_start = info["end_shard"]
    if expected_start != first["part"]["total_shards"]:
        raise ConversionError(f"the parts hold shards up to {expected_start} of {first['part']['total_shards']}")
    resolved = {Path(d).resolve() for d, _ in parts}
    if out.resolve() in resolved:
        raise OptionError(f"--out {out} is one of the parts; merge into a new directory")
    image_size = tuple(first["image_size"])
    out = claim_output_dir(out, whole, overwrite=overwrite, image_size=image_size, shard_size=first["shard_size"])
    shards, counts = [], Counter()
    rejects = []
    for directory, manifest in parts:
        for entry in manifest["shards"]:
            shard = ShardInfo(entry["tar"], entry["index"], int(entry["num_samples"]))
            for name in (shard.tar, shard.index):
                _link(directory / name, out / name)
            shards.append(shard)
        counts.update(manifest["counts"])
        if (directory / REJECTS_NAME).is_file():
            rejects.append(directory / REJECTS_NAME)
    if rejects:
        with open(out / REJECTS_NAME, "wb") as f:
            for path in rejects:
                f.write(path.read_bytes())
    num_classes = max(int(manifest["num_classes"]) for _, manifest in parts)
    if whole["kind"] == "folder":
        _link(first_dir / LABELS_NAME, out / LABELS_NAME)
        offset = int(whole.get("label_offset", 0))
        identities = [line.split("\t", 1)[1].rstrip("\n") for line in open(out / LABELS_NAME)]
        _warn_folders_without_images(_labels_without_images(out, shards, offset, num_classes), identities, offset, out)
    elif whole["kind"] == "recordio":
        _warn_recordio_classes_without_images(_labels_without_images(out, shards, 0, num_classes), num_classes)
    converted = _Converted(shards, dict(counts), num_classes - 1)
    return _finish(out, converted, num_classes, image_size, whole,
                   {"shard_size": first["shard_size"], "merged_from": [str(Path(d).resolve()) for d, _ in parts]})


def _part_words(manifest: dict) -> str:
    return f"{manifest['part']['index']}/{manifest['part']['count']}"


def _read_part(directory: Path) -> tuple[Path, dict]:
    """A finished part's manifest.json, as read, or an error saying why it is not one."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        unfinished = (directory / STATE_NAME).is_file()
        raise ConversionError(
            f"{directory} has no {MANIFEST_NAME}: "
            + ("its conversion is unfinished; re-run its sf2dist-convert --part command to finish it"
               if unfinished else "it is not the output of an sf2dist-convert --part I/N run")
        )
    try:
        manifest = json.loads(path.read_text())
        part = manifest.get("part")
        if not isinstance(manifest.get("source"), dict) or "part" not in manifest["source"] or not isinstance(part, dict):
            raise ConversionError(
                f"{directory} is not a part of a conversion (converted without --part I/N): merge joins "
                f"the outputs of --part runs"
            )
        for key in ("index", "count", "first_shard", "end_shard", "total_shards"):
            int(part[key])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"{path} is not a valid part manifest: {err}") from None
    return directory, manifest


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as err:
        raise ConversionError(
            f"cannot hard-link {source} to {target} ({err.strerror or err}): merge links the parts' "
            f"shards instead of copying them, so --out must be on the same file system as the parts"
        ) from None


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="{rec,folder,merge}")
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
        "sorted name order; empty and nested folders are skipped with a warning (no label); "
        "labels.tsv maps labels to folder names.",
        epilog=exit_status,
    )
    folder.add_argument("--root", required=True, help="the folder of identity folders (required)")
    folder.add_argument(
        "--label-offset", type=_non_negative, default=0,
        help="label of the first identity folder (default 0); the others follow in sorted order",
    )
    for command in (rec, folder):
        command.add_argument(
            "--out", required=True,
            help="output shard directory: new, empty, or where the same command was interrupted, to "
            "resume it (required)",
        )
        command.add_argument(
            "--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE,
            help=f"source images per shard (default {DEFAULT_SHARD_SIZE}); a shard holds those that convert",
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
            help=f"processes that read, decode and write shards, one shard at a time (default "
            f"min(8, CPUs), here {min(8, os.cpu_count() or 1)}; 0 converts in the main process); "
            f"the output is the same for any number",
        )
        command.add_argument(
            "--part", type=parse_part, default=None, metavar="I/N",
            help="convert only part I of N (numbered from 0: 0/4 ... 3/4), e.g. one per node, each "
            "into its own --out; join them with 'sf2dist-convert merge' (default: the whole source)",
        )
        command.add_argument(
            "--overwrite", action="store_true",
            help="replace an earlier conversion in --out, removing only files sf2dist wrote (default off: "
            "a finished conversion of the same source is left as it is)",
        )
        command.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    merge_text = "join the outputs of --part I/N conversions into one shard directory"
    merge = commands.add_parser(
        "merge", help=merge_text,
        description=f"{merge_text[0].upper() + merge_text[1:]}, hard-linking their shards (no copy: --out "
        "must be on the parts' file system). The result equals a conversion of the whole source.",
        epilog=exit_status,
    )
    merge.add_argument("--out", required=True, help="the joined shard directory, new or empty (required)")
    merge.add_argument("parts", nargs="+", metavar="PART_DIR", help="every part's --out directory (required)")
    merge.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier result in --out, removing only files sf2dist wrote (default off)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "merge":
        options = dict(
            shard_size=args.shard_size, image_size=args.image_size, workers=args.workers,
            max_reject_fraction=args.max_reject_fraction, overwrite=args.overwrite, progress=not args.quiet,
            part=args.part,
        )
    try:
        if args.command == "merge":
            summary = merge_parts(args.out, args.parts, overwrite=args.overwrite)
        elif args.command == "rec":
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
        print(f"sf2dist-convert: interrupted; {args.out} is unfinished (run the same command again to resume "
              f"it, or with --overwrite to start over)", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
