"""The IJB-B/IJB-C template protocols: template pooling, 1:1 verification and 1:N search.

A template is a set of images of one subject, grouped into media (a still photo, or the
frames of one video). Template pooling is media-weighted: the image embeddings of each
medium are averaged, the media averages are averaged (so a 300-frame video counts as much
as one photo) and the result is L2-normalised. By default the image embeddings are not
normalised first (their norm acts as a quality weight) and are multiplied by the face
detector's score when the protocol provides one; these are the settings under which IJB
numbers of ArcFace-family models are usually published.

1:1: the cosine similarity of each template pair of the pair list, scored on the exact ROC
of `sf2dist.eval.metrics`. 1:N: each probe template is searched against a gallery; a probe
is mated when its subject has a gallery template. A subject's score is its best gallery
template's; a mate's rank is the number of gallery subjects scoring at or above it (ties
count against the mate). TPIR@FPIR takes its threshold from the non-mated probes' highest
gallery scores (FPIR = share of non-mated probes whose top score is at or above it) and
counts a mated probe as found when its mate is at rank 1 with a score at or above it.

On disk (the layout the IJB-B/C meta files are distributed in), a benchmark directory holds
`loose_crop/` (the images) and `meta/` with, for a prefix such as `ijbc`:
  `ijbc_face_tid_mid.txt`          `image_name template_id media_id` per image;
  `ijbc_template_pair_label.txt`   `template_id template_id label` per 1:1 pair;
  `ijbc_name_5pts_score.txt`       optional: `image_name x1 y1 ... x5 y5 face_score`; with it
                                   every image is aligned to 112x112 from its five landmarks,
                                   without it the images must already be aligned;
  `ijbc_1N_probe_mixed.csv`, `ijbc_1N_gallery_<NAME>.csv`  optional, for 1:N: CSV files with
                                   a header naming TEMPLATE_ID and SUBJECT_ID columns, one row
                                   per image; every gallery file is searched separately.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sf2dist.eval.bin_io import BenchmarkFormatError, stack_images
from sf2dist.eval.metrics import FAR_TARGETS, Roc, rate_table, roc_curve, roc_summary, tar_at_far
from sf2dist.imageio import ImageDecodeError, decode_image

ALIGNED_SIZE = 112
# Where the eyes, nose tip and mouth corners of a face sit in a 112x112 training crop (the
# ArcFace/InsightFace crop), in pixel-centre coordinates.
REFERENCE_LANDMARKS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping `source` points onto `target`.

    Umeyama's closed form (no reflection); points are [k, 2]; returns the 2x3 matrix M with
    target ~ M @ [x, y, 1].
    """
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / np.mean(np.sum(source_centred**2, axis=1))
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp RGB uint8 [H, W, 3] so its five landmarks [5, 2] land on the reference crop.

    Bilinear sampling in pixel-centre coordinates, rounded to the nearest level; crop pixels
    whose source lies outside the image are black.
    """
    matrix = similarity_transform(landmarks, REFERENCE_LANDMARKS * (size / ALIGNED_SIZE))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]  # crop -> image
    crop_y, crop_x = np.mgrid[0:size, 0:size]
    source_x = inverse[0, 0] * crop_x + inverse[0, 1] * crop_y + inverse[0, 2]
    source_y = inverse[1, 0] * crop_x + inverse[1, 1] * crop_y + inverse[1, 2]
    left, top = np.floor(source_x), np.floor(source_y)
    right_weight = (source_x - left).astype(np.float32)[..., None]
    bottom_weight = (source_y - top).astype(np.float32)[..., None]
    # A one-pixel black border: every source position outside the image reads from it.
    height, width = image.shape[:2]
    pixels = np.pad(image, ((1, 1), (1, 1), (0, 0))).reshape(-1, image.shape[2])  # [(H+2)(W+2), 3]
    x0 = np.clip(left.astype(np.int64) + 1, 0, width + 1)
    x1 = np.clip(left.astype(np.int64) + 2, 0, width + 1)
    y0 = np.clip(top.astype(np.int64) + 1, 0, height + 1) * (width + 2)
    y1 = np.clip(top.astype(np.int64) + 2, 0, height + 1) * (width + 2)
    top_left, top_right = pixels[y0 + x0].astype(np.float32), pixels[y0 + x1].astype(np.float32)
    bottom_left, bottom_right = pixels[y1 + x0].astype(np.float32), pixels[y1 + x1].astype(np.float32)
    upper = top_left + right_weight * (top_right - top_left)
    lower = bottom_left + right_weight * (bottom_right - bottom_left)
    warped = upper + bottom_weight * (lower - upper)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def _group_sums(values: np.ndarray, group_of_row: np.ndarray, num_groups: int) -> np.ndarray:
    """Row sums of `values` [n, d] per group id in [0, num_groups) -> [num_groups, d]."""
    order = np.argsort(group_of_row, kind="stable")
    starts = np.searchsorted(group_of_row[order], np.arange(num_groups))
    return np.add.reduceat(values[order], starts, axis=0)


def pool_templates(
    embeddings: np.ndarray,
    template_ids: np.ndarray,
    media_ids: np.ndarray,
    weights: np.ndarray | None = None,
    normalize_images: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Media-weighted template embeddings (see module doc).

    `embeddings` [N, dim], `template_ids` and `media_ids` [N], optional per-image `weights`
    [N]. Returns the sorted distinct template ids [T] and their unit embeddings float32 [T, dim].
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    template_ids, media_ids = np.asarray(template_ids, dtype=np.int64), np.asarray(media_ids, dtype=np.int64)
    if embeddings.ndim != 2 or template_ids.shape != (len(embeddings),) or media_ids.shape != template_ids.shape:
        raise ValueError(
            f"embeddings {embeddings.shape}, template_ids {template_ids.shape} and media_ids {media_ids.shape} "
            "must describe the same images"
        )
    if normalize_images:
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    if weights is not None:
        embeddings = embeddings * np.asarray(weights, dtype=np.float64)[:, None]
    # Rows sorted by (template, medium), so each template's media are contiguous.
    media, medium_of_image, images_per_medium = np.unique(
        np.stack([template_ids, media_ids], axis=1), axis=0, return_inverse=True, return_counts=True
    )
    media_means = _group_sums(embeddings, medium_of_image.ravel(), len(media)) / images_per_medium[:, None]
    templates, template_of_medium = np.unique(media[:, 0], return_inverse=True)
    pooled = _group_sums(media_means, template_of_medium, len(templates))  # the media mean, up to scale
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"template {templates[np.flatnonzero(norms[:, 0] == 0)[0]]} pools to a zero embedding")
    return templates, (pooled / norms).astype(np.float32)


def _rows_of(templates: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Index of each id of `wanted` in the sorted `templates`; an error names a missing one."""
    rows = np.clip(np.searchsorted(templates, wanted), 0, len(templates) - 1)
    missing = templates[rows] != wanted
    if missing.any():
        raise BenchmarkFormatError(
            f"{int(missing.sum())} {what} name templates without images, e.g. template {wanted[missing].flat[0]}"
        )
    return rows


def template_pair_scores(
    templates: np.ndarray, template_embeddings: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16
) -> np.ndarray:
    """Cosine similarity of each template pair [P, 2] (ids), float64 [P]; chunked for IJB-C's 15.6M pairs."""
    rows = _rows_of(templates, np.asarray(pairs, dtype=np.int64), "template pairs")
    scores = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), chunk):
        first = template_embeddings[rows[start : start + chunk, 0]]
        second = template_embeddings[rows[start : start + chunk, 1]]
        scores[start : start + chunk] = np.einsum("nd,nd->n", first, second)
    return scores


def identification_metrics(
    probe_embeddings: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks: Sequence[int] = (1, 5),
    fpir_targets: Sequence[float] = FAR_TARGETS,
    chunk: int = 4096,
) -> dict:
    """1:N search of probe templates [P, dim] against gallery templates [G, dim] (see module doc).

    Returns counts, `rank_<k>` (share of mated probes whose mate ranks k or better) and
    `tpir_at_fpir` ({target: TPIR}; None where the target is below 1/non-mated probes, or for
    every target when every probe is mated).
    """
    probes = np.asarray(probe_embeddings, dtype=np.float64)
    gallery = np.asarray(gallery_embeddings, dtype=np.float64)
    probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    subjects, subject_of_template = np.unique(gallery_subjects, return_inverse=True)
    mated = np.isin(probe_subjects, subjects)
    if not mated.any():
        raise ValueError("no probe has a mate in the gallery; 1:N ranks are undefined")
    mate_column = np.searchsorted(subjects, probe_subjects)
    order = np.argsort(subject_of_template, kind="stable")
    starts = np.searchsorted(subject_of_template[order], np.arange(len(subjects)))
    top_scores = np.empty(len(probes))
    mate_scores = np.full(len(probes), -np.inf)
    mate_ranks = np.zeros(len(probes), dtype=np.int64)
    for start in range(0, len(probes), chunk):
        rows = slice(start, start + chunk)
        template_scores = probes[rows] @ gallery[order].T  # [c, G], gallery grouped by subject
        subject_scores = np.maximum.reduceat(template_scores, starts, axis=1)  # [c, S]
        top_scores[rows] = subject_scores.max(axis=1)
        chunk_mated = np.flatnonzero(mated[rows])
        mates = subject_scores[chunk_mated, mate_column[rows][chunk_mated]]
        mate_scores[start + chunk_mated] = mates
        mate_ranks[start + chunk_mated] = np.sum(subject_scores[chunk_mated] >= mates[:, None], axis=1)
    num_mated, num_nonmated = int(mated.sum()), int((~mated).sum())
    found = mated & (mate_ranks == 1)
    metrics = {
        "num_probes": len(probes),
        "num_mated": num_mated,
        "num_nonmated": num_nonmated,
        "gallery_templates": len(gallery),
        "gallery_subjects": len(subjects),
        **{f"rank_{k}": float(np.mean(mate_ranks[mated] <= k)) for k in ranks},
    }
    if num_nonmated == 0:
        metrics["tpir_at_fpir"] = {f"{target:.0e}": None for target in fpir_targets}
        return metrics
    if found.any():
        roc = roc_curve(
            np.concatenate([mate_scores[found], top_scores[~mated]]),
            np.concatenate([np.ones(int(found.sum()), bool), np.zeros(num_nonmated, bool)]),
        )
        tpir = tar_at_far(roc, fpir_targets) * (found.sum() / num_mated)
    else:
        tpir = np.zeros(len(fpir_targets))
    metrics["tpir_at_fpir"] = rate_table(tpir, fpir_targets, num_nonmated)
    return metrics


@dataclass(frozen=True)
class TemplateSubjects:
    """The templates of a 1:N gallery or probe set and the subject of each."""

    templates: np.ndarray  # int64 [T]
    subjects: np.ndarray  # int64 [T]


@dataclass(frozen=True)
class IJBProtocol:
    """Everything an IJB-style evaluation reads from a benchmark directory."""

    name: str
    image_paths: list[Path]  # [N]
    template_ids: np.ndarray  # int64 [N]
    media_ids: np.ndarray  # int64 [N]
    landmarks: np.ndarray | None  # float64 [N, 5, 2]
    face_scores: np.ndarray | None  # float64 [N]
    pairs: np.ndarray  # int64 [P, 2] template ids
    pair_labels: np.ndarray  # bool [P]
    probes: TemplateSubjects | None
    galleries: dict[str, TemplateSubjects]


def _read_fields(path: Path, num_fields: int, description: str) -> list[list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkFormatError(f"cannot read {path}: {err}") from err
    rows = []
    for line_number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != num_fields:
            raise BenchmarkFormatError(f"{path}:{line_number}: expected '{description}', found {line.strip()!r}")
        rows.append(fields)
    if not rows:
        raise BenchmarkFormatError(f"{path}: empty")
    return rows


def _integers(path: Path, rows: list[list[str]], columns: slice) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=np.int64)
    except ValueError as err:
        raise BenchmarkFormatError(f"{path}: expected integer ids: {err}") from err


def _read_template_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)  # IJB-C has 15.6M lines: parsed in C
    except (OSError, ValueError) as err:
        raise BenchmarkFormatError(f"{path}: expected 'template_id template_id label' lines: {err}") from err
    if table.shape[1] != 3 or len(table) == 0:
        raise BenchmarkFormatError(f"{path}: expected 'template_id template_id label' lines, found {table.shape[1]} columns")
    if not np.isin(table[:, 2], (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(table[:, 2], (0, 1)))[0])
        raise BenchmarkFormatError(f"{path}: pair {bad} has label {table[bad, 2]}; labels are 0 or 1")
    return table[:, :2], table[:, 2].astype(np.bool_)


def _read_template_subjects(path: Path) -> TemplateSubjects:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkFormatError(f"cannot read {path}: {err}") from err
    header = [name.strip().upper() for name in rows[0]] if rows else []
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise BenchmarkFormatError(f"{path}: the header must name TEMPLATE_ID and SUBJECT_ID columns, found {header}")
    template_column, subject_column = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    subject_of: dict[int, int] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        try:
            template, subject = int(row[template_column]), int(row[subject_column])
        except (IndexError, ValueError):
            raise BenchmarkFormatError(f"{path}:{line_number}: expected integer TEMPLATE_ID and SUBJECT_ID") from None
        if subject_of.setdefault(template, subject) != subject:
            raise BenchmarkFormatError(
                f"{path}:{line_number}: template {template} is listed for subjects {subject_of[template]} and {subject}"
            )
    if not subject_of:
        raise BenchmarkFormatError(f"{path}: no templates listed")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return TemplateSubjects(templates, np.array([subject_of[t] for t in templates], dtype=np.int64))


def is_ijb_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory in the IJB layout (a `meta/*_face_tid_mid.txt` file)."""
    return any(Path(path, "meta").glob("*_face_tid_mid.txt"))


def load_ijb(root: str | os.PathLike) -> IJBProtocol:
    """Read an IJB-style benchmark directory (layout in the module doc)."""
    root = Path(root)
    meta = root / "meta"
    found = sorted(meta.glob("*_face_tid_mid.txt"))
    if len(found) != 1:
        raise BenchmarkFormatError(
            f"{root}: expected exactly one meta/<prefix>_face_tid_mid.txt, found {[p.name for p in found]}"
        )
    prefix = found[0].name[: -len("_face_tid_mid.txt")]
    image_dir = root / "loose_crop"
    if not image_dir.is_dir():
        raise BenchmarkFormatError(f"{root}: no loose_crop/ image folder")
    rows = _read_fields(found[0], 3, "image_name template_id media_id")
    names = [row[0] for row in rows]
    if len(set(names)) != len(names):
        raise BenchmarkFormatError(f"{found[0]}: image names repeat; each line must name a distinct image")
    ids = _integers(found[0], rows, slice(1, 3))
    landmarks = face_scores = None
    landmark_path = meta / f"{prefix}_name_5pts_score.txt"
    if landmark_path.exists():
        landmark_rows = {row[0]: row[1:] for row in _read_fields(landmark_path, 12, "image_name x1 y1 ... x5 y5 score")}
        missing = [name for name in names if name not in landmark_rows]
        if missing:
            raise BenchmarkFormatError(f"{landmark_path}: no landmarks for {len(missing)} images, e.g. {missing[0]}")
        try:
            values = np.array([landmark_rows[name] for name in names], dtype=np.float64)  # [N, 11]
        except ValueError as err:
            raise BenchmarkFormatError(f"{landmark_path}: expected numbers after each image name: {err}") from err
        landmarks, face_scores = values[:, :10].reshape(-1, 5, 2), values[:, 10]
    pair_path = meta / f"{prefix}_template_pair_label.txt"
    pairs, pair_labels = _read_template_pairs(pair_path)
    probe_path = meta / f"{prefix}_1N_probe_mixed.csv"
    gallery_paths = sorted(meta.glob(f"{prefix}_1N_gallery_*.csv"))
    if probe_path.exists() != bool(gallery_paths):
        raise BenchmarkFormatError(
            f"{meta}: 1:N needs both {probe_path.name} and {prefix}_1N_gallery_<NAME>.csv files; only one kind is present"
        )
    galleries = {p.stem[len(f"{prefix}_1N_gallery_") :]: _read_template_subjects(p) for p in gallery_paths}
    probes = _read_template_subjects(probe_path) if probe_path.exists() else None
    # Checked here rather than after the images are embedded: a template without images is a broken benchmark.
    templates = np.unique(ids[:, 0])
    _rows_of(templates, pairs, f"template pairs of {pair_path}")
    if probes is not None:
        _rows_of(templates, probes.templates, f"1:N probes of {probe_path}")
        for path, gallery in zip(gallery_paths, galleries.values()):
            _rows_of(templates, gallery.templates, f"1:N gallery templates of {path}")
    return IJBProtocol(
        name=root.name,
        image_paths=[image_dir / name for name in names],
        template_ids=ids[:, 0],
        media_ids=ids[:, 1],
        landmarks=landmarks,
        face_scores=face_scores,
        pairs=pairs,
        pair_labels=pair_labels,
        probes=probes,
        galleries=galleries,
    )


class IJBImages(Sequence):
    """The protocol's images, read, decoded and aligned on access (IJB-C has 469k of them)."""

    def __init__(self, protocol: IJBProtocol) -> None:
        self.paths, self.landmarks = protocol.image_paths, protocol.landmarks

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            image = decode_image(path.read_bytes())
        except (OSError, ImageDecodeError) as err:
            raise BenchmarkFormatError(f"{path}: {err}") from err
        return image if self.landmarks is None else align_face(image, self.landmarks[index])

    def decode(self, start: int = 0, stop: int | None = None, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Images [start, stop) read, decoded and aligned into one uint8 [stop - start, H, W, 3] array.

        Every image must have one size: `image_size` (H, W) when given (see `stack_images`).
        """
        stop = len(self) if stop is None else stop
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"images [{start}, {stop}) are not a non-empty range of the {len(self)} images")
        indices = range(start, stop)
        return stack_images((self[i] for i in indices), [str(self.paths[i]) for i in indices], image_size)


def ijb_metrics(protocol: IJBProtocol, embeddings: np.ndarray) -> tuple[dict, Roc]:
    """1:1 (and, when the protocol has 1:N files, 1:N) numbers from the image embeddings [N, dim]."""
    templates, template_embeddings = pool_templates(
        embeddings, protocol.template_ids, protocol.media_ids, weights=protocol.face_scores
    )
    roc = roc_curve(template_pair_scores(templates, template_embeddings, protocol.pairs), protocol.pair_labels)
    metrics = {"num_images": len(embeddings), "num_templates": len(templates), **roc_summary(roc)}
    if protocol.probes is not None:
        probe_rows = _rows_of(templates, protocol.probes.templates, "1:N probes")
        metrics["identification"] = {
            name: identification_metrics(
                template_embeddings[probe_rows],
                protocol.probes.subjects,
                template_embeddings[_rows_of(templates, gallery.templates, f"1:N gallery {name}")],
                gallery.subjects,
            )
            for name, gallery in protocol.galleries.items()
        }
    return metrics, roc
