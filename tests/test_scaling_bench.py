"""`launch/scaling_bench.py` quick mode end to end on 2 gloo ranks, and its collective model."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf2dist.bench.scaling import COLUMNS, Link, memory_row, parse_method, step_collectives

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--methods", "sphereface2,softmax,partial_fc_0.5,sphereface2_0.5", "--memory-classes", "0"]


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _check_outputs(out_dir: Path, world_sizes: set[int]) -> list[dict]:
    with open(out_dir / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == COLUMNS
    assert {int(r["world_size"]) for r in rows} == world_sizes
    assert (out_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((out_dir / "scaling.json").read_text())["points"]
    assert len(points) == len(rows) == 4 * len(world_sizes)
    for p in points:
        assert p["kind"] == "measured" and p["step_ms"] > 0 and p["images_per_s"] > 0
        assert p["head_efficiency"] > 0 and p["matmul_ms"] > 0
        # what comm.py recorded equals the model the projection uses
        model = step_collectives(p["method"], p["world_size"], p["batch_per_rank"], p["embedding_dim"])
        assert p["comm_calls"] == len(model)
        assert p["comm_mib"] * 2**20 == pytest.approx(sum(n for _, n in model))
    return points


def test_quick_mode_on_two_gloo_ranks(tmp_path):
    out = _run([sys.executable, "launch/scaling_bench.py", *QUICK, "--world-sizes", "2",
                "--out-dir", str(tmp_path), "--docs", str(tmp_path / "benchmarks.md")], ROOT)
    assert "SphereFace2 / softmax images/s at W=2 (measured)" in out
    points = {p["method"]: p for p in _check_outputs(tmp_path, {2})}
    # SphereFace2's only all-reduce is the shared bias's gradient: 4 bytes, whatever the batch
    for method in ("sphereface2", "sphereface2_0.5"):  # sampled or not
        assert points[method]["all_reduce_calls"] == 1
        assert points[method]["largest_all_reduce_bytes"] == 4
    # the softmax head all-reduces row maxima, then row sums with true-class logits: [2, N] floats
    assert points["softmax"]["all_reduce_calls"] == 2
    assert points["softmax"]["largest_all_reduce_bytes"] == 2 * 2 * 16 * 4
    assert "## Classifier-layer scaling" in (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "scaling.png").exists()


def test_torchrun_points_and_collect(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "launch/scaling_bench.py", *QUICK, "--out-dir", str(tmp_path)], ROOT)
    assert (tmp_path / "points-w2.json").exists()
    _run([sys.executable, "launch/scaling_bench.py", "--collect", str(tmp_path), "--out-dir", str(tmp_path)], ROOT)
    _check_outputs(tmp_path, {2})


def test_link_model():
    link = Link(bandwidth_gbs=100.0, latency_us=5.0)
    assert link.seconds("all_gather", 10**9, 1) == 0.0
    assert link.seconds("all_gather", 10**9, 4) == pytest.approx(3 * 5e-6 + 0.75 * 10**9 / 100e9)
    assert link.seconds("all_reduce", 10**9, 4) == pytest.approx(2 * link.seconds("all_gather", 10**9, 4))
    sf2 = [n for kind, n in step_collectives("sphereface2", 64, 128, 512) if kind == "all_reduce"]
    assert sf2 == [4]


def test_bad_method_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "launch/scaling_bench.py", "--quick", "--methods", "sphereface3",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown method 'sphereface3'" in proc.stderr


def test_method_names():
    assert parse_method("sphereface2") == ("sphereface2", 1.0, False, False)
    assert parse_method("sphereface2_0.1_fstep") == ("sphereface2", 0.1, True, False)
    assert parse_method("sphereface2_fstep_bf16") == ("sphereface2", 1.0, True, True)
    assert parse_method("partial_fc_0.1") == ("partial_fc", 0.1, False, False)
    for bad in ("softmax_fstep", "sphereface2_bf16", "partial_fc_0.1_fstep", "sphereface2_fstep_fstep"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_memory_row_arithmetic():
    point = {"method": "sphereface2_fstep_bf16", "classes_per_rank": 1_000_000, "embedding_dim": 512,
             "global_batch": 128, "peak_mem_mib": 2048.0, "step_ms": 1.0}
    row = memory_row(point)
    assert row["state_mib"] == pytest.approx(2 * 1_000_000 * 512 * 2 / 2**20)  # bfloat16 weights + momentum
    assert row["identities_per_gib"] == pytest.approx(500_000)
    assert row["overhead"] == pytest.approx(2048.0 / row["state_mib"] - 1)


def test_head_memory_table(tmp_path):
    docs = tmp_path / "benchmarks.md"
    out = _run([sys.executable, "launch/scaling_bench.py", "--quick", "--world-sizes", "1", "--methods", "sphereface2",
                "--memory-classes", "5000", "--out-dir", str(tmp_path), "--docs", str(docs)], ROOT)
    assert "memory sphereface2_fstep_bf16, 5,000 classes" in out
    text = docs.read_text()
    assert "## Head memory at a million local classes" in text
    for method, storage in (("sphereface2", "float32"), ("sphereface2_fstep", "float32"),
                            ("sphereface2_fstep_bf16", "bfloat16")):
        assert f"| {method} | {storage} |" in text


def test_negative_memory_classes_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "launch/scaling_bench.py", "--quick", "--memory-classes", "-5",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--memory-classes must be 0 (skip the table) or a positive class count" in proc.stderr
