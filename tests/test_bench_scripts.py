"""The benchmark scripts' own logic, without their long runs: bench_data on a tiny shard set,
bench_head_storage's reading and reporting of finished runs and its argument errors,
bench_checkpoint end to end on a tiny head."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import bench_data  # noqa: E402
import bench_head_storage  # noqa: E402

from tests.data_helpers import write_shard_dir  # noqa: E402


def _fake_run(path: Path, accuracies: list[float], loss: float) -> None:
    path.mkdir(parents=True)
    rows = [f"{158 * (i + 1)},holdout,{acc},0.01,{acc},0.1,0.9" for i, acc in enumerate(accuracies)]
    (path / "eval.csv").write_text("step,benchmark,accuracy,accuracy_std,best_accuracy,eer,auc\n" + "\n".join(rows) + "\n")
    (path / "metrics.csv").write_text("step,epoch,loss,lr\n10,0,3.0,0.1\n790,9,%s,0.0\n" % loss)


def test_head_storage_report(tmp_path):
    results = {}
    for variant, seed, accuracies in (("separate-fp32", 0, [0.7, 0.9]), ("separate-fp32", 1, [0.7, 0.92]),
                                      ("fused-bf16", 0, [0.69, 0.91]), ("fused-bf16", 1, [0.71, 0.93])):
        _fake_run(tmp_path / f"{variant}-{seed}", accuracies, 0.5)
        results[(variant, seed)] = {**bench_head_storage.read_run(tmp_path / f"{variant}-{seed}"), "seconds": 90.0}
    text = bench_head_storage.to_markdown(results, [0, 1], "cmd")
    assert "| separate-fp32 | 1 | 70.00 ± 1.00 | 92.00 ± 1.00 | 0.500 | 1.5 min |" in text
    assert "separate-fp32 91.00 % (range 90.00-92.00); fused-bf16 92.00 % (range 91.00-93.00)" in text


@pytest.mark.parametrize("args, message", [
    (["--variants", "fused-fp16", "--data", "/nonexistent"], "unknown variant(s) fused-fp16"),
    (["--seeds", "a,b", "--data", "/nonexistent"], "--seeds must be comma-separated integers"),
    (["--data", "/nonexistent"], "not found: generate the demo data first"),
])
def test_head_storage_argument_errors(args, message):
    proc = subprocess.run([sys.executable, "launch/bench_head_storage.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_bench_data_figures_on_a_tiny_shard_set(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(40)]
    write_shard_dir(tmp_path, images, list(range(40)), shard_size=20, num_classes=40)
    rows = bench_data.benchmark(tmp_path, batch_size=8, repeats=1, workers=1)
    names = [row[0] for row in rows]
    assert names[:5] == ["decode only, simplejpeg", "decode only, Pillow", bench_data.WORKER_PATH,
                         bench_data.NORMALISE, bench_data.FULL_PATH]
    assert all(median > 0 and low <= median <= high for _, median, low, high, _ in rows)
    text = bench_data.to_markdown(rows, count=40, source="test", size=(16, 16), batch_size=8, repeats=1,
                                  seconds=1.0, command="cmd")
    assert "Target for decode + augment (the workers' path): >= 4,000 images/s per core" in text


def test_bench_checkpoint_on_a_tiny_head(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- data:begin -->\n## Data loading\n<!-- data:end -->\n")
    proc = subprocess.run([sys.executable, "launch/bench_checkpoint.py", "--classes", "1000", "--embedding-dim", "16",
                           "--world-sizes", "4,1", "--repeat", "2", "--dir", str(tmp_path / "runs"),
                           "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = "| W | rows | head file | save s | MB/s | + fsync s | load s |"
    assert table in proc.stdout
    # rank 0 of 4 holds 250 rows; W=1 all 1,000: rows + momentum of 16 float32 (or bfloat16) values each
    for rows, storage in (("250", "float32"), ("250", "bfloat16"), ("1,000", "float32"), ("1,000", "bfloat16")):
        assert f"| {rows} x {storage} |" in proc.stdout
    assert "| 1 | 1,000 x float32 | 0.1 MB |" in proc.stdout  # 2 x 1000 x 16 x 4 bytes and a header
    text = docs.read_text()
    assert text.count("<!-- checkpoint:begin -->") == 1 and "<!-- data:end -->" in text
    section = text.split("<!-- checkpoint:begin -->")[1]
    assert "## Checkpoint time of a 1,000-class head shard" in section and table in section
    assert "a node failure loses the steps since the newest checkpoint" in section
    assert not any((tmp_path / "runs").iterdir())  # the checkpoints written were removed
