"""Calibrate the synthetic identities: raw pixels must verify poorly, a small CNN well.

Generates a synthetic set (sf2dist-synth), scores its held-out pairs with cosine similarity
of raw normalised pixels, then trains a small CNN with plain softmax cross-entropy on the
training identities (one process, the sf2dist loader) and scores the same pairs with its
flip-fused embeddings. Both use the LFW 10-fold protocol of sf2dist.eval. Prints the two
accuracies and the wall time.

    .venv/bin/python launch/calibrate_synth.py            # about 2.5 minutes on 2 cores
    .venv/bin/python launch/calibrate_synth.py --pair-set data/reproduce/val.bin   # raw pixels only

`--pair-set FILE` scores an existing pair set (a `.bin` such as the open-set benchmark's
val.bin or test.bin) with the raw-pixel baseline only: nothing is generated or trained.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sf2dist.data import make_loader, synth
from sf2dist.eval import extract_embeddings, load_bin, verification_accuracy


def small_cnn(embedding_dim: int = 128) -> nn.Module:
    """Half-resolution input, four strided conv blocks and a linear embedding.

    About 4M multiply-adds per 112x112 image: the synthetic identities differ in coarse
    cues (shapes, colours, positions), and halving the input first makes a training step
    about 4x cheaper on a CPU than running the same blocks at full resolution.
    """

    def block(cin: int, cout: int, kernel: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        nn.AvgPool2d(2),
        *block(3, 16, 5), *block(16, 32, 3), *block(32, 64, 3), *block(64, 128, 3),
        nn.Flatten(), nn.LazyLinear(embedding_dim), nn.BatchNorm1d(embedding_dim),
    )


def raw_pixel_accuracy(images: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    pixels = (images.reshape(len(images), -1).astype(np.float32) - 127.5) / 127.5
    return verification_accuracy(pixels[0::2], pixels[1::2], issame)


def train(shard_dir: Path, epochs: int, batch_size: int, seed: int, workers: int) -> nn.Module:
    torch.manual_seed(seed)
    loader = make_loader(shard_dir, batch_size=batch_size, rank=0, world_size=1, num_workers=workers, seed=seed)
    backbone = small_cnn()
    backbone(torch.zeros(2, 3, *loader.manifest.image_size))  # materialise the lazy layer
    classifier = nn.Linear(128, loader.num_classes)
    parameters = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=5e-4)
    total = epochs * loader.batches_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total, pct_start=0.15)
    backbone.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        losses = []
        for images, labels in loader:
            loss = nn.functional.cross_entropy(classifier(backbone(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        print(f"  epoch {epoch}: mean loss {np.mean(losses):.3f}", flush=True)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair-set", type=Path,
                        help="score this existing .bin pair set with raw pixels only, then exit (no generation, "
                             "no training)")
    parser.add_argument("--data", type=Path, help="existing sf2dist-synth output to reuse (default: generate one)")
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument("--holdout-identities", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes and loader workers")
    args = parser.parse_args()

    if args.pair_set is not None:
        start = time.perf_counter()
        if not args.pair_set.is_file():
            parser.error(f"--pair-set {args.pair_set}: no such file")
        pairs = load_bin(args.pair_set)
        raw_mean, raw_std = raw_pixel_accuracy(pairs.images, pairs.issame)
        print(f"{args.pair_set}: {len(pairs.issame)} pairs, raw-pixel cosine verification (10-fold): "
              f"{100 * raw_mean:.2f} ± {100 * raw_std:.2f} % ({time.perf_counter() - start:.0f} s)")
        return

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            data = synth.generate(
                Path(scratch) / "synth", identities=args.identities, images_per_identity=args.images_per_identity,
                holdout_identities=args.holdout_identities, pairs=args.pairs, size=args.size, seed=args.seed,
                workers=args.workers, progress=True,
            )
        generated = time.perf_counter()
        pairs = load_bin(data / "holdout.bin")
        raw_mean, raw_std = raw_pixel_accuracy(pairs.images, pairs.issame)
        print(f"raw-pixel cosine verification: {100 * raw_mean:.2f} ± {100 * raw_std:.2f} %", flush=True)

        backbone = train(data / "train", args.epochs, args.batch_size, args.seed, args.workers)
        embeddings = extract_embeddings(backbone, pairs.images, batch_size=256, flip=True)
        cnn_mean, cnn_std = verification_accuracy(embeddings[0::2], embeddings[1::2], pairs.issame)
    end = time.perf_counter()
    print(f"raw-pixel cosine verification: {100 * raw_mean:.2f} ± {100 * raw_std:.2f} %")
    print(f"small CNN ({args.epochs} epochs, softmax): {100 * cnn_mean:.2f} ± {100 * cnn_std:.2f} %")
    print(f"wall time: {end - start:.0f} s ({generated - start:.0f} s generating, {end - generated:.0f} s "
          f"baseline, training and evaluation)")


if __name__ == "__main__":
    main()
