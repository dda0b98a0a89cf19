"""Flip-test fusion: sum, concat ([f(x), f(flip(x))], twice the width) and none, on 1 and 2 ranks.

The references embed with the model directly (`to_tensor`, eval mode, `Tensor.flip(3)`) and
score with `pair_metrics` / `ijb_metrics` on vectors built by hand, so the pipeline's
fusion, gather and scoring are each checked against an independent computation.
"""
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sf2dist.eval import (
    ExtractOptions,
    IJBImages,
    cosine_scores,
    evaluate_benchmark,
    evaluate_pairs,
    evaluate_prepared,
    extract_embeddings,
    ijb_metrics,
    load_ijb,
    load_pairs,
    pair_metrics,
    prepare_benchmark,
    roc_curve,
)
from sf2dist.eval.cli import build_parser, main
from sf2dist.imageio import encode_jpeg, to_tensor
from tests.distributed import run_on_ranks
from tests.test_eval_cli import registry, write_checkpoint, write_pairs  # noqa: F401  (registry is a fixture)
from tests.test_eval_extract import TinyCNN, faces
from tests.test_eval_ijb import SYNTHETIC_FACES, SYNTHETIC_PAIRS, write_ijb
from tests.test_eval_prepared import PooledCNN

DIM = 8  # PooledCNN's embedding width
NUM_PAIR_IMAGES = 60  # 30 pairs; 30 images per rank on two ranks, in whole batches of BATCH_SIZE
BATCH_SIZE = 10


def direct_embeddings(model, images) -> tuple[np.ndarray, np.ndarray]:
    """f(x) and f(flip(x)) of every image, [N, dim] each, computed without sf2dist.eval."""
    model.eval()
    batch = torch.stack([to_tensor(np.asarray(image)) for image in images])
    with torch.no_grad():
        return model(batch).numpy(), model(batch.flip(3)).numpy()


def normalized(embeddings: np.ndarray) -> np.ndarray:
    embeddings = embeddings.astype(np.float64)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def without_time(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "extract_seconds"}


def assert_metrics_close(actual: dict, expected: dict) -> None:
    """Equal keys; numbers equal to 1e-9 (the embeddings may differ in the last float32 bits)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_metrics_close(actual[key], value)
        elif value is None or isinstance(value, (int, str)):
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-9), key


@pytest.fixture(scope="module")
def pair_bin(tmp_path_factory):
    """30 pairs of 16x16 faces, hard enough that no figure saturates: a positive's second face
    is half the first and half noise, a negative's an unrelated face."""
    rng = np.random.default_rng(3)
    images, issame = [], []
    for i in range(NUM_PAIR_IMAGES // 2):
        first, other = rng.integers(0, 256, (2, 16, 16, 3))
        same = i % 2 == 0
        second = (first + other) // 2 if same else other
        images += [encode_jpeg(first.astype(np.uint8)), encode_jpeg(second.astype(np.uint8))]
        issame.append(same)
    path = tmp_path_factory.mktemp("pairs") / "pairs.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


@pytest.fixture(scope="module")
def ijb_dir(tmp_path_factory):
    """The synthetic IJB layout of test_eval_ijb with random (not mirror-symmetric) faces."""
    root = tmp_path_factory.mktemp("ijb") / "SYN"
    write_ijb(
        root, SYNTHETIC_FACES, SYNTHETIC_PAIRS, probes=[(3, 3), (4, 1), (5, 2)], galleries={"G1": [(1, 1), (2, 2)]}
    )
    rng = np.random.default_rng(5)
    for index in range(len(SYNTHETIC_FACES)):  # the reference landmarks keep alignment the identity
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / "loose_crop" / f"{index}.png")
    return root


def test_concat_is_the_embedding_of_the_image_then_of_its_mirror():
    model, images = TinyCNN(dim=16), faces(7)
    concat = extract_embeddings(model, images, batch_size=3, flip="concat")
    assert concat.shape == (7, 32) and concat.dtype == np.float32  # the width doubles
    plain, mirrored = direct_embeddings(model, images)
    np.testing.assert_allclose(concat, np.concatenate([plain, mirrored], axis=1), rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain, mirrored, atol=1e-3)  # the mirror image really is a second input
    summed = extract_embeddings(model, images, batch_size=3, flip="sum")
    np.testing.assert_allclose(summed, concat[:, :16] + concat[:, 16:], rtol=1e-5, atol=1e-5)


def test_none_is_the_plain_embedding_and_the_old_booleans_still_work():
    model, images = TinyCNN(dim=16), faces(7)
    none = extract_embeddings(model, images, batch_size=3, flip="none")
    np.testing.assert_allclose(none, direct_embeddings(model, images)[0], rtol=1e-5, atol=1e-5)
    assert none.shape == (7, 16)
    np.testing.assert_array_equal(extract_embeddings(model, images, batch_size=3, flip=False), none)
    np.testing.assert_array_equal(
        extract_embeddings(model, images, batch_size=3, flip=True), extract_embeddings(model, images, batch_size=3)
    )
    assert ExtractOptions().flip == "sum"
    assert (ExtractOptions(flip=True).flip, ExtractOptions(flip=False).flip) == ("sum", "none")
    assert ExtractOptions(flip="concat") == ExtractOptions(flip="concat")


@pytest.mark.parametrize("bad", ["mean", "Concat", "", None, 1, 0])
def test_an_unknown_flip_is_refused(bad):
    with pytest.raises(ValueError, match=re.escape(f"flip must be one of 'sum', 'concat', 'none', got {bad!r}")):
        ExtractOptions(flip=bad)
    with pytest.raises(ValueError, match="flip must be one of"):
        extract_embeddings(TinyCNN(), faces(2), flip=bad)


def test_concat_accuracy_is_scored_on_the_whole_concatenated_vector(pair_bin):
    model, pairs = PooledCNN(), load_pairs(pair_bin)
    options = ExtractOptions(batch_size=NUM_PAIR_IMAGES, flip="concat")
    result = evaluate_benchmark(model, pair_bin, options)
    plain, mirrored = direct_embeddings(model, pairs.images)
    concat = normalized(np.concatenate([plain, mirrored], axis=1))  # [N, 2 * dim], unit rows
    expected = pair_metrics(concat[0::2], concat[1::2], pairs.issame)
    assert_metrics_close(without_time(result.metrics), expected)
    assert 0.0 < expected["accuracy"] < 1.0
    expected_roc = roc_curve(cosine_scores(concat[0::2], concat[1::2]), pairs.issame)
    np.testing.assert_allclose(result.roc.thresholds[1:], expected_roc.thresholds[1:], atol=1e-6)  # [0] is +inf
    np.testing.assert_array_equal(result.roc.tar, expected_roc.tar)
    # not the sum's numbers, nor each half normalised on its own
    summed = normalized(plain + mirrored)
    assert result.metrics["auc"] != pytest.approx(pair_metrics(summed[0::2], summed[1::2], pairs.issame)["auc"])
    halves = np.concatenate([normalized(plain), normalized(mirrored)], axis=1)
    assert not np.allclose(cosine_scores(halves[0::2], halves[1::2]), cosine_scores(concat[0::2], concat[1::2]))
    # the prepared path (training's) and evaluate_pairs give the same numbers
    prepared = evaluate_prepared(model, prepare_benchmark(pair_bin), options)
    assert without_time(prepared.metrics) == without_time(result.metrics)
    assert without_time(evaluate_pairs(model, pair_bin, options)) == without_time(result.metrics)


def test_concat_on_an_ijb_directory_pools_the_concatenated_embeddings(ijb_dir):
    model, protocol = PooledCNN(), load_ijb(ijb_dir)
    result = evaluate_benchmark(model, ijb_dir, ExtractOptions(batch_size=len(SYNTHETIC_FACES), flip="concat"))
    images = IJBImages(protocol)
    plain, mirrored = direct_embeddings(model, [images[i] for i in range(len(images))])
    expected, _ = ijb_metrics(protocol, np.concatenate([plain, mirrored], axis=1))
    assert_metrics_close(without_time(result.metrics), expected)
    summed, _ = ijb_metrics(protocol, plain + mirrored)
    assert without_time(result.metrics) != summed  # the fusion reaches the template scores


def _concat_on_rank(rank: int, world_size: int, pair_bin, ijb_dir) -> dict:
    model, options = PooledCNN(), ExtractOptions(batch_size=BATCH_SIZE, flip="concat")
    pairs = evaluate_benchmark(model, pair_bin, options)
    ijb = evaluate_prepared(model, prepare_benchmark(ijb_dir, rank=rank, world_size=world_size), options)
    embeddings = extract_embeddings(model, load_pairs(pair_bin).images, batch_size=BATCH_SIZE, flip="concat")
    return {
        "embeddings": torch.from_numpy(embeddings),
        "pairs": json.dumps(without_time(pairs.metrics)),
        "ijb": json.dumps(without_time(ijb.metrics)),
    }


def test_two_ranks_gather_the_doubled_width_and_match_one_rank(pair_bin, ijb_dir):
    single = _concat_on_rank(0, 1, pair_bin, ijb_dir)  # this process, no process group
    assert single["embeddings"].shape == (NUM_PAIR_IMAGES, 2 * DIM)
    for rank, result in enumerate(run_on_ranks(_concat_on_rank, 2, pair_bin, ijb_dir)):
        assert result["embeddings"].shape == (NUM_PAIR_IMAGES, 2 * DIM), f"rank {rank}"
        torch.testing.assert_close(result["embeddings"], single["embeddings"], rtol=1e-5, atol=1e-6)
        assert_metrics_close(json.loads(result["pairs"]), json.loads(single["pairs"]))
        assert_metrics_close(json.loads(result["ijb"]), json.loads(single["ijb"]))


def test_cli_flip_concat(tmp_path, registry, capsys):  # noqa: F811
    model = write_checkpoint(tmp_path / "step_7.pt")
    lfw = write_pairs(tmp_path / "lfw.bin", count=40)
    main(["--checkpoint", str(tmp_path / "step_7.pt"), "--benchmark", str(lfw), "--flip", "concat",
          "--out", str(tmp_path / "out")])
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert document["flip"] == "concat"
    expected = json.loads(json.dumps(without_time(evaluate_pairs(model, lfw, ExtractOptions(flip="concat")))))
    assert {key: document["benchmarks"]["lfw"][key] for key in expected} == expected
    main(["--checkpoint", str(tmp_path / "step_7.pt"), "--benchmark", str(lfw), "--out", str(tmp_path / "default")])
    assert json.loads((tmp_path / "default" / "results.json").read_text())["flip"] == "sum"
    help_text = build_parser().format_help()
    assert "--flip {sum,concat,none}" in help_text and "as the checkpoint records it, else sum" in " ".join(help_text.split())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "step_7.pt"), "--benchmark", str(lfw), "--flip", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err
