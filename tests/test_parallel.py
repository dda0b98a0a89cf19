"""Shard arithmetic, launcher discovery and the SphereFace2 bias initialisation."""
from __future__ import annotations

import pytest

from sf2dist.heads import initial_bias
from sf2dist.parallel import class_range, discover


@pytest.mark.parametrize("num_classes,world_size", [(11, 1), (11, 2), (11, 3), (12, 3), (7, 7), (1_000_003, 8)])
def test_class_ranges_tile_the_classes(num_classes, world_size):
    ranges = [class_range(num_classes, r, world_size) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first C % W ranks hold one more
    assert sum(size == num_classes // world_size + 1 for size in sizes) == num_classes % world_size


def test_class_range_matches_the_design_formula():
    assert [class_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [class_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_class_range_rejects_bad_input():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than the world size 3"):
        class_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank 3 is not within world size 3"):
        class_range(10, 3, 3)


def test_bias_init_reference_values():
    assert initial_bias(8631, 0.7, 40.0, 0.4, 3.0, "C") == pytest.approx(5.78457, abs=1e-5)
    assert initial_bias(85742, 0.8, 64.0, 0.5, 3.0, "C") == pytest.approx(6.02725, abs=1e-5)


def test_discover_reads_torchrun_then_slurm():
    info = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.source) == (3, 8, 1, 2, "torchrun")
    info = discover({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.source) == (9, 16, 1, 8, "slurm")
    assert discover({}).source == "single" and discover({}).world_size == 1


def test_discover_rejects_inconsistent_variables():
    with pytest.raises(ValueError, match="rank 4 is not within world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "4"})


def test_the_gpu_is_the_local_rank_modulo_the_visible_gpus():
    from sf2dist.parallel import cuda_device_index

    # all 8 GPUs of a node visible: local rank r takes GPU r, even under torchrun on node 2
    info = discover({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert cuda_device_index(info, 8) == 1
    assert "LOCAL_RANK" in info.describe() and "rank 9 of 16" in info.describe()
    # srun with one GPU per task: SLURM_LOCALID 5, but the task sees one device, index 0
    info = discover({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"})
    assert cuda_device_index(info, 1) == 0 and cuda_device_index(info, 8) == 5
    assert "SLURM_LOCALID" in info.describe()
    # no local rank given: the global rank stands in, modulo the visible GPUs (never GPU 9 of 8)
    info = discover({"RANK": "9", "WORLD_SIZE": "16"})
    assert cuda_device_index(info, 8) == 1 and info.variables == ("RANK", "WORLD_SIZE")
    with pytest.raises(ValueError, match="no GPU is visible"):
        cuda_device_index(info, 0)
