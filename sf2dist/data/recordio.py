"""InsightFace RecordIO (.rec + .idx) reading, without mxnet.

This module owns the byte layout of the RecordIO files that MS1MV2/MS1MV3, Glint360K and
WebFace42M ship as (docs/design.md, "File formats"):

- the .rec file is a sequence of records: uint32 magic 0xced7230a, uint32 `lrec`
  (payload length in the low 29 bits, continuation flag in the top 3), the payload, and
  padding to a multiple of 4 bytes. A payload that contained the magic was split there into
  parts flagged 1 (first), 2 (middle), 3 (last); reading rejoins them with the magic between;
- a payload is a 24-byte header `uint32 flag, float32 label, uint64 id, uint64 id2`, then
  `flag` float32 labels when flag > 0, then the encoded image;
- the .idx file maps record keys to byte offsets, one `key<TAB>offset` line per record;
- InsightFace files put a header record at key 0 (flag 2, labels [A, B], no image): image
  records are keys 1..A-1 and keys A..B-1 are per-identity records (flag 2, labels
  [first image key, end image key)). Files without that header have images from key 0.

Every malformed input raises `RecordIOError` naming the file and the byte offset or key.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEAD = struct.Struct("<II")  # magic, lrec
_PAYLOAD_HEAD = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
    """A .rec or .idx file is truncated, corrupt, or inconsistent; the message says where."""


@dataclass(frozen=True)
class RecordHeader:
    """The header at the start of a record payload."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...]  # the `flag` extra labels; empty when flag == 0

    @property
    def identity(self) -> float:
        """The identity label of an image record: the first extra label if any, else `label`."""
        return self.labels[0] if self.labels else self.label


@dataclass(frozen=True)
class Layout:
    """Which keys of a RecordIO file hold images, and how many identities it declares."""

    image_keys: list[int]
    has_header: bool
    num_classes: int | None  # B - A from the header record; None for files without one


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
    """Parse a .idx file into {key: byte offset}."""
    index: dict[int, int] = {}
    with open(idx_path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
                if key < 0 or offset < 0:
                    raise ValueError
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}, line {line_number}: expected 'key<TAB>offset' with two "
                    f"non-negative integers, got {line[:80]!r}"
                ) from None
            if key in index:
                raise RecordIOError(f"{idx_path}, line {line_number}: key {key} appears twice")
            index[key] = offset
    if not index:
        raise RecordIOError(f"{idx_path} lists no records")
    return index


class RecordFile:
    """Random access to the records of a .rec file: `read(offset)` returns one whole payload."""

    def __init__(self, rec_path: str | os.PathLike):
        self.path = os.fspath(rec_path)
        self.size = os.path.getsize(self.path)
        self._file = open(self.path, "rb", buffering=1 << 20)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read_exactly(self, offset: int, size: int, what: str, record_offset: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise RecordIOError(
                f"{self.path} is truncated: the record at byte offset {record_offset} needs "
                f"{what} at bytes {offset}..{offset + size}, but the file ends at byte {self.size}"
            )
        return data

    def read(self, offset: int) -> bytes:
        """The payload of the record starting at `offset`, its split parts rejoined."""
        parts: list[bytes] = []
        position = offset
        while True:
            head = self._read_exactly(position, _RECORD_HEAD.size, "a record header", offset)
            magic, lrec = _RECORD_HEAD.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.path}: no record at byte offset {position} (found 0x{magic:08x} "
                    f"instead of the magic 0x{MAGIC:08x}); the file is corrupt or its .idx "
                    f"does not belong to it"
                )
            length, continuation = lrec & _LENGTH_MASK, lrec >> 29
            expected = (_WHOLE, _FIRST) if not parts else (_MIDDLE, _LAST)
            if continuation not in expected:
                raise RecordIOError(
                    f"{self.path}: record part at byte offset {position} has continuation flag "
                    f"{continuation}, expected one of {expected} (record starts at byte {offset})"
                )
            start = position + _RECORD_HEAD.size
            parts.append(self._read_exactly(start, length, f"{length} payload bytes", offset))
            position = start + length + (-length % 4)
            if continuation in (_WHOLE, _LAST):
                return _MAGIC_BYTES.join(parts)


def unpack(payload: bytes, where: str) -> tuple[RecordHeader, bytes]:
    """Split a payload into its header and the encoded image (possibly empty)."""
    if len(payload) < _PAYLOAD_HEAD.size:
        raise RecordIOError(
            f"{where}: payload of {len(payload)} bytes is shorter than the "
            f"{_PAYLOAD_HEAD.size}-byte record header"
        )
    flag, label, id1, id2 = _PAYLOAD_HEAD.unpack_from(payload)
    labels_end = _PAYLOAD_HEAD.size + 4 * flag
    if len(payload) < labels_end:
        raise RecordIOError(
            f"{where}: header declares {flag} labels ({4 * flag} bytes) but the payload holds "
            f"only {len(payload) - _PAYLOAD_HEAD.size} bytes after the header"
        )
    labels = struct.unpack_from(f"<{flag}f", payload, _PAYLOAD_HEAD.size)
    return RecordHeader(flag, label, id1, id2, labels), payload[labels_end:]


def integer_label(value: float, where: str) -> int:
    """A float label from a header as an exact non-negative int, or an error naming `where`."""
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"{where}: label {value!r} is not a non-negative integer")
    return int(value)


class RecordReader:
    """Records of a .rec file read by key and byte offset (from its .idx), without the index.

    What a conversion worker needs: it opens the file once and reads the records it is given,
    with the checks and messages of `RecordIODataset`.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = os.fspath(rec_path), os.fspath(idx_path)
        self._rec = RecordFile(rec_path)

    def close(self) -> None:
        self._rec.close()

    def read(self, key: int, offset: int) -> tuple[RecordHeader, bytes]:
        """Header and image bytes of the record with this key, at this byte offset."""
        if offset >= self._rec.size:
            raise RecordIOError(
                f"{self.idx_path}: key {key} points to byte offset {offset}, beyond the end of "
                f"{self.rec_path} ({self._rec.size} bytes); the .rec is truncated or the .idx "
                f"belongs to another file"
            )
        where = f"{self.rec_path}, key {key} (byte offset {offset})"
        try:
            payload = self._rec.read(offset)
        except RecordIOError as err:
            raise RecordIOError(f"key {key}: {err}") from None
        return unpack(payload, where)

    def image(self, key: int, offset: int, num_classes: int | None) -> tuple[int, bytes]:
        """(identity label, encoded image) of an image record; the label must be an integer
        below `num_classes` (the header record's count, None for files without one)."""
        header, image = self.read(key, offset)
        label = integer_label(header.identity, f"{self.rec_path}, key {key}")
        if num_classes is not None and label >= num_classes:
            raise RecordIOError(
                f"{self.rec_path}, key {key}: label {label} is not below the "
                f"{num_classes} identities the header record declares"
            )
        return label, image


class RecordIODataset:
    """A .rec/.idx pair: its layout and its image records in key order."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = os.fspath(rec_path), os.fspath(idx_path)
        self.index = read_index(idx_path)
        self.reader = RecordReader(rec_path, idx_path)
        self.layout = self._read_layout()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> RecordIODataset:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read_key(self, key: int) -> tuple[RecordHeader, bytes]:
        """Header and image bytes of the record with this key."""
        if key not in self.index:
            raise RecordIOError(f"{self.idx_path} has no entry for key {key}")
        return self.reader.read(key, self.index[key])

    def _read_layout(self) -> Layout:
        header, image = self.read_key(0) if 0 in self.index else (None, b"")
        if header is None or header.flag != 2 or image:
            return Layout(sorted(self.index), has_header=False, num_classes=None)
        where = f"{self.rec_path}, header record (key 0)"
        image_end, identity_end = (integer_label(x, where) for x in header.labels)
        if not 1 <= image_end <= identity_end:
            raise RecordIOError(
                f"{where}: labels [{image_end}, {identity_end}] are not valid ranges "
                f"(need 1 <= A <= B: images at keys 1..A-1, identities at keys A..B-1)"
            )
        for key in sorted(self.index):
            if not 0 <= key < identity_end:
                raise RecordIOError(
                    f"{self.idx_path}: key {key} lies outside the ranges declared by the header "
                    f"record (images 1..{image_end - 1}, identities {image_end}..{identity_end - 1})"
                )
        missing = [key for key in range(1, identity_end) if key not in self.index]
        if missing:
            raise RecordIOError(
                f"{self.idx_path} lacks {len(missing)} key(s) that the header record declares, "
                f"the first being key {missing[0]}"
            )
        for key in range(image_end, identity_end):
            self._check_identity_record(key, image_end)
        return Layout(list(range(1, image_end)), True, identity_end - image_end)

    def _check_identity_record(self, key: int, image_end: int) -> None:
        header, image = self.read_key(key)
        where = f"{self.rec_path}, identity record (key {key})"
        if header.flag != 2 or image:
            raise RecordIOError(
                f"{where}: expected flag 2 with labels [first, end) and no image, got flag "
                f"{header.flag} and {len(image)} image bytes"
            )
        first, end = (integer_label(x, where) for x in header.labels)
        if not 1 <= first <= end <= image_end:
            raise RecordIOError(
                f"{where}: image key range [{first}, {end}) lies outside the image keys "
                f"1..{image_end - 1}"
            )

    def images(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield (key, identity label, encoded image bytes) for every image record, by key."""
        for key in self.layout.image_keys:
            yield key, *self.reader.image(key, self.index[key], self.layout.num_classes)


def pack_image(label: int, image: bytes) -> bytes:
    """The payload of an image record: a flag-0 header with the label, then the encoded image."""
    return _PAYLOAD_HEAD.pack(0, float(label), 0, 0) + image


def _record_bytes(payload: bytes) -> bytes:
    """One record, split into parts flagged 1/2/3 wherever the magic sits at a 4-byte aligned
    position (the parts drop it; `RecordFile.read` puts it back)."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == _MAGIC_BYTES]
    starts, ends = [0] + [cut + 4 for cut in cuts], cuts + [len(payload)]
    flags = [_WHOLE] if not cuts else [_FIRST] + [_MIDDLE] * (len(cuts) - 1) + [_LAST]
    return b"".join(
        _RECORD_HEAD.pack(MAGIC, (flag << 29) | (end - start)) + payload[start:end] + bytes(-(end - start) % 4)
        for start, end, flag in zip(starts, ends, flags)
    )


def write_recordio(rec_path: str | os.PathLike, idx_path: str | os.PathLike, payloads) -> None:
    """Write (key, payload) pairs into a .rec and its .idx (for benchmarks and examples: sf2dist
    itself only reads RecordIO)."""
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in payloads:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(_record_bytes(payload))
