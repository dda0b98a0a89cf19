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

This module also owns the re-run policy for output directories (`claim_output_dir`): a
finished conversion of the same source with the same image and shard sizes is reported as
already done (`AlreadyConverted`, which the command lines answer with exit status 0),
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
import webdataset as wds

MANIFEST_NAME = "manifest.json"
FORMAT = "sf2dist-shards/1"
REJECTS_NAME = "rejects.jsonl"
LABELS_NAME = "labels.tsv"
# Every file a shard directory may hold; `overwrite` removes only these.
SHARD_DIR_FILES = (
    "shard-*.tar",
    "shard-*.index.npy",
    MANIFEST_NAME,
    MANIFEST_NAME + ".tmp",
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
        self._tar: wds.TarWriter | None = None
        self._keys: list[str] = []
        self._labels: list[int] = []

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if label < 0:
            raise ValueError(f"sample {key}: label {label} is negative")
        if self._tar is None:
            name = f"shard-{len(self.shards):06d}.tar"
            # mtime fixed so that the same samples always give the same shard bytes
            self._tar = wds.TarWriter(str(self.out_dir / name), encoder=False, mtime=0)
        self._tar.write({"__key__": key, "cls": b"%d" % label, "jpg": jpeg})
        self._keys.append(key)
        self._labels.append(label)
        self.num_samples += 1
        if len(self._keys) == self.shard_size:
            self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; returns every shard written."""
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        tar_name = f"shard-{len(self.shards):06d}.tar"
        index_name = f"shard-{len(self.shards):06d}.index.npy"
        index = np.empty((len(self._keys), 3), dtype=np.int64)
        with tarfile.open(self.out_dir / tar_name, "r:") as tar:
            jpg_members = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        assert [m.name for m in jpg_members] == [f"{key}.jpg" for key in self._keys]
        index[:, 0] = [m.offset_data for m in jpg_members]
        index[:, 1] = [m.size for m in jpg_members]
        index[:, 2] = self._labels
        np.save(self.out_dir / index_name, index)
        self.shards.append(ShardInfo(tar_name, index_name, len(self._keys)))
        self._keys, self._labels = [], []


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    num_classes: int,
    image_size: tuple[int, int],
    shards: list[ShardInfo],
    source: dict,
    counts: dict,
) -> Path:
    """Write manifest.json atomically (it marks the directory as finished)."""
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
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
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
) -> Path:
    """Make `out_dir` ready for a new conversion of `source`, or refuse and say why.

    `owned` are the glob patterns (relative to out_dir) of files a conversion writes and
    `manifest` the file whose presence marks it finished. A finished conversion of the same
    source into shards of `shard_size` samples of `image_size` raises `AlreadyConverted`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(
        os.path.relpath(os.path.join(root, name), out)
        for root, _, names in os.walk(out)
        for name in names
    )
    if not files:
        return out
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
            if previous.get("image_size") != list(image_size) or shard_samples != shard_split(
                previous.get("num_samples", 0), shard_size
            ):
                raise OutputDirError(
                    f"output {out} holds a finished conversion of this source with "
                    f"{_size_words(previous.get('image_size'))} images in shards of up to "
                    f"{max(shard_samples, default=0)} samples; pass --overwrite to convert it again "
                    f"with {_size_words(image_size)} images in shards of {shard_size} samples, or "
                    f"choose another directory"
                )
            raise AlreadyConverted(out, previous)
        raise OutputDirError(
            f"output {out} holds {counted(len(files), 'file')} of an unfinished conversion (no "
            f"{manifest}); pass --overwrite to start over"
        )
    for name in files:
        (out / name).unlink()
    return out


def _size_words(image_size) -> str:
    return "x".join(str(side) for side in image_size) if image_size else "unknown-size"
