"""Issue #25 item 4, a converter that scales: workers write their own shards, the output is the
same bytes for any number of workers, a killed conversion resumes, and --part I/N runs joined by
`merge` equal one conversion of the whole source."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sf2dist.data import convert, make_loader, read_manifest
from sf2dist.data.shards import load_index
from tests.data_helpers import face_jpeg, pack_payload, write_recordio

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]
CONVERT = str(ROOT / ".venv" / "bin" / "sf2dist-convert")
if not os.path.exists(CONVERT):  # an installed environment other than the project's .venv
    CONVERT = str(Path(sys.executable).parent / "sf2dist-convert")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = convert.main([*map(str, argv)] + ([] if argv[0] == "merge" else ["--quiet"]))
    output = capsys.readouterr()
    return code, output.out, output.err


@pytest.fixture
def folders(tmp_path) -> Path:
    """9 identities of 0-9 images: an empty folder, a corrupt image (rejected), a PNG-less mix."""
    root = tmp_path / "faces"
    for identity in range(9):
        folder = root / f"id{identity}"
        folder.mkdir(parents=True)
        for n in range(0 if identity == 4 else identity + 1):
            data = face_jpeg(10 * identity + n, SIZE)
            (folder / f"{n}.jpg").write_bytes(data[:40] if (identity, n) == (6, 2) else data)
    return root


@pytest.fixture
def recordio(tmp_path) -> tuple[Path, Path]:
    """40 image records without a header record, labels 0..7 (label 5 never appears), one 24x24."""
    records = {key: pack_payload(float(key % 8 if key % 8 != 5 else 6),
                                 face_jpeg(key, 24 if key == 17 else SIZE)) for key in range(40)}
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
    return tmp_path / "a.rec", tmp_path / "a.idx"


def contents(out: Path) -> dict[str, bytes]:
    """Every file of a shard directory, the manifest without its creation time and provenance."""
    files = {}
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            for key in ("created", "merged_from", "part"):
                manifest.pop(key, None)
            manifest["source"].pop("part", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        files[path.name] = data
    return files


def samples(out: Path) -> list[tuple[bytes, int]]:
    """(jpeg bytes, label) of every sample, in shard order, read through the index."""
    manifest = read_manifest(out)
    result = []
    for number, shard in enumerate(manifest.shards):
        data = (out / shard.tar).read_bytes()
        result += [(data[o:o + n], label) for o, n, label in load_index(manifest, number).tolist()]
    return result


@pytest.mark.parametrize("source", ["folder", "rec"])
def test_output_is_the_same_bytes_for_any_number_of_workers(tmp_path, capsys, folders, recordio, source):
    args = (["folder", "--root", folders] if source == "folder" else
            ["rec", "--rec", recordio[0], "--idx", recordio[1]])
    outputs = {}
    for name, workers in (("a", 2), ("b", 2), ("one", 1), ("zero", 0)):
        out = tmp_path / f"out-{name}"
        code, stdout, stderr = run(capsys, *args, "--out", out, "--image-size", SIZE, "--shard-size", 4,
                                   "--workers", workers, "--max-reject-fraction", 0.2)
        assert code == 0, stderr
        outputs[name] = contents(out)
    assert outputs["a"] == outputs["b"] == outputs["one"] == outputs["zero"]
    files = outputs["a"]
    assert "rejects.jsonl" in files and not any(".partial" in n or n.endswith(".done.json") for n in files)
    assert "conversion.json" not in files
    labels = [label for _, label in samples(tmp_path / "out-a")]
    if source == "folder":  # id4 is empty (no label), id6 lost one of its 7 images
        expected = [position for position, identity in enumerate([0, 1, 2, 3, 5, 6, 7, 8])
                    for _ in range(identity + 1 - (identity == 6))]
        assert labels == expected
        assert read_manifest(tmp_path / "out-a").num_classes == 8
    else:
        assert labels == [key % 8 if key % 8 != 5 else 6 for key in range(40) if key != 17]
        assert read_manifest(tmp_path / "out-a").num_classes == 8
        assert "1 class of 8 has no image in the shards (labels 5)" in stderr


def test_too_many_rejects_with_workers_keeps_no_shards(tmp_path, capsys, recordio):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "rec", "--rec", recordio[0], "--idx", recordio[1], "--out", out,
                          "--image-size", 24, "--shard-size", 4, "--workers", 2)
    assert code == 1
    assert "stopped after 5 of the first 5 images were rejected: --max-reject-fraction 0.1 allows at most 4 " \
           "of the 40 images" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]


def test_a_killed_conversion_resumes_where_it_stopped(tmp_path, capsys):
    root = tmp_path / "faces"
    jpeg = face_jpeg(0, 112)
    for n in range(3000):
        folder = root / f"id{n // 30:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:05d}.jpg").write_bytes(jpeg)
    out = tmp_path / "out"
    command = [CONVERT, "folder", "--root", str(root), "--out", str(out), "--shard-size", "100",
               "--workers", "1", "--quiet"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("shard-*.done.json")):  # the first shard is complete
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard was completed within 60 s"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: a node going down
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob("shard-*.done.json")))
    assert 1 <= done < 30
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")
            if (out / p.name.replace(".tar", ".done.json")).exists()}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"resuming: {done} of 30 shards done in {out}\n"), rerun.stdout
    assert f"wrote 3000 samples of 100 classes in 30 shards to {out}" in rerun.stdout
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not rewritten

    convert.convert_folder(root, tmp_path / "whole", shard_size=100)
    assert contents(out) == contents(tmp_path / "whole")

    code, stdout, _ = run(capsys, *command[1:])  # finished: as before
    assert code == 0 and stdout.startswith(f"already converted: {out} holds 3000 samples")


def test_an_unfinished_conversion_with_other_settings_is_not_resumed(tmp_path, capsys, folders):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "folder", "--root", folders, "--out", out, "--image-size", SIZE,
                          "--shard-size", 4, "--workers", 0, "--max-reject-fraction", 0.2)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()  # as if killed before the end, with the state written at its start
    state = {"format": "sf2dist-conversion/1", "source": manifest["source"], "image_size": [SIZE, SIZE],
             "shard_size": 4, "total_shards": 10}
    (out / "conversion.json").write_text(json.dumps(state))
    code, _, stderr = run(capsys, "folder", "--root", folders, "--out", out, "--image-size", SIZE,
                          "--shard-size", 5, "--workers", 0)
    assert code == 1
    assert "holds an unfinished conversion of the identity folders in" in stderr
    assert "shard_size 4 there, 5 here" in stderr and "--overwrite to start over" in stderr
    code, stdout, stderr = run(capsys, "folder", "--root", folders, "--out", out, "--image-size", SIZE,
                               "--shard-size", 4, "--workers", 0, "--max-reject-fraction", 0.2)
    assert code == 0, stderr
    # a finished conversion removes its done marks: the shards are redone, the result the same
    assert stdout.startswith(f"resuming: 0 of 10 shards done in {out}\n")
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


@pytest.mark.parametrize("source", ["folder", "rec"])
def test_parts_merged_equal_one_conversion(tmp_path, capsys, folders, recordio, source):
    args = (["folder", "--root", folders] if source == "folder" else
            ["rec", "--rec", recordio[0], "--idx", recordio[1]])
    options = ["--image-size", SIZE, "--shard-size", 4, "--workers", 1, "--max-reject-fraction", 0.2]
    whole = tmp_path / "whole"
    assert run(capsys, *args, "--out", whole, *options)[0] == 0
    for part in (0, 1):
        code, stdout, stderr = run(capsys, *args, "--out", tmp_path / f"part{part}", *options, "--part", f"{part}/2")
        assert code == 0, stderr
    parts = json.loads((tmp_path / "part1" / "manifest.json").read_text())["part"]
    assert parts == {"index": 1, "count": 2, "first_shard": 5, "end_shard": 10, "total_shards": 10}
    merged = tmp_path / "merged"
    code, stdout, stderr = run(capsys, "merge", "--out", merged, tmp_path / "part1", tmp_path / "part0")
    assert code == 0, stderr
    assert contents(merged) == contents(whole)  # same shards, labels, counts, source
    tar = read_manifest(merged).shards[0].tar
    assert (merged / tar).stat().st_ino == (tmp_path / "part0" / tar).stat().st_ino  # linked, not copied
    # the merged set is what the one-shot command wrote: re-running it there has nothing to do
    code, stdout, _ = run(capsys, *args, "--out", merged, *options)
    assert code == 0 and stdout.startswith(f"already converted: {merged}")

    loader = make_loader(merged, batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in loader])
    expected = sorted(label for _, label in samples(whole))
    assert sorted(labels[:len(expected)].tolist()) == expected


@pytest.mark.parametrize("part", ["3/2", "0/0", "x", "1", "-1/2", "1/2/3"])
def test_a_bad_part_is_a_clear_error(tmp_path, capsys, folders, part):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["folder", "--root", str(folders), "--out", str(tmp_path / "out"), f"--part={part}"])
    assert exit_info.value.code == 2
    assert f"argument --part: expected I/N with 0 <= I < N (part I of N, numbered from 0, e.g. 0/4 ... 3/4), " \
           f"got '{part}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_more_parts_than_shards_is_a_clear_error(tmp_path, capsys, folders):
    code, _, stderr = run(capsys, "folder", "--root", folders, "--out", tmp_path / "out", "--image-size", SIZE,
                          "--part", "0/2")
    assert code == 2
    assert stderr == ("sf2dist-convert: error: --part 0/2: the input makes only 1 shard of 10000 samples, fewer "
                      "than 2 parts; use at most 1 parts or a smaller --shard-size\n")


def test_merge_refuses_parts_that_do_not_make_one_conversion(tmp_path, capsys, folders, recordio):
    options = ["--image-size", SIZE, "--shard-size", 4, "--workers", 0, "--max-reject-fraction", 0.2]
    folder_args = ["folder", "--root", folders]
    for part in ("0/2", "1/2", "0/3"):
        assert run(capsys, *folder_args, "--out", tmp_path / f"f{part[0]}of{part[2]}", *options, "--part", part)[0] == 0
    assert run(capsys, "rec", "--rec", recordio[0], "--idx", recordio[1], "--out", tmp_path / "r1of2",
               *options, "--part", "1/2")[0] == 0
    assert run(capsys, *folder_args, "--out", tmp_path / "whole", *options)[0] == 0

    def merge(*parts):
        code, _, stderr = run(capsys, "merge", "--out", tmp_path / "merged", *[tmp_path / p for p in parts])
        assert code == 1
        assert not (tmp_path / "merged").exists()
        return stderr

    assert "are parts of different conversions" in merge("f0of2", "r1of2")
    assert "part 0/2 is given twice" in merge("f0of2", "f0of2", "f1of2")
    assert "part 1/2 is missing: merge needs all 2 parts of the conversion" in merge("f0of2")
    assert "every part must be of the same --part I/N split" in merge("f0of2", "f0of3")
    assert "is not a part of a conversion (converted without --part I/N)" in merge("whole", "f0of2")
    assert "has no manifest.json: it is not the output of an sf2dist-convert --part I/N run" in merge("nowhere")
