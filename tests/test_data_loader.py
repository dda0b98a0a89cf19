"""The loader's split: exact coverage, equal batch counts, seeded order, resume, flips, noise."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from sf2dist.data import make_loader, read_manifest
from sf2dist.data.loader import EpochBatches, EpochOrder, ShardLoader
from sf2dist.data.shards import load_index
from sf2dist.imageio import decode_image, normalize_batch, to_tensor
from tests.data_helpers import write_shard_dir

SIZE = 16
NUM_SAMPLES = 50  # 3 shards of <= 20: fewer shards than ranks x workers


def coded_image(label: int) -> np.ndarray:
    """A flat colour that encodes the label, darker on the left so that flips are visible."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = (40 + 3 * label, 200 - 3 * label, 120)
    image[:, : SIZE // 2] -= 30
    return image


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "shards"
    labels = list(range(NUM_SAMPLES))  # one class per sample: labels name the samples
    write_shard_dir(out, [coded_image(n) for n in labels], labels, shard_size=20, num_classes=NUM_SAMPLES)
    return out


def decoded_samples(shard_dir) -> list[np.ndarray]:
    """Every sample's image, decoded straight from the shard bytes, in shard order."""
    manifest = read_manifest(shard_dir)
    images = []
    for number, shard in enumerate(manifest.shards):
        data = (shard_dir / shard.tar).read_bytes()
        images += [decode_image(data[offset:offset + size]) for offset, size, _ in load_index(manifest, number).tolist()]
    return images


def run_epoch(shard_dir, *, world_size=2, batch_size=4, num_workers=2, seed=7, epoch=0, **options):
    """Every rank's batches of one epoch: {rank: [(images, labels), ...]}."""
    out = {}
    for rank in range(world_size):
        loader = make_loader(shard_dir, batch_size=batch_size, rank=rank, world_size=world_size,
                             num_workers=num_workers, seed=seed, epoch=epoch, **options)
        out[rank] = list(loader)
        assert len(out[rank]) == len(loader)
    return out


def global_order(batches) -> list[int]:
    """Labels in global-batch order: step 0 of rank 0, step 0 of rank 1, step 1 of rank 0, ..."""
    steps = len(batches[0])
    return [label for t in range(steps) for rank in sorted(batches) for label in batches[rank][t][1].tolist()]


def test_two_ranks_two_workers_cover_the_epoch_once_with_documented_padding(shard_dir):
    batches = run_epoch(shard_dir, flip=False)
    steps = math.ceil(NUM_SAMPLES / (2 * 4))
    assert len(batches[0]) == len(batches[1]) == steps == 7
    for rank_batches in batches.values():
        for images, labels in rank_batches:
            assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
            assert labels.dtype == torch.int64
            assert images.min() >= -1 and images.max() <= 1
            # each image is the one its label names
            expected = torch.stack([torch.from_numpy(coded_image(n)).permute(2, 0, 1) for n in labels.tolist()])
            assert (images * 127.5 + 127.5 - expected.float()).abs().max() < 3

    order = global_order(batches)
    padding = steps * 2 * 4 - NUM_SAMPLES
    assert sorted(order[:NUM_SAMPLES]) == list(range(NUM_SAMPLES))  # every sample exactly once
    assert order[NUM_SAMPLES:] == order[:padding]  # then the epoch's first samples again


class ProcessTaggedBatches(EpochBatches):
    """EpochBatches whose batches also carry the id of the process that built them."""

    def __getitem__(self, key):
        images, labels = super().__getitem__(key)
        return images, labels, os.getpid()


def test_worker_processes_build_the_batches(shard_dir):
    reference = run_epoch(shard_dir, flip=False)
    for rank in range(2):
        batches = ProcessTaggedBatches(read_manifest(shard_dir), batch_size=4, rank=rank, world_size=2, seed=7,
                                       flip=False, label_noise=0.0)
        loader = ShardLoader(batches, epoch=0, start_step=0, num_workers=2, pin_memory=False, prefetch_factor=2)
        tagged = list(loader.uint8_batches())
        builders = {pid for _, _, pid in tagged}
        assert len(builders) == 2 and os.getpid() not in builders  # two real worker processes
        assert [labels.tolist() for _, labels, _ in tagged] == [labels.tolist() for _, labels in reference[rank]]


def test_order_is_seeded_by_seed_and_epoch_and_independent_of_workers(shard_dir):
    reference = global_order(run_epoch(shard_dir, num_workers=2, flip=False))
    assert global_order(run_epoch(shard_dir, num_workers=0, flip=False)) == reference
    next_epoch = global_order(run_epoch(shard_dir, epoch=1, flip=False))
    assert next_epoch != reference and sorted(next_epoch[:NUM_SAMPLES]) == list(range(NUM_SAMPLES))
    assert global_order(run_epoch(shard_dir, seed=8, flip=False)) != reference


def test_set_epoch_and_resume_mid_epoch(shard_dir):
    loader = make_loader(shard_dir, batch_size=4, rank=1, world_size=2, num_workers=2, seed=3, epoch=0)
    epoch0 = list(loader)
    loader.set_epoch(1)
    epoch1 = list(loader)
    assert [b[1].tolist() for b in epoch1] == [b[1].tolist() for b in run_epoch(shard_dir, seed=3, epoch=1)[1]]

    resumed = make_loader(shard_dir, batch_size=4, rank=1, world_size=2, num_workers=2, seed=3, epoch=0, start_step=5)
    assert len(resumed) == len(epoch0) - 5 and resumed.batches_per_epoch == len(epoch0)
    for (images, labels), (images_ref, labels_ref) in zip(resumed, epoch0[5:], strict=True):
        assert torch.equal(labels, labels_ref) and torch.equal(images, images_ref)  # flips included
    with pytest.raises(ValueError, match="start_step=8 is outside the 7 steps"):
        loader.set_epoch(0, start_step=8)


def test_flips_mirror_about_half_of_the_images(shard_dir):
    plain = run_epoch(shard_dir, world_size=1, batch_size=NUM_SAMPLES, num_workers=0, flip=False)[0][0]
    flipped = run_epoch(shard_dir, world_size=1, batch_size=NUM_SAMPLES, num_workers=0, flip=True)[0][0]
    assert torch.equal(plain[1], flipped[1])
    mirrored = [not torch.equal(a, b) for a, b in zip(plain[0], flipped[0])]
    for a, b, was_mirrored in zip(plain[0], flipped[0], mirrored):
        assert torch.equal(b, a.flip(-1) if was_mirrored else a)
    assert 15 <= sum(mirrored) <= 35
    # bit for bit what sf2dist.imageio prepares for evaluation, flipped or not
    decoded = decoded_samples(shard_dir)
    for image, label, was_mirrored in zip(flipped[0], flipped[1].tolist(), mirrored):
        source = decoded[label]  # one class per sample: the label is the sample number
        assert torch.equal(image, to_tensor(source[:, ::-1] if was_mirrored else source))


def test_fewer_samples_than_one_global_batch(tmp_path):
    write_shard_dir(tmp_path, [coded_image(n) for n in range(5)], list(range(5)), shard_size=5, num_classes=5)
    batches = run_epoch(tmp_path, world_size=2, batch_size=4, num_workers=2)
    assert len(batches[0]) == len(batches[1]) == 1
    order = global_order(batches)
    assert sorted(order[:5]) == list(range(5)) and order[5:] == order[:3]


def test_damaged_samples_are_replaced_by_the_next_with_a_warning(tmp_path):
    write_shard_dir(tmp_path, [coded_image(n) for n in range(10)], list(range(10)), shard_size=5, num_classes=10)
    manifest = read_manifest(tmp_path)
    offset3, size3, _ = load_index(manifest, 0)[3].tolist()
    offset9, size9, _ = load_index(manifest, 1)[4].tolist()
    with open(tmp_path / manifest.shards[0].tar, "r+b") as tar:  # sample 3: garbage bytes
        tar.seek(offset3)
        tar.write(b"\0" * size3)
    with open(tmp_path / manifest.shards[1].tar, "r+b") as tar:  # sample 9: the shard ends inside it
        tar.truncate(offset9 + size9 // 2)
    loader = make_loader(tmp_path, batch_size=10, rank=0, world_size=1, num_workers=0, seed=0, flip=False)
    with pytest.warns(UserWarning) as caught:
        (images, labels), = list(loader)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert f"shard-000000.tar: sample at byte offset {offset3} is unreadable" in messages[0]
    assert f"shard-000001.tar: sample at byte offset {offset9} is unreadable (shard ends" in messages[1]
    # sample 3 is replaced by 4, sample 9 by 0 (wrapping around): batch size and labels stay valid
    assert images.shape == (10, 3, SIZE, SIZE)
    assert sorted(labels.tolist()) == [0, 0, 1, 2, 4, 4, 5, 6, 7, 8]
    for image, label in zip(images, labels.tolist()):
        expected = torch.from_numpy(coded_image(label)).permute(2, 0, 1).float()
        assert (image * 127.5 + 127.5 - expected).abs().max() < 3


def test_num_classes_is_checked_against_the_manifest(shard_dir):
    with pytest.raises(ValueError, match=r"num_classes=51 does not match the 50 classes of .*manifest.json"):
        make_loader(shard_dir, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, num_classes=51)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        make_loader(shard_dir, batch_size=4, rank=2, world_size=2, num_workers=0, seed=0)


def test_label_noise_replaces_the_given_fraction_with_other_classes(tmp_path):
    num_samples, num_classes = 2000, 100
    labels = [n % num_classes for n in range(num_samples)]
    write_shard_dir(tmp_path, [coded_image(0)[:8, :8]] * num_samples, labels, shard_size=500, num_classes=num_classes)
    loader = make_loader(tmp_path, batch_size=num_samples, rank=0, world_size=1, num_workers=0, seed=1, label_noise=0.3)
    ids = loader.batches.sample_ids(epoch=0, step=0)
    noisy = loader.batches.labels_of(ids)
    changed = noisy != ids % num_classes
    assert 0.26 < changed.mean() < 0.34
    assert noisy.min() >= 0 and noisy.max() < num_classes
    # a fixed corruption of the dataset: the same in every epoch and every loader
    ids_next = loader.batches.sample_ids(epoch=1, step=0)
    assert np.array_equal(loader.batches.labels_of(ids_next)[np.argsort(ids_next)], noisy[np.argsort(ids)])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_epoch_order_is_a_permutation(n):
    order = EpochOrder(n, seed=5, epoch=2)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))


def test_workers_ship_uint8_and_the_loader_normalises_whole_batches(shard_dir):
    loader = make_loader(shard_dir, batch_size=4, rank=0, world_size=1, num_workers=2, seed=7)
    raw = list(loader.uint8_batches())
    normalised = list(loader)
    assert len(raw) == len(normalised) == loader.batches_per_epoch
    for (pixels, labels), (images, labels_again) in zip(raw, normalised):
        assert pixels.dtype == torch.uint8 and pixels.shape == (4, SIZE, SIZE, 3)
        assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE) and images.is_contiguous()
        assert torch.equal(labels, labels_again)
        assert torch.equal(images, torch.stack([to_tensor(p.numpy()) for p in pixels]))
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_normalize_batch_refuses_what_is_not_a_uint8_rgb_batch():
    with pytest.raises(ValueError, match=r"expected uint8 images \[b, H, W, 3\], got torch.float32"):
        normalize_batch(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(2, 3, 8, 8\)"):
        normalize_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("encode", ["jpeg", "png"])
def test_decoding_into_a_buffer_gives_the_same_pixels(encode):
    import io

    from PIL import Image

    from sf2dist.imageio import encode_jpeg

    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    if encode == "jpeg":
        data = encode_jpeg(image)
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        data = buffer.getvalue()
    out = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    assert decode_image(data, out) is out
    assert np.array_equal(out, decode_image(data))
    wrong = np.zeros((SIZE, SIZE + 1, 3), dtype=np.uint8)
    other = decode_image(data, wrong)  # another shape: a new array, the buffer untouched
    assert other.shape == (SIZE, SIZE, 3) and not wrong.any()


WORKERS_THEN_CRASH = """
import os, signal, sys, time
from sf2dist.data import make_loader
loader = make_loader(sys.argv[1], batch_size=4, rank=0, world_size=1, num_workers=2, seed=7)
batches = iter(loader)
next(batches), next(batches)  # batches go to the workers in turn: both have started
workers = [child.pid for child in __import__("multiprocessing").active_children()]
for pid in workers:  # what SLURM does to every process of a job step: the workers must live on
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGUSR1)
time.sleep(0.5)
next(batches)
print("workers", len(workers), flush=True)
raise RuntimeError("a crash while the workers are up")
"""


def test_workers_ignore_stop_signals_and_never_keep_a_crashed_process_alive(shard_dir):
    """Workers outlive SIGTERM/SIGUSR1 sent to them, yet a process that fails with its workers
    up exits (Python's exit handler ends daemonic workers with SIGTERM and then waits for them)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", WORKERS_THEN_CRASH, str(shard_dir)], capture_output=True,
                            text=True, timeout=60)
    assert "workers 2" in result.stdout, result.stderr
    assert result.returncode == 1 and "a crash while the workers are up" in result.stderr
    assert "killed by signal" not in result.stderr and "exited unexpectedly" not in result.stderr, result.stderr
