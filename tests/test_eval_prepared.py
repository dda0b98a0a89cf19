"""Benchmarks prepared once per run: the same numbers as decoding everything, from only each rank's images.

The reference is the path that decodes every image on every rank (`load_pairs` +
`extract_embeddings`, i.e. `evaluate_pairs`; `load_ijb` + `IJBImages` for IJB directories).
Decodes are counted by wrapping `decode_image` where `bin_io` and `ijb` look it up.
"""
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import sf2dist.eval.bin_io as bin_io
import sf2dist.eval.evaluate as evaluate_module
import sf2dist.eval.ijb as ijb
from sf2dist.data.synth import generate
from sf2dist.eval import (
    BenchmarkFormatError,
    ExtractOptions,
    IJBImages,
    evaluate_benchmark,
    evaluate_pairs,
    evaluate_prepared,
    extract_embeddings,
    ijb_metrics,
    image_slice,
    load_ijb,
    load_pairs,
    prepare_benchmark,
)
from sf2dist.imageio import encode_jpeg
from tests.distributed import run_on_ranks
from tests.test_eval_ijb import SYNTHETIC_FACES, SYNTHETIC_PAIRS, write_ijb

BATCH_SIZE = 16  # 200 images: 100 per rank on two ranks, in batches of 16 with a short last one


class PooledCNN(nn.Module):
    """A small backbone for any input size, with batch norm, not mirror-symmetric."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 8, 3, stride=2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * 2 * 2, dim)
        with torch.no_grad():  # statistics that are not the identity, so eval mode matters
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    """The synthetic generator's held-out set: 100 pairs (200 JPEGs) of 32x32 faces."""
    out = generate(tmp_path_factory.mktemp("synth"), identities=2, images_per_identity=4, holdout_identities=20,
                   pairs=100, size=32, workers=0)
    return out / "holdout.bin"


@pytest.fixture(scope="module")
def ijb_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "SYN"
    write_ijb(root, SYNTHETIC_FACES, SYNTHETIC_PAIRS, probes=[(3, 3), (4, 1), (5, 2)], galleries={"G1": [(1, 1), (2, 2)]})
    return root


class DecodeCounter:
    """Wraps `decode_image` in the modules that look it up; `count` is the number of calls."""

    def __init__(self, monkeypatch=None) -> None:
        self.count = 0
        real = bin_io.decode_image

        def counted(data, *args, **kwargs):
            self.count += 1
            return real(data, *args, **kwargs)

        for module in (bin_io, ijb):
            if monkeypatch is not None:
                monkeypatch.setattr(module, "decode_image", counted)
            else:  # a spawned rank: the process ends with the test
                module.decode_image = counted


def without_time(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "extract_seconds"}


def captured_pair_embeddings(calls: list):
    """`pair_metrics` as the evaluate module calls it, recording the embeddings it is given."""
    real = evaluate_module.pair_metrics

    def recording(first, second, issame):
        calls.append(torch.from_numpy(np.concatenate([first, second], axis=1)))
        return real(first, second, issame)

    return recording


def _prepared_on_rank(rank: int, world_size: int, bin_path, ijb_path) -> dict:
    counter = DecodeCounter()
    embeddings: list = []
    evaluate_module.pair_metrics = captured_pair_embeddings(embeddings)
    model, options = PooledCNN(), ExtractOptions(batch_size=BATCH_SIZE)

    prepared = prepare_benchmark(bin_path, rank=rank, world_size=world_size, image_size=(32, 32))
    decoded_preparing = counter.count
    first = evaluate_prepared(model, prepared, options)
    second = evaluate_prepared(model, prepared, options)
    decoded_evaluating = counter.count - decoded_preparing
    reference = evaluate_pairs(model, bin_path, options)  # decodes every image on every rank
    through_benchmark = evaluate_benchmark(model, bin_path, options)

    prepared_ijb = prepare_benchmark(ijb_path, rank=rank, world_size=world_size)
    counter.count = 0
    ijb_result = evaluate_prepared(model, prepared_ijb, options)
    ijb_decoded_evaluating = counter.count
    protocol = load_ijb(ijb_path)
    ijb_reference, _ = ijb_metrics(protocol, extract_embeddings(model, IJBImages(protocol), batch_size=BATCH_SIZE))
    return {
        "slice": [prepared.image_start, prepared.image_stop],
        "decoded_preparing": decoded_preparing,
        "decoded_evaluating": decoded_evaluating,
        "metrics": [without_time(r.metrics) for r in (first, second, through_benchmark)],
        "reference": without_time(reference),
        "names": [first.name, first.kind, through_benchmark.name],
        "embeddings": embeddings,  # prepared twice, reference, through evaluate_benchmark
        "ijb_slice": [prepared_ijb.image_start, prepared_ijb.image_stop],
        "ijb_decoded_evaluating": ijb_decoded_evaluating,
        "ijb": without_time(ijb_result.metrics),
        "ijb_reference": ijb_reference,
    }


@pytest.mark.parametrize("world_size", (1, 2))
def test_prepared_benchmark_matches_decoding_everything(holdout, ijb_dir, world_size):
    results = run_on_ranks(_prepared_on_rank, world_size, holdout, ijb_dir)
    for rank, result in enumerate(results):
        start, stop = image_slice(200, rank, world_size)
        assert result["slice"] == [start, stop]
        assert result["decoded_preparing"] == stop - start  # its own slice, each image once
        assert result["decoded_evaluating"] == 0  # the decoded slice is kept
        assert result["names"] == ["holdout", "pairs", "holdout"]
        assert result["metrics"] == [result["reference"]] * 3, f"rank {rank}"
        assert 0.0 < result["reference"]["accuracy"] < 1.0 and result["reference"]["num_pairs"] == 100
        prepared, again, reference, through_benchmark = result["embeddings"]
        assert torch.equal(prepared, reference) and torch.equal(again, reference)  # bit for bit
        assert torch.equal(through_benchmark, reference)
        assert torch.equal(reference, results[0]["embeddings"][2])  # every rank holds every embedding
        assert result["ijb_slice"] == list(image_slice(len(SYNTHETIC_FACES), rank, world_size))
        assert result["ijb_decoded_evaluating"] == 0
        assert result["ijb"] == result["ijb_reference"]


def write_pair_list(root, lines: list[str]):
    for index, colour in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (128, 128, 20)]):
        (root / f"{index}.jpg").write_bytes(encode_jpeg(np.full((16, 16, 3), colour, dtype=np.uint8)))
    path = root / "pairs.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_rank_decodes_only_the_distinct_images_of_its_slice_of_a_pair_list(tmp_path, monkeypatch):
    # 12 pairs over 4 files: 24 images, most of them repeats.
    lines = [f"{1 - i % 2} {i % 4}.jpg {(i + i % 2) % 4}.jpg" for i in range(12)]
    path = write_pair_list(tmp_path, ["# label path0 path1", *lines])
    everything = load_pairs(path)
    counter = DecodeCounter(monkeypatch)
    for world_size in (1, 2, 5):
        for rank in range(world_size):
            counter.count = 0
            prepared = prepare_benchmark(path, rank=rank, world_size=world_size)
            start, stop = image_slice(24, rank, world_size)
            np.testing.assert_array_equal(prepared.images, everything.images[start:stop])
            np.testing.assert_array_equal(prepared.issame, everything.issame)
            assert counter.count == len({image.tobytes() for image in everything.images[start:stop]})
    model = PooledCNN()
    expected = evaluate_pairs(model, path, ExtractOptions(batch_size=5))
    result = evaluate_prepared(model, prepare_benchmark(path), ExtractOptions(batch_size=5))
    assert without_time(result.metrics) == without_time(expected)


def test_an_ijb_rank_reads_and_aligns_only_its_slice(ijb_dir, monkeypatch):
    images = IJBImages(load_ijb(ijb_dir))
    counter = DecodeCounter(monkeypatch)
    for rank in range(3):
        counter.count = 0
        prepared = prepare_benchmark(ijb_dir, rank=rank, world_size=3, image_size=(112, 112))
        assert (prepared.name, prepared.kind, prepared.num_images) == ("SYN", "ijb", 9)
        assert counter.count == 3
        np.testing.assert_array_equal(prepared.images, np.stack([images[i] for i in range(3 * rank, 3 * rank + 3)]))


def write_bin(path, images, issame):
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


def faces(count, size=16):
    return [encode_jpeg(np.full((size, size, 3), 12 * i, dtype=np.uint8)) for i in range(count)]


def test_a_benchmark_without_pairs_is_refused_when_prepared(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.bin: needs an even, non-zero number of images .* found 0"):
        prepare_benchmark(write_bin(tmp_path / "empty.bin", [], []))
    (tmp_path / "empty.txt").write_text("# label path0 path1\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no pairs found"):
        prepare_benchmark(tmp_path / "empty.txt")


def test_broken_benchmarks_are_refused_when_prepared(tmp_path):
    labels = [i % 2 == 0 for i in range(10)]
    with pytest.raises(ValueError, match=r"few\.bin: 4 pairs; 10-fold accuracy needs at least 10"):
        prepare_benchmark(write_bin(tmp_path / "few.bin", faces(8), labels[:4]))
    with pytest.raises(ValueError, match=r"same\.bin: all 10 pairs are same-identity pairs"):
        prepare_benchmark(write_bin(tmp_path / "same.bin", faces(20), [True] * 10))
    mixed = faces(19) + faces(1, size=24)
    path = write_bin(tmp_path / "mixed.bin", mixed, labels)
    # Only the rank whose slice holds the odd image decodes it; with image_size every rank checks the size.
    prepare_benchmark(path, rank=0, world_size=2)
    with pytest.raises(BenchmarkFormatError, match=r"mixed\.bin: image 19: image is 24x24 but the first one is 16x16"):
        prepare_benchmark(path, rank=1, world_size=2)
    with pytest.raises(BenchmarkFormatError, match=r"mixed\.bin: image 0: image is 16x16 but the model takes 24x24"):
        prepare_benchmark(path, rank=0, world_size=2, image_size=(24, 24))
    corrupt = write_bin(tmp_path / "corrupt.bin", faces(19) + [b"\xff\xd8 not a jpeg"], labels)
    with pytest.raises(BenchmarkFormatError, match=r"corrupt\.bin: image 19: cannot decode image"):
        prepare_benchmark(corrupt)
    with pytest.raises(ValueError, match=r"ok\.bin: cannot split 20 images over 32 ranks"):
        prepare_benchmark(write_bin(tmp_path / "ok.bin", faces(20), labels), rank=0, world_size=32)


def test_a_benchmark_prepared_for_another_rank_is_refused(tmp_path):
    prepared = prepare_benchmark(write_bin(tmp_path / "ok.bin", faces(20), [i % 2 == 0 for i in range(10)]),
                                 rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"ok\.bin was prepared for rank 1 of 2 but is evaluated on rank 0 of 1"):
        evaluate_prepared(PooledCNN(), prepared)
