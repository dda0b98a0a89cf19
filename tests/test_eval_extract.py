"""Embedding extraction: flip fusion, batching, rank slices, and evaluation of a pair set."""
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from sf2dist.eval import ExtractOptions, evaluate_pairs, extract_embeddings, image_slice, load_bin
from sf2dist.imageio import encode_jpeg, to_tensor
from tests.distributed import run_on_ranks


class TinyCNN(nn.Module):
    """A small backbone that is not mirror-symmetric, so flip fusion changes its embeddings."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 8, 3, stride=2)
        )
        self.head = nn.Linear(8 * 3 * 3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class MeanColour(nn.Module):
    """Embedding = the image's mean colour: identical for a solid-colour face and its mirror."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def faces(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def reference_embeddings(model: nn.Module, images: np.ndarray, flip: bool) -> np.ndarray:
    model.eval()
    batch = torch.stack([to_tensor(image) for image in images])
    with torch.no_grad():
        out = model(batch) + (model(batch.flip(3)) if flip else 0)
    return out.numpy()


def test_flip_fusion_adds_the_mirror_image_embedding():
    model, images = TinyCNN(), faces(7)
    fused = extract_embeddings(model, images, batch_size=3, flip=True)
    plain = extract_embeddings(model, images, batch_size=3, flip=False)
    np.testing.assert_allclose(fused, reference_embeddings(model, images, flip=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, reference_embeddings(model, images, flip=False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(fused, 2 * plain, atol=1e-3)  # the mirror image really is embedded
    np.testing.assert_allclose(extract_embeddings(model, images, batch_size=1), fused, rtol=1e-5, atol=1e-5)


def test_extraction_runs_in_eval_mode_and_restores_the_mode():
    model = TinyCNN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_embeddings(model, faces(4), batch_size=2)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: batch norm ran in training mode"


def test_a_model_that_does_not_return_embeddings_is_reported():
    with pytest.raises(ValueError, match=r"returned \(4, 3, 16, 16\)"):
        extract_embeddings(nn.Identity(), faces(2), flip=True)


def test_image_slices_cover_every_image_once():
    slices = [image_slice(10, rank, 4) for rank in range(4)]
    assert slices == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="cannot split 3 images over 4 ranks"):
        image_slice(3, 0, 4)


def _extract_on_rank(rank: int, world_size: int) -> tuple:
    model = TinyCNN()
    rows_seen = []
    model.register_forward_hook(lambda module, inputs, output: rows_seen.append(len(inputs[0])))
    return torch.from_numpy(extract_embeddings(model, faces(7), batch_size=2)), sum(rows_seen)


def test_two_ranks_split_the_images_and_gather_them_in_order():
    results = run_on_ranks(_extract_on_rank, 2)
    single = extract_embeddings(TinyCNN(), faces(7), batch_size=2)
    for embeddings, _ in results:
        np.testing.assert_allclose(embeddings.numpy(), single, rtol=1e-5, atol=1e-5)
    # 7 images: rank 0 embeds 4 and rank 1 embeds 3, each with its mirror images.
    assert [rows for _, rows in results] == [8, 6]


def solid(colour) -> bytes:
    return encode_jpeg(np.full((16, 16, 3), colour, dtype=np.uint8))


def test_evaluate_pairs_on_a_synthetic_held_out_set(tmp_path):
    # 20 pairs of solid-colour faces in the data issue's held-out layout (protocol 4):
    # positives repeat a colour, negatives pair opposite colours.
    rng = np.random.default_rng(0)
    images, issame = [], []
    for i in range(20):
        colour = rng.integers(0, 256, 3)
        same = i % 2 == 0
        images += [solid(colour), solid(colour if same else 255 - colour)]
        issame.append(same)
    path = tmp_path / "holdout.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    metrics = evaluate_pairs(MeanColour(), path, ExtractOptions(batch_size=8))
    assert (metrics["accuracy"], metrics["accuracy_std"], metrics["best_accuracy"]) == (1.0, 0.0, 1.0)
    assert (metrics["eer"], metrics["auc"]) == (0.0, 1.0)
    assert metrics["tar_at_far"]["1e-01"] == 1.0 and metrics["tar_at_far"]["1e-02"] is None  # 10 negatives
    assert evaluate_pairs(MeanColour(), load_bin(path))["accuracy"] == 1.0  # preloaded, as training passes it
