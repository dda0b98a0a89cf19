"""The training shard format: webdataset tars, their sample index, and manifest.json.

A shard directory holds (docs/design.md, "File formats"):

- `shard-NNNNNN.tar`: webdataset tars; sample `KEY` is the members `KEY.cls` (decimal
  identity id, ASCII) and `KEY.jpg` (encoded image, written byte-for-byte as given);
- `shard-NNNNNN.index.npy`: int64 [n, 3] per shard, one row per sample in tar order:
  (byte offset of the jpg data in the tar, its size, label). The loader reads samples at
  random through it instead of streaming tars, and never parses a label from text;
- `manifest.json`, written last and atomically: num_classes, num_samples, image_size,
  per-shard sample counts, where the data came from (`source`) and the conversion counts.
  A directory without it is an unfinished conversion.

Converters write numbered shards one at a time and in any order (`write_shard`): each is
written under a temporary name and renamed into place, then marked done by a small
`shard-NNNNNN.done.json`, so that a conversion that was killed keeps every finished shard.
`conversion.json` (written when a conversion starts, removed after the manifest) says what
is being converted, so that re-running the same command resumes it.

This module also owns the re-run policy for output directories (`claim_output_dir`): a
finished conversion of the same source with the same image and shard sizes is reported as
already done (`AlreadyConverted`, which the command lines answer with exit status 0), an
unfinished one of the same source and settings is resumed when the caller asks for it,
anything else that is there is refused with a description of it, and `overwrite` removes
only files sf2dist wrote.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
import tarfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT = "sf2dist-shards/1"
REJECTS_NAME = "rejects.jsonl"
LABELS_NAME = "labels.tsv"
STATE_NAME = "conversion.json"  # an unfinished conversion: what it converts (for resuming)
STATE_FORMAT = "sf2dist-conversion/1"
DONE_SUFFIX = ".done.json"  # shard-NNNNNN.done.json: that shard is complete
# Every file a shard directory may hold; `overwrite` removes only these.
SHARD_DIR_FILES = (
    "shard-*.tar",
    "shard-*.index.npy",
    "shard-*" + DONE_SUFFIX,
    "shard-*.partial-*",
    MANIFEST_NAME,
    MANIFEST_NAME + ".tmp",
    STATE_NAME,
    STATE_NAME + ".tmp",
    REJECTS_NAME,
    LABELS_NAME,
)


class ShardFormatError(ValueError):
    """A shard directory is missing, unfinished, or inconsistent with its manifest."""


class OutputDirError(ValueError):
    """An output directory already holds data that a new conversion must not mix with."""


class AlreadyConverted(OutputDirError):
    """The output directory already holds a finished conversion of the same source."""

    def __init__(self, out_dir: Path, manifest: dict):
        super().__init__(
            f"output {out_dir} already holds a finished conversion of this source; nothing to "
            f"do (pass --overwrite to convert it again)"
        )
        self.out_dir = out_dir
        self.manifest = manifest  # the finished conversion's manifest.json, as read


def counted(number: int, singular: str, plural: str | None = None) -> str:
    """'1 image', '2 images', '1 class', '3 classes': a count with its noun."""
    if number == 1:
        return f"1 {singular}"
    return f"{number} {plural or singular + 's'}"


def describe_source(source: dict | None) -> str:
    """A conversion's `source` in words, for messages (never a dict repr)."""
    if not isinstance(source, dict):
        return "an unknown source"
    part = source.get("part")
    if isinstance(part, dict):
        whole = describe_source({k: v for k, v in source.items() if k != "part"})
        return f"part {part.get('index')}/{part.get('count')} of {whole}"
    kind = source.get("kind")
    if kind == "recordio":
        return f"the RecordIO file {source.get('rec')}"
    if kind == "folder":
        return f"the identity folders in {source.get('root')} (label offset {source.get('label_offset', 0)})"
    if kind == "synthetic":
        return (
            f"a synthetic set: seed {source.get('seed')}, {source.get('identities')} identities x "
            f"{source.get('images_per_identity')} images of {source.get('size')} pixels, "
            f"{source.get('holdout_identities')} held-out identities, {source.get('pairs')} pairs"
        )
    return f"a source of kind {kind!r}"


def shard_split(num_samples: int, shard_size: int) -> list[int]:
    """Samples per shard when `num_samples` are written `shard_size` to a shard."""
    full, rest = divmod(num_samples, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class ShardInfo:
    tar: str  # file names, relative to the shard directory
    index: str
    num_samples: int


@dataclass(frozen=True)
class Manifest:
    directory: Path
    num_classes: int
    num_samples: int
    image_size: tuple[int, int]  # (height, width)
    shards: tuple[ShardInfo, ...]
    source: dict
    counts: dict


class ShardSetWriter:
    """Writes samples into numbered shards of at most `shard_size` samples, with their index."""

    def __init__(self, out_dir: str | os.PathLike, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self._samples: list[tuple[str, bytes, int]] = []  # of the shard being filled

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if label < 0:
            raise ValueError(f"sample {key}: label {label} is negative")
        self._samples.append((key, jpeg, label))
        self.num_samples += 1
        if len(self._samples) == self.shard_size:
            self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; returns every shard written."""
        if self._samples:
            self._finish_shard()
        return self.shards

    def _finish_shard(self) -> None:
        self.shards.append(write_shard(self.out_dir, len(self.shards), self._samples))
        self._samples = []


def shard_names(number: int) -> tuple[str, str]:
    """The tar and index file names of shard `number`."""
    return f"shard-{number:06d}.tar", f"shard-{number:06d}.index.npy"


_BLOCK = 512
_TAR_END = bytes(2 * _BLOCK)  # two zero blocks close a tar


def _tar_member(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 0444, mtime 0, owner bigdata, as
    webdataset's TarWriter writes them): built directly, as `tarfile` takes ~100 us per member."""
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes: the name must fit 100 bytes, the size 8 GiB")
    header = bytearray(_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime 0: the same samples give the same bytes
    header[148:156] = b"        "  # checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[265:272] = b"bigdata"  # uname
    header[297:304] = b"bigdata"  # gname
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def write_shard(out_dir: str | os.PathLike, number: int, samples: list[tuple[str, bytes, int]]) -> ShardInfo:
    """Write shard `number` of (key, jpeg, label) samples, both files renamed into place when complete.

    Each sample is the members KEY.cls then KEY.jpg, as webdataset's TarWriter orders them.
    The temporary names carry the process id: a shard written twice at once (a worker left
    over from a killed run and its resumed run) still ends up whole, as both write the same bytes.
    """
    out = Path(out_dir)
    tar_name, index_name = shard_names(number)
    partial = f".partial-{os.getpid()}"
    tar_tmp, index_tmp = out / (tar_name + partial), out / (index_name + partial)
    index = np.empty((len(samples), 3), dtype=np.int64)
    offset = 0
    with open(tar_tmp, "wb") as tar:
        for row, (key, jpeg, label) in enumerate(samples):
            if not key or "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
            if label < 0:
                raise ValueError(f"sample {key}: label {label} is negative")
            for suffix, data in (("cls", b"%d" % label), ("jpg", jpeg)):
                padding = -len(data) % _BLOCK
                tar.write(_tar_member(f"{key}.{suffix}", len(data)))
                tar.write(data)
                tar.write(bytes(padding))
                offset += _BLOCK
                if suffix == "jpg":
                    index[row] = offset, len(data), label
                offset += len(data) + padding
        tar.write(_TAR_END)
        tar.write(bytes(-(offset + len(_TAR_END)) % tarfile.RECORDSIZE))  # whole records, as tar pads
    with open(index_tmp, "wb") as f:
        np.save(f, index)
    os.replace(tar_tmp, out / tar_name)
    os.replace(index_tmp, out / index_name)
    return ShardInfo(tar_name, index_name, len(samples))


def write_json(path: Path, content: dict) -> None:
    """Write a JSON file atomically (a reader sees the old file or the whole new one)."""
    # shard files may be written by two processes at once (see `write_shard`)
    tmp = path.with_name(path.name + (f".partial-{os.getpid()}" if path.name.startswith("shard-") else ".tmp"))
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    num_classes: int,
    image_size: tuple[int, int],
    shards: list[ShardInfo],
    source: dict,
    counts: dict,
    extra: dict | None = None,
) -> Path:
    """Write manifest.json atomically (it marks the directory as finished).

    `extra` adds fields that `read_manifest` does not need (converters record `shard_size`,
    and parts of a conversion which part they are).
    """
    num_samples = sum(shard.num_samples for shard in shards)
    manifest = {
        "format": FORMAT,
        "num_classes": num_classes,
        "num_samples": num_samples,
        "image_size": list(image_size),
        "shards": [
            {"tar": s.tar, "index": s.index, "num_samples": s.num_samples} for s in shards
        ],
        "source": source,
        "counts": counts,
        **(extra or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(out_dir) / MANIFEST_NAME
    write_json(path, manifest)
    return path


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_RAW_PROBE = 100  # entries looked at before deciding: identity datasets hold millions of files


def _raw_image_example(directory: Path) -> str | None:
    """'IDENTITY/IMAGE' when `directory` looks like identity folders of images, else None.

    Only looked at when there is no manifest, to tell raw images from an unfinished
    conversion (which holds shard files and no folders); the probe is bounded.
    """
    try:
        with os.scandir(directory) as scan:
            entries = [e for e in islice(scan, _RAW_PROBE) if not e.name.startswith(".")]
        if any(fnmatch.fnmatch(e.name, "shard-*") for e in entries):
            return None
        for folder in sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)[:10]:
            with os.scandir(folder.path) as scan:
                images = [e.name for e in islice(scan, _RAW_PROBE)
                          if e.name.lower().endswith(_IMAGE_SUFFIXES) and e.is_file()]
            if images:
                return f"{folder.name}/{min(images)}"
    except OSError:  # missing or unreadable: the caller's message covers it
        return None
    return None


def read_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Read and check the manifest of a shard directory."""
    directory = Path(shard_dir)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        if (directory / "train" / MANIFEST_NAME).is_file():
            raise ShardFormatError(
                f"{directory} has no {MANIFEST_NAME} but its train/ folder does (an "
                f"sf2dist-synth output): point at {directory / 'train'} instead"
            )
        example = _raw_image_example(directory)
        if example is not None:
            raise ShardFormatError(
                f"{directory} has no {MANIFEST_NAME} and holds folders of images (such as "
                f"{example}): these are raw images, not shards; convert them first with "
                f"sf2dist-convert folder --root {directory} --out SHARDS (a new directory outside it) "
                f"and point at SHARDS"
            )
        what = "does not exist" if not directory.exists() else f"has no {MANIFEST_NAME}"
        raise ShardFormatError(
            f"{directory} {what}: expected a shard directory written by sf2dist-convert or "
            f"sf2dist-synth (a directory without {MANIFEST_NAME} is an unfinished conversion)"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ShardFormatError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
        shards = tuple(
            ShardInfo(s["tar"], s["index"], int(s["num_samples"])) for s in raw["shards"]
        )
        manifest = Manifest(
            directory=directory,
            num_classes=int(raw["num_classes"]),
            num_samples=int(raw["num_samples"]),
            image_size=(int(raw["image_size"][0]), int(raw["image_size"][1])),
            shards=shards,
            source=raw["source"],
            counts=raw["counts"],
        )
    except ShardFormatError:
        raise
    except KeyError as err:
        raise ShardFormatError(f"{path} is not a valid sf2dist manifest: it lacks the field {err}") from None
    except (json.JSONDecodeError, TypeError, IndexError, ValueError) as err:
        raise ShardFormatError(f"{path} is not a valid sf2dist manifest: {err}") from None
    if manifest.num_samples < 1 or manifest.num_samples != sum(s.num_samples for s in shards):
        raise ShardFormatError(
            f"{path}: num_samples is {manifest.num_samples} but the shards hold "
            f"{sum(s.num_samples for s in shards)} samples"
        )
    for shard in shards:
        for name in (shard.tar, shard.index):
            if not (directory / name).is_file():
                raise ShardFormatError(f"{path} lists {name}, which is missing from {directory}")
    return manifest


def load_index(manifest: Manifest, shard_number: int) -> np.ndarray:
    """The int64 [n, 3] (offset, size, label) index of one shard, memory-mapped."""
    shard = manifest.shards[shard_number]
    path = manifest.directory / shard.index
    index = np.load(path, mmap_mode="r")
    if index.dtype != np.int64 or index.shape != (shard.num_samples, 3):
        raise ShardFormatError(
            f"{path} has dtype {index.dtype} and shape {index.shape}; expected int64 "
            f"({shard.num_samples}, 3) as {manifest.directory / MANIFEST_NAME} says"
        )
    return index


def claim_output_dir(
    out_dir: str | os.PathLike,
    source: dict,
    *,
    overwrite: bool,
    image_size: tuple[int, int],
    shard_size: int,
    owned: tuple[str, ...] = SHARD_DIR_FILES,
    manifest: str = MANIFEST_NAME,
    state: dict | None = None,
) -> Path:
    """Make `out_dir` ready for a new conversion of `source`, or refuse and say why.

    `owned` are the glob patterns (relative to out_dir) of files a conversion writes and
    `manifest` the file whose presence marks it finished. A finished conversion of the same
    source into shards of `shard_size` samples of `image_size` raises `AlreadyConverted`.

    With `state` (what the conversion converts, with its settings) the conversion can be
    resumed: a new one writes it to `conversion.json`, and an unfinished one whose
    `conversion.json` holds the same state is left as it is, for the caller to continue
    (`resuming` tells, before the call, whether it will be).
    """
    out = Path(out_dir)
    if state is not None:
        state = json.loads(json.dumps(state))  # as it reads back: lists, not tuples
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(
        os.path.relpath(os.path.join(root, name), out)
        for root, _, names in os.walk(out)
        for name in names
    )
    if not files:
        return _started(out, state)
    foreign = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in owned)]
    if foreign:
        listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(
            f"output {out} is not empty and holds files sf2dist did not write ({listing}); "
            f"choose an empty or new directory"
        )
    if not overwrite:
        manifest_path = out / manifest
        if manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text())
            except json.JSONDecodeError:
                previous = None
            if not isinstance(previous, dict):
                previous = {}
            if previous.get("source") != source:
                raise OutputDirError(
                    f"output {out} already holds a conversion of another source "
                    f"({describe_source(previous.get('source'))}); choose another directory or "
                    f"pass --overwrite to replace it"
                )
            shard_samples = [shard.get("num_samples", 0) for shard in previous.get("shards", [])]
            if "shard_size" in previous:  # converters record it: their shards may hold fewer
                same_shards = previous["shard_size"] == shard_size
            else:
                same_shards = shard_samples == shard_split(previous.get("num_samples", 0), shard_size)
            if previous.get("image_size") != list(image_size) or not same_shards:
                raise OutputDirError(
                    f"output {out} holds a finished conversion of this source with "
                    f"{_size_words(previous.get('image_size'))} images in shards of up to "
                    f"{previous.get('shard_size', max(shard_samples, default=0))} samples; pass --overwrite to convert it again "
                    f"with {_size_words(image_size)} images in shards of {shard_size} samples, or "
                    f"choose another directory"
                )
            raise AlreadyConverted(out, previous)
        if state is not None and (out / STATE_NAME).is_file():
            previous = _read_state(out)
            if previous == state:
                return out
            raise OutputDirError(
                f"output {out} holds an unfinished conversion of "
                f"{describe_source(previous.get('source'))} with other settings than this one "
                f"({_state_difference(previous, state)}); re-run the command that started it to "
                f"resume it, or pass --overwrite to start over"
            )
        raise OutputDirError(
            f"output {out} holds {counted(len(files), 'file')} of an unfinished conversion (no "
            f"{manifest}); pass --overwrite to start over"
        )
    for name in files:
        (out / name).unlink()
    return _started(out, state)


def resuming(out_dir: str | os.PathLike, *, overwrite: bool) -> bool:
    """Whether `claim_output_dir(out_dir, ..., state=...)` would continue an unfinished conversion
    (if it does not refuse): there is a `conversion.json` and no manifest."""
    out = Path(out_dir)
    return not overwrite and (out / STATE_NAME).is_file() and not (out / MANIFEST_NAME).exists()


def _started(out: Path, state: dict | None) -> Path:
    if state is not None:
        write_json(out / STATE_NAME, {"format": STATE_FORMAT, **state})
    return out


def _read_state(out: Path) -> dict:
    try:
        previous = json.loads((out / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(previous, dict) or previous.pop("format", None) != STATE_FORMAT:
        return {}
    return previous


def _state_difference(previous: dict, state: dict) -> str:
    """Which settings differ, in words: 'shard_size 100 there, 1000 here'."""
    differ = [key for key in sorted(set(previous) | set(state)) if previous.get(key) != state.get(key)]
    shown = [
        f"{key} {json.dumps(previous.get(key))[:60]} there, {json.dumps(state.get(key))[:60]} here"
        for key in differ[:3]
    ]
    return "; ".join(shown) or "unreadable state"


def _size_words(image_size) -> str:
    return "x".join(str(side) for side in image_size) if image_size else "unknown-size"
