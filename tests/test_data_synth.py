"""Synthetic identities: deterministic for a seed, held-out identities disjoint from training."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from sf2dist.data import make_loader, read_manifest, synth
from sf2dist.data.shards import OutputDirError, load_index
from sf2dist.imageio import decode_image

OPTIONS = dict(identities=5, images_per_identity=3, holdout_identities=4, pairs=12, size=48, shard_size=7)


def read_all(out):
    """(training JPEGs, training labels, held-out bin, pair table) of a synthetic set."""
    manifest = read_manifest(out / "train")
    jpegs, labels = [], []
    for number, shard in enumerate(manifest.shards):
        index = load_index(manifest, number)
        data = (out / "train" / shard.tar).read_bytes()
        jpegs += [data[offset:offset + size] for offset, size, _ in index.tolist()]
        labels += index[:, 2].tolist()
    holdout = pickle.loads((out / "holdout.bin").read_bytes())
    pairs = (out / "holdout_pairs.tsv").read_text().splitlines()[1:]
    return jpegs, labels, holdout, [[int(field) for field in line.split("\t")] for line in pairs]


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    first = read_all(synth.generate(tmp_path / "a", seed=3, workers=0, **OPTIONS))
    again = read_all(synth.generate(tmp_path / "b", seed=3, workers=2, **OPTIONS))
    other = read_all(synth.generate(tmp_path / "c", seed=4, workers=0, **OPTIONS))
    assert first == again
    assert first[0] != other[0] and first[2][0] != other[2][0]


def test_layout_labels_and_disjoint_holdout(tmp_path):
    out = synth.generate(tmp_path / "s", seed=0, **OPTIONS)
    jpegs, labels, (pair_jpegs, issame), pairs = read_all(out)
    manifest = read_manifest(out / "train")
    assert manifest.num_classes == 5 and manifest.num_samples == 15 and manifest.image_size == (48, 48)
    assert labels == [i for i in range(5) for _ in range(3)]
    assert decode_image(jpegs[0]).shape == (48, 48, 3)

    # holdout.bin: protocol-4 pickle of (list of JPEG bytes, list of bools), pair i = images 2i, 2i+1
    assert (out / "holdout.bin").read_bytes()[:2] == b"\x80\x04"
    assert len(pair_jpegs) == 24 and all(isinstance(j, bytes) for j in pair_jpegs)
    assert issame == [bool(p[0]) for p in pairs] and sum(issame) == 6
    held_out = {p[1] for p in pairs} | {p[3] for p in pairs}
    assert held_out <= set(range(5, 9)) and held_out.isdisjoint(labels)
    assert all((p[1] == p[3]) == bool(p[0]) for p in pairs)
    assert set(pair_jpegs).isdisjoint(jpegs)

    # the training set loads
    images, batch_labels = next(iter(make_loader(out / "train", batch_size=4, rank=0, world_size=1,
                                                 num_workers=0, seed=0, num_classes=5)))
    assert images.shape == (4, 3, 48, 48) and set(batch_labels.tolist()) <= set(range(5))


def test_images_vary_within_an_identity(tmp_path):
    codes = synth.identity_codes(0, np.arange(3))
    assert codes.shape == (3, synth.LATENT_DIM) and not np.allclose(codes[0], codes[1])
    images = [decode_image(j).astype(np.float32) for j in synth.identity_jpegs(0, identity=1, count=4, size=64)]
    assert all(np.abs(images[0] - other).mean() > 10 for other in images[1:])
    # a fixed JPEG quality changes only the compression, not the images drawn
    fixed = synth.identity_jpegs(0, identity=1, count=4, size=64, quality=95)
    assert fixed == synth.identity_jpegs(0, identity=1, count=4, size=64, quality=95)
    for k, jpeg in enumerate(fixed):  # each is nearest to the same image at its drawn quality
        distances = [np.abs(decode_image(jpeg).astype(np.float32) - image).mean() for image in images]
        assert int(np.argmin(distances)) == k and distances[k] < 8


def test_rerun_into_a_finished_set_is_refused(tmp_path):
    synth.generate(tmp_path / "s", seed=0, **OPTIONS)
    with pytest.raises(OutputDirError, match="already holds a finished conversion of this source"):
        synth.generate(tmp_path / "s", seed=0, **OPTIONS)
    synth.generate(tmp_path / "s", seed=1, overwrite=True, **OPTIONS)
    assert read_manifest(tmp_path / "s" / "train").source["seed"] == 1
