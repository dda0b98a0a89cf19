"""Per-class label noise: exact counts per class, never the true label, fixed by the seed, the same
label for a sample on every rank layout, batch size and epoch."""
from __future__ import annotations

import numpy as np
import pytest

from sf2dist.data import make_loader
from sf2dist.data.loader import noisy_labels
from tests.data_helpers import write_shard_dir

# classes of 1 to 12 samples, interleaved as a converter might write them
SIZES = np.tile(np.arange(1, 13), 5)  # 60 classes, 390 samples
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)), SIZES))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8, 1 / 3])
def test_each_class_has_round_ratio_of_its_labels_replaced_by_other_classes(ratio):
    noisy = noisy_labels(LABELS, ratio, seed=3, num_classes=len(SIZES))
    changed = noisy != LABELS
    per_class = np.bincount(LABELS[changed], minlength=len(SIZES))
    assert np.array_equal(per_class, np.floor(ratio * SIZES + 0.5).astype(int))  # exact, rounded half up
    assert noisy.min() >= 0 and noisy.max() < len(SIZES)
    assert noisy.dtype == np.int64


def test_no_noise_changes_nothing():
    assert np.array_equal(noisy_labels(LABELS, 0.0, seed=3, num_classes=len(SIZES)), LABELS)


def test_the_noise_is_fixed_by_the_seed():
    first = noisy_labels(LABELS, 0.4, seed=7, num_classes=len(SIZES))
    assert np.array_equal(first, noisy_labels(LABELS, 0.4, seed=7, num_classes=len(SIZES)))
    other = noisy_labels(LABELS, 0.4, seed=8, num_classes=len(SIZES))
    assert not np.array_equal(first != LABELS, other != LABELS)  # other samples are changed


def test_replacement_classes_are_drawn_over_all_other_classes():
    labels = np.repeat(np.arange(50), 100)  # 5,000 samples; 4,000 replaced at 80 %
    noisy = noisy_labels(labels, 0.8, seed=1, num_classes=50)
    replaced = noisy[noisy != labels]
    counts = np.bincount(replaced, minlength=50)  # about 80 each
    assert counts.min() > 40 and counts.max() < 130, counts
    # and from one class to many: class 0's 80 replaced labels go to many different classes
    assert len(np.unique(noisy[(labels == 0) & (noisy != 0)])) > 30


def test_out_of_range_ratio_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        noisy_labels(LABELS, 1.0, seed=0, num_classes=len(SIZES))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("noise") / "shards"
    labels = [int(label) for label in LABELS[:120]]  # a prefix: some classes appear once or not at all
    write_shard_dir(out, [np.full((8, 8, 3), 100, dtype=np.uint8)] * len(labels), labels, shard_size=17,
                    num_classes=len(SIZES))
    return out, np.array(labels)


def _labels_by_sample(shard_dir, world_size: int, batch_size: int, epoch: int) -> dict[int, int]:
    seen = {}
    for rank in range(world_size):
        loader = make_loader(shard_dir, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=0,
                             seed=5, label_noise=0.5, epoch=epoch)
        for step in range(loader.batches_per_epoch):
            ids = loader.batches.sample_ids(epoch, step)
            for sample, label in zip(ids.tolist(), loader.batches.labels_of(ids).tolist()):
                assert seen.setdefault(sample, label) == label
    return seen


def test_a_sample_keeps_its_noisy_label_on_every_rank_layout_and_epoch(shard_dir):
    directory, true_labels = shard_dir
    expected = noisy_labels(true_labels, 0.5, seed=5, num_classes=len(SIZES))
    for world_size, batch_size, epoch in [(1, 16, 0), (3, 5, 0), (2, 7, 4)]:
        seen = _labels_by_sample(directory, world_size, batch_size, epoch)
        assert sorted(seen) == list(range(len(true_labels)))
        assert [seen[i] for i in range(len(true_labels))] == expected.tolist()
    # what the loader yields is that table, batch by batch
    loader = make_loader(directory, batch_size=16, rank=1, world_size=2, num_workers=0, seed=5, label_noise=0.5)
    for step, (_, labels) in enumerate(loader):
        ids = loader.batches.sample_ids(0, step)
        assert labels.tolist() == expected[ids].tolist()
