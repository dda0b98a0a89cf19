"""The open-set benchmark: disjoint identity ranges, LFW-layout pair sets (the seen pairs of the
training identities' own shard images included), IJB-style templates, the same bytes for a seed
(whatever the number of workers), and its options."""
from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sf2dist.data import openset, read_manifest, synth
from sf2dist.data.openset import OpenSetSpec, generate, image_codes, identity_images, lfw_pairs, template_set
from sf2dist.data.shards import AlreadyConverted, load_index
from sf2dist.eval import ijb_metrics, load_bin, load_ijb
from sf2dist.eval.bin_io import read_bin

TINY = OpenSetSpec(train_identities=8, train_images=4, val_identities=6, test_identities=6, pair_images=4, pairs=12,
                   folds=2, templates_per_subject=2, images_per_template=2, size=32, jitter=0.35, seed=1,
                   shard_size=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("openset") / "tiny", TINY)


def read_tsv(path: Path) -> list[tuple[bool, int, int, int, int]]:
    with open(path) as f:
        return [(row["issame"] == "1", int(row["identity0"]), int(row["image0"]), int(row["identity1"]),
                 int(row["image1"])) for row in csv.DictReader(f, delimiter="\t")]


def digest(directory: Path) -> str:
    """One hash of every file's bytes except the creation times."""
    sha = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name in ("manifest.json", "openset.json"):
            continue
        sha.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return sha.hexdigest()


def test_training_validation_and_test_identities_are_disjoint(tiny):
    ranges = TINY.ranges
    assert set(ranges["train"]).isdisjoint(ranges["val"]) and set(ranges["val"]).isdisjoint(ranges["test"])
    manifest = read_manifest(tiny / "train")
    labels = np.concatenate([load_index(manifest, n)[:, 2] for n in range(len(manifest.shards))])
    assert manifest.num_classes == 8 and sorted(set(labels.tolist())) == list(ranges["train"])
    assert manifest.num_samples == 8 * 4
    for name in ("val", "test"):
        identities = {i for _, a, _, b, _ in read_tsv(tiny / f"{name}_pairs.tsv") for i in (a, b)}
        assert identities <= set(ranges[name]), (name, identities)
    protocol = load_ijb(tiny / "test_templates")
    template_identities = {int(p.name.split("_")[0]) for p in protocol.image_paths}
    assert template_identities == set(ranges["test"])
    # the templates show other images of the test identities than the pairs do
    assert min(int(p.stem.split("_")[1]) for p in protocol.image_paths) == TINY.pair_images


def test_seen_pairs_show_the_training_identities_own_shard_images(tiny):
    pairs = read_tsv(tiny / "seen_pairs.tsv")
    identities = {i for _, a, _, b, _ in pairs for i in (a, b)}
    assert identities <= set(TINY.ranges["train"]) and len(identities) > TINY.folds  # training identities only
    assert all(i < TINY.train_images and j < TINY.train_images for _, _, i, _, j in pairs)
    shard_jpegs = {}  # "IDENTITY_IMAGE" -> the bytes the training shards hold
    for shard in sorted((tiny / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            shard_jpegs.update({m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    seen = read_bin(tiny / "seen.bin")  # the project's safe reader, as every .bin is read
    jpegs, issame = [seen.sources[k] for k in seen.image_index], seen.issame.tolist()
    expected = [shard_jpegs[f"{identity:08d}_{image:04d}"] for _, a, i, b, j in pairs for identity, image in
                ((a, i), (b, j))]
    assert jpegs == expected and issame == [same for same, *_ in pairs]  # the very bytes, in pair order
    summary = json.loads((tiny / "openset.json").read_text())
    assert summary["files"]["seen"] == "seen.bin" and summary["counts"]["seen_pairs"] == TINY.pairs == 12


def test_pair_sets_have_lfw_layout_balance_and_no_repeats(tiny):
    for name in ("seen", "val", "test"):
        pairs = read_tsv(tiny / f"{name}_pairs.tsv")
        assert len(pairs) == 12 and sum(same for same, *_ in pairs) == 6
        assert load_bin(tiny / f"{name}.bin").issame.tolist() == [same for same, *_ in pairs]
        assert len(set(pairs)) == len(pairs)
        folds = [pairs[:6], pairs[6:]]  # 2 folds: 3 positive pairs, then 3 negative
        fold_identities = []
        for fold in folds:
            assert [same for same, *_ in fold] == [True] * 3 + [False] * 3
            for same, a, i, b, j in fold:
                assert (a == b and i != j) if same else a != b
            fold_identities.append({x for _, a, _, b, _ in fold for x in (a, b)})
        assert fold_identities[0].isdisjoint(fold_identities[1])  # thresholds are chosen on other people


def test_default_sizes_are_lfw_sized_with_enough_impostor_template_comparisons():
    spec = OpenSetSpec()
    pairs = lfw_pairs(spec.seed, "test", spec.test_identities, spec.pair_images, spec.pairs, spec.folds)
    assert len(pairs) == 6000 and sum(same for same, *_ in pairs) == 3000
    assert [same for same, *_ in pairs[:600]] == [True] * 300 + [False] * 300  # LFW's first fold
    genuine, impostor = spec.template_pair_counts
    assert impostor >= 100_000 and (genuine, impostor) == (500, 499_000)
    templates = template_set(spec)
    assert len(templates.pairs) == genuine + impostor and int(templates.labels.sum()) == genuine


def test_template_set_is_read_and_scored_by_the_ijb_evaluator(tiny):
    protocol = load_ijb(tiny / "test_templates")
    assert len(protocol.image_paths) == 6 * 2 * 2 and len(np.unique(protocol.template_ids)) == 12
    assert len(protocol.pairs) == 12 * 11 // 2 and int(protocol.pair_labels.sum()) == 6
    subject = {int(t): int(p.name.split("_")[0]) for t, p in zip(protocol.template_ids, protocol.image_paths)}
    assert all(label == (subject[a] == subject[b]) for (a, b), label in zip(protocol.pairs.tolist(),
                                                                            protocol.pair_labels.tolist()))
    # an embedding that is the identity's one-hot code verifies every template pair exactly
    identities = np.array([int(p.name.split("_")[0]) for p in protocol.image_paths])
    embeddings = np.eye(64)[identities - identities.min()]
    metrics, _ = ijb_metrics(protocol, embeddings)
    assert metrics["auc"] == 1.0 and metrics["num_templates"] == 12


def test_the_same_seed_gives_the_same_bytes_whatever_the_workers(tiny, tmp_path):
    again = generate(tmp_path / "again", TINY, workers=2)
    assert digest(again) == digest(tiny)
    other = generate(tmp_path / "other", OpenSetSpec(**{**TINY.__dict__, "seed": 2}))
    assert (other / "val.bin").read_bytes() != (tiny / "val.bin").read_bytes()


def test_a_finished_benchmark_is_recognised_and_not_rewritten(tiny):
    assert openset.is_generated(tiny, TINY)
    assert not openset.is_generated(tiny, OpenSetSpec(**{**TINY.__dict__, "jitter": 0.5}))
    with pytest.raises(AlreadyConverted):
        generate(tiny, TINY)


def test_jitter_zero_is_sf2dist_synth_and_jitter_varies_each_image_s_face():
    assert identity_images(4, 17, 3, 32, 0.0) == synth.identity_jpegs(4, 17, 3, 32)
    codes = image_codes(4, 17, 2000, 0.35)
    identity = synth.identity_codes(4, np.array([17]))[0]
    assert np.allclose(codes.mean(axis=0), identity, atol=0.05)
    assert np.allclose(codes.std(axis=0), 0.35, atol=0.03)
    assert np.array_equal(image_codes(4, 17, 5, 0.0), np.repeat(identity[None], 5, axis=0))
    assert identity_images(4, 17, 3, 32, 0.35) != synth.identity_jpegs(4, 17, 3, 32)


@pytest.mark.parametrize(("change", "message"), [
    ({"pairs": 15}, "multiple of 2 x folds"),
    ({"val_identities": 3}, "each fold of val.bin needs two identities"),
    ({"train_identities": 3}, r"train_identities \(3\) must be at least 2 x folds \(4\): each fold of seen.bin"),
    ({"train_images": 1}, "at least 2"),
    ({"jitter": -0.1}, "jitter"),
    ({"size": 8}, "size"),
])
def test_unusable_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        OpenSetSpec(**{**TINY.__dict__, **change})


def test_too_few_images_for_the_positive_pairs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="positive pairs"):
        lfw_pairs(0, "val", identities=4, images_per_identity=2, pairs=40, folds=2)
    # the seen pairs draw on the training images: refused before any image is rendered or written
    with pytest.raises(ValueError, match="fold 0 of the seen pairs needs 10 positive pairs but its 2 identities"):
        generate(tmp_path / "few", OpenSetSpec(**{**TINY.__dict__, "train_identities": 4, "train_images": 2,
                                                  "val_identities": 20, "pairs": 40}))
    assert not list((tmp_path / "few").glob("*.bin"))


def test_command_line_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        openset.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 1000)", "(default: 12)", "(default: 6000)", "(default: 0.2)", "(default: 48)",
                    "(default: 10)"):
        assert default in text
