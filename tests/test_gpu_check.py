"""The parts of `make gpu-check` that run on a CPU: synthetic 1M-class shards, the doubling
search, whole training steps timed (on the CPU here, on a GPU there), and the report text."""
from __future__ import annotations

import pytest
import torch

from sf2dist.bench import gpu_check
from sf2dist.data import make_loader, read_manifest


def test_synthetic_shards_spread_labels_over_many_classes(tmp_path):
    out = gpu_check.write_synthetic_shards(tmp_path / "shards", num_classes=1_000_000, num_samples=40, size=32)
    manifest = read_manifest(out)
    assert manifest.num_classes == 1_000_000 and manifest.num_samples == 40
    loader = make_loader(out, batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, flip=False)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.dtype == torch.int64 and int(labels.max()) < 1_000_000 and len(labels.unique()) == 40


def test_largest_fitting_doubles_until_the_first_failure():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 5_000_000

    assert gpu_check.largest_fitting(fits, 1_000_000, 1 << 30) == (4_000_000, 8_000_000)
    assert tried == [1_000_000, 2_000_000, 4_000_000, 8_000_000]
    assert gpu_check.largest_fitting(lambda n: True, 1, 8) == (8, None)
    assert gpu_check.largest_fitting(lambda n: False, 1, 8) == (0, 1)


def test_whole_training_steps_are_timed(tmp_path):
    data = gpu_check.write_synthetic_shards(tmp_path / "shards", num_classes=5000, num_samples=64, size=32)
    cfg = gpu_check.training_config(data, tmp_path / "run", "cpu", {
        "model.backbone": "smallcnn", "model.embedding_dim": 32, "engine.precision": "fp32", "data.batch_size": 8,
        "data.num_workers": 0, "head.step": "fused", "head.storage": "bfloat16"})
    result = gpu_check.time_training(cfg, warmup=1, steps=3)
    assert result["steps"] == 3 and result["images_per_s"] > 0 and result["step_ms"] > 0


def test_the_report_names_each_figure_and_each_failure():
    report = {"machine": "1x NVIDIA H200", "started": "2026-12-01", "seconds": 412.0, "parts": {
        "cuda_tests": {"tests": 20, "failures": 1, "errors": 0, "skipped": 2, "passed": 17,
                       "failed": ["tests.test_cuda::test_x"]},
        "end_to_end": {"softmax": {"images_per_s": 3210.4, "step_ms": 79.7, "peak_memory_gib": 30.2,
                                   "host_syncs_per_step": 4.0},
                       "partial_fc_0.1": {"error": "OutOfMemoryError: no"}},
        "host_syncs": {"sphereface2": {"host_syncs_per_step": 1.0, "steps": 5}, "cosface": {"error": "X: y"}},
        "head_efficiency": {"sphereface2/no": {"step_ms": 4.0, "matmul_ms": 2.0, "head_efficiency": 2.0}},
        "max_classes": {"largest": 32_000_000, "first_failure": 64_000_000, "identities_per_gib": 230_000.0},
        "scaling_bench": {"error": "RuntimeError: nccl"},
    }}
    text = gpu_check.markdown(report)
    assert "17 passed, 1 failed, 2 skipped: tests.test_cuda::test_x" in text
    assert "softmax: 3,210 images/s (79.7 ms per step, peak 30.2 GiB, 4.0 host syncs per step)" in text
    assert "partial_fc_0.1: failed (OutOfMemoryError: no)" in text
    assert "| sphereface2 | no | 4.00 | 2.00 | 2.00 |" in text
    assert "| sphereface2 | 1.0 |" in text and "| cosface | failed: X: y |" in text
    assert "32,000,000 classes (230,000 identities per GiB; 64000000 did not fit)" in text
    assert "scaling_bench: RuntimeError: nccl" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        gpu_check.run(tmp_path, None, ["cuda_tests"])
