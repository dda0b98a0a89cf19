"""Issue #23, "A newcomer's second day": the data items, checked through the real commands.

Ctrl-C ends a conversion at once and leaves no worker behind; --out inside --root is refused
before anything is written; training pointed at raw identity folders is told to convert them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sf2dist.data.shards import ShardFormatError, read_manifest
from tests.data_helpers import face_jpeg

ROOT = Path(__file__).resolve().parents[1]
CONVERT = str(ROOT / ".venv" / "bin" / "sf2dist-convert")
if not os.path.exists(CONVERT):  # an installed environment other than the project's .venv
    CONVERT = str(Path(sys.executable).parent / "sf2dist-convert")


def identity_folders(root: Path, images: int, per_identity: int = 20, size: int = 16) -> Path:
    """`images` copies of one tiny JPEG in ROOT/IDENTITY/IMAGE folders: decoding is the work."""
    jpeg = face_jpeg(0, size)
    for n in range(images):
        folder = root / f"id{n // per_identity:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:06d}.jpg").write_bytes(jpeg)
    return root


def group_members(pgid: int) -> list[str]:
    """'pid state' of every process in the process group `pgid`, zombies included."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            members.append(f"{entry} {fields[0]}")
    return members


def test_ctrl_c_ends_a_conversion_at_once_and_leaves_no_worker(tmp_path):
    # 30,000 images: the two workers convert ~12,000 a second, so 6,000 were sometimes all done
    # before the test's Ctrl-C arrived; this leaves it seconds to land mid-conversion
    source = identity_folders(tmp_path / "faces", 30_000)
    out = tmp_path / "shards"
    # SIGINT back to its default in the converter, as a terminal's foreground job has it: a shell
    # without job control starts its background commands (`make test &`, a CI runner's) with
    # SIGINT ignored, every child inherits that, and the converter then rightly ignored the Ctrl-C
    proc = subprocess.Popen(
        [CONVERT, "folder", "--root", str(source), "--out", str(out), "--image-size", "16",
         "--workers", "2", "--shard-size", "100"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("shard-*.tar")):  # converting, with the workers busy
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard appeared within 30 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        interrupted = time.monotonic()
        stdout, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert took < 10
    assert stderr.rstrip().endswith(
        f"sf2dist-convert: interrupted; {out} is unfinished (run the same command again to resume it, "
        f"or with --overwrite to start over)"
    ), stderr
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists()
    deadline = time.monotonic() + 2  # a worker ends a moment after its parent; none may stay
    while (left := group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []

    rerun = subprocess.run(
        [CONVERT, "folder", "--root", str(source), "--out", str(out), "--image-size", "16",
         "--workers", "2", "--shard-size", "1000", "--overwrite", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert read_manifest(out).num_samples == 30_000


@pytest.mark.parametrize("inside", ["shards", "."])
def test_out_inside_root_is_refused_before_anything_is_written(tmp_path, inside):
    source = identity_folders(tmp_path / "faces", 4)
    out = source / inside
    proc = subprocess.run(
        [CONVERT, "folder", "--root", str(source), "--out", str(out), "--image-size", "16", "--workers", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    where = "is" if inside == "." else "is inside"
    assert proc.stderr == (
        f"sf2dist-convert: error: --out {out.resolve()} {where} --root {source}: --out must not be inside "
        f"--root, or the shards are read back as an identity folder; choose an --out outside {source}, "
        f"e.g. --out {tmp_path / 'faces-shards'}\n"
    )
    assert sorted(p.name for p in source.iterdir()) == ["id00000"]


def test_training_pointed_at_raw_identity_folders_is_told_to_convert_them(tmp_path):
    source = identity_folders(tmp_path / "faces", 4, per_identity=2)
    settings = [f"data.train={source}", f"run.dir={tmp_path / 'run'}", "logging.wandb_mode=disabled",
                "eval.benchmarks=[]"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
         *[arg for setting in settings for arg in ("--set", setting)]],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"data.train: {source} has no manifest.json and holds folders of images (such as id00000/000000.jpg): "
            f"these are raw images, not shards; convert them first with sf2dist-convert folder --root {source} "
            f"--out SHARDS (a new directory outside it) and point at SHARDS") in proc.stderr


def test_an_unfinished_conversion_is_still_called_one(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"")  # as if stopped before the manifest
    (out / "faces" / "id0").mkdir(parents=True)  # even next to a folder of images
    (out / "faces" / "id0" / "a.jpg").write_bytes(face_jpeg(0, 16))
    with pytest.raises(ShardFormatError) as error:
        read_manifest(out)
    assert str(error.value) == (
        f"{out} has no manifest.json: expected a shard directory written by sf2dist-convert or "
        f"sf2dist-synth (a directory without manifest.json is an unfinished conversion)"
    )
