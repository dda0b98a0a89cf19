"""`sf2dist-synth`: procedural face-like identities, training shards and a held-out pair set.

An identity is a latent code (standard normal, one coordinate per attribute) decoded into
the geometry and colours of a face-like pattern: head shape, skin and hair colours,
hairline, eyes, irises, brows, nose, mouth, beard, moles, glasses. It is rendered once, in a
canonical frame, as premultiplied RGBA. Each image of the identity then warps that
rendering (shift, rotation, scale, and yaw/pitch bulges that move the inner features
against the outline, as a turning head does), puts it on its own background, and adds
occlusion (sunglasses, face mask, or a patch), lighting (gain, gradient, colour cast),
blur, noise and JPEG compression. The nuisances are calibrated (launch/calibrate_synth.py)
so that raw pixels verify poorly while a small CNN trained on the training identities
verifies the held-out ones well.

Everything is drawn from `numpy.random.SeedSequence([seed, stream, identity])`, so an
identity's images depend only on the seed and its number, not on how work is split
across processes. Training identities are numbered 0..K-1 (their labels); held-out
identities K..K+H-1, so they are never seen in training.

Output: `OUT/train/` (shards + manifest.json, written last) and, when held-out identities
are asked for, `OUT/holdout.bin` (an InsightFace-style pickle of (list of JPEG bytes, list of
bools); pair i is images 2i and 2i+1) and `OUT/holdout_pairs.tsv` (which identities and
images each pair shows). An empty pair set is never written: without held-out identities
there is no pair file, and held-out identities without pairs are refused.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sf2dist.data.shards import (
    SHARD_DIR_FILES,
    AlreadyConverted,
    OutputDirError,
    ShardSetWriter,
    claim_output_dir,
    counted,
    describe_source,
    write_manifest,
)
from sf2dist.imageio import encode_jpeg

GENERATOR_VERSION = 1
DEFAULT_SIZE = 112
DEFAULT_SHARD_SIZE = 10_000
_CODE, _IMAGES, _PAIRS = range(3)  # SeedSequence streams
_CANVAS = 1.3  # the canonical rendering covers [-1.3, 1.3]^2; the face about [-0.7, 0.7]

# Attributes decoded from the latent code: value = centre + spread * tanh(z).
_ATTRIBUTES = {
    "face_w": (0.60, 0.08), "face_h": (0.78, 0.07), "face_v": (0.04, 0.04),
    "jaw": (0.30, 0.15), "squareness": (2.3, 0.5),
    "skin": (0.5, 0.5), "skin_red": (0.0, 1.0),
    "hair_dark": (0.5, 0.5), "hair_red": (0.0, 1.0), "hair_volume": (0.10, 0.08),
    "hair_length": (0.1, 0.6), "hairline": (-0.45, 0.12), "hairline_curve": (0.5, 0.5),
    "hair_part": (0.0, 0.35),
    "ear_v": (0.0, 0.06), "ear_size": (0.10, 0.03),
    "eye_dx": (0.25, 0.05), "eye_v": (-0.10, 0.06), "eye_w": (0.11, 0.025),
    "eye_h": (0.05, 0.015), "iris_r": (0.045, 0.01), "iris_blue": (0.0, 1.0), "iris_green": (0.0, 1.0),
    "brow_gap": (0.09, 0.03), "brow_len": (0.12, 0.035), "brow_t": (0.022, 0.01), "brow_tilt": (0.0, 0.3),
    "nose_v": (0.17, 0.05), "nose_len": (0.16, 0.05), "nose_w": (0.06, 0.02),
    "mouth_v": (0.42, 0.06), "mouth_w": (0.17, 0.05), "lip_t": (0.028, 0.012),
    "mouth_curve": (0.0, 0.8), "lip_red": (0.0, 1.0),
    "beard": (0.0, 1.0), "beard_v": (0.25, 0.1),
    "mole1_u": (0.0, 0.4), "mole1_v": (0.15, 0.35), "mole1_r": (0.0, 0.035),
    "mole2_u": (0.0, 0.4), "mole2_v": (0.15, 0.35), "mole2_r": (0.0, 0.035),
    "glasses": (0.0, 1.0), "glasses_r": (0.09, 0.02),
}
LATENT_DIM = len(_ATTRIBUTES)

# Per-image nuisances (calibrated with launch/calibrate_synth.py).
MAX_ROTATION = np.deg2rad(18.0)
SCALE_RANGE = (0.85, 1.15)
MAX_SHIFT = 0.12  # of the half-width
MAX_YAW, MAX_PITCH = 0.30, 0.15  # bulge of the inner features, canonical units
GAIN_RANGE = (0.55, 1.35)
MAX_GRADIENT = 0.5
MAX_CAST = 0.15
OCCLUSION_PROBABILITY = 0.4
MAX_BLUR_PASSES = 3
MAX_NOISE = 0.05
JPEG_QUALITY = (70, 95)


def identity_codes(seed: int, identities: np.ndarray) -> np.ndarray:
    """The latent codes of these identities: float64 [k, LATENT_DIM]."""
    return np.stack([
        np.random.default_rng(np.random.SeedSequence([seed, _CODE, int(i)])).standard_normal(LATENT_DIM)
        for i in identities
    ])


def _attributes(codes: np.ndarray) -> dict[str, torch.Tensor]:
    """Decode codes [k, D] into attribute tensors [k, 1, 1] (broadcast over a pixel grid)."""
    values = np.tanh(codes)
    return {
        name: torch.from_numpy(centre + spread * values[:, j]).float().view(-1, 1, 1)
        for j, (name, (centre, spread)) in enumerate(_ATTRIBUTES.items())
    }


def _coverage(distance: torch.Tensor, pixel: float) -> torch.Tensor:
    """Anti-aliased coverage of a shape from its signed distance (negative inside)."""
    return (0.5 - distance / pixel).clamp_(0.0, 1.0)


def _ellipse(u, v, cu, cv, a, b) -> torch.Tensor:
    """Approximate signed distance to an ellipse with centre (cu, cv) and radii (a, b)."""
    return (torch.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def _segment(u, v, cu, cv, half_length, angle, thickness) -> torch.Tensor:
    """Signed distance to a thick line segment centred at (cu, cv), tilted by `angle`."""
    du, dv = u - cu, v - cv
    along = du * torch.cos(angle) + dv * torch.sin(angle)
    across = -du * torch.sin(angle) + dv * torch.cos(angle)
    outside = (along.abs() - half_length).clamp(min=0.0)
    return torch.sqrt(outside**2 + across**2) - thickness


def _over(rgb, alpha, colour, coverage) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint `colour` [k, 3, 1, 1] with `coverage` [k, H, W] over a premultiplied canvas."""
    coverage = coverage.unsqueeze(1)
    return rgb * (1 - coverage) + colour * coverage, alpha * (1 - coverage) + coverage


def _colour(*channels) -> torch.Tensor:
    return torch.stack([c.view(-1) for c in channels], dim=1).clamp(0, 1).view(-1, 3, 1, 1)


def render_canonical(codes: np.ndarray, resolution: int) -> torch.Tensor:
    """Premultiplied RGBA renderings of identities, frontal and centred: [k, 4, R, R] in [0, 1]."""
    p = _attributes(codes)
    k = codes.shape[0]
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * _CANVAS - _CANVAS
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    u, v = u.expand(k, -1, -1), v.expand(k, -1, -1)
    pixel = 2 * _CANVAS / resolution
    rgb = torch.zeros(k, 3, resolution, resolution)
    alpha = torch.zeros(k, 1, resolution, resolution)

    tone = (p["skin"] + 1) / 2  # dark (0) to light (1)
    skin = _colour(0.38 + 0.55 * tone + 0.05 * p["skin_red"], 0.25 + 0.55 * tone, 0.18 + 0.52 * tone)
    dark = (p["hair_dark"] + 1) / 2
    hair = _colour(0.75 - 0.65 * dark + 0.15 * p["hair_red"], 0.62 - 0.55 * dark, 0.40 - 0.35 * dark)

    face_v = v - p["face_v"]
    # hair behind the head, cut off at the hair length
    back = _ellipse(u, face_v, 0.0, -0.08, p["face_w"] + p["hair_volume"], p["face_h"] + p["hair_volume"])
    back = torch.maximum(back, face_v - p["hair_length"])
    rgb, alpha = _over(rgb, alpha, hair, _coverage(back, pixel))
    # neck, ears, then the head: a superellipse that narrows towards the jaw
    neck = torch.maximum((u.abs() - 0.6 * p["face_w"]), -(face_v - 0.3))
    rgb, alpha = _over(rgb, alpha, skin * 0.85, _coverage(neck, pixel))
    for side in (-1.0, 1.0):
        ear = _ellipse(u, face_v, side * p["face_w"], p["ear_v"], 0.6 * p["ear_size"], p["ear_size"])
        rgb, alpha = _over(rgb, alpha, skin * 0.9, _coverage(ear, pixel))
    width = p["face_w"] * (1 - p["jaw"] * (face_v / p["face_h"]).clamp(min=0) ** 2)
    exponent = p["squareness"]
    head = ((u / width).abs() ** exponent + (face_v / p["face_h"]).abs() ** exponent) ** (1 / exponent) - 1
    rgb, alpha = _over(rgb, alpha, skin, _coverage(head * p["face_w"], pixel))
    inside = _coverage(head * p["face_w"], pixel)
    # fringe: hair above a curved hairline, parted off-centre
    hairline = p["hairline"] + p["hairline_curve"] * (u - p["hair_part"]) ** 2
    rgb, alpha = _over(rgb, alpha, hair, inside * _coverage(face_v - hairline, pixel))
    # beard: a translucent layer below the beard line
    beard = p["beard"].clamp(min=0) * 0.8
    rgb, alpha = _over(rgb, alpha, hair, inside * beard * _coverage(p["beard_v"] - face_v, pixel))

    iris = _colour(0.35 - 0.2 * p["iris_blue"].abs(), 0.25 + 0.2 * p["iris_green"], 0.15 + 0.4 * p["iris_blue"].clamp(min=0))
    white = _colour(torch.full_like(tone, 0.95), torch.full_like(tone, 0.93), torch.full_like(tone, 0.9))
    for side in (-1.0, 1.0):
        cu = side * p["eye_dx"]
        brow = _segment(u, face_v, cu, p["eye_v"] - p["eye_h"] - p["brow_gap"], p["brow_len"],
                        side * p["brow_tilt"], p["brow_t"])
        rgb, alpha = _over(rgb, alpha, hair * 0.7, _coverage(brow, pixel))
        eye = _coverage(_ellipse(u, face_v, cu, p["eye_v"], p["eye_w"], p["eye_h"]), pixel)
        rgb, alpha = _over(rgb, alpha, white, eye)
        ring = _ellipse(u, face_v, cu, p["eye_v"], p["iris_r"], p["iris_r"])
        rgb, alpha = _over(rgb, alpha, iris, eye * _coverage(ring, pixel))
        pupil = _ellipse(u, face_v, cu, p["eye_v"], 0.4 * p["iris_r"], 0.4 * p["iris_r"])
        rgb, alpha = _over(rgb, alpha, iris * 0.2, eye * _coverage(pupil, pixel))
        rim = (_ellipse(u, face_v, cu, p["eye_v"], p["glasses_r"] * 1.2, p["glasses_r"]).abs() - 0.012)
        rgb, alpha = _over(rgb, alpha, hair * 0.3, (p["glasses"] > 0.75) * _coverage(rim, pixel))

    nose = _ellipse(u, face_v, 0.0, p["nose_v"], p["nose_w"], p["nose_len"] / 2)
    rgb, alpha = _over(rgb, alpha, skin * 0.7, 0.5 * _coverage(nose, pixel))
    for side in (-1.0, 1.0):
        nostril = _ellipse(u, face_v, side * 0.5 * p["nose_w"], p["nose_v"] + p["nose_len"] / 2, 0.025, 0.014)
        rgb, alpha = _over(rgb, alpha, skin * 0.35, _coverage(nostril, pixel))
    lips = _colour(skin[:, 0] * 0.8 + 0.15 + 0.1 * p["lip_red"], skin[:, 1] * 0.55, skin[:, 2] * 0.55)
    smile = face_v - p["mouth_v"] - p["mouth_curve"] * (u**2 - p["mouth_w"] ** 2 / 3)
    mouth = torch.maximum(smile.abs() - p["lip_t"], u.abs() - p["mouth_w"])
    rgb, alpha = _over(rgb, alpha, lips, _coverage(mouth, pixel))
    for n in ("1", "2"):
        mole = _ellipse(u, face_v, p[f"mole{n}_u"], p[f"mole{n}_v"], p[f"mole{n}_r"].abs() + 1e-3, p[f"mole{n}_r"].abs() + 1e-3)
        rgb, alpha = _over(rgb, alpha, skin * 0.4, inside * (p[f"mole{n}_r"] > 0) * _coverage(mole, pixel))
    return torch.cat([rgb, alpha], dim=1)


def _binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """One pass of the separable [1, 2, 1] / 4 filter with replicated edges: [n, 3, H, W]."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    rows = (padded[:, :, :, :-2] + 2 * padded[:, :, :, 1:-1] + padded[:, :, :, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


def render_images(canonical: torch.Tensor, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` images of one identity from its canonical rendering [1, 4, R, R]: uint8 [n, S, S, 3]."""
    n = count

    def draw(low, high, shape=(n,)):
        return torch.from_numpy(rng.uniform(low, high, shape)).float()

    angle, scale = draw(-MAX_ROTATION, MAX_ROTATION), draw(*SCALE_RANGE)
    shift = draw(-MAX_SHIFT, MAX_SHIFT, (n, 2))
    yaw, pitch = draw(-MAX_YAW, MAX_YAW), draw(-MAX_PITCH, MAX_PITCH)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # output pixel centres in [-1, 1]
    xs, ys = x - shift[:, 0, None, None], y - shift[:, 1, None, None]
    cos, sin, inv = angle.cos()[:, None, None], angle.sin()[:, None, None], 1 / scale[:, None, None]
    u = (cos * xs + sin * ys) * inv
    v = (-sin * xs + cos * ys) * inv
    # turning the head moves the inner features across while the outline stays put
    bulge = (1 - u**2).clamp(min=0) * (1 - v**2).clamp(min=0)
    u, v = u + yaw[:, None, None] * bulge, v + pitch[:, None, None] * bulge
    grid = torch.stack([u, v], dim=-1) / _CANVAS
    face = F.grid_sample(canonical.expand(n, -1, -1, -1), grid, align_corners=False)  # [n, 4, S, S]

    # background: a smooth random colour field
    background = F.interpolate(draw(0, 1, (n, 3, 3, 3)), size=(size, size), mode="bicubic", align_corners=False)
    images = face[:, :3] + background.clamp_(0, 1) * (1 - face[:, 3:])

    # occlusion: 1 sunglasses, 2 face mask (both follow the head), 3 a patch anywhere
    kind = rng.choice(4, size=n, p=[1 - OCCLUSION_PROBABILITY] + [OCCLUSION_PROBABILITY / 3] * 3)
    shade = draw(0, 1, (n, 3, 1, 1))
    corner, extent = draw(-1, 0.6, (n, 2, 1, 1)), draw(0.35, 0.8, (n, 2, 1, 1))
    for value in (1, 2, 3):
        chosen = torch.from_numpy(np.flatnonzero(kind == value))
        if len(chosen) == 0:
            continue
        cu, cv = u[chosen], v[chosen]
        if value == 1:
            region, colour = ((cv + 0.1).abs() < 0.09) & (cu.abs() < 0.42), 0.25 * shade[chosen]
        elif value == 2:
            region, colour = (cv > 0.12) & (cv < 0.78) & (cu.abs() < 0.55), 0.6 + 0.4 * shade[chosen]
        else:
            start, stop = corner[chosen], corner[chosen] + extent[chosen]
            region = (x > start[:, 0]) & (x < stop[:, 0]) & (y > start[:, 1]) & (y < stop[:, 1])
            colour = shade[chosen]
        images[chosen] = torch.where(region[:, None], colour, images[chosen])

    # lighting: gain, colour cast, and a gradient across the image (bilinear from the corners)
    corners = draw(*GAIN_RANGE, (n, 1, 1, 1)) * (1 + draw(-MAX_CAST, MAX_CAST, (n, 3, 1, 1)))
    corners = corners * (1 + draw(-MAX_GRADIENT, MAX_GRADIENT, (n, 1, 2, 2)))
    images.mul_(F.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True))

    passes = rng.integers(0, MAX_BLUR_PASSES + 1, n)
    for level in range(1, MAX_BLUR_PASSES + 1):
        chosen = torch.from_numpy(np.flatnonzero(passes >= level))
        if len(chosen):
            images[chosen] = _binomial_blur(images[chosen])
    # sensor noise, uniform with a per-image standard deviation up to MAX_NOISE
    noise = torch.from_numpy(rng.random((n, 3, size, size), dtype=np.float32)).sub_(0.5)
    images.add_(noise.mul_(draw(0, MAX_NOISE * 12**0.5, (n, 1, 1, 1))))
    images = images.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def identity_jpegs(seed: int, identity: int, count: int, size: int, quality: int | None = None) -> list[bytes]:
    """The `count` JPEG images of one identity (deterministic in seed and identity).

    `quality` fixes the JPEG quality; by default each image draws its own from JPEG_QUALITY.
    """
    canonical = render_canonical(identity_codes(seed, np.array([identity])), round(size * _CANVAS))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _IMAGES, identity]))
    images = render_images(canonical, count, size, rng)
    qualities = rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, count)
    if quality is not None:
        qualities[:] = quality
    return [encode_jpeg(image, quality=int(q)) for image, q in zip(images, qualities)]


def _identity_task(args: tuple[int, int, int, int, int | None]) -> list[bytes]:
    torch.set_num_threads(1)  # one process per core
    return identity_jpegs(*args)


def _generate(seed: int, identities: range, count: int, size: int, quality: int | None, workers: int, desc: str,
              progress: bool):
    """Yield (identity, its JPEG list) in identity order."""
    tasks = [(seed, i, count, size, quality) for i in identities]
    with tqdm(total=len(tasks) * count, unit="img", desc=desc, disable=not progress) as bar:
        if workers == 0:
            for identity, jpegs in zip(identities, (identity_jpegs(*task) for task in tasks)):
                bar.update(count)
                yield identity, jpegs
            return
        with multiprocessing.Pool(workers) as pool:
            for identity, jpegs in zip(identities, pool.imap(_identity_task, tasks, chunksize=4)):
                bar.update(count)
                yield identity, jpegs


def sample_pairs(seed: int, identities: int, images_per_identity: int, pairs: int) -> list[tuple[bool, int, int, int, int]]:
    """Verification pairs over held-out identity numbers 0..identities-1, positives and
    negatives alternating in random order: (issame, identity0, image0, identity1, image1)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PAIRS]))
    result = []
    for n in range(pairs):
        same = n % 2 == 0
        first, second = rng.choice(identities, 2, replace=False)
        if same:
            second = first
        images = rng.choice(images_per_identity, 2, replace=False)
        result.append((same, int(first), int(images[0]), int(second), int(images[1])))
    order = rng.permutation(pairs)
    return [result[i] for i in order]


class SynthOptionError(ValueError):
    """A size or count the generator cannot work with (the command line exits with status 2)."""


def check_options(*, identities: int, images_per_identity: int, holdout_identities: int, pairs: int,
                  size: int, shard_size: int, jpeg_quality: int | None, workers: int) -> None:
    """Refuse, before anything is written, options that give no usable set; say what to pass."""
    if identities < 1:
        raise SynthOptionError(f"--identities must be at least 1, got {identities}")
    if images_per_identity < 2:
        raise SynthOptionError(
            f"--images-per-identity must be at least 2 (a positive pair needs two images of one "
            f"identity), got {images_per_identity}"
        )
    if size < 16:
        raise SynthOptionError(f"--size must be at least 16 pixels, got {size}")
    if shard_size < 1:
        raise SynthOptionError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 0:
        raise SynthOptionError(f"--workers must be 0 or more, got {workers}")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise SynthOptionError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if holdout_identities < 0 or pairs < 0:
        raise SynthOptionError(
            f"--holdout-identities and --pairs must be 0 or more, got {holdout_identities} and {pairs}"
        )
    if pairs > 0 and holdout_identities == 0:
        raise SynthOptionError(
            f"--pairs {pairs} needs held-out identities to draw the pairs from: add "
            f"--holdout-identities N (at least 2, e.g. 200)"
        )
    if holdout_identities == 1:
        raise SynthOptionError(
            "--holdout-identities must be 0 or at least 2 (a negative pair needs two held-out "
            "identities), got 1"
        )
    if holdout_identities > 0 and pairs == 0:
        raise SynthOptionError(
            f"--holdout-identities {holdout_identities} without --pairs would write an empty "
            f"holdout.bin: add --pairs N (e.g. 3000), or leave out --holdout-identities to write "
            f"training shards only"
        )


def generate(
    out_dir: str | os.PathLike,
    *,
    identities: int,
    images_per_identity: int,
    holdout_identities: int,
    pairs: int,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    jpeg_quality: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset (module docstring) into `out_dir`; returns it.

    `jpeg_quality` fixes the quality of every image (default: drawn per image from
    JPEG_QUALITY). With `holdout_identities=0` (and `pairs=0`) only `train/` is written.
    Raises `SynthOptionError` for unusable options, `AlreadyConverted` when `out_dir` holds
    this very set.
    """
    check_options(
        identities=identities, images_per_identity=images_per_identity, holdout_identities=holdout_identities,
        pairs=pairs, size=size, shard_size=shard_size, jpeg_quality=jpeg_quality, workers=workers,
    )
    source = {
        "kind": "synthetic", "generator_version": GENERATOR_VERSION, "seed": seed,
        "identities": identities, "images_per_identity": images_per_identity, "size": size,
        "holdout_identities": holdout_identities, "pairs": pairs,
    }
    if jpeg_quality is not None:
        source["jpeg_quality"] = jpeg_quality
    owned = tuple(f"train/{p}" for p in SHARD_DIR_FILES) + ("holdout.bin", "holdout.bin.tmp", "holdout_pairs.tsv")
    out = claim_output_dir(out_dir, source, overwrite=overwrite, image_size=(size, size), shard_size=shard_size,
                           owned=owned, manifest="train/manifest.json")

    if pairs > 0:
        _write_holdout(out, seed, identities, holdout_identities, images_per_identity, pairs, size, jpeg_quality,
                       workers, progress)
    (out / "train").mkdir(exist_ok=True)
    writer = ShardSetWriter(out / "train", shard_size)
    for identity, images in _generate(seed, range(identities), images_per_identity, size, jpeg_quality, workers, "training identities", progress):
        for n, jpeg in enumerate(images):
            writer.write(f"{identity:08d}_{n:04d}", jpeg, identity)
    written = identities * images_per_identity
    write_manifest(
        out / "train", num_classes=identities, image_size=(size, size), shards=writer.close(), source=source,
        counts={"records_read": written, "written": written, "rejected": 0, "reencoded": 0},
    )
    return out


def _write_holdout(out: Path, seed: int, identities: int, holdout_identities: int, images_per_identity: int,
                   pairs: int, size: int, jpeg_quality: int | None, workers: int, progress: bool) -> None:
    """holdout.bin (atomically) and holdout_pairs.tsv for held-out identities K..K+H-1."""
    holdout = range(identities, identities + holdout_identities)
    holdout_images = dict(_generate(seed, holdout, images_per_identity, size, jpeg_quality, workers, "held-out identities", progress))
    chosen = sample_pairs(seed, holdout_identities, images_per_identity, pairs)
    with open(out / "holdout_pairs.tsv", "w") as f:
        f.write("issame\tidentity0\timage0\tidentity1\timage1\n")
        for same, a, i, b, j in chosen:
            f.write(f"{int(same)}\t{identities + a}\t{i}\t{identities + b}\t{j}\n")
    jpegs = [holdout_images[identities + ident][image] for _, a, i, b, j in chosen for ident, image in ((a, i), (b, j))]
    with open(out / "holdout.bin.tmp", "wb") as f:
        pickle.dump((jpegs, [same for same, *_ in chosen]), f, protocol=4)
    os.replace(out / "holdout.bin.tmp", out / "holdout.bin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf2dist-synth",
        description="Write procedural face-like identities as training shards (OUT/train) and, with "
        "--holdout-identities and --pairs, a held-out verification pair set (OUT/holdout.bin).",
        epilog="Exit status: 0 written (or already there), 1 writing failed, 2 an option is wrong.",
    )
    workers = min(8, os.cpu_count() or 1)
    parser.add_argument("--identities", type=int, required=True, help="training identities K, labels 0..K-1 (required)")
    parser.add_argument("--images-per-identity", type=int, required=True,
                        help="images per identity, at least 2 (required)")
    parser.add_argument("--out", required=True, help="output directory, new or empty (required)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image side in pixels; images are square (default {DEFAULT_SIZE})")
    parser.add_argument("--holdout-identities", type=int, default=0,
                        help="identities kept out of training, for OUT/holdout.bin; at least 2, with --pairs "
                        "(default 0: no held-out pair set is written)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="verification pairs in OUT/holdout.bin, half of them positive; needs "
                        "--holdout-identities (default 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every identity and image; the same seed gives the same bytes (default 0)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help=f"one JPEG quality for every image (default: drawn per image from "
                        f"{JPEG_QUALITY[0]}..{JPEG_QUALITY[1]})")
    parser.add_argument("--workers", type=int, default=workers,
                        help=f"rendering processes (default min(8, CPUs), here {workers}; 0 renders in this process)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synthetic set in --out (default off: the same set is left "
                        "as it is, anything else is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = generate(
            args.out, identities=args.identities, images_per_identity=args.images_per_identity,
            holdout_identities=args.holdout_identities, pairs=args.pairs, size=args.size, seed=args.seed,
            shard_size=args.shard_size, jpeg_quality=args.jpeg_quality, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
        )
    except SynthOptionError as err:
        print(f"sf2dist-synth: error: {err}", file=sys.stderr)
        return 2
    except AlreadyConverted as done:
        print(f"already written: {done.out_dir} holds {describe_source(done.manifest.get('source'))}; "
              f"nothing to do (pass --overwrite to write it again)")
        return 0
    except (OutputDirError, ValueError, OSError) as err:
        print(f"sf2dist-synth: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sf2dist-synth: interrupted; {args.out} is unfinished (run again with --overwrite to start over)",
              file=sys.stderr)
        return 130
    trained = (f"wrote {counted(args.identities * args.images_per_identity, 'training image')} of "
               f"{counted(args.identities, 'identity', 'identities')} to {out / 'train'}")
    if args.pairs:
        print(f"{trained} and {counted(args.pairs, 'held-out pair')} of "
              f"{counted(args.holdout_identities, 'identity', 'identities')} to {out / 'holdout.bin'}")
    else:
        print(f"{trained}; no held-out pair set (pass --holdout-identities 200 --pairs 3000, for example, "
              f"to also write {out / 'holdout.bin'} for evaluation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
