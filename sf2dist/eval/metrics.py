"""Verification numbers from embeddings: 10-fold accuracy, the exact ROC and what it yields.

Conventions, so that every figure here can be checked by hand:

- 10-fold accuracy (the LFW protocol, docs/design.md): the pairs are split into `folds` folds in
  order, the first `n % folds` one pair larger. A pair is predicted "same" when the squared
  L2 distance of its L2-normalised embeddings is *below* the threshold; the thresholds are
  `np.arange(0, 4, 0.01)`. For each fold, the threshold with the most correct predictions on
  the other folds (the lowest such threshold on ties) is scored on the held-out fold. The
  result is the mean and the population standard deviation (ddof=0) of the fold accuracies.
- The ROC is exact: with cosine similarity as the score and a pair accepted when its score is
  at or above the threshold, there is one operating point per distinct score, plus (0, 0).
  Equal scores are one group: all accepted or all rejected.
- TAR@FAR=f is the TAR of the most accepting threshold whose FAR does not exceed f, i.e. the
  highest TAR on the ROC with FAR <= f; nothing is interpolated. A target below 1/(number of
  negative pairs) cannot be measured on the set and is reported as None by `pair_metrics`.
- EER is where FAR = 1 - TAR on the ROC with straight segments between operating points;
  AUC is the area under those segments (ties count one half, as in the Mann-Whitney U).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DISTANCE_THRESHOLDS = np.arange(0, 4, 0.01)  # squared distances of unit vectors lie in [0, 4]


def _normalized(embeddings: np.ndarray, name: str) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be [n, dim], got shape {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        bad = int(np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))[0])
        raise ValueError(f"{name}[{bad}] has norm {norms[bad, 0]}; embeddings must be finite and non-zero")
    return embeddings / norms


def _check_pairs(embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray) -> tuple:
    first, second = _normalized(embeddings1, "embeddings1"), _normalized(embeddings2, "embeddings2")
    issame = np.asarray(issame, dtype=np.bool_)
    if first.shape != second.shape or issame.shape != (first.shape[0],):
        raise ValueError(
            f"embeddings1 {first.shape}, embeddings2 {second.shape} and issame {issame.shape} do not describe the same pairs"
        )
    return first, second, issame


def squared_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each pair of L2-normalised embeddings, float64 [n]."""
    first, second = _normalized(embeddings1, "embeddings1"), _normalized(embeddings2, "embeddings2")
    return _unit_squared_distances(first, second)


def cosine_scores(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair, float64 [n]."""
    first, second = _normalized(embeddings1, "embeddings1"), _normalized(embeddings2, "embeddings2")
    return _unit_cosines(first, second)


def _unit_squared_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.sum(np.square(first - second), axis=1)


def _unit_cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", first, second)


def kfold_accuracy(
    distances: np.ndarray, issame: np.ndarray, folds: int = 10, thresholds: np.ndarray = DISTANCE_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold held-out accuracy and the threshold chosen for it, [folds] each (see module doc)."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=np.bool_)
    if not 2 <= folds <= len(distances):
        raise ValueError(f"folds={folds} must be between 2 and the number of pairs ({len(distances)})")
    # correct[f, t]: correct predictions in fold f at thresholds[t]. A positive is correct when
    # its distance is below t, a negative when it is not: counts of sorted values below t.
    correct = np.empty((folds, len(thresholds)), dtype=np.int64)
    fold_sizes = np.empty(folds, dtype=np.int64)
    for fold, index in enumerate(np.array_split(np.arange(len(distances)), folds)):
        positive = np.sort(distances[index][issame[index]])
        negative = np.sort(distances[index][~issame[index]])
        positives_below = np.searchsorted(positive, thresholds, side="left")
        negatives_below = np.searchsorted(negative, thresholds, side="left")
        correct[fold] = positives_below + len(negative) - negatives_below
        fold_sizes[fold] = len(index)
    train_correct = correct.sum(axis=0, keepdims=True) - correct  # [folds, thresholds]
    best = np.argmax(train_correct, axis=1)  # first maximum: the lowest best threshold
    accuracies = correct[np.arange(folds), best] / fold_sizes
    return accuracies, thresholds[best]


def verification_accuracy(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, folds: int = 10
) -> tuple[float, float]:
    """10-fold verification accuracy (mean, std) of pairs of embeddings [n, dim] (see module doc)."""
    first, second, issame = _check_pairs(embeddings1, embeddings2, issame)
    accuracies, _ = kfold_accuracy(_unit_squared_distances(first, second), issame, folds)
    return float(accuracies.mean()), float(accuracies.std())


class Roc(NamedTuple):
    """The exact ROC: operating point k accepts every score >= thresholds[k].

    Point 0 is (FAR 0, TAR 0) at threshold +inf; FAR and TAR never decrease along the arrays.
    """

    far: np.ndarray  # float64 [k]
    tar: np.ndarray  # float64 [k]
    thresholds: np.ndarray  # float64 [k], decreasing
    num_positive: int
    num_negative: int


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> Roc:
    """The exact ROC of similarity `scores` [n] (higher = more alike) for labels `issame` [n]."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=np.bool_)
    if scores.ndim != 1 or scores.shape != issame.shape:
        raise ValueError(f"scores {scores.shape} and issame {issame.shape} must be matching 1-D arrays")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain NaN at index {int(np.flatnonzero(np.isnan(scores))[0])}")
    num_positive = int(issame.sum())
    num_negative = len(issame) - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(f"a ROC needs both kinds of pairs; got {num_positive} positive and {num_negative} negative")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], issame[order]
    # The last position of each run of equal scores: accepting a score accepts its whole run.
    group_ends = np.append(np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1)
    true_accepts = np.cumsum(sorted_same)[group_ends]
    false_accepts = (group_ends + 1) - true_accepts
    return Roc(
        far=np.concatenate([[0.0], false_accepts / num_negative]),
        tar=np.concatenate([[0.0], true_accepts / num_positive]),
        thresholds=np.concatenate([[np.inf], sorted_scores[group_ends]]),
        num_positive=num_positive,
        num_negative=num_negative,
    )


def tar_at_far(roc: Roc, far_targets: Sequence[float] = FAR_TARGETS) -> np.ndarray:
    """For each target FAR, the highest TAR among operating points with FAR <= target."""
    far_targets = np.asarray(far_targets, dtype=np.float64)
    # FAR never decreases, so the last point with FAR <= target has the highest TAR.
    last = np.searchsorted(roc.far, far_targets, side="right") - 1
    return roc.tar[last]


def equal_error_rate(roc: Roc) -> float:
    """The rate where FAR = 1 - TAR, on straight segments between the ROC's points."""
    gap = roc.far + roc.tar - 1.0  # -1 at (0, 0), +1 at (1, 1), never decreasing
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0:
        return float(roc.far[k])
    fraction = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(roc.far[k - 1] + fraction * (roc.far[k] - roc.far[k - 1]))


def roc_auc(roc: Roc) -> float:
    """Area under the ROC (trapezoids between operating points)."""
    return float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) / 2))


def best_accuracy(roc: Roc) -> tuple[float, float]:
    """(accuracy, score threshold) of the single threshold that is best over all pairs.

    The threshold is +inf when rejecting every pair is best (a degenerate set or model).
    """
    correct = roc.tar * roc.num_positive + (1.0 - roc.far) * roc.num_negative
    best = int(np.argmax(correct))
    return float(correct[best] / (roc.num_positive + roc.num_negative)), float(roc.thresholds[best])


def rate_table(rates: np.ndarray, targets: Sequence[float], num_negative: int) -> dict[str, float | None]:
    """{"1e-04": rate, ...}; None where the target is below 1/num_negative (not measurable)."""
    return {
        f"{target:.0e}": (float(rate) if target * num_negative >= 1 else None)
        for target, rate in zip(targets, rates)
    }


def roc_summary(roc: Roc, far_targets: Sequence[float] = FAR_TARGETS) -> dict:
    """Counts, EER, AUC, best-threshold accuracy and TAR@FAR of a ROC, as JSON-ready values."""
    accuracy, threshold = best_accuracy(roc)
    return {
        "num_pairs": roc.num_positive + roc.num_negative,
        "num_positive": roc.num_positive,
        "num_negative": roc.num_negative,
        "best_accuracy": accuracy,
        "best_threshold": threshold if np.isfinite(threshold) else None,
        "eer": equal_error_rate(roc),
        "auc": roc_auc(roc),
        "tar_at_far": rate_table(tar_at_far(roc, far_targets), far_targets, roc.num_negative),
    }


def pair_metrics(
    embeddings1: np.ndarray,
    embeddings2: np.ndarray,
    issame: np.ndarray,
    folds: int = 10,
    far_targets: Sequence[float] = FAR_TARGETS,
) -> dict:
    """Every verification number of a pair set: 10-fold accuracy plus `roc_summary`."""
    first, second, issame = _check_pairs(embeddings1, embeddings2, issame)
    accuracies, _ = kfold_accuracy(_unit_squared_distances(first, second), issame, folds)
    roc = roc_curve(_unit_cosines(first, second), issame)
    return {"accuracy": float(accuracies.mean()), "accuracy_std": float(accuracies.std()), **roc_summary(roc, far_targets)}
