"""RecordIO -> shards: exact bytes and labels, header/identity records, splits, bad input."""
from __future__ import annotations

import json
import tarfile

import pytest

from tests.data_helpers import (
    MAGIC_AS_FLOAT,
    MAGIC_BYTES,
    encode_record,
    face_jpeg,
    jpeg_with_magic,
    pack_payload,
    write_recordio,
)
from sf2dist.data import convert, read_manifest
from sf2dist.data.recordio import RecordFile, RecordIODataset, RecordIOError
from sf2dist.data.shards import OutputDirError

SIZE = 32


def shard_samples(out_dir) -> dict[str, tuple[int, bytes]]:
    """{key: (label, jpg bytes)} over every shard of a converted directory."""
    samples = {}
    for shard in read_manifest(out_dir).shards:
        with tarfile.open(out_dir / shard.tar) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".")
            if ext == "jpg":
                samples[key] = (int(members[f"{key}.cls"]), data)
    return samples


def insightface_records():
    """A header record, 7 image records of 3 identities, and 3 identity records.

    Key 2 is split once (a multi-label header whose second label is the magic), key 5 is
    split into three parts (the magic twice inside its JPEG).
    """
    labels = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 2}
    images = {key: face_jpeg(key, SIZE) for key in labels}
    images[5] = jpeg_with_magic(5, copies=2, size=SIZE)
    records = {0: pack_payload(0.0, b"", labels=(8.0, 11.0))}
    for key, label in labels.items():
        extra = (float(label), MAGIC_AS_FLOAT) if key == 2 else ()
        # a multi-label header stores the identity in labels[0]; its scalar label is unused
        records[key] = pack_payload(99.0 if extra else float(label), images[key], extra, id1=key)
    for identity, (first, end) in enumerate([(1, 4), (4, 6), (6, 8)]):
        records[8 + identity] = pack_payload(0.0, b"", labels=(float(first), float(end)))
    return records, labels, images


def test_split_record_is_rejoined(tmp_path):
    payload = pack_payload(3.0, jpeg_with_magic(0, copies=2, size=SIZE))
    encoded = encode_record(payload)
    assert encoded.count(MAGIC_BYTES) == 3  # three parts: first, (empty) middle, last
    (tmp_path / "x.rec").write_bytes(b"\0" * 8 + encoded)
    with RecordFile(tmp_path / "x.rec") as rec:
        assert rec.read(8) == payload


def test_insightface_file_converts_exactly(tmp_path):
    records, labels, images = insightface_records()
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
    # one magic per record, one more for key 2's split and two more for key 5's
    assert (tmp_path / "a.rec").read_bytes().count(MAGIC_BYTES) == len(records) + 3
    with RecordIODataset(tmp_path / "a.rec", tmp_path / "a.idx") as dataset:
        assert dataset.layout.has_header and dataset.layout.num_classes == 3
        assert dataset.layout.image_keys == list(range(1, 8))

    summary = convert.convert_recordio(
        tmp_path / "a.rec", tmp_path / "a.idx", tmp_path / "out", shard_size=3, image_size=(SIZE, SIZE)
    )
    assert (summary.records_read, summary.written, summary.rejected, summary.num_shards) == (7, 7, 0, 3)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.num_classes == 3 and manifest.num_samples == 7
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert manifest.image_size == (SIZE, SIZE)
    assert shard_samples(tmp_path / "out") == {f"{k:010d}": (labels[k], images[k]) for k in labels}


def test_file_without_header_converts_from_key_zero(tmp_path):
    labels = {0: 5, 1: 0, 2: 2, 3: 2, 4: 7}
    images = {key: face_jpeg(10 + key, SIZE) for key in labels}
    records = {k: pack_payload(float(v), images[k]) for k, v in labels.items()}
    write_recordio(tmp_path / "b.rec", tmp_path / "b.idx", records)
    summary = convert.convert_recordio(
        tmp_path / "b.rec", tmp_path / "b.idx", tmp_path / "out", image_size=(SIZE, SIZE)
    )
    assert summary.num_classes == 8  # no header: largest label + 1
    assert shard_samples(tmp_path / "out") == {f"{k:010d}": (labels[k], images[k]) for k in labels}


def test_corrupt_jpeg_is_rejected_and_counts_reconcile(tmp_path):
    labels = {k: k % 3 for k in range(200)}
    images = {key: face_jpeg(key, SIZE) for key in labels}
    images[17] = images[17][:60]  # truncated JPEG
    images[90] = b"not an image at all"
    records = {k: pack_payload(float(v), images[k]) for k, v in labels.items()}
    write_recordio(tmp_path / "c.rec", tmp_path / "c.idx", records)
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        summary = convert.convert_recordio(
            tmp_path / "c.rec", tmp_path / "c.idx", out, shard_size=64, image_size=(SIZE, SIZE),
            workers=workers,
        )
        assert (summary.records_read, summary.written, summary.rejected) == (200, 198, 2)
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        assert [(r["key"], r["label"]) for r in rejects] == [(17, 2), (90, 0)]
        assert all(r["reason"] for r in rejects)
        counts = read_manifest(out).counts
        assert counts["records_read"] == counts["written"] + counts["rejected"] == 200
        written = shard_samples(out)
        assert len(written) == 198 and "0000000017" not in written
        assert written["0000000018"] == (0, images[18])


def test_wrong_image_size_is_rejected(tmp_path):
    records = {0: pack_payload(0.0, face_jpeg(0, SIZE)), 1: pack_payload(1.0, face_jpeg(1, 16))}
    write_recordio(tmp_path / "d.rec", tmp_path / "d.idx", records)
    summary = convert.convert_recordio(tmp_path / "d.rec", tmp_path / "d.idx", tmp_path / "out", image_size=(SIZE, SIZE),
                                       max_reject_fraction=0.5)
    assert (summary.written, summary.rejected) == (1, 1)
    assert "16x16" in (tmp_path / "out" / "rejects.jsonl").read_text()


def test_truncated_rec_names_the_offset(tmp_path, capsys):
    records = {k: pack_payload(float(k), face_jpeg(k, SIZE)) for k in range(4)}
    offsets = write_recordio(tmp_path / "e.rec", tmp_path / "e.idx", records)
    data = (tmp_path / "e.rec").read_bytes()
    (tmp_path / "e.rec").write_bytes(data[: offsets[3] + 100])
    with pytest.raises(RecordIOError, match=rf"key 3: .*truncated.*byte offset {offsets[3]}"):
        convert.convert_recordio(tmp_path / "e.rec", tmp_path / "e.idx", tmp_path / "out", image_size=(SIZE, SIZE))
    assert not (tmp_path / "out" / "manifest.json").exists()

    code = convert.main(["rec", "--rec", str(tmp_path / "e.rec"), "--idx", str(tmp_path / "e.idx"),
                         "--out", str(tmp_path / "out2"), "--image-size", str(SIZE), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sf2dist-convert: error:") and f"byte offset {offsets[3]}" in err
    assert "Traceback" not in err


def test_idx_pointing_nowhere_names_the_key(tmp_path):
    records = {k: pack_payload(float(k), face_jpeg(k, SIZE)) for k in range(3)}
    offsets = write_recordio(tmp_path / "f.rec", tmp_path / "f.idx", records)
    (tmp_path / "f.idx").write_text("".join(f"{k}\t{o + 4 * (k == 2)}\n" for k, o in offsets.items()))
    with pytest.raises(RecordIOError, match=rf"key 2: .*no record at byte offset {offsets[2] + 4}"):
        convert.convert_recordio(tmp_path / "f.rec", tmp_path / "f.idx", tmp_path / "out", image_size=(SIZE, SIZE))


def test_fractional_label_names_the_key(tmp_path):
    records = {0: pack_payload(1.0, face_jpeg(0, SIZE)), 1: pack_payload(3.5, face_jpeg(1, SIZE))}
    write_recordio(tmp_path / "g.rec", tmp_path / "g.idx", records)
    with pytest.raises(RecordIOError, match=r"key 1: label 3\.5 is not a non-negative integer"):
        convert.convert_recordio(tmp_path / "g.rec", tmp_path / "g.idx", tmp_path / "out", image_size=(SIZE, SIZE))


def test_rerun_refuses_and_never_mixes(tmp_path):
    for name in "hi":
        records = {k: pack_payload(float(k), face_jpeg(k + ord(name), SIZE)) for k in range(3)}
        write_recordio(tmp_path / f"{name}.rec", tmp_path / f"{name}.idx", records)
    args = dict(image_size=(SIZE, SIZE))
    first = convert.convert_recordio(tmp_path / "h.rec", tmp_path / "h.idx", tmp_path / "out", **args)
    with pytest.raises(OutputDirError, match="already holds a finished conversion of this source"):
        convert.convert_recordio(tmp_path / "h.rec", tmp_path / "h.idx", tmp_path / "out", **args)
    with pytest.raises(OutputDirError, match="conversion of another source"):
        convert.convert_recordio(tmp_path / "i.rec", tmp_path / "i.idx", tmp_path / "out", **args)
    assert shard_samples(tmp_path / "out") == shard_samples(first.out_dir)

    (tmp_path / "out" / "manifest.json").unlink()  # as if interrupted before the manifest
    with pytest.raises(OutputDirError, match="unfinished conversion"):
        convert.convert_recordio(tmp_path / "i.rec", tmp_path / "i.idx", tmp_path / "out", **args)
    convert.convert_recordio(tmp_path / "i.rec", tmp_path / "i.idx", tmp_path / "out", overwrite=True, **args)
    assert read_manifest(tmp_path / "out").source["rec"] == str((tmp_path / "i.rec").resolve())

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"files sf2dist did not write \(notes.txt\)"):
        convert.convert_recordio(tmp_path / "h.rec", tmp_path / "h.idx", tmp_path / "other", overwrite=True, **args)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
