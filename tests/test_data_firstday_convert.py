"""sf2dist-convert as a newcomer meets it (issue #16): nothing lost without a word, messages
that say what to do, plurals right, a finished conversion re-run is not an error."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sf2dist.data import convert, read_manifest
from sf2dist.data.shards import load_index
from sf2dist.imageio import encode_jpeg
from tests.data_helpers import face_jpeg, pack_payload, write_recordio

SIZE = 32


def run(capsys, *argv) -> tuple[int, str, str]:
    code = convert.main([*map(str, argv), "--workers", "0", "--quiet"])
    output = capsys.readouterr()
    return code, output.out, output.err


def make_folders(root, layout: dict[str, list[bytes]]) -> None:
    for name, images in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n, data in enumerate(images):
            (root / name / f"{n}.jpg").write_bytes(data)


def written_labels(out) -> list[int]:
    manifest = read_manifest(out)
    return np.concatenate([load_index(manifest, i)[:, 2] for i in range(len(manifest.shards))]).tolist()


def test_empty_and_nested_folders_are_named_and_labels_have_no_gaps(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folders(root, {
        "alice": [face_jpeg(1, SIZE), face_jpeg(2, SIZE)],
        "bob": [],  # empty
        "carol": [face_jpeg(3, SIZE), face_jpeg(4, SIZE)],
        "carol/extra": [face_jpeg(5, SIZE)],  # nested: not read
        "dave": [],
        "erin": [face_jpeg(6, SIZE), face_jpeg(7, SIZE)],
    })
    (root / "dave" / ".DS_Store").write_bytes(b"metadata")  # hidden files do not make a folder non-empty
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "folder", "--root", root, "--out", out, "--image-size", SIZE)
    assert code == 0, stderr
    assert stdout == f"read 6 images: wrote 6 samples of 3 classes in 1 shard to {out}\n"
    warnings = stderr.splitlines()
    assert warnings == [
        "sf2dist-convert: warning: skipped 2 empty identity folders (no image file directly inside; "
        "they get no label): bob, dave",
        "sf2dist-convert: warning: ignored 1 nested folder inside identity folders, with 1 file not "
        "converted (images must sit directly in their identity folder): carol/extra (1 file)",
    ]
    assert (out / "labels.tsv").read_text() == "0\talice\n1\tcarol\n2\terin\n"
    assert read_manifest(out).num_classes == 3
    assert written_labels(out) == [0, 0, 1, 1, 2, 2]
    assert not (out / "rejects.jsonl").exists()  # nothing rejected: no file, and none pointed at


def test_identity_with_every_image_rejected_keeps_an_unused_label(tmp_path, capsys):
    """Labels come from the listing (so that workers and --part runs label alike): bob keeps 11."""
    root = tmp_path / "faces"
    make_folders(root, {
        "alice": [face_jpeg(1, SIZE), face_jpeg(2, SIZE)],
        "bob": [b"not an image at all"],
        "carol": [face_jpeg(3, SIZE), face_jpeg(4, SIZE)],
    })
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "folder", "--root", root, "--out", out, "--image-size", SIZE,
                               "--label-offset", 10, "--max-reject-fraction", 0.2)
    assert code == 0, stderr
    assert stdout.startswith(f"read 5 images: wrote 4 samples of 13 classes in 1 shard to {out}, rejected 1 "
                             f"(reasons in {out / 'rejects.jsonl'})")
    assert "1 identity folder had every image rejected" in stderr and "still count in num_classes" in stderr
    assert stderr.rstrip().endswith(": bob")
    assert (out / "labels.tsv").read_text() == "10\talice\n11\tbob\n12\tcarol\n"
    assert written_labels(out) == [10, 10, 12, 12]
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["key"] == "bob/0.jpg"
    # the reason says what the bytes are, without a Python object repr
    assert reject["reason"] == ("cannot decode image (19 bytes): not in any image format Pillow reads "
                                "(first bytes: 6e 6f 74 20 61 6e 20 69)")


@pytest.mark.parametrize(("rejected", "code"), [(2, 0), (3, 1)])
def test_reject_share_above_the_limit_stops_and_keeps_no_shards(tmp_path, capsys, rejected, code):
    """20 images, limit 0.1: 2 rejects pass, 3 stop the conversion."""
    records = {key: pack_payload(float(key % 4), face_jpeg(key, SIZE if key >= rejected else 24)) for key in range(20)}
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
    out = tmp_path / "out"
    args = ("rec", "--rec", tmp_path / "a.rec", "--idx", tmp_path / "a.idx", "--out", out, "--image-size", SIZE)
    result, stdout, stderr = run(capsys, *args)
    assert result == code, stderr
    if code == 0:
        assert f"wrote 18 samples of 4 classes in 1 shard to {out}, rejected 2" in stdout
        return
    assert stderr == (
        f"sf2dist-convert: error: stopped after 3 of the first 3 images were rejected: --max-reject-fraction "
        f"0.1 allows at most 2 of the 20 images. The most common reason (3 images): image is 24x24 pixels, "
        f"expected 32x32 (pass --image-size 24 if the whole dataset is 24x24). No shards were kept; every "
        f"reason is in {out / 'rejects.jsonl'}. Fix the source, or pass a larger --max-reject-fraction (at "
        f"most 1) with --overwrite to keep the images that do convert\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 3

    # what the message says to do works
    result, stdout, stderr = run(capsys, *args, "--max-reject-fraction", 0.5, "--overwrite")
    assert result == 0, stderr
    assert f"read 20 images: wrote 17 samples of 4 classes in 1 shard to {out}, rejected 3" in stdout


def test_non_square_image_size_is_refused_before_anything_is_written(tmp_path, capsys):
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", {0: pack_payload(0.0, face_jpeg(0, SIZE))})
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "rec", "--rec", tmp_path / "a.rec", "--idx", tmp_path / "a.idx",
                               "--out", out, "--image-size", "112x96")
    assert code == 2 and stdout == ""
    assert stderr == ("sf2dist-convert: error: --image-size 112x96 is not square: image sizes must be square, "
                      "e.g. --image-size 112 (training takes N x N faces)\n")
    assert not out.exists()
    with pytest.raises(SystemExit):
        convert.main(["rec", "--help"])
    assert "square" in capsys.readouterr().out


def test_non_square_images_are_rejected_with_a_hint_that_fits(tmp_path, capsys):
    wide = encode_jpeg(np.full((SIZE, 24, 3), 128, np.uint8))
    records = {0: pack_payload(0.0, face_jpeg(0, SIZE)), 1: pack_payload(1.0, wide)}
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "rec", "--rec", tmp_path / "a.rec", "--idx", tmp_path / "a.idx", "--out", out,
                          "--image-size", SIZE, "--max-reject-fraction", 1)
    assert code == 0, stderr
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject == {"key": 1, "label": 1, "reason": "image is 32x24 pixels, expected 32x32 (training takes "
                                                      "square faces: align or crop the dataset to 32x32)"}


def test_rerun_of_a_finished_conversion_is_not_an_error(tmp_path, capsys):
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", {0: pack_payload(0.0, face_jpeg(0, SIZE))})
    out = tmp_path / "out"
    args = ("rec", "--rec", tmp_path / "a.rec", "--idx", tmp_path / "a.idx", "--out", out, "--image-size", SIZE)
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert stdout == f"read 1 image: wrote 1 sample of 1 class in 1 shard to {out}\n"  # singulars, no rejects file
    assert not (out / "rejects.jsonl").exists()
    shard_bytes = (out / "shard-000000.tar").read_bytes()

    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and stderr == ""
    assert stdout == (f"already converted: {out} holds 1 sample of 1 class from the RecordIO file "
                      f"{(tmp_path / 'a.rec').resolve()}; nothing to do (pass --overwrite to convert it again)\n")
    assert (out / "shard-000000.tar").read_bytes() == shard_bytes

    # other sizes are another conversion: refused, saying how to get it
    code, _, stderr = run(capsys, *args[:-1], 48)
    assert code == 1
    assert re.search(r"with 32x32 images .*; pass --overwrite to convert it again with 48x48 images", stderr)


def test_recordio_classes_without_images_are_named(tmp_path, capsys):
    records = {0: pack_payload(0.0, face_jpeg(0, SIZE)), 1: pack_payload(2.0, face_jpeg(1, SIZE))}
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
    code, stdout, stderr = run(capsys, "rec", "--rec", tmp_path / "a.rec", "--idx", tmp_path / "a.idx",
                               "--out", tmp_path / "out", "--image-size", SIZE)
    assert code == 0, stderr
    assert "wrote 2 samples of 3 classes" in stdout
    assert stderr.startswith("sf2dist-convert: warning: 1 class of 3 has no image in the shards (labels 1)")


def option_help_entries(help_text: str) -> dict[str, str]:
    """{first option string: its help text} from an argparse help screen."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["rec", "folder"])
def test_every_option_says_its_default(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        convert.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    entries = option_help_entries(text)
    assert {"--out", "--shard-size", "--image-size", "--max-reject-fraction", "--workers", "--overwrite",
            "--quiet"} <= set(entries)
    for option, entry in entries.items():
        if option != "-h":
            assert "default" in entry or "required" in entry, entry
    assert "(default 0.1)" in " ".join(text.split())
    assert text.split("\n\n")[1].startswith("Convert ")  # the subcommand has its own description
