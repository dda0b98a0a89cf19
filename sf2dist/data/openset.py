"""An open-set benchmark from synthetic identities: training shards, validation and test pairs, test templates.

`python -m sf2dist.data.openset --out OUT` writes, from one seed, three disjoint ranges of
`sf2dist-synth` identities (numbered as sf2dist-synth numbers them, so the ranges never share
an identity):

- training identities 0..K-1: `OUT/train/`, a shard directory (labels 0..K-1), written with
  the same shard writers as sf2dist-synth, and `OUT/seen.bin`, verification pairs of these
  identities' training images (the very JPEGs of the shards): how well a model separates the
  identities it was trained on, the training-identity accuracy;
- validation identities K..K+V-1: `OUT/val.bin`, verification pairs for choosing
  hyper-parameters;
- test identities K+V..K+V+T-1: `OUT/test.bin`, pairs in the same layout, and
  `OUT/test_templates/`, an IJB-style template set (`sf2dist.eval.ijb`'s layout: `loose_crop/`
  and `meta/openset_face_tid_mid.txt`, `meta/openset_template_pair_label.txt`) scored by
  TAR@FAR on every pair of templates.

Pair sets are InsightFace-style `.bin` files (pickled (list of JPEG bytes, list of bools),
pair i is images 2i and 2i+1), laid out as LFW's: `folds` folds in order, each
`pairs / (2 folds)` positive pairs followed by as many negative ones, and the identities of
one fold never appear in another, so the 10-fold protocol's thresholds are chosen on other
people. No pair repeats. `OUT/seen_pairs.tsv`, `OUT/val_pairs.tsv` and `OUT/test_pairs.tsv`
say which identities and images each pair shows. The three pair sets have the same size and
folds; the pairs of `seen.bin` are drawn among each training identity's `train_images`
images.

Templates: every test identity has `templates_per_subject` templates of
`images_per_template` images, each image its own medium (stills); the pair list holds every
pair of templates, so S subjects give S·t·(S·t−1)/2 comparisons of which S·t(t−1)/2 are
genuine; the defaults give 499,000 impostor comparisons (TAR@FAR measurable down to 1e-5).
The test identities' template images are other images than those of `test.bin`.

Difficulty: beyond the nuisances of sf2dist-synth (pose, background, occlusion, lighting,
blur, noise, JPEG), `jitter` > 0 moves each image's latent face code away from its identity's
by `jitter` · N(0, I): face shape, colours, hair, glasses and the rest then vary within an
identity (as age, make-up and expression do), so identity is harder to tell. With jitter 0
an identity's images are exactly sf2dist-synth's.

Everything derives from `numpy.random.SeedSequence` keyed by the seed, a stream number and
the identity (or the pair set), so the output is the same bytes for a seed whatever
`workers` is. `OUT/openset.json`
records the identity ranges, files and counts; `OUT/train/manifest.json` is written last and
marks the directory as finished (as with sf2dist-synth).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sf2dist.data import synth
from sf2dist.data.shards import (
    SHARD_DIR_FILES,
    AlreadyConverted,
    OutputDirError,
    ShardSetWriter,
    claim_output_dir,
    write_manifest,
)
from sf2dist.imageio import encode_jpeg

OPENSET_VERSION = 2  # 2: seen.bin, pairs of the training identities
SUMMARY_NAME = "openset.json"
FINISHED_NAME = "train/manifest.json"  # written last: its presence marks a finished benchmark
TEMPLATE_PREFIX = "openset"  # meta/openset_face_tid_mid.txt, meta/openset_template_pair_label.txt
# SeedSequence streams of this module (sf2dist-synth uses 0..2 with the same seed)
_JITTER, _JITTER_IMAGES, _PAIRS = 100, 101, 102
_PAIR_SETS = {"val": 0, "test": 1, "seen": 2}


@dataclass(frozen=True)
class OpenSetSpec:
    """Sizes, difficulty and seed of an open-set benchmark (module doc)."""

    # the defaults are the quick profile of `make reproduce` (configs/reproduce/quick.yaml, the former CPU
    # profile), calibrated in docs/data.md
    train_identities: int = 1000
    train_images: int = 12  # per training identity
    val_identities: int = 500
    test_identities: int = 500
    pair_images: int = 6  # per validation and test identity, for the pairs
    pairs: int = 6000  # per pair set, half positive
    folds: int = 10
    templates_per_subject: int = 2
    images_per_template: int = 3
    size: int = 48
    jitter: float = 0.2
    seed: int = 0
    jpeg_quality: int | None = None  # None: drawn per image, as sf2dist-synth does
    shard_size: int = 10_000

    def __post_init__(self) -> None:
        positive = ("train_identities", "train_images", "val_identities", "test_identities", "folds",
                    "templates_per_subject", "images_per_template", "shard_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_images < 2 or self.pair_images < 2:
            raise ValueError(f"train_images and pair_images must be at least 2 (positive pairs need two images), "
                             f"got {self.train_images} and {self.pair_images}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.jitter < 0:
            raise ValueError(f"jitter must not be negative, got {self.jitter}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.pairs < 2 * self.folds or self.pairs % (2 * self.folds):
            raise ValueError(f"pairs ({self.pairs}) must be a positive multiple of 2 x folds ({2 * self.folds}): "
                             f"every fold holds as many positive as negative pairs")
        for name, pair_set in (("train_identities", "seen.bin"), ("val_identities", "val.bin"),
                               ("test_identities", "test.bin")):
            if getattr(self, name) < 2 * self.folds:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 2 x folds ({2 * self.folds}): "
                                 f"each fold of {pair_set} needs two identities of its own for its negative pairs")
        if self.test_identities * self.templates_per_subject < 2:
            raise ValueError("the template set needs at least two templates")

    @property
    def ranges(self) -> dict[str, range]:
        """Identity numbers of the training, validation and test identities (disjoint)."""
        val_start = self.train_identities
        test_start = val_start + self.val_identities
        return {"train": range(0, val_start), "val": range(val_start, test_start),
                "test": range(test_start, test_start + self.test_identities)}

    @property
    def test_images(self) -> int:
        """Images per test identity: those of the pairs, then those of its templates."""
        return self.pair_images + self.templates_per_subject * self.images_per_template

    @property
    def template_pair_counts(self) -> tuple[int, int]:
        """(genuine, impostor) template comparisons of the template set."""
        templates = self.test_identities * self.templates_per_subject
        genuine = self.test_identities * self.templates_per_subject * (self.templates_per_subject - 1) // 2
        return genuine, templates * (templates - 1) // 2 - genuine

    def source(self) -> dict:
        """What the output is compared with on a re-run (`claim_output_dir`)."""
        return {"kind": "synthetic-openset", "openset_version": OPENSET_VERSION,
                "synth_version": synth.GENERATOR_VERSION, **asdict(self)}


# -- images -------------------------------------------------------------------------------
def image_codes(seed: int, identity: int, count: int, jitter: float) -> np.ndarray:
    """The latent codes of an identity's `count` images: its code plus jitter · N(0, I), [count, D]."""
    code = synth.identity_codes(seed, np.array([identity]))  # [1, D]
    rng = np.random.default_rng(np.random.SeedSequence([seed, _JITTER, identity]))
    return code + jitter * rng.standard_normal((count, code.shape[1]))


def identity_images(seed: int, identity: int, count: int, size: int, jitter: float,
                    quality: int | None = None) -> list[bytes]:
    """The `count` JPEG images of one identity; with jitter 0 exactly sf2dist-synth's."""
    if jitter == 0:
        return synth.identity_jpegs(seed, identity, count, size, quality)
    # one canonical rendering per image (its own face code), then sf2dist-synth's nuisances
    canonical = synth.render_canonical(image_codes(seed, identity, count, jitter), round(size * synth._CANVAS))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _JITTER_IMAGES, identity]))
    images = synth.render_images(canonical, count, size, rng)
    qualities = rng.integers(synth.JPEG_QUALITY[0], synth.JPEG_QUALITY[1] + 1, count)
    if quality is not None:
        qualities[:] = quality
    return [encode_jpeg(image, quality=int(q)) for image, q in zip(images, qualities)]


def _render_task(task: tuple) -> list[bytes]:
    torch.set_num_threads(1)  # one process per core
    return identity_images(*task)


def _render(spec: OpenSetSpec, identities: range, count: int, workers: int, desc: str, progress: bool):
    """Yield (identity, its JPEG list) in identity order."""
    tasks = [(spec.seed, i, count, spec.size, spec.jitter, spec.jpeg_quality) for i in identities]
    with tqdm(total=len(tasks) * count, unit="img", desc=desc, disable=not progress) as bar:
        if workers == 0:
            for identity, jpegs in zip(identities, (identity_images(*task) for task in tasks)):
                bar.update(count)
                yield identity, jpegs
            return
        with multiprocessing.Pool(workers) as pool:
            for identity, jpegs in zip(identities, pool.imap(_render_task, tasks, chunksize=4)):
                bar.update(count)
                yield identity, jpegs


# -- protocols ----------------------------------------------------------------------------
def lfw_pairs(seed: int, pair_set: str, identities: int, images_per_identity: int, pairs: int,
              folds: int) -> list[tuple[bool, int, int, int, int]]:
    """Pairs over identities 0..identities-1 in LFW's layout: (issame, identity0, image0, identity1, image1).

    Fold f uses the identities i with i % folds == f only; it holds pairs / (2 folds)
    positive pairs (two distinct images of one identity), then as many negative pairs (two
    distinct identities), drawn without repetition.
    """
    per_fold = pairs // (2 * folds)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PAIRS, _PAIR_SETS[pair_set]]))
    image_pairs = [(a, b) for a in range(images_per_identity) for b in range(a + 1, images_per_identity)]
    result: list[tuple[bool, int, int, int, int]] = []
    for fold in range(folds):
        members = np.arange(fold, identities, folds)
        available = len(members) * len(image_pairs)
        if per_fold > available:
            raise ValueError(f"fold {fold} of the {pair_set} pairs needs {per_fold} positive pairs but its "
                             f"{len(members)} identities with {images_per_identity} images have {available}; "
                             f"add identities or images per identity")
        for choice in rng.choice(available, per_fold, replace=False).tolist():
            identity = int(members[choice // len(image_pairs)])
            first, second = image_pairs[choice % len(image_pairs)]
            result.append((True, identity, first, identity, second))
        available = len(members) * (len(members) - 1) // 2 * images_per_identity**2
        if per_fold > available:
            raise ValueError(f"fold {fold} of the {pair_set} pairs needs {per_fold} negative pairs but has "
                             f"{available}; add identities")
        seen: set[tuple[int, int, int, int]] = set()
        while len(seen) < per_fold:
            a, b = sorted(rng.choice(members, 2, replace=False).tolist())
            first, second = rng.integers(images_per_identity, size=2).tolist()
            if (a, first, b, second) not in seen:
                seen.add((a, first, b, second))
                result.append((False, a, first, b, second))
    return result


@dataclass(frozen=True)
class TemplateSet:
    """The test template protocol: images (by identity and image number), templates, pairs."""

    identities: np.ndarray  # int64 [N] identity of each image (global number)
    images: np.ndarray  # int64 [N] image number within its identity
    template_ids: np.ndarray  # int64 [N]
    media_ids: np.ndarray  # int64 [N]
    pairs: np.ndarray  # int64 [P, 2] template ids
    labels: np.ndarray  # bool [P] same subject


def template_set(spec: OpenSetSpec) -> TemplateSet:
    """Every test identity's templates (module doc) and every pair of templates."""
    per_subject, per_template = spec.templates_per_subject, spec.images_per_template
    test = spec.ranges["test"]
    subject = np.repeat(np.arange(len(test)), per_subject * per_template)  # local subject of each image
    slot = np.tile(np.arange(per_subject * per_template), len(test))  # image slot within the subject's templates
    template_of_image = subject * per_subject + slot // per_template  # 0-based template number
    templates = len(test) * per_subject
    first, second = np.triu_indices(templates, k=1)
    return TemplateSet(
        identities=test.start + subject,
        images=spec.pair_images + slot,
        template_ids=template_of_image + 1,
        media_ids=np.arange(len(subject), dtype=np.int64) + 1,
        pairs=np.stack([first, second], axis=1) + 1,
        labels=first // per_subject == second // per_subject,
    )


# -- writing ------------------------------------------------------------------------------
def _owned_files() -> tuple[str, ...]:
    return (tuple(f"train/{pattern}" for pattern in SHARD_DIR_FILES)
            + tuple(f"{name}{suffix}" for name in ("seen.bin", "val.bin", "test.bin") for suffix in ("", ".tmp"))
            + ("seen_pairs.tsv", "val_pairs.tsv", "test_pairs.tsv", "test_templates/loose_crop/*.jpg",
               "test_templates/meta/*", SUMMARY_NAME, SUMMARY_NAME + ".tmp"))


def is_generated(out_dir: str | os.PathLike, spec: OpenSetSpec) -> bool:
    """Whether `out_dir` holds a finished benchmark made from exactly `spec`."""
    try:
        manifest = json.loads((Path(out_dir) / FINISHED_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("source") == spec.source()


def _write_pair_set(out: Path, name: str, chosen: list, jpegs_of: Mapping[int, Sequence[bytes] | Mapping[int, bytes]]
                    ) -> None:
    """`name`.bin and `name`_pairs.tsv; `jpegs_of[identity][image]` is each image's JPEG."""
    with open(out / f"{name}_pairs.tsv", "w") as f:
        f.write("issame\tidentity0\timage0\tidentity1\timage1\n")
        for same, a, i, b, j in chosen:
            f.write(f"{int(same)}\t{a}\t{i}\t{b}\t{j}\n")
    jpegs = [jpegs_of[identity][image] for _, a, i, b, j in chosen for identity, image in ((a, i), (b, j))]
    with open(out / f"{name}.bin.tmp", "wb") as f:
        pickle.dump((jpegs, [same for same, *_ in chosen]), f, protocol=4)
    os.replace(out / f"{name}.bin.tmp", out / f"{name}.bin")


def _write_templates(root: Path, templates: TemplateSet, jpegs_of: dict[int, list[bytes]]) -> None:
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    names = [f"{identity:08d}_{image:04d}.jpg" for identity, image in zip(templates.identities.tolist(),
                                                                          templates.images.tolist())]
    for name, identity, image in zip(names, templates.identities.tolist(), templates.images.tolist()):
        (root / "loose_crop" / name).write_bytes(jpegs_of[identity][image])
    with open(root / "meta" / f"{TEMPLATE_PREFIX}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{name} {t} {m}\n" for name, t, m in zip(names, templates.template_ids.tolist(),
                                                              templates.media_ids.tolist()))
    table = np.column_stack([templates.pairs, templates.labels.astype(np.int64)])
    np.savetxt(root / "meta" / f"{TEMPLATE_PREFIX}_template_pair_label.txt", table, fmt="%d")


def generate(out_dir: str | os.PathLike, spec: OpenSetSpec, *, workers: int = 0, overwrite: bool = False,
             progress: bool = False) -> Path:
    """Write the benchmark (module doc) into `out_dir`; returns it.

    Raises `AlreadyConverted` when `out_dir` holds a finished benchmark of this very spec
    (`is_generated` tells beforehand) and `OutputDirError` when it holds anything else,
    unless `overwrite` (which removes only files this module writes).
    """
    out = claim_output_dir(out_dir, spec.source(), overwrite=overwrite, image_size=(spec.size, spec.size),
                           shard_size=spec.shard_size, owned=_owned_files(), manifest=FINISHED_NAME)
    ranges = spec.ranges
    # every pair set is drawn before any image is rendered, so an impossible one fails at once
    seen_pairs = lfw_pairs(spec.seed, "seen", len(ranges["train"]), spec.train_images, spec.pairs, spec.folds)
    val_pairs = lfw_pairs(spec.seed, "val", len(ranges["val"]), spec.pair_images, spec.pairs, spec.folds)
    test_pairs = lfw_pairs(spec.seed, "test", len(ranges["test"]), spec.pair_images, spec.pairs, spec.folds)
    templates = template_set(spec)

    val_images = dict(_render(spec, ranges["val"], spec.pair_images, workers, "validation identities", progress))
    shift = ranges["val"].start
    _write_pair_set(out, "val", [(s, a + shift, i, b + shift, j) for s, a, i, b, j in val_pairs], val_images)
    del val_images
    test_images = dict(_render(spec, ranges["test"], spec.test_images, workers, "test identities", progress))
    shift = ranges["test"].start
    _write_pair_set(out, "test", [(s, a + shift, i, b + shift, j) for s, a, i, b, j in test_pairs], test_images)
    _write_templates(out / "test_templates", templates, test_images)
    del test_images

    written = spec.train_identities * spec.train_images
    genuine, impostor = spec.template_pair_counts
    summary = {
        "source": spec.source(),
        "identities": {name: [r.start, r.stop] for name, r in ranges.items()},
        "files": {"train": "train", "seen": "seen.bin", "val": "val.bin", "test": "test.bin",
                  "test_templates": "test_templates"},
        "counts": {"train_images": written, "seen_pairs": len(seen_pairs), "val_pairs": len(val_pairs),
                   "test_pairs": len(test_pairs),
                   "templates": spec.test_identities * spec.templates_per_subject,
                   "template_images": len(templates.template_ids), "genuine_template_pairs": genuine,
                   "impostor_template_pairs": impostor},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = out / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / SUMMARY_NAME)

    (out / "train").mkdir(exist_ok=True)
    writer = ShardSetWriter(out / "train", spec.shard_size)
    # the seen pairs show the very JPEGs of the shards: kept as they are written, not rendered twice
    shown: dict[int, set[int]] = {}  # identity -> its images in the seen pairs (training identities start at 0)
    for _, a, i, b, j in seen_pairs:
        shown.setdefault(a, set()).add(i)
        shown.setdefault(b, set()).add(j)
    seen_images: dict[int, dict[int, bytes]] = {}
    for identity, jpegs in _render(spec, ranges["train"], spec.train_images, workers, "training identities", progress):
        for n, jpeg in enumerate(jpegs):
            writer.write(f"{identity:08d}_{n:04d}", jpeg, identity)
        seen_images[identity] = {n: jpegs[n] for n in shown.get(identity, ())}
    shards = writer.close()
    _write_pair_set(out, "seen", seen_pairs, seen_images)
    write_manifest(out / "train", num_classes=spec.train_identities, image_size=(spec.size, spec.size),
                   shards=shards, source=spec.source(),
                   counts={"records_read": written, "written": written, "rejected": 0, "reencoded": 0})
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = OpenSetSpec()
    parser = argparse.ArgumentParser(
        prog="python -m sf2dist.data.openset",
        description="Write an open-set benchmark of synthetic identities: training shards, validation and test "
                    "pairs (LFW layout) and an IJB-style test template set, from disjoint identity ranges.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS,
                        help="output directory, new or empty (required)")
    parser.add_argument("--train-identities", type=int, default=defaults.train_identities,
                        help="training identities K (labels 0..K-1)")
    parser.add_argument("--train-images", type=int, default=defaults.train_images, help="images per training identity")
    parser.add_argument("--val-identities", type=int, default=defaults.val_identities,
                        help="validation identities (val.bin)")
    parser.add_argument("--test-identities", type=int, default=defaults.test_identities,
                        help="test identities (test.bin and test_templates/)")
    parser.add_argument("--pair-images", type=int, default=defaults.pair_images,
                        help="images per validation/test identity that the pairs draw from")
    parser.add_argument("--pairs", type=int, default=defaults.pairs, help="pairs per pair set, half positive")
    parser.add_argument("--folds", type=int, default=defaults.folds,
                        help="folds of the pair sets (identities disjoint between folds)")
    parser.add_argument("--templates-per-subject", type=int, default=defaults.templates_per_subject,
                        help="templates per test identity")
    parser.add_argument("--images-per-template", type=int, default=defaults.images_per_template,
                        help="images (media) per template")
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    parser.add_argument("--jitter", type=float, default=defaults.jitter,
                        help="difficulty: std of each image's face-code offset from its identity's (0 = sf2dist-synth)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every identity, image and pair")
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help=f"one JPEG quality for every image (None: drawn per image from "
                             f"{synth.JPEG_QUALITY[0]}..{synth.JPEG_QUALITY[1]})")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="rendering processes (0 renders in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier benchmark in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("out", "workers", "overwrite", "quiet")}
    try:
        spec = OpenSetSpec(**options)
        out = generate(args.out, spec, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    except AlreadyConverted as done:
        print(f"already written: {done.out_dir} holds this benchmark; nothing to do (--overwrite writes it again)")
        return 0
    except (OutputDirError, ValueError, OSError) as err:
        print(f"openset: error: {err}", file=sys.stderr)
        return 1
    genuine, impostor = spec.template_pair_counts
    print(f"wrote {out}: {spec.train_identities} training identities x {spec.train_images} images, "
          f"{spec.pairs} pairs each of training (seen), validation and test identities, "
          f"{spec.test_identities * spec.templates_per_subject} test templates ({genuine} genuine and {impostor} "
          f"impostor comparisons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
