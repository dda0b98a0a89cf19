"""Image folders -> shards -> loader: labels (ids above 2^24 included) survive exactly."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sf2dist.data import convert, make_loader, read_manifest
from sf2dist.data.shards import load_index
from tests.data_helpers import face_jpeg

SIZE = 32
BIG = 2**24 + 1  # the first integer float32 cannot hold


def png_bytes(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def identity_folders(tmp_path):
    root = tmp_path / "faces"
    files = {
        "carol/0.jpg": face_jpeg(1, SIZE),
        "carol/1.jpg": face_jpeg(2, SIZE),
        "alice/a.jpg": face_jpeg(3, SIZE),
        "alice/b.png": png_bytes(4),  # not a JPEG: re-encoded
        "bob/x.jpg": face_jpeg(5, SIZE),
        "bob/broken.jpg": face_jpeg(6, SIZE)[:50],  # corrupt: rejected
        "bob/.DS_Store": b"metadata",  # hidden: ignored
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "bob" / "nested").mkdir()  # not an identity folder: skipped with a warning
    return root, files


def test_big_ids_pass_through_folder_shards_and_loader(identity_folders, tmp_path, capsys):
    root, files = identity_folders
    out = tmp_path / "shards"
    code = convert.main(["folder", "--root", str(root), "--out", str(out), "--label-offset", str(BIG),
                         "--image-size", str(SIZE), "--workers", "2", "--shard-size", "2", "--quiet",
                         "--max-reject-fraction", "0.2"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert f"read 6 images: wrote 5 samples of {BIG + 3} classes in 3 shards" in output.out
    assert "ignored 1 nested folder inside identity folders" in output.err and "bob/nested" in output.err
    expected_labels = {"alice": BIG, "bob": BIG + 1, "carol": BIG + 2}
    assert (out / "labels.tsv").read_text() == "".join(f"{v}\t{k}\n" for k, v in expected_labels.items())

    manifest = read_manifest(out)
    assert manifest.num_classes == BIG + 3
    assert manifest.counts == {"records_read": 6, "written": 5, "rejected": 1, "reencoded": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["bob/broken.jpg"]

    # the tars are plain webdataset: cls is the exact decimal id, JPEG bytes are unchanged
    tars = [str(out / s.tar) for s in manifest.shards]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert [int(s["cls"]) for s in samples] == [BIG, BIG, BIG + 1, BIG + 2, BIG + 2]
    assert samples[0]["jpg"] == files["alice/a.jpg"] and samples[3]["jpg"] == files["carol/0.jpg"]
    assert samples[1]["jpg"][:2] == b"\xff\xd8"  # the PNG, now a JPEG
    index_labels = np.concatenate([load_index(manifest, i)[:, 2] for i in range(len(manifest.shards))])
    assert index_labels.dtype == np.int64 and index_labels.tolist() == [BIG, BIG, BIG + 1, BIG + 2, BIG + 2]

    loader = make_loader(out, batch_size=5, rank=0, world_size=1, num_workers=0, seed=0, num_classes=BIG + 3)
    (images, labels), = list(loader)
    assert labels.dtype == torch.int64 and images.shape == (5, 3, SIZE, SIZE)
    assert sorted(labels.tolist()) == [BIG, BIG, BIG + 1, BIG + 2, BIG + 2]
    assert labels.float().long().tolist() != labels.tolist()  # float32 would have changed them

    # 2 ranks x 2 worker processes: 2 steps of 2 x 2 samples, the last 3 the epoch's first again
    order = []
    per_rank = [list(make_loader(out, batch_size=2, rank=rank, world_size=2, num_workers=2, seed=1))
                for rank in range(2)]
    for step in range(2):
        for rank in range(2):
            assert per_rank[rank][step][1].dtype == torch.int64
            order += per_rank[rank][step][1].tolist()
    assert sorted(order[:5]) == [BIG, BIG, BIG + 1, BIG + 2, BIG + 2] and order[5:] == order[:3]


def test_folder_with_stray_files_is_refused(identity_folders):
    root, _ = identity_folders
    (root / "readme.txt").write_text("not an identity")
    with pytest.raises(convert.ConversionError, match=r"files outside identity folders \(readme.txt\)"):
        convert.convert_folder(root, root.parent / "out", image_size=(SIZE, SIZE))
