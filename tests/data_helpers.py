"""Test-only writers for the data tests: InsightFace RecordIO files and tiny JPEG faces.

The RecordIO writer follows the format description in docs/design.md: a payload that contains
the magic at a 4-byte aligned position is split there into parts flagged 1/2/3, the magic
itself dropped (the reader re-inserts it).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from sf2dist.data.recordio import MAGIC
from sf2dist.data.shards import ShardSetWriter, write_manifest
from sf2dist.imageio import encode_jpeg

MAGIC_BYTES = struct.pack("<I", MAGIC)
MAGIC_AS_FLOAT = struct.unpack("<f", MAGIC_BYTES)[0]  # a label whose bytes are the magic


def pack_payload(label: float, image: bytes, labels: tuple[float, ...] = (), id1: int = 0) -> bytes:
    """Header (flag = number of extra labels, label, id, id2), extra labels, then the image."""
    head = struct.pack("<IfQQ", len(labels), label, id1, 0)
    return head + struct.pack(f"<{len(labels)}f", *labels) + image


def _record(part: bytes, continuation: int) -> bytes:
    head = struct.pack("<II", MAGIC, (continuation << 29) | len(part))
    return head + part + b"\0" * (-len(part) % 4)


def encode_record(payload: bytes) -> bytes:
    """One record, split wherever the magic appears at a 4-byte aligned position."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC_BYTES]
    if not cuts:
        return _record(payload, 0)
    bounds = [0] + [c + 4 for c in cuts]
    ends = cuts + [len(payload)]
    parts = [payload[b:e] for b, e in zip(bounds, ends)]
    flags = [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(_record(p, f) for p, f in zip(parts, flags))


def write_recordio(rec_path: Path, idx_path: Path, records: dict[int, bytes]) -> dict[int, int]:
    """Write payloads by key into a .rec and its .idx; returns {key: byte offset}."""
    offsets = {}
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in records.items():
            offsets[key] = rec.tell()
            idx.write(f"{key}\t{offsets[key]}\n")
            rec.write(encode_record(payload))
    return offsets


def face_jpeg(seed: int, size: int = 32) -> bytes:
    """A small distinct JPEG: smooth colour gradients, so it decodes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [rng.uniform(40, 215) + rng.uniform(-40, 40) * x + rng.uniform(-40, 40) * y for _ in range(3)]
    return encode_jpeg(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8), quality=90)


def jpeg_with_magic(seed: int, copies: int, size: int = 32) -> bytes:
    """A valid JPEG with a comment segment holding the RecordIO magic `copies` times.

    With the image starting 24 bytes into a payload (a flag-0 header), the comment data
    starts 30 bytes in; two bytes of filler put the first magic at an aligned offset.
    """
    jpeg = face_jpeg(seed, size)
    comment = b"\0\0" + MAGIC_BYTES * copies
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:]


def write_shard_dir(out_dir: Path, images: list[np.ndarray], labels: list[int], shard_size: int,
                    num_classes: int) -> None:
    """A shard directory holding these images (JPEG quality 95) and labels, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardSetWriter(out_dir, shard_size)
    for n, (image, label) in enumerate(zip(images, labels)):
        writer.write(f"{n:06d}", encode_jpeg(image, quality=95), label)
    write_manifest(
        out_dir, num_classes=num_classes, image_size=images[0].shape[:2], shards=writer.close(),
        source={"kind": "test"}, counts={"written": len(images)},
    )
